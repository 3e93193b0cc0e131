"""bench/step.py at the tiny shape on CPU: the real trainer runs, its phase times come back from
metrics.jsonl, and FLOPs / MFU are computed per phase."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_step_benchmark_tiny_shape(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "step.py"), "--shape", "tiny", "--steps", "2", "--group-size", "2",
           "--rollout-batch", "2", "--max-new-tokens", "8", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1",
                                                                                "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| policy |" in proc.stdout and "| rollout |" in proc.stdout
    report = json.loads((tmp_path / "step-tiny-hf.json").read_text())
    phases = report["phases"]
    assert set(phases) == {"rollout", "reward", "ref_logprobs", "old_logprobs", "policy", "optimizer", "weight_sync"}
    assert phases["rollout"]["s"] > 0 and phases["policy"]["s"] > 0 and phases["ref_logprobs"]["s"] > 0
    assert phases["old_logprobs"]["s"] == 0, "one update per rollout batch: the policy's own log-probs are the old ones"
    assert 0 < phases["policy"]["mfu"] < 1 and phases["policy"]["tflops"] > 0 and report["peak_tflops"] > 0
    assert abs(sum(p["share"] for p in phases.values()) - 1) < 1e-6
    metrics = [json.loads(l) for l in (tmp_path / "run-tiny-hf" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["t_policy"] > 0 and m["prompt_len"] > m["image_patches"] / 4 for m in metrics)


def test_parameter_counts_match_the_model(tiny_ckpt):
    sys.path.insert(0, str(ROOT / "bench"))
    import step
    import palmr
    vision, lm, head = step.parameter_counts(tiny_ckpt)
    model = palmr.load_model(tiny_ckpt)
    real_vision = sum(p.numel() for n, p in model.named_parameters() if ".visual." in n and "norm" not in n and "bias" not in n)
    real_lm = sum(p.numel() for n, p in model.named_parameters()
                  if ".language_model." in n and p.dim() == 2 and "embed" not in n)
    assert lm == real_lm and head == model.lm_head.weight.numel()
    assert abs(vision - real_vision) / real_vision < 0.02, (vision, real_vision)


def test_prompt_sharing_counts_each_group_piece_of_a_micro_batch():
    sys.path.insert(0, str(ROOT / "bench"))
    from step import prompt_sharing
    run = {"shared_prefix": True, "group_size": 8, "micro_batch": 16, "micro_tokens": 0}
    assert prompt_sharing(run, 32) == 8.0                              # 2 whole groups per micro-batch
    assert prompt_sharing({**run, "micro_batch": 4}, 32) == 4.0        # every group cut in two
    assert prompt_sharing({**run, "micro_batch": 12}, 32) == 32 / 5    # [0,1] [1,2] [3]: 5 prompt forwards
    assert prompt_sharing({**run, "shared_prefix": False}, 32) == 1.0
