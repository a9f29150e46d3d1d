"""What the four scripts share and nobody forks: loading the prepared models, the prefix KV cache of batched
generation, a training run's bookkeeping (distributed set-up, checkpoints, resume, run directory, logs). It leaves
out every algorithm (the scripts keep their own copies, CleanRL-style); its "detail #N" tags: docs/ppo_generalpoints.md.
"""
import glob
import copy
import fcntl
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, is_dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import transformers
from torch.utils.tensorboard import SummaryWriter
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

# ---- models: a prepared name or a path -> (model, processor) ----
CACHE_DIR = os.environ.get("SFTVSRL_CACHE", os.path.expanduser("~/.cache/sftvsrl"))
PREPARED = {"smollm2": "smollm2-135m-instruct", "smolvlm-blind": "smolvlm-smollm2-135m-256px-v2",
            "smolvlm": "smolvlm-smollm2-135m-256px-v3-seeing", "smolvlm-id": "smolvlm-smollm2-135m-256px-v3-seeing-id",
            "smolvlm-streets": "smolvlm-smollm2-135m-256px-v7-streets",
            "tiny-lm": "tiny-lm-v1", "tiny-vl": "tiny-vl-v1", "tiny-vl-seeing": "tiny-vl-seeing-v1",
            "tiny-mllama": "tiny-mllama-v1", "tiny-qwen2vl": "tiny-qwen2vl-v1", "tiny-llava": "tiny-llava-v1"}
# (the directories make_models.py writes under CACHE_DIR; bump a suffix when a recipe changes)


def prepared_name(name: str, vl_task: bool) -> str:
    """`tiny` is tiny-vl for a VL task, tiny-lm otherwise; every other name unchanged."""
    return {"tiny": "tiny-vl" if vl_task else "tiny-lm"}.get(name, name)


def run_child(cmd: list) -> int:
    """subprocess.run(cmd).returncode, but a SIGTERM to this script (`timeout`, `kill`) reaches the child too, and this
    script then exits with it: a plain subprocess.run left the model build or the SFT build running on its own."""
    child = subprocess.Popen(cmd)
    stopped = []

    def forward(signum, frame):
        stopped.append(signum)
        child.send_signal(signum)

    try:
        previous = signal.signal(signal.SIGTERM, forward)
    except ValueError:  # not the main thread: no handler can be set there, so wait as subprocess.run does
        return child.wait()
    try:
        code = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopped:
        raise SystemExit(128 + stopped[0])
    return code


def prepared_path(name: str, vl_task: bool) -> str:
    """`smollm2` | `smolvlm` | `tiny` | `tiny-mllama` | `tiny-qwen2vl` | `tiny-llava` -> the checkpoint make_models.py
    builds once under CACHE_DIR (it runs here on first use); any other name is a local path or a hub id, unchanged."""
    name = prepared_name(name, vl_task)
    if name not in PREPARED:
        return name
    path = os.path.join(CACHE_DIR, PREPARED[name])
    if not os.path.isfile(os.path.join(path, "config.json")):
        os.makedirs(CACHE_DIR, exist_ok=True)
        with open(f"{path}.lock", "w") as lock:  # scripts started together build it once; the others wait here
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.isfile(os.path.join(path, "config.json")):
                script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_models.py")
                if run_child([sys.executable, script, name]) != 0:
                    raise ValueError(f"building {name!r} failed (see above): run `python make_models.py {name}`")
    return path


def load_model(name: str, vl_task: bool, dtype=torch.float32):
    """A checkpoint (see prepared_path) -> (model, processor); the processor is a tokenizer for text models."""
    path = prepared_path(name, vl_task)
    try:
        is_vl_ckpt = hasattr(AutoConfig.from_pretrained(path), "vision_config")
        if is_vl_ckpt or not vl_task:
            auto_model = AutoModelForImageTextToText if is_vl_ckpt else AutoModelForCausalLM
            model = auto_model.from_pretrained(path, dtype=dtype)
            processor = load_processor(path) if is_vl_ckpt else AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001  a damaged cache of a prepared name (its config too): say how to rebuild it
        prepared = prepared_name(name, vl_task)
        if prepared not in PREPARED:
            raise
        raise ValueError(f"the cached model {prepared!r} at {path} is damaged ({type(e).__name__}: {str(e)[:200]}); "
                         f"rebuild it with `python make_models.py {prepared} --force`") from None
    if vl_task and not is_vl_ckpt:
        raise ValueError(f"{name} is a text-only model and cannot take images; a VL task needs an "
                         "image-text-to-text model (e.g. --model-path smolvlm or tiny)")
    tok = tokenizer_of(processor)
    if not getattr(tok, "chat_template", None) and not getattr(processor, "chat_template", None):
        raise ValueError("it has no chat template: prompts go through the checkpoint's own chat template (use an "
                         "instruct/SFT checkpoint)")
    if tok.eos_token_id is None:
        raise ValueError("its tokenizer has no eos token")
    if tok.pad_token_id is None:  # every mask here comes from lengths, so pad may equal eos
        tok.pad_token = tok.eos_token
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(dtype), processor


