"""Rollout throughput of ppo_virl.py on V-IRL, in one run on one model: the batched scheme of ppo_virl.py (one
left-padded generate per turn for all episodes, shared-prefix KV cache for text models, one batched
log-prob/value forward) next to the official batch-1 scheme (one episode at a time: generate, then a forward for
log-prob/value, protocol.md §4.2). Same envs (episode i is reset with seed i in both), sampling and lengths.

    python benchmarks/bench_rollout_virl.py                       # SFT checkpoint if present, else SmolLM2-135M
    python benchmarks/bench_rollout_virl.py --model-path tiny     # seconds
    python benchmarks/bench_rollout_virl.py --task virl-vl --model-path tiny
"""
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo_virl as ppo  # noqa: E402


@dataclass
class BenchArgs:
    task: Literal["virl-l", "virl-vl"] = "virl-l"
    """V-IRL-L or V-IRL-VL (the 2x2 grid of the current point as the image of each turn)"""
    model_path: Optional[str] = None
    """checkpoint / `tiny` / `smollm2` / `smolvlm` (default: runs/sft-{task}-default/final if present, else the base)"""
    num_envs: int = 16
    """parallel episodes of the batched scheme"""
    batch1_envs: int = 4
    """episodes run one at a time by the official scheme (its rate is per env step, so fewer suffice)"""
    turns: int = 2
    """turns per episode measured (after a wrong answer the next prompt carries the feedback: longer)"""
    max_new_tokens: int = 64
    """generation length for both schemes (the SmolLM2 answer block is <= 56 tokens)"""
    seed: int = 1


def gen_config(args, tok):
    """The sampling configuration ppo_*.py builds from its Args."""
    return ppo.transformers.GenerationConfig(do_sample=True, temperature=args.temperature, top_p=args.top_p,
                                             top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def rollout(agent, processor, args, envs, task: str, turns: int, batched: bool) -> tuple:
    """Runs `turns` steps of every env; returns (env steps, seconds)."""
    tok = ppo.tokenizer_of(processor)
    obs = [env.reset(seed=i)[0] for i, env in enumerate(envs)]
    start = time.time()
    groups = [list(range(len(envs)))] if batched else [[i] for i in range(len(envs))]
    for _ in range(turns):
        for group in groups:
            prompts = ppo.encode_prompts(processor, [obs[i] for i in group], task)
            responses = ppo.generate(agent, processor, prompts, gen_config(args, tok), ppo.PrefixCache(agent.policy) if args.kv_reuse else None, "cpu",
                                     synced_gpus=False)
            batch = []
            for p, r in zip(prompts, responses):
                cot, answer = ppo.action_masks(tok, r["response_ids"], ppo.ANSWER_KEY, args.official.skip_first_tokens)
                batch.append(dict(p, response_ids=r["response_ids"], cot_mask=cot, answer_mask=answer))
            ppo.score(agent, batch, tok.pad_token_id, "cpu", args.micro_batch_size, temperature=args.temperature,
                      thought_prob_coef=args.thought_prob_coef)
            for i, s in zip(group, batch):
                obs[i], _, terminated, truncated, _ = envs[i].step(tok.decode(s["response_ids"],
                                                                              skip_special_tokens=True))
                if terminated or truncated:
                    obs[i], _ = envs[i].reset()
    return len(envs) * turns, time.time() - start


if __name__ == "__main__":
    bench = tyro.cli(BenchArgs)
    default = f"runs/sft-{bench.task}-default/final"
    name = bench.model_path or (default if os.path.exists(default) else
                                "smollm2" if bench.task == "virl-l" else "smolvlm")
    torch.manual_seed(bench.seed)
    policy, processor = ppo.load_model(name, vl_task=bench.task == "virl-vl")
    agent = ppo.Agent(policy).eval()
    args = ppo.Args(task=bench.task, max_new_tokens=bench.max_new_tokens, micro_batch_size=bench.num_envs)
    source = ppo.data_sources(args)["train"]
    print(f"{bench.task}, model {name}: {sum(p.numel() for p in agent.parameters()) / 1e6:.1f}M params, "
          f"{torch.get_num_threads()} threads, max_new_tokens {bench.max_new_tokens}, {bench.turns} turns", flush=True)

    envs = [ppo.make_env(args, source, None) for _ in range(bench.num_envs)]
    steps_b, secs_b = rollout(agent, processor, args, envs, bench.task, bench.turns, batched=True)
    print(f"batched ({bench.num_envs} episodes): {steps_b} env steps in {secs_b:.1f}s = {steps_b / secs_b:.3f} steps/s",
          flush=True)
    args.micro_batch_size = 1
    envs = [ppo.make_env(args, source, None) for _ in range(bench.batch1_envs)]
    steps_1, secs_1 = rollout(agent, processor, args, envs, bench.task, bench.turns, batched=False)
    print(f"batch-1 official ({bench.batch1_envs} episodes): {steps_1} env steps in {secs_1:.1f}s = "
          f"{steps_1 / secs_1:.3f} steps/s", flush=True)
    print(f"ROLLOUT speed-up batched / batch-1: {(steps_b / secs_b) / (steps_1 / secs_1):.2f}x", flush=True)
