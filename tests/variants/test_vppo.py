"""VPPO (variants/vppo.py, --vppo): patch blackening, per-token visual dependency, advantage shaping and token
filtering by hand, and a training step with it (torchrun on 2 ranks: tests/variants/test_base.py)."""
import math
import time

import pytest
import torch

import grpo
import variants
from variants.vppo import VPPO, blacken_patches, masked_prompts, vppo_advantages, vppo_dependency


def test_blacken_patches_by_hand():
    # 4 patches of C=3 channels x (T=2 x 2 x 2) values; black = (0 - mean) / std per channel
    pv = torch.arange(4 * 24, dtype=torch.float32).view(4, 24)
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.5, 1.0)
    out = blacken_patches(pv, mean, std, 0.5, torch.Generator().manual_seed(1))
    chosen = torch.rand(4, generator=torch.Generator().manual_seed(1)) < 0.5
    assert 0 < chosen.sum() < 4, "the seed must blacken some patches and keep others"
    for i in range(4):
        if chosen[i]:
            assert out[i].tolist() == [-1.0] * 8 + [-0.5] * 8 + [0.0] * 8
        else:
            assert torch.equal(out[i], pv[i])
    assert torch.equal(pv, torch.arange(4 * 24, dtype=torch.float32).view(4, 24)), "the input is not modified"
    assert torch.equal(blacken_patches(pv, mean, std, 0.0, torch.Generator()), pv)


