"""The fused LM head: per-token log-probs and the policy loss of sampled tokens without the (N, V) logits.

Plain PyTorch, no Triton; depends on torch alone, so this one file can be copied into another project.

    from kernels.lm_head import fused_logprobs, fused_policy_loss, naive_logprobs, logprob_chunk
    logp, entropy = fused_logprobs(hidden, lm_head.weight, targets, temperature, logprob_chunk(V, "cuda"))

- fused_logprobs (FusedLogprobs): log softmax(hidden @ weight.T / T)[targets] and the entropy, a block of rows
  at a time; backward recomputes each block.
- fused_policy_loss (FusedPolicyLoss): a token loss of those log-probs (PPO-clip + k3 in grpo.py) with the LM
  head's gradient folded into the forward pass: one matmul fewer than fused_logprobs + autograd.
- naive_logprobs: the textbook path, (N, V) logits in full; the reference the tests compare against.
- logprob_chunk: rows per block (CPU: the measured best; GPU: from a memory budget).
Measured in README "Fused log-probs" (bench/logprob.py).
"""
import torch

LOGPROB_CHUNK_CPU = 128  # CPU: the measured best (bench/logprob.py, README)
LOGPROB_MEMORY_MIB = 1024  # GPU: the fused LM head's (chunk, V) working set, README "Fused log-probs"