def load_processor(path: str):
    """AutoProcessor; a processor that holds a video processor (Qwen2-VL) needs torchvision, which is not installed
    here: then the same class without it (image tasks never call it; it saves as the real class)."""
    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ImportError, AttributeError):
        import importlib.util
        import transformers
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
        if importlib.util.find_spec("torchvision"):
            raise
        cls = getattr(transformers, PROCESSOR_MAPPING_NAMES[AutoConfig.from_pretrained(path).model_type])
        names = [a for a in cls.get_attributes() if a != "video_processor"]
        return type(cls.__name__, (cls,), {"get_attributes": classmethod(lambda c: names)}).from_pretrained(path)


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def is_vl(processor) -> bool:
    return hasattr(processor, "image_processor")


# ---- batched generation that prefills each prompt only past what it shares with a cached sequence ----
class GrowingLayer(transformers.cache_utils.DynamicLayer):
    """A DynamicLayer that writes each new token's keys/values into spare room of a preallocated buffer and hands out
    views of its filled part: HF's layer torch.cat-s the whole cache at every decode step, which took 87% of a batch-32
    SmolLM2 decode step on this CPU (docs/ppo_generalpoints.md, detail #10). Same numbers, no per-step copy."""
    SPARE = 256  # tokens of room added when the buffer is full

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.buffers, self.length = None, 0
        end = self.length + key_states.shape[-2]
        if self.buffers is None or end > self.buffers[0].shape[-2]:
            grown = []
            for old, new in zip(self.buffers or (None, None), (key_states, value_states)):
                buf = new.new_empty((*new.shape[:2], end + self.SPARE, new.shape[-1]))  # (B, H, capacity, D)
                if old is not None:
                    buf[:, :, :self.length] = old[:, :, :self.length]
                grown.append(buf)
            self.buffers = grown
        self.buffers[0][:, :, self.length:end] = key_states
        self.buffers[1][:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.buffers[0][:, :, :end], self.buffers[1][:, :, :end]
        return self.keys, self.values

    def crop(self, tokens_to_remove: int):
        super().crop(tokens_to_remove)
        self.length = self.keys.shape[-2] if self.is_initialized else 0

    def batch_select_indices(self, indices):
        if self.is_initialized:
            self.buffers = [b[indices] for b in self.buffers]
            self.keys, self.values = self.buffers[0][:, :, :self.length], self.buffers[1][:, :, :self.length]

    def batch_repeat_interleave(self, repeats: int):
        if self.is_initialized:
            self.buffers = [b.repeat_interleave(repeats, dim=0) for b in self.buffers]
            self.keys, self.values = self.buffers[0][:, :, :self.length], self.buffers[1][:, :, :self.length]


def growing_cache(config, layers=None) -> transformers.DynamicCache:
    """A DynamicCache of GrowingLayers (models whose layers are all full attention), filled with `layers` [(keys,
    values) per layer] if given; a plain DynamicCache otherwise."""
    cache = transformers.DynamicCache(config=config)
    if all(type(layer) is transformers.cache_utils.DynamicLayer for layer in cache.layers):
        cache.layers = [GrowingLayer() for _ in cache.layers]
    for layer, kv in zip(cache.layers, layers or []):
        layer.update(*kv)
    return cache


class InverseCDFSampler(transformers.LogitsProcessor):
    """generate(do_sample=True)'s draw, done by a logits processor of a generate(do_sample=False) call: the same
    warpers (temperature, top-k, top-p, in generate's order), then one uniform per row against the fp64 cumulative sum
    of the probabilities; it returns scores whose argmax is the drawn token, which greedy selection then takes.
    torch.multinomial draws one exponential per vocabulary entry instead, single-threaded: 33 ms of a ~200 ms
    batch-32 SmolLM2 decode step on this CPU, against ~10 ms here (docs/ppo_generalpoints.md, detail #9). The same
    distribution, another random stream, but for tokens less likely than e^-87 (1.6e-38) times the top one: they
    get 0 (together < V * 1.6e-38 of the mass), because exp() of a number below -87 underflows fp32 and this CPU's
    vectorised exp then runs ~25x slower (14 of the 20 ms the draw took at temperature 0.2 before the clamp).
    `logprobs` (record=True): per step, the drawn tokens' log-probs under the warped distribution, (B,) fp32; they
    need one generate() call over a fixed batch (a PrefixCache without chunks)."""
    UNSUPPORTED = dict(min_p=lambda v: v is not None, typical_p=lambda v: v is not None and v < 1.0,
                       epsilon_cutoff=lambda v: v is not None and 0.0 < v < 1.0,
                       eta_cutoff=lambda v: v is not None and 0.0 < v < 1.0, top_h=lambda v: v is not None)

    def __init__(self, temperature: float, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 record: bool = True):
        warpers = [transformers.TemperatureLogitsWarper(temperature)] if temperature not in (None, 1.0) else []
        warpers += [transformers.TopKLogitsWarper(top_k)] if top_k else []
        warpers += [transformers.TopPLogitsWarper(top_p)] if top_p is not None and top_p < 1.0 else []
        self.warpers, self.record = transformers.LogitsProcessorList(warpers), record
        self.logprobs, self.buffers = [], None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.record and self.logprobs and len(self.logprobs[0]) != len(scores):  # a PrefixCache chunk: rows left
            raise ValueError("an InverseCDFSampler records the log-probs of one generate() call over a fixed batch; "
                             f"it got {len(scores)} rows after {len(self.logprobs[0])}")
        x = self.warpers(input_ids, scores)                                    # (B, V) fp32, -inf where cut
        if self.buffers is None or self.buffers[0].shape != x.shape:  # kept: fresh 6-12 MB tensors at every step
            self.buffers = (torch.empty_like(x), torch.empty_like(x, dtype=torch.float64))  # cost page faults
        p, cdf = self.buffers
        m = x.amax(-1, keepdim=True)                                           # (B, 1)
        torch.sub(x, m, out=p)                                                 # (B, V) log of the unnormalised p
        negligible = p < -87.0                          # (B, V) below e^-87 of the top token, cut ones too: p = 0
        p.clamp_(min=-87.0).exp_().masked_fill_(negligible, 0.0)               # (B, V) unnormalised probabilities
        torch.cumsum(p, -1, dtype=torch.float64, out=cdf)                      # (B, V) fp64: no token lost to rounding
        if not torch.isfinite(cdf[:, -1]).all():  # as torch.multinomial: a NaN or all--inf row is an error
            raise ValueError("probability tensor contains either inf, nan or element < 0 (non-finite logits)")
        u = (1 - torch.rand(len(cdf), 1, dtype=cdf.dtype, device=cdf.device)) * cdf[:, -1:]  # (B, 1) in (0, sum]
        token = torch.searchsorted(cdf, u)                                     # (B, 1): cdf[t-1] < u <= cdf[t], p_t > 0
        if self.record:
            self.logprobs.append((x.gather(1, token) - m - cdf[:, -1:].log().float()).squeeze(1))  # (B,) log softmax
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)

    @classmethod
    def swap_in(cls, gen_config: transformers.GenerationConfig, model_defaults=None, record: bool = True):
        """Turn a sampling GenerationConfig greedy, in place, and return the sampler that draws instead: pass both to
        generate() (logits_processor=[sampler]). model_defaults: the model's generation_config, whose warpers
        generate() would add to a sampling call: one this sampler does not apply is an error."""
        for config in (gen_config, model_defaults):
            for name, active in cls.UNSUPPORTED.items():
                if config is not None and active(getattr(config, name, None)):
                    raise ValueError(f"the inverse-CDF sampler does not apply {name}={getattr(config, name)} (from "
                                     "the generation config); draw with torch.multinomial (--no-inverse-cdf-sampling)")
        sampler = cls(gen_config.temperature, gen_config.top_k, gen_config.top_p, record)
        gen_config.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        return sampler


