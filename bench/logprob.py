"""Peak extra memory and forward+backward time of LM-head log-prob paths, each in its own process.

    python bench/logprob.py                                    # N=2048, H=512, V=151936, fp32, CPU
    python bench/logprob.py --n 16384 --hidden 3584 --vocab 152064 --dtype bf16 --device cuda   # 7B on a GPU

Variants: `naive` (full logits, log_softmax, gather), `rowloop` (full logits, log_softmax one row at a
time, as TRL's selective_log_softmax), `fused` (kernels.lm_head.fused_logprobs: (chunk, V) blocks, recomputed in
backward), `folded` (kernels.lm_head.fused_policy_loss: the loss gradient computed in the forward pass, what the
trainer uses), and `liger` (Liger-Kernel's Triton fused linear cross-entropy; only where `liger-kernel`
is installed, a benchmark-only extra, never a requirement). Every variant computes the same loss,
sum_i u_i * logp_i with fixed random u (Liger: sum_i -logp_i, its reductions being scalar). Extra memory =
peak minus what the inputs already held (CPU: the process's VmHWM after resetting it; CUDA:
max_memory_allocated). Ratios are against `naive`, measured in the same run. The chunk defaults to the
trainer's (kernels.lm_head.logprob_chunk: 128 on CPU, from --memory-mib on a GPU).
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def naive(hidden, weight, targets, temperature, upstream, chunk):
    logits = (hidden @ weight.T).float() / temperature
    return (logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1) * upstream).sum()


def rowloop(hidden, weight, targets, temperature, upstream, chunk):
    import torch
    logits = (hidden @ weight.T).float() / temperature
    return (torch.stack([row.log_softmax(-1)[t] for row, t in zip(logits, targets)]) * upstream).sum()


def fused(hidden, weight, targets, temperature, upstream, chunk):
    from kernels.lm_head import fused_logprobs
    return (fused_logprobs(hidden, weight, targets, temperature, chunk_size=chunk)[0] * upstream).sum()


def folded(hidden, weight, targets, temperature, upstream, chunk):
    from kernels.lm_head import fused_policy_loss
    return fused_policy_loss(hidden, weight, targets, lambda lp, s, e: lp * upstream[s:e], temperature,
                                  chunk_size=chunk)[0]


def liger(hidden, weight, targets, temperature, upstream, chunk):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    return liger_fused_linear_cross_entropy(hidden / temperature, weight, targets, reduction="sum")


VARIANTS = {"naive": naive, "rowloop": rowloop, "fused": fused, "folded": folded, "liger": liger}


def _rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_variant(a):
    """One variant in this process: -> {"extra_mib", "seconds"} (median of --repeats timed runs)."""
    import torch
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    dev = torch.device(a.device)
    hidden = torch.randn(a.n, a.hidden, device=dev, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(a.vocab, a.hidden, device=dev) * 0.02).to(dtype).requires_grad_(True)
    targets = torch.randint(0, a.vocab, (a.n,), device=dev)
    upstream = torch.randn(a.n, device=dev)
    fn = VARIANTS[a.variant]
    chunk = a.chunk or __import__("kernels.lm_head", fromlist=["logprob_chunk"]).logprob_chunk(a.vocab, dev.type, a.memory_mib)

    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, targets, a.temperature, upstream, chunk).backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    small = torch.randn(8, a.hidden, device=dev, dtype=dtype, requires_grad=True)  # load kernels first
    fn(small, weight, targets[:8], a.temperature, upstream[:8], chunk).backward()
    weight.grad = None
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident size
        step()
        extra = (_rss_kib("VmHWM") - base) * 1024
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"extra_mib": extra / 2 ** 20, "seconds": statistics.median(times), "chunk": chunk}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=type("Help", (
        argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}))  # defaults shown
    ap.add_argument("--n", type=int, default=2048, help="completion tokens (rows)")
    ap.add_argument("--hidden", type=int, default=512, help="hidden size H")
    ap.add_argument("--vocab", type=int, default=151936, help="vocabulary V")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--chunk", type=int, default=None, help="fused/folded: rows per block (default: the trainer's)")
    ap.add_argument("--memory-mib", type=int, default=1024, help="GPU: the (chunk, V) budget the default chunk comes from")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    ap.add_argument("--variants", default="naive,rowloop,fused,folded,liger", help="liger is skipped where not installed")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # set in the child processes
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a)))
        return
    results = {}
    for v in a.variants.split(","):
        if v == "liger" and (a.device == "cpu" or importlib.util.find_spec("liger_kernel") is None):
            print("liger: skipped (needs liger-kernel installed and a GPU)")
            continue
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", v]
        print(f"{v}: measuring ({a.repeats} timed runs in a fresh process) ...", flush=True)  # each takes ~1 min on CPU
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if proc.returncode != 0:
            print(f"{v}: failed\n{proc.stderr[-2000:]}")
            continue
        results[v] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{v}: {results[v]['seconds'] * 1000:.1f} ms, {results[v]['extra_mib']:.0f} MiB extra peak", flush=True)
    base = results.get("naive")
    device = a.device
    if a.device.startswith("cuda"):
        import torch
        device = torch.cuda.get_device_name()
    print(f"N={a.n} H={a.hidden} V={a.vocab} {a.dtype} on {device}, median of {a.repeats}")
    print("| variant | chunk | extra peak MiB | fwd+bwd ms | memory vs naive | time vs naive |")
    print("|---|---|---|---|---|---|")
    for v, r in results.items():
        mem = f"{r['extra_mib'] / base['extra_mib']:.3f}" if base and base['extra_mib'] > 0 else "-"
        tim = f"{r['seconds'] / base['seconds']:.2f}" if base else "-"
        chunk = r["chunk"] if v in ("fused", "folded") else "-"
        print(f"| {v} | {chunk} | {r['extra_mib']:.0f} | {r['seconds'] * 1000:.1f} | {mem} | {tim} |")


if __name__ == "__main__":
    main()
