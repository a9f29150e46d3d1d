"""Probe (issue 14): how fast does the vision stage's part A learn to read street signs, by camera geometry?

Part A of the vision stage (make_models.py) on street views alone, from the random `smolvlm` tower, with the stage's
own labels (the token left of a centred sign's tile centre line -> its category, the token right of it -> its
stem; each the sum of the word's token embeddings since the v6 stage, the first token before), for one geometry:
  v5      the v5 stage's views: from a corner landmark's node 70 % of the time (else a point within 40 m), along a
          street 80 % of the time with +-4 degrees of noise (else any heading);
  eval    where eval.py's recognition probe looks (the rail points whose milestone names a landmark): from the node,
          exactly along one of its streets, so every corner sign sits at its tile's centre, 14 m away (the stage's
          views since v6).
Prints the word accuracy (category and stem apart) on each step's batch, and at the end on fresh views of both
geometries.

    python scripts/probes/probe_sign_reading.py --geometry eval --steps 150
    python scripts/probes/probe_sign_reading.py --geometry eval --steps 150 --sign-scale 1.4
"""
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import make_models as mm  # noqa: E402
from envs import virl_view_grid  # noqa: E402


@dataclass
class Args:
    model: str = "smolvlm"
    """the random-tower model the stage starts from: smolvlm (make_models.build_smolvlm) | tiny (build_tiny, tests)"""
    geometry: str = "eval"
    """v5 | eval (see the docstring)"""
    steps: int = 150
    """part A steps (cosine schedule over them, 20 warm-up steps)"""
    batch_size: int = 32
    """views per step"""
    lr: float = 1e-3
    """AdamW learning rate (the stage's tower_lr)"""
    test_views: int = 128
    """fresh views of each geometry measured at the end"""
    sign_scale: float = 1.0
    """signs this many times wider and taller than the current world's (VIRL_SIGN_M's half width and top above the
    fixed bottom edge; world v3's are 1.4x v2's): larger glyphs at the same distance, in cities this probe renders"""
    seed: int = 0


class Views(mm.DescribeData):
    def __init__(self, processor, geometry: str, seed: int):
        super().__init__(processor, "all", seed)
        self.geometry = geometry

    def virl(self):
        if self.geometry == "eval":
            return super().virl()
        from make_virl_world import VIRL_PANO_SIZE, virl_readable_signs
        city = self.rng.choice(self.cities)
        lm = self.rng.choice(city.landmarks)
        node = city.nodes[lm["node"]]
        xy, kind, key = (node, "node", lm["node"]) if self.rng.random() < 0.7 else self.rng.choice(
            [p for p in city.points if math.dist(p[0], node) < 40])
        heading = (self.rng.choice(city.street_bearings(kind, key)) + self.rng.gauss(0, 4)
                   if self.rng.random() < 0.8 else self.rng.uniform(0, 360))
        rotation = self.rng.randrange(360)
        pano = city.render(xy, kind, key, VIRL_PANO_SIZE, rotation)
        image = virl_view_grid(pano, heading, rotation, self.px // 2, self.px // 2, line_width=1)
        signs = virl_readable_signs(city, xy, heading, pano_size=VIRL_PANO_SIZE)
        return image, None, None, self.sign_words(signs)  # the same labels as DescribeData.virl


def main(args: Args):
    if args.geometry not in ("v5", "eval") or args.model not in ("smolvlm", "tiny"):
        raise SystemExit(f"--geometry must be v5 or eval and --model smolvlm or tiny, got {args.geometry!r}, "
                         f"{args.model!r}")
    from make_virl_world import VIRL_SIGN_M  # the dict the renderer and the labels read
    VIRL_SIGN_M.update(half_width=VIRL_SIGN_M["half_width"] * args.sign_scale,
                       top=VIRL_SIGN_M["bottom"] + (VIRL_SIGN_M["top"] - VIRL_SIGN_M["bottom"]) * args.sign_scale)
    torch.manual_seed(args.seed)
    vlm, processor = mm.build_smolvlm() if args.model == "smolvlm" else mm.build_tiny(True)
    tower, connector, ip = vlm.model.vision_model, vlm.model.connector, processor.image_processor
    embed = vlm.model.text_model.embed_tokens.weight.detach()                          # (V, D), frozen
    embed_var = embed.var().item()
    data = Views(processor, args.geometry, args.seed)
    targets = data.classes(embed)                                                      # (V + K, D), frozen
    opt = torch.optim.AdamW([*tower.parameters(), *connector.parameters()], lr=args.lr, weight_decay=0.0)

    def scores(batch):
        pixels = ip(images=[[b[0]] for b in batch], return_tensors="pt")["pixel_values"][:, 0]  # (B, 3, px, px)
        tokens = connector(tower(pixel_values=pixels).last_hidden_state)                    # (B, T, D)
        where = [(i, t, w, k % 2) for i, b in enumerate(batch) for k, (t, w) in enumerate(b[3])]
        i, t, w, is_stem = zip(*where)
        i, t, is_stem, w = torch.tensor(i), torch.tensor(t), torch.tensor(is_stem), data.class_of(w, len(embed))
        picked = tokens[i, t]                                                               # (N, D)
        logits = picked.float() @ targets.float().T                                         # (N, V + K)
        loss = F.cross_entropy(logits, w) + ((picked - targets[w]) ** 2).mean() / embed_var
        right = logits.argmax(-1) == w
        return loss, right[is_stem == 0].float().mean().item(), right[is_stem == 1].float().mean().item()

    t0 = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = mm.cosine_lr(step, args.steps, args.lr)
        batch = [b for b in (data.virl() for _ in range(args.batch_size)) if b[3]]
        loss, cat, stem = scores(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0)
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step + 1}: loss {loss.item():.3f}, category {cat:.2f}, stem {stem:.2f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    with torch.no_grad():
        for geometry in ("eval", "v5"):
            data.geometry = geometry
            batch = [b for b in (data.virl() for _ in range(args.test_views)) if b[3]]
            _, cat, stem = scores(batch)
            print(f"fresh {geometry} views: category {cat:.2f}, stem {stem:.2f} ({len(batch)} views with labels)")


if __name__ == "__main__":
    main(tyro.cli(Args))
