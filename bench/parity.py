"""Before/after parity of the trainer's numbers: every method's metrics after 2 steps at a small shape.

    python bench/parity.py record --tree /tmp/before --out before.json   # a checkout's numbers (subprocesses)
    python bench/parity.py record --tree . --out after.json
    python bench/parity.py compare before.json after.json               # rel 1e-3, timings ignored

Each config is `python grpo.py` run in --tree (its own code, its own imports) from the cached warm start of
the embedded default, single process, 2 steps of 4 prompts x 4 completions in 2 updates, 64 new tokens.
Every logged metric except wall times (t_*) must agree within a relative 1e-3 (float summation order);
a key present on one side only is a difference too. Written for issue 24 (the loop apart from its variants).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SMALL = ["--max-steps", "2", "--rollout-batch", "4", "--update-batch", "2", "--group-size", "4",
         "--max-new-tokens", "64", "--micro-batch", "8", "--save-every", "100", "--log-rollouts-every", "0"]
CONFIGS = {  # name -> extra flags; {vicrit} is the ViCrit items file built from the shapes data
    "palmr": [],
    "grpo": ["--reward", "grpo"],
    "bonus": ["--reward", "bonus"],
    "perception_r1": ["--reward", "perception_r1"],
    "one_update": ["--update-batch", "4"],
    "per_row_layout": ["--no-shared-prefix"],
    "dense_prefix": ["--prefix-attention", "dense"],
    "is_cap": ["--is-cap", "2.0", "--update-batch", "4"],
    "micro_tokens": ["--micro-tokens", "300"],
    "token_credit": ["--credit", "token"],
    "vppo": ["--vppo"],
    "vision_sr1": ["--reward", "vision_sr1"],
    "pearl": ["--reward", "pearl"],
    "vicrit_mix": ["--vicrit-data", "{vicrit}", "--vicrit-ratio", "0.5"],
    "vicrit_only": ["--reward", "vicrit", "--data", "{vicrit}"],
}


def vicrit_file(tree, work):
    """ViCrit items from the cached shapes data, built by the tree's own command (the old or the new name)."""
    out = Path(work) / "vicrit.jsonl"
    shapes = Path("~/.cache/palmr/shapes-v2/train.jsonl").expanduser()
    if not shapes.exists():
        subprocess.run([sys.executable, "grpo.py", "--warmup-only"], cwd=tree, check=True)
    new = Path(tree) / "variants" / "vicrit.py"
    cmd = [sys.executable, "-m", "variants.vicrit"] if new.exists() else [sys.executable, "data.py", "vicrit"]
    subprocess.run(cmd + ["--in", str(shapes), "--out", str(out)], cwd=tree, check=True, capture_output=True)
    return str(out)


def record(tree, out, only=None):
    tree = Path(tree).resolve()
    work = Path(tempfile.mkdtemp(prefix="parity-"))
    vicrit = vicrit_file(tree, work)
    results = {}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "TOKENIZERS_PARALLELISM": "false"}
    for name, flags in CONFIGS.items():
        if only and name not in only:
            continue
        run = work / name
        argv = [sys.executable, "grpo.py", "--out", str(run), *SMALL, *[f.format(vicrit=vicrit) for f in flags]]
        p = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True)
        if p.returncode:
            results[name] = {"error": p.stderr[-2000:]}
            print(f"{name}: FAILED\n{p.stderr[-2000:]}", flush=True)
            continue
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        results[name] = {str(r["step"]): {k: v for k, v in r.items() if not k.startswith("t_")} for r in rows}
        last = rows[-1]
        print(f"{name}: reward {last['reward']:.4f} kl {last['kl']:.6f} entropy {last['entropy']:.4f}", flush=True)
    Path(out).write_text(json.dumps(results, indent=1, sort_keys=True))
    return results


def compare(a_path, b_path, rel=1e-3):
    a, b = json.loads(Path(a_path).read_text()), json.loads(Path(b_path).read_text())
    bad = 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b or "error" in a[name] or "error" in b[name]:
            print(f"{name}: missing or failed on one side")
            bad += 1
            continue
        diffs = []
        for step in sorted(set(a[name]) | set(b[name])):
            x, y = a[name].get(step, {}), b[name].get(step, {})
            for k in sorted(set(x) | set(y)):
                if k not in x or k not in y:
                    diffs.append(f"step {step} {k}: only in {'after' if k in y else 'before'}")
                elif isinstance(x[k], (int, float)) and isinstance(y[k], (int, float)):
                    if not math.isclose(x[k], y[k], rel_tol=rel, abs_tol=1e-9):
                        diffs.append(f"step {step} {k}: {x[k]} -> {y[k]}")
                elif x[k] != y[k]:
                    diffs.append(f"step {step} {k}: {x[k]!r} -> {y[k]!r}")
        n = sum(len(v) for v in a[name].values())
        print(f"{name}: {'identical' if not diffs else f'{len(diffs)} differences'} ({n} numbers)")
        for d in diffs:
            print(f"  {d}")
        bad += bool(diffs)
    print("PARITY OK" if not bad else f"PARITY FAILED in {bad} configs")
    return bad


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=type("Help", (
        argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}))  # defaults shown
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="run every config in a checkout and write its metrics")
    r.add_argument("--tree", default=".", help="the checkout to run (its grpo.py)")
    r.add_argument("--out", required=True, help="JSON of {config: {step: metrics}}")
    r.add_argument("--only", nargs="*", help="configs to run (default: all)")
    c = sub.add_parser("compare", help="compare two recorded files")
    c.add_argument("before")
    c.add_argument("after")
    a = ap.parse_args()
    if a.cmd == "record":
        record(a.tree, a.out, a.only)
    else:
        sys.exit(1 if compare(a.before, a.after) else 0)
