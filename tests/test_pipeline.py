"""The README's main job (scripts/paper_pipeline_gp_l.sh) end to end on a tiny model: init SFT -> RL arm and
FLOPs-matched SFT arm -> side-by-side evaluation."""
import glob
import json
import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_paper_pipeline_tiny():
    tag = f"pytest-pipeline-{os.getpid()}"
    env = dict(os.environ, MODEL="tiny", TAG=tag, INIT_STEPS="2", PPO_UPDATES="1", PPO_ENVS="2", PPO_STEPS="1",
               MAX_NEW_TOKENS="8", EVAL_EPISODES="2", EXTRA_SFT="--micro-batch-size 2",
               EXTRA_PPO="--micro-batch-size 2")
    try:
        out = subprocess.run(["bash", "scripts/paper_pipeline_gp_l.sh"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "the SFT arm gets" in out.stdout
        results = json.load(open(os.path.join(ROOT, "runs", f"{tag}-eval", "results.json")))
        assert "| init | sft-arm | rl-arm |" in out.stdout
        assert results and os.path.isdir(os.path.join(ROOT, "runs", f"{tag}-sft-arm", "final"))
    finally:
        for path in glob.glob(os.path.join(ROOT, "runs", f"{tag}-*")) + glob.glob(os.path.join(ROOT, "runs", f"gp-l__{tag}-*")):
            shutil.rmtree(path, ignore_errors=True)
