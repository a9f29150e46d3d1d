"""Tests for sft.py: tiny random models, offline, CPU. Scripts run in a subprocess like CleanRL's tests."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sft  # noqa: E402

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2")
TINY = ["--model-path", "tiny", "--micro-batch-size", "2", "--eval-episodes", "2", "--eval-batch-size", "2",
        "--max-new-tokens", "8", "--lr", "1e-3", "--warmup-steps", "1"]


def virl_available() -> bool:
    try:
        sft.make_env("virl-l", "id", split="seen", seed=0)
        return True
    except Exception:
        return False


def run(args, cwd, check=True, launcher=None):
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, "sft.py")] + args
    p = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.mark.parametrize("task", ["gp-l", "gp-vl", "virl-l", "virl-vl"])
def test_end_to_end_checkpoint_reloads_and_generates(task, tmp_path):
    if task.startswith("virl") and not virl_available():
        pytest.skip("V-IRL environment (NavigationEnv) not importable yet")
    run(["--task", task, *TINY, "--total-steps", "2", "--eval-every", "2", "--output-dir", str(tmp_path),
         "--run-name", "r"], cwd=tmp_path)
    ckpt = tmp_path / "r" / "final"
    assert (ckpt / "trainer_state.json").exists() and not (tmp_path / "r" / "final.tmp").exists()
    metrics = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    assert any("eval/id_success" in m for m in metrics) and any("losses/loss" in m for m in metrics)
    # plain transformers, no sft.py helpers: the checkpoint is self-contained
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
    vl = task.endswith("-vl")
    model = (AutoModelForImageTextToText if vl else AutoModelForCausalLM).from_pretrained(ckpt)
    processor = (AutoProcessor if vl else AutoTokenizer).from_pretrained(ckpt)
    env = sft.make_env(task, "id", split="unseen")
    obs, _ = env.reset(seed=0)
    inputs = sft.chat_inputs(processor, [obs["messages"]], [obs["image"]] if vl else None)
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_loss_mask_covers_exactly_the_responses(name, request):
    processor = sft.load_model("tiny", vl_task=False)[1] if name == "tiny" else request.getfixturevalue("smollm2_tokenizer")
    tok = sft.tokenizer_of(processor)
    messages = [{"role": "user", "content": "Cards: ['A', '3', 'K', '10']"},
                {"role": "assistant", "content": "\n{\n  \"formula\": \"1*3+10+10=24\",\n}"},
                {"role": "user", "content": "You failed this trial because partial solution."},
                {"role": "assistant", "content": "second answer"}]
    for loss_on, trained in [("last", [3]), ("all", [1, 3])]:
        e = sft.encode_example(processor, messages, None, loss_on, max_length=4096)
        ids, mask = torch.tensor(e["input_ids"]), torch.tensor(e["loss_mask"]).bool()
        expected = "".join(messages[i]["content"] + tok.eos_token for i in trained)
        assert tok.decode(ids[mask]) == expected
        # the unmasked prefix of the last response is exactly the generation prompt the model sees at inference
        prompt = processor.apply_chat_template(messages[:3], tokenize=False, add_generation_prompt=True)
        n_resp = len(tok(messages[3]["content"] + tok.eos_token, add_special_tokens=False)["input_ids"])
        assert tok.decode(ids[: len(ids) - n_resp]) == prompt
    batch = sft.collate([e, dict(input_ids=[5, 6], loss_mask=[0, 1])], pad_id=tok.eos_token_id)
    assert batch["attention_mask"].sum(1).tolist() == [len(e["input_ids"]), 2]  # from lengths, pad == eos here


def test_loss_mask_with_image_tokens():
    model, processor = sft.load_model("tiny", vl_task=True)
    from PIL import Image
    messages = [{"role": "user", "content": "What cards?"}, {"role": "assistant", "content": "A, 2"}]
    e = sft.encode_example(processor, messages, Image.new("RGB", (100, 100)), "last", 4096)
    ids, mask = torch.tensor(e["input_ids"]), torch.tensor(e["loss_mask"]).bool()
    assert (ids == model.config.image_token_id).sum() == 16 and e["pixel_values"].shape == (1, 1, 3, 64, 64)
    assert processor.tokenizer.decode(ids[mask]) == "A, 2<|im_end|>"
    batch = sft.collate([e, e], pad_id=processor.tokenizer.pad_token_id)
    loss, n = sft.sft_loss(model, batch, torch.autocast("cpu", enabled=False))
    assert n == 2 * mask.sum() and torch.isfinite(loss)
    loss.backward()  # gradients reach the random vision tower
    assert model.model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_released_json_reader(tmp_path):
    sample = [{"id": "0", "conversations": [
        {"from": "human", "value": "\n[Task Description]\nYou are an expert 24 points card game player."},
        {"from": "gpt", "value": "\n{\n  \"cards\": ['A', '3', 'K', '10'],\n  \"formula\": \"(1+3)*10-10-6=24\",\n}"},
        {"from": "human", "value": "You failed this trial because partial solution."},
        {"from": "gpt", "value": "again"}]}]
    path = tmp_path / "gp-l.json"
    path.write_text(json.dumps(sample))
    (messages, image, loss_on), = sft.read_llava_json(str(path), vl_task=False)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == sample[0]["conversations"][1]["value"] and image is None and loss_on == "all"
    # VL sample: `<image>\n` marker removed, image path resolved against the file's folder
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    vl = [{"image": "img.png", "conversations": [{"from": "human", "value": "<image>\nWhat cards?"},
                                                {"from": "gpt", "value": "A"}]}]
    path.write_text(json.dumps(vl))
    (messages, image, _), = sft.read_llava_json(str(path), vl_task=True)
    assert messages[0]["content"] == "What cards?" and image == str(tmp_path / "img.png")
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}]}]))
    with pytest.raises(SystemExit, match="no `gpt` turn"):
        sft.read_llava_json(str(path), vl_task=False)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """Files the bad-input table points at: a text-only and an all-NaN checkpoint, broken data files, a finished run."""
    d = tmp_path_factory.mktemp("bad_inputs")
    model, tok = sft.load_model("tiny", vl_task=False)
    model.save_pretrained(d / "text_ckpt")
    tok.save_pretrained(d / "text_ckpt")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.save_pretrained(d / "nan_ckpt")
    tok.save_pretrained(d / "nan_ckpt")
    shutil.copytree(d / "text_ckpt", d / "truncated_ckpt")
    weights = d / "truncated_ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (d / "malformed.json").write_text('[{"conversations": [')
    (d / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (d / "turns.json").write_text(json.dumps([{"conversations": ["human: hi", "gpt: A"]}]))
    run(["--task", "gp-l", *TINY, "--total-steps", "1", "--eval-every", "0", "--output-dir", str(d / "runs"),
         "--run-name", "done"], cwd=d)
    os.makedirs(d / "runs" / "done" / "step_1.tmp")
    return d


BAD_INPUTS = [  # (arguments, the one line's message); every case: exit != 0, no traceback, no run directory
    (["--task", "gp-x"], "gp-x"),
    (["--data", "json"], "--data json needs --data-file"),
    (["--data", "json", "--data-file", "missing.json"], "does not exist"),
    (["--data", "json", "--data-file", "D/malformed.json"], "is not valid JSON"),
    (["--data", "json", "--data-file", "D/binary.json"], "is not valid JSON"),
    (["--data", "json", "--data-file", "D/turns.json"], "every turn must be an object"),
    (["--data-file", "D/turns.json"], "only read with --data json"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--task", "gp-vl", "--vision-lr", "-1e-3"], "--vision-lr must be > 0"),
    (["--total-steps", "-1"], "--total-steps must be >= 0"),
    (["--micro-batch-size", "-2"], "--micro-batch-size must be >= 0"),
    (["--warmup-steps", "-3"], "--warmup-steps must be >= 0"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--log-every", "0"], "--log-every must be >= 1"),
    (["--eval-every", "1", "--eval-episodes", "0"], "--eval-episodes must be >= 1"),
    (["--adam-betas", "0.9", "1.0"], "--adam-betas must be in [0, 1)"),
    (["--task", "gp-vl", "--model-path", "D/text_ckpt"], "cannot take images"),
    (["--model-path", "D/nan_ckpt"], "weights are not finite"),
    (["--model-path", "D/missing_ckpt"], "cannot load --model-path"),
    (["--model-path", "D/truncated_ckpt"], "cannot load --model-path"),
    (["--resume", "D/runs/done/step_1.tmp"], "interrupted save"),
    (["--resume", "D/missing_run"], "no checkpoint with trainer_state.json"),
    (["--resume", "D/runs/done", "--total-steps", "1"], "at step 1 already"),
    (["--resume", "D/runs/done", "--total-steps", "2", "--run-name", "other"], "leave out --run-name"),
    (["--run-name", "done", "--output-dir", "D/runs"], "already exists"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a)[:60] for a, _ in BAD_INPUTS])
def test_bad_input_stops_before_anything_is_written(args, message, bad_inputs, tmp_path):
    args = [a.replace("D/", str(bad_inputs) + "/") for a in args]
    before = sorted(os.listdir(bad_inputs / "runs" / "done"))
    defaults = ["--output-dir", str(tmp_path / "runs")] + ([] if "--run-name" in args or "--resume" in args
                                                            else ["--run-name", "bad"])
    p = run(["--model-path", "tiny", "--total-steps", "1", "--eval-every", "0", *defaults, *args], cwd=tmp_path,
            check=False)
    assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    if "gp-x" not in args:
        assert p.stderr.strip().splitlines()[-1].startswith("sft.py: error: ") and message in p.stderr.splitlines()[-1]
    assert not (tmp_path / "runs").exists()  # no run directory
    assert sorted(os.listdir(bad_inputs / "runs" / "done")) == before  # the finished run is untouched


def test_divergence_stops_without_a_checkpoint(tmp_path):
    """--lr 1e9: the loss or the gradient norm becomes non-finite; one line, exit != 0, no NaN checkpoint."""
    p = run(["--task", "gp-l", *TINY, "--lr", "1e9", "--total-steps", "4", "--save-every", "1", "--eval-every", "0",
             "--output-dir", str(tmp_path), "--run-name", "r"], cwd=tmp_path, check=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and "Traceback" not in p.stderr and last.startswith("sft.py: error: non-finite"), last
    from safetensors.torch import load_file
    for ckpt in (tmp_path / "r").glob("step_*"):  # what was saved before the divergence is finite
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values())
    assert not (tmp_path / "r" / "final").exists()


def test_vision_parameters_are_the_vision_tower_and_connector():
    model, _ = sft.load_model("tiny", vl_task=True)
    names = [n for n, _ in model.named_parameters()]
    vision = [n for n in names if sft.is_vision_param(n)]
    assert vision and all(".vision_model." in n or ".connector." in n for n in vision)
    assert not any(sft.is_vision_param(n) for n in names if ".text_model." in n or n.startswith("lm_head"))


def test_card_hits_counts_cards_at_their_position():
    response = '{"cards": [\'A\', \'A\', \'10\', \'K\'], "number": [1, 1, 10, 10], "formula": "1+1"}'
    assert sft.card_hits(response, ["A", "10", "10", "Q"]) == 2  # positions 1 and 3
    assert sft.card_hits(response, ["K", "10", "A", "A"]) == 0  # the same multiset in another order
    assert sft.card_hits(response, ["A", "A", "10", "K"]) == 4
    assert sft.card_hits("no json here", ["A", "2", "3", "4"]) == 0


def test_get_lr_is_linear_warmup_then_cosine():
    lrs = [sft.get_lr(step, lr=1.0, warmup_steps=2, total_steps=6, min_lr_ratio=0.1) for step in range(7)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[4] == pytest.approx(0.1 + 0.9 * 0.5) and lrs[6] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # monotone decay after the warm-up


class ScriptedModel(torch.nn.Module):
    """Stands in for a model in evaluate(): generate() appends the next scripted answer to each prompt."""

    def __init__(self, tok, answers):
        super().__init__()
        self.tok, self.answers = tok, list(answers)

    def generate(self, input_ids, **kwargs):
        answers = [self.answers.pop(0) for _ in range(len(input_ids))]
        ids = self.tok(answers, padding=True, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return torch.cat([input_ids, ids], dim=1)


def test_evaluate_scores_answers_with_the_env():
    _, processor = sft.load_model("tiny", vl_task=True)
    env, seeds = sft.make_env("gp-vl", "id", split="unseen"), [7, 8, 9, 10]
    answers = []
    for s in seeds:
        env.reset(seed=s)
        answers.append(env.oracle_response())
    env.reset(seed=seeds[2])
    misread = [env.cards[0]] + ["2" if c == "A" else "A" for c in env.cards[1:]]  # only the first card right
    answers[2] = answers[2].replace(repr(list(env.cards)), repr(misread), 1)
    answers[3] = "no answer"
    metrics = sft.evaluate(ScriptedModel(sft.tokenizer_of(processor), answers), processor, "gp-vl", ["id"], seeds,
                           batch_size=3, max_new_tokens=8)
    assert metrics["id_success"] == 0.5 and metrics["id_format_valid"] == 0.75 and metrics["id_cards_acc"] == 0.5
    assert metrics["id_per_card_acc"] == (4 + 4 + 1) / 16


def test_resume_continues_from_saved_step(tmp_path):
    common = ["--task", "gp-l", *TINY, "--eval-every", "0", "--output-dir", str(tmp_path), "--run-name", "r"]
    run(common + ["--total-steps", "2", "--save-every", "1"], cwd=tmp_path)
    os.rename(tmp_path / "r" / "final", tmp_path / "final_2")  # resume from step_1, not the final checkpoint
    first = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    p = run(["--task", "gp-l", *TINY, "--eval-every", "0", "--resume", str(tmp_path / "r"), "--total-steps", "3"],
            cwd=tmp_path)
    assert "step 1/3" not in p.stdout and "step 2/3" in p.stdout and "step 3/3" in p.stdout
    assert json.load(open(tmp_path / "r" / "final" / "trainer_state.json"))["step"] == 3
    steps = [json.loads(line)["step"] for line in open(tmp_path / "r" / "metrics.jsonl")]
    assert steps == [1, 2, 3]  # step 1 of the first run, then the resumed steps 2-3: the first run's row 2 is gone
    # the resumed step 2 sees the same data and the same weights/optimizer as the original step 2
    losses = [json.loads(line)["losses/loss"] for line in open(tmp_path / "r" / "metrics.jsonl")]
    assert losses[1] == pytest.approx(first[1]["losses/loss"], rel=1e-4)
    # the checkpoint schema, and D_init of a run started from this checkpoint = its tokens_trained + d_init_tokens
    state = json.load(open(tmp_path / "r" / "final" / "trainer_state.json"))
    last = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")][-1]
    assert state["tokens_trained"] == last["compute/tokens_trained"] > 0 and state["tokens_generated"] == 0
    assert state["flops"] == last["compute/flops"] and state["d_init_tokens"] == 0 and state["args"]["lr"] == 1e-3
    run(["--task", "gp-l", *TINY, "--model-path", str(tmp_path / "r" / "final"), "--eval-every", "0",
         "--total-steps", "1", "--output-dir", str(tmp_path), "--run-name", "r2"], cwd=tmp_path)
    state2 = json.load(open(tmp_path / "r2" / "final" / "trainer_state.json"))
    assert state2["d_init_tokens"] == state["tokens_trained"] and 0 < state2["tokens_trained"] < state["tokens_trained"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_gloo_processes(strategy, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run(["--task", "gp-l", *TINY, "--total-steps", "2", "--eval-every", "2", "--dist", strategy,
         "--output-dir", str(tmp_path), "--run-name", "r"], cwd=tmp_path, launcher=launcher)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "final")
    assert json.load(open(tmp_path / "r" / "final" / "trainer_state.json"))["step"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_interrupted_resave_is_recovered(tmp_path):
    """A kill between the renames of a re-save (NAME -> NAME.old, NAME.tmp -> NAME) never loses the checkpoint."""
    def make(name, step):
        os.makedirs(tmp_path / "r" / name)
        (tmp_path / "r" / name / "trainer_state.json").write_text(json.dumps({"step": step}))

    make("final.old", 4)  # killed after the old copy moved aside, before the new one came in
    make("final.tmp", 6)
    make("step_2.old", 2)  # killed after the new copy came in, before the old one was deleted
    make("step_2", 2)
    sft.recover_run(str(tmp_path / "r" / "final"))  # --resume RUN/final finds final again
    assert sorted(os.listdir(tmp_path / "r")) == ["final", "final.tmp", "step_2"]
    assert sft.latest_checkpoint(str(tmp_path / "r")) == str(tmp_path / "r" / "final")  # never a .tmp or .old


def test_killed_run_resumes_exactly_without_duplicate_rows(tmp_path):
    """kill -9 after a checkpoint, then --resume: metrics.jsonl equals an uninterrupted run's, row for row."""
    common = ["--task", "gp-l", *TINY, "--total-steps", "4", "--save-every", "2", "--eval-every", "2",
              "--output-dir", str(tmp_path)]
    run(common + ["--run-name", "whole"], cwd=tmp_path)
    cmd = [sys.executable, os.path.join(ROOT, "sft.py"), *common, "--run-name", "killed"]
    with subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True) as p:
        for line in p.stdout:
            if line.startswith("saved") and line.rstrip().endswith("step_2"):
                p.kill()
                break
    assert not (tmp_path / "killed" / "final").exists()
    run(["--task", "gp-l", *TINY, "--total-steps", "4", "--save-every", "2", "--eval-every", "2",
         "--resume", str(tmp_path / "killed")], cwd=tmp_path)
    rows = {name: [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
            for name in ("whole", "killed")}
    assert [r["step"] for r in rows["killed"]] == [r["step"] for r in rows["whole"]]
    for a, b in zip(rows["whole"], rows["killed"]):
        assert a.keys() == b.keys()
        for k in a:
            if k not in ("charts/tokens_per_s", "charts/steps_per_s"):  # timings
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (a["step"], k)
