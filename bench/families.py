"""The default job's step time per model family, side by side in one run: Qwen2.5-VL, Qwen3-VL, Qwen3.5.

    python bench/families.py                       # 8 steps each, every family's tiny default (CPU, ~10 min cold)
    python bench/families.py --steps 4 --repeat 2  # families interleaved A B C A B C; the faster of the repeats
    python bench/families.py --layouts             # and each family in both layouts where the shared prefix applies

Each family runs the default job (`grpo.py` with no flags but --model: its tiny checkpoint, palmr.TINY, the
synthetic shapes data, its own cached warm start of --warmup-steps, the rule judge) for --steps steps in a fresh
process, one after the other, then the table gives per family the median step time (steps after the first; the
first allocates), its phases (rollout, reward, train: log-probs + update + sync), the mean completion length (the
rollout's cost follows it, and each family's warm start writes its own lengths) and the ratio to Qwen2.5-VL
measured in the same run. Qwen3.5 always trains in the per-row layout (its linear-attention layers rule out the
shared prefix); --layouts also runs the others with --no-shared-prefix, which shows what that fallback costs.
Warm starts missing from the cache are built first (not timed).
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import palmr  # noqa: E402


def run_job(family, steps, warmup_steps, out, extra=()):
    """One default job of `family` for `steps` steps in a fresh process -> its metrics.jsonl rows."""
    cmd = [sys.executable, str(ROOT / "grpo.py"), "--model", palmr.TINY[family], "--warmup-steps", str(warmup_steps),
           "--max-steps", str(steps), "--out", str(out), "--save-every", str(steps), "--log-rollouts-every", "0", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{family}: grpo.py failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def summarise(rows):
    """Median seconds per step and per phase over the steps after the first, mean completion length."""
    later = rows[1:] or rows
    step = [r["t_rollout"] + r["t_reward"] + r["t_train"] for r in later]
    return {"step_s": statistics.median(step), "rollout_s": statistics.median(r["t_rollout"] for r in later),
            "reward_s": statistics.median(r["t_reward"] for r in later),
            "train_s": statistics.median(r["t_train"] for r in later),
            "completion_len": statistics.mean(r["completion_len"] for r in later)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=palmr.HelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="RL steps per job (the first is not counted)")
    ap.add_argument("--warmup-steps", type=int, default=600, help="warm start of each family (the default job's)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over the families; the fastest round is reported")
    ap.add_argument("--layouts", action="store_true", help="also run the shared-prefix families with --no-shared-prefix")
    ap.add_argument("--families", nargs="+", default=list(palmr.FAMILIES), choices=list(palmr.FAMILIES))
    a = ap.parse_args(argv)
    jobs = [(f, ()) for f in a.families]
    if a.layouts:
        jobs += [(f, ("--no-shared-prefix",)) for f in a.families  # where the shared prefix is on by default
                 if not palmr.shared_prefix_exact(palmr.load_config(palmr.ensure_tiny_checkpoint(palmr.TINY[f])))]
    for family in a.families:  # warm starts first, untimed (rank 0 builds them with every core)
        t = time.time()
        subprocess.run([sys.executable, str(ROOT / "grpo.py"), "--model", palmr.TINY[family], "--warmup-steps",
                        str(a.warmup_steps), "--warmup-only"], cwd=ROOT, check=True, capture_output=True)
        print(f"warm start of {family}: ready ({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
    best = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeat):
            for i, (family, extra) in enumerate(jobs):
                label = palmr.FAMILIES[family].name + (" (per-row)" if extra else "")
                print(f"[{r * len(jobs) + i + 1}/{a.repeat * len(jobs)}] {label}: {a.steps} steps", file=sys.stderr,
                      flush=True)
                s = summarise(run_job(family, a.steps, a.warmup_steps, Path(tmp) / f"{family}{len(extra)}-{r}", extra))
                if label not in best or s["step_s"] < best[label]["step_s"]:
                    best[label] = s
    base = best.get(palmr.FAMILIES["qwen2_5_vl"].name)
    print(f"default job per family: {a.steps} steps (median of steps 2..{a.steps}), warm start {a.warmup_steps}, "
          f"1 process, {palmr.cpu_threads()} threads; best of {a.repeat} round(s)")
    print("| family | s / step | rollout s | reward s | train s | completion tokens | step vs Qwen2.5-VL |")
    print("|---|---|---|---|---|---|---|")
    for label, s in best.items():
        ratio = f"{s['step_s'] / base['step_s']:.2f}x" if base else "-"
        print(f"| {label} | {s['step_s']:.2f} | {s['rollout_s']:.2f} | {s['reward_s']:.2f} | {s['train_s']:.2f} | "
              f"{s['completion_len']:.1f} | {ratio} |")
    return best


if __name__ == "__main__":
    main()
