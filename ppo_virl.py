# docs and measured numbers: docs/ppo_virl.md
"""Turn-level PPO (value head, GAE over turns, lambda-scaled CoT log-prob, verification loop) on V-IRL navigation.
A fork of ppo_generalpoints.py (the "ppo" block is identical); leaves out model building (make_models.py), the world
generator (make_virl_world.py), the bookkeeping (common.py), eval.py. "detail #N" tags: docs/ppo_virl.md, numbered list.

One action = one whole response; log pi(a|s) = thought_prob_coef * log p(CoT tokens) + log p(action tokens);
V(s) = MLP(final hidden state of the last prompt token); GAE over environment steps (protocol.md §2, §4).

    python ppo_virl.py --lr 1e-6                  # V-IRL-L from runs/sft-virl-l-default/final (built if missing)
    python ppo_virl.py --task virl-vl --lr 1e-7   # V-IRL-VL (2x2 street-view grid as the image of every turn)
    python ppo_virl.py --model-path tiny --num-updates 2   # tiny random model, seconds
    python ppo_virl.py --route-info-path nyc_1k_routes/route_infos.json \
        --gps-to-pano-path nyc_1k_routes/gps_pano_mapping.pkl --panorama-dir nyc_1k_routes/street_views  # official data
    torchrun --standalone --nproc_per_node 2 ppo_virl.py --model-path tiny --dist fsdp
    python ppo_virl.py --resume runs/<run>/checkpoints/update_0002          # continue a run
"""
import copy
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import transformers
import tyro

from common import (PREPARED, InverseCDFSampler, PrefixCache, check_finite, disable_dropout, fail, fsdp_shard,
                    is_vl, load_model, load_resume_files, open_run, read_d_init, reduce_metrics,
                    resolve_init_checkpoint, resume_run, safe_step, save_ppo_checkpoint, setup_distributed,
                    tokenizer_of, unwrap, weights_finite)
from envs import REWARD_FN_VIRL, VIRL_OUTCOMES, NavigationEnv, virl_probes, virl_world_paths


@dataclass
class Official:
    """The official code's quirks, each behind a flag (the table "Official quirks" in docs/ppo_virl.md)."""
    skip_first_tokens: int = 2
    """response tokens o_0..o_{k-1} left out of the CoT sum (official 2: o_0, o_1 never scored; 0 scores all)"""
    bf16_logprob_sum: bool = False
    """reproduce the official cast of per-token log-probs to bf16 before summing (defect; default fp32)"""
    ratio_gt10_clipped_only: bool = True
    """a sample with ratio > 10 uses only the clipped surrogate (official, from TRL's old trainer)"""
    norm_adv: Literal["local", "global", "none"] = "local"
    """advantage normalisation over the rank's buffer (official, per process), over all ranks, or none"""
    bootstrap_across_truncation: bool = False
    """reproduce the official GAE that bootstraps a truncated episode from the next episode's reset state (defect)"""
    official_action_split: bool = False
    """the last 5 response tokens are the "action", whatever the text (official V-IRL defect: an `assert target`
    bug makes the `"action":` pattern dead code, protocol.md §4.3); default: split at the key"""


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    task: Literal["virl-l", "virl-vl"] = "virl-l"
    """V-IRL with the observation in text (virl-l) or the 2x2 street-view grid as the image of each turn (virl-vl)"""
    model_path: str = "auto"
    """the initial checkpoint; `auto` = runs/sft-{task}-default/final, else the newest runs/{task}__sft__*/final of
    `python sft.py --task {task}`, else see --init-fallback; `smollm2`, `smolvlm`, `tiny` name the models
    make_models.py builds once"""
    seed: int = 42
    """seed of the experiment (the official seed)"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the model weights (fp32 on CPU: bf16 is slower there, offline-models.md addendum)"""
    mixed_precision: bool = False
    """bf16 compute with fp32 master weights (FSDP2 MixedPrecisionPolicy, else torch.autocast)"""
    dist: Literal["ddp", "fsdp"] = "ddp"
    """under torchrun: DDP (small models) or FSDP2 fully_shard (large models)"""
    micro_batch_size: int = 4
    """samples per forward/backward on one rank; gradients are accumulated over the minibatch (paper: 1)"""
    lr: Optional[float] = None
    """the learning rate of the Adam optimizer (None = the official per task: 1e-6 for virl-l, 1e-7 for virl-vl)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "sftvsrl"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    gradient_checkpointing: bool = False
    """activation checkpointing (non-reentrant), needed for the 11B model"""

    init_fallback: Literal["sft", "base", "error"] = "sft"
    """with --model-path auto and no SFT checkpoint: build it by running `sft.py --task {task} --run-name
    sft-{task}-default` first (sft; an interrupted build is continued with --resume), start from the base model with
    a warning (base), or stop (error)"""
    init_sft_args: str = ""
    """extra arguments for that sft.py run, e.g. `--init-sft-args="--model-path tiny --total-steps 2"`"""
    # Environment (V-IRL) arguments; the three official data paths or, when none is given, the generated world
    route_info_path: Optional[str] = None
    """training routes, official `route_infos.json` ([route_list, route_num]); None = the generated world"""
    gps_to_pano_path: Optional[str] = None
    """official `gps_pano_mapping.pkl` ({(lat, lng): pano_id})"""
    panorama_dir: Optional[str] = None
    """official `street_views/` ({pano_id}.jpg + .metadata.json); required for virl-vl"""
    heldout_route_info_path: Optional[str] = None
    """routes for the ID / rule-OOD evaluation (generated world: its held-out routes; official data: default the
    training route file, the paper has no separate held-out NYC file)"""
    visual_ood_route_info_path: Optional[str] = None
    """virl-vl visual-OOD routes (VLN-mini); None = the generated 18-route `vln_mini` world (9 other city skins)"""
    visual_ood_gps_to_pano_path: Optional[str] = None
    """the mapping of the visual-OOD routes"""
    visual_ood_panorama_dir: Optional[str] = None
    """the panoramas of the visual-OOD routes"""
    world: str = "nyc"
    """the generated training world when no route file is given (a skin name of make_virl_world.VIRL_WORLDS)"""
    verify_iter: int = 2
    """verified attempts per rail point (official 2); the next call at the same point is a forced -1 and ends it"""
    enable_verification: bool = True
    """if False every episode is single-turn (the env is reset after every answer), as the official flag"""
    drop_rate: float = 0.5
    """probability of dropping each interpolated forward() point of the rail (official 0.5)"""
    straight_line_length: int = 5
    """interpolated points per street segment before dropping (official 5)"""
    resolution: int = 128
    """side of each of the 4 views in pixels (official 1200; 128 -> a 261 px grid, as sft.py trains virl-vl)"""
    crop_size: Optional[int] = None
    """render size of each view before the resize (official 640; None renders at `resolution`, as sft.py)"""

    # Algorithm specific arguments (defaults: the paper's, protocol.md §4.7)
    num_updates: int = 2
    """the number of PPO updates (paper: 15)"""
    num_envs: int = 4
    """the number of parallel episodes per rank; one batched generate per turn for all of them (paper: 1)"""
    num_steps: int = 2
    """env steps per episode slot per update (paper: 256 per GPU)"""
    end_lr: float = 1e-9
    """the final learning rate of the cosine schedule"""
    lr_max_steps: int = 20
    """the cosine schedule reaches end_lr after this many updates (official `lr_max_steps`; V-IRL scripts: 20)"""
    adam_eps: float = 1e-7
    """Adam epsilon (official: 1e-7)"""
    gamma: float = 0.9
    """the discount factor gamma (over environment steps)"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    update_epochs: int = 4
    """the K epochs to update the policy"""
    num_minibatches: int = 1
    """optimizer steps per epoch (paper: 256 samples / grad accumulation 128 = 2)"""
    clip_coef: float = 0.1
    """the surrogate clipping coefficient epsilon"""
    vf_clip_coef: float = 0.1
    """the value clipping coefficient (official: the same 0.1, in raw reward units); <= 0 disables value clipping"""
    vf_coef: float = 0.5
    """coefficient of the value function loss (which already carries a factor 0.5, as official and CleanRL)"""
    ent_coef: float = 0.0
    """coefficient of the full-vocabulary entropy bonus (official: none; `entropy_coef` 0.01 was never used)"""
    kl_coef: float = 0.0
    """coefficient of the sequence-level KL-to-initial-policy penalty subtracted from the reward (official: none)"""
    max_grad_norm: float = 1.0
    """gradient clipping norm, <= 0 disables it (official 0.01 was configured but never applied, protocol.md §4.5)"""
    thought_prob_coef: float = 0.5
    """lambda: weight of the CoT tokens (before the "action" key) in log pi (paper: 0.5)"""
    temperature: float = 0.2
    """sampling temperature; the same temperature scales the logits of log pi"""
    top_p: float = 1.0
    """nucleus sampling (1.0 = off, so the sampler is exactly pi)"""
    top_k: int = 0
    """top-k sampling (0 = off)"""
    max_new_tokens: int = 128
    """generation length per response (paper: 512; the SmolLM2 answer block is ~60 tokens)"""
    kv_reuse: bool = True
    """text models: within a rollout, prefill only the new tokens of each prompt, reusing the KV cache of the slot's
    conversation so far and of the prompt prefix shared by all episodes (detail #10)"""
    logprobs_from_sampling: bool = False
    """take the old log pi(a|s) and V(s) from the sampling pass instead of a second scoring forward (detail #26;
    needs top_p 1 and top_k 0, so that the sampler is exactly pi; not under FSDP)"""
    inverse_cdf_sampling: bool = True
    """draw tokens by inverse CDF: torch.multinomial's distribution, cheaper, another random stream (detail #9)"""
    official: tyro.conf.OmitArgPrefixes[Official] = field(default_factory=Official)
    """the official code's quirks (flags without a prefix: --skip-first-tokens, --bf16-logprob-sum, ...)"""

    # Evaluation on fixed held-out route lists
    eval_every: int = 2
    """evaluate every N updates (and before the first, and after the last); 0 disables evaluation"""
    eval_episodes: int = 4
    """episodes per evaluation split: route i of the split's file, in order (official evaluator: order=True)"""
    eval_seed: int = 42
    """episode i is env.reset(seed=eval_seed + i, options={"route_idx": i}): fixed headings and rails"""
    eval_max_turns: int = 0
    """stop an evaluation episode after this many model calls and count it as failed (0 = to its end, official)"""
    d_init_tokens: Optional[int] = None
    """SFT tokens D_init of the initial checkpoint for the FLOPs formula (None: read from it, else 0)"""

    # Logging and checkpoints
    num_samples_logged: int = 2
    """decoded (prompt tail, response, reward) samples logged per update"""
    save_every: int = 1
    """save a checkpoint every N updates (and after the last); 0 = only after the last"""
    resume: Optional[str] = None
    """a checkpoint (runs/<run>/checkpoints/update_XXXX) or a run directory (its latest update) to continue; only
    --num-updates, --save-every, --eval-every, --track may be given with it (detail #29)"""

    # to be filled in runtime
    local_batch_size: tyro.conf.Suppress[int] = 0
    """samples per rank per update (num_envs * num_steps)"""
    local_minibatch_size: tyro.conf.Suppress[int] = 0
    """samples per rank per optimizer step"""
    grad_accum_steps: tyro.conf.Suppress[int] = 0
    """micro-batches per optimizer step"""
    world_size: tyro.conf.Suppress[int] = 1
    """the number of processes"""


