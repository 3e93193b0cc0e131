"""Run by test_grpo_train under torchrun: train 2 steps, then each rank writes SHA-256 digests of the full parameters.

    torchrun --nproc_per_node 2 tests/dist_probe.py OUT MODEL DATA [EXTRA GRPO FLAGS...]
"""
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch.distributed as dist  # noqa: E402

import grpo  # noqa: E402

out, model, data = sys.argv[1:4]
policy = grpo.main(["--model", model, "--data", data, "--out", out, "--max-steps", "2", "--rollout-batch", "4",
                    "--update-batch", "2", "--group-size", "2", "--max-new-tokens", "16", "--lr", "1e-3", *sys.argv[4:]])
digest = {}
for name, p in policy.named_parameters():  # full_tensor() all-gathers the shards on every rank
    full = p.full_tensor() if hasattr(p, "full_tensor") else p
    digest[name] = hashlib.sha256(full.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
Path(out, f"params_rank{dist.get_rank()}.json").write_text(json.dumps(digest))
dist.destroy_process_group()