def logprob_chunk(vocab, device_type, memory_mib=LOGPROB_MEMORY_MIB):
    """Rows per block of the fused LM head: CPU's measured best, or on a GPU as many rows as fit `memory_mib`.

    A block of c rows holds two fp32 (c, V) buffers and, for bf16 inputs, one bf16 copy: 10 bytes per
    logit. Rounded down to a multiple of 64 rows (at least 64). Qwen2.5-VL-7B (V 152,064), 1024 MiB: 704.
    """
    if device_type != "cuda":
        return LOGPROB_CHUNK_CPU
    return max(64, memory_mib * 2 ** 20 // (10 * vocab) // 64 * 64)


class FusedLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T / T)[targets] and the entropy, `chunk` rows at a time.

    Memory: one or two (chunk, V) buffers, allocated once per call and reused by every block (fresh
    large allocations cost page faults on CPU); the (N, V) logits never exist. Precision: the matmul
    runs in the input dtype (as the sampler's does), its block is cast to fp32 (fp64 stays fp64) before
    temperature, log-sum-exp and softmax; gradients come out in the inputs' dtypes, each block's matmul
    summing in fp32. Backward recomputes each
    block: d logp / d logits = (onehot - p) / T, so with s = g / T per row,
    grad_hidden = s * (W[target] - p W) and grad_weight = sum_rows (onehot - p)^T (s * h).
    The row scale s is applied to the (chunk, H) operands, never to the (chunk, V) block.
    """

    @staticmethod
    def _logits(hidden, weight, buf, temperature):
        """Write the temperature-scaled logits of `hidden` rows into buf (c, V) and return it."""
        if hidden.dtype == buf.dtype:
            torch.mm(hidden, weight.T, out=buf)
        else:
            buf.copy_(hidden @ weight.T)  # bf16 matmul, then fp32 from here on
        return buf.div_(temperature) if temperature != 1.0 else buf

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for gradcheck
        n, c = hidden.shape[0], min(chunk_size, hidden.shape[0])
        logp, entropy, lse = (torch.empty(n, dtype=acc, device=hidden.device) for _ in range(3))
        block = torch.empty(c, weight.shape[0], dtype=acc, device=hidden.device)  # (c, V)
        probs = torch.empty_like(block)
        for s in range(0, n, c):
            e = min(s + c, n)
            x = FusedLogprobs._logits(hidden[s:e], weight, block[:e - s], temperature)
            m = x.amax(-1, keepdim=True)
            x.sub_(m)  # shifted logits: exp cannot overflow
            p = torch.exp(x, out=probs[:e - s])  # unnormalised probabilities
            z = p.sum(-1)
            log_z = z.log()
            lse[s:e] = m.squeeze(1) + log_z
            logp[s:e] = x.gather(1, targets[s:e, None]).squeeze(1) - log_z
            entropy[s:e] = log_z - p.mul_(x).sum(-1) / z  # -sum q log q with q = p / z
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk_size = temperature, c
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        acc, n, c = lse.dtype, hidden.shape[0], ctx.chunk_size
        # gradients in the inputs' dtypes, as in FusedPolicyLoss: fp32 sums inside each block's matmul
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        block = torch.empty(c, weight.shape[0], dtype=acc, device=hidden.device)
        scale = grad_logp.to(acc)[:, None] / ctx.temperature  # (N, 1)
        for s in range(0, n, c):
            e = min(s + c, n)
            p = FusedLogprobs._logits(hidden[s:e], weight, block[:e - s], ctx.temperature)
            p.sub_(lse[s:e, None]).exp_()  # softmax, in place
            p[torch.arange(e - s, device=p.device), targets[s:e]] -= 1.0  # p - onehot = -(d logp / d logits) * T
            d = p if hidden.dtype == acc else p.to(hidden.dtype)  # matmuls in the input dtype
            h = (hidden[s:e].to(acc) * -scale[s:e]).to(hidden.dtype)  # (c, H): s * h, with the sign of (onehot - p)
            torch.mm(d, weight, out=grad_hidden[s:e])
            grad_weight.addmm_(d.T, h)  # in place: no (V, H) temporary per block
            grad_hidden[s:e].mul_(-scale[s:e].to(hidden.dtype))
        return grad_hidden, grad_weight, None, None, None


def fused_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=128):
    """Per-token log-probs of `targets` under softmax(hidden @ weight.T / temperature), and the entropy.

    hidden (N, H), weight (V, H), targets (N,) -> logp (N,) differentiable w.r.t. hidden and weight,
    entropy (N,) detached; both fp32 (fp64 for fp64 inputs). The (N, V) logits never exist.
    """
    assert hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1], "hidden (N, H), weight (V, H)"
    assert targets.shape == hidden.shape[:1], "one target per row"
    if hidden.shape[0] == 0:  # no completion tokens here: keep the head in the graph (FSDP expects its grad)
        zero = ((hidden.sum() + weight.sum()) * 0.0).float()
        return zero.expand(0), torch.zeros(0, device=hidden.device)
    return FusedLogprobs.apply(hidden, weight, targets, float(temperature), int(chunk_size))


def naive_logprobs(hidden, weight, targets, temperature=1.0):
    """The textbook path, (N, V) logits and their log-softmax in full: the reference the tests compare to."""
    logits = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32)) / temperature  # (N, V), fp64 stays
    log_p = logits.log_softmax(-1)
    return log_p.gather(1, targets[:, None]).squeeze(1), -(log_p.exp() * log_p).sum(-1).detach()


class FusedPolicyLoss(torch.autograd.Function):
    """A token loss of the log-probs, with its LM-head gradients computed in the forward pass: no recompute.

    Each block of rows is visited once: its logits, log-sum-exp, log-prob and entropy (as FusedLogprobs),
    then g = d loss / d logp for those rows from `token_loss` (by autograd on the (c,) log-probs) (an elementwise function of the rows'
    log-probs, e.g. PPO-clip + k3 KL: `token_policy_loss`), then, in the logits buffer itself,
    d loss / d logits = g / T * (onehot - softmax), and grad_hidden / grad_weight from it. Backward only
    scales the stored gradients by the scalar upstream gradient. Three (N, H) x (H, V) matmuls per call,
    as the naive path; FusedLogprobs needs four (backward recomputes the logits). The same idea as
    Liger-Kernel's fused linear cross-entropy (which is Triton); here plain PyTorch.

    Memory: two (chunk, V) fp32 buffers (and a bf16 copy for bf16 inputs), and the (N, H) and (V, H)
    gradients in the inputs' dtypes (the naive path's backward makes those two as well); the (N, V)
    logits never exist. The stored gradients are scaled in place in backward, so a graph through this
    function supports one backward (a second raises RuntimeError).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, token_loss):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        n, c = hidden.shape[0], min(chunk_size, hidden.shape[0])
        logp, entropy = (torch.empty(n, dtype=acc, device=hidden.device) for _ in range(2))
        # gradients in the inputs' dtypes: each block's matmul sums in fp32, the sum over blocks is rounded
        # to the weight's dtype. For bf16 that costs precision (measured in review: 24 blocks, 0.59% relative
        # error of grad_weight vs 0.17% for one bf16 GEMM) and saves an fp32 (V, H) accumulator (2 GiB at 7B)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        block = torch.empty(c, weight.shape[0], dtype=acc, device=hidden.device)  # (c, V)
        probs = torch.empty_like(block)
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, n, c):
            e, rows = min(s + c, n), torch.arange(min(s + c, n) - s, device=hidden.device)
            x = FusedLogprobs._logits(hidden[s:e], weight, block[:e - s], temperature)
            x.sub_(x.amax(-1, keepdim=True))  # shifted logits
            p = torch.exp(x, out=probs[:e - s])  # unnormalised probabilities
            z = p.sum(-1)
            log_z = z.log()
            logp[s:e] = x[rows, targets[s:e]] - log_z
            entropy[s:e] = log_z - p.mul_(x).sum(-1) / z  # -sum q log q with q = p / z (p is scratch now)
            with torch.enable_grad():
                lp = logp[s:e].detach().requires_grad_(True)
                part = token_loss(lp, s, e).sum()
                (g,) = torch.autograd.grad(part, lp)
            loss += part.detach().to(acc)
            scale = g.to(acc) / temperature  # (c,): d loss / d logits = scale * (onehot - q)
            x.sub_(log_z[:, None]).exp_().mul_(-scale[:, None])  # in the logits buffer: q, then -scale * q
            x[rows, targets[s:e]] += scale  # now d loss / d logits
            d = x if hidden.dtype == acc else x.to(hidden.dtype)  # bf16 / fp16: matmuls in the input dtype
            torch.mm(d, weight, out=grad_hidden[s:e])
            grad_weight.addmm_(d.T, hidden[s:e])  # in place: no (V, H) temporary per block
        ctx.grads = grad_hidden, grad_weight  # intermediates, not inputs or outputs: kept on ctx
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, grad_logp, grad_entropy):
        if ctx.grads is None:
            raise RuntimeError("fused_policy_loss: one backward per forward (its stored gradients are scaled in "
                               "place, with no (V, H) temporary); run the forward again")
        (grad_hidden, grad_weight), ctx.grads = ctx.grads, None
        return grad_hidden.mul_(grad_loss), grad_weight.mul_(grad_loss), None, None, None, None


def fused_policy_loss(hidden, weight, targets, token_loss, temperature=1.0, chunk_size=128):
    """sum_i token_loss(logp_i) over rows, differentiable w.r.t. hidden and weight, gradients folded in forward.

    hidden (N, H), weight (V, H), targets (N,); token_loss(logp_rows (c,), start, end) -> (c,) per-row losses
    of rows start:end, differentiable in logp_rows and elementwise (row i's loss depends on logp_i only).
    -> loss (), logp (N,) and entropy (N,), the last two detached. Same values as
    token_loss(fused_logprobs(...)[0]).sum(), one matmul fewer (FusedPolicyLoss).
    """
    assert hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1], "hidden (N, H), weight (V, H)"
    assert targets.shape == hidden.shape[:1], "one target per row"
    if hidden.shape[0] == 0:  # keep the head in the graph (FSDP expects its grad)
        zero = ((hidden.sum() + weight.sum()) * 0.0).float()
        return zero, torch.zeros(0, device=hidden.device), torch.zeros(0, device=hidden.device)
    return FusedPolicyLoss.apply(hidden, weight, targets, float(temperature), int(chunk_size), token_loss)
