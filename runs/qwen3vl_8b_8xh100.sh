#!/usr/bin/env bash
# PaLMR on Qwen3-VL-8B-Instruct, one node of 8 x H100-80GB: the Qwen2.5-VL-7B preset (runs/qwen25vl_7b_8xh100.sh:
# the paper's hyper-parameters, GPUs 0-6 training with a colocated vLLM each, the judge on GPU 7, the same batch
# arithmetic over 7 ranks) with only what the family changes, each change explained below.
#   bash runs/qwen3vl_8b_8xh100.sh [more grpo.py flags, which override these]
#   bash runs/qwen3vl_8b_8xh100.sh --resume      # continue out/palmr_qwen3vl_8b
# Kept as in the paper (which lists Qwen3-VL-8B among its policies, METHOD.md section 3): lr 1e-6, G 16, sampling
# at temperature 1.0 / top-p 1.0 (RL samples the policy's own distribution; the model card's 0.7 / 0.8 / top-k 20
# are for inference), 2,048 new tokens, the gated reward and its judge.
# Status: the family's training path is tested on CPU (tiny Qwen3-VL: torchrun, resume, shared-prefix parity in
# float64, vLLM weight names); this preset has NOT been run on a GPU by this project.
set -euo pipefail
cd "$(dirname "$0")/.."
export MODEL=${MODEL:-models/Qwen3-VL-8B-Instruct}   # local folder (Qwen3VLForConditionalGeneration)
args=(
  --out out/palmr_qwen3vl_8b
  # images: the same budget of 1,280 merged vision tokens per image as the 7B preset's 1,003,520 px (28 px per
  # merged token there), at Qwen3-VL's 32 px per merged token (16 px patches, 2 x 2 merge): 1280 x 32 x 32
  --max-pixels 1310720
  # vLLM: 8.8B parameters in bf16 (~17.5 GB, the 7B's ~16.6 GB) and its KV cache: 38% of the GPU instead of 35%
  --vllm-gpu-memory 0.38
)
exec bash runs/qwen25vl_7b_8xh100.sh "${args[@]}" "$@"
