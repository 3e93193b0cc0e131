"""Table and plot for runs/shapes_study.sh: GRPO vs PaLMR on held-out shapes, mean over seeds.

    python runs/shapes_report.py out/shapes_study

Reads OUT/eval/results.json (checkpoints named `start`, `grpo-s<seed>`, `palmr-s<seed>`) and
OUT/<reward>-s<seed>/metrics.jsonl; writes OUT/results.md and OUT/curves.png (drawn with PIL).
"""
import json
import statistics
import sys
from pathlib import Path

METRICS = [("acc", "answer acc"), ("perception_acc", "perception acc"), ("perception_complete", "complete perception"),
           ("claims_per_reply", "claims / reply"), ("hallucination_rate", "hallucination rate")]
COLORS = {"grpo": (214, 96, 40), "palmr": (40, 110, 200)}


def mean_sd(values):
    values = [v for v in values if v is not None]  # (older results.json files lack the newer metrics)
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(results, seeds):
    """Markdown: start, then each reward's mean ± sd over seeds, then every seed's own row."""
    shapes = {name: r["shapes"] for name, r in results.items()}
    lines = ["| run | seeds | " + " | ".join(label for _, label in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    lines.append("| start (warm-up) | - | " + " | ".join(mean_sd([shapes["start"][k]]) for k, _ in METRICS) + " |")
    for reward in ("grpo", "palmr"):
        runs = [shapes[f"{reward}-s{s}"] for s in seeds if f"{reward}-s{s}" in shapes]
        lines.append(f"| **{reward}** | {len(runs)} | " + " | ".join(mean_sd([r[k] for r in runs]) for k, _ in METRICS) + " |")
    for s in seeds:
        for reward in ("grpo", "palmr"):
            r = shapes.get(f"{reward}-s{s}")
            if r:
                lines.append(f"| {reward} seed {s} | 1 | " + " | ".join(mean_sd([r[k]]) for k, _ in METRICS) + " |")
    return "\n".join(lines)


def curves(out, seeds, smooth=5):
    """{reward: {series: [per-step mean over seeds, moving average over `smooth` steps]}} from metrics.jsonl."""
    series = {}
    for reward in ("grpo", "palmr"):
        per_seed = []
        for s in seeds:
            path = out / f"{reward}-s{s}" / "metrics.jsonl"
            if not path.exists():
                continue
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            per_seed.append({"reward": [r["reward"] for r in rows],
                             "answer acc (rollouts)": [r["reward/ans"] for r in rows],
                             # share of correct rollouts whose reasoning misreads the scene (rule judge)
                             "hallucination rate (rollouts)": [r["judge/hallucinated_correct"] / max(r["reward/ans"], 1e-9)
                                                               for r in rows]})
        if not per_seed:
            continue
        n = min(len(p["reward"]) for p in per_seed)
        series[reward] = {}
        for key in per_seed[0]:
            mean = [statistics.mean(p[key][i] for p in per_seed) for i in range(n)]
            series[reward][key] = [statistics.mean(mean[max(0, i - smooth + 1):i + 1]) for i in range(n)]
    return series


def plot(series, path, w=300, h=220, pad=40):
    """One panel per series, both rewards on each, steps on x; a plain PIL line chart."""
    from PIL import Image, ImageDraw
    keys = list(next(iter(series.values())))
    img = Image.new("RGB", (len(keys) * (w + pad) + pad, h + 2 * pad + 20), "white")
    draw = ImageDraw.Draw(img)
    for i, key in enumerate(keys):
        x0, y0 = pad + i * (w + pad), pad
        values = [v for s in series.values() for v in s[key]]
        lo, hi = min(values + [0.0]), max(values + [1.0])
        draw.rectangle([x0, y0, x0 + w, y0 + h], outline="black")
        draw.text((x0, y0 - 16), key, fill="black")
        for frac in (0.0, 0.5, 1.0):
            y = y0 + h - frac * h
            draw.line([x0 - 4, y, x0, y], fill="black")
            draw.text((x0 - 34, y - 6), f"{lo + frac * (hi - lo):.2f}", fill="black")
        for reward, s in series.items():
            ys = s[key]
            pts = [(x0 + w * j / max(1, len(ys) - 1), y0 + h - h * (v - lo) / (hi - lo)) for j, v in enumerate(ys)]
            draw.line(pts, fill=COLORS[reward], width=2)
        n = len(next(iter(series.values()))[key])
        draw.text((x0, y0 + h + 4), "1", fill="black")
        draw.text((x0 + w - 20, y0 + h + 4), f"{n} steps", fill="black")
    for j, reward in enumerate(series):
        x = pad + j * 120
        draw.line([x, h + 2 * pad + 8, x + 20, h + 2 * pad + 8], fill=COLORS[reward], width=3)
        draw.text((x + 24, h + 2 * pad + 2), reward, fill="black")
    img.save(path)


def main(out):
    out = Path(out)
    results = json.loads((out / "eval" / "results.json").read_text())["checkpoints"]
    seeds = sorted({int(name.split("-s")[1]) for name in results if "-s" in name})
    md = ["# GRPO vs PaLMR on shapes (held-out split, greedy; mean ± sd over seeds)", "", table(results, seeds), "",
          "Perception acc: % of replies with at least one scene claim and no wrong one. Complete perception: no "
          "wrong claim and every group of the scene stated with its count (saying less cannot score it). "
          "Hallucination rate: % of correct answers whose reasoning misreads the scene. All exact (rule judge).", ""]
    series = curves(out, seeds)
    if series:
        plot(series, out / "curves.png")
        md.append("![curves](curves.png)")
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/shapes_study")