class PrefixCache:
    """KV-cache reuse for batched generation with a text model: keeps the keys/values of the sequences it generated
    lately and, for each new prompt, prefills only what follows the longest prefix it shares with one of them: the
    conversation so far (cross-turn) or the system prompt and task template of another episode (shared prefix).
    Masks and the cumsum position ids of generate() skip the left pads, so every token sees the same context at the
    same position as in a plain forward over the whole prompt."""

    def __init__(self, model, chunk: int = 0):
        self.model, self.chunk, self.entries = model, chunk, []  # entries: (ids (T,), [(keys, values) (H, T, D)])

    def match(self, ids: np.ndarray) -> tuple:
        """(entry, length) of the longest common prefix with a stored sequence, leaving >= 1 token to feed."""
        best = (None, 0)
        for entry in self.entries:
            n = min(len(entry[0]), len(ids) - 1)
            if n > best[1]:
                diff = np.flatnonzero(entry[0][:n] != ids[:n])
                common = int(diff[0]) if len(diff) else n
                best = (entry, common) if common > best[1] else best
        return best

    @torch.no_grad()
    def generate(self, prompts: list, pad_id: int, eos_id: int, device, **generate_kwargs):
        """prompts: token-id lists -> (model.generate's output (generate_kwargs must ask for return_dict_in_generate),
        W): sequences (B, W + new tokens), the first W columns the left-padded prompts. Stores the KV of every prompt +
        response (but its last token) for the next call. self.chunk > 0: at most `chunk` new tokens per generate
        call; the rows still unfinished after a call go on in a smaller batch (their text so far hits this cache: one
        token to prefill), so that finished rows stop costing decode steps. The output then has W = 0, `scores` (the
        sampler's logits) aligned with each row's own tokens and the first call's `hidden_states` (the prompts)."""
        config = generate_kwargs.get("generation_config")
        total = config.max_new_tokens if config is not None else generate_kwargs["max_new_tokens"]
        chunk = self.chunk
        if chunk <= 0 or chunk >= total:
            return self.generate_once(prompts, pad_id, eos_id, device, **generate_kwargs)
        new, scores, pending, first = [[] for _ in prompts], [[] for _ in prompts], list(range(len(prompts))), None
        while pending and total > 0:
            n = min(total, chunk)
            if config is not None:
                generate_kwargs["generation_config"] = copy.deepcopy(config)
                generate_kwargs["generation_config"].max_new_tokens = n
            else:
                generate_kwargs["max_new_tokens"] = n
            out, width = self.generate_once([list(prompts[i]) + new[i] for i in pending], pad_id, eos_id, device,
                                            **generate_kwargs)
            first = out if first is None else first  # its hidden_states: the prompts' last token
            still = []
            for row, i in enumerate(pending):
                ids = out.sequences[row, width:].tolist()
                k = ids.index(eos_id) + 1 if eos_id in ids else len(ids)
                new[i] += ids[:k]
                scores[i] += [s[row] for s in (out.scores or ())[:k]]
                if k == n and ids[-1] != eos_id:
                    still.append(i)
            pending, total = still, total - n
        T = max(len(x) for x in new)
        sequences = torch.full((len(new), T), pad_id, dtype=torch.long)
        for i, x in enumerate(new):
            sequences[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        if first.scores:  # (B, V) per step; a finished row's later steps are zeros (never read: they follow its eos)
            filler = torch.zeros_like(first.scores[0][0])
            first.scores = tuple(torch.stack([s[t] if t < len(s) else filler for s in scores]) for t in range(T))
        first.sequences = sequences.to(device)
        return first, 0

    @torch.no_grad()
    def generate_once(self, prompts: list, pad_id: int, eos_id: int, device, **generate_kwargs):
        """One model.generate call for all prompts through the cache (generate() with chunk 0)."""
        ids = [np.asarray(p) for p in prompts]
        matches = [self.match(x) for x in ids]
        L = 0  # the prefix common to all prompts of this call (system prompt, task template): prefilled once
        while len(ids) > 1 and all(len(x) > L + 1 and x[L] == ids[0][L] for x in ids):
            L += 1
        if L >= 8 and any(c < L for _, c in matches):
            cache = growing_cache(self.model.config)
            self.model(input_ids=torch.from_numpy(ids[0][None, :L]).to(device), cache=cache, use_cache=True)
            self.entries.append((ids[0][:L], [(layer.keys[0], layer.values[0]) for layer in cache.layers]))
            matches = [self.match(x) for x in ids]
        B, C = len(ids), max(c for _, c in matches)
        R = max(len(x) - c for x, (_, c) in zip(ids, matches))
        input_ids = torch.full((B, C + R), pad_id, dtype=torch.long)  # layout per row: [pad, reused | pad, new]
        attention_mask = torch.zeros((B, C + R), dtype=torch.long)
        layers = None
        if C > 0:
            layers = []
            for l in range(len(self.entries[0][1])):
                k0 = self.entries[0][1][l][0]
                keys = k0.new_zeros((B, k0.shape[0], C, k0.shape[2]))  # (B, H, C, D)
                values = torch.zeros_like(keys)
                for i, (entry, c) in enumerate(matches):
                    if c:
                        keys[i, :, C - c:], values[i, :, C - c:] = entry[1][l][0][:, :c], entry[1][l][1][:, :c]
                layers.append((keys.to(device), values.to(device)))
        cache = growing_cache(self.model.config, layers)
        for i, (x, (_, c)) in enumerate(zip(ids, matches)):
            input_ids[i, C - c:C], attention_mask[i, C - c:C] = torch.from_numpy(x[:c]), 1
            input_ids[i, C + R - (len(x) - c):], attention_mask[i, C + R - (len(x) - c):] = torch.from_numpy(x[c:]), 1
        out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                  cache=cache, **generate_kwargs)
        # an entry that a new prompt extends entirely is superseded by it; the others stay (shared prefixes,
        # episodes not in this call), the most recent 2B of them
        superseded = {id(entry) for entry, c in matches if entry is not None and c == len(entry[0])}
        self.entries = [entry for entry in self.entries if id(entry) not in superseded]
        for i, (x, (_, c)) in enumerate(zip(ids, matches)):
            response = out.sequences[i, C + R:].tolist()
            n = response.index(eos_id) + 1 if eos_id in response else len(response)
            keep = torch.cat([torch.arange(C - c, C), torch.arange(C + R - (len(x) - c), C + R + n - 1)]).to(device)
            kv = [(layer.keys[i].index_select(1, keep), layer.values[i].index_select(1, keep))
                  for layer in cache.layers]  # per layer (H, T, D)
            self.entries.append((np.concatenate([x, np.asarray(response[:n - 1], dtype=x.dtype)]), kv))
        self.entries = self.entries[-2 * B:]
        return out, C + R


