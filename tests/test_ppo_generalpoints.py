"""Tests for ppo_generalpoints.py: numerical unit tests on the PPO pieces, then CleanRL-style subprocess runs."""
import copy
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import transformers

import common
import ppo_generalpoints as ppo
from envs import GeneralPointsEnv
from make_models import char_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model-path", "tiny", "--num-envs", "2", "--num-steps", "1", "--update-epochs", "1", "--micro-batch-size",
        "2", "--max-new-tokens", "8", "--eval-every", "0"]
LP = dict(temperature=0.2, thought_prob_coef=0.5)  # how log pi is computed (get_logprob_and_value's arguments)
RESPONSE = '\n{\n  "cards": [\'A\', \'3\', \'K\', \'6\'],\n  "number": [1, 3, 10, 6],\n  "formula": "(1+3)*6=24",\n}'


def run(cmd: list, tmp_path, check=True, timeout=300):
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PYTHONPATH": ROOT})
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def records(tmp_path) -> list:
    (run_dir,) = [d for d in (tmp_path / "runs").iterdir()]
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)):
        return b == pytest.approx(a, rel=1e-4, abs=1e-6, nan_ok=True)
    return a == b


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, processor = ppo.load_model("tiny", vl_task=False)
    agent = ppo.Agent(model).eval()
    return agent, processor


def test_gae_matches_naive_reference():
    rng = np.random.default_rng(0)
    T, N, gamma, lam = 7, 3, 0.9, 0.95
    rewards, values = torch.tensor(rng.normal(size=(T, N))), torch.tensor(rng.normal(size=(T, N)))
    dones = torch.tensor(rng.random((T, N)) < 0.3, dtype=torch.float64)
    next_value, next_done = torch.tensor(rng.normal(size=N)), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    adv, ret = ppo.compute_gae(rewards, values, dones, next_value, next_done, gamma, lam)
    all_values = torch.cat([values, next_value[None]])  # V_0..V_T
    all_dones = torch.cat([dones, next_done[None]])  # d_0..d_T (d_t: obs t starts a new episode)
    for i in range(N):
        for t in range(T):  # A_t = sum_k (gamma lam)^k delta_{t+k}, stopping at the episode boundary
            a, discount = 0.0, 1.0
            for k in range(t, T):
                nonterminal = 1.0 - all_dones[k + 1, i]
                delta = rewards[k, i] + gamma * all_values[k + 1, i] * nonterminal - values[k, i]
                a += discount * delta
                discount *= gamma * lam * nonterminal
                if nonterminal == 0:
                    break
            assert abs(adv[t, i] - a) < 1e-10
    assert torch.allclose(ret, adv + values)


def test_lr_schedule_is_a_pure_cosine():
    assert ppo.lr_at(0, 1e-6, 1e-9, 100) == pytest.approx(1e-6)
    assert ppo.lr_at(50, 1e-6, 1e-9, 100) == pytest.approx((1e-6 + 1e-9) / 2)
    assert ppo.lr_at(100, 1e-6, 1e-9, 100) == pytest.approx(1e-9) and ppo.lr_at(150, 1e-6, 1e-9, 100) == pytest.approx(1e-9)


