"""Bad command-line input to ppo_generalpoints.py and ppo_virl.py (issue 15): every case stops with one line
`error: ...`, exit status != 0, no traceback, and writes nothing (no run directory under the working directory's
runs/, a finished run untouched), on the tiny model. The cases in REAL run the script in a subprocess of their own (the
real CLI path); the others run as `python SCRIPT ...` would, one python process per script
(conftest.run_in_one_process)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("ppo_generalpoints.py", "ppo_virl.py")
TINY = ["--num-envs", "2", "--num-steps", "1", "--update-epochs", "1", "--micro-batch-size", "2",
        "--max-new-tokens", "8", "--eval-every", "0"]


def run(script: str, args: list, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """What the table points at (D/...): a text-only, a NaN and a truncated checkpoint, and per script a finished 1-update
    run, an interrupted save (update_0001.tmp), a checkpoint outside its run, a run with a truncated value_head.pt."""
    import ppo_generalpoints as ppo

    d = tmp_path_factory.mktemp("ppo_bad_inputs")
    model, tok = ppo.load_model("tiny", vl_task=False)
    model.save_pretrained(d / "good_ckpt")
    tok.save_pretrained(d / "good_ckpt")
    shutil.copytree(d / "good_ckpt", d / "truncated_ckpt")
    weights = d / "truncated_ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")  # one NaN is enough
    model.save_pretrained(d / "nan_ckpt")
    tok.save_pretrained(d / "nan_ckpt")
    for script in SCRIPTS:
        name = script[:-3]
        out = run(script, ["--model-path", "tiny", *TINY, "--num-updates", "1", "--exp-name", name], d)
        assert out.returncode == 0, out.stderr[-3000:]
        (run_dir,) = [p for p in (d / "runs").iterdir() if f"__{name}__" in p.name]
        os.rename(run_dir, d / "runs" / name)
        ckpt = d / "runs" / name / "checkpoints" / "update_0001"
        shutil.copytree(ckpt, str(ckpt) + ".tmp")
        shutil.copytree(ckpt, d / f"{name}_outside")
        shutil.copytree(d / "runs" / name, d / "runs" / f"{name}_broken")
        value_head = d / "runs" / f"{name}_broken" / "checkpoints" / "update_0001" / "value_head.pt"
        value_head.write_bytes(value_head.read_bytes()[:100])
    return d


BOTH = [  # (arguments, the message in the one line), for both scripts
    (["--num-envs", "0"], "--num-envs must be >= 1"),
    (["--num-steps", "0"], "--num-steps must be >= 1"),
    (["--num-updates", "0"], "--num-updates must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--temperature", "-1"], "--temperature must be > 0"),
    (["--verify-iter", "0"], "--verify-iter must be >= 1"),
    (["--gamma", "5"], "--gamma must be in [0, 1]"),
    (["--gamma", "-0.1"], "--gamma must be in [0, 1]"),
    (["--gae-lambda", "1.5"], "--gae-lambda must be in [0, 1]"),
    (["--clip-coef", "0"], "--clip-coef must be > 0"),
    (["--clip-coef", "-0.1"], "--clip-coef must be > 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--eval-every", "-1"], "--eval-every must be >= 0"),
    (["--eval-every", "1", "--eval-episodes", "0"], "--eval-episodes"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "-1e-6"], "--lr must be > 0"),
    (["--lr", "nan"], "--lr must be > 0"),
    (["--adam-eps", "0"], "--adam-eps must be > 0"),
    (["--lr-max-steps", "0"], "--lr-max-steps must be >= 1"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1"),
    (["--update-epochs", "0"], "--update-epochs must be >= 1"),
    (["--num-minibatches", "0"], "--num-minibatches must be >= 1"),
    (["--thought-prob-coef", "-0.5"], "--thought-prob-coef must be >= 0"),
    (["--ent-coef", "-0.01"], "--ent-coef must be >= 0"),
    (["--kl-coef", "-0.01"], "--kl-coef must be >= 0"),
    (["--seed", "-1"], "--seed must be in [0, 2**31)"),
    (["--skip-first-tokens", "-1"], "--skip-first-tokens must be >= 0"),
    (["--logprobs-from-sampling", "--top-k", "5"], "--logprobs-from-sampling needs --top-p 1 --top-k 0"),
    (["--num-envs", "3", "--micro-batch-size", "2"], "batch layout does not divide"),
    (["--model-path", "D/missing_ckpt"], "not found"),
    (["--model-path", "D/truncated_ckpt"], "cannot load"),
    (["--model-path", "D/nan_ckpt"], "weights are not finite"),
    (["--resume", "D/runs/NAME/checkpoints/update_0001.tmp"], "interrupted save"),
    (["--resume", "D/runs/NAME/checkpoints/update_0001.old"], "interrupted save"),
    (["--resume", "D/runs/NAME/checkpoints/update_0001", "--lr", "1e-3"], "leave out --lr"),
    (["--resume", "D/runs/NAME/checkpoints/update_0001", "--seed", "3", "--num-updates", "3"], "leave out --seed"),
    (["--resume", "D/runs/NAME/checkpoints/update_0001", "--num-envs=4"], "leave out --num-envs"),
    (["--resume", "D/runs/NAME", "--num-updates", "1"], "at update 1 already"),
    (["--resume", "D/missing_run"], "not a PPO checkpoint"),
    (["--resume", "D/NAME_outside", "--num-updates", "2"], "resumed inside its run"),
    (["--resume", "D/runs/NAME_broken", "--num-updates", "2"], "value_head.pt cannot be loaded"),
]
ONLY = {
    "ppo_generalpoints.py": [
        (["--eval-every", "1", "--eval-verify-iter", "0"], "--eval-verify-iter"),
        (["--task", "gp-vl", "--image-size", "4"], "--image-size must be >= 8"),
        (["--task", "gp-vl", "--model-path", "D/good_ckpt"], "text-only"),
    ],
    "ppo_virl.py": [
        (["--drop-rate", "2"], "--drop-rate must be in [0, 1]"),
        (["--resolution", "4"], "--resolution must be >= 8"),
        (["--eval-max-turns", "-1"], "--eval-max-turns must be >= 0"),
        (["--straight-line-length", "0"], "--straight-line-length must be >= 1"),
    ],
}
REAL = [  # per script: an argument check, a --resume refused after reading sys.argv, a load failing inside safetensors
    ["--num-envs", "0"], ["--resume", "D/runs/NAME/checkpoints/update_0001", "--lr", "1e-3"],
    ["--model-path", "D/truncated_ckpt"]]


def snapshot(root) -> dict:
    """{path: bytes (None for a directory)} of everything under root."""
    return {os.path.join(r, n): None if n in dirs else open(os.path.join(r, n), "rb").read()
            for r, dirs, fs in os.walk(root) for n in dirs + fs}


CASES = [(script, args, message) for script in SCRIPTS for args, message in BOTH + ONLY[script]]


def argv(script: str, args: list, files) -> list:
    args = [a.replace("D/", str(files) + "/").replace("NAME", script[:-3]) for a in args]
    defaults = [] if "--resume" in args else \
        (["--model-path", "tiny"] if "--model-path" not in args else []) + TINY
    return [*defaults, *args]


@pytest.fixture(scope="module")
def batched(files, tmp_path_factory, one_process):
    """(result, its working directory, finished runs byte-identical after the batch) of a case not in REAL: all such
    cases of a script run in one python process, when the first of them asks."""
    done = {}

    def result(script: str, args: list):
        if script not in done:
            cases = [a for s, a, _ in CASES if s == script and a not in REAL]
            work = tmp_path_factory.mktemp(f"batch_{script[:-3]}")
            cwds = [work / f"case{i}" for i in range(len(cases))]
            for cwd in cwds:
                cwd.mkdir()
            before = snapshot(files / "runs")
            out = one_process(os.path.join(ROOT, script), [(argv(script, a, files), c) for a, c in zip(cases, cwds)],
                              work, watch=[files / "runs"])
            unchanged = snapshot(files / "runs") == before
            done[script] = {tuple(a): (r, c, unchanged) for a, r, c in zip(cases, out, cwds)}
        return done[script][tuple(args)]
    return result


@pytest.mark.parametrize("script,args,message", CASES,
                         ids=[f"{s[4:-3]}: {' '.join(a)[:60]}" for s, a, _ in CASES])
def test_bad_input_stops_with_one_line_before_anything_is_written(script, args, message, files, tmp_path, batched):
    if args in REAL:
        before = snapshot(files / "runs")
        p, cwd = run(script, argv(script, args, files), tmp_path), tmp_path
        touched = [] if snapshot(files / "runs") == before else ["the finished runs"]
    else:
        p, cwd, unchanged = batched(script, args)
        touched = p.touched + ([] if unchanged else ["the finished runs, after the batch"])
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert lines and lines[-1].startswith(f"{script}: error: ") and message in lines[-1], p.stderr[-3000:]
    assert sum("error" in line for line in lines) == 1, p.stderr[-3000:]  # one line
    assert not (cwd / "runs").exists()  # no run directory
    assert touched == []  # the finished runs are untouched
