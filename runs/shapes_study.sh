#!/usr/bin/env bash
# Process hallucination in miniature on `shapes`: GRPO (answer-only reward) vs PaLMR (gated reward) and
# PaLMR's process-credit variants, from one cached warm start.
#
#   bash runs/shapes_study.sh [OUT]            # default OUT=out/shapes_study; ~40 min on 2 CPU cores
#   SEEDS="0 1 2 3" STEPS=60 bash runs/shapes_study.sh out/study2
#   VARIANTS="grpo palmr" LONG_SEEDS="" bash runs/shapes_study.sh      # the two-row study, ~11 min
#   VARIANTS="grpo vppo vision_sr1 pearl" LONG_SEEDS="" bash runs/shapes_study.sh out/variants   # other methods
#   VARIANTS="grpo grpo+ds palmr palmr+ds" LONG_SEEDS="" bash runs/shapes_study.sh out/ds   # dynamic sampling
#   MODEL=~/.cache/palmr/tiny-qwen3vl VARIANTS="grpo palmr" LONG_SEEDS="" bash runs/shapes_study.sh out/qwen3vl
#                                      # the same study on another family's tiny checkpoint (palmr.TINY)
#
# 1. builds (or finds) the cached warm start: SFT on shapes traces, a share of them misread on purpose;
# 2. from it, for every seed, trains each of VARIANTS for STEPS steps with the same budget and flags:
#      grpo             --reward grpo --credit sequence
#      palmr            --reward palmr --no-judge-omissions --credit sequence  (the paper's gate: contradictions)
#      palmr+omissions  --reward palmr --judge-omissions --credit sequence     (saying less is gated too)
#      palmr+token      --reward palmr --no-judge-omissions --credit token     (located wrong claims get
#                                                                               negative token credit)
#      palmr+both       --reward palmr --judge-omissions --credit token        (the trainer's defaults)
#      vppo             --reward grpo --credit sequence --vppo                 (VPPO on the answer reward)
#      vision_sr1       --reward vision_sr1 --credit sequence                  (self-reward; the rule judge
#                                                                               only logs S_vis)
#      pearl            --reward pearl --credit sequence                       (checklist gate and checklist
#                                                                               groups; the rule judge only logs)
#      grpo+ds, palmr+ds  grpo and palmr with --dynamic-sampling (DAPO's: tied groups redrawn, 4 tries at most)
#      vision_sr1+sft   --reward vision_sr1 --credit sequence --warmup-format description --max-new-tokens 96
#                       (from a warm start in SR1's own format, the cold start its recipe assumes; its
#                       traces are ~20 tokens longer; evaluated under SR1's prompt with 96 tokens)
# 3. continues the LONG_VARIANTS runs of LONG_SEEDS to LONG_STEPS (a --resume of the same run);
# 4. evaluates the start and every checkpoint on the held-out shapes split (greedy): answer accuracy,
#    perception, complete perception and process-hallucination rate, all exact (rule judge);
# 5. writes OUT/results.md (mean ± sd over seeds, then each seed; the versions it ran with) and
#    OUT/curves.png (training reward, rollout accuracy and rollout hallucination rate over steps).
# Runs go JOBS at a time (default 2), one thread each: on 2 cores that beats one run with 2 threads.
# Reproduce the README's table with the pinned environment: pip install torch==2.13.0 -r requirements.txt
# -c constraints.txt, and an empty cache (rm -rf ~/.cache/palmr).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-out/shapes_study}
SEEDS=${SEEDS:-"0 1 2"}
STEPS=${STEPS:-40}
VARIANTS=${VARIANTS:-"grpo palmr palmr+omissions palmr+token palmr+both"}
LONG_STEPS=${LONG_STEPS:-80}
LONG_SEEDS=${LONG_SEEDS-"0"}
LONG_VARIANTS=${LONG_VARIANTS:-"palmr palmr+omissions palmr+token palmr+both"}
WARMUP=${WARMUP:-1200}
JOBS=${JOBS:-2}
LIMIT=${LIMIT:-}  # evaluate the first LIMIT held-out items only (smoke tests)
MODEL=${MODEL:-~/.cache/palmr/tiny-qwen25vl}  # an embedded tiny checkpoint (palmr.TINY), built and warmed if missing
RL=(--model "$MODEL" --warmup-steps "$WARMUP" --group-size 8 --rollout-batch 8 --update-batch 8 --micro-batch 16
    --max-new-tokens 64 --lr 1e-4 --save-every "$STEPS" --keep 2 --log-rollouts-every 0)
