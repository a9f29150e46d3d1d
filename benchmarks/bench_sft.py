"""Training throughput of sft.py next to a bare forward+backward+AdamW loop on the same model and batches.

    python benchmarks/bench_sft.py                                  # tiny model, seconds
    python benchmarks/bench_sft.py --model-path smollm2 --steps 4   # SmolLM2-135M, a few minutes on 2 cores

Both sides count non-pad tokens per second of training time. sft.py's figure (`charts/tokens_per_s` in its
metrics.jsonl) includes generating the data with the env, tokenizing and padding; the bare loop gets the same
batches pre-tokenized and uses the plain HF loss (`labels=`, logits over the whole sequence).
"""
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sft  # noqa: E402


@dataclass
class Args:
    task: str = "gp-l"
    """task whose SFT data is used"""
    model_path: str = "tiny"
    """model (as sft.py --model-path)"""
    steps: int = 10
    """optimizer steps on each side"""
    micro_batch_size: int = 8
    """examples per step"""
    seed: int = 42
    """the same seed on both sides gives the same batches"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    env = dict(os.environ, HF_HUB_OFFLINE="1")

    # 1. this script, end to end (no evaluation)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.join(ROOT, "sft.py"), "--task", args.task, "--model-path", args.model_path,
               "--total-steps", str(args.steps), "--micro-batch-size", str(args.micro_batch_size),
               "--eval-every", "0", "--no-save-optimizer", "--seed", str(args.seed), "--output-dir", tmp,
               "--run-name", "bench"]
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        last = [json.loads(line) for line in open(os.path.join(tmp, "bench", "metrics.jsonl"))][-1]
        script_tps = last["charts/tokens_per_s"]

    # 2. bare loop: the same model and batches, pre-tokenized; plain HF loss
    vl = args.task.endswith("-vl")
    torch.manual_seed(args.seed)
    model, processor = sft.load_model({"default": "smolvlm" if vl else "smollm2"}.get(args.model_path, args.model_path), vl)
    tok = sft.tokenizer_of(processor)
    train_env, rng, batches = sft.make_env(args.task, "id", split="seen"), random.Random(), []
    for step in range(args.steps):
        rng.seed(f"{args.seed}-0-{step}")
        examples = []
        for _ in range(args.micro_batch_size):
            messages, image, _ = sft.sample_example("oracle", train_env, rng, None, 0, "last")
            examples.append(sft.encode_example(processor, messages, image if vl else None, "last", 4096))
        batch = sft.collate(examples, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        batch["labels"] = batch["input_ids"].masked_fill(batch.pop("loss_mask") == 0, -100)
        batches.append(batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-7)
    model.train()
    t0, tokens = time.time(), 0
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    bare_tps = tokens / (time.time() - t0)
    print(f"model {args.model_path}, task {args.task}, {args.steps} steps x {args.micro_batch_size} examples, "
          f"{torch.get_num_threads()} threads")
    print(f"sft.py     : {script_tps:10.0f} tokens/s")
    print(f"bare loop  : {bare_tps:10.0f} tokens/s")
    print(f"ratio      : {script_tps / bare_tps:10.2f}")
