"""kernels/lm_head.py against a float64 reference: values, entropy, both gradients, bf16, the folded policy loss;
and the trainer (grpo.py), which always uses the fused LM head, against the naive one (full logits)."""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import grpo
from kernels.lm_head import (LOGPROB_CHUNK_CPU, fused_logprobs, fused_policy_loss, logprob_chunk,
                             naive_logprobs)

ROOT = Path(__file__).resolve().parents[2]
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

    logp, entropy = fused_logprobs(hidden, weight, targets, temperature, chunk_size=chunk)
    (logp * g).sum().backward()
    ref_logp, ref_entropy, h, w = _reference(hidden, weight, targets, temperature)
    (ref_logp * g.double()).sum().backward()

    assert logp.dtype == torch.float32 and not entropy.requires_grad, "fp32 log-probs, detached entropy"
    torch.testing.assert_close(logp.double(), ref_logp.detach(), atol=2e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), h.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weight.grad.double(), w.grad, atol=1e-6, rtol=1e-4)


def test_naive_reference_matches_float64():
    # naive_logprobs is the reference the trainer-level tests compare against: check it too (float64 in, float64 out)
    torch.manual_seed(0)
    hidden = torch.randn(9, 16, dtype=torch.float64)
    weight = torch.randn(50, 16, dtype=torch.float64)
    targets = torch.randint(0, 50, (9,))
    logp, entropy = naive_logprobs(hidden, weight, targets, 0.7)
    ref_logp, ref_entropy, _, _ = _reference(hidden, weight, targets, 0.7)
    assert logp.dtype == torch.float64 and not entropy.requires_grad
    torch.testing.assert_close(logp, ref_logp.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-12, rtol=0)


def test_gradcheck_float64():
    torch.manual_seed(0)
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 10, 3, 3, 7])
    fn = lambda h, w: fused_logprobs(h, w, targets, 0.7, chunk_size=2)[0]  # noqa: E731
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
    logp, entropy = fused_logprobs(hidden, weight, targets, 1.0, chunk_size=16)
    assert logp.dtype == torch.float32, "log-sum-exp is accumulated in fp32 for bf16 inputs"
    logp.sum().backward()
    ref_logp, ref_entropy, h, w = _reference(hidden, weight, targets, 1.0)
    ref_logp.sum().backward()
    assert (logp.double() - ref_logp.detach()).abs().max() < BF16_LOGP_ATOL
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    for got, want in ((hidden.grad, h.grad), (weight.grad, w.grad)):
        assert (got.double() - want).norm() / want.norm() < BF16_GRAD_RTOL


def _naive_head(model):
    """The model's completion_logprobs / completion_loss on the naive LM head (kernels.lm_head.naive_logprobs on
    grpo.completion_hidden: full (N, V) logits, autograd through them): the reference the trainer is compared to.
    The model itself is unchanged; only these two methods of this instance are replaced."""
    def rows(m, batch, temperature):
        hidden, weight = grpo.completion_hidden(m, batch)
        mask = batch["mask"].bool()
        logp, entropy = naive_logprobs(hidden[mask], weight, batch["completion_ids"][mask], temperature)
        return mask, logp, entropy

    def scatter(mask, values):  # (N,) rows -> (B, T), 0 where masked; differentiable
        return torch.zeros(mask.shape, dtype=values.dtype).masked_scatter(mask, values)

    def completion_logprobs(m, batch, temperature):
        mask, logp, entropy = rows(m, batch, temperature)
        return scatter(mask, logp), scatter(mask, entropy)

    def completion_loss(m, batch, temperature, token_loss):  # unfolded: autograd through the full logits
        mask, logp, entropy = rows(m, batch, temperature)
        return token_loss(logp, 0, logp.shape[0]).sum(), scatter(mask, logp.detach()), scatter(mask, entropy)
    model.completion_logprobs = types.MethodType(completion_logprobs, model)
    model.completion_loss = types.MethodType(completion_loss, model)
    return model


