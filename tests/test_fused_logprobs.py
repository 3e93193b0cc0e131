"""grpo.fused_logprobs against a float64 reference: values, entropy, both gradients, bf16, training parity."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grpo

ROOT = Path(__file__).resolve().parent.parent
V = 152064  # Qwen2.5-VL's padded vocabulary: not a power of two


def _reference(hidden, weight, targets, temperature):
    """float64 textbook path: full logits, log-softmax, gather; gradients by autograd."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    log_p = ((h @ w.T) / temperature).log_softmax(-1)
    logp = log_p.gather(1, targets[:, None]).squeeze(1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logp, entropy.detach(), h, w


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_entropy_and_gradients_match_float64(temperature):
    torch.manual_seed(0)
    n, hdim, chunk = 37, 32, 16  # N is not a multiple of the chunk
    hidden = torch.randn(n, hdim, requires_grad=True)
    weight = (torch.randn(V, hdim) * 0.3).requires_grad_(True)
    targets = torch.randint(0, V, (n,))
    targets[0] = V - 1  # the last vocabulary row
    g = torch.randn(n)  # an arbitrary upstream gradient, one per row

    logp, entropy = grpo.fused_logprobs(hidden, weight, targets, temperature, chunk_size=chunk)
    (logp * g).sum().backward()
    ref_logp, ref_entropy, h, w = _reference(hidden, weight, targets, temperature)
    (ref_logp * g.double()).sum().backward()

    assert logp.dtype == torch.float32 and not entropy.requires_grad, "fp32 log-probs, detached entropy"
    torch.testing.assert_close(logp.double(), ref_logp.detach(), atol=2e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), h.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weight.grad.double(), w.grad, atol=1e-6, rtol=1e-4)


def test_gradcheck_float64():
    torch.manual_seed(0)
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 10, 3, 3, 7])
    fn = lambda h, w: grpo.fused_logprobs(h, w, targets, 0.7, chunk_size=2)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-6, atol=1e-7)


# bf16 inputs: the logits come out of a bf16 matmul (as in the sampler), so they carry bf16 rounding
# (8 bits of mantissa) before the fp32 log-sum-exp. Documented tolerance at |logits| ~ 3, H = 64:
BF16_LOGP_ATOL = 0.05
BF16_GRAD_RTOL = 0.05  # relative to the gradient's norm


def test_bf16_inputs_within_documented_tolerance():
    torch.manual_seed(0)
    n, hdim = 40, 64
    hidden = torch.randn(n, hdim).bfloat16().requires_grad_(True)
    weight = (torch.randn(V, hdim) * 0.4).bfloat16().requires_grad_(True)
    targets = torch.randint(0, V, (n,))
    logp, entropy = grpo.fused_logprobs(hidden, weight, targets, 1.0, chunk_size=16)
    assert logp.dtype == torch.float32, "log-sum-exp is accumulated in fp32 for bf16 inputs"
    logp.sum().backward()
    ref_logp, ref_entropy, h, w = _reference(hidden, weight, targets, 1.0)
    ref_logp.sum().backward()
    assert (logp.double() - ref_logp.detach()).abs().max() < BF16_LOGP_ATOL
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    for got, want in ((hidden.grad, h.grad), (weight.grad, w.grad)):
        assert (got.double() - want).norm() / want.norm() < BF16_GRAD_RTOL


def test_fused_training_matches_naive(tiny_ckpt, shapes_file):
    # same rollouts, same advantages: three AdamW updates with each path give the same parameters
    import palmr
    from data import read_jsonl
    args = grpo.get_args(["--model", tiny_ckpt, "--data", shapes_file, "--beta", "0.05", "--rollout-batch", "4",
                          "--update-batch", "2", "--micro-batch", "3", "--logprob-chunk", "7"])
    processor = palmr.load_processor(tiny_ckpt)
    cpu = torch.device("cpu")
    models = {impl: grpo.prepare_model(tiny_ckpt, cpu, train=True, logprobs=impl, logprob_chunk=7)
              for impl in ("fused", "naive")}
    reference = grpo.prepare_model(tiny_ckpt, cpu, train=False, logprobs="naive")
    engine = palmr.HFEngine(models["naive"], processor, args.max_pixels)
    rows, enc = grpo.rollout(engine, processor, read_jsonl(shapes_file)[:4], args, step=0, rank=0)
    adv = torch.linspace(-1.5, 1.5, len(rows))
    stats = {}
    for impl, model in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        for _ in range(3):
            stats[impl] = grpo.train_on_rollouts(model, reference, opt, processor, rows, enc, adv, args, cpu)
    init = dict(palmr.load_model(tiny_ckpt).named_parameters())
    fused, naive = dict(models["fused"].named_parameters()), dict(models["naive"].named_parameters())
    # AdamW divides by sqrt(v): where a gradient is ~1e-8 (rare embedding rows) round-off differences of
    # the two summation orders show up at ~1e-5, still 300x below the 3e-3 the updates can move a weight
    for name in fused:
        torch.testing.assert_close(fused[name], naive[name], atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        assert (fused[name] - naive[name]).abs().mean() < 1e-7, name
    assert not torch.equal(fused["lm_head.weight"], init["lm_head.weight"]), "the updates must do something"
    assert stats["fused"]["entropy"] == pytest.approx(stats["naive"]["entropy"], rel=1e-4)


@pytest.mark.slow
def test_fused_under_fsdp2_two_ranks_matches_naive(tmp_path, tiny_ckpt, shapes_file):
    # under FSDP2 the LM-head weight must be the unsharded full tensor when the fused function reads it,
    # and its gradient must reach the sharded parameter: compare with the naive path on the same batch
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "tests" / "fsdp_logprob_probe.py"), str(tmp_path), tiny_ckpt, shapes_file]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["grad_names_equal"] and r["lm_head_grad_norm"] > 0, r
        assert r["logp_max_diff"] < 1e-5 and r["entropy_max_diff"] < 1e-4, r
        assert r["grad_max_rel_diff"] < 1e-4, r


def test_zero_rows_give_empty_results_and_a_zero_gradient():
    hidden = torch.zeros(0, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    logp, entropy = grpo.fused_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long))
    assert logp.shape == (0,) and entropy.shape == (0,)
    (logp.sum() + 0.0).backward()
    assert weight.grad is not None and torch.equal(weight.grad, torch.zeros(11, 8)), "the head stays in the graph"
