"""Tests for ppo_virl.py: the action split and the prompt rebuilding rules as unit tests, bad input in-process, then
CleanRL-style subprocess runs on a tiny model (virl-l with the auto SFT init and --resume, virl-vl, 2-process gloo)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import common
import ppo_virl as ppo
from make_models import char_tokenizer
from envs import NavigationEnv
from make_virl_world import generate_virl_world


def resolve_init(args, distributed: bool) -> str:
    """ppo_virl.py's --model-path resolution (common.resolve_init_checkpoint) for these Args."""
    return common.resolve_init_checkpoint(args.model_path, args.task, args.init_fallback, args.init_sft_args,
                                          distributed)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-envs", "2", "--num-steps", "1", "--update-epochs", "1", "--micro-batch-size", "2",
        "--max-new-tokens", "8"]


def run(cmd: list, cwd, check=True, timeout=400):
    # one thread per process: on a busy 2-core machine two spinning OpenMP threads made generate() 30x slower
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)):
        return b == pytest.approx(a, rel=1e-4, abs=1e-6, nan_ok=True)
    return a == b


def records(cwd, prefix: str) -> list:
    (run_dir,) = [d for d in (cwd / "runs").iterdir() if d.name.startswith(prefix)]
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small generated world in the official file format: 4 training and 2 held-out routes, 128x64 panoramas."""
    d = tmp_path_factory.mktemp("virl_world")
    paths = generate_virl_world(d, num_routes=4, num_heldout_routes=2, grid_size=4, pano_size=(128, 64))
    return paths


def data_args(paths: dict, visual_ood: bool = False) -> list:
    args = ["--route-info-path", paths["route_info_path"], "--gps-to-pano-path", paths["gps_to_pano_path"],
            "--panorama-dir", paths["panorama_dir"], "--heldout-route-info-path", paths["heldout_route_info_path"]]
    if visual_ood:  # the held-out routes stand in for the 18 VLN-mini routes (saves generating that world)
        args += ["--visual-ood-route-info-path", paths["heldout_route_info_path"],
                 "--visual-ood-gps-to-pano-path", paths["gps_to_pano_path"],
                 "--visual-ood-panorama-dir", paths["panorama_dir"]]
    return args


# ---- the action split at the "action" key (protocol.md §4.3) ----
def check_split(tok):
    env = NavigationEnv(world="nyc")
    for seed in range(3):
        env.reset(seed=seed)
        for pair in env.expert_pairs()[:4]:
            ids = tok(pair["response"] + tok.eos_token, add_special_tokens=False)["input_ids"]
            cot, answer = ppo.action_masks(tok, ids, ppo.ANSWER_KEY, skip_first_tokens=2)
            assert all(c + a <= 1 for c, a in zip(cot, answer))  # each token in at most one part
            assert cot[:2] == [0.0, 0.0] and all(c + a == 1 for c, a in zip(cot[2:], answer[2:]))  # o_0, o_1 skipped
            action_text = tok.decode([i for i, a in zip(ids, answer) if a])
            thought_text = tok.decode([i for i, c in zip(ids, cot) if c])
            action = pair["response"].split('"action": "')[1].split('"')[0]  # e.g. turn_direction(northeast)
            assert '"action"' in action_text and action in action_text and action_text.endswith(tok.eos_token)
            assert '"action"' not in thought_text and action not in thought_text
            assert '"current instruction"' in thought_text
            # the official defect: the last 5 tokens, whatever the text; the action itself lands in the thought
            cot5, answer5 = ppo.action_masks(tok, ids, ppo.ANSWER_KEY, 2, official_action_split=True)
            assert answer5 == [0.0] * (len(ids) - 5) + [1.0] * 5
            assert '"action": "' + action[:-2] in tok.decode([i for i, c in zip(ids, cot5) if c])
    # no key at all: the official fallback (last 5 tokens) in both modes
    ids = tok("forward() is what I would do" + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert ppo.action_masks(tok, ids, ppo.ANSWER_KEY, 2)[1] == [0.0] * (len(ids) - 5) + [1.0] * 5


def test_action_split_char_tokenizer():
    check_split(char_tokenizer())


def test_action_split_smollm2_bpe(smollm2_tokenizer):
    check_split(smollm2_tokenizer)


# ---- prompt rebuilding (protocol.md §2.7): what the trainer feeds the model ----
def test_prompt_fresh_after_correct_move_running_conversation_after_wrong(world):
    tok = char_tokenizer()
    env = NavigationEnv(route_info_path=world["route_info_path"], gps_to_pano_path=world["gps_to_pano_path"],
                        panorama_dir=world["panorama_dir"], seed=0)
    obs, info = env.reset(seed=3)
    first_prompt = ppo.encode_prompts(tok, [obs], "virl-l")[0]["prompt_ids"]
    wrong = env.oracle_response().replace(info["gt_action"], "stop()" if info["gt_action"] != "stop()" else "forward()")
    obs, reward, terminated, truncated, info = env.step(wrong)
    assert reward < 0 and not (terminated or truncated)
    # wrong answer: the running conversation = the same first prompt + the answer + the feedback turn
    assert [m["role"] for m in obs["messages"]] == ["user", "assistant", "user"]
    assert obs["messages"][1]["content"] == wrong
    assert obs["messages"][2]["content"].startswith("You failed this trial because")
    retry = ppo.encode_prompts(tok, [obs], "virl-l")[0]["prompt_ids"]
    text = tok.decode(retry)
    assert retry[: len(first_prompt)] == first_prompt  # the first prompt (up to "assistant\n") is kept as is
    assert wrong in text and "You failed this trial because" in text
    gt = info["gt_action"]
    obs, reward, terminated, truncated, info = env.step(env.oracle_response())  # correct on the 2nd attempt
    assert reward == 1 and info["is_correct"]
    # correct move: a fresh single-turn prompt with the updated O_i/A_i history, no trace of the failed exchange
    assert [m["role"] for m in obs["messages"]] == ["user"]
    fresh = tok.decode(ppo.encode_prompts(tok, [obs], "virl-l")[0]["prompt_ids"])
    assert f"A_1: {gt}\nO_2: " in fresh and "You failed" not in fresh and wrong not in fresh
    # two wrong answers at one point, then the third call: forced -1 and the episode is over (2 attempts per point)
    for expect_over in (False, False, True):
        obs, reward, terminated, truncated, info = env.step("no json here")
        assert reward in (-1, -1.5) and (terminated or truncated) == expect_over and not info["is_correct"]
    assert info["outcome"] == "STEP_LIMIT"


def test_vl_prompt_carries_the_grid_of_the_current_point(world):
    _, processor = ppo.load_model("tiny", vl_task=True)
    env = NavigationEnv(route_info_path=world["route_info_path"], gps_to_pano_path=world["gps_to_pano_path"],
                        panorama_dir=world["panorama_dir"], language_only=False, resolution=32, crop_size=None)
    obs, _ = env.reset(seed=1)
    assert obs["image"].size == (2 * 32 + 5, 2 * 32 + 5)  # the 2x2 view grid with 5 px separators
    (sample,) = ppo.encode_prompts(processor, [obs], "virl-vl")
    assert "pixel_values" in sample["extra"]
    image_id = ppo.tokenizer_of(processor).convert_tokens_to_ids("<image>")
    assert sample["prompt_ids"].count(image_id) == 16  # the tiny VL model's image tokens, once per prompt
    obs, *_ = env.step(env.oracle_response())  # next point: a new grid, still one image in a fresh prompt
    (sample,) = ppo.encode_prompts(processor, [obs], "virl-vl")
    assert sample["prompt_ids"].count(image_id) == 16


# ---- bad input stops with one message before any model is loaded ----
def test_bad_data_stops_before_the_model(tmp_path, world):
    bad = tmp_path / "routes.json"
    bad.write_text(json.dumps({"routes": []}))
    cases = [
        (dict(route_info_path=str(tmp_path / "missing.json"), gps_to_pano_path=world["gps_to_pano_path"]),
         "not found"),
        (dict(route_info_path=str(bad), gps_to_pano_path=world["gps_to_pano_path"]), "wrong format"),
        (dict(route_info_path=world["route_info_path"]), "--gps-to-pano-path"),
        (dict(task="virl-vl", route_info_path=world["route_info_path"], gps_to_pano_path=world["gps_to_pano_path"]),
         "panorama_dir"),
        (dict(task="virl-vl", visual_ood_route_info_path=world["route_info_path"]), "--visual-ood-panorama-dir"),
    ]
    for kwargs, message in cases:
        with pytest.raises(SystemExit, match=message):
            ppo.check_data(ppo.Args(**kwargs))
    # the whole script: one line, no traceback, and the data error comes before the (missing) checkpoint's
    out = run([sys.executable, os.path.join(ROOT, "ppo_virl.py"), "--route-info-path", str(bad),
               "--gps-to-pano-path", world["gps_to_pano_path"], "--model-path", str(tmp_path / "no_ckpt")],
              tmp_path, check=False)
    assert out.returncode != 0 and "wrong format" in out.stderr and "Traceback" not in out.stderr
    assert "no_ckpt" not in out.stderr


def test_missing_sft_checkpoint_with_error_fallback(tmp_path):
    args = ppo.Args(init_fallback="error")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(SystemExit, match="python sft.py --task virl-l"):
            resolve_init(args, distributed=False)
        assert resolve_init(ppo.Args(init_fallback="base"), distributed=False) == "smollm2"
        os.makedirs("runs/virl-l__sft__1__123/final")
        open("runs/virl-l__sft__1__123/final/config.json", "w").write("{}")
        assert resolve_init(args, distributed=False) == "runs/virl-l__sft__1__123/final"  # plain sft.py run
    finally:
        os.chdir(cwd)


# ---- end to end ----
def test_e2e_virl_l_auto_sft_init_and_resume_continues_identically(tmp_path):
    """`python ppo_virl.py` with no SFT checkpoint builds it with sft.py (tiny here), trains 2 updates on the
    generated world, then --resume from update 1 reproduces update 2."""
    script = os.path.join(ROOT, "ppo_virl.py")
    out = run([sys.executable, script, *TINY, "--num-updates", "2", "--eval-every", "2", "--eval-episodes", "2",
               "--eval-max-turns", "3",
               "--init-sft-args=--model-path tiny --total-steps 1 --micro-batch-size 2 --eval-every 0"], tmp_path)
    assert "building it first" in out.stdout
    assert (tmp_path / "runs" / "sft-virl-l-default" / "final" / "config.json").exists()
    recs = [r for r in records(tmp_path, "virl-l__") if "losses/pg_loss" in r]
    assert [r["update"] for r in recs] == [1, 2]
    assert recs[0]["losses/first_minibatch_approx_kl"] < 1e-6  # ratio == 1 before the first optimizer step
    assert recs[0]["charts/learning_rate"] == pytest.approx(1e-6)  # the official V-IRL-L rate
    for key in ("losses/approx_kl", "losses/clipfrac", "losses/explained_variance", "losses/grad_norm",
                "rollout/step_accuracy", "rollout/success_rate", "rollout/outcome/INCORRECT_ACTION",
                "rollout/outcome/STEP_LIMIT", "compute/env_steps", "compute/tokens_trained", "compute/flops"):
        assert key in recs[0], key
    evals = [r for r in records(tmp_path, "virl-l__") if "eval/rule_ood/step_accuracy" in r]
    assert [r["update"] for r in evals] == [0, 2]
    assert {"eval/id/step_accuracy", "eval/id/success_rate", "eval/rule_ood/success_rate",
            "compute/flops"} <= set(evals[0])
    (run_dir,) = [d for d in (tmp_path / "runs").iterdir() if d.name.startswith("virl-l__")]
    ckpt = run_dir / "checkpoints" / "update_0001"
    assert {"model.safetensors", "value_head.pt", "optimizer.pt", "trainer_state.json"} <= set(os.listdir(ckpt))
    first = [r for r in records(tmp_path, "virl-l__") if "eval/id/step_accuracy" not in r or r["update"] < 2]
    run([sys.executable, script, "--resume", str(ckpt), "--num-updates", "2", "--eval-every", "0"], tmp_path)
    resumed = records(tmp_path, "virl-l__")  # update 2 again, without its evaluation: no duplicate rows
    assert [r["update"] for r in resumed] == [r["update"] for r in first]
    for a, b in zip(first, resumed):
        assert a.keys() == b.keys()
        for key in a:
            if not key.startswith("charts/") or key == "charts/learning_rate":  # the rest are timings
                assert same(a[key], b[key]), (a["update"], key, a[key], b[key])


def test_e2e_virl_vl(tmp_path, world):
    run([sys.executable, os.path.join(ROOT, "ppo_virl.py"), "--task", "virl-vl", "--model-path", "tiny", *TINY,
         "--num-updates", "2", "--resolution", "32", "--eval-every", "2", "--eval-episodes", "2",
         "--eval-max-turns", "2", "--save-every", "0", *data_args(world, visual_ood=True)], tmp_path)
    recs = records(tmp_path, "virl-vl__")
    train = [r for r in recs if "losses/pg_loss" in r]
    assert [r["update"] for r in train] == [1, 2] and train[0]["losses/first_minibatch_approx_kl"] < 1e-6
    assert train[0]["charts/learning_rate"] == pytest.approx(1e-7)  # the official V-IRL-VL rate
    assert "eval/visual_ood/step_accuracy" in recs[-1] and "eval/visual_ood/success_rate" in recs[-1]


def test_two_process_gloo_fsdp(tmp_path, world):
    run(["torchrun", "--standalone", "--nproc_per_node", "2", os.path.join(ROOT, "ppo_virl.py"),
         "--model-path", "tiny", *TINY, "--num-updates", "1", "--dist", "fsdp", "--eval-every", "1",
         "--eval-episodes", "2", "--eval-max-turns", "1", "--official-action-split", *data_args(world)], tmp_path)
    recs = records(tmp_path, "virl-l__")
    (rec,) = [r for r in recs if "losses/pg_loss" in r]
    assert rec["compute/env_steps"] == 4 and rec["losses/first_minibatch_approx_kl"] < 1e-6
    assert [r["update"] for r in recs if "eval/id/step_accuracy" in r] == [0, 1]
    (run_dir,) = list((tmp_path / "runs").iterdir())
    assert os.path.exists(run_dir / "checkpoints" / "update_0001" / "optimizer_rank1.pt")


# ---- issue 15: an env error is a failed step; an interrupted SFT build is continued, not restarted ----
RAISE_ONCE = """import runpy, sys, envs
real, calls = envs.NavigationEnv.step, []
def step(self, text):
    calls.append(text)
    if len(calls) == 1:
        raise KeyError("injected")
    return real(self, text)