ANSWER_KEY = '"action"'  # the CoT ends where the last `"action"` key begins (detail #2)
PROBES = tuple(virl_probes("", "stop()"))  # the probe names (rollout/probe/*, detail #30)
ENV_ERROR_REWARD = REWARD_FN_VIRL["INCORRECT_OBS"]  # -1.5, the lowest reward the verifier gives (detail #28)


# ---- copied block "ppo": identical in ppo_generalpoints.py and ppo_virl.py (tests/test_copies.py) ----
def exact_div(a: int, b: int, what: str) -> int:
    if b <= 0 or a % b != 0:
        fail(f"batch layout does not divide: {what} ({a} / {b})")
    return a // b


def lr_at(update: int, lr: float, end_lr: float, lr_max_steps: int) -> float:
    """Cosine decay from lr to end_lr over lr_max_steps updates, held at end_lr afterwards (detail #16)."""
    frac = min(update, lr_max_steps) / lr_max_steps
    return end_lr + (lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


class ValueHead(nn.Module):
    """hidden -> 1024 -> ReLU -> 512 -> ReLU -> 1 (PyTorch default init), run in fp32 (detail #5)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(),
                                 nn.Linear(512, 1))

    def forward(self, h):
        return self.net(h.float()).squeeze(-1)


class Agent(nn.Module):
    """The full model (policy, trained end to end) and the value head on its last prompt token, one module so that
    DDP/FSDP wrap both. forward() is the only place where the backbone runs at rollout and update time."""

    def __init__(self, policy: nn.Module, autocast_bf16: bool = False):
        super().__init__()
        self.policy = policy
        self.value_head = ValueHead(policy.config.get_text_config().hidden_size)
        self.autocast_bf16 = autocast_bf16  # --mixed-precision without FSDP (FSDP2 casts by its own policy)

    def forward(self, input_ids, attention_mask, position_ids, num_response_tokens: int, **extra):
        with torch.autocast(input_ids.device.type, torch.bfloat16, enabled=self.autocast_bf16):
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              output_hidden_states=True, logits_to_keep=num_response_tokens + 1, use_cache=False,
                              **extra)
        P = input_ids.shape[1] - num_response_tokens
        value = self.value_head(out.hidden_states[-1][:, P - 1])  # (B,) last prompt token (left padding)
        return out.logits[:, :-1], value  # (B, R, V): position P-1+j predicts response token j


def answer_start(tokenizer, response_ids: list[int], answer_key: str) -> Optional[int]:
    """Index of the response token holding the first character of the last `answer_key` in the decoded response
    (binary search over decoded prefixes; any tokenizer, detail #2)."""
    c = tokenizer.decode(response_ids).rfind(answer_key)
    if c < 0:
        return None
    lo, hi = 0, len(response_ids) - 1  # smallest k with len(decode(ids[:k+1])) > c
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(response_ids[: mid + 1])) > c:
            hi = mid
        else:
            lo = mid + 1
    return lo


def action_masks(tokenizer, response_ids: list[int], answer_key: str, skip_first_tokens: int,
                 official_action_split: bool = False):
    """-> (cot_mask, answer_mask) lists over the response tokens: thought = o_k..o_{m-1}, answer = o_m..end (eos
    included); without the key (or with official_action_split) the answer is the last 5 tokens (details #2, #3); a
    response of <= 4 tokens is scored too (officially a constant, no gradient: detail #31)."""
    n = len(response_ids)
    m = None if official_action_split else answer_start(tokenizer, response_ids, answer_key)
    if m is None:
        m = max(n - 5, 0)
    cot = [1.0 if skip_first_tokens <= j < m else 0.0 for j in range(n)]
    answer = [1.0 if j >= max(m, min(skip_first_tokens, 1)) else 0.0 for j in range(n)]  # o_0 never scored if skipping
    return cot, answer


def collate(samples: list[dict], pad_id: int, device) -> dict:
    """samples: dicts with prompt_ids, response_ids, cot_mask, answer_mask, extra (per-sample model inputs).
    Layout per row: [pad..pad, prompt, response, pad..pad], so every prompt ends at column P-1 (detail #7)."""
    B = len(samples)
    P = max(len(s["prompt_ids"]) for s in samples)
    R = max(len(s["response_ids"]) for s in samples)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + R), dtype=torch.long)
    response_ids = torch.full((B, R), pad_id, dtype=torch.long)
    cot_mask, answer_mask = torch.zeros((B, R)), torch.zeros((B, R))
    for i, s in enumerate(samples):
        p, r = len(s["prompt_ids"]), len(s["response_ids"])
        input_ids[i, P - p:P] = torch.tensor(s["prompt_ids"])
        input_ids[i, P:P + r] = torch.tensor(s["response_ids"], dtype=torch.long)
        attention_mask[i, P - p:P + r] = 1  # masks from lengths, never from pad-id equality (pad may equal eos)
        response_ids[i, :r] = input_ids[i, P:P + r]
        cot_mask[i, :r], answer_mask[i, :r] = torch.tensor(s["cot_mask"]), torch.tensor(s["answer_mask"])
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() builds them under left padding
    extra = {}
    for key in samples[0]["extra"]:
        parts = [s["extra"][key] for s in samples]
        if parts[0].dim() >= 2 and parts[0].shape[:2] == (1, len(samples[0]["prompt_ids"])):  # token-aligned (1, T, ..)
            parts = [torch.cat([torch.zeros_like(x[:, :1]).expand(-1, P - x.shape[1], *x.shape[2:]), x,
                                x[:, -1:].expand(-1, R, *x.shape[2:])], 1) for x in parts]
        extra[key] = torch.cat(parts, 0).to(device)
    if "mm_token_type_ids" in extra:  # M-RoPE (Qwen2-VL): the model builds its 3-D positions from the mask, these ids
        position_ids = None  # and image_grid_thw, as in generate(); 1-D ones would put the image tokens on a line
    return dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                position_ids=position_ids if position_ids is None else position_ids.to(device),
                response_ids=response_ids.to(device),
                cot_mask=cot_mask.to(device), answer_mask=answer_mask.to(device), extra=extra)


