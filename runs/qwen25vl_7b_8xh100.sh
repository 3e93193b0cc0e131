#!/usr/bin/env bash
# PaLMR on Qwen2.5-VL-7B-Instruct, one node of 8 x H100-80GB: the paper's setup (METHOD.md section 3).
#   bash runs/qwen25vl_7b_8xh100.sh [more grpo.py flags, which override these]
# Needs a local copy of the model (no hub access at run time) and a PaDLayer training file.
#
# Batch arithmetic (all counts are global, over the 8 ranks):
#   rollout batch 512 prompts x G 16      = 8192 completions per step, 1024 per rank
#   update batch 128 prompts              -> 512 / 128 = 4 optimizer steps per rollout batch
#   per rank and update: 128 / 8 x 16     = 256 sequences = 64 micro-batches of 4 (accumulated)
#   20 epochs over ~4.7K items            = ~94K prompts / 512 = ~184 steps
# Status: the trainer runs this as written with the HF sampling engine, which is far too slow for
# 8192 completions of up to 2048 tokens; the vLLM engine and the LLM judge (Qwen3-30B-A3B served on
# its own GPU) are the next milestones. Until then `--judge rule` only reads shapes-style
# "N colour kind" claims against the facts: on real data that is close to plain GRPO.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/Qwen2.5-VL-7B-Instruct}   # local folder
DATA=${DATA:-data/palmr/train.jsonl}           # output of the PaDLayer pipeline (facts + references)

args=(
  --model "$MODEL" --data "$DATA" --out out/palmr_7b
  # rollout: G 16, temperature 1.0, top_p 1.0 (paper); lengths are ours (paper: not reported)
  --group-size 16 --rollout-batch 512 --update-batch 128 --temperature 1.0 --top-p 1.0
  --max-new-tokens 2048 --max-prompt-tokens 4096 --max-pixels 1003520
  # reward: the gated PaLMR fusion
  --reward palmr --judge rule
  # optimisation: lr 1e-6 (paper); weight decay 1e-2, beta 1e-2 (k3), clip 0.2 / 0.28 are ours
  --lr 1e-6 --weight-decay 1e-2 --beta 1e-2 --eps-low 0.2 --eps-high 0.28 --max-grad-norm 1.0
  --micro-batch 4 --activation-checkpointing --logprob-chunk 512
  --max-steps 184 --save-every 20 --keep 3 --log-rollouts-every 10
)
torchrun --nproc_per_node 8 grpo.py "${args[@]}" "$@"
