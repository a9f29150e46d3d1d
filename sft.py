"""Supervised fine-tuning (the paper's SFT arm and RL's initial checkpoint): data, loss mask, training loop, quick eval.
Leaves out model building (make_models.py), loading and run bookkeeping (common.py), the environments (envs.py) and
the multi-turn evaluation (eval.py): this file reads as the recipe. Each choice, official counterpart: docs/sft.md.

    python sft.py --task gp-l                                      # SmolLM2-135M-Instruct, ~6 min on 2 CPU cores
    python sft.py --task gp-vl --model-path smolvlm                # SmolLM2 text tower + random vision tower
    python sft.py --task gp-l --model-path tiny --total-steps 20   # tiny random model, seconds
    torchrun --standalone --nproc_per_node 2 sft.py --task gp-l --model-path tiny
"""
import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from PIL import Image

from common import (PREPARED, RunLog, check_finite, fail, fsdp_shard, latest_checkpoint, load_model, prepared_path,
                    recover_checkpoints, replace_dir, setup_distributed, tokenizer_of, truncate_metrics, weights_finite)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    task: Literal["gp-l", "gp-vl", "virl-l", "virl-vl"] = "gp-l"
    """GeneralPoints or V-IRL, language-only (-l) or vision-language (-vl)"""
    model_path: str = "default"
    """default (smollm2 for -l tasks, smolvlm for -vl tasks) | smollm2 | smolvlm | tiny | a local path | a hub id"""
    seed: int = 42
    """seed of the experiment (the official seed)"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the model weights (fp32 on CPU: bf16 is slower there, offline-models.md addendum)"""
    mixed_precision: bool = False
    """bf16 compute with fp32 master weights (FSDP2 MixedPrecisionPolicy, else torch.autocast)"""
    dist: Literal["ddp", "fsdp"] = "ddp"
    """under torchrun: DDP (small models) or FSDP2 fully_shard (large models)"""
    micro_batch_size: int = 0
    """examples per forward/backward on each process (0: 8 for GP, 4 for V-IRL, whose examples are longer; detail #9)"""
    lr: float = 5e-5
    """peak learning rate (detail #8)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "sftvsrl"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""

    # Data (details #1-#3)
    data: Literal["oracle", "revision", "json"] = "oracle"
    """oracle: optimal single-turn pairs from the env | revision: multi-turn, with feedback | json: `data_file`"""
    data_file: Optional[str] = None
    """LLaVA-style JSON list of {"conversations": [{"from": "human"|"gpt", "value": ...}], "image": path (optional)}"""
    image_folder: Optional[str] = None
    """directory that relative `image` paths in `data_file` are resolved against (default: the file's directory)"""
    revision_max_errors: int = 2
    """at most this many wrong answers (with verifier feedback) before the correct one in `--data revision`"""
    revision_loss_on: Literal["last", "all"] = "last"
    """`--data revision`: train on the final (correct) answer only, or on every assistant turn"""
    official_sft_format: bool = False
    """Llama-3 checkpoints: the official SFT layout (detail #4): responses `text<|eot_id|>\n` (the `\n` trained), later
    turns hand-built with `<|eot_id|>\n`; default: the chat template for every turn, as RL and evaluation see it"""

    # Optimization (details #7-#11)
    total_steps: int = 30
    """number of optimizer steps (0 with --model-path CKPT: only evaluate CKPT; metrics are logged, no checkpoint)"""
    gradient_accumulation_steps: int = 0
    """micro-batches per optimizer step (0: 1 for GP, 2 for V-IRL, so that a default step is 8 examples either way)"""
    vision_lr: Optional[float] = None
    """peak LR of a VL model's vision tower + connector (None: 2e-4 if it starts random (smolvlm-blind, the tiny
    models), else --lr; detail #10)"""
    warmup_steps: int = 5
    """linear warm-up steps, then cosine decay to `min_lr_ratio * lr`"""
    min_lr_ratio: float = 0.0
    """final learning rate as a fraction of the peak"""
    adam_betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas (detail #7)"""
    adam_eps: float = 1e-7
    """AdamW epsilon (detail #7)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    max_length: int = 8192
    """examples longer than this (in tokens) stop the run with an error (never truncated silently)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    torch_deterministic: bool = True
    """if toggled, `torch.use_deterministic_algorithms(True, warn_only=True)` and cudnn.deterministic"""

    # Evaluation (detail #12), logging, checkpoints (detail #13)
    eval_every: int = 15
    """evaluate ID and rule-OOD success every N steps (and at step 0 and the end); 0 disables evaluation"""
    eval_episodes: int = 32
    """held-out instances per evaluation variant (fixed across evaluations)"""
    eval_batch_size: int = 16
    """prompts per batched greedy generate()"""
    eval_seed: int = 12345
    """seed of the fixed evaluation instances"""
    max_new_tokens: int = 0
    """generation budget in evaluation (0: 80 for GP, 200 for V-IRL; x3 for `tiny*`: per-character tokenizers)"""
    run_name: Optional[str] = None
    """the run directory name under `output_dir` (default: {task}__{exp_name}__{seed}__{time})"""
    output_dir: str = "runs"
    """where run directories (TensorBoard, metrics.jsonl, checkpoints) are written"""
    resume: Optional[str] = None
    """a run directory (its latest step_k/) or a checkpoint directory with trainer_state.json to continue from"""
    save_every: int = 0
    """write runs/{run_name}/step_{k}/ every N steps (0: only final/)"""
    save_optimizer: bool = True
    """store optimizer.pt in each checkpoint so that --resume continues exactly (not under FSDP)"""
    log_every: int = 1
    """print a progress line every N steps"""


def check_args(args: Args):
    """Every argument check, before anything is loaded or written (detail #16)."""
    if args.data == "json" and not args.data_file:
        fail("--data json needs --data-file")
    if args.data != "json" and (args.data_file or args.image_folder):
        fail(f"--data-file and --image-folder are only read with --data json (got --data {args.data})")
    for names, ok, rule in [(("lr", "vision_lr", "max_grad_norm", "adam_eps"), lambda v: v > 0, "> 0"),
                            (("eval_batch_size", "max_length", "log_every"), lambda v: v >= 1, ">= 1"),
                            (("total_steps", "micro_batch_size", "gradient_accumulation_steps", "warmup_steps",
                              "save_every", "eval_every", "max_new_tokens", "revision_max_errors", "weight_decay"),
                             lambda v: v >= 0, ">= 0"),
                            (("min_lr_ratio",), lambda v: 0 <= v <= 1, "in [0, 1]"),
                            (("adam_betas",), lambda v: all(0 <= b < 1 for b in v), "in [0, 1)")]:
        for name in names:
            value = getattr(args, name)
            if value is not None and not ok(value):
                fail(f"--{name.replace('_', '-')} must be {rule}, got {value}")
    if args.eval_every > 0 and args.eval_episodes < 1:
        fail(f"--eval-episodes must be >= 1 when evaluating (--eval-every {args.eval_every}), got {args.eval_episodes}")
    if args.resume and os.path.basename(os.path.normpath(args.resume)).endswith((".tmp", ".old")):
        fail(f"--resume {args.resume}: a *.tmp or *.old directory belongs to an interrupted save, never a complete "
             "checkpoint; resume from the run directory or a complete checkpoint")


# ---- Environments and data ----
def make_env(task: str, variant: str = "id", split: str = "seen", seed: Optional[int] = None):
    """variant: id (training rule) | ood (rule OOD); split: seen (training instances) | unseen (held-out ones)."""
    vl, ood = task.endswith("-vl"), variant == "ood"
    if task.startswith("gp"):
        from envs import GeneralPointsEnv
        return GeneralPointsEnv(treat_face_cards_as_10=not ood, ood=ood, language_only=not vl,
                                face_cards_color="black" if vl else "mixed", split=split, seed=seed)
    from envs import NavigationEnv
    # VL: a 2x2 grid of 128 px views = 256 px, the default VL model's input size
    return NavigationEnv(language_only=not vl, absolute_action=not ood, split={"seen": "train"}.get(split, "heldout"),
                         seed=seed, **(dict(resolution=128, crop_size=None) if vl else {}))


def sample_example(data: str, env, rng: random.Random, json_examples: list, max_errors: int, loss_on: str):
    """One training conversation -> (messages, PIL image | None, which answers to train on) (details #1-#3)."""
    if data == "json":
        messages, image, loss_on = rng.choice(json_examples)
        return messages, Image.open(image).convert("RGB") if image else None, loss_on
    obs, info = env.reset(seed=rng.randrange(2**31))
    if data == "revision":  # 0..max_errors wrong answers with the real verifier feedback, then a correct one
        return env.revision_trajectory(rng, max_errors=max_errors), obs["image"], loss_on
    if hasattr(env, "expert_pairs"):  # V-IRL: one random point of the expert rail
        pair = rng.choice(env.expert_pairs())
        messages = [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": pair["response"]}]
        return messages, None if env.language_only else env.image_at(pair["rail_idx"]), "last"
    return obs["messages"] + [{"role": "assistant", "content": env.oracle_response()}], obs["image"], "last"


def read_llava_json(path: str, vl_task: bool, image_folder: Optional[str] = None) -> list:
    """The released SFT data -> list of (messages, image path | None, "all"); validates every sample (detail #3)."""
    if not os.path.isfile(path):
        fail(f"--data-file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        fail(f"{path} is not valid JSON: {e}")
    if not isinstance(items, list) or not items:
        fail(f"{path} must hold a non-empty JSON list of samples")
    folder = image_folder or os.path.dirname(os.path.abspath(path))
    examples = []
    for i, item in enumerate(items):
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not turns or not isinstance(turns, list):
            fail(f"{path} sample {i}: no `conversations` list")
        if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
            fail(f"{path} sample {i}: every turn must be an object with a string `value`")
        roles = [t.get("from") for t in turns]
        if "gpt" not in roles:
            fail(f"{path} sample {i}: no `gpt` turn to train on")
        if roles[0] != "human" or any(r != ("human", "gpt")[j % 2] for j, r in enumerate(roles)):
            fail(f"{path} sample {i}: turns must alternate human/gpt starting with human, got {roles}")
        image = item.get("image")
        image = image[0] if isinstance(image, list) and len(image) == 1 else image
        if isinstance(image, list):
            fail(f"{path} sample {i}: only one image per conversation is supported")
        if image is not None and not isinstance(image, str):
            fail(f"{path} sample {i}: `image` must be a path, got {image!r:.60}")
        if (image or any("<image>" in t["value"] for t in turns)) and not vl_task:
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


def with_image(messages: list) -> list:
    """The image goes before the text of the first user message (detail #4)."""
    messages = [dict(m) for m in messages]
    first = next(m for m in messages if m["role"] == "user")
    first["content"] = [{"type": "image"}, {"type": "text", "text": first["content"]}]
    return messages


def chat_inputs(processor, conversations: list, images: Optional[list] = None) -> dict:
    """Chat prompts (+ one PIL image each for VL) -> left-padded input_ids, attention_mask [, pixel_values] for
    generate(), through the checkpoint's own chat template."""
    texts = [processor.apply_chat_template(with_image(m) if images else m, tokenize=False, add_generation_prompt=True)
             for m in conversations]
    tokenizer_of(processor).padding_side = "left"
    encode = processor if images else tokenizer_of(processor)
    kwargs = dict(images=[[im] for im in images]) if images else {}
    return encode(text=texts, **kwargs, padding=True, add_special_tokens=False, return_tensors="pt")


def encode_example(processor, messages: list, image, loss_on: str, max_length: int, eos_newline: bool = False) -> dict:
    """Chat template -> input_ids and a loss mask that is 1 exactly on the trained responses + their eos token,
    tokenized piece by piece (prompt, response, prompt, ...) so that every response starts on the token boundary
    where generation starts after `add_generation_prompt=True` (detail #4). eos_newline: a `\n` after every eos but
    the first prompt's (the official Llama-3 SFT layout)."""
    tok = tokenizer_of(processor)
    messages = with_image(messages) if image is not None else messages
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained = set(assistant if loss_on == "all" else assistant[-1:])
    render = lambda msgs, gen: processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    pieces, done = [], 0  # (text, is_response); `done` = characters of the full conversation already covered
    for i in assistant:
        prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
        content = messages[i]["content"]
        assert full.startswith(prompt + content), "chat template is not prefix-consistent; cannot mask the prompt"
        nl = "\n" if eos_newline else ""
        pieces.append((prompt[done:].replace(tok.eos_token, tok.eos_token + nl) if done else prompt, False))
        pieces.append((content + tok.eos_token + nl, i in trained))
        done = len(prompt) + len(content)
        if full[done:].startswith(tok.eos_token):
            done += len(tok.eos_token)
    input_ids, loss_mask, out = [], [], {}
    for k, (text, is_response) in enumerate(pieces):
        if k == 0 and image is not None:  # the image tokens are expanded inside the first prompt piece
            enc = processor(text=[text], images=[[image]], add_special_tokens=False, return_tensors="pt")
            ids = enc["input_ids"][0].tolist()
            out = {k2: v for k2, v in enc.items() if k2 not in ("input_ids", "attention_mask")}
            first = len(ids)
        else:
            ids = tok(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        loss_mask += [int(is_response)] * len(ids)
    if len(input_ids) > max_length:
        fail(f"an example has {len(input_ids)} tokens > --max-length {max_length}")
    # token-aligned inputs of the first piece (Mllama's cross_attention_mask (1, T, images, tiles), Qwen2-VL's
    # mm_token_type_ids (1, T)) go on over the rest as at its last token: later text sees the image, is no image
    out = {k: torch.cat([v, v[:, -1:].expand(-1, len(input_ids) - v.shape[1], *v.shape[2:])], 1)
           if v.dim() >= 2 and v.shape[:2] == (1, first) else v for k, v in out.items()}
    return dict(input_ids=input_ids, loss_mask=loss_mask, **out)


def collate(examples: list, pad_id: int) -> dict:
    """Right padding; the attention mask comes from the lengths (pad may equal eos, e.g. SmolLM2; detail #5)."""
    lengths = torch.tensor([len(e["input_ids"]) for e in examples])  # (B,)
    pad = lambda key, value: torch.nn.utils.rnn.pad_sequence([torch.tensor(e[key]) for e in examples],
                                                             batch_first=True, padding_value=value)  # (B, T)
    batch = dict(input_ids=pad("input_ids", pad_id), loss_mask=pad("loss_mask", 0))
    batch["attention_mask"] = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()
    T = batch["input_ids"].shape[1]  # VL: pixel_values etc.; token-aligned ones (B, T, ...) right-padded with zeros
    batch |= {k: torch.cat([torch.cat([e[k], e[k].new_zeros(1, T - e[k].shape[1], *e[k].shape[2:])], 1) if
                            e[k].dim() >= 2 and e[k].shape[:2] == (1, len(e["input_ids"])) else e[k] for e in examples])
              for k in examples[0] if k not in batch}
    return batch


# ---- ALGO LOGIC: the SFT loss and the learning-rate schedule ----
def sft_loss(model, batch: dict, autocast) -> tuple:
    """Sum of the cross-entropies of the response tokens; logits only from the first response on (detail #6)."""
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]  # (B, T)
    first = int(loss_mask.float().argmax(1)[loss_mask.any(1)].min())  # earliest response token in the batch
    keep = torch.arange(first - 1, input_ids.shape[1] - 1)  # positions whose logits predict tokens first..T-1
    inputs = {k: v for k, v in batch.items() if k != "loss_mask"}
    with autocast:
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (B, T - first, V)
    targets, mask = input_ids[:, first:], loss_mask[:, first:]  # (B, T - first)
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    return (nll * mask).sum(), mask.sum()


def get_lr(step: int, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to the peak `lr`, then cosine decay to min_lr_ratio * lr (nanoGPT `get_lr`; detail #7)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * coeff)


def is_vision_param(name: str) -> bool:
    """Vision tower and vision-to-text connector of Idefics3/SmolVLM, Mllama, LLaVA and Qwen2-VL (detail #10)."""
    return any(k in name for k in ("vision_model.", "vision_tower.", "visual.", "connector.", "multi_modal_projector."))


def format_valid(task: str, response: str) -> bool:
    """The official parser (envs.re_match) finds every answer field of the task."""
    from envs import re_match
    keys = ["cards", "number", "formula"] if task.startswith("gp") else \
        ["current observation", "current instruction", "action"]
    return all(re_match(response, k) != "None" for k in keys)


def card_hits(response: str, cards: list) -> int:
    """How many of the hand's cards the answer's "cards" field names at their position (0-4; chance 1/13 each)."""
    from envs import re_match, robust_str_to_list
    return sum(a == b for a, b in zip(robust_str_to_list(re_match(response, "cards")), cards))


@torch.no_grad()
def evaluate(model, processor, task: str, variants: list, episode_seeds: list, batch_size: int, max_new_tokens: int,
             rank: int = 0, world_size: int = 1, synced_gpus: bool = False) -> dict:
    """Greedy single-turn answers on the held-out instances `episode_seeds`, split across ranks (detail #12)."""
    tok, vl = tokenizer_of(processor), task.endswith("-vl")
    model.eval()
    metrics = {}
    for variant in variants:
        env = make_env(task, variant, split="unseen")
        seeds = episode_seeds[rank::world_size]
        sums = torch.zeros(5)  # success, format-valid, whole hand recognised, cards recognised / 4, count
        for b in range(0, len(seeds), batch_size):
            chunk = seeds[b: b + batch_size]
            obs = [env.reset(seed=s)[0] for s in chunk]
            inputs = chat_inputs(processor, [o["messages"] for o in obs], [o["image"] for o in obs] if vl else None)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 synced_gpus=synced_gpus)
            responses = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for s, response in zip(chunk, responses):
                env.reset(seed=s)
                _, reward, _, _, info = env.step(response)
                success = info["is_success"] if task.startswith("gp") else info["is_correct"]  # V-IRL: per step
                hits = card_hits(response, env.cards) if task == "gp-vl" else 0
                sums += torch.tensor([float(bool(success)), float(format_valid(task, response)),
                                      float(bool(info.get("cards_correct"))), hits / 4, 1.0])
        if world_size > 1:
            torch.distributed.all_reduce(sums)
        names = ["success", "format_valid"] + (["cards_acc", "per_card_acc"] if task == "gp-vl" else [])
        metrics |= {f"{variant}_{name}": (sums[j] / sums[4]).item() for j, name in enumerate(names)}
        if rank == 0:
            print(f"  eval {variant}: sample answer {responses[0][:160]!r}", flush=True)
    model.train()
    return metrics


def recover_run(path: str):
    """Finish a save that was interrupted between its renames (detail #13) in the run of `path` (a run directory or
    a checkpoint directory in one, possibly only NAME.old of it): common.recover_checkpoints over the run directory."""
    path = os.path.normpath(path)
    interrupted = not os.path.isdir(path) and os.path.isdir(path + ".old")  # e.g. --resume RUN/final, only final.old
    recover_checkpoints(os.path.dirname(path) if interrupted or os.path.isfile(os.path.join(path, "trainer_state.json"))
                        else path)


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    vl_task = args.task.endswith("-vl")
    if args.max_new_tokens == 0:  # x3 for the character-level tokenizers of `tiny*`
        args.max_new_tokens = (80 if args.task.startswith("gp") else 200) * (3 if args.model_path[:4] == "tiny" else 1)
    default_micro, default_accum = (4, 2) if args.task.startswith("virl") else (8, 1)  # detail #9
    default_accum = default_accum if args.micro_batch_size == 0 else 1  # an explicit micro batch: no accumulation
    args.micro_batch_size = args.micro_batch_size or default_micro
    args.gradient_accumulation_steps = args.gradient_accumulation_steps or default_accum
    json_examples = read_llava_json(args.data_file, vl_task, args.image_folder) if args.data == "json" else None

    # TRY NOT TO MODIFY: distributed set-up (nanoGPT style: the same file runs under python and torchrun; detail #15)
    distributed, rank, world_size, device = setup_distributed(args.cuda)
    batch_size = args.micro_batch_size * args.gradient_accumulation_steps * world_size  # examples per step

    # run identity (detail #13): --resume continues the run directory of its checkpoint; a new run never writes into
    # an existing directory (an explicit --run-name that exists stops, a default name gets a free suffix)
    if args.resume and rank == 0:
        recover_run(args.resume)
    if distributed:
        torch.distributed.barrier()
    resume_dir = latest_checkpoint(args.resume) if args.resume else None
    if resume_dir:
        run_dir = os.path.dirname(os.path.abspath(resume_dir))
        run_name = os.path.basename(run_dir)
        if args.run_name and args.run_name != run_name:
            fail(f"--resume continues the run {run_name!r} in {run_dir}; leave out --run-name {args.run_name!r}")
    elif args.run_name:
        run_name, run_dir = args.run_name, os.path.join(args.output_dir, args.run_name)
        if os.path.exists(run_dir):
            fail(f"the run directory {run_dir} already exists: continue it with --resume {run_dir}, or choose another "
                 "--run-name")
    else:
        base = run_name = f"{args.task}__{args.exp_name}__{args.seed}__{int(time.time())}"
        for k in range(2, 10_000):
            if not os.path.exists(os.path.join(args.output_dir, run_name)):
                break
            run_name = f"{base}__{k}"
        if distributed:  # every rank must write to the same run directory
            name = [run_name]
            torch.distributed.broadcast_object_list(name, src=0)
            run_name = name[0]
        run_dir = os.path.join(args.output_dir, run_name)
    if distributed:  # every rank has checked the directory before rank 0 creates it
        torch.distributed.barrier()

    # TRY NOT TO MODIFY: seeding (model init identical on all ranks; data different per rank)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(args.torch_deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    init_name = {"default": "smolvlm" if vl_task else "smollm2"}.get(args.model_path, args.model_path)
    model_path = resume_dir or init_name
    try:
        model, processor = load_model(model_path, vl_task, dtype=getattr(torch, args.dtype))
    except Exception as e:  # noqa: BLE001  (a truncated model.safetensors raises safetensors' own error type)
        fail(f"cannot load --model-path {model_path!r}: {type(e).__name__}: {str(e)[:300]}")
    pad_id = model.generation_config.pad_token_id  # the tokenizer's pad, else its eos (load_model)
    if args.official_sft_format and tokenizer_of(processor).eos_token != "<|eot_id|>":
        fail(f"--official-sft-format is the Llama-3 layout (eos <|eot_id|>); {model_path!r} has eos "
             f"{tokenizer_of(processor).eos_token!r}")
    model.to(device).train()
    if not weights_finite(model):
        fail(f"{model_path}: the checkpoint's weights are not finite (NaN or inf); refusing to train or evaluate it")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    num_params = sum(p.numel() for p in model.parameters())
    # trainer_state.json of the checkpoint (detail #14): --resume continues its counters, a new run counts D_init
    state_file = os.path.join(prepared_path(model_path, vl_task), "trainer_state.json")
    state = json.load(open(state_file)) if os.path.isfile(state_file) else {}
    d_init_tokens = state.get("d_init_tokens", 0) + (0 if resume_dir else state.get("tokens_trained", 0))
    if resume_dir and "tokens_trained" not in state:
        fail(f"--resume {resume_dir}: its trainer_state.json predates the checkpoint schema (no tokens_trained)")
    start_step, tokens_trained = (state["step"], state["tokens_trained"]) if resume_dir else (0, 0)
    if resume_dir and args.total_steps <= start_step:
        fail(f"--resume {resume_dir} is at step {start_step} already: pass a larger --total-steps to continue it")

    if rank == 0:
        try:
            os.makedirs(run_dir, exist_ok=bool(resume_dir))
        except FileExistsError:  # another run took the name after the check above
            fail(f"the run directory {run_dir} already exists (another run started with the same name)")
        if resume_dir:
            truncate_metrics(os.path.join(run_dir, "metrics.jsonl"), start_step, key="step")
    log = RunLog(run_dir, args, rank)  # TensorBoard + metrics.jsonl: log(metrics, step, {"step": step})

    # Distributed wrapping: DDP for small models, FSDP2 fully_shard per transformer block then the root
    train_model = model  # forward/backward through the DDP wrapper; generate() on the model itself
    if distributed and args.dist == "ddp":
        train_model = torch.nn.parallel.DistributedDataParallel(model,
                                                                device_ids=[device] if device.type == "cuda" else None)
    elif distributed:
        fsdp_shard([model], world_size, device, args.mixed_precision,
                   is_layer=lambda m: type(m).__name__.endswith(("DecoderLayer", "EncoderLayer")))
    synced_gpus = distributed and args.dist == "fsdp"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.mixed_precision and not synced_gpus)

    # Two parameter groups; the LR scale of each comes from the args, not from the optimizer state (detail #10)
    # a prepared model's tower starts random unless make_models.py's vision stage trained it (config.vision_stage)
    random_vision = init_name in ("tiny", *PREPARED) and not getattr(model.config, "vision_stage", None)
    vision_lr = args.vision_lr or (2e-4 if vl_task and random_vision else args.lr)
    text = [p for n, p in model.named_parameters() if p.requires_grad and not is_vision_param(n)]
    vision = [p for n, p in model.named_parameters() if p.requires_grad and is_vision_param(n)]
    groups = [dict(params=text)] + ([dict(params=vision)] if vision else [])
    lr_scales = [1.0, vision_lr / args.lr]  # zip() with the groups drops the second one for a text-only model
    optimizer = torch.optim.AdamW(groups, betas=args.adam_betas, eps=args.adam_eps, weight_decay=args.weight_decay)
    if resume_dir and os.path.isfile(os.path.join(resume_dir, "optimizer.pt")) and not synced_gpus:
        try:
            optimizer.load_state_dict(torch.load(os.path.join(resume_dir, "optimizer.pt"), weights_only=False))
        except Exception as e:  # noqa: BLE001  (truncated or foreign file)
            fail(f"--resume {resume_dir}: optimizer.pt cannot be loaded ({type(e).__name__}: {str(e)[:200]})")

    def save(step: int, name: str):
        """All ranks gather the full state dict (FSDP); rank 0 writes the checkpoint atomically (detail #13)."""
        if not weights_finite(model):
            fail(f"the weights are not finite at step {step}; stopping without writing {name}/ (lower --lr)")
        state_dict = None
        if synced_gpus:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:  # written into NAME.tmp/, then renamed: a directory without .tmp is complete
            path, tmp = os.path.join(run_dir, name), os.path.join(run_dir, name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, state_dict=state_dict)
            processor.save_pretrained(tmp)
            trainer_state = {"step": step, "tokens_trained": tokens_trained, "tokens_generated": 0,
                             "d_init_tokens": d_init_tokens, "flops": 6 * num_params * tokens_trained,
                             "run_name": run_name, "args": vars(args)}
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump(trainer_state, f, indent=2)
            if args.save_optimizer and not synced_gpus:
                torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
            replace_dir(tmp, path)
            print(f"saved {path}", flush=True)
        if distributed:
            torch.distributed.barrier()

    def run_eval(step: int):
        if args.eval_every <= 0:
            return
        t0 = time.time()
        seeds = range(args.eval_seed, args.eval_seed + args.eval_episodes)
        metrics = evaluate(model, processor, args.task, ["id", "ood"], seeds, args.eval_batch_size, args.max_new_tokens,
                           rank, world_size, synced_gpus)
        log({f"eval/{k}": v for k, v in metrics.items()} | {"compute/tokens_trained": tokens_trained,
                                                             "compute/flops": 6 * num_params * tokens_trained},
            step, {"step": step})
        if rank == 0:
            summary = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
            print(f"eval step {step} ({time.time() - t0:.0f}s): {summary}", flush=True)

    # ALGO LOGIC: the training loop
    if start_step == 0:
        run_eval(0)
        if args.total_steps == 0:  # evaluation only
            raise SystemExit(0)
    data_rng = random.Random()
    train_env = make_env(args.task, "id", split="seen") if args.data != "json" else None
    start_time, train_time, step_tokens_total = time.time(), 0.0, 0
    for step in range(start_step, args.total_steps):
        t_step = time.time()
        # data for this step depends only on (seed, rank, step), so --resume continues the same stream (detail #1)
        data_rng.seed(f"{args.seed}-{rank}-{step}")
        micro_batches = []
        for _ in range(args.gradient_accumulation_steps):
            examples = [sample_example(args.data, train_env, data_rng, json_examples, args.revision_max_errors,
                                       args.revision_loss_on) for _ in range(args.micro_batch_size)]
            examples = [encode_example(processor, messages, image if vl_task else None, loss_on, args.max_length,
                                       args.official_sft_format)
                        for messages, image, loss_on in examples]
            micro_batches.append({k: v.to(device) for k, v in collate(examples, pad_id).items()})
        num_response_tokens = sum(int(mb["loss_mask"].sum()) for mb in micro_batches)  # normaliser for the step

        lr = get_lr(step, args.lr, args.warmup_steps, args.total_steps, args.min_lr_ratio)
        for group, scale in zip(optimizer.param_groups, lr_scales):
            group["lr"] = lr * scale
        loss_sum = 0.0
        for i, mb in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1  # all-reduce gradients only on the last micro-step
            ctx = train_model.no_sync() if distributed and args.dist == "ddp" and not sync else contextlib.nullcontext()
            if synced_gpus:
                model.set_requires_gradient_sync(sync)
            with ctx:
                nll_sum, _ = sft_loss(train_model, mb, autocast)
                (nll_sum / num_response_tokens).backward()  # detail #6: one big batch
            loss_sum += nll_sum.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        step_tokens = torch.tensor([sum(int(mb["attention_mask"].sum()) for mb in micro_batches),
                                    num_response_tokens, loss_sum], dtype=torch.float64)  # summed over ranks
        if distributed:
            torch.distributed.all_reduce(step_tokens)
        check_finite("loss", step_tokens[2], f"step {step + 1}")  # the same decision on every rank (detail #16)
        check_finite("grad_norm", grad_norm, f"step {step + 1}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # TRY NOT TO MODIFY: record metrics
        tokens_trained += int(step_tokens[0])
        step_tokens_total += int(step_tokens[0])
        train_time += time.time() - t_step  # data + forward/backward + optimizer, without evaluation and saving
        done = step + 1 - start_step
        loss = step_tokens[2].item() / step_tokens[1].item()
        tokens_per_s, steps_per_s = step_tokens_total / train_time, done / train_time
        log({"losses/loss": loss, "charts/lr": lr, "charts/grad_norm": float(grad_norm),
             "compute/tokens_trained": tokens_trained, "compute/flops": 6 * num_params * tokens_trained,
             "charts/examples": (step + 1) * batch_size, "charts/tokens_per_s": tokens_per_s,
             "charts/steps_per_s": steps_per_s}, step + 1, {"step": step + 1})
        if rank == 0 and ((step + 1) % args.log_every == 0 or step + 1 == args.total_steps):
            eta = (args.total_steps - step - 1) * (time.time() - start_time) / done
            print(f"step {step + 1}/{args.total_steps} loss {loss:.4f} lr {lr:.2e} grad_norm {float(grad_norm):.2f} "
                  f"tokens/s {tokens_per_s:.0f} steps/s {steps_per_s:.3f} eta {eta / 60:.1f} min", flush=True)
        if args.eval_every > 0 and (step + 1) % args.eval_every == 0 and step + 1 != args.total_steps:
            run_eval(step + 1)
        if args.save_every > 0 and (step + 1) % args.save_every == 0 and step + 1 != args.total_steps:
            save(step + 1, f"step_{step + 1}")

    run_eval(args.total_steps)
    save(args.total_steps, "final")
    log.close()
    if distributed:  # every rank past its last collective before the process group goes (a rank tearing down
        torch.distributed.barrier()  # gloo while the other still talked to it aborted once in CI)
        torch.distributed.destroy_process_group()
