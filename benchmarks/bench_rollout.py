"""Rollout and update throughput of ppo_generalpoints.py, in one run on one model.

1. Multi-turn GP-L rollout, env steps/s: the batched scheme of ppo_generalpoints.py (one left-padded generate per
   turn for all episodes + one batched log-prob/value forward) next to the official batch-1 scheme (one episode at a
   time: generate, then a forward for log-prob/value, protocol.md §4.2). Same prompts, sampling and lengths.
2. PPO update tokens/s (get_logprob_and_value + clipped losses + backward + Adam) next to a bare
   forward + backward + Adam loop (full logits, token cross-entropy) on the same micro-batches.

    python benchmarks/bench_rollout.py                       # SFT checkpoint if present, else SmolLM2-135M
    python benchmarks/bench_rollout.py --model-path tiny     # seconds
"""
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo_generalpoints as ppo  # noqa: E402


@dataclass
class BenchArgs:
    model_path: Optional[str] = None
    """checkpoint / `tiny` / `smollm2` (default: runs/sft-gp-l-default/final if it exists, else smollm2)"""
    num_envs: int = 32
    """parallel episodes of the batched scheme"""
    batch1_envs: int = 4
    """episodes run one at a time by the official scheme (its rate is per env step, so fewer suffice)"""
    turns: int = 2
    """turns per episode measured (turn 2+ carries the verifier feedback: longer prompts)"""
    max_new_tokens: int = 64
    """generation length for both schemes"""
    update_samples: int = 8
    """samples per update measurement (micro-batches of micro_batch_size)"""
    micro_batch_size: int = 4
    """micro-batch size of both update loops"""
    seed: int = 1


def gen_config(args, tok):
    """The sampling configuration ppo_*.py builds from its Args."""
    return ppo.transformers.GenerationConfig(do_sample=True, temperature=args.temperature, top_p=args.top_p,
                                             top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def rollout(agent, processor, args, envs, batched: bool) -> tuple:
    """Runs `turns` steps of every env; returns (env steps, wall seconds, CPU seconds of this process, samples)."""
    tok = ppo.tokenizer_of(processor)
    obs = [env.reset(seed=i)[0] for i, env in enumerate(envs)]
    samples, start, cpu_start = [], time.time(), time.process_time()
    groups = [list(range(len(envs)))] if batched else [[i] for i in range(len(envs))]
    for _ in range(bench.turns):
        for group in groups:
            prompts = ppo.encode_prompts(processor, [obs[i] for i in group], "gp-l")
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
            samples += batch
    return len(envs) * bench.turns, time.time() - start, time.process_time() - cpu_start, samples


if __name__ == "__main__":
    bench = tyro.cli(BenchArgs)
    name = bench.model_path or ("runs/sft-gp-l-default/final" if os.path.exists("runs/sft-gp-l-default/final")
                                else "smollm2")
    torch.manual_seed(bench.seed)
    policy, processor = ppo.load_model(name, vl_task=False)
    agent = ppo.Agent(policy).eval()
    args = ppo.Args(max_new_tokens=bench.max_new_tokens, micro_batch_size=bench.num_envs)
    print(f"model {name}: {sum(p.numel() for p in agent.parameters()) / 1e6:.1f}M params, "
          f"{torch.get_num_threads()} threads, max_new_tokens {bench.max_new_tokens}, {bench.turns} turns", flush=True)

    steps_b, secs_b, cpu_b, samples = rollout(agent, processor, args, [ppo.make_env(args, None) for _ in
                                                                range(bench.num_envs)], batched=True)
    print(f"batched ({bench.num_envs} episodes): {steps_b} env steps in {secs_b:.1f}s = {steps_b / secs_b:.3f} steps/s "
          f"(CPU time {cpu_b:.1f}s)", flush=True)
    args.micro_batch_size = 1
    steps_1, secs_1, cpu_1, _ = rollout(agent, processor, args, [ppo.make_env(args, None) for _ in range(bench.batch1_envs)],
                                 batched=False)
    print(f"batch-1 official ({bench.batch1_envs} episodes): {steps_1} env steps in {secs_1:.1f}s = "
          f"{steps_1 / secs_1:.3f} steps/s (CPU time {cpu_1:.1f}s)", flush=True)
    # on a shared machine wall time depends on the other jobs; CPU time of this process is the steadier measure
    print(f"ROLLOUT speed-up batched / batch-1: {(steps_b / secs_b) / (steps_1 / secs_1):.2f}x wall, "
          f"{(steps_b / cpu_b) / (steps_1 / cpu_1):.2f}x CPU time", flush=True)

    # update throughput on the same micro-batches
    tok = ppo.tokenizer_of(processor)
    args.micro_batch_size = bench.micro_batch_size
    samples = samples[:bench.update_samples]
    batches = [ppo.collate(samples[i:i + bench.micro_batch_size], tok.pad_token_id, "cpu")
               for i in range(0, len(samples), bench.micro_batch_size)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    agent.train()
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-6, eps=1e-7)

    def ppo_update():
        for b in batches:
            newlogprob, newvalue, _, _ = ppo.get_logprob_and_value(agent, b, args.temperature, args.thought_prob_coef)
            ratio = (newlogprob - newlogprob.detach()).exp()
            adv, ret = torch.ones_like(ratio), torch.zeros_like(newvalue)
            pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(0.9, 1.1)).mean()
            v_loss = 0.5 * torch.max((newvalue - ret) ** 2, (newvalue.detach() + (newvalue - newvalue.detach())
                                                               .clamp(-0.1, 0.1) - ret) ** 2).mean()
            ((pg_loss + 0.5 * v_loss) / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(agent.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def bare_update():
        for b in batches:
            logits = agent.policy(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                  position_ids=b["position_ids"]).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["input_ids"][:, 1:].flatten())
            (loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(agent.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    results, cpu = {}, {}
    for label, fn in (("bare", bare_update), ("ppo", ppo_update), ("bare", bare_update), ("ppo", ppo_update)):
        start, cpu_start = time.time(), time.process_time()
        fn()  # the first pair warms up; the second is reported
        results[label], cpu[label] = tokens / (time.time() - start), tokens / (time.process_time() - cpu_start)
    print(f"update on {len(samples)} samples ({tokens} tokens): PPO {results['ppo']:.1f} tok/s, bare forward+backward "
          f"{results['bare']:.1f} tok/s", flush=True)
    print(f"UPDATE ratio PPO / bare: {results['ppo'] / results['bare']:.2f} wall, {cpu['ppo'] / cpu['bare']:.2f} CPU time",
          flush=True)
