"""Rollout and update throughput of ppo_generalpoints.py, side by side in one run on one model.

Rollout schemes on the same multi-turn GP-L episodes (same sampling settings and lengths):
  batch-1   the official scheme (protocol.md §4.2): one episode at a time, generate, then a log-prob/value forward;
  before    the previous batched rollout: one left-padded generate per turn for all episodes, the prompt prefix
            common to the turn's episodes prefilled once, then a batched log-prob/value forward;
  kv        the default now: PrefixCache keeps each episode's KV cache between turns (only the feedback and the
            next prompt are prefilled), then the batched log-prob/value forward;
  kv+lp     kv with --logprobs-from-sampling: log-probs and values from the sampling pass, no second forward;
  .../cN    with --gen-chunk N: rows still unfinished after N new tokens go on alone (e.g. kv+lp/c32; kv+lp/cN
            draws with torch.multinomial, since the InverseCDFSampler's log-probs need one generate call);
  .../mn    kv schemes: draw with generate's torch.multinomial (--no-inverse-cdf-sampling) instead of the scripts'
            default InverseCDFSampler; .../icdf: batch-1 and before draw with InverseCDFSampler instead of
            torch.multinomial (the official code and the previous rollout used multinomial).
Then the PPO update tokens/s next to a bare forward + backward + Adam loop on the same micro-batches.

    python benchmarks/bench_rollout.py --model-path runs/sft-gp-l-default/final --num-envs 8 --turns 2
    python benchmarks/bench_rollout.py --model-path tiny     # seconds
"""
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo_generalpoints as ppo  # noqa: E402


@dataclass
class BenchArgs:
    model_path: str = "runs/sft-gp-l-default/final"
    """checkpoint / `tiny` / `smollm2`"""
    num_envs: int = 32
    """parallel episodes of the batched schemes"""
    batch1_envs: int = 4
    """episodes run one at a time by the official scheme (its rate is per env step, so fewer suffice)"""
    turns: int = 2
    """turns per episode measured (turn 2+ carries the verifier feedback: longer prompts)"""
    max_new_tokens: int = 96
    """generation length of every scheme (the main job's PPO setting)"""
    schemes: tuple[str, ...] = ("batch-1", "before", "kv", "kv+lp")
    """which schemes to run; `scheme@ENVSxTURNS` (e.g. kv+lp@16x1) overrides the episodes and turns of one scheme"""
    update_samples: int = 8
    """samples per update measurement (micro-batches of micro_batch_size)"""
    micro_batch_size: int = 4
    """micro-batch size of both update loops"""
    seed: int = 1