envs.NavigationEnv.step = step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_env_error_is_a_failed_step_not_the_end_of_the_run(tmp_path, world):
    out = run([sys.executable, "-c", RAISE_ONCE, os.path.join(ROOT, "ppo_virl.py"), "--model-path", "tiny", *TINY,
               "--num-updates", "2", "--eval-every", "0", "--save-every", "0", *data_args(world)], tmp_path)
    assert "env error on instance" in out.stdout and "KeyError" in out.stdout
    recs = records(tmp_path, "virl-l__")
    train = [r for r in recs if "losses/pg_loss" in r]
    assert [r["update"] for r in train] == [1, 2]
    assert train[0]["rollout/outcome/ENV_ERROR"] == 1 and train[1]["rollout/outcome/ENV_ERROR"] == 0
    (sample,) = [r for r in recs if "env_error" in r]
    assert sample["reward"] == ppo.ENV_ERROR_REWARD == -1.5 and sample["env_error"].startswith("KeyError")
    assert isinstance(sample["response"], str) and sample["instance_id"]


def test_evaluate_survives_env_errors(world, monkeypatch):
    import transformers

    model, tok = ppo.load_model("tiny", vl_task=False)
    agent = ppo.Agent(model).eval()

    def broken(self, text):
        raise RecursionError("injected")

    monkeypatch.setattr(NavigationEnv, "step", broken)
    args = ppo.Args(model_path="tiny", eval_episodes=2, route_info_path=world["route_info_path"],
                    gps_to_pano_path=world["gps_to_pano_path"], panorama_dir=world["panorama_dir"],
                    heldout_route_info_path=world["heldout_route_info_path"])
    gen_config = transformers.GenerationConfig(do_sample=False, max_new_tokens=4, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    metrics = ppo.evaluate(agent, tok, args, gen_config, "cpu", 0, 1, False)
    assert metrics["eval/id/success_rate"] == 0 and metrics["eval/id/step_accuracy"] == 0
    assert metrics["eval/id/steps_per_episode"] == 1  # one failed step ends the episode


def test_interrupted_auto_sft_build_is_resumed(tmp_path, monkeypatch):
    """runs/sft-virl-l-default without final/: continued with `sft.py --resume` (sft.py refuses to write into an
    existing run directory otherwise); without any checkpoint to resume: one line; a lone final.old: renamed back."""
    monkeypatch.chdir(tmp_path)
    sft_args = "--model-path tiny --total-steps 2 --micro-batch-size 2 --eval-every 0 --save-every 1"
    run_dir = tmp_path / "runs" / "sft-virl-l-default"
    os.makedirs(run_dir)
    with pytest.raises(SystemExit, match="saved nothing to resume"):
        resolve_init(ppo.Args(init_sft_args=sft_args), distributed=False)
    os.rmdir(run_dir)
    run([sys.executable, os.path.join(ROOT, "sft.py"), "--task", "virl-l", "--run-name", "sft-virl-l-default",
         *sft_args.split()], tmp_path)
    shutil.rmtree(run_dir / "final")  # killed before its final save: step_1/ is there
    first = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert resolve_init(ppo.Args(init_sft_args=sft_args), distributed=False) == \
        os.path.join("runs", "sft-virl-l-default", "final")
    assert json.load(open(run_dir / "final" / "trainer_state.json"))["step"] == 2
    resumed = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in resumed] == [r["step"] for r in first]  # step 2 again, no duplicate row
    os.rename(run_dir / "final", run_dir / "final.old")  # killed between the renames of a re-save of final/
    assert resolve_init(ppo.Args(init_fallback="error"), distributed=False) == \
        os.path.join("runs", "sft-virl-l-default", "final")
    assert (run_dir / "final" / "config.json").exists() and not (run_dir / "final.old").exists()
