"""PPO learns, end to end (issue 17): ppo_generalpoints.py on the tiny random model must raise the mean reward of an
easy test-only reward, a control at learning rate ~0 must not, and the same run with the policy-gradient sign flipped
must not either; and --eval-every must leave the training untouched.

The test-only reward is injected from here, never in the product scripts: a wrapper written by the test replaces
GeneralPointsEnv.step's reward by the fraction of the answer's characters that are digits (the env still runs its
verifier, so outcomes and probes are logged as usual) and the prompt by a short one (the tiny model's forward over the
~800-character GP prompt would make an update 3-4x slower; what is tested is the update, not the prompt), then runs
the script with runpy as __main__. Episodes are single-turn (--no-enable-verification): advantage = reward - V(s).
The tiny model starts at ~0.12 (digits are 10 of its characters) and can move that quickly at temperature 1.
Every run is seeded and the env streams do not depend on the policy, so runs see the same hands at every update."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRAPPER = '''import runpy, sys
import envs
step = envs.GeneralPointsEnv.step
def digit_step(self, text):  # the test-only reward: the fraction of the answer's characters that are digits
    obs, _, terminated, truncated, info = step(self, text)
    return obs, sum(c.isdigit() for c in text) / max(len(text), 1), terminated, truncated, info
envs.GeneralPointsEnv.step = digit_step
envs.GeneralPointsEnv._prompt = lambda self: f"Cards: {self.cards}. Write digits."
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''
LEARN = ["--no-enable-verification", "--num-envs", "16", "--num-steps", "1", "--micro-batch-size", "16",
         "--max-new-tokens", "16", "--temperature", "1.0", "--num-updates", "10", "--eval-every", "0",
         "--save-every", "100"]
K, MARGIN = 3, 0.08  # mean reward of the last K updates vs the first K (and vs the control), in reward units
FLIP = [("pg_loss1 = -mb_adv * ratio", "pg_loss1 = mb_adv * ratio"),
        ("pg_loss2 = -mb_adv * torch.clamp(", "pg_loss2 = mb_adv * torch.clamp(")]


def tiny_path() -> str:
    sys.path.insert(0, ROOT)
    from common import prepared_path
    return prepared_path("tiny", False)  # built once by make_models.py; a copied script cannot find make_models.py


def run(tmp_path, script: str, *flags, reward: bool = True) -> list[dict]:
    """Runs `script` (through the reward wrapper if `reward`) in tmp_path -> the rows of its metrics.jsonl."""
    wrapper = tmp_path / "digit_reward.py"
    wrapper.write_text(WRAPPER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, *([str(wrapper)] if reward else []), script, "--model-path", tiny_path(), *flags]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (metrics,) = [os.path.join(d, "metrics.jsonl") for d, _, files in os.walk(tmp_path / "runs")
                  if "metrics.jsonl" in files]
    rows = [json.loads(line) for line in open(metrics)]
    shutil.rmtree(tmp_path / "runs")
    return rows


def rewards(rows: list[dict]) -> list[float]:
    return [r["rollout/reward_mean"] for r in rows if "rollout/reward_mean" in r]


def rise(r: list[float]) -> float:
    return sum(r[-K:]) / K - sum(r[:K]) / K


@pytest.fixture(scope="module")
def control(tmp_path_factory) -> list[float]:
    """The same run at a learning rate below float32 resolution (steps of ~1e-30): the weights cannot move measurably
    (--lr 0 is refused by check_args)."""
    return rewards(run(tmp_path_factory.mktemp("control"), os.path.join(ROOT, "ppo_generalpoints.py"), *LEARN,
                       "--lr", "1e-30", "--end-lr", "0"))


def test_ppo_raises_the_reward_and_the_control_does_not(tmp_path, control):
    trained = rewards(run(tmp_path, os.path.join(ROOT, "ppo_generalpoints.py"), *LEARN, "--lr", "1e-3"))
    print(f"trained {[round(x, 3) for x in trained]}\ncontrol {[round(x, 3) for x in control]}")
    assert trained[0] == control[0]  # the first rollout precedes every update
    assert rise(trained) > MARGIN and sum(trained[-K:]) / K - sum(control[-K:]) / K > MARGIN, (trained, control)
    assert abs(rise(control)) < MARGIN, control


def test_flipped_policy_gradient_sign_does_not_learn(tmp_path, control):
    """The acceptance check that the learning test can fail: the same run with -mb_adv -> +mb_adv in the surrogate."""
    source = open(os.path.join(ROOT, "ppo_generalpoints.py")).read()
    for old, new in FLIP:
        assert source.count(old) == 1, f"the policy loss changed: update FLIP ({old!r} not found once)"
        source = source.replace(old, new)
    flipped = tmp_path / "ppo_flipped.py"
    flipped.write_text(source)
    r = rewards(run(tmp_path, str(flipped), *LEARN, "--lr", "1e-3"))
    print(f"flipped {[round(x, 3) for x in r]}\ncontrol {[round(x, 3) for x in control]}")
    assert r[0] == control[0]
    assert rise(r) < MARGIN / 2 and sum(r[-K:]) / K <= sum(control[-K:]) / K, (r, control)


@pytest.mark.parametrize("script", ["ppo_generalpoints.py", "ppo_virl.py", "sft.py"])
def test_evaluation_leaves_the_training_unchanged(tmp_path, script):
    """In-training evaluation is greedy (PPO: and forks the RNG): --eval-every 1 and 0 give the same training rows."""
    flags = ["--seed", "5", "--micro-batch-size", "2", "--max-new-tokens", "8", "--eval-episodes", "2"]
    flags += {"ppo_generalpoints.py": ["--eval-verify-iter", "1"], "ppo_virl.py": ["--eval-max-turns", "2"],
              "sft.py": ["--total-steps", "3", "--eval-batch-size", "2", "--output-dir", "runs"]}[script]
    if script.startswith("ppo"):
        flags += ["--num-envs", "2", "--num-steps", "1", "--num-updates", "2", "--save-every", "100"]
    runs = [run(tmp_path, os.path.join(ROOT, script), *flags, "--eval-every", e, reward=False) for e in ("1", "0")]
    timing = ("charts/SPS", "charts/rollout_seconds", "charts/update_seconds", "charts/tokens_per_s",
              "charts/steps_per_s")
    with_eval, without = ([json.dumps({k: v for k, v in r.items() if k not in timing}) for r in rows
                           if not any(k.startswith("eval/") for k in r)] for rows in runs)  # NaN == NaN as text
    assert len(runs[0]) > len(with_eval) and with_eval == without
