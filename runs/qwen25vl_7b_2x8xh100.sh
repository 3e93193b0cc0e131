#!/usr/bin/env bash
# PaLMR on Qwen2.5-VL-7B-Instruct over two nodes of 8 x H100-80GB (16 training ranks), the judge served apart
# (runs/judge_replicas.sh on a third node). The paper's hyper-parameters, as in runs/qwen25vl_7b_8xh100.sh; what
# two nodes change is explained below. Run the same command on both nodes:
#   HEAD=node0.cluster JUDGE_URLS=http://judge0:8000/v1,...,http://judge0:8007/v1 bash runs/qwen25vl_7b_2x8xh100.sh
# Rendezvous (torchrun's c10d, no node rank to hand out):
#   HEAD        a host every node reaches (one of the training nodes); its port RDZV_PORT (29500) must be open
#   RUN_ID      one id per job: the nodes that give the same id form one job (default palmr-7b-2x8)
#   NNODES      nodes of the job (2); each starts 8 ranks (NPROC, its GPUs)
# Folders: --out must be one folder both nodes see (a shared file system): global rank 0 writes the logs and the
# checkpoint's Hugging Face folder, every rank writes its own shards of the AdamW state (DCP) and reads them
# back on resume, on any number of ranks. MODEL and DATA are read by every rank: local copies at the same path
# on each node, or the shared file system. Caches (~/.cache/palmr) are per node; PALMR_SHARED_CACHE=1 if shared.
# Batch arithmetic (global counts, over 16 ranks): the paper's own numbers divide evenly now
#   rollout batch 512 prompts x G 16      = 8192 completions (judge requests) per step, 512 per rank
#   update batch 128 prompts              -> 4 optimizer steps per rollout batch (paper)
#   per rank and update: 128 / 16 x 16    = 128 sequences = 32 micro-batches of 4 (accumulated)
#   20 epochs over ~4.7K items            = ~94K prompts / 512 = ~184 steps
# Judge: every rank sends its 512 requests as soon as its rollouts exist; they are graded while the trainer
# computes the reference and old log-probs (--judge-overlap, on by default). 4 in flight per rank per replica:
# 16 ranks x 4 = 64 per replica, spread over JUDGE_URLS (fewest in flight first; a dead replica is skipped).
# Status: NOT run on GPUs or across real nodes by this project. What is tested (CPU, one machine): two torchrun
# agents with c10d rendezvous on 127.0.0.1 train exactly what one agent with 2 ranks trains; sharded checkpoints
# resume on another number of ranks; several judge endpoints with one killed mid-run (README "Running on
# several nodes"). Not tested: NCCL between machines, vLLM on GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/Qwen2.5-VL-7B-Instruct}   # local folder, the same path on every node
DATA=${DATA:-data/palmr/train.jsonl}           # output of the PaDLayer pipeline (facts + references)
: "${HEAD:?set HEAD to the rendezvous host, e.g. HEAD=node0.cluster}"
: "${JUDGE_URLS:?set JUDGE_URLS to the judge replicas, comma-separated (runs/judge_replicas.sh prints them)}"

args=(
  --model "$MODEL" --data "$DATA" --out out/palmr_7b_2x8
  # rollout: G 16, temperature 1.0, top_p 1.0 (paper); the paper's 512 / 128 prompts, now divisible by the ranks
  --group-size 16 --rollout-batch 512 --update-batch 128 --temperature 1.0 --top-p 1.0
  # sampler: colocated vLLM on every GPU (tensor parallel 1: a group never crosses a node anyway)
  --engine vllm --vllm-gpu-memory 0.35 --is-cap 2.0
  --max-new-tokens 2048 --max-prompt-tokens 4096 --max-pixels 1003520
  # reward: the gated PaLMR fusion, judged pairwise by the served judge with its reasoning on (paper)
  --reward palmr --judge openai --judge-base-url "$JUDGE_URLS" --judge-model judge
  --judge-protocol pairwise --judge-concurrency 4 --judge-timeout 600 --judge-max-tokens 8192
  # optimisation: lr 1e-6 (paper); weight decay 1e-2, beta 1e-2 (k3), clip 0.2 / 0.28 are ours
  --lr 1e-6 --weight-decay 1e-2 --beta 1e-2 --eps-low 0.2 --eps-high 0.28 --max-grad-norm 1.0
  --micro-batch 4 --activation-checkpointing
  --max-steps 184 --save-every 20 --keep 3 --log-rollouts-every 10
)
VLLM_ENABLE_V1_MULTIPROCESSING=0 torchrun --nnodes "${NNODES:-2}" --nproc-per-node "${NPROC:-8}" \
  --rdzv-backend c10d --rdzv-endpoint "$HEAD:${RDZV_PORT:-29500}" --rdzv-id "${RUN_ID:-palmr-7b-2x8}" \
  grpo.py "${args[@]}" "$@"
