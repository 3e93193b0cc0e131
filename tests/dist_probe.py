"""Run under torchrun by the tests: train 2 steps, then each rank writes SHA-256 digests of the full parameters
(params_rank{r}.json) and what it saw of each step (record_rank{r}.json).

    torchrun --nproc_per_node 2 tests/dist_probe.py OUT MODEL DATA [EXTRA GRPO FLAGS...]

The record, per rank, one entry per call: "rewards" (grpo.compute_rewards: each row's total, parts and completion
length), "train" (grpo.train_on_rollouts: the completion lengths of the rows trained, in order), and per hook a
method overrides (variants/, e.g. "vppo.shape_advantages"): its wall seconds and, for after_rollout, the parts it
returned. Recording only wraps those functions; what they compute is unchanged.
"""
import functools
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch.distributed as dist  # noqa: E402

import grpo  # noqa: E402
import variants  # noqa: E402

record = {"rewards": [], "train": [], "hooks": {}}


def _compute_rewards(inner):
    @functools.wraps(inner)
    def wrapper(judge, rows, *a, **k):
        rewards, parts, stats, located = out = inner(judge, rows, *a, **k)
        record["rewards"].append({"rewards": rewards.tolist(), "parts": {n: v.tolist() for n, v in parts.items()},
                                  "lengths": [len(c.token_ids) for _, c in rows]})
        return out
    return wrapper


def _train_on_rollouts(inner):
    @functools.wraps(inner)
    def wrapper(policy, reference, optimizer, processor, rows, *a, **k):
        record["train"].append({"lengths": [len(c.token_ids) for _, c in rows]})
        return inner(policy, reference, optimizer, processor, rows, *a, **k)
    return wrapper


def _timed(key, inner):
    @functools.wraps(inner)
    def wrapper(self, *a, **k):
        t = time.time()
        out = inner(self, *a, **k)
        entry = {"seconds": time.time() - t}
        if getattr(out, "parts", None) is not None:  # after_rollout's Extra
            entry["parts"] = out.parts
        record["hooks"].setdefault(key, []).append(entry)
        return out
    return wrapper


grpo.compute_rewards = _compute_rewards(grpo.compute_rewards)
grpo.train_on_rollouts = _train_on_rollouts(grpo.train_on_rollouts)
for cls in variants.VARIANTS:
    for hook in ("redraw", "after_rollout", "shape_advantages"):
        if hook in vars(cls):  # only a method's own hooks: variants.active tells a shaping method by its override
            setattr(cls, hook, _timed(f"{cls.name}.{hook}", vars(cls)[hook]))

out, model, data = sys.argv[1:4]
policy = grpo.main(["--model", model, "--data", data, "--out", out, "--max-steps", "2", "--rollout-batch", "4",
                    "--update-batch", "2", "--group-size", "2", "--max-new-tokens", "16", "--lr", "1e-3", *sys.argv[4:]])
digest = {}
for name, p in policy.named_parameters():  # full_tensor() all-gathers the shards on every rank
    full = p.full_tensor() if hasattr(p, "full_tensor") else p
    digest[name] = hashlib.sha256(full.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
Path(out, f"params_rank{dist.get_rank()}.json").write_text(json.dumps(digest))
Path(out, f"record_rank{dist.get_rank()}.json").write_text(json.dumps(record))
dist.destroy_process_group()
