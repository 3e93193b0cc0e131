"""bench/judge_overlap.py at its smallest: the real trainer against the latency-injecting judge server, GRPO and
PaLMR with and without the overlap, in one run; its table, its JSON and what the overlap must show."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_judge_overlap_bench_prints_the_overhead_side_by_side(tmp_path, warm_ckpt, shapes_file):
    latency = 0.4  # per request, 40 reply tokens of it decoded at 2.5 ms each
    cmd = [sys.executable, str(ROOT / "bench" / "judge_overlap.py"), "--latencies", str(latency), "--steps", "2",
           "--rollout-batch", "2", "--group-size", "2", "--update-batch", "1", "--max-new-tokens", "12",
           "--reply-tokens", "40", "--token-latency", "0.0025", "--concurrency", "32", "--model", warm_ckpt, "--data", shapes_file,
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for row in ("| grpo (first) |", "| palmr 0.4s c32 serial |", "| palmr 0.4s c32 overlap |", "| grpo (last) |"):
        assert row in proc.stdout, row
    assert "c32 overlap, predicted:" in proc.stdout and "WARNING" not in proc.stdout
    runs = json.loads((tmp_path / "judge_overlap.json").read_text())["runs"]
    serial, overlap = runs["palmr 0.4s c32 serial"], runs["palmr 0.4s c32 overlap"]
    for r in (serial, overlap):  # every request took the injected latency, and the judge's wall time shows it
        assert latency <= r["request_s"] < latency + 0.3 and r["judge_s"] >= latency and r["failed"] == 0
    assert serial["unhidden_s"] >= latency, "without the overlap the loop waits for the whole judge"
    assert overlap["passes_s"] > 0 and overlap["unhidden_s"] < overlap["judge_s"], "with it, the passes hide a part"
    assert runs["grpo (first)"]["request_s"] == 0, "GRPO asks no judge (its t_judge is the answer grading alone)"
