"""The vision pre-training stage (make_models.py) and the recognition probe (envs.DescribeEnv, eval.py describe-*),
on the tiny VL model: the stage trains what it says and freezes the rest, its checkpoint is a prepared name built
atomically, a damaged cache is named in one message; descriptions are scored against what the image shows."""
import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import envs
import make_models as mm
from common import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_STAGE = mm.VisionStage(tower_steps=3, align_steps=2, batch_size=4, align_batch_size=4, tasks=("gp", "virl"))


def test_stage_trains_the_vision_tower_and_freezes_the_text_tower():
    vlm, processor = mm.build_tiny(True)
    before = copy.deepcopy(vlm.state_dict())
    mm.vision_stage(vlm, processor, TINY_STAGE, log=lambda line: None)
    after = vlm.state_dict()
    text = [k for k in after if not k.startswith(("model.vision_model.", "model.connector."))]
    vision = [k for k in after if k.startswith(("model.vision_model.", "model.connector."))]
    assert text and all(torch.equal(before[k], after[k]) for k in text)  # bit-identical
    assert sum(not torch.equal(before[k], after[k]) for k in vision) > len(vision) // 2
    assert all(p.requires_grad for p in vlm.parameters())  # a normal checkpoint again
    stage = vlm.config.vision_stage
    assert stage["tower_steps"] == 3 and stage["visuals"] == "all" and len(stage["word_acc"]) == 2


def test_part_b_runs_the_shared_prompt_prefix_once_with_the_same_loss_and_gradients():
    """description_loss with a prefix cache (the chat template up to the image, run once without gradient) gives the
    loss per token and the gradients of the whole-sequence forward."""
    torch.manual_seed(0)
    vlm, processor = mm.build_tiny(True)
    for name, p in vlm.named_parameters():
        p.requires_grad = name.startswith(("model.vision_model.", "model.connector."))
    enc, labels = mm.description_batch(mm.DescribeData(processor, "all", 0), processor, ["gp", "virl", "virl"], {})
    results, prefixes = [], {}
    for cache in (None, prefixes):
        vlm.zero_grad(set_to_none=True)
        per_token, row = mm.description_loss(vlm, enc, labels, cache)
        per_token.mean().backward()
        results.append((per_token.detach(), row, [p.grad.clone() for p in vlm.parameters() if p.requires_grad]))
    assert [len(k) for k in prefixes] == [8]  # "<|im_start|>user\n" and the image's opening tokens
    assert len(results[0][0]) == (labels != -100).sum() and torch.equal(results[0][1], results[1][1])
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for full, cached in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-6)


def test_describe_data_targets_point_at_what_the_image_shows():
    _, processor = mm.build_tiny(True)
    data = mm.DescribeData(processor, "id", seed=0)
    image, prompt, caption, words = data.gp()
    assert prompt == envs.GP_DESCRIBE_PROMPT and image.size == (64, 64)
    cards = envs.gp_read_caption(caption)
    assert len(cards) == 4 and {s for _, s in cards} <= set("SC")  # "id": black suits only
    tok = processor.tokenizer
    # 4 x 4 image tokens: card i's rank on row 1, its suit on row 2, column i
    assert [t for t, _ in words] == [4, 8, 5, 9, 6, 10, 7, 11]
    assert [tok.decode(w) for _, w in words][::2] == [c[0] for c, _ in cards]  # "10" -> "1"
    assert all(len(w) == 1 for _, w in words)  # a card's words: their first token
    targets = 0
    for _ in range(20):  # street views: a sign near its tile's centre gives two targets, left and right of the centre
        image, prompt, caption, words = data.virl()  # line of the tile's upper row (pictogram, monogram)
        names = envs.virl_read_caption(caption)
        assert prompt == envs.VIRL_DESCRIBE_PROMPT and len(words) % 2 == 0 and len(words) <= 2 * len(names)
        assert len({t for t, _ in words}) == len(words)
        for (left, category), (right, stem) in zip(words[::2], words[1::2]):
            assert left in (0, 2, 8, 10) and right == left + 1  # 4 x 4 tokens: 2 x 2 per tile
            name = tok.decode(category).strip(), tok.decode(stem).strip()  # a sign's words: all of their tokens
            assert f"{name[1]} {name[0]}" in names or f"{name[0]} {name[1]}" in names
        targets += len(words)
    assert targets >= 20  # every view looks at a corner landmark from its node, along a street
    embed = torch.randn(len(tok), 8)
    classes, index = data.classes(embed), data.class_of([w for _, w in words], len(tok))
    assert classes.shape == (len(tok) + len(data.words), 8) and len(data.words) > 0
    for (_, w), k in zip(words, index.tolist()):  # one token: its own row; several: the sum of their rows
        assert torch.allclose(classes[k], embed[list(w)].sum(0)) and (k < len(tok)) == (len(w) == 1)


