"""Bench scripts that run for minutes say what they are doing while they run (issue 25: they printed nothing for
3 minutes). Each is run as a user runs it, on a configuration small enough for a test."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_logprob_bench_prints_each_variant_as_it_goes():
    proc = subprocess.run([sys.executable, "bench/logprob.py", "--n", "256", "--hidden", "16", "--vocab", "4096",
                           "--repeats", "1", "--variants", "naive,fused"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-1500:]
    lines = proc.stdout.splitlines()
    for v in ("naive", "fused"):
        start = lines.index(f"{v}: measuring (1 timed runs in a fresh process) ...")
        assert lines[start + 1].startswith(f"{v}: ") and " ms, " in lines[start + 1], lines
    assert lines.index("fused: measuring (1 timed runs in a fresh process) ...") < next(
        i for i, l in enumerate(lines) if l.startswith("| variant")), "progress comes before the table"


@pytest.mark.slow
def test_shared_prefix_bench_prints_every_pass(tiny_ckpt, tmp_path):
    proc = subprocess.run([sys.executable, "bench/shared_prefix.py", "--configs", "default", "--model", tiny_ckpt,
                           "--prompts", "2", "--repeats", "1", "--routes", "branch", "--out",
                           str(tmp_path / "b.json")], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-1500:]
    passes = [l for l in proc.stdout.splitlines() if l.startswith("  default | pass ")]
    assert [p.rsplit(":", 1)[0] for p in passes] == [
        "  default | pass 0/1 (warm-up) | per-row", "  default | pass 0/1 (warm-up) | shared-branch",
        "  default | pass 1/1 | shared-branch", "  default | pass 1/1 | per-row"], passes