# ---- a training run's bookkeeping: failures, checkpoints, resume, run directory, logs ----
def fail(msg: str):
    """Stop with one clear line `<script>: error: ...` and exit status 1, no traceback (detail #27)."""
    raise SystemExit(f"{os.path.basename(sys.argv[0])}: error: {msg}".replace("\n", " "))


def disable_dropout(model: nn.Module):
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def unwrap(agent) -> nn.Module:
    return agent.module if hasattr(agent, "module") else agent


def check_finite(name: str, x: torch.Tensor, context: str,
                 hint: str = "lower --lr, check --max-grad-norm, or inspect the samples"):
    """Fail loudly before anything is saved (detail #19)."""
    if not torch.isfinite(x).all():
        fail(f"non-finite {name} ({x.detach().flatten()[:4].tolist()}) at {context}; stopping without writing a "
             f"checkpoint ({hint})")


def weights_finite(module: nn.Module) -> bool:
    """Every parameter is finite, on every rank (FSDP: each rank checks its shards, then all ranks agree)."""
    ok = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in module.parameters())
    if dist.is_initialized():
        flag = torch.tensor(float(ok), device=next(module.parameters()).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag)
    return ok


def reduce_metrics(local: dict, world_size: int) -> dict:
    """One all_gather for all the metrics of an update: counts are summed over ranks, `*_max` maximised, the rest
    averaged (NaN-aware)."""
    if world_size == 1:
        return local
    keys = sorted(local)
    parts = [torch.zeros(len(keys), dtype=torch.float64) for _ in range(world_size)]
    dist.all_gather(parts, torch.tensor([local[k] for k in keys], dtype=torch.float64))
    col = torch.stack(parts)  # (world_size, K)
    return {k: (col[:, j].sum() if k.startswith(("rollout/outcome/", "rollout/episodes", "rollout/successes"))
                else col[:, j].max() if k.endswith("_max") else col[:, j].nanmean()).item() for j, k in enumerate(keys)}


