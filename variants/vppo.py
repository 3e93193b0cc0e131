"""VPPO (arXiv 2510.09285; official code huaixuheqing/VPPO-RL): advantages reweighted by each rollout's visual
dependency, and policy gradient only on its most image-dependent tokens.

    python grpo.py --vppo [--vppo-top-k 0.4 --vppo-beta-min 0.9 --vppo-mask-prob 0.5]

Per step, one extra no-grad forward of every row with its image's patches blackened gives each token's visual
dependency (the k3 estimate of the KL between the two next-token distributions at the sampled token); the
update then uses vppo_advantages' (B, T) advantages in place of the group advantage.
"""
import math
import zlib

import torch

from variants.base import Variant

def blacken_patches(pixel_values, image_mean, image_std, prob, generator):
    """VPPO's image perturbation, random patch blackening: each patch row (14 x 14 px for Qwen2.5-VL, 16 x 16 for
    Qwen3-VL and Qwen3.5) of the processed pixel_values (N, C * T * ps * ps), channel-major as the processor flattens it, is set with probability
    `prob` to the normalised value of a black pixel, (0 - mean_c) / std_c. -> (N, C*T*ps*ps), a new tensor.

    Source: VPPO's official code (huaixuheqing/VPPO-RL, verl/workers/perc_utils.py `random_patch_blackening`,
    patch 14, black_prob 0.5), which blackens 14-pixel blocks of the image before the processor; here the
    blocks are the processor's own patches, so every patch is wholly black or untouched.
    """
    n, width = pixel_values.shape
    channels = len(image_mean)
    black = -torch.tensor(image_mean, dtype=pixel_values.dtype) / torch.tensor(image_std, dtype=pixel_values.dtype)
    rows = torch.rand(n, generator=generator) < prob
    out = pixel_values.clone().view(n, channels, width // channels)
    out[rows] = black.to(out.device)[None, :, None]
    return out.view(n, width)


def vppo_dependency(logp, masked_logp, mask):
    """Per-token visual dependency S_t (B, T): how much a token's probability falls when the image is masked,
    the k3 estimate of KL(pi(. | image) || pi(. | masked image)) at the sampled token, clamped to [0, 10]:
    d = clamp(masked_logp - logp, -20, 20), S = exp(d) - d - 1. 0 where mask is 0. (VPPO official code,
    dp_actor.py: the divergence is computed on the sampled tokens only, not over the vocabulary.)"""
    d = (masked_logp - logp).clamp(-20.0, 20.0)
    return ((torch.exp(d) - d - 1.0).clamp(0.0, 10.0)) * mask


def vppo_advantages(advantages, dependency, mask, top_k=0.4, beta_min=0.9):
    """VPPO's two steps on GRPO advantages (B,), given S_t (B, T) and mask (B, T) -> (B, T) advantages, metrics.

    1. Trajectory advantage shaping: s_i = mean of S_t over row i's tokens; n_i = (s_i - min) / (max - min)
       over the rows given; alpha_i = beta_min + n_i (beta_max - beta_min), beta_max = beta_min +
       (1 - beta_min) / mean(n), so the alphas average 1; all alphas are 1 when max - min <= 1e-6.
    2. Token gradient filtering: per row, the ceil(top_k * T_i) tokens with the largest S_t keep
       A_i * alpha_i, the others get advantage 0 (no policy gradient; they still count in the token-mean
       and in the KL term, as in the official code).
    Source: arXiv 2510.09285 and its code (huaixuheqing/VPPO-RL, dp_actor.py), whose scripts use top_k 0.4 and
    beta_min 0.9. Ours: min, max and mean over the rows given (one rank's update batch); the official code
    takes min/max over a device's PPO mini-batch and the mean over its micro-batch.
    """
    mask = mask.bool()
    tokens = mask.sum(1)
    s = (dependency * mask).sum(1) / tokens.clamp(min=1)
    rows = tokens > 0  # an empty completion has no tokens to weight
    alpha = torch.ones_like(s)
    if rows.any() and float(s[rows].max() - s[rows].min()) > 1e-6:
        n = ((s - s[rows].min()) / (s[rows].max() - s[rows].min())).clamp(0.0, 1.0)
        mu = n[rows].mean()
        beta_max = beta_min + (1.0 - beta_min) / (mu + 1e-8)
        alpha = beta_min + n * (beta_max - beta_min)
    keep = torch.zeros_like(mask)
    ranked = dependency.masked_fill(~mask, float("-inf")).argsort(dim=1, descending=True, stable=True)
    for i, n_tokens in enumerate(tokens.tolist()):  # one device sync, not one per row
        keep[i, ranked[i, :math.ceil(top_k * n_tokens)]] = True
    keep &= mask
    metrics = {"vppo/dependency": float((dependency * mask).sum() / mask.sum().clamp(min=1)),
               "vppo/alpha_min": float(alpha.min()), "vppo/alpha_max": float(alpha.max()),
               "vppo/kept": float(keep.sum() / mask.sum().clamp(min=1))}
    return (advantages * alpha)[:, None] * keep, metrics


def masked_prompts(encoded, processor, prob, seed):
    """{id: encoded prompt with its image's patches blackened} (blacken_patches), a fixed draw per (seed, id)."""
    ip = processor.image_processor
    return {sid: {**e, "pixel_values": blacken_patches(e["pixel_values"], ip.image_mean, ip.image_std, prob,
                                                       torch.Generator().manual_seed(seed + zlib.crc32(sid.encode())))}
            if "pixel_values" in e else e for sid, e in encoded.items()}


def pad_cat(tensors):
    """(B_j, T_j) tensors -> one (sum B_j, max T_j) tensor, zero-padded on the right."""
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors])


