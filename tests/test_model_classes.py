"""The paper's model classes end to end (issue 16): tiny random Mllama (Llama-3.2-Vision's class), Qwen2-VL and LLaVA
checkpoints that make_models.py builds from config and saves with save_pretrained, loaded by name like real ones.
In process: the Mllama prompt is the official Llama-3 format byte for byte, token-aligned VL inputs follow the
tokens, and the rollout's sampling log-probs equal the scoring forward's. As subprocesses: sft.py -> PPO (both
scripts, one update) -> eval.py on a VL task, per class. No real weights here: this proves the code paths only."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import transformers

import eval as ev
import ppo_generalpoints as ppo
import sft
from envs import GeneralPointsEnv
from make_virl_world import generate_virl_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = {"tiny-mllama": "MllamaForConditionalGeneration", "tiny-qwen2vl": "Qwen2VLForConditionalGeneration",
           "tiny-llava": "LlavaForConditionalGeneration"}
# the end-to-end chain also runs on the default VL layout after the vision pre-training stage (issue 14)
END_TO_END = {**CLASSES, "tiny-vl-seeing": "Idefics3ForConditionalGeneration"}
PPO = ["--num-envs", "2", "--num-steps", "1", "--update-epochs", "1", "--micro-batch-size", "2", "--max-new-tokens",
       "8", "--num-updates", "1", "--eval-every", "0", "--save-every", "0"]

# Q_GeneralPoint_EQN_VL with the ID face-card rule and target 24 (official-prompts.md), written out
GP_VL_ID = ("\n[Task Description]\nYou are an expert 24 points card game player. You are observing these four cards in "
            "the image.\nNote that 'J', 'Q', and 'K' count as '10'., and each card must be used once.\nYour goal is to "
            "output a formula that evaluates to 24 using numbers from the cards and operators such as '+', '-', '*', "
            "'/', '(', ')', and '='.\n\n[Output]\nYour response should be a valid json file in the following format:\n"
            "{\n  \"cards\": [x, y, z, w], where 'J', 'Q', and 'K' count as '10'.,\n  \"number\": [a, b, c, d], where "
            "a, b, c, and d are the numbers on the cards,\n  \"formula\": 'an equation that equals 24',\n}\n\n")
# Llama-3.2-Vision's official prompt (protocol.md 4.2, 5.1): bos, user header, `<|image|>` before the text, eot,
# assistant header; no system block when there is an image
OFFICIAL_TURN_1 = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>" + GP_VL_ID +
                   "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
ANSWER, FEEDBACK = '\n{\n  "cards": [1, 2],\n}', "You failed this trial because you recognized wrong cards"
# a later RL / evaluation turn: the whole conversation re-encoded with the chat template (protocol.md 1.8)
OFFICIAL_TURN_2 = (OFFICIAL_TURN_1 + ANSWER + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n" + FEEDBACK +
                   "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
# the official SFT sequence of a two-answer conversation: later turns hand-built, responses `text<|eot_id|>\n` (5.1)
OFFICIAL_SFT = (OFFICIAL_TURN_1 + ANSWER + "<|eot_id|>\n<|start_header_id|>user<|end_header_id|>\n\n" + FEEDBACK +
                "<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|>\n\n" + "second" + "<|eot_id|>\n")


def run(cmd: list, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, *cmd], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def gp_vl_obs(ood: bool = False) -> dict:
    env = GeneralPointsEnv(language_only=False, face_cards_color="black", ood=ood, treat_face_cards_as_10=not ood,
                           image_size=64)
    return env.reset(seed=1)[0]


@pytest.fixture(scope="module")
def models():
    return {name: sft.load_model(name, vl_task=True) for name in CLASSES}


def test_checkpoints_are_the_real_classes(models):
    for name, (model, processor) in models.items():
        assert type(model).__name__ == CLASSES[name]
        config = json.load(open(os.path.join(sft.prepared_path(name, True), "config.json")))
        assert config["architectures"] == [CLASSES[name]]
    assert type(models["tiny-qwen2vl"][1]).__name__ == "Qwen2VLProcessor"  # without its video processor (torchvision)


def test_mllama_prompt_is_the_official_format(models):
    _, processor = models["tiny-mllama"]
    tok = sft.tokenizer_of(processor)
    obs = gp_vl_obs()
    assert obs["messages"] == [{"role": "user", "content": GP_VL_ID}]
    decode = lambda ids: tok.decode(ids[0] if torch.is_tensor(ids) else ids)
    (sample,) = ppo.encode_prompts(processor, [obs], "gp-vl")  # PPO rollouts
    assert decode(sample["prompt_ids"]) == OFFICIAL_TURN_1
    assert decode(sft.chat_inputs(processor, [obs["messages"]], [obs["image"]])["input_ids"]) == OFFICIAL_TURN_1
    assert decode(ev.chat_inputs(processor, [obs["messages"]], [obs["image"]])["input_ids"]) == OFFICIAL_TURN_1
    assert tok.convert_ids_to_tokens(sample["prompt_ids"]).count("<|image|>") == 1  # one token, cross attention
    turn_2 = obs["messages"] + [{"role": "assistant", "content": ANSWER}, {"role": "user", "content": FEEDBACK}]
    (sample,) = ppo.encode_prompts(processor, [dict(obs, messages=turn_2)], "gp-vl")
    assert decode(sample["prompt_ids"]) == OFFICIAL_TURN_2
    assert decode(ev.chat_inputs(processor, [turn_2], [obs["image"]])["input_ids"]) == OFFICIAL_TURN_2
    # SFT: the official layout behind --official-sft-format; by default the template's (no `\n` after <|eot_id|>)
    conversation = turn_2 + [{"role": "assistant", "content": "second"}]
    e = sft.encode_example(processor, conversation, obs["image"], "all", 4096, eos_newline=True)
    assert decode(e["input_ids"]) == OFFICIAL_SFT
    trained = [i for i, m in zip(e["input_ids"], e["loss_mask"]) if m]
    assert decode(trained) == ANSWER + "<|eot_id|>\n" + "second<|eot_id|>\n"
    e = sft.encode_example(processor, conversation, obs["image"], "all", 4096)
    assert decode(e["input_ids"]) == OFFICIAL_TURN_2 + "second<|eot_id|>"


@pytest.mark.parametrize("name", CLASSES)
def test_token_aligned_inputs_follow_the_tokens(name, models):
    """SFT encodes piece by piece: Mllama's cross_attention_mask and Qwen2-VL's mm_token_type_ids of the first piece
    must come out as the processor gives them for the whole text."""
    _, processor = models[name]
    obs = gp_vl_obs()
    conversation = obs["messages"] + [{"role": "assistant", "content": ANSWER}]
    e = sft.encode_example(processor, conversation, obs["image"], "last", 4096)
    text = processor.apply_chat_template(sft.with_image(conversation), tokenize=False)
    whole = processor(text=[text], images=[[obs["image"]]], add_special_tokens=False, return_tensors="pt")
    n = len(e["input_ids"])
    assert whole["input_ids"][0, :n].tolist() == e["input_ids"]
    for key, value in whole.items():
        if key not in ("input_ids", "attention_mask"):
            expected = value[:, :n] if value.dim() >= 2 and value.shape[:2] == whole["input_ids"].shape else value
            assert torch.equal(e[key], expected), key
    batch = sft.collate([e, dict(e, input_ids=e["input_ids"][:-3], loss_mask=e["loss_mask"][:-3])], pad_id=0)
    assert all(v.shape[:2] == batch["input_ids"].shape for k, v in batch.items() if k in ("cross_attention_mask",
                                                                                          "mm_token_type_ids"))


@pytest.mark.parametrize("name", CLASSES)
def test_rollout_logprobs_equal_the_scoring_forward(name, models):
    """Two prompts of different lengths (left padding): the sampler's log-probs and V(s) from generate() equal those
    of the PPO scoring forward over [prompt, response] (Qwen2-VL: only with its own 3-D M-RoPE positions)."""
    model, processor = models[name]
    torch.manual_seed(0)
    agent = ppo.Agent(model).eval()
    tok = sft.tokenizer_of(processor)
    prompts = ppo.encode_prompts(processor, [gp_vl_obs(False), gp_vl_obs(True)], "gp-vl")
    assert len(prompts[0]["prompt_ids"]) != len(prompts[1]["prompt_ids"])
    config = transformers.GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=10,
                                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    results = ppo.generate(agent, processor, prompts, config, None, "cpu", False, with_logprobs=True)
    samples = [dict(p, response_ids=r["response_ids"], cot_mask=[0.0] * len(r["response_ids"]),
                    answer_mask=[1.0] * len(r["response_ids"])) for p, r in zip(prompts, results)]
    with torch.no_grad():
        _, values, token_logprobs, _ = ppo.get_logprob_and_value(agent, ppo.collate(samples, tok.pad_token_id, "cpu"),
                                                                 temperature=1.0, thought_prob_coef=0.5)
    for i, r in enumerate(results):
        n = len(r["response_ids"])
        assert torch.allclose(token_logprobs[i, :n], r["token_logprobs"], atol=1e-5), name
        assert abs(values[i] - r["value"]) < 1e-5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("virl_world")
    paths = generate_virl_world(d, num_routes=4, num_heldout_routes=2, grid_size=4, pano_size=(128, 64))
    return ["--route-info-path", paths["route_info_path"], "--gps-to-pano-path", paths["gps_to_pano_path"],
            "--panorama-dir", paths["panorama_dir"], "--heldout-route-info-path", paths["heldout_route_info_path"]]


def ppo_records(cwd) -> tuple:
    (run_dir,) = list((cwd / "runs").iterdir())
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")], run_dir / "checkpoints" / "update_0001"


@pytest.mark.parametrize("name", END_TO_END)
def test_sft_ppo_eval_end_to_end(name, tmp_path, world):
    """sft.py (2 steps, GP-VL) -> ppo_generalpoints.py --task gp-vl from that checkpoint (one update) -> eval.py on
    the PPO checkpoint (GP-VL, 2 episodes, 2 turns); ppo_virl.py --task virl-vl from the prepared model (one update).
    Every checkpoint on the way is reloaded from disk as the same class."""
    run([os.path.join(ROOT, "sft.py"), "--task", "gp-vl", "--model-path", name, "--total-steps", "2",
         "--micro-batch-size", "2", "--eval-every", "2", "--eval-episodes", "2", "--eval-batch-size", "2",
         "--max-new-tokens", "8", "--lr", "1e-3", "--warmup-steps", "1", "--output-dir", str(tmp_path),
         "--run-name", "sft"], tmp_path)
    sft_rows = [json.loads(line) for line in open(tmp_path / "sft" / "metrics.jsonl")]
    assert [r["step"] for r in sft_rows if "losses/loss" in r] == [1, 2] and "eval/id_success" in sft_rows[-1]
    assert json.load(open(tmp_path / "sft" / "final" / "config.json"))["architectures"] == [END_TO_END[name]]

    gp = tmp_path / "gp"
    gp.mkdir()
    run([os.path.join(ROOT, "ppo_generalpoints.py"), "--task", "gp-vl", "--model-path", str(tmp_path / "sft" / "final"),
         "--image-size", "64", *PPO], gp)
    rows, ckpt = ppo_records(gp)
    (update,) = [r for r in rows if "losses/pg_loss" in r]
    assert update["update"] == 1 and math.isfinite(update["losses/pg_loss"]) and math.isfinite(update["losses/v_loss"])
    assert json.load(open(ckpt / "config.json"))["architectures"] == [END_TO_END[name]]

    out = tmp_path / "eval"  # the episodes and the recognition probe (describe-id)
    run([os.path.join(ROOT, "eval.py"), "--model-path", str(ckpt), "--task", "gp-vl", "--settings", "id",
         "--settings", "describe-id", "--gp-num-episodes", "2", "--gp-verify-iter", "1", "--max-new-tokens", "4",
         "--gp-image-size", "64", "--output-dir", str(out)], tmp_path)
    episodes = [json.loads(line) for line in open(out / "episodes.jsonl")]
    assert sorted(e["setting"] for e in episodes) == ["describe-id"] * 2 + ["id"] * 2
    assert all(isinstance(t["response"], str) for e in episodes for t in e["turns"])
    metrics = {r["setting"]: r["metrics"] for r in json.load(open(out / "results.json"))["per_setting"]}
    assert metrics["describe-id"]["recognition: per card"][1] == 8 and "first answer: cards recognized" in metrics["id"]

    virl = tmp_path / "virl"
    virl.mkdir()
    run([os.path.join(ROOT, "ppo_virl.py"), "--task", "virl-vl", "--model-path", name, "--resolution", "32", *PPO,
         *world], virl)
    rows, ckpt = ppo_records(virl)
    assert [r["update"] for r in rows if "losses/pg_loss" in r] == [1] and (ckpt / "value_head.pt").exists()