def test_captions_read_back_and_junk_reads_as_nothing():
    assert envs.gp_read_caption(envs.gp_caption([1, 10, 12, 7], "HSDC")) == [("A", "H"), ("10", "S"), ("Q", "D"),
                                                                            ("7", "C")]
    assert envs.virl_read_caption(envs.virl_caption(["Empire Market", "Bleecker Bar"])) == ["Empire Market",
                                                                                           "Bleecker Bar"]
    assert envs.virl_read_caption(envs.virl_caption([])) == []
    for junk in ("", "{" * 10000, "of of of", "\x00" * 50):
        assert envs.gp_read_caption(junk) == [] and isinstance(envs.virl_read_caption(junk), list)


def test_describe_env_scores_a_description():
    env = envs.DescribeEnv("gp", face_cards_color="black", split="unseen", image_size=64)
    obs, info = env.reset(seed=3)
    assert obs["messages"] == [{"role": "user", "content": envs.GP_DESCRIBE_PROMPT}] and obs["image"] is not None
    truth = env.truth
    right = ", ".join(f"{c} of {envs.SUIT_NAMES[s]}" for c, s in truth)
    _, reward, terminated, _, info = env.step(right)
    assert (reward, terminated, info["card_hits"], info["suits_correct"]) == (1.0, True, 4, True)
    wrong_first = "K" if truth[0][0] != "K" else "Q"
    _, reward, _, _, info = env.step(right.replace(truth[0][0], wrong_first, 1))
    assert reward == 0.0 and not info["cards_correct"] and info["card_hits"] == 3

    env = envs.DescribeEnv("virl", worlds=["nyc"], resolution=32, crop_size=None)
    obs, info = env.reset(seed=1)
    assert info["world"] == "nyc" and " is on your " not in env.truth and env.truth
    assert env.step(f"Some Cafe; {env.truth}")[1] == 1.0 and env.step("No landmarks nearby")[1] == 0.0


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "SFTVSRL_CACHE": str(d), "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "make_models.py"), "tiny-vl-seeing"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "vision stage B 2/2" in out.stdout
    return d


def test_prepared_name_is_written_whole_and_a_damaged_one_is_named(cache, monkeypatch, tmp_path):
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]
    cache = shutil.copytree(cache, tmp_path / "cache")  # damaged below: the module's other tests keep theirs
    path = cache / mm.DIRS["tiny-vl-seeing"]
    assert (path / "config.json").exists()
    assert json.load(open(path / "config.json"))["vision_stage"]["align_steps"] == 2
    import common
    monkeypatch.setattr(common, "CACHE_DIR", str(cache))
    model, processor = load_model("tiny-vl-seeing", vl_task=True)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a damaged cache
    with pytest.raises(ValueError, match=r"rebuild it with `python make_models.py tiny-vl-seeing --force`"):
        load_model("tiny-vl-seeing", vl_task=True)
    (path / "config.json").write_text('{"model_type": "idefics3", ')  # a config cut off mid-write: the same hint
    hint = r"is damaged \(.*config\.json.*rebuild it with `python make_models.py tiny-vl-seeing --force`"
    with pytest.raises(ValueError, match=hint):
        load_model("tiny-vl-seeing", vl_task=True)


def test_a_non_finite_loss_stops_the_stage(monkeypatch):
    """The stage stops before its weights are saved (make_models.py saves only after vision_stage returns)."""
    vlm, processor = mm.build_tiny(True)
    monkeypatch.setattr(sys, "argv", ["make_models.py"])  # the script name the message starts with
    with pytest.raises(SystemExit, match=r"^make_models.py: error: non-finite vision stage loss \(\[(nan|inf|-inf)\]\) "
                                         r"at part A step 1; stopping without writing a checkpoint \(lower the stage's "
                                         r"learning rates\)$"):
        mm.vision_stage(vlm, processor, dataclasses.replace(TINY_STAGE, tower_lr=1e38), log=lambda line: None)


def test_vision_stage_benchmark_runs(cache):
    env = {**os.environ, "SFTVSRL_CACHE": str(cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_vision_stage.py"), "--model-path",
                          "tiny-vl-seeing", "--steps", "1", "--batch", "3"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "full / prefix cached:" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("cmd, printed", [
    (["probe_sign_reading.py", "--model", "tiny", "--steps", "2", "--batch-size", "2", "--test-views", "2"],
     "fresh v5 views: category"),
    (["probe_sign_names.py", "--model-path", "tiny-vl-seeing", "--steps", "1", "--batch-size", "2", "--eval-every", "1",
      "--eval-scenes", "2"], "step 1 trained pairs: names exact"),
    (["probe_sign_names.py", "--model-path", "tiny-vl-seeing", "--steps", "1", "--batch-size", "2", "--eval-every", "1",
      "--eval-scenes", "2", "--layout", "tokens"], "step 1 trained pairs: names exact"),
])
def test_issue_14_probes_run_end_to_end(cache, cmd, printed):
    """The probes behind docs/models.md's street-view measurements, on the tiny model (seconds)."""
    env = {**os.environ, "SFTVSRL_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "probes", cmd[0]), *cmd[1:]], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and printed in out.stdout, out.stderr[-3000:]
