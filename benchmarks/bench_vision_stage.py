"""One part-B step of the vision pre-training stage (make_models.py: a batch of descriptions through the frozen text
tower, forward + backward into the connector and the vision tower) with and without the prompt-prefix cache, side by
side in one run on one model: wall and CPU seconds per step (interleaved, the median), their ratio, the tokens each
runs, and the largest difference of the loss per token and of the connector's gradient between the two (expected
float rounding only). The prefix (the system prompt and the chat template up to the image) is the same in every row
and depends on neither the tower nor the connector, so the cached version runs it once, with no gradient.

    python benchmarks/bench_vision_stage.py --model-path smolvlm-streets --steps 4
    python benchmarks/bench_vision_stage.py --model-path tiny-vl-seeing --steps 2 --batch 4     # seconds
"""
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import make_models as mm  # noqa: E402
from common import load_model  # noqa: E402


@dataclass
class BenchArgs:
    model_path: str = "smolvlm-streets"
    """a VL checkpoint or prepared name (smolvlm, smolvlm-streets, tiny-vl-seeing)"""
    steps: int = 4
    """part-B steps timed per variant (interleaved)"""
    batch: int = 16
    """descriptions per step (the stage's align_batch_size)"""
    views: float = 0.75
    """share of street views in a step (the rest are GP hands; smolvlm-streets' align_virl)"""
    seed: int = 0


def one_step(vlm, enc, labels, prefixes):
    """Forward + backward of one part-B batch: (wall s, CPU s, loss per token (N,), connector gradient)."""
    vlm.zero_grad(set_to_none=True)
    w, c = time.perf_counter(), time.process_time()
    per_token, _ = mm.description_loss(vlm, enc, labels, prefixes)
    per_token.mean().backward()
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    return wall, cpu, per_token.detach(), vlm.model.connector.modality_projection.proj.weight.grad.clone()


def main(args: BenchArgs):
    torch.manual_seed(args.seed)
    vlm, processor = load_model(args.model_path, vl_task=True)
    for name, p in vlm.named_parameters():  # what part B trains
        p.requires_grad = name.startswith(("model.vision_model.", "model.connector."))
    data = mm.DescribeData(processor, "all", args.seed)
    views = round(args.views * args.batch)
    kinds = ["gp"] * (args.batch - views) + ["virl"] * views
    prompt_tokens, prefixes, times = {}, {}, {"full": [], "prefix cached": []}
    loss_diff = grad_diff = 0.0
    for step in range(args.steps + 1):  # step 0 warms up (and fills the prefix cache); not timed
        enc, labels = mm.description_batch(data, processor, kinds, prompt_tokens)
        full = one_step(vlm, enc, labels, None)
        cached = one_step(vlm, enc, labels, prefixes)
        loss_diff = max(loss_diff, (full[2] - cached[2]).abs().max().item())
        grad_diff = max(grad_diff, (full[3] - cached[3]).abs().max().item() / full[3].abs().max().item())
        if step:
            times["full"].append(full[:2])
            times["prefix cached"].append(cached[:2])
    prefix = max(len(k) for k in prefixes)
    print(f"model {args.model_path}, batch {args.batch} ({views} views), {tuple(enc['input_ids'].shape)} tokens in the "
          f"last step, prefix {prefix} tokens, {torch.get_num_threads()} threads, {args.steps} steps each")
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
    for k, (w, c) in med.items():
        print(f"  {k:14s} {w:7.2f} s wall  {c:7.2f} s CPU per step")
    print(f"  full / prefix cached: {med['full'][0] / med['prefix cached'][0]:.2f}x wall, "
          f"{med['full'][1] / med['prefix cached'][1]:.2f}x CPU")
    print(f"  largest difference: loss per token {loss_diff:.2e}, connector gradient {grad_diff:.2e} (of its largest)")


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
