#!/usr/bin/env bash
# PaLMR on Qwen2.5-VL-7B-Instruct, one node of 8 x H100-80GB: the paper's setup (METHOD.md section 3).
#   bash runs/qwen25vl_7b_8xh100.sh [more grpo.py flags, which override these]
#   bash runs/qwen25vl_7b_8xh100.sh --resume      # continue out/palmr_7b (a second plain start there is refused)
# Needs a local copy of the model (no hub access at run time) and a PaDLayer training file.
#
# GPUs: 0-6 train (7 torchrun ranks, FSDP2 + one colocated vLLM engine each), 7 serves the judge
# (Qwen3-30B-A3B, reasoning on, `vllm serve`), as METHOD.md section 3 has it.
# Batch arithmetic (global counts, over the 7 training ranks). The paper's 512 / 128 prompts do not
# divide over 7 ranks, so this preset uses the nearest multiples of 7 (ours):
#   rollout batch 448 prompts x G 16      = 7168 completions per step, 1024 per rank
#   update batch 112 prompts              -> 448 / 112 = 4 optimizer steps per rollout batch (as the paper's 512 / 128)
#   per rank and update: 112 / 7 x 16     = 256 sequences = 64 micro-batches of 4 (accumulated)
#   20 epochs over ~4.7K items            = ~94K prompts / 448 = ~210 steps
# vLLM per rank: 35% of the GPU (weights bf16 ~16 GB + KV cache); it sleeps (level 1) while FSDP trains.
# Status: the vLLM engine follows vLLM 0.26.0's API; it has run on one GPU only (tiny Qwen2.5-VL, one rank:
# docs/gpu_h200_checks.txt), this preset not at all;
# the judge client (--judge openai) is tested against a local fault-injecting server, not yet against
# a served Qwen3-30B-A3B.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/Qwen2.5-VL-7B-Instruct}   # local folder
DATA=${DATA:-data/palmr/train.jsonl}           # output of the PaDLayer pipeline (facts + references)
JUDGE=${JUDGE:-models/Qwen3-30B-A3B}           # local folder of the judge LLM

mkdir -p out
# the judge, alone on GPU 7 (an OpenAI-compatible server on 127.0.0.1:8000)
CUDA_VISIBLE_DEVICES=7 vllm serve "$JUDGE" --served-model-name judge --host 127.0.0.1 --port 8000 \
  --gpu-memory-utilization 0.9 --max-model-len 16384 > out/judge_server.log 2>&1 &
JUDGE_PID=$!
trap 'kill $JUDGE_PID' EXIT
until curl -sf http://127.0.0.1:8000/v1/models > /dev/null; do sleep 5; done

args=(
  --model "$MODEL" --data "$DATA" --out out/palmr_7b
  # rollout: G 16, temperature 1.0, top_p 1.0 (paper); lengths are ours (paper: not reported)
  --group-size 16 --rollout-batch 448 --update-batch 112 --temperature 1.0 --top-p 1.0
  # sampler: colocated vLLM; sequence-level IS correction for the bf16 sampler/trainer mismatch
  --engine vllm --vllm-gpu-memory 0.35 --is-cap 2.0
  --max-new-tokens 2048 --max-prompt-tokens 4096 --max-pixels 1003520
  # reward: the gated PaLMR fusion, judged pairwise by the served LLM with its reasoning on (paper);
  # 7 ranks x 32 requests in flight; long timeout because reasoning replies run to thousands of tokens
  --reward palmr --judge openai --judge-base-url http://127.0.0.1:8000/v1 --judge-model judge
  --judge-protocol pairwise --judge-concurrency 32 --judge-timeout 600 --judge-max-tokens 8192
  # optimisation: lr 1e-6 (paper); weight decay 1e-2, beta 1e-2 (k3), clip 0.2 / 0.28 are ours
  --lr 1e-6 --weight-decay 1e-2 --beta 1e-2 --eps-low 0.2 --eps-high 0.28 --max-grad-norm 1.0
  --micro-batch 4 --activation-checkpointing   # fused log-probs in 704-row blocks at --logprob-memory 1024 (the GPU default)
  --max-steps 210 --save-every 20 --keep 3 --log-rollouts-every 10
)
CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6 VLLM_ENABLE_V1_MULTIPROCESSING=0 \
  torchrun --nproc_per_node 7 grpo.py "${args[@]}" "$@"