def check_split(tok):
    ids = tok(RESPONSE, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    m = ppo.answer_start(tok, ids, ppo.ANSWER_KEY)
    assert '"formula"' not in tok.decode(ids[:m]) and tok.decode(ids[m:]).lstrip().startswith('"formula": "(1+3)*6')
    cot, answer = ppo.action_masks(tok, ids, ppo.ANSWER_KEY, skip_first_tokens=2)
    assert cot[:2] == [0, 0] and all(c + a <= 1 for c, a in zip(cot, answer))  # each token counted at most once
    assert sum(cot) + sum(answer) == len(ids) - 2 and answer[-1] == 1  # o_0, o_1 unscored; eos in the answer
    cot, answer = ppo.action_masks(tok, ids, ppo.ANSWER_KEY, skip_first_tokens=0)
    assert sum(cot) + sum(answer) == len(ids)
    no_key = tok("just some text without the key, long enough", add_special_tokens=False)["input_ids"]
    assert ppo.answer_start(tok, no_key, ppo.ANSWER_KEY) is None
    assert sum(ppo.action_masks(tok, no_key, ppo.ANSWER_KEY, 0)[1]) == 5  # official fallback


def test_cot_answer_split_char_tokenizer():
    check_split(char_tokenizer())


def test_cot_answer_split_smollm2_bpe(smollm2_tokenizer):
    check_split(smollm2_tokenizer)


def prompts_of(processor, seeds, turns=0):
    obs = []
    for s in seeds:
        env = GeneralPointsEnv(seed=s)
        o, _ = env.reset()
        for _ in range(turns):
            o, *_ = env.step("no formula here")
        obs.append(o)
    return ppo.encode_prompts(processor, obs, "gp-l")


def test_value_read_at_last_prompt_token_under_left_padding(tiny):
    agent, processor = tiny
    short, long_ = prompts_of(processor, [1])[0], prompts_of(processor, [2], turns=2)[0]
    assert len(long_["prompt_ids"]) > len(short["prompt_ids"])
    pad = ppo.tokenizer_of(processor).pad_token_id
    s = [dict(p, response_ids=[5, 6, 7], cot_mask=[1, 0, 0], answer_mask=[0, 1, 1]) for p in (short, long_)]
    _, value_alone = ppo.score(agent, s[:1], pad, "cpu", 1, **LP)
    _, value_batched = ppo.score(agent, s, pad, "cpu", 2, **LP)  # `short` is left-padded here
    assert torch.allclose(value_alone, value_batched[:1], atol=1e-5)
    with torch.no_grad():  # reference: plain forward of the unpadded prompt, hidden state of its last token
        h = agent.policy(input_ids=torch.tensor([short["prompt_ids"]]), output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(agent.value_head(h[:, -1]), value_alone, atol=1e-5)


def test_token_in_token_out_and_first_minibatch_ratio_is_one(tiny):
    agent, processor = tiny
    lp = dict(LP, temperature=0.7)
    tok = ppo.tokenizer_of(processor)
    gen_config = transformers.GenerationConfig(do_sample=True, temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=12,
                                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    prompts = prompts_of(processor, [3, 4, 5], turns=1)
    torch.manual_seed(0)
    responses = ppo.generate(agent, processor, prompts, gen_config, ppo.PrefixCache(agent.policy), "cpu", False)
    samples = []
    for p, r in zip(prompts, responses):
        assert r["truncated"] == (len(r["response_ids"]) == 12 and r["response_ids"][-1] != tok.eos_token_id)
        cot, answer = ppo.action_masks(tok, r["response_ids"], ppo.ANSWER_KEY, 2)
        samples.append(dict(p, response_ids=r["response_ids"], cot_mask=cot, answer_mask=answer))
    torch.manual_seed(0)  # the reused KV cache does not change what is sampled
    unshared = ppo.generate(agent, processor, prompts, gen_config, None, "cpu", False)
    assert [r["response_ids"] for r in unshared] == [r["response_ids"] for r in responses]
    batch = ppo.collate(samples, tok.pad_token_id, "cpu")
    for i, s in enumerate(samples):  # the update batch holds exactly the generated ids
        n = len(s["response_ids"])
        assert batch["response_ids"][i, :n].tolist() == s["response_ids"]
    # rollout scoring one by one, update on a differently padded minibatch
    old_logprob, old_value = ppo.score(agent, samples, tok.pad_token_id, "cpu", 1, **lp)
    newlogprob, newvalue, _, _ = ppo.get_logprob_and_value(agent, ppo.collate(samples[::-1], tok.pad_token_id, "cpu"),
                                                           **lp)
    logratio = newlogprob.flip(0) - old_logprob
    approx_kl = ((logratio.exp() - 1) - logratio).mean()
    assert approx_kl < 1e-6 and torch.allclose(logratio.exp(), torch.ones(3), atol=1e-4)
    assert torch.allclose(newvalue.flip(0), old_value, atol=1e-5)


def test_check_finite_stops_with_a_message():
    with pytest.raises(SystemExit, match="non-finite loss"):
        ppo.check_finite("loss", torch.tensor(float("nan")), "update 1")


def test_bad_inputs_stop_with_one_clear_message(tmp_path):
    script = os.path.join(ROOT, "ppo_generalpoints.py")
    out = run([sys.executable, script, "--model-path", "tiny", "--num-envs", "3", "--num-steps", "1", "--micro-batch-size", "2"],
              tmp_path, check=False)
    assert out.returncode != 0 and "batch layout does not divide" in out.stderr and "Traceback" not in out.stderr
    out = run([sys.executable, script, "--model-path", str(tmp_path / "nope")], tmp_path, check=False)
    assert out.returncode != 0 and "python sft.py --task gp-l" in out.stderr
    model, tok = ppo.load_model("tiny", vl_task=False)
    model.save_pretrained(tmp_path / "text_ckpt")
    tok.save_pretrained(tmp_path / "text_ckpt")
    out = run([sys.executable, script, "--task", "gp-vl", "--model-path", str(tmp_path / "text_ckpt")], tmp_path,
              check=False)
    assert out.returncode != 0 and "text-only" in out.stderr and "Traceback" not in out.stderr
    tok.chat_template = None
    model.save_pretrained(tmp_path / "no_template")
    tok.save_pretrained(tmp_path / "no_template")
    os.remove(tmp_path / "no_template" / "chat_template.jinja") if (tmp_path / "no_template" / "chat_template.jinja"
                                                                    ).exists() else None
    out = run([sys.executable, script, "--model-path", str(tmp_path / "no_template")], tmp_path, check=False)
    assert out.returncode != 0 and "no chat template" in out.stderr


def test_e2e_gp_l_and_resume_continues_identically(tmp_path):
    script = os.path.join(ROOT, "ppo_generalpoints.py")
    run([sys.executable, script, "--task", "gp-l", *TINY, "--num-updates", "2"], tmp_path)
    recs = [r for r in records(tmp_path) if "losses/pg_loss" in r]
    assert [r["update"] for r in recs] == [1, 2]
    assert recs[0]["losses/first_minibatch_approx_kl"] < 1e-6  # ratio == 1 before the first optimizer step
    for key in ("losses/approx_kl", "losses/clipfrac", "losses/vf_clipfrac", "losses/explained_variance",
                "losses/grad_norm", "charts/learning_rate", "rollout/response_length", "rollout/truncated_frac",
                "rollout/success_rate", "rollout/outcome/ILLEGAL_FORMULA", "charts/SPS", "compute/flops"):
        assert key in recs[0], key
    assert any("response" in r for r in records(tmp_path))  # decoded samples
    (run_dir,) = list((tmp_path / "runs").iterdir())
    ckpt = run_dir / "checkpoints" / "update_0001"
    assert {"model.safetensors", "value_head.pt", "optimizer.pt", "trainer_state.json"} <= set(os.listdir(ckpt))
    # a crash: killed between the two renames of a re-save of update_0002 (only update_0002.old is left), and in the
    # middle of writing a metrics row
    first = records(tmp_path)
    os.rename(run_dir / "checkpoints" / "update_0002", run_dir / "checkpoints" / "update_0002.old")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"update": 3, "losses/pg_')
    run([sys.executable, script, "--resume", str(ckpt), "--num-updates", "2"], tmp_path)
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["update_0001", "update_0002"]  # .old renamed back, re-saved
    resumed = records(tmp_path)
    assert [r["update"] for r in resumed] == [r["update"] for r in first]  # no duplicate rows, no cut line
    for a, b in zip(first, resumed):  # update 2 again: identical to the uninterrupted run
        assert a.keys() == b.keys()
        for key in a:
            if not key.startswith("charts/") or key == "charts/learning_rate":  # the rest are timings
                assert same(a[key], b[key]), (a["update"], key, a[key], b[key])


def test_e2e_gp_vl(tmp_path):
    run([sys.executable, os.path.join(ROOT, "ppo_generalpoints.py"), "--task", "gp-vl", *TINY, "--num-updates", "2",
         "--image-size", "64", "--eval-every", "2", "--eval-episodes", "2", "--eval-verify-iter", "1",
         "--save-every", "0"], tmp_path)
    recs = records(tmp_path)
    assert [r["update"] for r in recs if "losses/pg_loss" in r] == [1, 2]
    evals = [r for r in recs if "eval/rule_ood/success_rate" in r]  # before the first update and after the last
    assert [r["update"] for r in evals] == [0, 2] and "compute/flops" in evals[-1]
    for split in ("id_seen", "id_unseen", "rule_ood", "visual_ood"):
        assert f"eval/{split}/success_rate" in evals[-1] and f"eval/{split}/recognition_acc" in evals[-1]


def test_two_process_gloo_fsdp(tmp_path):
    run(["torchrun", "--standalone", "--nproc_per_node", "2", os.path.join(ROOT, "ppo_generalpoints.py"),
         "--task", "gp-l", *TINY, "--num-updates", "1", "--dist", "fsdp"], tmp_path)
    (rec,) = [r for r in records(tmp_path) if "losses/pg_loss" in r]
    assert rec["compute/env_steps"] == 4 and rec["losses/first_minibatch_approx_kl"] < 1e-6
    (run_dir,) = list((tmp_path / "runs").iterdir())
    assert os.path.exists(run_dir / "checkpoints" / "update_0001" / "optimizer_rank1.pt")
    # --resume RUN under torchrun continues with the stored --dist fsdp (its optimizer shards)
    run(["torchrun", "--standalone", "--nproc_per_node", "2", os.path.join(ROOT, "ppo_generalpoints.py"),
         "--resume", str(run_dir), "--num-updates", "2"], tmp_path)
    assert [r["update"] for r in records(tmp_path) if "losses/pg_loss" in r] == [1, 2]
    assert os.path.exists(run_dir / "checkpoints" / "update_0002" / "optimizer_rank1.pt")


def test_kv_reuse_across_turns_samples_the_same_tokens_and_logprobs_from_sampling_match(tiny):
    """Turn 2 prompts extend the turn-1 conversations (verifier feedback): PrefixCache prefills only the new tokens,
    and the sampled tokens are those of a plain left-padded batch; the sampling-pass log-probs and values equal a
    fresh forward over the stored ids to float tolerance (detail #26)."""
    agent, processor = tiny
    tok = ppo.tokenizer_of(processor)
    gen_config = transformers.GenerationConfig(do_sample=True, temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=10,
                                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    answers, reused = {}, 0
    for cached in (False, True):
        envs = [GeneralPointsEnv(seed=s) for s in (7, 8, 9)]
        obs = [env.reset()[0] for env in envs]
        prefix_cache = ppo.PrefixCache(agent.policy) if cached else None
        answers[cached] = []
        for turn in range(3):
            prompts = ppo.encode_prompts(processor, obs, "gp-l")
            if cached and turn > 0:
                reused += sum(prefix_cache.match(np.asarray(p["prompt_ids"]))[1] for p in prompts)
            torch.manual_seed(turn)
            responses = ppo.generate(agent, processor, prompts, gen_config, prefix_cache, "cpu", False,
                                     with_logprobs=True)
            answers[cached].append([r["response_ids"] for r in responses])
            samples = []
            for p, r in zip(prompts, responses):
                cot, answer = ppo.action_masks(tok, r["response_ids"], ppo.ANSWER_KEY, 2)
                samples.append(dict(p, response_ids=r["response_ids"], cot_mask=cot, answer_mask=answer))
            _, value, token_logprobs, _ = ppo.get_logprob_and_value(agent, ppo.collate(samples, tok.pad_token_id, "cpu"),
                                                                    0.7, 0.5)
            for i, r in enumerate(responses):
                n = len(r["response_ids"])
                assert torch.allclose(r["token_logprobs"], token_logprobs[i, :n], atol=1e-4)
                assert torch.allclose(r["value"], value[i], atol=1e-4)
            obs = [env.step(tok.decode(r["response_ids"], skip_special_tokens=True))[0] for env, r in zip(envs, responses)]
    assert answers[True] == answers[False]
    assert reused > 3 * 2 * 500  # turns 2 and 3 reuse most of each ~600-character conversation


def test_chunked_generation_keeps_greedy_answers_and_aligns_sampling_logprobs(tiny):
    """--gen-chunk: rows still unfinished after a chunk go on alone. Greedy answers equal one generate call; sampled
    answers get log-probs (from the sampler's logits, chunk by chunk) equal to a fresh forward over the stored ids."""
    agent, processor = tiny
    tok = ppo.tokenizer_of(processor)
    prompts = ppo.encode_prompts(processor, [GeneralPointsEnv(seed=s).reset()[0] for s in (3, 4, 5, 6)], "gp-l")
    greedy = transformers.GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_id=tok.eos_token_id,
                                           pad_token_id=tok.pad_token_id)
    whole, chunked = (ppo.generate(agent, processor, prompts, greedy, ppo.PrefixCache(agent.policy, c), "cpu", False)
                      for c in (0, 5))
    assert [r["response_ids"] for r in whole] == [r["response_ids"] for r in chunked]
    assert [r["truncated"] for r in whole] == [r["truncated"] for r in chunked]
    sampling = transformers.GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=12,
                                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)  # multinomial: the scores of each chunk (InverseCDFSampler records one call's batch)
    responses = ppo.generate(agent, processor, prompts, sampling, ppo.PrefixCache(agent.policy, 5), "cpu", False,
                             with_logprobs=True, inverse_cdf=False)
    samples = [dict(p, response_ids=r["response_ids"], cot_mask=[1.0] * len(r["response_ids"]),
                    answer_mask=[0.0] * len(r["response_ids"])) for p, r in zip(prompts, responses)]
    _, value, token_logprobs, _ = ppo.get_logprob_and_value(agent, ppo.collate(samples, tok.pad_token_id, "cpu"),
                                                            1.0, 1.0)
    assert any(len(r["response_ids"]) > 5 for r in responses)  # some rows did go on past the first chunk
    for i, r in enumerate(responses):
        assert len(r["response_ids"]) <= 12 and len(r["token_logprobs"]) == len(r["response_ids"])
        assert torch.allclose(r["token_logprobs"], token_logprobs[i, :len(r["response_ids"])], atol=1e-4)
        assert torch.allclose(r["value"], value[i], atol=1e-4)


# ---- issue 15: nothing a model writes or a user types ends a run, corrupts a result or mixes two runs ----
RAISE_ONCE = """import runpy, sys, envs
real, calls = envs.{cls}.step, []
def step(self, text):
    calls.append(text)
    if len(calls) == {n}:
        raise RecursionError("maximum recursion depth exceeded (injected)")
    return real(self, text)
envs.{cls}.step = step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_env_error_is_a_failed_step_not_the_end_of_the_run(tmp_path):
    """env.step raises on the first answer of the rollout: that step gets the lowest reward and outcome ENV_ERROR,
    its episode is reset, the answer is logged in full, and the run goes on to its end (detail #28)."""
    out = run([sys.executable, "-c", RAISE_ONCE.format(cls="GeneralPointsEnv", n=1),
               os.path.join(ROOT, "ppo_generalpoints.py"), *TINY, "--num-updates", "2"], tmp_path)
    assert "env error on instance" in out.stdout and "RecursionError" in out.stdout
    recs = records(tmp_path)
    train = [r for r in recs if "losses/pg_loss" in r]
    assert [r["update"] for r in train] == [1, 2]
    assert train[0]["rollout/outcome/ENV_ERROR"] == 1 and train[1]["rollout/outcome/ENV_ERROR"] == 0
    assert train[0]["rollout/episodes"] >= 1  # the failed episode ended (and was reset)
    (sample,) = [r for r in recs if "env_error" in r]
    assert sample["update"] == 1 and sample["reward"] == ppo.ENV_ERROR_REWARD == -3
    assert sample["env_error"].startswith("RecursionError") and isinstance(sample["response"], str)
    env = GeneralPointsEnv()  # the logged answer replays on a fresh env (the patched step was the only fault)
    env.reset(seed=0)
    env.step(sample["response"])


def test_evaluate_survives_env_errors(tiny, monkeypatch):
    """Evaluation with an env that raises on every answer: every episode is a failed one, no exception."""
    agent, processor = tiny
    tok = ppo.tokenizer_of(processor)

    def broken(self, text):
        raise ValueError("Exceeds the limit (4300 digits) for integer string conversion (injected)")

    monkeypatch.setattr(GeneralPointsEnv, "step", broken)
    args = ppo.Args(model_path="tiny", eval_episodes=2, eval_verify_iter=2)
    gen_config = transformers.GenerationConfig(do_sample=False, max_new_tokens=4, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    metrics = ppo.evaluate(agent, processor, args, gen_config, "cpu", 0, 1, False)
    assert metrics and all(v == 0 for v in metrics.values())


def test_interrupted_resave_is_recovered(tiny, tmp_path, monkeypatch):
    """A kill between the two renames of a re-save (update_XXXX -> .old, .tmp -> update_XXXX) leaves a complete copy
    under update_XXXX.old; resuming renames it back. A kill after both renames leaves an .old that is deleted."""
    agent, processor = tiny
    optimizer = torch.optim.Adam(agent.parameters())
    ckpts = tmp_path / "run" / "checkpoints"
    path = str(ckpts / "update_0002")
    os.makedirs(ckpts)
    ppo.save_ppo_checkpoint(path, agent, processor, optimizer, {"step": 2, "copy": "first"}, {}, 0, 1, False)
    complete = set(os.listdir(path))
    assert {"model.safetensors", "value_head.pt", "optimizer.pt", "trainer_state.json", "rank0_state.pkl"} <= complete
    real, calls = os.replace, []

    def killed_at_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_second_rename)
    with pytest.raises(KeyboardInterrupt):
        ppo.save_ppo_checkpoint(path, agent, processor, optimizer, {"step": 2, "copy": "second"}, {}, 0, 1, False)
    monkeypatch.undo()
    assert sorted(os.listdir(ckpts)) == ["update_0002.old", "update_0002.tmp"]
    assert set(os.listdir(path + ".old")) == complete  # a complete copy at every moment
    assert common.resolve_resume(str(tmp_path / "run")) == path  # --resume RUN renames it back
    assert json.load(open(os.path.join(path, "trainer_state.json")))["copy"] == "first"
    shutil.copytree(path, path + ".old")  # killed after both renames, before the old copy was deleted
    assert common.resolve_resume(path) == path and not os.path.exists(path + ".old")
    ppo.save_ppo_checkpoint(path, agent, processor, optimizer, {"step": 2, "copy": "third"}, {}, 0, 1, False)
    assert sorted(os.listdir(ckpts)) == ["update_0002"]  # the next save clears the stale .tmp
    assert json.load(open(os.path.join(path, "trainer_state.json")))["copy"] == "third"


def test_save_refuses_non_finite_weights(tiny, tmp_path):
    agent, processor = tiny
    broken = ppo.Agent(copy.deepcopy(agent.policy))
    with torch.no_grad():
        broken.value_head.net[0].weight[0, 0] = float("inf")
    with pytest.raises(SystemExit, match="not finite"):
        ppo.save_ppo_checkpoint(str(tmp_path / "update_0001"), broken, processor, torch.optim.Adam(
            broken.parameters()), {}, {}, 0, 1, False)
    assert not os.listdir(tmp_path)


def test_run_directories_are_never_shared(tmp_path, monkeypatch):
    """Two runs with the same exp-name and seed started in the same second get two directories."""
    monkeypatch.chdir(tmp_path)
    first, second = common.new_run_dir("gp-l__x__1__123"), common.new_run_dir("gp-l__x__1__123")
    assert (first, second) == (os.path.join("runs", "gp-l__x__1__123"), os.path.join("runs", "gp-l__x__1__123__2"))
    assert common.resume_flags(["--resume", "r", "--num-updates=4", "--no-track", "--lr", "1", "--lr=2", "--top_k",
                             "3"]) == (["resume", "num_updates", "track"], ["--lr", "--top-k"])
