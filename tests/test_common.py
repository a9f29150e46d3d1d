"""common.GrowingLayer: the KV cache that writes new tokens into spare room must give the logits of HF's
DynamicCache exactly, across a buffer regrowth, and keep the right rows when a batch is reordered or cut; a SIGTERM
to a script that builds a model or its SFT init stops the child build too (common.run_child)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import transformers

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def greedy_logits(model, cache, ids, steps: int) -> torch.Tensor:
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
    x, pos, logits = out.logits[:, -1].argmax(-1, keepdim=True), pos[:, -1:], [out.logits[:, -1]]
    for _ in range(steps):
        mask, pos = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), pos + 1
        out = model(input_ids=x, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        x = out.logits[:, -1].argmax(-1, keepdim=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits)  # (steps + 1, B, V)


@torch.no_grad()
def test_growing_cache_gives_the_logits_of_the_dynamic_cache(monkeypatch):
    model = common.load_model("tiny", vl_task=False)[0].eval()
    monkeypatch.setattr(common.GrowingLayer, "SPARE", 3)  # regrow the buffer every few steps
    ids = torch.randint(5, model.config.vocab_size, (3, 12))
    cache = common.growing_cache(model.config)
    assert all(isinstance(layer, common.GrowingLayer) for layer in cache.layers)
    reference = greedy_logits(model, transformers.DynamicCache(config=model.config), ids, 10)
    assert torch.equal(greedy_logits(model, cache, ids, 10), reference)
    assert cache.get_seq_length() == 12 + 10 and cache.layers[0].buffers[0].shape[-2] >= 22
    keys = cache.layers[0].keys.clone()
    cache.batch_select_indices(torch.tensor([2, 0]))  # rows kept, in a new order
    assert torch.equal(cache.layers[0].keys, keys[[2, 0]])
    cache.crop(-4)
    assert cache.get_seq_length() == 18 and torch.equal(cache.layers[0].keys, keys[[2, 0], :, :18])


def test_prefilled_growing_cache_holds_the_given_layers():
    model = common.load_model("tiny", vl_task=False)[0]
    kv = [(torch.randn(2, 1, 5, 4), torch.randn(2, 1, 5, 4)) for _ in range(model.config.num_hidden_layers)]
    cache = common.growing_cache(model.config, kv)
    assert cache.get_seq_length() == 5 and torch.equal(cache.layers[-1].values, kv[-1][1])


def warped_softmax(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """What generate(do_sample=True) draws from, written out: softmax(logits / T) restricted to the k most likely
    tokens, then to the most likely ones whose mass reaches top_p, renormalised."""
    p = (logits / temperature).softmax(-1)
    order = p.argsort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order[:top_k or len(p)]] = True
    mass_before = torch.cat([torch.zeros(1), p[order].cumsum(0)[:-1]])
    keep[order[mass_before >= top_p]] = False
    return torch.where(keep, p, 0) / (p * keep).sum()


@pytest.mark.parametrize("kwargs", [dict(temperature=0.7), dict(temperature=1.0, top_k=2),
                                    dict(temperature=1.3, top_p=0.8), dict(temperature=0.2)])  # 0.2: exp clamped
def test_inverse_cdf_sampler_draws_what_generate_would(kwargs):
    """InverseCDFSampler (detail #9): two different rows interleaved, 50k draws each; each row's token frequencies
    within 5 standard errors of its warped softmax, tokens outside top-k / top-p never drawn, the recorded log-probs
    those of the drawn tokens, and the returned scores make greedy selection take the draw."""
    torch.manual_seed(0)
    rows = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0, -20.0], [-1.0, 0.5, 2.5, 0.0, -3.0, 1.0]])
    sampler = common.InverseCDFSampler(**kwargs)
    logits = rows.repeat(50_000, 1)  # (N, V): row 0, row 1, row 0, ...
    scores = sampler(None, logits.clone())  # (N, V)
    drawn = scores.argmax(-1)  # (N,)
    for r, row in enumerate(rows):
        p, got = warped_softmax(row, **kwargs), drawn[r::2]
        freq = torch.bincount(got, minlength=len(row)) / len(got)
        assert ((freq - p).abs() <= 5 * (p * (1 - p) / len(got)).sqrt()).all(), (r, freq, p)
        assert torch.allclose(sampler.logprobs[0][r::2], p.log()[got], atol=1e-5)
    assert (scores.gather(1, drawn[:, None]) == 0).all() and torch.isinf(scores).sum() == scores.numel() - len(drawn)
    with pytest.raises(ValueError, match="one generate.. call over a fixed batch"):  # rows left: log-probs misalign
        sampler(None, logits[:3].clone())


def test_inverse_cdf_sampler_refuses_what_it_cannot_draw_from():
    """Non-finite logits raise as torch.multinomial does; a warper the sampler does not apply (min_p, typical_p, ...,
    set in the generation config or the model's) is an error, not a silently different distribution."""
    with pytest.raises(ValueError, match="inf, nan"):
        common.InverseCDFSampler(1.0)(None, torch.tensor([[0.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="inf, nan"):
        common.InverseCDFSampler(1.0)(None, torch.full((1, 3), float("-inf")))
    sampling = transformers.GenerationConfig(do_sample=True, temperature=0.5, top_k=0, top_p=1.0)
    with pytest.raises(ValueError, match="min_p=0.1"):
        common.InverseCDFSampler.swap_in(sampling, transformers.GenerationConfig(min_p=0.1))
    sampler = common.InverseCDFSampler.swap_in(sampling, transformers.GenerationConfig(typical_p=1.0))
    assert not sampling.do_sample and sampling.temperature is None and len(sampler.warpers) == 1


@pytest.mark.parametrize("stored", [{}, {"inverse_cdf_sampling": True}])
def test_a_run_made_before_the_sampler_resumes_with_multinomial(stored, tmp_path):
    """--resume of a run whose stored arguments predate --inverse-cdf-sampling keeps drawing with torch.multinomial
    (its random stream); a run that stored the flag keeps its value."""
    sys.path.insert(0, ROOT)
    import ppo_generalpoints as ppo
    ckpt = tmp_path / "run" / "checkpoints" / "update_0001"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "args": {"num_updates": 3, **stored}}))
    args = ppo.Args(resume=str(ckpt))
    common.resume_run(args, ["--resume", str(ckpt)], 0, 1, lambda a: None)
    assert args.inverse_cdf_sampling is stored.get("inverse_cdf_sampling", False) and args.num_updates == 3


def test_rollout_benchmark_runs():
    """bench_rollout.py on the tiny model, every kind of scheme (the official batch-1 loop with either sampler, KV
    reuse with and without the sampling-pass log-probs): ratios, the log-prob check and the update line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_rollout.py"), "--model-path", "tiny",
                          "--num-envs", "3", "--batch1-envs", "1", "--turns", "2", "--max-new-tokens", "8",
                          "--schemes", "batch-1", "batch-1/icdf", "kv", "kv+lp", "kv+lp/mn", "kv/c2", "kv+lp/c2",
                          "--update-samples", "2",
                          "--micro-batch-size", "1"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(re.findall(r"^ROLLOUT ratio kv", out.stdout, re.M)) == 10, out.stdout
    worst = float(re.search(r"per action log pi ([\d.e+-]+)", out.stdout)[1])
    assert worst < 1e-3 and "UPDATE ratio PPO / bare" in out.stdout, out.stdout


def test_kv_cache_benchmark_runs():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_kv_cache.py"), "--model-path", "tiny",
                          "--batch", "2", "--context", "20", "--steps", "2", "--repeats", "1", "--profile"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "max |logit difference| 0" in out.stdout, out.stdout
    assert "aten::mm" in out.stdout, out.stdout  # --profile: the operator table
    assert re.search(r"FLOOR: read bandwidth [\d.]+ GB/s .* measured \d+ ms = \d+% of their sum", out.stdout), out.stdout


def test_sigterm_stops_the_child_build_too(tmp_path):
    """`timeout ppo_virl.py --model-path auto` while it builds its SFT init: the sft.py child must not run on."""
    pidfile = tmp_path / "child.pid"
    child = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    parent = subprocess.Popen([sys.executable, "-c", "import sys, common; "
                               f"sys.exit(common.run_child([sys.executable, '-c', {child!r}]))"], cwd=ROOT)
    for _ in range(600):
        if pidfile.exists() and pidfile.read_text():
            break
        time.sleep(0.1)
    parent.terminate()
    assert parent.wait(timeout=60) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):  # the child was stopped and reaped
        os.kill(int(pidfile.read_text()), 0)


def test_scripts_started_together_build_a_prepared_model_once(tmp_path):
    """Two processes ask for `tiny-lm` in an empty cache at once: one builds it, the other waits for it (a lock next to
    the directory), and both load the same complete checkpoint."""
    env = {**os.environ, "SFTVSRL_CACHE": str(tmp_path), "PYTHONPATH": ROOT}
    code = "import common; model, tok = common.load_model('tiny-lm', vl_task=False); print('loaded', type(model).__name__)"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("loaded LlamaForCausalLM" in out for out in outs), outs
    # one make_models.py run builds it; the other process waited and never started one (without the lock it starts
    # its own, which finds the directory written meanwhile: "(exists)"; a model that takes minutes is built twice)
    assert sum(out.count("tiny-lm: building") for out in outs) == 1 and "(exists)" not in "".join(outs), outs
    assert sorted(p.name for p in tmp_path.iterdir()) == [common.PREPARED["tiny-lm"], common.PREPARED["tiny-lm"] + ".lock"]


def test_a_model_saved_meanwhile_by_another_build_is_kept(tmp_path, monkeypatch):
    """make_models.save: a complete directory that appeared during this build stays (no window without it); --force
    and a damaged directory are replaced whole."""
    import make_models
    monkeypatch.setattr(make_models, "CACHE_DIR", str(tmp_path))
    model, tok = make_models.build_tiny(False)
    path = tmp_path / common.PREPARED["tiny-lm"]
    path.mkdir()
    (path / "config.json").write_text("{}")  # theirs, complete
    assert make_models.save(model, tok, "tiny-lm") == (str(path), False)
    assert (path / "config.json").read_text() == "{}" and not (path / "model.safetensors").exists()
    assert make_models.save(model, tok, "tiny-lm", force=True) == (str(path), True)
    assert (path / "model.safetensors").exists()
    (path / "config.json").unlink()  # damaged: replaced although not forced
    make_models.save(model, tok, "tiny-lm")
    assert (path / "config.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
