"""One V-GRPO trainer step at a real model's shape: per-phase time, tokens/s, achieved TFLOP/s and MFU.

    python bench/step.py --shape tiny --steps 3                                   # CPU, seconds (a test runs it)
    python bench/step.py --shape qwen2.5-vl-3b --steps 4 --engine vllm --nproc 1  # one GPU
    python bench/step.py --shape qwen2.5-vl-7b --steps 4 --engine hf -- --micro-batch 4   # extra grpo.py flags after --

The policy is built with random weights from the shape's public config alone (no download: text and
vision dimensions of Qwen/Qwen2.5-VL-{3B,7B}-Instruct's config.json) and the tiny checkpoint's
tokenizer; the data is the synthetic shapes task. The real trainer runs (`torchrun grpo.py`, reward
grpo, no warm start) and writes its phase times to metrics.jsonl: rollout, reward, reference and old
log-probs, policy forward+backward, optimizer, weight sync. FLOPs are counted from the config: 2 per
parameter per token forward (vision tower over image patches, language model over prompt + completion
tokens, the LM head over completion tokens only), backward twice the forward (three times with
activation checkpointing, which recomputes it). Rollout FLOPs count the prefill and one forward per
generated token (no attention term: short sequences). MFU is against a matmul peak measured on the same
device in the same run (bf16 on CUDA, fp32 on CPU). Tokens/s: completion tokens generated (rollout),
prompt + completion tokens scored (log-prob and policy phases; under the trainer's --shared-prefix layout,
on by default on CPU, each prompt and its image count once per group piece of a micro-batch, as
computed and as FLOPs are counted; so tokens/s is not comparable between the layouts, MFU is). Steps after the first are averaged (the
first allocates and warms caches). Phase times are rank 0's.
STATUS: the tiny shape runs on CPU in the tests; the 3B and 7B shapes have not been run by this project
on a GPU yet (no GPU machine was lent to the session that wrote it).
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Public configs (Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct config.json): the dimensions only
SHAPES = {
    "qwen2.5-vl-3b": dict(text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                    num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
                          vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048)),
    "qwen2.5-vl-7b": dict(text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                    num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
                          vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584)),
}
PHASES = ["t_rollout", "t_reward", "t_ref_logprobs", "t_old_logprobs", "t_policy", "t_optimizer", "t_weight_sync"]


def build_policy(shape, out):
    """A checkpoint folder at `shape`: the tiny one, or random weights (bf16) at a public shape with the
    tiny tokenizer and processor files."""
    import torch
    import palmr
    path = palmr.build_tiny_checkpoint(out)
    if shape == "tiny":
        return path
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    old = json.loads((Path(path) / "config.json").read_text())
    text = {**old["text_config"], **SHAPES[shape]["text"], "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0}}
    vision = {**old["vision_config"], **SHAPES[shape]["vision"], "fullatt_block_indexes": [7, 15, 23, 31]}
    keep = {k: old[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"], **keep)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    for f in Path(path).glob("model*.safetensors"):
        f.unlink()
    model.save_pretrained(path)
    return path


def parameter_counts(path):
    """(vision tower, language model without embeddings and head, LM head) parameter counts from config.json."""
    c = json.loads((Path(path) / "config.json").read_text())
    t, v = c["text_config"], c["vision_config"]
    H, I, L, V = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["vocab_size"]
    head_dim = H // t["num_attention_heads"]
    kv = t["num_key_value_heads"] * head_dim
    lm = L * (H * H + 2 * H * kv + H * H + 3 * H * I)             # q, k, v, o projections and the gated MLP
    vh, vi = v["hidden_size"], v["intermediate_size"]
    vision = v["depth"] * (4 * vh * vh + 3 * vh * vi) + (3 * 2 * 14 * 14) * vh + 4 * vh * vh * 4 + 4 * vh * v["out_hidden_size"]
    return vision, lm, H * V


def matmul_peak(device):
    """Achieved FLOP/s of a large square matmul (bf16 on CUDA, fp32 on CPU): the MFU denominator."""
    import torch
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def prompt_sharing(run_args, rows_per_rank):
    """Rows per prompt forward in the trainer's log-prob passes: 1 per row, or with --shared-prefix the rows
    over the (micro-batch, group) pieces that --micro-batch cuts them into (a group split over two
    micro-batches computes its prompt twice). --micro-tokens splits by tokens at run time: not modelled."""
    if not run_args.get("shared_prefix"):
        return 1.0
    assert not run_args.get("micro_tokens"), "bench/step.py counts FLOPs for --micro-batch splits only"
    G, size = run_args["group_size"], run_args["micro_batch"]
    pieces = sum(len({i // G for i in range(start, min(start + size, rows_per_rank))})
                 for start in range(0, rows_per_rank, size))
    return rows_per_rank / pieces


def phase_flops(counts, m, act_ckpt, shared_by=1):
    """FLOPs per phase of one step (all ranks) from parameter counts and the step's mean token counts per
    row (prompt_len counts the image placeholders, which the language model processes like any token).
    shared_by: rows per prompt forward in the trainer's phases (prompt_sharing); rollout always counts a
    prefill per row."""
    vision, lm, head = counts
    rows = m["rows"]
    prompt, completion, patches = m["prompt_len"] * rows, m["completion_len"] * rows, m["image_patches"] * rows
    forward = 2 * (vision * patches + lm * (prompt + completion) + head * completion)
    scored = 2 * (vision * patches / shared_by + lm * (prompt / shared_by + completion) + head * completion)
    return {"t_rollout": forward,  # prefill + one forward per generated token: the same count, no recompute
            "t_ref_logprobs": scored if m.get("t_ref_logprobs") else 0.0,   # absent: the phase did not run
            "t_old_logprobs": scored if m.get("t_old_logprobs") else 0.0,
            "t_policy": scored * (4 if act_ckpt else 3)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=type("Help", (
        argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}))  # defaults shown
    ap.add_argument("--shape", default="tiny", choices=["tiny", *SHAPES])
    ap.add_argument("--steps", type=int, default=3, help="trainer steps; the first is not averaged")
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    ap.add_argument("--nproc", type=int, default=1, help="processes (GPUs) for torchrun")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--rollout-batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default="out/bench_step")
    ap.add_argument("extra", nargs="*", help="more grpo.py flags, after --")
    a = ap.parse_args(argv)
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(a.out)
    policy = build_policy(a.shape, out / f"policy-{a.shape}")
    run = out / f"run-{a.shape}-{a.engine}"
    if run.exists():
        import shutil
        shutil.rmtree(run)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.nproc), str(ROOT / "grpo.py"),
           "--model", policy, "--warmup-steps", "0", "--reward", "grpo", "--judge", "none", "--engine", a.engine,
           "--max-steps", str(a.steps), "--group-size", str(a.group_size), "--rollout-batch", str(a.rollout_batch),
           "--update-batch", str(a.rollout_batch), "--max-new-tokens", str(a.max_new_tokens), "--out", str(run),
           "--save-every", str(10 ** 6), "--log-rollouts-every", "0", *a.extra]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"grpo.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows
    mean = {k: statistics.mean(r.get(k, 0.0) for r in timed) for k in PHASES + ["prompt_len", "completion_len", "image_patches"]}
    mean["rows"] = a.rollout_batch * a.group_size
    peak = matmul_peak(device)
    shared_by = prompt_sharing(json.loads((run / "args.json").read_text()), a.rollout_batch // a.nproc * a.group_size)
    flops = phase_flops(parameter_counts(policy), mean, "--activation-checkpointing" in a.extra, shared_by)
    tokens = mean["rows"] * (mean["prompt_len"] / shared_by + mean["completion_len"])
    report = {"shape": a.shape, "engine": a.engine, "rows_per_prompt_forward": shared_by, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "nproc": a.nproc, "steps": a.steps, "peak_tflops": peak / 1e12 * a.nproc,
              "tokens_per_step": tokens, "completion_tokens_per_step": mean["rows"] * mean["completion_len"],
              "wall_s": time.time() - start,
              "phases": {}}
    step_time = sum(mean[p] for p in PHASES)
    for p in PHASES:
        t, f = mean[p], flops.get(p)
        processed = report["completion_tokens_per_step"] if p == "t_rollout" else tokens  # generated / scored
        report["phases"][p[2:]] = {"s": t, "share": t / step_time if step_time else 0.0,
                                   "tokens_per_s": processed / t if t and f else None,
                                   "tflops": f / t / 1e12 if f and t else None,
                                   "mfu": f / t / (peak * a.nproc) if f and t else None}
    lines = [f"{a.shape} | {a.engine} | {report['device']} x {a.nproc} | {tokens:.0f} tokens/step "
             f"({report['completion_tokens_per_step']:.0f} completion) | matmul peak {report['peak_tflops']:.2f} TFLOP/s",
             "| phase | s/step | share | tokens/s | TFLOP/s | MFU |", "|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for name, r in report["phases"].items():
        lines.append(f"| {name} | {r['s']:.3f} | {r['share']:.0%} | {fmt(r['tokens_per_s'], '.0f')} | "
                     f"{fmt(r['tflops'], '.3f')} | {fmt(r['mfu'], '.1%')} |")
    print("\n".join(lines))
    (out / f"step-{a.shape}-{a.engine}.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
