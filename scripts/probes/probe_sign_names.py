"""Probe (issue 14): can the frozen text tower write a landmark's full name from two image tokens per sign?

The vision stage pushes the image token over a sign's pictogram onto its category and the token over its monogram
onto its stem (make_models.py, part A), then trains the description through the frozen text tower (part B). This
probe replaces the tower and connector by an oracle: the 16 image tokens of a 2 x 2 view grid are free vectors,
P[position] + C[category] on the token left of a sign's tile centre line and P[position] + S[stem] on the token
right of it (the stage's own places), as a perfect tower with a linear connector would write them. Only C, S and P
train (initialised at the words' first-token embeddings and 0), through the frozen text tower on the stage's
description prompt and captions of random scenes (0-4 signs, the 9 skins' stems and name orders). Exact names are
then read back by greedy generation on scenes whose (stem, category) pairs were never trained (held out), and on
trained pairs (--init sum: C and S start at the sum of the word's token embeddings instead). A high rate says part B's ceiling with the stage's token layout is not the limit (the tower is); a
low one says the layout caps recognition whatever the tower reads.

    python scripts/probes/probe_sign_names.py --steps 200       # ~10-15 min on 2 cores
"""
import os
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import tyro
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common import load_model, tokenizer_of  # noqa: E402
from envs import VIRL_DESCRIBE_PROMPT, virl_caption, virl_read_caption  # noqa: E402
from make_models import describe_prompt  # noqa: E402
from make_virl_world import VIRL_CATEGORIES, VIRL_SKINS  # noqa: E402


@dataclass
class Args:
    model_path: str = "smolvlm-streets"
    """an Idefics3 checkpoint with 16 image tokens (its text tower and processor are used; its vision tower is not)"""
    steps: int = 200
    """training steps"""
    batch_size: int = 16
    """scenes per step"""
    lr: float = 3e-3
    """Adam learning rate of the oracle vectors"""
    eval_every: int = 50
    """greedy read-back every N steps"""
    eval_scenes: int = 64
    """scenes per read-back (held-out pairs; the same number of trained pairs)"""
    heldout_frac: float = 0.2
    """fraction of (stem, category) pairs never trained"""
    init: str = "first"
    """C and S start at each word's first-token embedding (first: what part A targets) or at the sum of all its
    tokens' embeddings (sum: the whole word, unordered)"""
    layout: str = "pair"
    """pair: C on the token left of the tile's centre line, S right of it (the stage's places) | tokens: C on the
    tile's top-left token and the stem's own token embeddings, fixed, on the other three in reading order (the last
    holds the sum of any further tokens): can the text tower copy a name instead of learning to write it?"""
    seed: int = 0