def turn_logprob(token_logprobs, cot_mask, answer_mask, thought_prob_coef: float, bf16_logprob_sum: bool = False):
    """log pi(a|s) = thought_prob_coef * log p(CoT tokens) + log p(answer tokens), summed in fp32 (detail #1, #4);
    all arguments (B, R) or (R,)."""
    if bf16_logprob_sum:
        token_logprobs = token_logprobs.bfloat16()
    cot_logprob = (token_logprobs * cot_mask).sum(-1).float()  # (B,)
    answer_logprob = (token_logprobs * answer_mask).sum(-1).float()  # (B,)
    return thought_prob_coef * cot_logprob + answer_logprob  # (B,)


def get_logprob_and_value(agent, batch: dict, temperature: float, thought_prob_coef: float,
                          bf16_logprob_sum: bool = False, with_entropy: bool = False):
    """log pi(a|s) and V(s) from one forward over [prompt, response]: the function that scores actions at update
    time and, without --logprobs-from-sampling, at rollout time (details #1, #4, #6). Returns logprob (B,),
    value (B,), token_logprobs (B, R) fp32, entropy (B,) or None."""
    R = batch["response_ids"].shape[1]
    logits, value = agent(batch["input_ids"], batch["attention_mask"], batch["position_ids"], R, **batch["extra"])
    logp_all = F.log_softmax(logits.float() / temperature, dim=-1)  # (B, R, V) fp32, temperature-scaled
    token_logprobs = logp_all.gather(-1, batch["response_ids"].unsqueeze(-1)).squeeze(-1)  # (B, R)
    logprob = turn_logprob(token_logprobs, batch["cot_mask"], batch["answer_mask"], thought_prob_coef,
                           bf16_logprob_sum)  # (B,)
    entropy = None
    if with_entropy:  # full-vocabulary entropy, mean over the response tokens
        response_mask = (batch["cot_mask"] + batch["answer_mask"] > 0).float()  # (B, R)
        ent = -(logp_all.exp() * logp_all).sum(-1)  # (B, R)
        entropy = (ent * response_mask).sum(-1) / response_mask.sum(-1).clamp(min=1)  # (B,)
    return logprob, value.float(), token_logprobs.float(), entropy