# "folded": the default, two updates per rollout batch, the loss gradient folded into the LM head's forward
# (completion_loss); "unfolded": --is-cap with one update, the trainer's one unfolded case (completion_logprobs,
# FusedLogprobs' backward recomputing the logits)
TRAINER_CASES = {"folded": ["--update-batch", "2"], "unfolded": ["--update-batch", "4", "--is-cap", "100"]}


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_trainer_fused_head_matches_naive_head(tiny_ckpt, shapes_file, case):
    # same rollouts, same advantages: three calls of train_on_rollouts with the fused head (the trainer's
    # only path) and with the naive one give the same parameters and the same metrics
    import palmr
    from data import read_jsonl
    args = grpo.get_args(["--model", tiny_ckpt, "--data", shapes_file, "--beta", "0.05", "--rollout-batch", "4",
                          "--group-size", "4", "--max-new-tokens", "32", "--micro-batch", "3", *TRAINER_CASES[case]])
    processor = palmr.load_processor(tiny_ckpt)
    cpu = torch.device("cpu")
    fused = grpo.prepare_model(tiny_ckpt, cpu, train=True)
    fused.logprob_chunk = 7  # many blocks, the last one partial
    naive = _naive_head(grpo.prepare_model(tiny_ckpt, cpu, train=True))
    reference = _naive_head(grpo.prepare_model(tiny_ckpt, cpu, train=False))
    engine = palmr.HFEngine(reference, processor, args.max_pixels)
    rows, enc = grpo.rollout(engine, processor, read_jsonl(shapes_file)[:4], args, step=0, rank=0)
    adv = torch.linspace(-1.5, 1.5, len(rows))
    stats = {}
    for name, model in (("fused", fused), ("naive", naive)):
        # eps 1e-6: AdamW divides by sqrt(v), so a gradient that is pure round-off (a key bias's is exactly
        # zero: it shifts all of a query's logits alike) would become a full-size update, different for any
        # two summation orders; with eps above round-off size such gradients barely move their weights
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, eps=1e-6)
        for _ in range(3):
            stats[name] = grpo.train_on_rollouts(model, reference, opt, processor, rows, enc, adv, args, cpu)
    init = dict(palmr.load_model(tiny_ckpt).named_parameters())
    got, want = dict(fused.named_parameters()), dict(naive.named_parameters())
    assert sorted(got) == sorted(want)
    for name in got:
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        assert (got[name] - want[name]).abs().mean() < 1e-7, name
    assert not torch.equal(want["lm_head.weight"], init["lm_head.weight"]), "the updates must do something"
    keys = ("entropy", "loss", "kl", "clip_frac") + (("is/ratio_mean", "is/masked_frac") if case == "unfolded" else ())
    for k in keys:
        assert stats["fused"][k] == pytest.approx(stats["naive"][k], rel=1e-4, abs=1e-7), k
    assert stats["fused"]["tokens"] == stats["naive"]["tokens"] == sum(len(c.token_ids) for _, c in rows), \
        "every completion token, once, summed over the updates"


@pytest.mark.slow
def test_fused_under_fsdp2_two_ranks_matches_naive(tmp_path, tiny_ckpt, shapes_file):
    # under FSDP2 the LM-head weight must be the unsharded full tensor when the fused function reads it, and its
    # gradient must reach the sharded parameter: each rank's FSDP gradients (the mean over ranks) against the
    # mean of the two ranks' naive gradients computed on an unsharded copy, on the same batches
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "tests" / "fsdp_logprob_probe.py"), str(tmp_path), tiny_ckpt, shapes_file]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    naive = [r["naive"] for r in ranks]
    assert sorted(naive[0]["grads"]) == sorted(naive[1]["grads"])
    mean_grads = {k: (naive[0]["grads"][k] + naive[1]["grads"][k]) / 2 for k in naive[0]["grads"]}
    assert "lm_head.weight" in mean_grads
    for rank, r in enumerate(ranks):
        for impl in ("fused", "folded"):
            got = r[impl]
            assert sorted(got["grads"]) == sorted(mean_grads), (rank, impl)
            torch.testing.assert_close(got["logp"], naive[rank]["logp"], atol=1e-5, rtol=0)
            torch.testing.assert_close(got["entropy"], naive[rank]["entropy"], atol=1e-4, rtol=0)
            for k, want in mean_grads.items():
                assert (got["grads"][k] - want).norm() <= 1e-4 * want.norm() + 1e-9, (rank, impl, k)
    assert not torch.equal(naive[0]["logp"], naive[1]["logp"]), "the ranks scored different rows"


def test_zero_rows_give_empty_results_and_a_zero_gradient():
    hidden = torch.zeros(0, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    logp, entropy = fused_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long))
    assert logp.shape == (0,) and entropy.shape == (0,)
    (logp.sum() + 0.0).backward()
    assert weight.grad is not None and torch.equal(weight.grad, torch.zeros(11, 8)), "the head stays in the graph"


# ---------------------------------------------------------------------------------------------------
# fused_policy_loss: the PPO token loss with the LM-head gradient computed in the forward pass


