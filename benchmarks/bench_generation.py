"""Generation speed against the machine's floor, in one run on one model (issue "Generation near the CPU limit").

1. The floor: fp32 matmul GFLOP/s of this machine (a square matmul and one shaped like the model's MLP).
2. Prefill and decode tokens/s of the model at the evaluation batch size, and the fraction of the matmul rate each
   reaches (2N FLOPs per token, N = parameters without the embedding table).
3. eval.py episodes/min on GP-L (ID, the default 5 verified answers + the forced extra turn) with the KV cache reused
   across turns and episodes (`--kv-reuse`, the default) and without it (the implementation before), side by side on
   the same episodes; the greedy answers of both must be identical. Wall and CPU time of this process.

    python benchmarks/bench_generation.py --model-path runs/sft-gp-l-default/final --episodes 32
    python benchmarks/bench_generation.py --model-path tiny --episodes 4      # seconds
"""
import os
import sys
import time
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as ev  # noqa: E402


@dataclass
class BenchArgs:
    model_path: str = "runs/sft-gp-l-default/final"
    """checkpoint, `tiny` or `smollm2`"""
    episodes: int = 32
    """GP-L ID episodes evaluated by each scheme"""
    batch_size: int = 32
    """eval.py --batch-size of both schemes"""
    max_new_tokens: int = 256
    """eval.py --max-new-tokens (its default)"""
    prefill_batch: int = 8
    """prompts in the prefill / decode measurement"""
    decode_tokens: int = 32
    """new tokens in the decode measurement"""
    kv_reuse: tuple[bool, ...] = (False, True)
    """the evaluation schemes to time (False = no reuse, the implementation before)"""


def timed(fn):
    start, cpu = time.time(), time.process_time()
    out = fn()
    return out, time.time() - start, time.process_time() - cpu


def matmul_gflops(m: int, k: int, n: int, repeats: int) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b  # warm-up
    _, wall, _ = timed(lambda: [a @ b for _ in range(repeats)])
    return 2 * m * k * n * repeats / wall / 1e9


def matmul_params(model) -> int:
    """Parameters that multiply every token: all but the embedding lookup (the lm_head counts, tied or not)."""
    cfg = model.config.get_text_config()
    return sum(p.numel() for p in model.parameters()) - cfg.vocab_size * cfg.hidden_size * (
        0 if cfg.tie_word_embeddings else 1)


if __name__ == "__main__":
    bench = tyro.cli(BenchArgs)
    torch.manual_seed(0)
    model, processor = ev.load_model(bench.model_path, vl_task=False)
    model.eval()
    tok = ev.tokenizer_of(processor)
    cfg = model.config.get_text_config()
    n_matmul = matmul_params(model)
    print(f"model {bench.model_path}: {n_matmul / 1e6:.1f}M matmul parameters, {torch.get_num_threads()} threads",
          flush=True)

    # 1. the floor
    square = matmul_gflops(1024, 1024, 1024, 20)
    shaped = matmul_gflops(bench.prefill_batch * 256, cfg.hidden_size, cfg.intermediate_size, 10)
    floor = max(square, shaped)
    print(f"FLOOR matmul fp32: square 1024^3 {square:.1f} GFLOP/s, model-shaped {shaped:.1f} GFLOP/s", flush=True)

    # 2. prefill and decode
    setting = ev.Setting("gp-l", "id", dict(treat_face_cards_as_10=True, ood=False, language_only=True,
                                            face_cards_color="mixed", split="all"), bench.episodes, 42)
    envs = [ev.make_env(setting) for _ in range(bench.prefill_batch)]
    conversations = [env.reset(seed=s)[0]["messages"] for env, s in zip(envs, setting.episode_seeds())]
    inputs = ev.chat_inputs(processor, conversations)
    tokens = int(inputs["attention_mask"].sum())
    with torch.no_grad():
        model(**inputs)  # warm-up
        _, wall, cpu = timed(lambda: model(**inputs))
    rate = tokens / wall
    print(f"PREFILL {bench.prefill_batch} prompts, {tokens} tokens: {rate:.0f} tokens/s wall ({tokens / cpu:.0f} per "
          f"CPU-second), {2 * n_matmul * rate / 1e9:.1f} GFLOP/s = {2 * n_matmul * rate / 1e9 / floor:.0%} of the "
          f"matmul floor", flush=True)
    with torch.no_grad():
        _, wall_p, _ = timed(lambda: model.generate(**inputs, max_new_tokens=1, do_sample=False))
        _, wall_g, cpu_g = timed(lambda: model.generate(**inputs, max_new_tokens=bench.decode_tokens + 1,
                                                        min_new_tokens=bench.decode_tokens + 1, do_sample=False))
    new = bench.prefill_batch * bench.decode_tokens
    rate = new / (wall_g - wall_p)
    print(f"DECODE {bench.prefill_batch} rows x {bench.decode_tokens} tokens after the prefill: {rate:.0f} tokens/s, "
          f"{2 * n_matmul * rate / 1e9:.1f} GFLOP/s = {2 * n_matmul * rate / 1e9 / floor:.0%} of the matmul floor "
          f"(batch {bench.prefill_batch}: each step reads all weights for {bench.prefill_batch} tokens)", flush=True)

    # 3. eval.py episodes/min, before (no KV reuse) and after
    results = {}
    for kv_reuse in bench.kv_reuse:
        policy = ev.ModelPolicy(model, processor, bench.max_new_tokens, 0.0, 1.0, 0, "cpu", kv_reuse=kv_reuse)
        episodes, wall, cpu = timed(lambda: ev.run_episodes(setting, policy, bench.batch_size, log_every_s=1e9))
        answers = [[t["response"] for t in e["turns"]] for e in episodes]
        turns = sum(len(a) for a in answers)
        results[kv_reuse] = (answers, wall, cpu)
        print(f"EVAL {'KV reuse' if kv_reuse else 'no reuse (before)'}: {bench.episodes} episodes, {turns} answers "
              f"in {wall:.1f} s wall, {cpu:.1f} s CPU = {60 * bench.episodes / wall:.2f} episodes/min", flush=True)
    if len(results) < 2:
        sys.exit(0)
    (a0, w0, c0), (a1, w1, c1) = results[False], results[True]
    same = sum(x == y for x, y in zip(a0, a1))
    print(f"EVAL speed-up with KV reuse: {w0 / w1:.2f}x wall, {c0 / c1:.2f}x CPU time; greedy answers identical in "
          f"{same}/{len(a0)} episodes", flush=True)
