"""The README's main job (scripts/paper_pipeline.sh) end to end on a tiny model: init SFT -> RL arm and
FLOPs-matched SFT arm (new examples) -> evaluation of the init and both arms' checkpoints, curves against FLOPs."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("task", ["gp-l", "virl-l"])
def test_paper_pipeline_tiny(task):
    tag = f"pytest-pipeline-{task}-{os.getpid()}"
    env = dict(os.environ, TASK=task, MODEL="tiny", TAG=tag, INIT_STEPS="2", PPO_UPDATES="1", PPO_ENVS="2", PPO_STEPS="1",
               MAX_NEW_TOKENS="8", EVAL_EPISODES="2", EXTRA_SFT="--micro-batch-size 2",
               EXTRA_PPO="--micro-batch-size 2", CURVE_POINTS="2", SEED="7")
    try:
        out = subprocess.run(["bash", "scripts/paper_pipeline.sh"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "the SFT arm gets" in out.stdout and "--seed 1007 (new examples)" in out.stdout
        results = json.load(open(os.path.join(ROOT, "runs", f"{tag}-eval", "results.json")))
        labels = [c["label"] for c in results["checkpoints"]]
        assert labels[0] == "init" and "sft-arm/final" in labels and "rl-arm/update_0001" in labels, labels
        assert "| init | sft-arm/" in out.stdout and os.path.getsize(os.path.join(ROOT, "runs", f"{tag}-eval",
                                                                                   f"curves_{task}.png")) > 1000
        sft_args = json.load(open(os.path.join(ROOT, "runs", f"{tag}-sft-arm", "final", "trainer_state.json")))["args"]
        init_args = json.load(open(os.path.join(ROOT, "runs", f"{tag}-init", "final", "trainer_state.json")))["args"]
        assert (init_args["seed"], sft_args["seed"]) == (7, 1007)  # the SFT arm's data stream is not the init's
    finally:
        for path in glob.glob(os.path.join(ROOT, "runs", f"{tag}-*")) + glob.glob(os.path.join(ROOT, "runs", f"{task}__{tag}-*")):
            shutil.rmtree(path, ignore_errors=True)


def test_curves_count_both_arms_from_the_init(tmp_path):
    """eval.find_checkpoints: a PPO checkpoint's X = 6N(D_init + D_RL) + 2N D_buffer loses its 6N D_init, so that both
    arms start at x = 0 at the shared init, where sft.py's 6N D already starts."""
    sys.path.insert(0, ROOT)
    import eval as ev
    n, d_init = 1000, 500
    states = {"sft/final": dict(step=4, tokens_trained=200, tokens_generated=0, d_init_tokens=d_init,
                                flops=6 * n * 200),
              "ppo/checkpoints/update_0002": dict(step=2, tokens_trained=300, tokens_generated=90, d_init_tokens=d_init,
                                                  flops=6 * n * (d_init + 300) + 2 * n * 90, global_step=8)}
    for path, state in states.items():
        os.makedirs(tmp_path / path)
        (tmp_path / path / "config.json").write_text("{}")
        (tmp_path / path / "trainer_state.json").write_text(json.dumps(state))
    (sft,), (ppo,) = ev.find_checkpoints(str(tmp_path / "sft")), ev.find_checkpoints(str(tmp_path / "ppo"))
    assert sft["flops"] == 6 * n * 200 and abs(ppo["flops"] - (6 * n * 300 + 2 * n * 90)) < 1e-6 * ppo["flops"]
