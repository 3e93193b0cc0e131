"""Run by test_fused_logprobs under torchrun: fused (and folded-loss) vs naive log-probs and gradients, FSDP2.

    torchrun --nproc_per_node 2 tests/fsdp_logprob_probe.py OUT MODEL DATA
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import grpo  # noqa: E402
import palmr  # noqa: E402
from data import read_jsonl  # noqa: E402

out, model_path, data_path = sys.argv[1:4]
rank, world, device = palmr.init_dist()
args = grpo.get_args(["--model", model_path, "--data", data_path, "--rollout-batch", "4", "--group-size", "2",
                      "--max-new-tokens", "16", "--temperature", "0.7"])
processor = palmr.load_processor(model_path)
policy = grpo.prepare_model(model_path, device, train=True, chunk=5)
assert type(policy).__name__.startswith("FSDP"), "the probe must run on a sharded policy"
samples = [read_jsonl(data_path)[i] for i in grpo.step_items(64, 0, 4, 0, rank, world)]
rows, enc = grpo.rollout(palmr.HFEngine(policy, processor, args.max_pixels), processor, samples, args, 0, rank)
batch = grpo.training_batch(rows, enc, processor.tokenizer.pad_token_id, device)
weights = torch.linspace(-1, 1, batch["mask"].numel()).view(batch["mask"].shape)
result = {}
flat = weights[batch["mask"].bool()]  # the same weights, one per completion token in row-major order
for impl in ("fused", "naive", "folded"):
    policy.logprob_impl = "naive" if impl == "naive" else "fused"
    if impl == "folded":  # the loss gradient computed inside the forward (grpo.completion_loss)
        loss, logp, entropy = policy.completion_loss(batch, 0.7, lambda lp, s, e: lp * flat[s:e])
        loss.backward()
    else:
        logp, entropy = policy.completion_logprobs(batch, 0.7)
        (logp * weights).sum().backward()
    grads = {n: p.grad.full_tensor().clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    result[impl] = (logp.detach(), entropy, grads)
ln, en, gn = result["naive"]
report = {}
for impl in ("fused", "folded"):
    lf, ef, gf = result[impl]
    report[impl] = {"logp_max_diff": (lf - ln).abs().max().item(), "entropy_max_diff": (ef - en).abs().max().item(),
                    "grad_names_equal": sorted(gf) == sorted(gn), "lm_head_grad_norm": gf["lm_head.weight"].norm().item(),
                    "grad_max_rel_diff": max(((gf[n] - gn[n]).norm() / gn[n].norm().clamp(min=1e-30)).item() for n in gn)}
Path(out, f"rank{rank}.json").write_text(json.dumps(report))
dist.destroy_process_group()