def test_dependency_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    masked = torch.tensor([[-1.0, -3.0, 29.5], [-1.5, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    s = vppo_dependency(logp, masked, mask)
    # d = masked - logp = [0, -1, 30 -> clamp 20], [-0.5, 0, (masked out)]; S = exp(d) - d - 1, clamped to 10
    expected = torch.tensor([[0.0, math.exp(-1) + 1 - 1, 10.0], [math.exp(-0.5) + 0.5 - 1, 0.0, 0.0]])
    assert torch.allclose(s, expected, atol=1e-6), s


def test_advantage_shaping_and_token_filtering_by_hand():
    A = torch.tensor([1.0, -1.0, 2.0])
    dep = torch.tensor([[0.2, 0.4, 0.6], [0.1, 0.1, 0.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    adv, m = vppo_advantages(A, dep, mask, top_k=0.4, beta_min=0.9)
    # mean dependency s = [0.4, 0.1, 1.0] -> n = [1/3, 0, 1], mean 4/9 -> beta_max = 0.9 + 0.1 / (4/9) = 1.125
    # alpha = 0.9 + n * 0.225 = [0.975, 0.9, 1.125] (they average 1); kept tokens: ceil(0.4 T) = 2, 1, 1 with
    # the largest S (a tie keeps the earlier token)
    expected = torch.tensor([[0.0, 0.975, 0.975], [-0.9, 0.0, 0.0], [2.25, 0.0, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-6), adv
    assert m["vppo/alpha_min"] == pytest.approx(0.9) and m["vppo/alpha_max"] == pytest.approx(1.125)
    assert m["vppo/kept"] == pytest.approx(4 / 6) and m["vppo/dependency"] == pytest.approx(2.4 / 6)
    # equal dependencies: every alpha is 1; top_k 1 keeps every token; an empty completion keeps none
    adv, m = vppo_advantages(A, torch.ones(3, 3), torch.tensor([[1, 1, 1], [0, 0, 0], [1, 1, 0]]), 1.0, 0.9)
    assert torch.equal(adv, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [2.0, 2.0, 0.0]]))


# -----------------------------------------------------------------------------
# a training step with the VPPO hook (grpo.train_on_rollouts(..., hooks=[VPPO]))


def _setup(tiny_ckpt, shapes_file, *flags):
    import palmr
    from data import read_jsonl
    args = grpo.get_args(["--model", tiny_ckpt, "--data", shapes_file, "--rollout-batch", "2", "--update-batch", "2",
                          "--group-size", "4", "--max-new-tokens", "12", "--beta", "0", "--lr", "1e-3",
                          "--no-shared-prefix", *flags])
    processor = palmr.load_processor(tiny_ckpt)
    policy = grpo.prepare_model(tiny_ckpt, torch.device("cpu"), train=True)
    engine = palmr.HFEngine(policy, processor, args.max_pixels)
    rows, encoded = grpo.rollout(engine, processor, read_jsonl(shapes_file)[:2], args, 0, rank=0)
    return args, processor, policy, rows, encoded


def _dependency(policy, processor, rows, encoded, args, step):
    """S_t of every row under the policy as it is, by hand: the rows scored once with their images and once with
    the patches VPPO blackens at `step` (masked_prompts, seeded 1_000_003 * seed + step). -> S (B, T), mask (B, T)"""
    pad = processor.tokenizer.pad_token_id
    masked = masked_prompts(encoded, processor, args.vppo_mask_prob, 1_000_003 * args.seed + step)
    batch = grpo.training_batch(rows, encoded, pad, "cpu")
    with torch.no_grad():
        logp = policy.completion_logprobs(batch, args.temperature)[0]
        masked_logp = policy.completion_logprobs(grpo.training_batch(rows, masked, pad, "cpu"), args.temperature)[0]
    return vppo_dependency(logp, masked_logp, batch["mask"]), batch["mask"]


def _timed(hook):
    """Wrap the hook's shape_advantages; -> the list its calls' wall seconds are appended to."""
    seconds, inner = [], hook.shape_advantages

    def shape_advantages(ctx):
        t = time.time()
        out = inner(ctx)
        seconds.append(time.time() - t)
        return out
    hook.shape_advantages = shape_advantages
    return seconds


def test_vppo_with_every_token_and_unit_scale_is_plain_grpo(tiny_ckpt, shapes_file):
    # top_k 1 and beta_min 1 make VPPO's advantages the GRPO ones: the update must be the same
    args, processor, policy, rows, encoded = _setup(tiny_ckpt, shapes_file)
    advantages = torch.linspace(-1, 1, len(rows))
    start = {n: p.detach().clone() for n, p in policy.named_parameters()}
    args.vppo_top_k, args.vppo_beta_min = 1.0, 1.0
    dependency, mask = _dependency(policy, processor, rows, encoded, args, step=0)
    results = []
    for vppo in (False, True):
        with torch.no_grad():
            for n, p in policy.named_parameters():
                p.copy_(start[n])
        args.vppo = vppo
        hooks = variants.active(args, 1)
        assert [type(h) for h in hooks] == ([VPPO] if vppo else [])
        seconds = _timed(hooks[0]) if hooks else []
        optimizer = torch.optim.SGD(policy.parameters(), lr=1e-2)
        stats = grpo.train_on_rollouts(policy, None, optimizer, processor, rows, encoded, advantages, args,
                                       torch.device("cpu"), hooks=hooks)
        results.append(({n: p.detach().clone() for n, p in policy.named_parameters()}, stats, seconds))
    (plain, s0, _), (vppo, s1, seconds) = results
    assert "vppo/kept" not in s0 and "t_vppo" not in s0 and s1["vppo/kept"] == 1.0 and s1["vppo/alpha_min"] == 1.0
    # t_vppo is the hook's own pass (its masked forward), as timed around it here; 0.05 s of slack for the
    # few statements between the clock's previous lap and the call
    assert len(seconds) == 1 and s1["t_vppo"] == pytest.approx(seconds[0], abs=0.05)
    expected = float((dependency * mask).sum() / mask.sum())  # the mean S_t over every completion token
    assert expected > 0, "blackening the image must move some token's probability"
    assert s1["vppo/dependency"] == pytest.approx(expected, rel=1e-5)
    moved = max((plain[n] - start[n]).abs().max().item() for n in start)
    assert moved > 1e-4
    for n in start:
        torch.testing.assert_close(vppo[n], plain[n], atol=1e-6, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_vppo_filters_tokens_in_a_training_step(tiny_ckpt, shapes_file):
    args, processor, policy, rows, encoded = _setup(tiny_ckpt, shapes_file, "--vppo")
    dependency, mask = _dependency(policy, processor, rows, encoded, args, step=3)
    stats = grpo.train_on_rollouts(policy, None, torch.optim.SGD(policy.parameters(), lr=1e-3), processor, rows,
                                   encoded, torch.linspace(-1, 1, len(rows)), args, torch.device("cpu"),
                                   hooks=variants.active(args, 1), step=3)
    lengths = [len(c.token_ids) for _, c in rows]
    assert stats["vppo/kept"] == pytest.approx(sum(math.ceil(0.4 * n) for n in lengths) / sum(lengths))
    # the alphas by hand from the rows' mean S_t: n_i = (s_i - min) / (max - min), beta_max = 0.9 + 0.1 / mean(n);
    # the row with the least dependency gets beta_min, the one with the most beta_max
    s = (dependency * mask).sum(1) / mask.sum(1)
    n = (s - s.min()) / (s.max() - s.min())
    assert stats["vppo/alpha_min"] == pytest.approx(0.9, rel=1e-6)
    assert stats["vppo/alpha_max"] == pytest.approx(0.9 + 0.1 / float(n.mean()), rel=1e-4)


def test_vppo_flags_are_checked():
    for flags in (["--vppo-top-k", "0"], ["--vppo-top-k", "1.5"], ["--vppo-mask-prob", "-0.1"], ["--vppo-beta-min", "2"]):
        with pytest.raises(SystemExit, match="--vppo-top-k must be in"):
            variants.active(grpo.get_args(["--vppo", *flags]), 1)
    assert [type(h) for h in variants.active(grpo.get_args(["--vppo", "--vppo-top-k", "1"]), 1)] == [VPPO]
