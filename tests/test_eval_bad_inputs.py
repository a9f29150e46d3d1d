"""eval.py on bad input (issue 15): every case stops with exactly one `eval.py: error: ...` line, exit code != 0, no
traceback, and writes nothing (no output directory); a checkpoint with non-finite weights or a truncated
model.safetensors is refused the same way; --output-dir never overwrites earlier results. The cases in REAL, one
truncated checkpoint and the --output-dir test run eval.py in a subprocess of their own (the real CLI path); the other
refusals run as `python eval.py ...` would, all in one python process (conftest.run_in_one_process)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL = os.path.join(ROOT, "eval.py")


def run_eval(cwd, *argv):
    return subprocess.run([sys.executable, EVAL, *argv], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))


def assert_one_line_refusal(r, cwd, needle=""):
    """Exit != 0, one error line (no traceback), nothing written in the working directory (the default output dir
    runs/eval__... would be created there)."""
    assert r.returncode != 0, r.stdout[-2000:]
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("eval.py: error: "), r.stderr[-3000:]
    assert needle in errors[0], errors[0]
    assert os.listdir(cwd) == [], os.listdir(cwd)


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


RECORD = json.dumps(dict(task="gp-l", setting="id", env_kwargs={}, seed=1, turns=[dict(response="x", reward=-1)]))
# (flags, what the error line says); `{tmp}` is a scratch directory outside the working directory
CASES = [
    (["--gp-num-episodes", "0"], "--gp-num-episodes must be >= 1"),
    (["--gp-num-episodes", "-3"], "--gp-num-episodes must be >= 1"),
    (["--virl-num-episodes", "0", "--task", "virl-l"], "--virl-num-episodes must be >= 1"),
    (["--virl-visual-ood-routes", "0"], "--virl-visual-ood-routes must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--gp-verify-iter", "0"], "--gp-verify-iter must be >= 1"),
    (["--virl-verify-iter", "0"], "--virl-verify-iter must be >= 1"),
    (["--gp-target-points", "0"], "--gp-target-points must be >= 1"),
    (["--gp-image-size", "0", "--task", "gp-vl"], "--gp-image-size must be >= 1"),
    (["--bootstrap-samples", "0"], "--bootstrap-samples must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--device", "nonsense"], "unknown --device"),
    (["--task", "gp-xl"], "unknown --task"),
    (["--settings", "od"], "unknown --settings"),
    (["--settings", "visual-ood"], "selects nothing"),
    (["--gp-split", "half"], "unknown --gp-split"),
    (["--label", "a", "--label", "b"], "2 --label for 1 --model-path"),
    (["--model-path", "tiny", "--label", "a", "--label", "a"], "--label 'a' is given twice"),
    (["--model-path", "/nonexistent/ckpt"], "not found"),
    (["--run-dir", "/nonexistent/run"], "not a directory"),
    (["--virl-data-dir", "/nonexistent/nyc", "--task", "virl-l"], "does not exist"),
    (["--replay", "{tmp}/missing.jsonl"], "no such file"),
    (["--replay", "{tmp}"], "a directory, not an episodes.jsonl"),
    (["--replay", "{tmp}/not_json.jsonl"], "line 2 is not JSON"),
    (["--replay", "{tmp}/not_a_record.jsonl"], "line 1 is not an eval.py episode record"),
    (["--replay", "{tmp}/empty.jsonl"], "no episodes"),
]
REAL = [["--gp-num-episodes", "0"], ["--replay", "{tmp}/not_json.jsonl"]]  # an argument check, a --replay refusal


def scratch_and_cwd(d):
    """A scratch directory with the --replay files (`{tmp}`) and an empty working directory, under d."""
    (d / "scratch").mkdir(parents=True)
    (d / "cwd").mkdir()
    write(d / "scratch" / "not_json.jsonl", RECORD + "\n{oops\n")
    write(d / "scratch" / "not_a_record.jsonl", json.dumps({"task": "gp-l"}) + "\n")
    write(d / "scratch" / "empty.jsonl", "\n")
    return d / "scratch", d / "cwd"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The tiny text model saved with save_pretrained, as sft.py / ppo_*.py write a checkpoint."""
    import eval as ev
    path = tmp_path_factory.mktemp("ckpt") / "tiny_ckpt"
    model, tok = ev.load_model("tiny", vl_task=False)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bad_checkpoints(tiny_checkpoint, tmp_path_factory):
    """tiny_checkpoint with one NaN weight (nan), its model.safetensors cut to a half / to nothing (truncated_0.5,
    truncated_0.0), and without it (no_weights)."""
    import torch

    import eval as ev
    d = tmp_path_factory.mktemp("bad_ckpts")
    model, tok = ev.load_model(str(tiny_checkpoint), vl_task=False)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    model.save_pretrained(d / "nan")
    tok.save_pretrained(d / "nan")
    for keep in (0.5, 0.0):
        shutil.copytree(tiny_checkpoint, d / f"truncated_{keep}")
        weights = d / f"truncated_{keep}" / "model.safetensors"
        with open(weights, "r+b") as f:
            f.truncate(int(weights.stat().st_size * keep))
    shutil.copytree(tiny_checkpoint, d / "no_weights")
    (d / "no_weights" / "model.safetensors").unlink()
    return d