def encode_prompts(processor, observations: list[dict], task: str) -> list[dict]:
    """Observations -> per-sample prompt ids through the checkpoint's chat template (the image, for VL tasks, before
    the text of the first user message) and the per-sample extra model inputs (pixel values, masks)."""
    samples = []
    for obs in observations:
        messages = [dict(m) for m in obs["messages"]]
        if task.endswith("-vl"):
            first = next(m for m in messages if m["role"] == "user")
            first["content"] = [{"type": "image"}, {"type": "text", "text": first["content"]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if task.endswith("-vl"):
            enc = processor(text=[text], images=[[obs["image"]]], add_special_tokens=False, return_tensors="pt")
        else:
            enc = tokenizer_of(processor)([text], add_special_tokens=False, return_tensors="pt")
        extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask") and torch.is_tensor(v)}
        samples.append(dict(prompt_ids=enc["input_ids"][0].tolist(), extra=extra))  # (T,) + {key: (1, ...)}
    return samples


@torch.no_grad()
def generate(agent, processor, prompts: list[dict], gen_config, prefix_cache, device, synced_gpus: bool,
             with_logprobs: bool = False, inverse_cdf: bool = True):
    """One batched sampling call for all episodes (detail #10), through `prefix_cache` (a PrefixCache: text models,
    only the new tokens of each prompt are prefilled) or, when None or for a VL checkpoint (on any task: Mllama's
    cross-attention layers hold no prompt KV, Qwen2-VL keeps M-RoPE state; as in eval.py), a plain left-padded batch.
    Returns, per sample, the response ids exactly as generated (cut after the first eos, eos kept), whether it hit
    max_new_tokens without an eos and, with_logprobs, the sampled tokens' log-probs (R,) from the sampling logits
    and V(s) from the final hidden state of the last prompt token (detail #26)."""
    tok, policy = tokenizer_of(processor), unwrap(agent).policy
    gen_config, sampler = copy.deepcopy(gen_config), None
    if gen_config.do_sample and inverse_cdf:  # the same draw from pi, without torch.multinomial's cost (detail #9)
        sampler = InverseCDFSampler.swap_in(gen_config, policy.generation_config, record=with_logprobs)
    gen_config.update(return_dict_in_generate=True, output_scores=with_logprobs and sampler is None,
                      output_hidden_states=with_logprobs)
    kwargs = dict(generation_config=gen_config, synced_gpus=synced_gpus, logits_processor=sampler and [sampler])
    if prefix_cache is not None and not is_vl(processor):
        out, width = prefix_cache.generate([p["prompt_ids"] for p in prompts], tok.pad_token_id, tok.eos_token_id,
                                           device, **kwargs)
    else:
        empty = dict(prompt_ids=[], response_ids=[], cot_mask=[], answer_mask=[])
        batch = collate([{**empty, **p} for p in prompts], tok.pad_token_id, device)
        out = policy.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs,
                              **batch["extra"])
        width = batch["input_ids"].shape[1]
    if with_logprobs:  # the drawn tokens' log-probs (B, T) fp32, recorded by the sampler or from multinomial's scores
        logp = None if sampler else F.log_softmax(torch.stack(out.scores, 1).float(), dim=-1)  # (B, T, V)
        lp = torch.stack(sampler.logprobs, 1) if sampler else logp.gather(-1, out.sequences[:, width:, None])[..., 0]
        values = unwrap(agent).value_head(out.hidden_states[0][-1][:, -1])  # (B,) last prompt token
    results = []
    for i, ids in enumerate(out.sequences[:, width:].tolist()):  # (B, <= max_new_tokens)
        n = ids.index(tok.eos_token_id) + 1 if tok.eos_token_id in ids else len(ids)
        results.append(dict(response_ids=ids[:n], truncated=n == len(ids) and ids[-1] != tok.eos_token_id))
        if with_logprobs:
            results[-1].update(token_logprobs=lp[i, :n], value=values[i].float())  # (n,) fp32, ()
    return results


@torch.no_grad()
def score(agent, samples: list[dict], pad_id: int, device, micro_batch_size: int, **logprob_kwargs):
    """Old log-prob and value of (prompt, response) samples, micro-batched (logprob_kwargs: get_logprob_and_value's)."""
    logprobs, values = [], []
    for i in range(0, len(samples), micro_batch_size):
        batch = collate(samples[i:i + micro_batch_size], pad_id, device)
        logprob, value, _, _ = get_logprob_and_value(agent, batch, **logprob_kwargs)
        logprobs.append(logprob)
        values.append(value)
    return torch.cat(logprobs), torch.cat(values)


def compute_gae(rewards, values, dones, next_value, next_done, gamma: float, gae_lambda: float):
    """CleanRL ppo.py L217-231 (detail #11). rewards, values, dones: (T, N); dones[t] = 1 if obs t starts a new
    episode. delta_t = r_t + gamma V_{t+1} (1 - d_{t+1}) - V_t;  A_t = delta_t + gamma lambda (1 - d_{t+1}) A_{t+1}."""
    num_steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    lastgaelam = 0
    for t in reversed(range(num_steps)):
        if t == num_steps - 1:
            nextnonterminal = 1.0 - next_done
            nextvalues = next_value
        else:
            nextnonterminal = 1.0 - dones[t + 1]
            nextvalues = values[t + 1]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        advantages[t] = lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
    returns = advantages + values
    return advantages, returns


def normalize_advantages(adv: torch.Tensor, mode: str, world_size: int) -> torch.Tensor:
    """(A - mean) / (std + 1e-5) over the rank's buffer (local), over all ranks (global), or none (detail #12)."""
    if mode == "none":
        return adv
    stats = torch.stack([adv.sum(), (adv ** 2).sum(), torch.tensor(float(len(adv)))])
    if mode == "global" and world_size > 1:
        dist.all_reduce(stats)
    mean = stats[0] / stats[2]
    std = ((stats[1] / stats[2] - mean ** 2) * stats[2] / (stats[2] - 1).clamp(min=1)).clamp(min=0).sqrt()
    return (adv - mean) / (std + 1e-5)


def probe_means(probes: list[dict], names: tuple) -> dict:
    """rollout/probe/<name>: each probe's mean over the answers where it is measurable, NaN where none is (the same
    keys on every rank, so reduce_metrics averages them; detail #30)."""
    values = {k: [float(p[k]) for p in probes if p[k] is not None] for k in names}
    return {f"rollout/probe/{k}": float(np.mean(v)) if v else float("nan") for k, v in values.items()}
# ---- end copied block "ppo" ----


def data_sources(args: Args) -> dict:
    """NavigationEnv data arguments per split: train (training routes), heldout (ID and rule-OOD evaluation),
    visual_ood (virl-vl only: VLN-mini routes of other cities). Explicit files when given, else the generated world."""
    official = (args.route_info_path, args.gps_to_pano_path, args.panorama_dir)
    if any(x is not None for x in official):
        if args.route_info_path is None or args.gps_to_pano_path is None:
            raise ValueError("pass --route-info-path and --gps-to-pano-path (and --panorama-dir for virl-vl) "
                             "together, or none of them to use the generated world")
        files = dict(gps_to_pano_path=args.gps_to_pano_path, panorama_dir=args.panorama_dir)
        sources = {"train": dict(route_info_path=args.route_info_path, **files),
                   "heldout": dict(route_info_path=args.heldout_route_info_path or args.route_info_path, **files)}
    else:
        sources = {"train": dict(world=args.world, split="train"), "heldout": dict(world=args.world, split="heldout")}
        if args.heldout_route_info_path is not None:
            paths = virl_world_paths(args.world)
            sources["heldout"] = dict(route_info_path=args.heldout_route_info_path,
                                      gps_to_pano_path=paths["gps_to_pano_path"], panorama_dir=paths["panorama_dir"])
    if args.task == "virl-vl":
        ood = (args.visual_ood_route_info_path, args.visual_ood_gps_to_pano_path, args.visual_ood_panorama_dir)
        if any(x is not None for x in ood):
            if any(x is None for x in ood):
                raise ValueError("pass all three of --visual-ood-route-info-path, --visual-ood-gps-to-pano-path and "
                                 "--visual-ood-panorama-dir, or none of them to use the generated vln_mini world")
            sources["visual_ood"] = dict(route_info_path=ood[0], gps_to_pano_path=ood[1], panorama_dir=ood[2])
        else:
            sources["visual_ood"] = dict(world="vln_mini", split="train")
    return sources


def make_env(args: Args, source: dict, seed: Optional[int], **overrides) -> NavigationEnv:
    """Training envs: absolute actions, the ID rule (detail #20); rule-OOD evaluation sets absolute_action=False."""
    kwargs = dict(absolute_action=True, verify_iter=args.verify_iter, drop_rate=args.drop_rate,
                  straight_line_length=args.straight_line_length, language_only=args.task == "virl-l",
                  resolution=args.resolution, crop_size=args.crop_size, seed=seed, **source)
    kwargs.update(overrides)
    return NavigationEnv(**kwargs)


def check_data(args: Args):
    """Bad input stops here, before any model is loaded: every split's route file, mapping and panorama dir are
    opened once (the generated worlds are built on first use)."""
    name = "arguments"
    try:
        sources = data_sources(args)
        for name, source in sources.items():
            env = make_env(args, source, seed=0)
            env.reset(seed=0, options={"route_idx": 0})  # relocates the first rail: catches a mapping of other routes
    except (ValueError, FileNotFoundError, OSError, IndexError, KeyError, TypeError) as e:
        fail(f"V-IRL data ({name}): {e}")


def eval_splits(args: Args) -> dict:
    """name -> (data source, env overrides): held-out routes under the absolute (ID) and relative (rule-OOD) action
    spaces; for virl-vl also the held-out city skins (visual OOD, absolute actions as the paper)."""
    sources = data_sources(args)
    splits = {"id": (sources["heldout"], {}), "rule_ood": (sources["heldout"], dict(absolute_action=False))}
    if args.task == "virl-vl":
        splits["visual_ood"] = (sources["visual_ood"], {})
    return splits


def evaluate(agent, processor, args: Args, gen_config, device, rank: int, world_size: int, synced_gpus: bool) -> dict:
    """Full multi-turn episodes (2 verified attempts per point) on fixed route lists (detail #22): episode i is route
    i of the split (wrapping), reset with seed eval_seed + i. Per-step accuracy = correct calls / all calls (verif.
    retries and the forced -1 calls count as steps, as the paper); success = routes ended by a correct stop().
    Episodes are split across ranks; the metrics are global."""
    metrics = {}
    for name, (source, overrides) in eval_splits(args).items():
        episodes = list(range(args.eval_episodes))[rank::world_size]
        envs = [make_env(args, source, None, **overrides) for _ in episodes]
        prefix_cache = PrefixCache(unwrap(agent).policy) if args.kv_reuse and not synced_gpus else None
        obs = [env.reset(seed=args.eval_seed + i, options={"route_idx": i % len(env.route_list)})[0]
               for env, i in zip(envs, episodes)]
        active, steps, correct, success, turn = [True] * len(envs), 0.0, 0.0, 0.0, 0
        while True:
            idx = [i for i, a in enumerate(active) if a]
            any_active = torch.tensor(float(len(idx) > 0))
            if world_size > 1:
                dist.all_reduce(any_active)
            if any_active.item() == 0 or (args.eval_max_turns > 0 and turn >= args.eval_max_turns):
                break
            turn += 1
            # under FSDP every rank must call generate the same number of times: an idle rank generates a dummy;
            # each split starts a new PrefixCache (episodes of one split share prompt prefixes)
            prompts = encode_prompts(processor, [obs[i] for i in (idx or [0])], args.task) if envs else []
            if not prompts:
                continue
            responses = generate(agent, processor, prompts, gen_config, prefix_cache, device, synced_gpus)
            for i, r in zip(idx, responses):
                obs[i], reward, terminated, truncated, info = safe_step(
                    envs[i], tokenizer_of(processor).decode(r["response_ids"], skip_special_tokens=True),
                    ENV_ERROR_REWARD)
                steps += 1
                correct += float(info["is_correct"])
                if terminated or truncated:
                    active[i] = False
                    success += float(info["is_success"])
        totals = torch.tensor([steps, correct, success, float(len(envs))])
        if world_size > 1:
            dist.all_reduce(totals)
        metrics[f"eval/{name}/step_accuracy"] = (totals[1] / totals[0].clamp(min=1)).item()
        metrics[f"eval/{name}/success_rate"] = (totals[2] / totals[3].clamp(min=1)).item()
        metrics[f"eval/{name}/steps_per_episode"] = (totals[0] / totals[3].clamp(min=1)).item()
    return metrics


def check_args(args: Args):
    """Every argument check, before anything is loaded or written: one line `error: ...` (detail #27)."""
    for names, ok, rule in [
            (("num_updates", "num_envs", "num_steps", "max_new_tokens", "micro_batch_size", "update_epochs",
              "num_minibatches", "verify_iter", "lr_max_steps", "straight_line_length"), lambda v: v >= 1, ">= 1"),
            (("lr", "temperature", "clip_coef", "adam_eps"), lambda v: v > 0, "> 0"),
            (("gamma", "gae_lambda", "drop_rate"), lambda v: 0 <= v <= 1, "in [0, 1]"),
            (("top_p",), lambda v: 0 < v <= 1, "in (0, 1]"),
            (("top_k", "save_every", "eval_every", "eval_max_turns", "end_lr", "vf_coef", "ent_coef", "kl_coef",
              "thought_prob_coef", "num_samples_logged", "d_init_tokens"), lambda v: v >= 0, ">= 0"),
            (("seed",), lambda v: 0 <= v < 2**31, "in [0, 2**31)"),
            (("resolution", "crop_size"), lambda v: v >= 8, ">= 8")]:
        for name in names:
            value = getattr(args, name)
            if value is not None and not (ok(value) and math.isfinite(value)):
                fail(f"--{name.replace('_', '-')} must be {rule}, got {value}")
    for name in ("vf_clip_coef", "max_grad_norm"):  # <= 0 disables them (documented)
        if not math.isfinite(getattr(args, name)):
            fail(f"--{name.replace('_', '-')} must be finite, got {getattr(args, name)}")
    if args.official.skip_first_tokens < 0:
        fail(f"--skip-first-tokens must be >= 0, got {args.official.skip_first_tokens}")
    if args.eval_every > 0 and args.eval_episodes < 1:
        fail(f"--eval-episodes must be >= 1 when evaluating (--eval-every {args.eval_every}), got {args.eval_episodes}")
    if args.logprobs_from_sampling and (args.top_p < 1.0 or args.top_k > 0):
        fail("--logprobs-from-sampling needs --top-p 1 --top-k 0 (the sampler must be exactly pi)")


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    # TRY NOT TO MODIFY: distributed set-up (nanoGPT style: the same file runs under python and torchrun, detail #25)
    distributed, rank, world_size, device = setup_distributed(args.cuda)

    # resume: the checkpoint carries the weights, the arguments that define the run and the run directory (detail #29)
    resume_state, run_dir, resumed_update = None, None, None
    if args.resume:
        resume_state, run_dir, resumed_update = resume_run(args, sys.argv[1:], rank, world_size, check_args)
    fsdp = distributed and args.dist == "fsdp"  # after --resume, which continues with the stored --dist
    args.world_size = world_size
    args.local_batch_size = args.num_envs * args.num_steps
    args.local_minibatch_size = exact_div(args.local_batch_size, args.num_minibatches,
                                          "num_envs * num_steps must divide into num_minibatches")
    args.grad_accum_steps = exact_div(args.local_minibatch_size, args.micro_batch_size,
                                      "the minibatch must divide into micro batches of micro_batch_size")
    if args.eval_every > 0 and args.eval_episodes < world_size:
        fail(f"--eval-episodes {args.eval_episodes} must be at least the number of ranks")
    if args.lr is None:  # the official scripts: 1e-6 for V-IRL-L, 1e-7 for V-IRL-VL
        args.lr = 1e-6 if args.task == "virl-l" else 1e-7
    check_data(args)  # bad data paths / route files stop here, before any model is loaded
    args.model_path = resolve_init_checkpoint(args.model_path, args.task, args.init_fallback, args.init_sft_args,
                                              distributed)
    if args.model_path not in ("tiny", *PREPARED) and not os.path.exists(args.model_path):
        fail(f"initial checkpoint {args.model_path!r} not found. RL starts from an SFT checkpoint: run `python sft.py "
             f"--task {args.task} --run-name sft-{args.task}-default` first, or pass --model-path <checkpoint dir>")

    # TRY NOT TO MODIFY: seeding. Model and value head are built under the base seed (identical on every rank);
    # sampling and env resets use seed + rank (detail #21).
    torch.manual_seed(args.seed)
    if args.torch_deterministic:
        torch.backends.cudnn.deterministic = True
    try:
        policy, processor = load_model(args.model_path, args.task == "virl-vl", dtype=getattr(torch, args.dtype))
    except Exception as e:  # noqa: BLE001  (a truncated model.safetensors raises safetensors' own error type)
        fail(f"cannot load {args.model_path!r}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
    tokenizer = tokenizer_of(processor)
    disable_dropout(policy)
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    autocast_bf16 = args.mixed_precision and args.dist != "fsdp"
    if args.kl_coef > 0:  # frozen copy of the initial policy (of the resumed checkpoint on --resume), only if used
        ref_agent = Agent(copy.deepcopy(policy), autocast_bf16).to(device).eval().requires_grad_(False)
    agent = Agent(policy, autocast_bf16).to(device)
    if resume_state is not None:
        try:
            unwrap(agent).value_head.load_state_dict(torch.load(os.path.join(args.resume, "value_head.pt")))
        except Exception as e:  # noqa: BLE001  (a missing or truncated file)
            fail(f"--resume {args.resume}: value_head.pt cannot be loaded ({type(e).__name__}: {str(e)[:200]})")
    if not weights_finite(agent):  # detail #27
        fail(f"{args.model_path}: the checkpoint's weights are not finite (NaN or inf); refusing to train from it")
    d_init = args.d_init_tokens if args.d_init_tokens is not None else read_d_init(args.model_path)
    if resume_state is not None:  # the run's own D_init; the resumed checkpoint's tokens_trained are D_RL so far
        d_init = int(resume_state.get("d_init_tokens", 0))
    num_params = sum(p.numel() for p in agent.parameters())
    lp = dict(temperature=args.temperature, thought_prob_coef=args.thought_prob_coef,  # how log pi is computed
              bf16_logprob_sum=args.official.bf16_logprob_sum)
    pad_id = tokenizer.pad_token_id
    if distributed:
        if fsdp:
            fsdp_shard([policy, agent], world_size, device, args.mixed_precision)
            # the first forward must go through the root (agent) so that it initialises as the FSDP root
            warm_env = make_env(args, data_sources(args)["train"], seed=args.seed)
            warm = encode_prompts(processor, [warm_env.reset()[0]], args.task)
            score(agent, [dict(warm[0], response_ids=[], cot_mask=[], answer_mask=[])], pad_id, device, 1, **lp)
        else:
            agent = nn.parallel.DistributedDataParallel(agent)
    agent.train()
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.lr, eps=args.adam_eps, weight_decay=0.0)
    if resume_state is not None:
        rank_state = load_resume_files(args.resume, optimizer, rank, fsdp)

    run_dir, run_name, log = open_run(args, run_dir, resumed_update, rank, distributed)  # detail #29

    sampled_lp = args.logprobs_from_sampling and not fsdp
    gen_config = transformers.GenerationConfig(  # the sampler is exactly pi (detail #9)
        do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
    eval_config = transformers.GenerationConfig(  # evaluation is greedy, as eval.py (detail #22)
        do_sample=False, max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
    local_seed = args.seed + rank
    random.seed(local_seed)
    np.random.seed(local_seed)
    torch.manual_seed(local_seed)
    shuffle_rng = np.random.default_rng(local_seed)

    # env setup: num_envs episode slots per rank, each with its own random stream
    train_source = data_sources(args)["train"]
    envs = [make_env(args, train_source, seed=args.seed * 100_003 + rank * args.num_envs + i)
            for i in range(args.num_envs)]
    next_obs = [env.reset()[0] for env in envs]
    next_done = torch.zeros(args.num_envs)
    start_update, global_step, tokens_trained, tokens_generated = 1, 0, 0, 0
    if resume_state is not None:
        envs, next_obs, next_done = rank_state["envs"], rank_state["next_obs"], rank_state["next_done"]
        random.setstate(rank_state["python_rng"])
        np.random.set_state(rank_state["numpy_rng"])
        torch.set_rng_state(rank_state["torch_rng"])
        shuffle_rng = rank_state["shuffle_rng"]
        start_update = resume_state["step"] + 1
        global_step, tokens_trained, tokens_generated = (resume_state["global_step"], resume_state["tokens_trained"],
                                                         resume_state["tokens_generated"])

    def compute() -> dict:
        """The env step <-> token <-> FLOPs mapping, X = 6N(D_init + D_RL) + 2N D_buffer (detail #23)."""
        flops = 6 * num_params * (d_init + tokens_trained) + 2 * num_params * tokens_generated
        return {"compute/env_steps": global_step, "compute/tokens_trained": tokens_trained,
                "compute/tokens_generated": tokens_generated, "compute/flops": flops}

    def run_eval(update: int):
        agent.eval()
        # greedy, with the training RNG untouched (detail #22)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            metrics = evaluate(agent, processor, args, eval_config, device, rank, world_size, synced_gpus=fsdp)
        agent.train()
        log(metrics, global_step, {"update": update, **compute()})
        if rank == 0:
            for key, value in metrics.items():  # the same curve against compute (the paper's x axis)
                log.writer.add_scalar(key.replace("eval/", "eval_vs_gflops/"), value,
                                      int(compute()["compute/flops"] / 1e9))
            print(f"eval  update {update}: " + "  ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items()), flush=True)

    if rank == 0:
        print(f"{run_name}: {num_params / 1e6:.1f}M params, {world_size} rank(s), {args.local_batch_size} samples/rank "
              f"per update, {args.grad_accum_steps} micro-batches of {args.micro_batch_size} per optimizer step",
              flush=True)
    if args.eval_every > 0 and start_update == 1:
        run_eval(0)
    start_time = time.time()

    # ==== ALGO LOGIC: one PPO update = rollout -> GAE -> clipped policy/value optimisation ====
    for update in range(start_update, args.num_updates + 1):
        update_start = time.time()
        # 0. anneal the rate: a pure function of the update index (detail #16)
        lr_now = lr_at(update - 1, args.lr, args.end_lr, args.lr_max_steps)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr_now

        # 1. rollout: samples[t][i] = (prompt, response) of slot i at step t, stored token in, token out (detail #8)
        samples = [[None] * args.num_envs for _ in range(args.num_steps)]
        logprobs = torch.zeros((args.num_steps, args.num_envs))
        values = torch.zeros((args.num_steps, args.num_envs))
        rewards = torch.zeros((args.num_steps, args.num_envs))
        dones = torch.zeros((args.num_steps, args.num_envs))
        outcomes = {k: 0 for k in (*VIRL_OUTCOMES, "ENV_ERROR")}
        resp_lens, truncs, successes, corrects, kls = [], [], [], [], []
        probes = []  # per verified answer: envs.virl_probes (detail #30)
        agent.eval()
        # KV reuse within this rollout only: the weights change with every update (detail #10)
        prefix_cache = PrefixCache(unwrap(agent).policy) if args.kv_reuse and not fsdp else None
        for step in range(args.num_steps):
            global_step += args.num_envs * world_size
            dones[step] = next_done
            # 1a. one batched generate for all episode slots
            prompts = encode_prompts(processor, next_obs, args.task)
            responses = generate(agent, processor, prompts, gen_config, prefix_cache, device, fsdp, sampled_lp,
                                 args.inverse_cdf_sampling)
            step_samples = []
            for p, r in zip(prompts, responses):
                cot, answer = action_masks(tokenizer, r["response_ids"], ANSWER_KEY, args.official.skip_first_tokens,
                                           args.official.official_action_split)
                step_samples.append(dict(p, response_ids=r["response_ids"], cot_mask=cot, answer_mask=answer))
                tokens_generated += (len(p["prompt_ids"]) + len(r["response_ids"])) * world_size
                resp_lens.append(len(r["response_ids"]))
                truncs.append(float(r["truncated"]))
            # 1b. old log pi(a|s) and V(s): from the sampling pass, or from the function the update uses (detail #6)
            if sampled_lp:
                logprobs[step] = torch.stack([turn_logprob(r["token_logprobs"], torch.tensor(s["cot_mask"]),
                                                           torch.tensor(s["answer_mask"]), args.thought_prob_coef,
                                                           args.official.bf16_logprob_sum)
                                              for r, s in zip(responses, step_samples)])
                values[step] = torch.stack([r["value"] for r in responses])
            else:
                logprobs[step], values[step] = score(agent, step_samples, pad_id, device, args.micro_batch_size, **lp)
            if args.kl_coef > 0:  # sequence-level k1 KL to the initial policy, subtracted from the reward (detail #15)
                kls.append(logprobs[step] - score(ref_agent, step_samples, pad_id, device, args.micro_batch_size,
                                                  **lp)[0])
            # 1c. the verifier scores each answer; a wrong one gets its feedback turn (sequential revision)
            for i, (env, s) in enumerate(zip(envs, step_samples)):
                samples[step][i] = s
                text = tokenizer.decode(s["response_ids"], skip_special_tokens=True)
                # an answer that makes the env raise is a failed step, logged with its text (detail #28)
                obs, reward, terminated, truncated, info = safe_step(env, text, ENV_ERROR_REWARD)
                rewards[step, i] = reward - (args.kl_coef * kls[-1][i].item() if kls else 0.0)
                outcomes[info["outcome"]] = outcomes.get(info["outcome"], 0) + 1
                corrects.append(float(info["is_correct"]))  # per-step accuracy: retries and forced -1 count
                if "error" not in info and info["outcome"] != "STEP_LIMIT":  # the rule probes (detail #30)
                    probes.append(virl_probes(text, info["gt_action"], env.absolute_action))
                s["reward"], s["text"] = reward, text
                if "error" in info:
                    s["env_error"], s["instance_id"] = info["error"], env.instance_id
                # truncation ends the episode too, unless the official bootstrap is asked for (detail #11); after
                # a correct move the env hands back a fresh single-turn prompt, after a wrong one the conversation
                # goes on with "You failed this trial because ..." (protocol.md §2.7)
                episode_over = terminated or truncated or not args.enable_verification
                done = terminated or (episode_over and not args.official.bootstrap_across_truncation)
                if episode_over:
                    successes.append(float(info["is_success"]))
                    obs, _ = env.reset()
                next_obs[i], next_done[i] = obs, float(done)
        # 1d. V(s_T) for bootstrapping: the value reads the prompt only
        _, next_value = score(agent, [dict(p, response_ids=[], cot_mask=[], answer_mask=[])
                                      for p in encode_prompts(processor, next_obs, args.task)], pad_id, device,
                              args.micro_batch_size, **lp)
        agent.train()
        rollout_time = time.time() - update_start

        # 2. turn-level GAE over environment steps, then the flat batch with normalised advantages
        advantages, returns = compute_gae(rewards, values, dones, next_value, next_done, args.gamma, args.gae_lambda)
        b_samples = [samples[t][i] for t in range(args.num_steps) for i in range(args.num_envs)]
        b_logprobs, b_values = logprobs.reshape(-1), values.reshape(-1)  # (T * N,)
        b_advantages, b_returns = advantages.reshape(-1), returns.reshape(-1)  # (T * N,)
        b_advantages = normalize_advantages(b_advantages, args.official.norm_adv, world_size)

        # 3. optimise the policy and value network: epochs x minibatches x micro-batches (detail #17)
        b_inds = np.arange(args.local_batch_size)
        stats = {k: [] for k in ("pg_loss", "v_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac",
                                 "vf_clipfrac", "ratio_max", "grad_norm")}
        for epoch in range(args.update_epochs):
            shuffle_rng.shuffle(b_inds)
            for start in range(0, args.local_batch_size, args.local_minibatch_size):
                mb_inds = b_inds[start:start + args.local_minibatch_size]
                for micro in range(args.grad_accum_steps):
                    mc_inds = mb_inds[micro * args.micro_batch_size:(micro + 1) * args.micro_batch_size]
                    batch = collate([b_samples[j] for j in mc_inds], pad_id, device)
                    tokens_trained += int(batch["attention_mask"].sum()) * world_size
                    is_last = micro == args.grad_accum_steps - 1
                    if fsdp:
                        agent.set_requires_gradient_sync(is_last)
                    with agent.no_sync() if distributed and not fsdp and not is_last else nullcontext():
                        newlogprob, newvalue, _, entropy = get_logprob_and_value(agent, batch, **lp,
                                                                                 with_entropy=args.ent_coef > 0)
                        mb_adv = b_advantages[mc_inds].to(device)
                        mb_old_logprob, mb_returns = b_logprobs[mc_inds].to(device), b_returns[mc_inds].to(device)
                        mb_values = b_values[mc_inds].to(device)
                        logratio = (newlogprob - mb_old_logprob).clamp(-20, 20)  # verl: avoid inf in exp
                        ratio = logratio.exp()

                        with torch.no_grad():
                            # calculate approx_kl http://joschu.net/blog/kl-approx.html
                            old_approx_kl = (-logratio).mean()
                            approx_kl = ((ratio - 1) - logratio).mean()
                            stats["clipfrac"].append(((ratio - 1.0).abs() > args.clip_coef).float().mean().item())

                        # Policy loss (detail #13)
                        pg_loss1 = -mb_adv * ratio
                        pg_loss2 = -mb_adv * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
                        pg_loss_per_sample = torch.max(pg_loss1, pg_loss2)
                        if args.official.ratio_gt10_clipped_only:
                            pg_loss_per_sample = torch.where(ratio > 10, pg_loss2, pg_loss_per_sample)
                        pg_loss = pg_loss_per_sample.mean()

                        # Value loss (detail #14)
                        v_loss_unclipped = (newvalue - mb_returns) ** 2
                        if args.vf_clip_coef > 0:
                            v_clipped = mb_values + torch.clamp(newvalue - mb_values, -args.vf_clip_coef,
                                                                args.vf_clip_coef)
                            v_loss_clipped = (v_clipped - mb_returns) ** 2
                            v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
                            stats["vf_clipfrac"].append(((newvalue - mb_values).abs() > args.vf_clip_coef)
                                                        .float().mean().item())
                        else:
                            v_loss = 0.5 * v_loss_unclipped.mean()

                        entropy_loss = entropy.mean() if entropy is not None else torch.zeros((), device=device)
                        loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
                        check_finite("loss", loss, f"update {update}, epoch {epoch}, samples {mc_inds.tolist()}")
                        (loss / args.grad_accum_steps).backward()
                    for key, value in (("pg_loss", pg_loss), ("v_loss", v_loss), ("entropy", entropy_loss),
                                       ("old_approx_kl", old_approx_kl), ("approx_kl", approx_kl),
                                       ("ratio_max", ratio.max())):
                        stats[key].append(value.item())
                grad_norm = nn.utils.clip_grad_norm_(  # detail #18
                    agent.parameters(), args.max_grad_norm if args.max_grad_norm > 0 else float("inf"))
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                check_finite("grad_norm", grad_norm, f"update {update}, epoch {epoch}")
                stats["grad_norm"].append(grad_norm.item())
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        # ==== end ALGO LOGIC (the rest of the loop body only records, evaluates and saves) ====

        # TRY NOT TO MODIFY: record rewards and losses for plotting purposes, one dict reduced over ranks once
        y_pred, y_true = b_values.numpy(), b_returns.numpy()
        var_y = np.var(y_true)
        metrics = {f"losses/{k}": float(np.mean(v)) if v else 0.0 for k, v in stats.items()}
        metrics.update({
            "losses/ratio_max": float(np.max(stats["ratio_max"])),
            "losses/explained_variance": float(np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y),
            "losses/first_minibatch_approx_kl": stats["approx_kl"][0],  # ratio = 1 check (detail #6)
            "rollout/reward_mean": rewards.mean().item(), "rollout/value_mean": values.mean().item(),
            "rollout/return_mean": returns.mean().item(), "rollout/advantage_std": advantages.std().item(),
            "rollout/response_length": float(np.mean(resp_lens)), "rollout/truncated_frac": float(np.mean(truncs)),
            "rollout/episodes": float(len(successes)), "rollout/successes": float(np.sum(successes)),
            "rollout/step_accuracy": float(np.mean(corrects)), "rollout/logprob_mean": logprobs.mean().item(),
            **probe_means(probes, PROBES),
            **{f"rollout/outcome/{k}": float(n) for k, n in outcomes.items()}})
        if kls:
            metrics["objective/kl"] = torch.cat(kls).mean().item()
        metrics = reduce_metrics(metrics, world_size)
        metrics["rollout/success_rate"] = (metrics["rollout/successes"] / metrics["rollout/episodes"]
                                           if metrics["rollout/episodes"] else float("nan"))
        sps = args.local_batch_size * world_size / (time.time() - update_start)
        eta = (time.time() - start_time) / (update - start_update + 1) * (args.num_updates - update)
        metrics.update({"charts/learning_rate": lr_now, "charts/SPS": sps, "charts/rollout_seconds": rollout_time,
                        "charts/update_seconds": time.time() - update_start - rollout_time, **compute()})
        log(metrics, global_step, {"update": update})
        if rank == 0:
            logged = list(np.argsort([-abs(s["reward"]) for s in b_samples])[: args.num_samples_logged])
            logged += [j for j, s in enumerate(b_samples) if "env_error" in s and j not in logged]  # all of them
            for n, j in enumerate(logged):
                s = b_samples[j]
                prompt_tail = tokenizer.decode(s["prompt_ids"][-60:])
                log.writer.add_text(f"samples/{n}", f"**prompt (tail)**\n\n```\n{prompt_tail}\n```\n\n**response**\n\n"
                                f"```\n{s['text']}\n```\n\nreward {s['reward']}", global_step)
                error = {k: s[k] for k in ("env_error", "instance_id") if k in s}  # to replay: env.step(response)
                log.row({"update": update, "sample": n, "prompt_tail": prompt_tail, "response": s["text"],
                         "reward": s["reward"], **error})
            print(f"update {update}/{args.num_updates} | env steps {global_step} | SPS {sps:.2f} | "
                  f"reward {metrics['rollout/reward_mean']:+.2f} | step acc {metrics['rollout/step_accuracy']:.2f} | "
                  f"success {metrics['rollout/success_rate']:.2f} ({metrics['rollout/episodes']:.0f} ep) | "
                  f"pg {metrics['losses/pg_loss']:+.4f} v {metrics['losses/v_loss']:.3f} "
                  f"kl {metrics['losses/approx_kl']:.2e} | len {metrics['rollout/response_length']:.0f} | "
                  f"ETA {eta / 60:.1f} min", flush=True)

        if args.eval_every > 0 and (update % args.eval_every == 0 or update == args.num_updates):
            run_eval(update)
        if (args.save_every > 0 and update % args.save_every == 0) or update == args.num_updates:
            c = compute()
            state = {"step": update, "tokens_trained": tokens_trained, "tokens_generated": tokens_generated,
                     "d_init_tokens": d_init, "flops": c["compute/flops"], "run_name": run_name,
                     "global_step": global_step, "world_size": world_size, "args": asdict(args)}
            rank_state = {"envs": envs, "next_obs": next_obs, "next_done": next_done, "python_rng": random.getstate(),
                          "numpy_rng": np.random.get_state(), "torch_rng": torch.get_rng_state(),
                          "shuffle_rng": shuffle_rng}
            path = os.path.join(run_dir, "checkpoints", f"update_{update:04d}")
            if rank == 0:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            save_ppo_checkpoint(path, agent, processor, optimizer, state, rank_state, rank, world_size, fsdp)
            if rank == 0:
                print(f"saved {path}", flush=True)

    log.close()
    if distributed:
        dist.destroy_process_group()