flags() {  # the trainer flags of a variant
    case "$1" in
        grpo) echo "--reward grpo --credit sequence" ;;
        palmr) echo "--reward palmr --no-judge-omissions --credit sequence" ;;
        palmr+omissions) echo "--reward palmr --judge-omissions --credit sequence" ;;
        palmr+token) echo "--reward palmr --no-judge-omissions --credit token" ;;
        palmr+both) echo "--reward palmr --judge-omissions --credit token" ;;
        vppo) echo "--reward grpo --credit sequence --vppo" ;;
        vision_sr1) echo "--reward vision_sr1 --credit sequence" ;;
        pearl) echo "--reward pearl --credit sequence" ;;
        vision_sr1+sft) echo "--reward vision_sr1 --credit sequence --warmup-format description --max-new-tokens 96" ;;
        grpo+ds) echo "--reward grpo --credit sequence --dynamic-sampling" ;;
        palmr+ds) echo "--reward palmr --no-judge-omissions --credit sequence --dynamic-sampling" ;;
        *) echo "unknown variant $1 (grpo palmr palmr+omissions palmr+token palmr+both vppo vision_sr1 pearl vision_sr1+sft grpo+ds palmr+ds)" >&2
           return 2 ;;
    esac
}
mkdir -p "$OUT"
start=$(date +%s)
for v in $VARIANTS $LONG_VARIANTS; do flags "$v" > /dev/null; done  # an unknown variant stops here
[ -z "$LONG_SEEDS" ] || [ "$LONG_STEPS" -gt "$STEPS" ] || { echo "LONG_STEPS must exceed STEPS" >&2; exit 2; }

ckpt() { echo "$OUT/$1-s$2/checkpoint-$(printf %06d "$3")"; }
launch() {  # variant seed steps [extra flags]: one run in the background, JOBS at a time
    local run="$OUT/$1-s$2"
    # shellcheck disable=SC2046
    OMP_NUM_THREADS=1 python grpo.py "${RL[@]}" $(flags "$1") --seed "$2" --max-steps "$3" --out "$run" ${4:-} \
        >> "$OUT/$1-s$2.log" 2>&1 &
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
}

WARM=$(python grpo.py --model "$MODEL" --warmup-steps "$WARMUP" --warmup-only | tail -n 1)
echo "warm start: $WARM ($(($(date +%s) - start)) s)"

checkpoints=("start=$WARM")
sr1_checkpoints=()  # policies trained in Vision-SR1's format: evaluated under its prompt
if [[ " $VARIANTS " == *" vision_sr1+sft "* ]]; then
    WARM_SR1=$(python grpo.py --model "$MODEL" --warmup-steps "$WARMUP" --warmup-format description --warmup-only |
               tail -n 1)
    echo "SR1-format warm start: $WARM_SR1 ($(($(date +%s) - start)) s)"
    sr1_checkpoints+=("start_sr1=$WARM_SR1")
fi
for seed in $SEEDS; do
    for v in $VARIANTS; do
        if [ "$v" = "vision_sr1+sft" ]; then sr1_checkpoints+=("$v-s$seed=$(ckpt "$v" "$seed" "$STEPS")")
        else checkpoints+=("$v-s$seed=$(ckpt "$v" "$seed" "$STEPS")"); fi
        [ -d "$(ckpt "$v" "$seed" "$STEPS")" ] && continue  # done in an earlier call
        rm -rf "$OUT/$v-s$seed" "$OUT/$v-s$seed.log"
        launch "$v" "$seed" "$STEPS"
    done
done
wait || true  # a failed run does not stop the others; it shows up as a missing checkpoint below
for seed in $LONG_SEEDS; do
    [[ " $SEEDS " == *" $seed "* ]] || continue  # only runs this study trained
    for v in $LONG_VARIANTS; do
        [[ " $VARIANTS " == *" $v "* ]] || continue
        checkpoints+=("$v@$LONG_STEPS-s$seed=$(ckpt "$v" "$seed" "$LONG_STEPS")")
        # the same run resumed; saving only at the end keeps checkpoint-$STEPS (--keep 2)
        [ -d "$(ckpt "$v" "$seed" "$LONG_STEPS")" ] || launch "$v" "$seed" "$LONG_STEPS" "--resume --save-every $LONG_STEPS"
    done
done
wait || true
for c in "${checkpoints[@]}" "${sr1_checkpoints[@]}"; do
    label=${c%%=*}; [ -d "${c#*=}" ] || { echo "missing ${c#*=}: see $OUT/${label/@*-s/-s}.log" >&2; exit 1; }
done
echo "training done ($(($(date +%s) - start)) s)"

python eval.py --bench shapes --checkpoints "${checkpoints[@]}" --max-new-tokens 64 ${LIMIT:+--limit "$LIMIT"} \
    --out "$OUT/eval" > "$OUT/eval.log" 2>&1
[ ${#sr1_checkpoints[@]} -eq 0 ] || python eval.py --bench shapes --prompt sr1 --checkpoints "${sr1_checkpoints[@]}" \
    --max-new-tokens 96 ${LIMIT:+--limit "$LIMIT"} --out "$OUT/eval_sr1" > "$OUT/eval_sr1.log" 2>&1
python eval.py --study-report "$OUT"
echo "study done in $(($(date +%s) - start)) s: $OUT/results.md, $OUT/curves.png"
