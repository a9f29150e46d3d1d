"""One decode step of batched generation with HF's DynamicCache (torch.cat of the whole cache at every step) against
common.GrowingLayer (new keys/values written into spare room), side by side in one run on one model: wall and CPU ms
per step, their ratio, and the largest logit difference between the two (expected 0). Then the step's floor: the
bytes it must read (all weights, every row's cache) at the read bandwidth measured here, and its FLOPs at the matmul
rate measured here at the same batch.

    python benchmarks/bench_kv_cache.py --model-path runs/sft-gp-l-default/final --batch 32 --context 500
    python benchmarks/bench_kv_cache.py --model-path runs/sft-gp-l-default/final --profile --repeats 1 --steps 8
    python benchmarks/bench_kv_cache.py --model-path tiny --batch 4 --context 50 --steps 4     # seconds
"""
import contextlib
import os
import sys
import time
from dataclasses import dataclass

import torch
import transformers
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_generation import matmul_gflops, matmul_params  # noqa: E402
from common import growing_cache, load_model  # noqa: E402


@dataclass
class BenchArgs:
    model_path: str = "runs/sft-gp-l-default/final"
    """checkpoint / `tiny` / `smollm2`"""
    batch: int = 32
    """rows decoded together (eval.py's and the rollout's default batch)"""
    context: int = 500
    """tokens already in the cache (a GP-L turn-2 conversation is ~300-600 SmolLM2 tokens)"""
    steps: int = 16
    """decode steps timed per repetition"""
    repeats: int = 2
    """repetitions of each cache kind, interleaved; the fastest is reported"""
    profile: bool = False
    """also print torch.profiler's table of the GrowingLayer decode steps (where a step's time goes, by operator)"""


@torch.no_grad()
def decode(model, kind: str, ids, mask, steps: int, profile: bool = False):
    """Prefill `ids`, then `steps` greedy decode steps -> (wall s/step, CPU s/step, logits (steps, B, V))."""
    cache = transformers.DynamicCache(config=model.config) if kind == "DynamicCache" else growing_cache(model.config)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
    x, pos, logits = out.logits[:, -1].argmax(-1, keepdim=True), pos[:, -1:], []
    profiler = torch.profiler.profile() if profile else contextlib.nullcontext()
    wall, cpu = time.perf_counter(), time.process_time()
    with profiler:
        for _ in range(steps):
            mask, pos = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), pos + 1
            out = model(input_ids=x, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
            x = out.logits[:, -1].argmax(-1, keepdim=True)
            logits.append(out.logits[:, -1])
    if profile:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps, torch.stack(logits)


if __name__ == "__main__":
    args = tyro.cli(BenchArgs)
    torch.manual_seed(0)
    model = load_model(args.model_path, vl_task=False)[0].eval()
    ids = torch.randint(100, min(40000, model.config.vocab_size), (args.batch, args.context))
    mask = torch.ones_like(ids)
    mask[: args.batch // 2, : args.context // 25] = 0  # half the rows left-padded, as in a real batch
    best, logits = {}, {}
    for _ in range(args.repeats):
        for kind in ("DynamicCache", "GrowingLayer"):
            wall, cpu, logits[kind] = decode(model, kind, ids, mask, args.steps)
            best[kind] = min(best.get(kind, (1e9, 1e9)), (wall, cpu))
    for kind, (wall, cpu) in best.items():
        print(f"{kind:>12}: {1000 * wall:.0f} ms wall, {1000 * cpu:.0f} ms CPU per decode step (batch {args.batch}, "
              f"context {args.context}, {torch.get_num_threads()} threads)")
    print(f"DynamicCache / GrowingLayer: {best['DynamicCache'][0] / best['GrowingLayer'][0]:.2f}x wall, "
          f"{best['DynamicCache'][1] / best['GrowingLayer'][1]:.2f}x CPU; max |logit difference| "
          f"{(logits['DynamicCache'] - logits['GrowingLayer']).abs().max().item():.3g}")

    # the floor of one decode step: every step reads all weights and every row's cache once, and multiplies the
    # weights by `batch` tokens; the machine's read bandwidth and matmul rate are measured here, in the same run
    big = torch.randn(256 * 2 ** 20)                                                      # 1 GiB
    big.sum()
    start = time.perf_counter()
    for _ in range(3):
        big.sum()
    bandwidth = 3 * big.numel() * 4 / (time.perf_counter() - start)                       # bytes/s
    del big
    cfg = model.config
    rate = 1e9 * matmul_gflops(args.batch, cfg.hidden_size, cfg.intermediate_size, 200)  # FLOP/s at this batch
    n_matmul = matmul_params(model)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4 * args.batch * args.context
    weight_bytes = 4 * n_matmul
    t_bytes, t_flops = (weight_bytes + kv_bytes) / bandwidth, 2 * n_matmul * args.batch / rate
    wall = best["GrowingLayer"][0]
    print(f"FLOOR: read bandwidth {bandwidth / 1e9:.1f} GB/s (sum of 1 GiB), matmul {rate / 1e9:.0f} GFLOP/s at "
          f"{args.batch} rows; one step reads {weight_bytes / 1e6:.0f} MB of weights + {kv_bytes / 1e6:.0f} MB of cache "
          f"= {1000 * t_bytes:.0f} ms at that bandwidth, and computes {2 * n_matmul * args.batch / 1e9:.1f} GFLOP = "
          f"{1000 * t_flops:.0f} ms at that rate; measured {1000 * wall:.0f} ms = {(t_bytes + t_flops) / wall:.0%} of "
          f"their sum ({max(t_bytes, t_flops) / wall:.0%} of the larger)")
    if args.profile:  # a separate run: the profiler slows the steps it records
        decode(model, "GrowingLayer", ids, mask, args.steps, profile=True)