class VPPO(Variant):
    """--vppo: visual-dependency advantage shaping and top-k token filtering, per optimizer update."""
    name = "vppo"
    resume_keys = ("vppo", "vppo_top_k", "vppo_beta_min", "vppo_mask_prob")
    needs_old_logprobs = True  # the dependency compares the rollout's own log-probs with the masked image's

    @staticmethod
    def add_args(ap):
        g = ap.add_argument_group("VPPO (variants/vppo.py)")
        g.add_argument("--vppo", action="store_true",
                       help="VPPO (arXiv 2510.09285): advantages reweighted by each rollout's visual dependency, policy "
                       "gradient only on its most image-dependent tokens; one extra no-grad forward with the image's "
                       "patches blackened")
        g.add_argument("--vppo-top-k", type=float, default=0.4, help="VPPO: share of each completion's tokens that "
                       "get policy gradient (official scripts: 0.4)")
        g.add_argument("--vppo-beta-min", type=float, default=0.9, help="VPPO: smallest advantage scale (official "
                       "scripts: 0.9)")
        g.add_argument("--vppo-mask-prob", type=float, default=0.5, help="VPPO: probability that an image patch is "
                       "blackened (official code: 0.5)")

    @staticmethod
    def is_active(args):
        return args.vppo

    def check(self, world):
        a = self.args
        if not (0 < a.vppo_top_k <= 1 and 0 <= a.vppo_mask_prob <= 1 and 0 <= a.vppo_beta_min <= 1):
            raise SystemExit("--vppo-top-k must be in (0, 1], --vppo-mask-prob and --vppo-beta-min in [0, 1]")

    def shape_advantages(self, ctx):
        a = self.args
        masked = masked_prompts(ctx.encoded, ctx.processor, a.vppo_mask_prob, 1_000_003 * a.seed + ctx.step)
        shaped, metrics = [], {}
        for u, update in enumerate(ctx.spans):  # the same rows scored with the image's patches blackened
            masks = [b["mask"].to(ctx.device) for b in ctx.batches[u]]
            dependency = [vppo_dependency(ctx.old_logps[u][j], ctx.policy.completion_logprobs(
                ctx.on(ctx.layout([ctx.rows[i] for i in mb], masked)), ctx.temperature)[0], masks[j])
                for j, mb in enumerate(update)]
            adv, m = vppo_advantages(ctx.advantages[update[0].start:update[-1].stop].to(ctx.device),
                                     pad_cat(dependency), pad_cat(masks), a.vppo_top_k, a.vppo_beta_min)
            shaped.append([x[:, :masks[j].shape[1]] for j, x in enumerate(adv.split([len(mb) for mb in update]))])
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + v / len(ctx.spans)
        ctx.clock.lap("t_vppo")
        return shaped, metrics
