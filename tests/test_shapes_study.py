"""runs/shapes_study.sh and eval.py's study report: the GRPO-vs-PaLMR study on shapes (issue 8)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import eval as ev
import grpo

ROOT = Path(__file__).resolve().parent.parent


def _metrics(path, rewards, ans, halluc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"step": i + 1, "reward": r, "reward/ans": a, "judge/hallucinated_correct": h})
                            + "\n" for i, (r, a, h) in enumerate(zip(rewards, ans, halluc))))


def test_report_table_and_plot(tmp_path):
    res = {"start": {"acc": 60.0, "perception_acc": 20.0, "perception_complete": 10.0, "claims_per_reply": 4.0,
                     "hallucination_rate": 70.0}}
    for seed, (g, p) in enumerate([(50.0, 30.0), (60.0, 40.0)]):
        res[f"grpo-s{seed}"] = {"acc": 60.0, "perception_acc": 10.0, "perception_complete": 5.0, "claims_per_reply": 4.0,
                                "hallucination_rate": g}
        res[f"palmr-s{seed}"] = {"acc": 62.0, "perception_acc": 30.0, "perception_complete": 20.0 + seed,
                                 "claims_per_reply": 3.0, "hallucination_rate": p}
        _metrics(tmp_path / f"grpo-s{seed}" / "metrics.jsonl", [0.5, 0.6, 0.7], [0.5, 0.6, 0.7], [0.25, 0.3, 0.35])
        _metrics(tmp_path / f"palmr-s{seed}" / "metrics.jsonl", [0.1, 0.2, 0.3], [0.5, 0.5, 0.5], [0.25, 0.2, 0.0])
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps(
        {"checkpoints": {name: {"path": "x", "shapes": r} for name, r in res.items()}}))
    ev.main(["--study-report", str(tmp_path)])
    md = (tmp_path / "results.md").read_text()
    assert "| **grpo** | 2 | 60.0 ± 0.0 | 10.0 ± 0.0 | 5.0 ± 0.0 | 4.0 ± 0.0 | 55.0 ± 7.1 |" in md  # mean ± sample sd
    assert "| **palmr** | 2 | 62.0 ± 0.0 | 30.0 ± 0.0 | 20.5 ± 0.7 | 3.0 ± 0.0 | 35.0 ± 7.1 |" in md
    assert "| start (warm-up) | - | 60.0 | 20.0 | 10.0 | 4.0 | 70.0 |" in md
    assert "| palmr seed 1 | 1 | 62.0 | 30.0 | 21.0 | 3.0 | 40.0 |" in md
    # curves: per-step mean over seeds, hallucination rate = hallucinated correct / correct, smoothed
    series = ev.study_curves(tmp_path, [0, 1], smooth=1)
    assert series["palmr"]["hallucination rate (rollouts)"] == pytest.approx([0.5, 0.4, 0.0])
    assert series["grpo"]["reward"] == pytest.approx([0.5, 0.6, 0.7])
    assert ev.study_curves(tmp_path, [0, 1], smooth=2)["grpo"]["reward"] == pytest.approx([0.5, 0.55, 0.65])
    img = Image.open(tmp_path / "curves.png").convert("RGB")
    colors = {c for _, c in img.getcolors(1 << 20)}
    assert ev.STUDY_COLORS["grpo"] in colors and ev.STUDY_COLORS["palmr"] in colors  # both lines drawn


def test_warm_start_is_built_once(tmp_path, tiny_ckpt, shapes_file):
    import shutil
    base = tmp_path / "tiny"
    shutil.copytree(tiny_ckpt, base)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun leaves each rank
    try:
        path = grpo.ensure_warm_start(str(base), shapes_file, steps=2, hallucinated_share=0.5)
        assert torch.get_num_threads() == 1, "the thread count is restored after the build"
    finally:
        torch.set_num_threads(threads)
    assert Path(path) == tmp_path / "tiny-warm2-h0.5-s0-v2" and (Path(path) / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny", "tiny-warm2-h0.5-s0-v2"]  # no temp folder left
    stamp = (Path(path) / "model.safetensors").stat().st_mtime_ns
    assert grpo.ensure_warm_start(str(base), shapes_file, steps=2, hallucinated_share=0.5) == path
    assert (Path(path) / "model.safetensors").stat().st_mtime_ns == stamp, "the cached warm start is reused"


@pytest.mark.slow
def test_default_run_builds_the_warm_start_on_two_ranks(tmp_path):
    # regression: rank 0 once built the warm-up with an FSDP-sharded model and hung (the other rank was
    # waiting at a barrier, not in the all-gathers); rank 0 now builds it unsharded, alone
    env = dict(os.environ, HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "grpo.py"),
                        "--warmup-steps", "4", "--warmup-only"], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    warm = tmp_path / "home" / ".cache" / "palmr" / "tiny-qwen25vl-warm4-h0.3-s0-v2"
    assert p.stdout.strip().splitlines()[-1] == str(warm)
    from transformers import AutoModelForImageTextToText
    AutoModelForImageTextToText.from_pretrained(warm)  # a complete checkpoint


@pytest.mark.slow
def test_study_script_end_to_end(tmp_path):
    # the real script on a toy budget, with its own empty ~/.cache: warm start, 2 rewards x 1 seed, eval,
    # report
    env = dict(os.environ, HOME=str(tmp_path / "home"), SEEDS="0", STEPS="1", WARMUP="2", LIMIT="4",
               VARIANTS="grpo palmr+both", LONG_STEPS="2", LONG_SEEDS="0", LONG_VARIANTS="palmr+both",
               PYTHONPATH=str(ROOT))
    out = tmp_path / "study"
    p = subprocess.run(["bash", str(ROOT / "runs" / "shapes_study.sh"), str(out)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    results = json.loads((out / "eval" / "results.json").read_text())["checkpoints"]
    assert set(results) == {"start", "grpo-s0", "palmr+both-s0", "palmr+both@2-s0"}
    assert all(r["shapes"]["n"] == 4 for r in results.values())
    md = (out / "results.md").read_text()
    assert "| **palmr+both** | 1 |" in md and "| **palmr+both@2** | 1 |" in md and "Versions: python" in md
    assert (out / "curves.png").exists() and (out / "curves_long.png").exists()
    # the long run is the same run resumed: one metrics file, 2 steps, both checkpoints kept
    assert len((out / "palmr+both-s0" / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "palmr+both-s0" / "checkpoint-000001").is_dir() and (out / "palmr+both-s0" / "checkpoint-000002").is_dir()
    args = json.loads((out / "palmr+both-s0" / "args.json").read_text())
    assert args["credit"] == "token" and args["judge_omissions"] and args["versions"]["torch"]