@pytest.fixture(scope="module")
def batched(bad_checkpoints, tmp_path_factory, one_process):
    """{argv: (result, its working directory)} for every CASES entry not in REAL (after --model-path tiny) and every
    bad checkpoint but truncated_0.5 (alone), all in one python process, each in directories of its own."""
    work = tmp_path_factory.mktemp("batch_eval")
    argvs = [("--model-path", "tiny", *f) for f, _ in CASES if f not in REAL] + \
        [("--model-path", str(bad_checkpoints / n)) for n in ("nan", "truncated_0.0", "no_weights")]
    dirs = [scratch_and_cwd(work / f"case{i}") for i in range(len(argvs))]
    out = one_process(EVAL, [([a.replace("{tmp}", str(scratch)) for a in argv], cwd)
                             for argv, (scratch, cwd) in zip(argvs, dirs)], work)
    return {argv: (r, cwd) for argv, r, (_, cwd) in zip(argvs, out, dirs)}


@pytest.mark.parametrize("flags,needle", CASES, ids=[" ".join(f) for f, _ in CASES])
def test_bad_input_one_line_nothing_written(flags, needle, tmp_path, request):
    if flags in REAL:
        scratch, cwd = scratch_and_cwd(tmp_path)
        r = run_eval(cwd, "--model-path", "tiny", *[f.replace("{tmp}", str(scratch)) for f in flags])
    else:
        r, cwd = request.getfixturevalue("batched")[("--model-path", "tiny", *flags)]
    assert_one_line_refusal(r, cwd, needle)


def test_non_finite_checkpoint_is_refused(tiny_checkpoint, bad_checkpoints, batched):
    """A diverged run's all-NaN checkpoint used to evaluate to 0 % with no warning."""
    import eval as ev
    assert_one_line_refusal(*batched[("--model-path", str(bad_checkpoints / "nan"))], "weights are not finite")
    assert ev.weights_finite(ev.load_model(str(tiny_checkpoint), vl_task=False)[0])
    assert not ev.weights_finite(ev.load_model(str(bad_checkpoints / "nan"), vl_task=False)[0])


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_checkpoint_is_refused(bad_checkpoints, tmp_path, keep, request):
    argv = ("--model-path", str(bad_checkpoints / f"truncated_{keep}"))
    r, cwd = (run_eval(tmp_path, *argv), tmp_path) if keep == 0.5 else request.getfixturevalue("batched")[argv]
    assert_one_line_refusal(r, cwd, "model.safetensors cannot be read, truncated or corrupt")


def test_checkpoint_without_weights_is_refused(bad_checkpoints, batched):
    assert_one_line_refusal(*batched[("--model-path", str(bad_checkpoints / "no_weights"))], "no model weights")


def test_output_dir_is_never_overwritten(tiny_checkpoint, tmp_path):
    """Two checkpoints whose directories share a basename get two columns; a second run into the same --output-dir
    is refused (the first results stay), --overwrite replaces them."""
    a, b = tmp_path / "sft" / "final", tmp_path / "ppo" / "final"
    shutil.copytree(tiny_checkpoint, a)
    shutil.copytree(tiny_checkpoint, b)
    out = tmp_path / "out"
    flags = ["--model-path", str(a), "--model-path", str(b), "--gp-num-episodes", "1", "--settings", "id",
             "--gp-verify-iter", "1", "--max-new-tokens", "2", "--bootstrap-samples", "10", "--output-dir", str(out)]
    r = run_eval(tmp_path, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    table = (out / "table.md").read_text()
    assert "| setting | metric | sft/final | ppo/final |" in table
    results = json.loads((out / "results.json").read_text())
    assert [c["label"] for c in results["checkpoints"]] == ["sft/final", "ppo/final"]
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    r = run_eval(tmp_path, *flags)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"eval.py: error: --output-dir {out} already holds results; choose a new "
                                             "directory, or pass --overwrite to replace them"]
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before
    r = run_eval(tmp_path, *flags, "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["args"]["overwrite"] is True
