#!/usr/bin/env bash
# PaLMR on Qwen3.5-9B (natively multimodal, 3 Gated DeltaNet linear-attention layers per full-attention layer),
# one node of 8 x H100-80GB: the Qwen2.5-VL-7B preset (runs/qwen25vl_7b_8xh100.sh: the paper's hyper-parameters,
# GPUs 0-6 training with a colocated vLLM each, the judge on GPU 7, the same batch arithmetic over 7 ranks) with
# only what the family changes, each change explained below.
#   bash runs/qwen35_9b_8xh100.sh [more grpo.py flags, which override these]
#   bash runs/qwen35_9b_8xh100.sh --resume      # continue out/palmr_qwen35_9b
# Kept as in the paper: lr 1e-6, G 16, temperature 1.0 / top-p 1.0 (the card's thinking-mode 1.0 / 0.95 / top-k 20
# is for inference), 2,048 new tokens, the gated reward and its judge. Nothing to set for the template: Qwen3.5's
# generation prompt opens '<think>\n' itself (thinking mode), and the trainer, the rewards and the judge read that
# prefill as part of the answer (palmr.generation_prefill).
# Speed: transformers runs the linear-attention layers through flash-linear-attention and causal-conv1d when they
# are installed (pip install flash-linear-attention causal-conv1d), else through a much slower PyTorch reference.
# Status: the family's training path is tested on CPU (tiny Qwen3.5: torchrun, resume, padding, vLLM weight names);
# this preset has NOT been run on a GPU by this project, nor has vLLM's prefix caching for hybrid models.
set -euo pipefail
cd "$(dirname "$0")/.."
export MODEL=${MODEL:-models/Qwen3.5-9B}   # local folder (Qwen3_5ForConditionalGeneration)
args=(
  --out out/palmr_qwen35_9b
  # images: the same budget of 1,280 merged vision tokens as the 7B preset, at 32 px per merged token (Qwen3.5's
  # 16 px patches, 2 x 2 merge): 1280 x 32 x 32
  --max-pixels 1310720
  # vLLM: ~9.7B parameters in bf16 (~19 GB) and its KV cache (a quarter of the layers keep one; the others a
  # fixed-size recurrent state): 40% of the GPU instead of 35%
  --vllm-gpu-memory 0.40
  # the shared-prefix forward is off on GPUs by default, and never on for this family (its linear-attention layers
  # carry one state along the sequence): the trainer says so in one line and uses the per-row layout
)
exec bash runs/qwen25vl_7b_8xh100.sh "${args[@]}" "$@"
