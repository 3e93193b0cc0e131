"""Shared-prefix forward under FSDP2: run by test_shared_prefix under torchrun, and the rows it scores.

    torchrun --nproc_per_node 2 tests/shared_prefix_probe.py OUT MODEL DATA

Rank r scores its own rows (synthetic_rows of prompts 3r..3r+2, seed r) in the shared-prefix layout on a sharded
policy and writes its log-probs, entropies and full gradients (FSDP's mean over ranks); the test compares them
with one process's per-row layout on each rank's rows.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

import grpo  # noqa: E402
import palmr  # noqa: E402
from data import load_image, read_jsonl  # noqa: E402

# completion lengths per prompt: an empty completion, a max-length one (12) and a group split in the middle
LENGTHS = [[5, 0, 12, 1], [12, 12, 3, 7], [4, 9, 2, 12]]


def synthetic_rows(processor, samples, lengths=LENGTHS, seed=0, max_pixels=112 * 112):
    """Rows [(sample, Completion)] group after group, with seeded random token ids (never a vision placeholder),
    and {id: encoded prompt}: the same on every call with the same arguments."""
    encoded = {s.id: palmr.encode_prompt(processor, palmr.render_prompt(processor, s.question, s.choices),
                                         load_image(s), max_pixels) for s in samples}
    banned = set(palmr.suppressed_token_ids(processor.tokenizer))
    allowed = torch.tensor([t for t in range(len(processor.tokenizer)) if t not in banned])
    g = torch.Generator().manual_seed(seed)
    rows = []
    for s, group in zip(samples, lengths):
        for n in group:
            ids = allowed[torch.randint(0, len(allowed), (n,), generator=g)].tolist()
            logps = (-torch.rand(n, generator=g)).tolist()
            rows.append((s, palmr.Completion(ids, "", logps, n < 12)))
    return rows, encoded


def weighted_backward(model, batch):
    """Log-probs and entropies of a batch, and the full gradients of sum(logp * w) for fixed weights w."""
    model.zero_grad(set_to_none=True)
    logp, entropy = model.completion_logprobs(batch, 0.7)
    w = torch.linspace(-1, 1, logp.numel(), dtype=logp.dtype).view(logp.shape)
    (logp * w).sum().backward()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
             for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), entropy.detach(), grads


if __name__ == "__main__":
    out, model_path, data_path = sys.argv[1:4]
    rank, world, device = palmr.init_dist()
    processor = palmr.load_processor(model_path)
    policy = grpo.prepare_model(model_path, device, train=True, prefix_attention="branch")
    assert type(policy).__name__.startswith("FSDP"), "the probe must run on a sharded policy"
    n = len(LENGTHS)
    rows, encoded = synthetic_rows(processor, read_jsonl(data_path)[rank * n:(rank + 1) * n], seed=rank)
    batch = grpo.shared_prefix_batch(rows, encoded, processor.tokenizer.pad_token_id, device)
    logp, entropy, grads = weighted_backward(policy, batch)
    torch.save({"logp": logp, "entropy": entropy, "grads": grads}, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()