def _ppo_inputs(logp, seed=0):
    """Old/ref log-probs near `logp`, advantages of both signs, IS weights; and which tokens PPO clips, by
    construction: the log-ratio logp - old is +-0.5 on the clipped side (rows 0, 3, 6, ...), +-0.5 on the other
    side (rows 1, 4, ...: outside the range, not clipped) and within +-0.1 (rows 2, 5, ...)."""
    g = torch.Generator().manual_seed(seed)
    n = logp.shape[0]
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    kind = torch.arange(n) % 3
    log_ratio = torch.where(kind == 0, 0.5 * adv.sign(), torch.where(kind == 1, -0.5 * adv.sign(),
                            (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 0.2))
    old = logp.detach() - log_ratio
    ref = logp.detach() + (torch.rand(n, generator=g, dtype=torch.float64) - 0.5)
    isw = torch.rand(n, generator=g, dtype=torch.float64) * 2
    return old, ref, adv, isw, kind == 0


def _ppo_token_loss(old, ref, adv, isw, n):
    def token_loss(lp, s, e):
        return grpo.token_policy_loss(lp, old[s:e].to(lp.dtype), ref[s:e].to(lp.dtype), adv[s:e].to(lp.dtype),
                                      0.2, 0.28, 0.05, isw[s:e].to(lp.dtype))[0] / n
    return token_loss


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_folded_policy_loss_matches_float64_autograd(temperature):
    torch.manual_seed(0)
    n, hdim = 37, 32
    hidden = torch.randn(n, hdim, requires_grad=True)
    weight = (torch.randn(V, hdim) * 0.3).requires_grad_(True)
    targets = torch.randint(0, V, (n,))
    old, ref, adv, isw, want_clipped = _ppo_inputs(_reference(hidden, weight, targets, temperature)[0])
    token_loss = _ppo_token_loss(old, ref, adv, isw, n)

    loss, logp, entropy = fused_policy_loss(hidden, weight, targets, token_loss, temperature, chunk_size=16)
    (loss * 3.0).backward()  # an upstream gradient other than 1 scales both gradients
    ref_logp, ref_entropy, h, w = _reference(hidden, weight, targets, temperature)
    ref_loss = token_loss(ref_logp, 0, n).sum()
    (ref_loss * 3.0).backward()
    clipped = grpo.token_policy_loss(ref_logp.detach(), old, ref, adv, 0.2, 0.28, 0.05)[2]
    assert torch.equal(clipped, want_clipped), "the inputs exercise both the clipped and the unclipped branch"
    assert not logp.requires_grad and not entropy.requires_grad
    torch.testing.assert_close(loss.double(), ref_loss.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logp.double(), ref_logp.detach(), atol=2e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), h.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(weight.grad.double(), w.grad, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_folded_policy_loss_equals_recompute(temperature):
    # the fold (FusedPolicyLoss: gradients in the forward) against the same token loss on fused_logprobs
    # (FusedLogprobs: autograd, the backward recomputing the logits), both fp32, same chunks
    torch.manual_seed(1)
    n, hdim, chunk = 37, 32, 16
    hidden = torch.randn(n, hdim)
    weight = torch.randn(V, hdim) * 0.3
    targets = torch.randint(0, V, (n,))
    old, ref, adv, isw, _ = _ppo_inputs(_reference(hidden, weight, targets, temperature)[0], seed=1)
    token_loss = _ppo_token_loss(old, ref, adv, isw, n)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss1, logp1, entropy1 = fused_policy_loss(h1, w1, targets, token_loss, temperature, chunk_size=chunk)
    (loss1 * 2.0).backward()
    logp2, entropy2 = fused_logprobs(h2, w2, targets, temperature, chunk_size=chunk)
    loss2 = token_loss(logp2, 0, n).sum()
    (loss2 * 2.0).backward()
    assert torch.equal(logp1, logp2.detach()) and torch.equal(entropy1, entropy2), "the same forward, block by block"
    torch.testing.assert_close(loss1, loss2.detach(), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-8, rtol=1e-5)


def test_folded_policy_loss_finite_differences_float64():
    # torch.autograd.gradcheck runs several backwards through one graph, which this function refuses (its
    # gradients are scaled in place): central differences of the loss against one backward instead
    torch.manual_seed(0)
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 10, 3, 3, 7])
    a = torch.tensor([0.5, -1.0, 2.0, 0.1, -0.3], dtype=torch.float64)
    token_loss = lambda lp, s, e: a[s:e] * torch.exp(lp) + lp ** 2  # noqa: E731  nonlinear, elementwise
    fn = lambda h, w: fused_policy_loss(h, w, targets, token_loss, 0.7, chunk_size=2)[0]  # noqa: E731
    loss = fn(hidden, weight)
    (loss * 1.5).backward()
    for x in (hidden, weight):
        numeric = torch.zeros_like(x)
        for i in range(x.numel()):
            d = torch.zeros_like(x).view(-1)
            d[i] = 1e-6
            with torch.no_grad():
                up = fn(hidden + d.view_as(x), weight) if x is hidden else fn(hidden, weight + d.view_as(x))
                down = fn(hidden - d.view_as(x), weight) if x is hidden else fn(hidden, weight - d.view_as(x))
            numeric.view(-1)[i] = 1.5 * (up - down) / 2e-6
        torch.testing.assert_close(x.grad, numeric, atol=1e-7, rtol=1e-6)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss2 = fn(hidden, weight)
        loss2.backward(retain_graph=True)
        loss2.backward()


