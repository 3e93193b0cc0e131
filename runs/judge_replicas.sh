#!/usr/bin/env bash
# The paper's judge (Qwen3-30B-A3B, reasoning on) served by several vLLM replicas on a node of its own, one replica
# per GPU on ports PORT, PORT+1, ...; prints the --judge-base-url list for the trainer (runs/qwen25vl_7b_2x8xh100.sh
# reads it as JUDGE_URLS). Perception-R1 gave its judge 8 dedicated GPUs; so does this default.
#   bash runs/judge_replicas.sh                 # 8 replicas on GPUs 0-7, ports 8000-8007, until Ctrl-C
#   REPLICAS=4 PORT=9000 bash runs/judge_replicas.sh
# How many replicas: a step sends R = rollout batch x G requests (x 2 with --judge-swap). The trainer hides the
# judge behind its reference and old log-prob passes (--judge-overlap), so the judge is free while it finishes
# within them: replicas >= R x s / (c x P), with s the seconds per request at c requests in flight per replica,
# and P the passes' seconds per step (t_ref_logprobs + t_old_logprobs in metrics.jsonl). Measure s and P on the
# first steps: the trainer logs judge/latency (s) and t_judge (the judge's wall time per step); while t_reward
# stays near 0, the judge costs no step time; when it grows, add replicas (or raise the per-replica concurrency
# while the replicas' own latency holds). bench/judge_overlap.py shows where the overlap stops hiding the judge.
# Example (paper scale, 512 x 16 = 8192 requests): s = 20 s for a reasoning reply at c = 64, P = 120 s ->
# 8192 x 20 / (64 x 120) = 21 replicas; at P = 300 s, 9. The figures of this example are illustrative, not measured.
# One replica per GPU: the 30B MoE in bf16 (~61 GB) fits one H100-80GB with a small KV cache; with vLLM's own
# --data-parallel-size N instead, one endpoint balances inside vLLM (then pass that single URL).
# Status: NOT run by this project (no GPU); the client side is tested against local servers (tests/test_judge.py).
set -euo pipefail
cd "$(dirname "$0")/.."
JUDGE=${JUDGE:-models/Qwen3-30B-A3B}   # local folder of the judge LLM
REPLICAS=${REPLICAS:-8}
PORT=${PORT:-8000}
HOST=${HOST:-0.0.0.0}                  # reachable from the training nodes
NAME=${NAME:-$(hostname -f)}           # how the training nodes reach this one

mkdir -p out
pids=()
for i in $(seq 0 $((REPLICAS - 1))); do
  CUDA_VISIBLE_DEVICES=$i vllm serve "$JUDGE" --served-model-name judge --host "$HOST" --port $((PORT + i)) \
    --gpu-memory-utilization 0.9 --max-model-len 16384 > "out/judge_replica_$i.log" 2>&1 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null' EXIT
urls=()
for i in $(seq 0 $((REPLICAS - 1))); do
  until curl -sf "http://127.0.0.1:$((PORT + i))/v1/models" > /dev/null; do sleep 5; done
  urls+=("http://$NAME:$((PORT + i))/v1")
done
echo "judge ready: JUDGE_URLS=$(IFS=,; echo "${urls[*]}")"
wait