def read_d_init(path: str) -> int:
    """D_init of the FLOPs formula: the tokens the initial checkpoint was trained on (detail #23)."""
    state = os.path.join(path, "trainer_state.json")
    state = json.load(open(state)) if os.path.isfile(state) else {}
    return int(state.get("tokens_trained", 0)) + int(state.get("d_init_tokens", 0))


def save_ppo_checkpoint(path: str, agent, processor, optimizer, state: dict, rank_state: dict, rank: int,
                        world_size: int, fsdp: bool):
    """save_pretrained + value_head.pt + optimizer + trainer_state.json + per-rank RNG/env state, written into
    `path.tmp` and renamed only when complete (detail #24). A re-save moves the old copy to `path.old` until the
    new one is in place; `recover_checkpoints` renames a lone `path.old` back after a kill between the renames."""
    if not weights_finite(agent):
        fail(f"the weights are not finite; stopping without writing {path} (lower --lr)")
    tmp = path + ".tmp"
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(agent, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        full = unwrap(agent).state_dict()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        policy_sd = {k[len("policy."):]: v for k, v in full.items() if k.startswith("policy.")}
        unwrap(agent).policy.save_pretrained(tmp, state_dict=policy_sd)  # + generation_config
        processor.save_pretrained(tmp)
        torch.save({k[len("value_head."):]: v for k, v in full.items() if k.startswith("value_head.")},
                   os.path.join(tmp, "value_head.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=1)
    if world_size > 1:
        dist.barrier()
    # FSDP: each rank keeps its optimizer shard (resume needs the same world size); else rank 0 writes it
    if fsdp or rank == 0:
        torch.save(optimizer.state_dict(), os.path.join(tmp, f"optimizer_rank{rank}.pt" if fsdp else "optimizer.pt"))
    with open(os.path.join(tmp, f"rank{rank}_state.pkl"), "wb") as f:
        pickle.dump(rank_state, f)
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        replace_dir(tmp, path)
    if world_size > 1:
        dist.barrier()


def replace_dir(tmp: str, path: str):
    """A complete checkpoint written into `tmp` becomes `path`. A re-save moves the old copy to `path.old` until the
    new one is in place, so at every moment one copy is complete (recover_checkpoints finishes a killed swap)."""
    if os.path.exists(path):
        shutil.rmtree(path + ".old", ignore_errors=True)
        os.replace(path, path + ".old")
    os.replace(tmp, path)
    shutil.rmtree(path + ".old", ignore_errors=True)


def safe_step(env, text: str, error_reward: float):
    """env.step(text); an answer that makes the environment raise is a failed step, never the end of the run
    (detail #28): `error_reward`, outcome ENV_ERROR, truncated (the caller resets the episode), the error in
    info["error"] and the answer printed in full so that it can be replayed."""
    try:
        return env.step(text)
    except Exception as e:  # noqa: BLE001  (whatever the verifier cannot handle)
        error = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        print(f"env error on instance {getattr(env, 'instance_id', None)} ({error}): recorded as a failed step "
              f"(reward {error_reward}), episode reset; response {text!r}", flush=True)
        info = dict(outcome="ENV_ERROR", error=error, is_success=False, is_correct=False, cards_correct=False)
        return None, error_reward, False, True, info


# run identity and resume (detail #29)
RESUME_KEEPS = ("resume", "num_updates", "save_every", "eval_every", "track")  # what --resume takes from the CLI
ADDED_LATER = {"inverse_cdf_sampling": False}  # arguments a stored run may predate -> the behaviour it had then


def resume_flags(argv: list) -> tuple:
    """--resume continues with the arguments stored in its checkpoint -> (the RESUME_KEEPS fields given in `argv`,
    which it applies; the other flags given, which it would ignore and so refuses)."""
    applied, ignored = [], []
    for a in argv:
        if a.startswith("--") and len(a) > 2:
            flag = a[2:].split("=", 1)[0].replace("_", "-")
            name = flag.replace("-", "_")
            name = name[3:] if name.startswith("no_") and name[3:] in RESUME_KEEPS else name  # --no-track
            (applied if name in RESUME_KEEPS else ignored).append(name if name in RESUME_KEEPS else "--" + flag)
    return list(dict.fromkeys(applied)), list(dict.fromkeys(ignored))


def recover_checkpoints(ckpt_dir: str):
    """Finish a re-save killed between its two renames: in a directory of checkpoints (a PPO run's RUN/checkpoints, a
    sft.py run directory), a lone NAME.old is renamed back; one beside a complete NAME (only its deletion was
    missing) is deleted."""
    for name in sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []:
        old, new = os.path.join(ckpt_dir, name), os.path.join(ckpt_dir, name[: -len(".old")])
        if name.endswith(".old") and os.path.isdir(old):
            if os.path.isdir(new):
                shutil.rmtree(old)
            else:
                os.replace(old, new)


def resolve_resume(path: str, rank: int = 0, world_size: int = 1) -> str:
    """--resume RUN (its highest complete update) or RUN/checkpoints/update_XXXX -> the checkpoint directory, after
    rank 0 has finished any re-save that a kill interrupted (recover_checkpoints)."""
    path = os.path.normpath(path)
    if os.path.basename(path).endswith((".tmp", ".old")):
        fail(f"--resume {path}: a *.tmp or *.old directory belongs to an interrupted save, never a complete "
             "checkpoint; resume from the run directory or a complete update_XXXX")
    ckpt_dir = os.path.join(path, "checkpoints")
    recover = ckpt_dir if os.path.isdir(ckpt_dir) else os.path.dirname(path)
    if rank == 0 and os.path.basename(recover) == "checkpoints":
        recover_checkpoints(recover)
    if world_size > 1:
        dist.barrier()
    if os.path.isdir(ckpt_dir) and not os.path.isfile(os.path.join(path, "trainer_state.json")):
        done = [d for d in os.listdir(ckpt_dir) if d.startswith("update_") and d[7:].isdigit()
                and os.path.isfile(os.path.join(ckpt_dir, d, "trainer_state.json"))]
        if not done:
            fail(f"--resume {path}: the run has no complete checkpoint in {ckpt_dir}")
        path = os.path.join(ckpt_dir, max(done, key=lambda d: int(d[7:])))
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        fail(f"--resume {path} is not a PPO checkpoint (no trainer_state.json)")
    if os.path.basename(os.path.dirname(path)) != "checkpoints":
        fail(f"--resume {path}: a checkpoint is resumed inside its run (RUN/checkpoints/update_XXXX); to start a new "
             "run from it, pass it as --model-path")
    return path


def latest_checkpoint(path: str) -> str:
    """sft.py --resume: a checkpoint dir itself, or a run dir's highest step_k/ (or final/) with trainer_state.json."""
    children = [os.path.join(path, d) for d in os.listdir(path) if not d.endswith((".tmp", ".old"))] \
        if os.path.isdir(path) else []
    candidates = [d for d in [path] + children if os.path.isfile(os.path.join(d, "trainer_state.json"))]
    if not candidates:
        fail(f"--resume {path!r}: no checkpoint with trainer_state.json found")
    try:
        return max(candidates, key=lambda d: json.load(open(os.path.join(d, "trainer_state.json")))["step"])
    except (ValueError, KeyError, TypeError) as e:
        fail(f"--resume {path!r}: a trainer_state.json there is unreadable ({type(e).__name__}: {e})")


def new_run_dir(base: str) -> str:
    """runs/{base}, else runs/{base}__2, __3, ...: created atomically (os.makedirs, exist_ok=False), so a new run
    never writes into an existing directory, not even one made in the same second by another run."""
    for k in range(1, 10_000):
        run_dir = os.path.join("runs", base if k == 1 else f"{base}__{k}")
        try:
            os.makedirs(run_dir)
            return run_dir
        except FileExistsError:
            continue
    fail(f"no free run directory runs/{base}__k")


def truncate_metrics(path: str, upto: int, key: str = "update"):
    """Resuming after `upto` (the row's `key`: update, or step for sft.py): drop the metrics.jsonl rows the
    interrupted run logged after it (and a line cut by the crash), so that the file continues without duplicate rows.
    Rewritten atomically."""
    if not os.path.isfile(path):
        return
    keep = []
    for line in open(path):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get(key, 0) <= upto:
            keep.append(line.rstrip("\n") + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def setup_distributed(cuda: bool) -> tuple:
    """nanoGPT style: the same file runs under python and torchrun (detail #25) -> (distributed, rank, world_size,
    device); NCCL on GPUs, gloo on CPUs."""
    distributed, use_cuda = "RANK" in os.environ, torch.cuda.is_available() and cuda
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return distributed, rank, world_size, device


def resume_run(args, argv: list, rank: int, world_size: int, check_args) -> tuple:
    """--resume: the checkpoint carries the weights, the arguments that define the run and the run directory (detail
    #29). Sets `args` to the stored arguments but the RESUME_KEEPS given in `argv`, refuses the other flags ->
    (the stored trainer state, the run directory, the update it continues after)."""
    applied, ignored = resume_flags(argv)
    if ignored:
        fail(f"--resume continues the run with the arguments stored in its checkpoint and applies only "
             f"{', '.join('--' + k.replace('_', '-') for k in RESUME_KEEPS)}; leave out {' '.join(ignored)}")
    args.resume = resolve_resume(args.resume, rank, world_size)
    try:
        state = json.load(open(os.path.join(args.resume, "trainer_state.json")))
        keep = {k: getattr(args, k) for k in applied}  # only what the command line gives
        predates = {k: v for k, v in ADDED_LATER.items() if hasattr(args, k) and k not in state["args"]}
        for key, value in {**predates, **state["args"], **keep}.items():  # the run continues with its own arguments
            nested = getattr(args, key, None)  # a nested dataclass (Official) is stored as a dict
            setattr(args, key, type(nested)(**value) if is_dataclass(nested) and isinstance(value, dict) else value)
        resumed_update = int(state["step"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        fail(f"--resume {args.resume}: its trainer_state.json is unreadable ({type(e).__name__}: {e})")
    check_args(args)
    if args.num_updates <= resumed_update:
        fail(f"--resume {args.resume} is at update {resumed_update} already: pass a larger --num-updates")
    run_dir = os.path.dirname(os.path.dirname(args.resume))  # RUN/checkpoints/update_XXXX -> RUN
    args.model_path = args.resume
    if rank == 0:
        print(f"resuming {os.path.basename(run_dir)} after update {resumed_update} with its stored arguments"
              + "".join(f", --{k.replace('_', '-')} {getattr(args, k)}" for k in applied if k != "resume"), flush=True)
    return state, run_dir, resumed_update


def load_resume_files(path: str, optimizer, rank: int, fsdp: bool) -> dict:
    """The optimizer state of a resumed checkpoint (loaded after the model is wrapped) -> this rank's RNG/env state."""
    opt_file = f"optimizer_rank{rank}.pt" if fsdp else "optimizer.pt"
    try:
        optimizer.load_state_dict(torch.load(os.path.join(path, opt_file), weights_only=False))
        return pickle.load(open(os.path.join(path, f"rank{rank}_state.pkl"), "rb"))
    except Exception as e:  # noqa: BLE001  (a missing or truncated file, another world size)
        fail(f"--resume {path}: {opt_file} or rank{rank}_state.pkl cannot be loaded ({type(e).__name__}: "
             f"{str(e)[:200]})")


def fsdp_shard(modules: list, world_size: int, device, mixed_precision: bool, is_layer=None):
    """FSDP2 (detail #25): each layer of modules[0] (is_layer; default the classes its _no_split_modules names), then
    each of `modules` in order (PPO: the policy, whose embeddings, norm and lm_head generate() calls, then the agent
    with the value head), bf16 parameters with fp32 gradient reduction if asked."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = dist.device_mesh.init_device_mesh(device.type, (world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    layer_classes = tuple(getattr(modules[0], "_no_split_modules", None) or [])
    for module in modules[0].modules():
        if is_layer(module) if is_layer else type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh, mp_policy=mp)
    for module in modules:
        fully_shard(module, mesh=mesh, mp_policy=mp)


class RunLog:
    """TensorBoard + metrics.jsonl of a run (rank 0; on the other ranks every method does nothing)."""

    def __init__(self, run_dir: Optional[str], args, rank: int):
        self.writer = self.jsonl = None
        if rank != 0:
            return
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=asdict(args), name=os.path.basename(run_dir), save_code=True)
        self.writer = SummaryWriter(run_dir)
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % (
            "\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])))
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")

    def __call__(self, metrics: dict, step: int, record: dict):
        """One metrics.jsonl row (record + metrics) and a TensorBoard scalar per metric."""
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
            self.row({**record, **metrics})

    def row(self, row: dict):
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.jsonl.close()


def open_run(args, run_dir: Optional[str], resumed_update: Optional[int], rank: int, distributed: bool) -> tuple:
    """The run directory, only once every check has passed (detail #29): a new run gets a directory of its own,
    --resume continues its checkpoint's run without the rows the interrupted run logged after the checkpoint ->
    (run_dir, run_name, RunLog)."""
    if rank == 0:
        if run_dir is None:
            run_dir = new_run_dir(f"{args.task}__{args.exp_name}__{args.seed}__{int(time.time())}")
        else:
            truncate_metrics(os.path.join(run_dir, "metrics.jsonl"), resumed_update)
    if distributed and resumed_update is None:  # one run directory for all ranks
        holder = [run_dir]
        dist.broadcast_object_list(holder, src=0)
        run_dir = holder[0]
    return run_dir, os.path.basename(run_dir), RunLog(run_dir, args, rank)


# ---- reading checkpoints back (eval.py, the curves) ----
def find_checkpoints(run_dir: str) -> list[dict]:
    """Every subdirectory of run_dir (or of its subdirectories) holding a config.json, ordered by step (final last).
    step and FLOPs are the `step` and `flops` of the checkpoint's trainer_state.json (detail #11)."""
    if not os.path.isdir(run_dir):
        fail(f"--run-dir {run_dir} is not a directory")
    ckpts = []
    candidates = [os.path.join(run_dir, d) for d in os.listdir(run_dir)]  # run/step_k/ or run/checkpoints/update_k/
    candidates += [os.path.join(c, d) for c in candidates if os.path.isdir(c) for d in os.listdir(c)]
    for path in candidates:
        name = os.path.basename(path)
        if name.endswith((".tmp", ".old")) or not os.path.isfile(os.path.join(path, "config.json")):
            continue
        numbers = re.findall(r"\d+", name)
        state = {"step": int(numbers[-1]) if numbers else None}  # no trainer_state.json: the name's step, no FLOPs
        if os.path.isfile(os.path.join(path, "trainer_state.json")):
            with open(os.path.join(path, "trainer_state.json")) as f:
                state |= json.load(f)
        flops = state.get("flops")
        if flops is not None and "global_step" in state:  # a PPO X counts 6N D_init; sft.py's starts at its init:
            d, d_buffer, d_init = state["tokens_trained"], state["tokens_generated"], state["d_init_tokens"]
            flops *= (6 * d + 2 * d_buffer) / max(6 * (d_init + d) + 2 * d_buffer, 1)  # both from the init (#11)
        ckpts.append(dict(path=path, name=name, step=state["step"], flops=flops))
    ckpts.sort(key=lambda c: (c["step"] is None, c["step"] if c["step"] is not None else 0, c["name"] == "final"))
    if not ckpts:
        fail(f"--run-dir {run_dir} has no checkpoint (no subdirectory with a config.json)")
    return ckpts


def distinct_names(paths: list[str]) -> list[str]:
    """Column / arm names of checkpoint paths: the directory name, grown by parent directories where two different
    paths share it (runs/sft/final, runs/ppo/final -> sft/final, ppo/final); the same path twice gets #2, #3, ..."""
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    keys = [p if p == "tiny" or p in PREPARED else os.path.abspath(p) for p in paths]
    parts = [[x for x in k.split(os.sep) if x] for k in keys]
    depth = [1] * len(paths)
    while True:
        clash = [i for i in range(len(paths)) if any(names[j] == names[i] and keys[j] != keys[i]
                                                      for j in range(len(paths)))]
        grow = [i for i in clash if depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
            names[i] = "/".join(parts[i][-depth[i]:])
    return [n if names[:i].count(n) == 0 else f"{n}#{names[:i].count(n) + 1}" for i, n in enumerate(names)]


def checkpoint_exists(path: str) -> bool:  # a prepared name is built on first use (load_model), not here
    return path == "tiny" or path in PREPARED or os.path.isfile(os.path.join(path, "config.json"))


def checkpoint_is_vl(path: str) -> bool:
    """Whether the checkpoint takes images; `tiny` does (it is tiny-vl for a VL task)."""
    if path == "tiny" or path in PREPARED:
        return path not in ("tiny-lm", "smollm2")
    with open(os.path.join(path, "config.json")) as f:
        return "vision_config" in json.load(f)


def checkpoint_weights_problem(path: str) -> Optional[str]:
    """Why a local checkpoint cannot be evaluated: no weight file, a truncated or corrupt model.safetensors, or weights
    that are not finite (NaN or inf, e.g. saved by a diverged run); None if it is fine. The prepared names (tiny,
    smollm2, smolvlm) are built by make_models.py and checked when loaded."""
    if path == "tiny" or path in PREPARED:
        return None
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        return None if any(f.endswith(".bin") for f in os.listdir(path)) else "no model weights in it (no " \
            "*.safetensors or *.bin file)"
    from safetensors import safe_open
    for name in files:
        try:
            with safe_open(os.path.join(path, name), framework="pt") as f:
                for key in f.keys():
                    if not bool(torch.isfinite(f.get_tensor(key)).all()):
                        return f"its weights are not finite (NaN or inf in {key})"
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error type)
            return f"{name} cannot be read, truncated or corrupt ({type(e).__name__}: {str(e)[:200]})"
    return None


# ---- the initial checkpoint of an RL run, built on first use ----
def resolve_init_checkpoint(model_path: str, task: str, init_fallback: str, init_sft_args: str,
                            distributed: bool) -> str:
    """ppo_virl.py --model-path auto: the SFT checkpoint of `python sft.py --task {task}` (runs/sft-{task}-default/
    final, else the newest runs/{task}__sft__*/final); when there is none, --init-fallback decides (docs/ppo_virl.md).
    An interrupted build (runs/sft-{task}-default without final/) is continued with `sft.py --resume`, never started
    over in it."""
    if model_path != "auto":
        return model_path
    run = os.path.join("runs", f"sft-{task}-default")
    default = os.path.join(run, "final")
    if not os.path.isdir(default) and os.path.isfile(os.path.join(default + ".old", "config.json")):
        os.replace(default + ".old", default)  # sft.py was killed between the two renames of a re-save of final/
    found = [default] if os.path.exists(os.path.join(default, "config.json")) else []
    found += sorted((d for d in glob.glob(os.path.join("runs", f"{task}__sft__*", "final"))
                     if os.path.exists(os.path.join(d, "config.json"))), key=os.path.getmtime, reverse=True)
    if found:
        return found[0]
    sft_cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "sft.py"), "--task",
               task, "--run-name", f"sft-{task}-default", *shlex.split(init_sft_args)]
    hint = f"run `python sft.py --task {task} --run-name sft-{task}-default` first, or pass --model-path"
    if init_fallback == "error" or (init_fallback == "sft" and distributed):
        fail(f"no SFT checkpoint for {task} ({default} or runs/{task}__sft__*/final): RL starts from an SFT "
             f"checkpoint; {hint}")
    if init_fallback == "base":
        base = "smollm2" if task == "virl-l" else "smolvlm"
        print(f"WARNING: no SFT checkpoint for {task} ({hint}); starting RL from the base model {base!r}. "
              "The paper's RL runs without SFT fail (Fig. 9): expect ~0 reward.", flush=True)
        return base
    if os.path.isdir(run):  # an earlier build was interrupted: continue it from its latest step_k/
        if not [d for d in glob.glob(os.path.join(run, "step_*", "trainer_state.json")) if ".tmp" not in d]:
            fail(f"{run} exists without final/ or any complete step_k/ (an interrupted sft.py run that saved nothing "
                 f"to resume): delete it to build the SFT checkpoint again, or pass --model-path")
        sft_cmd[sft_cmd.index("--run-name"): sft_cmd.index("--run-name") + 2] = ["--resume", run]
    print(f"no SFT checkpoint for {task}: building it first with `{shlex.join(sft_cmd[1:])}` "
          "(once; later runs reuse it)", flush=True)
    if run_child(sft_cmd) != 0 or not os.path.exists(os.path.join(default, "config.json")):
        fail(f"building the SFT checkpoint failed (see above); {hint}")
    return default
