#!/usr/bin/env bash
# The paper's pipeline on GP-L (TASK=gp-l, the default) or V-IRL-L (TASK=virl-l) with the embedded default model
# (SmolLM2-135M-Instruct), sized for a 2-core CPU:
#   1. a short SFT makes the initial checkpoint (skipped when it already exists);
#   2. from it, the RL arm (ppo_generalpoints.py or ppo_virl.py) ...
#   3. ... and the SFT arm (sft.py started from the same checkpoint), given the same training FLOPs as the RL arm
#      (6N per trained token for SFT; 6N(D_RL) + 2N D_buffer for PPO, as in the paper's compute accounting);
#   4. eval.py evaluates the init and every saved checkpoint of both arms on ID and rule-OOD: the table, the paired
#      tests, and curves_$TASK.png with both arms against training FLOPs since the init (x = 0 at the init).
# Every knob is an environment variable so that the same script runs the tiny smoke version in tests.
set -euo pipefail
cd "$(dirname "$0")/.."

TASK=${TASK:-gp-l}                           # gp-l | virl-l
MODEL=${MODEL:-default}                      # sft.py --model-path for the initial checkpoint
SEED=${SEED:-42}                             # init and RL arm; the SFT arm trains on SEED + 1000's examples
CURVE_POINTS=${CURVE_POINTS:-1}              # checkpoints per arm on the curves (each one is evaluated)
TAG=${TAG:-$TASK}                            # run-name prefix
INIT_STEPS=${INIT_STEPS:-30}                 # SFT steps (x8 examples) of the initial checkpoint
LR=${LR:-1e-5}                               # the shared learning rate of both arms (paper: one LR per experiment)
# RL arm, sized by the sweep in the README (Results): 8 updates x 32 fresh single-turn episodes, 2 PPO epochs
PPO_UPDATES=${PPO_UPDATES:-8}
PPO_ENVS=${PPO_ENVS:-32}
PPO_STEPS=${PPO_STEPS:-1}
# GP-L trains on single-turn episodes (official enable_verification=False: reset after every answer, so every update
# sees 32 fresh hands); V-IRL keeps whole routes, since a reset after every answer would train on route starts only
[ "$TASK" = gp-l ] && SINGLE_TURN=--no-enable-verification || SINGLE_TURN=
PPO_FLAGS=${PPO_FLAGS:---update-epochs 2 $SINGLE_TURN}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-96}
EVAL_EPISODES=${EVAL_EPISODES:-64}
EXTRA_SFT=${EXTRA_SFT:-}                     # extra flags for every sft.py call (tests: tiny settings)
EXTRA_PPO=${EXTRA_PPO:-}
EXTRA_EVAL=${EXTRA_EVAL:-}
OUT=runs                                     # the PPO scripts always write under runs/
case $TASK in
  gp-l) PPO=ppo_generalpoints.py; EPISODES_FLAG=--gp-num-episodes ;;
  virl-l) PPO=ppo_virl.py; EPISODES_FLAG=--virl-num-episodes ;;
  *) echo "TASK must be gp-l or virl-l, got '$TASK'" >&2; exit 2 ;;
esac

INIT=${INIT:-$OUT/$TAG-init/final}           # an existing initial checkpoint skips step 1
if [ ! -d "$INIT" ]; then
  echo "== 1. initial checkpoint: sft.py ($INIT_STEPS steps)"
  python sft.py --task "$TASK" --model-path "$MODEL" --run-name "$TAG-init" --output-dir "$OUT" \
    --total-steps "$INIT_STEPS" --seed "$SEED" --eval-every 0 $EXTRA_SFT
fi

echo "== 2. RL arm: $PPO from $INIT"
python "$PPO" --task "$TASK" --model-path "$INIT" --exp-name "$TAG-rl-arm" --lr "$LR" --seed "$SEED" \
  --num-updates "$PPO_UPDATES" --num-envs "$PPO_ENVS" --num-steps "$PPO_STEPS" --max-new-tokens "$MAX_NEW_TOKENS" \
  --eval-every 0 --save-every $(( (PPO_UPDATES + CURVE_POINTS - 1) / CURVE_POINTS )) --logprobs-from-sampling $PPO_FLAGS $EXTRA_PPO
RL_RUN=$(ls -dt runs/"$TASK"__"$TAG"-rl-arm__* | head -1)

# Training FLOPs of the RL arm beyond the init, 6N D_RL + 2N D_buffer (its metrics.jsonl), and the number of SFT
# steps with the same FLOPs, 6N D_SFT (N cancels but for PPO's value head, <1% of SmolLM2; D_SFT per step as
# measured by the init run)
read -r RL_TOKENS SFT_STEPS < <(python - "$RL_RUN/metrics.jsonl" "$INIT/trainer_state.json" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
d_rl = max(r.get("compute/tokens_trained", 0) for r in rows)
d_buffer = max(r.get("compute/tokens_generated", 0) for r in rows)
init = json.load(open(sys.argv[2]))
sft_tokens_per_step = init["tokens_trained"] / init["step"]
print(f"{d_rl}+{d_buffer}/3", max(1, round((6 * d_rl + 2 * d_buffer) / (6 * sft_tokens_per_step))))
EOF
)
echo "   RL arm: D_RL + D_buffer/3 = $RL_TOKENS tokens -> the SFT arm gets $SFT_STEPS steps of the same FLOPs"

# sft.py draws the examples of step k from the seed (seed, rank, step): the init's --seed would replay its data (a
# second epoch); another seed gives new examples of the same distribution
echo "== 3. SFT arm: sft.py from $INIT, $SFT_STEPS steps, --seed $((SEED + 1000)) (new examples)"
rm -rf "$OUT/$TAG-sft-arm"
python sft.py --task "$TASK" --model-path "$INIT" --run-name "$TAG-sft-arm" --output-dir "$OUT" --seed $((SEED + 1000)) \
  --total-steps "$SFT_STEPS" --lr "$LR" --warmup-steps 0 --eval-every 0 --no-save-optimizer \
  --save-every $(( (SFT_STEPS + CURVE_POINTS - 1) / CURVE_POINTS )) $EXTRA_SFT

echo "== 4. evaluation: init, SFT arm and RL arm checkpoints; curves against FLOPs"
ARMS=$OUT/$TAG-arms                          # the arms under short names: the curves' legend, the table's columns
rm -rf "$ARMS" && mkdir -p "$ARMS"
ln -s "$PWD/$OUT/$TAG-sft-arm" "$ARMS/sft-arm" && ln -s "$PWD/$RL_RUN" "$ARMS/rl-arm"
python eval.py --task "$TASK" --init-path "$INIT" --run-dir "$ARMS/sft-arm" --run-dir "$ARMS/rl-arm" \
  "$EPISODES_FLAG" "$EVAL_EPISODES" --max-new-tokens "$MAX_NEW_TOKENS" \
  --settings id --settings rule-ood --output-dir "$OUT/$TAG-eval" --overwrite $EXTRA_EVAL
