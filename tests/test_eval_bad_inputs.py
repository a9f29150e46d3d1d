"""eval.py on bad input (issue 15): every case stops with exactly one `eval.py: error: ...` line, exit code != 0, no
traceback, and writes nothing (no output directory); a checkpoint with non-finite weights or a truncated
model.safetensors is refused the same way; --output-dir never overwrites earlier results."""
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


@pytest.mark.parametrize("flags,needle", CASES, ids=[" ".join(f) for f, _ in CASES])
def test_bad_input_one_line_nothing_written(flags, needle, tmp_path):
    scratch, cwd = tmp_path / "scratch", tmp_path / "cwd"
    scratch.mkdir()
    cwd.mkdir()
    write(scratch / "not_json.jsonl", RECORD + "\n{oops\n")
    write(scratch / "not_a_record.jsonl", json.dumps({"task": "gp-l"}) + "\n")
    write(scratch / "empty.jsonl", "\n")
    r = run_eval(cwd, "--model-path", "tiny", *[f.replace("{tmp}", str(scratch)) for f in flags])
    assert_one_line_refusal(r, cwd, needle)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The tiny text model saved with save_pretrained, as sft.py / ppo_*.py write a checkpoint."""
    import eval as ev
    path = tmp_path_factory.mktemp("ckpt") / "tiny_ckpt"
    model, tok = ev.load_model("tiny", vl_task=False)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_non_finite_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    """A diverged run's all-NaN checkpoint used to evaluate to 0 % with no warning."""
    import torch

    import eval as ev
    model, tok = ev.load_model(str(tiny_checkpoint), vl_task=False)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    model.save_pretrained(tmp_path / "nan_ckpt")
    tok.save_pretrained(tmp_path / "nan_ckpt")
    (tmp_path / "cwd").mkdir()
    r = run_eval(tmp_path / "cwd", "--model-path", str(tmp_path / "nan_ckpt"))
    assert_one_line_refusal(r, tmp_path / "cwd", "weights are not finite")
    assert ev.weights_finite(ev.load_model(str(tiny_checkpoint), vl_task=False)[0])
    assert not ev.weights_finite(model)


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_checkpoint_is_refused(tiny_checkpoint, tmp_path, keep):
    ckpt = tmp_path / "truncated"
    shutil.copytree(tiny_checkpoint, ckpt)
    weights = ckpt / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(int(weights.stat().st_size * keep))
    (tmp_path / "cwd").mkdir()
    r = run_eval(tmp_path / "cwd", "--model-path", str(ckpt))
    assert_one_line_refusal(r, tmp_path / "cwd", "model.safetensors cannot be read, truncated or corrupt")


def test_checkpoint_without_weights_is_refused(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "no_weights"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "model.safetensors").unlink()
    (tmp_path / "cwd").mkdir()
    r = run_eval(tmp_path / "cwd", "--model-path", str(ckpt))
    assert_one_line_refusal(r, tmp_path / "cwd", "no model weights")


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
