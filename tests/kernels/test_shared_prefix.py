"""The shared-prefix layout (kernels/shared_prefix.py; grpo.shared_prefix_batch): each prompt once per group, its
completions as branches.

Exactness is checked against the per-row layout (grpo.training_batch) on the tiny Qwen2.5-VL: in float64 to
1e-9 for log-probs, entropies and the gradient of every parameter; in bf16 within a stated tolerance; under
FSDP2 on 2 gloo ranks; with empty, max-length and split groups. The branch route's attention is checked alone
against SDPA with the dense mask.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grpo
import palmr
from data import Sample, read_jsonl
from kernels.lm_head import naive_logprobs
from kernels.shared_prefix import (PREFIX_ATTENTION, PrefixBranches, branch_attention, prefix_attention_mask,
                                   prefix_layout, use_prefix_attention)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # the probe module, beside conftest.py
from shared_prefix_probe import LENGTHS, synthetic_rows, weighted_backward  # noqa: E402


def _sample(i):
    return Sample(id=f"p{i}", image="none.png", question="q", answer="a")


def _row(sample, ids):
    return (sample, palmr.Completion(list(ids), "", [-0.5] * len(ids), True))


def test_layout_by_hand():
    # two text-only prompts: p0 (3 tokens) with completions [20, 21], [], [30]; p1 (2 tokens) with [50, 51, 52]
    prompts = [{"input_ids": [10, 11, 12]}] * 3 + [{"input_ids": [40, 41]}]
    layout = prefix_layout(["p0", "p0", "p0", "p1"], prompts, [[20, 21], [], [30], [50, 51, 52]], pad_id=0)
    assert sorted(layout) == ["branch", "hidden_index", "input_ids", "shift"], "text only: no vision tensors"
    assert layout["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30], [40, 41, 50, 51, 52, 0]]
    assert layout["branch"].tolist() == [[0, 0, 0, 1, 1, 3], [0, 0, 1, 1, 1, -1]]
    # [30] sits 2 tokens later than it would alone after p0 (after [20, 21])
    assert layout["shift"].tolist() == [[0, 0, 0, 0, 0, 2], [0, 0, 0, 0, 0, 0]]
    # hidden states that predict each completion token, flat over (S * L) = (2 * 6): the prompt's last
    # token predicts a completion's first; masked positions point at index 0 of their sequence (never read)
    assert layout["hidden_index"].tolist() == [[2, 3, 0], [0, 0, 0], [2, 0, 0], [7, 8, 9]]
    # the trainer's batch: the same layout, plus the per-token completion tensors of the same rows
    a, b = _sample(0), _sample(1)
    encoded = {"p0": {"input_ids": [10, 11, 12]}, "p1": {"input_ids": [40, 41]}}
    rows = [_row(a, [20, 21]), _row(a, []), _row(a, [30]), _row(b, [50, 51, 52])]
    batch = grpo.shared_prefix_batch(rows, encoded, pad_id=0, device="cpu")
    for k, v in layout.items():
        assert torch.equal(batch[k], v), k
    assert batch["completion_ids"].tolist() == [[20, 21, 0], [0, 0, 0], [30, 0, 0], [50, 51, 52]]
    assert batch["mask"].tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1]]
    # the per-row layout has the same completion tensors for the same rows
    per_row = grpo.training_batch(rows, encoded, pad_id=0, device="cpu")
    for k in ("completion_ids", "mask", "sampler_logp"):
        assert torch.equal(per_row[k], batch[k]), k


def test_attention_mask_by_hand():
    branch = torch.tensor([[0, 0, 0, 1, 1, 3], [0, 0, 1, 1, 1, -1]])
    layout = prefix_attention_mask(branch, "branch")  # per sequence: prompt length, completions' [start, end)
    assert isinstance(layout, PrefixBranches) and layout.shape == (2, 6)
    assert layout.spans == [(3, [(3, 5), (5, 6)]), (2, [(2, 5)])]
    mask = prefix_attention_mask(branch, "dense", "sdpa")
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0],   # prompt: causal
                                         [1, 1, 0, 0, 0, 0],
                                         [1, 1, 1, 0, 0, 0],
                                         [1, 1, 1, 1, 0, 0],   # completion 1: prompt + itself
                                         [1, 1, 1, 1, 1, 0],
                                         [1, 1, 1, 0, 0, 1]]   # completion 3: prompt + itself, never completion 1
    assert mask[1, 0, 5].int().tolist() == [1, 1, 0, 0, 0, 1], "padding sees the prompt and itself (finite softmax)"
    assert not mask[1, 0, :5, 5].any(), "no real token sees padding"
    assert torch.equal(prefix_attention_mask(branch, "dense", PREFIX_ATTENTION), mask), "prefix_attention: SDPA's mask"
    eager = prefix_attention_mask(branch, "dense", "eager", torch.float64)
    assert torch.equal(eager == 0, mask) and eager.min() == torch.finfo(torch.float64).min
    with pytest.raises(ValueError, match="flash_attention_2"):
        prefix_attention_mask(branch, "dense", "flash_attention_2")


@pytest.mark.parametrize("groups", [1, 2])
def test_branch_attention_equals_dense_mask_sdpa(groups):
    # the branch route alone: per completion, SDPA on [prompt keys; its keys] with a lower-right causal bias,
    # against one SDPA call with the dense (L, L) mask on every sequence; grouped keys (GQA) with groups 2
    torch.manual_seed(0)
    branch = torch.tensor([[0, 0, 0, 1, 1, 3, 3, 3], [0, 0, 1, 1, 1, 2, -1, -1], [0, 0, 0, 0, -1, -1, -1, -1]])
    S, L, Hq, D = *branch.shape, 4, 8
    query = torch.randn(S, Hq, L, D, dtype=torch.float64)
    key, value = (torch.randn(S, Hq // groups, L, D, dtype=torch.float64) for _ in range(2))
    got = branch_attention(query, key, value, prefix_attention_mask(branch, "branch"), 0.3)
    mask = prefix_attention_mask(branch, "dense", "sdpa")
    want = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), attn_mask=mask, scale=0.3)
    real = (branch >= 0)[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[real], want[real], atol=1e-12, rtol=0)
    assert torch.equal(got[~real], torch.zeros_like(got[~real])), "padding rows are 0"


def test_removed_flex_route_is_refused(capsys):
    # issue 24: --prefix-attention flex (torch flex_attention with a BlockMask) is gone: branch or dense
    with pytest.raises(AssertionError, match="flex"):
        use_prefix_attention(object(), "flex")
    with pytest.raises(SystemExit):
        grpo.get_args(["--prefix-attention", "flex"])
    assert "invalid choice" in capsys.readouterr().err


def test_split_tokens_and_row_tokens_by_hand():
    assert grpo.split_tokens([5, 5, 5, 5], 2) == [range(0, 2), range(2, 4)]
    assert grpo.split_tokens([10, 1, 1, 1], 2) == [range(0, 1), range(1, 4)]
    assert grpo.split_tokens([1, 1, 1, 10], 3) == [range(0, 2), range(2, 3), range(3, 4)]  # every part non-empty
    assert grpo.split_tokens([3], 1) == [range(0, 1)]
    with pytest.raises(AssertionError):
        grpo.split_tokens([1, 2], 3)
    a, b = _sample(0), _sample(1)
    encoded = {"p0": {"input_ids": [1] * 10}, "p1": {"input_ids": [1] * 4}}
    rows = [_row(a, [7, 7]), _row(a, [7]), _row(b, [7, 7, 7]), _row(b, [])]
    assert grpo.row_tokens(rows, encoded, shared=False) == [12, 11, 7, 4]
    assert grpo.row_tokens(rows, encoded, shared=True) == [12, 1, 7, 0]


def test_micro_tokens_split_each_update_by_tokens():
    args = grpo.get_args(["--rollout-batch", "4", "--update-batch", "2", "--group-size", "2", "--micro-tokens", "30",
                          "--shared-prefix"])
    a, b, c, d = (_sample(i) for i in range(4))
    encoded = {s.id: {"input_ids": [1] * 10} for s in (a, b, c, d)}
    rows = [_row(a, [5] * 10), _row(a, [5] * 10), _row(b, [5] * 2), _row(b, [5] * 2),   # update 0: 30 + 14 tokens
            _row(c, [5] * 1), _row(c, [5] * 1), _row(d, [5] * 1), _row(d, [5] * 1)]    # update 1: 11 + 11 tokens
    spans = grpo.update_micro_batches(rows, encoded, per_update=4, n_updates=2, args=args)
    assert spans == [[range(0, 2), range(2, 4)], [range(4, 8)]]
    args.micro_tokens = 0  # rows, as before
    assert grpo.update_micro_batches(rows, encoded, 4, 2, args) == [[range(0, 4)], [range(4, 8)]]


FLOAT32_NORMS = {"qwen2_5_vl": "Qwen2_5_VLRMSNorm", "qwen3_vl": "Qwen3VLTextRMSNorm"}  # families the layout is exact on


@pytest.fixture(params=list(FLOAT32_NORMS))
def float64_model(request, monkeypatch, tiny_ckpt, family_ckpt):
    """The tiny policy of each family the shared prefix is exact on (Qwen2.5-VL, Qwen3-VL: every decoder layer
    attention), in float64 end to end: their RMSNorm and vision rotary embedding compute in float32 whatever the
    input dtype, which would round both layouts to float32 and hide (or fake) a 1e-9 difference; here they are
    patched to keep the input dtype (same formulas). `.path`: its checkpoint."""
    import importlib
    family = request.param
    qwen = importlib.import_module(f"transformers.models.{family}.modeling_{family}")

    def rms_norm(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary_vision(q, k, cos, sin):
        cos, sin = cos.unsqueeze(-2).to(q.dtype), sin.unsqueeze(-2).to(q.dtype)
        return q * cos + qwen.rotate_half(q) * sin, k * cos + qwen.rotate_half(k) * sin
    monkeypatch.setattr(getattr(qwen, FLOAT32_NORMS[family]), "forward", rms_norm)
    monkeypatch.setattr(qwen, "apply_rotary_pos_emb_vision", rotary_vision)
    path = tiny_ckpt if family == "qwen2_5_vl" else family_ckpt(family)
    model = grpo.prepare_model(path, torch.device("cpu"), train=True, prefix_attention="branch").double()
    model.path = path
    return model


def _rows(tiny_ckpt, shapes_file):
    processor = palmr.load_processor(tiny_ckpt)
    rows, encoded = synthetic_rows(processor, read_jsonl(shapes_file)[:len(LENGTHS)])
    return rows, encoded, processor.tokenizer.pad_token_id


def _max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


def _naive_weighted(model, batch):
    """weighted_backward's loss, sum(logp * w), on the naive LM head (full logits) over the model's hidden states:
    -> (B, T) log-probs and entropies (0 where masked), and the loss, differentiable."""
    hidden, weight = grpo.completion_hidden(model, batch)
    mask = batch["mask"].bool()
    rows_logp, rows_entropy = naive_logprobs(hidden[mask], weight, batch["completion_ids"][mask], 0.7)
    logp = torch.zeros(mask.shape, dtype=rows_logp.dtype).masked_scatter(mask, rows_logp)
    entropy = torch.zeros(mask.shape, dtype=rows_logp.dtype).masked_scatter(mask, rows_entropy)
    w = torch.linspace(-1, 1, logp.numel(), dtype=logp.dtype).view(logp.shape)
    return logp, entropy, (logp * w).sum()


@pytest.mark.parametrize("route", ["branch", "dense"])
def test_float64_logprobs_entropies_and_all_gradients_equal_per_row(float64_model, shapes_file, route):
    rows, encoded, pad = _rows(float64_model.path, shapes_file)
    language = float64_model.model.language_model.config._attn_implementation
    assert language == PREFIX_ATTENTION, "branch (the fixture's route): the text model's attention is prefix_attention"
    assert float64_model.model.visual.config._attn_implementation != PREFIX_ATTENTION, "the vision tower keeps its own"
    float64_model.prefix_attention = route  # dense: prefix_attention hands the (L, L) mask to SDPA
    for part in (slice(None), slice(2, 9)):  # whole groups, and a micro-batch that cuts two groups
        per_row = grpo.training_batch(rows[part], encoded, pad, "cpu")
        logp0, ent0, g0 = weighted_backward(float64_model, per_row)
        logp1, ent1, g1 = weighted_backward(float64_model, grpo.shared_prefix_batch(rows[part], encoded, pad, "cpu"))
        assert logp0.dtype == torch.float64 and sorted(g0) == sorted(g1)
        assert len(g0) == len(list(float64_model.parameters())), "every parameter gets a gradient"
        assert (logp0 - logp1).abs().max() < 1e-9 and (ent0 - ent1).abs().max() < 1e-9
        assert _max_diff(g0, g1) < 1e-9, sorted(((g0[n] - g1[n]).abs().max().item(), n) for n in g0)[-3:]


def test_float64_per_row_matches_naive_head_and_finite_differences(float64_model, shapes_file):
    # what the layout comparisons above stand on: the per-row layout's log-probs and entropies against the naive
    # LM head (full logits) on the same hidden states, and the vision tower's gradient (which the image tokens,
    # once per group in the shared layout, must receive) against central differences of the naive loss
    rows, encoded, pad = _rows(float64_model.path, shapes_file)
    batch = grpo.training_batch(rows, encoded, pad, "cpu")
    logp, entropy, grads = weighted_backward(float64_model, batch)
    with torch.no_grad():
        want_logp, want_entropy, _ = _naive_weighted(float64_model, batch)
    assert (logp - want_logp).abs().max() < 1e-9 and (entropy - want_entropy).abs().max() < 1e-9
    assert torch.equal(logp == 0, batch["mask"] == 0), "a log-prob for every completion token, 0 elsewhere"
    name = "model.visual.patch_embed.proj.weight"
    proj = dict(float64_model.named_parameters())[name]
    direction = torch.randn(proj.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    losses, step = [], 1e-6
    with torch.no_grad():
        for sign in (1, -1):
            proj.add_(sign * step * direction)
            losses.append(_naive_weighted(float64_model, batch)[2].item())
            proj.sub_(sign * step * direction)
    numeric = (losses[0] - losses[1]) / (2 * step)
    analytic = (grads[name] * direction).sum().item()
    assert abs(analytic - numeric) < 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)


def test_float64_folded_policy_loss_equals_per_row(float64_model, shapes_file):
    rows, encoded, pad = _rows(float64_model.path, shapes_file)
    grads, losses = [], []
    for layout in (grpo.training_batch, grpo.shared_prefix_batch):
        batch = layout(rows, encoded, pad, "cpu")
        mask = batch["mask"]
        g = torch.Generator().manual_seed(1)
        old = (-torch.rand(mask.shape, generator=g, dtype=torch.float64) * 3) * mask
        adv = torch.randn(len(rows), generator=g, dtype=torch.float64)
        float64_model.zero_grad(set_to_none=True)
        loss, _, _ = float64_model.completion_loss(batch, 0.7, grpo.masked_token_loss(
            old, old - 0.1, adv, mask, 0.2, 0.28, 0.01))
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in float64_model.named_parameters()})
        with torch.no_grad():  # the same loss from the naive LM head's log-probs and policy_loss, unfolded
            logp = _naive_weighted(float64_model, batch)[0]
            want, _ = grpo.policy_loss(logp, old, old - 0.1, adv, mask, 0.2, 0.28, 0.01)
        assert abs(loss.item() - want.item()) < 1e-9, (loss.item(), want.item())
    assert abs(losses[0] - losses[1]) < 1e-9 and _max_diff(grads[0], grads[1]) < 1e-9


def test_bf16_stays_within_its_own_rounding(tiny_ckpt, shapes_file):
    # bf16 keeps ~3 significant digits and the layouts sum in different orders, so they differ by rounding.
    # Stated tolerance: the shared layout's bf16 error against float32 is at most 1.5x the per-row layout's,
    # and the two bf16 layouts differ by at most 2x that. Measured on this model (2026-11-30): per-row bf16 vs
    # fp32 0.0038 nats max, shared vs fp32 0.0038, shared vs per-row 0.0039.
    rows, encoded, pad = _rows(tiny_ckpt, shapes_file)
    model = grpo.prepare_model(tiny_ckpt, torch.device("cpu"), train=False)
    with torch.no_grad():
        fp32 = model.completion_logprobs(grpo.training_batch(rows, encoded, pad, "cpu"), 1.0)[0]
        model.to(torch.bfloat16)
        row = model.completion_logprobs(grpo.training_batch(rows, encoded, pad, "cpu"), 1.0)[0]
        shared = model.completion_logprobs(grpo.shared_prefix_batch(rows, encoded, pad, "cpu"), 1.0)[0]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}, "the bf16 passes really ran in bf16"
    own = (row - fp32).abs().max().item()
    torch.testing.assert_close(row, fp32, atol=0.05, rtol=0)  # bf16's own rounding, within the stated tolerance
    assert (shared - fp32).abs().max().item() <= 1.5 * own, ((shared - fp32).abs().max().item(), own)
    assert (shared - row).abs().max().item() <= 2 * own, ((shared - row).abs().max().item(), own)


@pytest.mark.slow
def test_fsdp2_two_ranks_match_one_process(tmp_path, tiny_ckpt, shapes_file):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "tests" / "shared_prefix_probe.py"), str(tmp_path), tiny_ckpt, shapes_file]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    processor = palmr.load_processor(tiny_ckpt)
    pad = processor.tokenizer.pad_token_id
    model = grpo.prepare_model(tiny_ckpt, torch.device("cpu"), train=True)
    n, results = len(LENGTHS), []
    for rank in range(2):  # each rank's own rows, in the per-row layout, in one process
        rows, encoded = synthetic_rows(processor, read_jsonl(shapes_file)[rank * n:(rank + 1) * n], seed=rank)
        results.append(weighted_backward(model, grpo.training_batch(rows, encoded, pad, "cpu")))
    mean_grads = {k: (results[0][2][k] + results[1][2][k]) / 2 for k in results[0][2]}  # FSDP averages over ranks
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        logp, entropy, _ = results[rank]
        assert sorted(r["grads"]) == sorted(mean_grads)
        assert (r["logp"] - logp).abs().max() < 1e-5 and (r["entropy"] - entropy).abs().max() < 1e-4
        for k in mean_grads:
            torch.testing.assert_close(r["grads"][k], mean_grads[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    assert not torch.equal(results[0][0], results[1][0]), "the ranks scored different rows"


@pytest.mark.slow
def test_trainer_metrics_are_the_same_in_both_layouts(tmp_path, tiny_ckpt, shapes_file):
    def run(name, *flags):
        out = tmp_path / name
        grpo.main(["--model", tiny_ckpt, "--data", shapes_file, "--out", str(out), "--max-steps", "1",
                   "--rollout-batch", "4", "--update-batch", "2", "--group-size", "4", "--max-new-tokens", "16",
                   "--micro-batch", "3", "--save-every", "100", "--log-rollouts-every", "0", "--lr", "1e-3", *flags])
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], \
            json.loads((out / "args.json").read_text())
    per_row, args0 = run("per_row", "--no-shared-prefix")
    shared, args1 = run("shared", "--shared-prefix", "--micro-tokens", "200")
    assert args0["shared_prefix"] is False and args1["shared_prefix"] is True
    assert len(per_row) == len(shared) == 1
    for a, b in zip(per_row, shared):  # same rollouts, same rewards; losses equal to float32 round-off
        assert a["reward"] == b["reward"] and a["completion_len"] == b["completion_len"]
        for k in ("loss", "kl", "entropy", "grad_norm", "clip_frac"):
            assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])), (a["step"], k, a[k], b[k])