@torch.no_grad()
def generate_before(agent, processor, prompts: list[dict], gen_config, inverse_cdf: bool = False) -> list[dict]:
    """The batched generate of ppo_generalpoints.py before KV reuse (commit 5d29c63): the prefix common to all
    prompts of the turn is prefilled once and its cache repeated over the batch; the rest is prefilled every turn.
    inverse_cdf: draw with common.InverseCDFSampler instead of torch.multinomial."""
    tok, policy = ppo.tokenizer_of(processor), agent.policy
    gen_config, kwargs = ppo.copy.deepcopy(gen_config), {}
    if inverse_cdf:
        kwargs["logits_processor"] = [ppo.InverseCDFSampler.swap_in(gen_config)]
    ids = [p["prompt_ids"] for p in prompts]
    L = 0
    while all(len(x) > L + 1 and x[L] == ids[0][L] for x in ids):
        L += 1
    S = max(len(x) for x in ids) - L
    input_ids = torch.full((len(ids), L + S), tok.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    input_ids[:, :L], attention_mask[:, :L] = torch.tensor(ids[0][:L]), 1
    for i, x in enumerate(ids):
        input_ids[i, L + S - (len(x) - L):], attention_mask[i, L + S - (len(x) - L):] = torch.tensor(x[L:]), 1
    cache = ppo.transformers.DynamicCache(config=policy.config)
    if len(ids) > 1 and L >= 8:
        policy(input_ids=torch.tensor([ids[0][:L]]), cache=cache, use_cache=True)
        cache.batch_repeat_interleave(len(ids))
    else:  # batch 1 or no common prefix: a plain left-padded batch
        batch = ppo.collate([dict(prompt_ids=x, response_ids=[], cot_mask=[], answer_mask=[], extra={}) for x in ids],
                            tok.pad_token_id, "cpu")
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    sequences = policy.generate(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                                generation_config=gen_config, **kwargs)
    out = []
    for x in sequences[:, input_ids.shape[1]:].tolist():
        n = x.index(tok.eos_token_id) + 1 if tok.eos_token_id in x else len(x)
        out.append(dict(response_ids=x[:n]))
    return out


def rollout(agent, processor, args, envs, scheme: str, turns: int) -> tuple:
    """`turns` steps of every env; returns (env steps, wall seconds, CPU seconds of this process, samples)."""
    tok = ppo.tokenizer_of(processor)
    gen_config = ppo.transformers.GenerationConfig(
        do_sample=True, temperature=args.temperature, top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    lp = dict(temperature=args.temperature, thought_prob_coef=args.thought_prob_coef)
    obs = [env.reset(seed=i)[0] for i, env in enumerate(envs)]
    scheme, *options = scheme.split("/")  # kv+lp/c32: --gen-chunk 32; /mn, /icdf: the sampler
    chunk = next((o[1:] for o in options if o.startswith("c")), 0)
    inverse_cdf = "icdf" in options if scheme in ("batch-1", "before") else "mn" not in options
    inverse_cdf = inverse_cdf and not (chunk and scheme == "kv+lp")  # its log-probs need one call: multinomial
    prefix_cache = ppo.PrefixCache(agent.policy, int(chunk or 0)) if scheme.startswith("kv") else None
    samples, start, cpu_start = [], time.time(), time.process_time()
    groups = [[i] for i in range(len(envs))] if scheme == "batch-1" else [list(range(len(envs)))]
    for _ in range(turns):
        for group in groups:
            prompts = ppo.encode_prompts(processor, [obs[i] for i in group], "gp-l")
            if scheme in ("batch-1", "before"):
                responses = generate_before(agent, processor, prompts, gen_config, inverse_cdf)
            else:
                responses = ppo.generate(agent, processor, prompts, gen_config, prefix_cache, "cpu", False,
                                         with_logprobs=scheme == "kv+lp", inverse_cdf=inverse_cdf)
            batch = []
            for p, r in zip(prompts, responses):
                cot, answer = ppo.action_masks(tok, r["response_ids"], ppo.ANSWER_KEY, 2)
                batch.append(dict(p, response_ids=r["response_ids"], cot_mask=cot, answer_mask=answer,
                                  sampled=(r.get("token_logprobs"), r.get("value"))))
            if scheme != "kv+lp":
                ppo.score(agent, batch, tok.pad_token_id, "cpu", len(batch), **lp)
            for i, s in zip(group, batch):
                obs[i], _, terminated, truncated, _ = envs[i].step(tok.decode(s["response_ids"],
                                                                              skip_special_tokens=True))
                if terminated or truncated:
                    obs[i], _ = envs[i].reset()
            samples += batch
    return len(envs) * turns, time.time() - start, time.process_time() - cpu_start, samples


if __name__ == "__main__":
    bench = tyro.cli(BenchArgs)
    torch.manual_seed(bench.seed)
    policy, processor = ppo.load_model(bench.model_path, vl_task=False)
    agent = ppo.Agent(policy).eval()
    args = ppo.Args(max_new_tokens=bench.max_new_tokens)
    print(f"model {bench.model_path}: {sum(p.numel() for p in agent.parameters()) / 1e6:.1f}M params, "
          f"{torch.get_num_threads()} threads, max_new_tokens {bench.max_new_tokens}, {bench.turns} turns", flush=True)
    rates, samples = {}, []
    for name in bench.schemes:
        scheme, _, size = name.partition("@")
        n, turns = map(int, size.split("x")) if size else (
            bench.batch1_envs if scheme.startswith("batch-1") else bench.num_envs, bench.turns)
        torch.manual_seed(bench.seed)
        steps, wall, cpu, got = rollout(agent, processor, args, [ppo.make_env(args, None) for _ in range(n)], scheme,
                                        turns)
        samples = samples or got
        rates[name] = (steps / wall, steps / cpu, wall, cpu)
        print(f"ROLLOUT {name} ({n} episodes x {turns} turns): {steps} env steps in {wall:.1f} s wall, {cpu:.1f} s "
              f"CPU = {steps / wall:.3f} steps/s wall, {steps / cpu:.3f} per CPU-second", flush=True)
    base = [b for b in rates if b.startswith(("before", "batch-1"))]
    for a in [a for a in rates if a.startswith("kv")]:
        for b in base:  # time per env step of a relative to b (an update of the same size costs this fraction)
            print(f"ROLLOUT ratio {a} / {b}: {rates[a][0] / rates[b][0]:.2f}x wall, {rates[a][1] / rates[b][1]:.2f}x "
                  f"CPU time (time per env step: {rates[b][0] / rates[a][0]:.0%} wall, {rates[b][1] / rates[a][1]:.0%} "
                  f"CPU of {b})", flush=True)

    tok = ppo.tokenizer_of(processor)
    if any(r.startswith("kv+lp") for r in rates):  # how close the sampling-pass log-probs and values are to the scoring forward (detail #26)
        got = rollout(agent, processor, args, [ppo.make_env(args, None) for _ in range(8)], "kv+lp", 2)[3]
        worst_token, worst_seq, worst_value = 0.0, 0.0, 0.0
        for s in got:
            b = ppo.collate([s], tok.pad_token_id, "cpu")
            with torch.no_grad():
                logprob, value, token_lp, _ = ppo.get_logprob_and_value(agent, b, args.temperature,
                                                                        args.thought_prob_coef)
            sampled_lp, sampled_value = s["sampled"]
            seq = ppo.turn_logprob(sampled_lp, torch.tensor(s["cot_mask"]), torch.tensor(s["answer_mask"]),
                                   args.thought_prob_coef)
            worst_token = max(worst_token, (sampled_lp - token_lp[0]).abs().max().item())
            worst_seq = max(worst_seq, (seq - logprob[0]).abs().item())
            worst_value = max(worst_value, (sampled_value - value[0]).abs().item())
        print(f"LOGPROBS from sampling vs scoring forward over {len(got)} samples: max |diff| per token "
              f"{worst_token:.2e}, per action log pi {worst_seq:.2e} (ratio exp(diff) - 1 <= "
              f"{torch.tensor(worst_seq).exp().item() - 1:.1e}), value {worst_value:.2e}", flush=True)

    # update throughput on the same micro-batches
    samples = [{k: v for k, v in s.items() if k != "sampled"} for s in samples[:bench.update_samples]]
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
