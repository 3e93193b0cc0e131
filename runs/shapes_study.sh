#!/usr/bin/env bash
# Process hallucination in miniature: GRPO (answer-only reward) vs PaLMR (gated reward) on `shapes`.
#
#   bash runs/shapes_study.sh [OUT]            # default OUT=out/shapes_study; ~11 min on 2 CPU cores
#   SEEDS="0 1 2 3" STEPS=60 bash runs/shapes_study.sh out/study2
#
# 1. builds (or finds) the cached warm start: SFT on shapes traces, a share of them misread on purpose;
# 2. from it, for every seed, trains --reward grpo and --reward palmr with the same budget and flags;
# 3. evaluates the start and every run on the held-out shapes split (greedy): answer accuracy,
#    perception accuracy and process-hallucination rate, all exact (rule judge against the true scene);
# 4. writes OUT/results.md (mean ± sd over seeds, then each seed) and OUT/curves.png (training reward,
#    rollout accuracy and rollout hallucination rate over steps).
# Runs go JOBS at a time (default 2), one thread each: on 2 cores that beats one run with 2 threads.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-out/shapes_study}
SEEDS=${SEEDS:-"0 1 2"}
STEPS=${STEPS:-40}
WARMUP=${WARMUP:-1200}
JOBS=${JOBS:-2}
LIMIT=${LIMIT:-}  # evaluate the first LIMIT held-out items only (smoke tests)
RL=(--warmup-steps "$WARMUP" --max-steps "$STEPS" --group-size 8 --rollout-batch 8 --update-batch 8
    --micro-batch 16 --max-new-tokens 64 --lr 1e-4 --save-every "$STEPS" --keep 1 --log-rollouts-every 0)
mkdir -p "$OUT"
start=$(date +%s)

WARM=$(python grpo.py --warmup-steps "$WARMUP" --warmup-only | tail -n 1)
echo "warm start: $WARM ($(($(date +%s) - start)) s)"

checkpoints=("start=$WARM")
for seed in $SEEDS; do
    for reward in grpo palmr; do
        run="$OUT/$reward-s$seed"
        checkpoints+=("$reward-s$seed=$run/checkpoint-$(printf %06d "$STEPS")")
        [ -d "$run/checkpoint-$(printf %06d "$STEPS")" ] && continue  # done in an earlier call
        rm -rf "$run"
        OMP_NUM_THREADS=1 python grpo.py "${RL[@]}" --reward "$reward" --seed "$seed" --out "$run" \
            > "$OUT/$reward-s$seed.log" 2>&1 &
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    done
done
wait || true  # a failed run does not stop the others; it shows up as a missing checkpoint below
for c in "${checkpoints[@]}"; do
    [ -d "${c#*=}" ] || { echo "missing ${c#*=}: see $OUT/${c%%=*}.log" >&2; exit 1; }
done
echo "training done ($(($(date +%s) - start)) s)"

python eval.py --bench shapes --checkpoints "${checkpoints[@]}" --max-new-tokens 64 ${LIMIT:+--limit "$LIMIT"} \
    --out "$OUT/eval" > "$OUT/eval.log" 2>&1
python eval.py --study-report "$OUT"
echo "study done in $(($(date +%s) - start)) s: $OUT/results.md, $OUT/curves.png"
