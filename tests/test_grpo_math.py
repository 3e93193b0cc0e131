"""Hand-computed checks of group advantages and the PPO-clip + k3 KL loss (grpo.py)."""
import math

import pytest
import torch

from grpo import group_advantages, policy_loss, step_items


# -----------------------------------------------------------------------------
# group_advantages

def test_group_advantages_hand_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0,   # group 1: mean .25, unbiased std .5
                            1.0, 1.0, 1.0, 1.0])  # group 2: zero variance
    adv = group_advantages(rewards, 4, eps=1e-6)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-6)
    torch.testing.assert_close(adv[:4], expected)
    # a zero-variance group gives exactly zero advantage, and no NaN
    assert torch.equal(adv[4:], torch.zeros(4)), "zero-variance group must give zero advantage"
    assert not torch.isnan(adv).any()


def test_group_advantages_scales():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    # "none": centred only (Dr. GRPO)
    torch.testing.assert_close(group_advantages(rewards, 2, scale="none"), torch.tensor([0.5, -0.5, 0.0, 0.0]))
    # "batch": centred per group, scaled by the std of the whole batch
    batch_std = rewards.std()
    torch.testing.assert_close(group_advantages(rewards, 2, scale="batch", eps=0.0),
                               torch.tensor([0.5, -0.5, 0.0, 0.0]) / batch_std)
    with pytest.raises(AssertionError):  # rewards that do not split into groups
        group_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError):
        group_advantages(rewards, 2, scale="bogus")


def test_group_advantages_all_equal_batch_no_nan():
    adv = group_advantages(torch.zeros(8), 4)  # e.g. a random policy that never scores
    assert torch.equal(adv, torch.zeros(8))


# -----------------------------------------------------------------------------
# policy_loss

def _lp(x):
    return torch.tensor(x, dtype=torch.float64)


def test_policy_loss_clipping_both_sides():
    # one token per row; old_logp 0 so ratio = exp(logp)
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.5], dtype=torch.float64)[:, None]
    logp = torch.log(ratio).requires_grad_(True)
    old = torch.zeros_like(logp)
    adv = _lp([1.0, -1.0, 1.0, -1.0])
    mask = torch.ones_like(logp)
    loss, m = policy_loss(logp, old, None, adv, mask, eps_low=0.2, eps_high=0.28, beta=0.0)
    per_token = [-1.28,   # A>0, ratio above 1+eps_high: clipped at 1.28
                 0.8,     # A<0, ratio below 1-eps_low: clipped at 0.8 -> -min(-0.5, -0.8)
                 -0.5,    # A>0, ratio low: unclipped (pessimistic min keeps 0.5)
                 1.5]     # A<0, ratio high: unclipped (min keeps -1.5)
    assert loss.item() == pytest.approx(sum(per_token) / 4, abs=1e-9)
    assert m["clip_frac"].item() == pytest.approx(0.5)
    loss.backward()
    # clipped tokens carry no policy gradient; unclipped ones carry -A * ratio / N
    g = logp.grad[:, 0]
    assert g[0].item() == 0.0 and g[1].item() == 0.0, "clipped tokens must not get gradient"
    assert g[2].item() == pytest.approx(-1.0 * 0.5 / 4)
    assert g[3].item() == pytest.approx(1.0 * 1.5 / 4)


def test_policy_loss_k3_kl_and_masking():
    logp = _lp([[math.log(0.25), math.log(0.5), 0.0]])
    ref = _lp([[math.log(0.5), math.log(0.5), 5.0]])       # last token masked out: its huge KL must not count
    mask = _lp([[1.0, 1.0, 0.0]])
    adv = _lp([0.0])
    loss, m = policy_loss(logp, logp.detach(), ref, adv, mask, 0.2, 0.28, beta=0.1)
    k3 = 2.0 - math.log(2.0) - 1.0                           # exp(d) - d - 1 with d = log 2
    assert m["kl"].item() == pytest.approx(k3 / 2)            # (k3 + 0) over 2 unmasked tokens
    assert loss.item() == pytest.approx(0.1 * k3 / 2)


def test_policy_loss_token_mean_over_unmasked_rows():
    logp = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    mask = _lp([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])  # 5 tokens; an all-masked row
    adv = _lp([1.0, -2.0, 100.0])
    loss, _ = policy_loss(logp, logp.detach(), None, adv, mask, 0.2, 0.28, beta=0.0)
    # ratio 1: per-token loss -A; token-mean over 5 tokens: (4 * -1 + 1 * 2) / 5; row 3 ignored
    assert loss.item() == pytest.approx(-2.0 / 5)


def test_policy_loss_all_masked_is_zero_not_nan():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, m = policy_loss(logp, logp.detach(), logp.detach(), torch.ones(2), torch.zeros(2, 3), 0.2, 0.28, 0.01)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 3))


def test_policy_loss_needs_ref_when_beta():
    logp = torch.zeros(1, 2)
    with pytest.raises(AssertionError):
        policy_loss(logp, logp, None, torch.ones(1), torch.ones(1, 2), 0.2, 0.28, beta=0.1)


# -----------------------------------------------------------------------------
# data order

def test_step_items_partition_and_epochs():
    n, batch, world = 10, 4, 2
    by_k = {}
    for step in range(5):  # 20 prompts = 2 epochs of 10
        ranks = [step_items(n, step, batch, seed=0, rank=r, world=world) for r in range(world)]
        assert len(ranks[0]) == len(ranks[1]) == 2, "prompts are strided evenly over ranks"
        for r, items in enumerate(ranks):
            for j, item in enumerate(items):
                by_k[step * batch + r + j * world] = item
    seen = [by_k[k] for k in range(20)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10)), "each epoch visits every item once"
    assert seen[:10] != seen[10:], "epochs are reshuffled"
    assert step_items(n, 3, batch, 0, 1, world) == step_items(n, 3, batch, 0, 1, world), "pure function of (seed, step)"