def main(args: Args):
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    vlm, processor = load_model(args.model_path, vl_task=True)
    vlm.requires_grad_(False)
    tok = tokenizer_of(processor)
    text, lm_head, embed = vlm.model.text_model, vlm.lm_head, vlm.model.text_model.embed_tokens
    prompt = describe_prompt(processor, VIRL_DESCRIBE_PROMPT)
    px = processor.image_processor.size["longest_edge"]
    ids = processor(text=[prompt], images=[[Image.new("RGB", (px, px))]], return_tensors="pt")["input_ids"][0]  # (L,)
    image_at = (ids == vlm.config.image_token_id).nonzero()[:, 0]                      # (16,) image token positions
    grid = int(len(image_at) ** 0.5)

    stems = sorted({s for skin in VIRL_SKINS.values() for s in skin["stems"]})
    order = {s: skin["order"] for skin in VIRL_SKINS.values() for s in skin["stems"]}
    skin_stems = [skin["stems"] for skin in VIRL_SKINS.values()]
    pairs = [(s, c) for s in stems for c in VIRL_CATEGORIES]
    rng.shuffle(pairs)
    heldout = set(pairs[:int(args.heldout_frac * len(pairs))])
    if args.init not in ("first", "sum"):
        raise SystemExit(f"--init must be first or sum, got {args.init!r}")
    if args.layout not in ("pair", "tokens"):
        raise SystemExit(f"--layout must be pair or tokens, got {args.layout!r}")
    tokens = lambda word: tok(" " + word, add_special_tokens=False)["input_ids"]  # noqa: E731
    start = (lambda word: embed.weight[tokens(word)[0]]) if args.init == "first" else (
        lambda word: embed.weight[tokens(word)].sum(0))
    C = torch.nn.Parameter(torch.stack([start(c) for c in VIRL_CATEGORIES]).detach())  # (16, D)
    S = torch.nn.Parameter(torch.stack([start(s) for s in stems]).detach())            # (148, D)
    P = torch.nn.Parameter(torch.zeros(len(image_at), embed.weight.shape[1]))         # (16, D)
    stem_tokens = {}  # --layout tokens: each stem's token embeddings on three slots, fixed: (3, D)
    for s in stems:
        t = tokens(s)
        rows = [embed.weight[t[0]], *(embed.weight[t[1:2]] if len(t) > 1 else []), *(
            [embed.weight[t[2:]].sum(0)] if len(t) > 2 else [])]
        stem_tokens[s] = torch.stack(rows).detach()                                        # (<=3, D)
    opt = torch.optim.Adam([C, S, P], lr=args.lr)

    def scene(want_heldout: bool):
        """[(tile, stem, category)] in tile order: each tile of one skin's grid has a sign with probability 0.5."""
        names = rng.choice(skin_stems)
        while True:
            signs = [(t, rng.choice(names), rng.choice(VIRL_CATEGORIES)) for t in range(4) if rng.random() < 0.5]
            if want_heldout is None and all((s, c) not in heldout for _, s, c in signs):
                return signs
            if want_heldout is not None and signs and all(((s, c) in heldout) == want_heldout for _, s, c in signs):
                return signs

    def name(s, c):
        return f"{s} {c}" if order[s] == "stem" else f"{c} {s}"

    def embeds(batch) -> torch.Tensor:
        """The prompt's input embeddings with the oracle image tokens: (B, L, D)."""
        x = embed(ids)[None].repeat(len(batch), 1, 1)                                   # (B, L, D)
        img = P[None].repeat(len(batch), 1, 1)                                          # (B, 16, D)
        for b, signs in enumerate(batch):
            for t, s, c in signs:
                left = (t // 2 * grid // 2) * grid + t % 2 * grid // 2  # the tile's top-left token, as make_models
                img[b, left] = img[b, left] + C[VIRL_CATEGORIES.index(c)]
                if args.layout == "pair":
                    img[b, left + 1] = img[b, left + 1] + S[stems.index(s)]
                else:  # the tile's other three tokens, in reading order
                    for slot, row in zip((left + 1, left + grid, left + grid + 1), stem_tokens[s]):
                        img[b, slot] = img[b, slot] + row
        x[:, image_at] = img
        return x

    @torch.no_grad()
    def read_back(want_heldout: bool) -> tuple:
        batch = [scene(want_heldout) for _ in range(args.eval_scenes)]
        x = embeds(batch)
        out = text(inputs_embeds=x, use_cache=True)
        cache, new = out.past_key_values, []
        nxt = lm_head(out.last_hidden_state[:, -1]).argmax(-1)                          # (B,)
        for _ in range(48):
            new.append(nxt)
            if (torch.stack(new, 1) == tok.eos_token_id).any(1).all():
                break
            out = text(inputs_embeds=embed(nxt)[:, None], past_key_values=cache, use_cache=True)
            nxt = lm_head(out.last_hidden_state[:, -1]).argmax(-1)
        rows = [r[:r.index(tok.eos_token_id)] if tok.eos_token_id in r else r for r in torch.stack(new, 1).tolist()]
        answers = tok.batch_decode(rows, skip_special_tokens=True)
        got = [name(s, c) in virl_read_caption(a) for signs, a in zip(batch, answers) for _, s, c in signs]
        whole = [virl_read_caption(a) == [name(s, c) for _, s, c in signs] for signs, a in zip(batch, answers)]
        return sum(got) / len(got), sum(whole) / len(whole), answers[:3], [[name(s, c) for _, s, c in b] for b in batch[:3]]

    eos = tok.eos_token
    t0 = time.time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0:
            for which in (True, False):
                names, whole, answers, truth = read_back(which)
                print(f"step {step} {'held-out' if which else 'trained'} pairs: names exact {names:.2f}, whole "
                      f"captions {whole:.2f}; e.g. {answers[0]!r} for {truth[0]}; {answers[1]!r} for {truth[1]} "
                      f"({time.time() - t0:.0f}s)", flush=True)
        if step == args.steps:
            break
        batch = [scene(None) for _ in range(args.batch_size)]
        caps = [tok(virl_caption([name(s, c) for _, s, c in signs]) + eos, add_special_tokens=False,
                    return_tensors="pt")["input_ids"][0] for signs in batch]
        T = max(len(c) for c in caps)
        target = torch.full((len(batch), T), -100)                                       # (B, T)
        for b, c in enumerate(caps):
            target[b, :len(c)] = c
        x = torch.cat([embeds(batch), embed(target.clamp(min=0))], 1)                   # (B, L + T, D)
        hidden = text(inputs_embeds=x).last_hidden_state[:, len(ids) - 1:-1]             # (B, T, D)
        loss = F.cross_entropy(lm_head(hidden).float().flatten(0, 1), target.flatten())  # fp32
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            print(f"step {step + 1}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
