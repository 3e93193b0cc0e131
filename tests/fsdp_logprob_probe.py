"""Run by tests/kernels/test_lm_head.py under torchrun: the fused LM head (and the folded loss) on an FSDP2 policy,
and the naive LM head (kernels.lm_head.naive_logprobs, full logits) on an unsharded copy, on the same batch.

    torchrun --nproc_per_node 2 tests/fsdp_logprob_probe.py OUT MODEL DATA

Rank r writes OUT/rank{r}.pt: {impl: {logp, entropy, grads}} for impl fused (completion_logprobs), folded
(completion_loss) and naive, the loss being sum(logp * w) for fixed weights w. The FSDP gradients are full tensors
of FSDP's mean over ranks; the naive ones are this rank's own (the test averages the two ranks').
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import grpo  # noqa: E402
import palmr  # noqa: E402
from data import read_jsonl  # noqa: E402
from kernels.lm_head import naive_logprobs  # noqa: E402

out, model_path, data_path = sys.argv[1:4]
rank, world, device = palmr.init_dist()
args = grpo.get_args(["--model", model_path, "--data", data_path, "--rollout-batch", "4", "--group-size", "2",
                      "--max-new-tokens", "16", "--temperature", "0.7"])
processor = palmr.load_processor(model_path)
policy = grpo.prepare_model(model_path, device, train=True)
policy.logprob_chunk = 5  # many blocks, the last one partial
assert type(policy).__name__.startswith("FSDP"), "the probe must run on a sharded policy"
local = grpo.prepare_model(model_path, device, train=True, shard=False)  # the same weights, unsharded
assert not type(local).__name__.startswith("FSDP")
samples = [read_jsonl(data_path)[i] for _, i in grpo.mixed_step_items(64, 0, 0, 4, 0, 0, rank, world)]
rows, enc = grpo.rollout(palmr.HFEngine(policy, processor, args.max_pixels), processor, samples, args, 0, rank)
batch = grpo.training_batch(rows, enc, processor.tokenizer.pad_token_id, device)
mask = batch["mask"].bool()
weights = torch.linspace(-1, 1, mask.numel()).view(mask.shape)
flat = weights[mask]  # the same weights, one per completion token in row-major order


def grads_of(model):
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
             for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


result = {}
for impl in ("fused", "folded"):
    if impl == "folded":  # the loss gradient computed inside the forward (grpo.completion_loss)
        loss, logp, entropy = policy.completion_loss(batch, 0.7, lambda lp, s, e: lp * flat[s:e])
        loss.backward()
    else:
        logp, entropy = policy.completion_logprobs(batch, 0.7)
        (logp * weights).sum().backward()
    result[impl] = {"logp": logp.detach()[mask], "entropy": entropy[mask], "grads": grads_of(policy)}
hidden, head = grpo.completion_hidden(local, batch)
logp, entropy = naive_logprobs(hidden[mask], head, batch["completion_ids"][mask], 0.7)
(logp * flat).sum().backward()
result["naive"] = {"logp": logp.detach(), "entropy": entropy, "grads": grads_of(local)}
torch.save(result, Path(out) / f"rank{rank}.pt")
dist.destroy_process_group()