def test_folded_policy_loss_bf16_within_documented_tolerance():
    torch.manual_seed(0)
    n, hdim = 40, 64
    hidden = torch.randn(n, hdim).bfloat16().requires_grad_(True)
    weight = (torch.randn(V, hdim) * 0.4).bfloat16().requires_grad_(True)
    targets = torch.randint(0, V, (n,))
    a = torch.randn(n)
    token_loss = lambda lp, s, e: lp * a[s:e]  # noqa: E731
    loss, logp, _ = fused_policy_loss(hidden, weight, targets, token_loss, 1.0, chunk_size=16)
    loss.backward()
    ref_logp, _, h, w = _reference(hidden, weight, targets, 1.0)
    (ref_logp * a.double()).sum().backward()
    assert (logp.double() - ref_logp.detach()).abs().max() < BF16_LOGP_ATOL
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    for got, want in ((hidden.grad, h.grad), (weight.grad, w.grad)):
        assert (got.double() - want).norm() / want.norm() < BF16_GRAD_RTOL


def test_masked_token_loss_sums_to_policy_loss():
    # the per-token closure the folded path uses is policy_loss, token by token: same value, same gradient
    torch.manual_seed(0)
    B, T = 3, 5
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    logp = (-torch.rand(B, T, dtype=torch.float64) * 3).requires_grad_(True)
    old, ref = -torch.rand(B, T, dtype=torch.float64) * 3, -torch.rand(B, T, dtype=torch.float64) * 3
    adv, isw = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    for old_in in (old, None):  # None: one update per rollout batch, old = the current log-probs
        want, _ = grpo.policy_loss(logp, logp.detach() if old_in is None else old, ref, adv, mask, 0.2, 0.28, 0.1, isw)
        (gw,) = torch.autograd.grad(want, logp)
        token_loss = grpo.masked_token_loss(old_in, ref, adv, mask, 0.2, 0.28, 0.1, isw)
        rows = logp[mask.bool()]
        got = token_loss(rows[:3], 0, 3).sum() + token_loss(rows[3:], 3, 8).sum()  # in two blocks
        (gg,) = torch.autograd.grad(got, logp)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
        torch.testing.assert_close(gg, gw, atol=1e-12, rtol=0)


def test_folded_zero_rows_keep_the_head_in_the_graph():
    hidden = torch.zeros(0, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    loss, logp, entropy = fused_policy_loss(hidden, weight, torch.zeros(0, dtype=torch.long), lambda lp, s, e: lp)
    loss.backward()
    assert logp.shape == (0,) and float(loss.detach()) == 0.0 and torch.equal(weight.grad, torch.zeros(11, 8))


@pytest.mark.parametrize("memory_mib, want", [(1024, 704), (1, 64), (8192, 5632)])
def test_gpu_chunk_from_memory_budget(memory_mib, want):
    # 10 bytes per logit (two fp32 buffers and a bf16 copy), multiples of 64 rows: hand-computed at V 152,064
    assert logprob_chunk(152064, "cuda", memory_mib) == want
    assert logprob_chunk(152064, "cpu", memory_mib) == LOGPROB_CHUNK_CPU == 128


@pytest.mark.parametrize("flags", [["--logprobs", "naive"], ["--fold-loss-grad"], ["--no-fold-loss-grad"],
                                   ["--logprob-chunk", "7"]])
def test_removed_lm_head_flags_are_refused(flags, capsys):
    # issue 24: the model always scores with the fused head, the loss is always folded where it can be, the
    # chunk comes from logprob_chunk (tests set model.logprob_chunk)
    with pytest.raises(SystemExit):
        grpo.get_args(flags)
    assert "unrecognized arguments" in capsys.readouterr().err
