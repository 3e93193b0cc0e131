"""Everything around the vLLM engine that runs without a GPU: names, sampling kwargs, outputs, selection, IS."""
import importlib.util
import math
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import grpo
import palmr


def test_weight_names_match_what_transformers_saves(tiny_ckpt):
    # ground truth: transformers' own save_pretrained writes the hub layout that vLLM's loader reads
    model = palmr.load_model(tiny_ckpt)
    saved = set(load_file(f"{tiny_ckpt}/model.safetensors"))
    mapped = {palmr.vllm_weight_name(n) for n, _ in model.named_parameters()}
    assert mapped == saved


HUB_NAME = re.compile(
    r"^(lm_head\.weight"
    r"|model\.(embed_tokens\.weight|norm\.weight"
    r"|layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|input_layernorm|post_attention_layernorm)\.(weight|bias))"
    r"|visual\.(patch_embed\.proj\.weight"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.(gate|up|down)_proj)\.(weight|bias)"
    r"|merger\.(ln_q\.weight|mlp\.[02]\.(weight|bias))))$")


def test_weight_names_for_the_real_qwen25vl_7b_layout():
    # Qwen2.5-VL-7B-Instruct's config, built on the meta device (no weights, no download)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           fullatt_block_indexes=[7, 15, 23, 31]))
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    mapped = [palmr.vllm_weight_name(n) for n, _ in model.named_parameters()]
    bad = [n for n in mapped if not HUB_NAME.match(n)]
    assert not bad, f"names vLLM's Qwen2.5-VL loader would not recognise: {bad[:5]}"
    assert len(set(mapped)) == len(mapped)
    assert "model.layers.27.self_attn.q_proj.bias" in mapped and "visual.blocks.31.attn.qkv.weight" in mapped
    assert "visual.merger.mlp.2.weight" in mapped and "lm_head.weight" in mapped
    assert sum(n.startswith("model.layers.") for n in mapped) == 28 * 12  # q,k,v (w+b), o, 3 mlp, 2 norms
    assert sum(n.startswith("visual.blocks.") for n in mapped) == 32 * 12


@pytest.mark.parametrize("temperature,top_p,expect", [
    (1.0, 1.0, dict(temperature=1.0, top_p=1.0, top_k=0)),   # plain sampling: no top-k (0 disables it)
    (0.7, 0.9, dict(temperature=0.7, top_p=0.9, top_k=0)),   # nucleus sampling at a lower temperature
    (0.0, 0.9, dict(temperature=0.0, top_p=1.0, top_k=0)),   # greedy: vLLM's temperature 0, no nucleus
])
def test_sampling_kwargs(temperature, top_p, expect):
    kw = palmr.vllm_sampling_kwargs(4, 128, temperature, top_p, seed=7, stop_ids=[2, 0], suppress_ids=[12, 13])
    for k, v in expect.items():
        assert kw[k] == v, k
    assert kw["n"] == 4 and kw["max_tokens"] == 128 and kw["seed"] == 7
    assert kw["logprobs"] == 0, "the sampled token's log-prob is needed for IS correction"
    assert kw["stop_token_ids"] == [2, 0]
    assert kw["logit_bias"] == {12: -100.0, 13: -100.0}, "vision placeholders are never sampled"


def _vllm_output(ids, lps, reason):
    positions = [{t: SimpleNamespace(logprob=lp)} for t, lp in zip(ids, lps)]  # vLLM: {id: Logprob} per position
    return SimpleNamespace(token_ids=ids, text="x", logprobs=positions, finish_reason=reason)


def test_completion_from_vllm():
    c = palmr.completion_from_vllm(_vllm_output([5, 6, 2], [-0.1, -0.2, -0.3], "stop"))
    assert c.token_ids == [5, 6, 2] and c.logprobs == [-0.1, -0.2, -0.3] and c.finished
    assert not palmr.completion_from_vllm(_vllm_output([5], [-1.0], "length")).finished
    with pytest.raises(AssertionError, match="logprobs=0"):
        palmr.completion_from_vllm(SimpleNamespace(token_ids=[5], text="", logprobs=None, finish_reason="stop"))


@pytest.mark.parametrize("requested,cuda,vllm,expect", [
    ("auto", True, True, "vllm"),    # GPUs and vLLM: the fast path
    ("auto", True, False, "hf"),     # GPUs without vLLM installed
    ("auto", False, True, "hf"),     # CPU
    ("hf", True, True, "hf"),        # asked for explicitly
    ("vllm", True, True, "vllm"),
])
def test_select_engine(requested, cuda, vllm, expect):
    assert palmr.select_engine(requested, cuda, vllm) == expect


@pytest.mark.parametrize("cuda,vllm,message", [(False, True, "CUDA"), (True, False, "not installed")])
def test_select_engine_errors(cuda, vllm, message):
    with pytest.raises(ValueError, match=message):
        palmr.select_engine("vllm", cuda, vllm)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_module_imports_without_vllm_and_the_engine_says_why(tiny_ckpt):
    processor = palmr.load_processor(tiny_ckpt)
    with pytest.raises(ModuleNotFoundError, match="vllm"):
        palmr.VLLMEngine(tiny_ckpt, processor, 112 * 112, seed=0)
    with pytest.raises(ValueError, match="CUDA"):
        grpo.main(["--model", tiny_ckpt, "--engine", "vllm", "--max-steps", "1"])


def test_sequence_is_weights_by_hand():
    old = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, 0.0], [-2.0, 0.0, 0.0]])
    sampler = torch.tensor([[-1.5, -1.0, -9.0], [-1.0, -2.0, 0.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # the 9.0 gap is masked out
    w, m = grpo.sequence_is_weights(old, sampler, mask, cap=2.0)
    # log rho: 0.5, 1.0, -1.0 -> rho e^0.5 = 1.65 (kept), e^1 = 2.72 (above the cap: masked), e^-1 (kept)
    torch.testing.assert_close(w, torch.tensor([math.exp(0.5), 0.0, math.exp(-1.0)]))
    assert m["is/masked_frac"].item() == pytest.approx(1 / 3)
    assert m["is/token_logp_gap"].item() == pytest.approx((0.5 + 0 + 0 + 1 + 1) / 5)


def test_policy_loss_applies_is_weights_to_the_policy_term_only():
    logp = torch.zeros(2, 2, dtype=torch.float64)
    ref = torch.full((2, 2), math.log(2.0), dtype=torch.float64)
    adv, mask = torch.tensor([1.0, 1.0], dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)
    loss, _ = grpo.policy_loss(logp, logp, ref, adv, mask, 0.2, 0.28, beta=0.1,
                               is_weights=torch.tensor([0.5, 0.0], dtype=torch.float64))
    k3 = 2.0 - math.log(2.0) - 1.0
    assert loss.item() == pytest.approx((-0.5 * 2 + 0.0 * 2) / 4 + 0.1 * k3)


@pytest.mark.slow
def test_trainer_logs_is_and_debug_logprob_metrics(tmp_path, tiny_ckpt, shapes_file):
    import json
    grpo.main(["--model", tiny_ckpt, "--data", shapes_file, "--out", str(tmp_path), "--max-steps", "2",
               "--rollout-batch", "2", "--update-batch", "2", "--group-size", "2", "--max-new-tokens", "12",
               "--is-cap", "2.0", "--debug-logprobs", "--engine", "hf"])
    m = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for step in m:
        for k in ("is/ratio_mean", "is/masked_frac", "is/token_logp_gap", "debug/logprob_gap_max"):
            assert k in step, k
        # the HF engine samples from the trained module itself: only the vision-token renormalisation differs
        assert step["debug/logprob_gap_max"] < 0.02 and step["is/masked_frac"] == 0.0


# -----------------------------------------------------------------------------
# the vLLM start bug: max_model_len above the checkpoint's limit (issue 13)

def test_engine_context_is_clamped_to_the_checkpoint(tiny_ckpt):
    limit = palmr.checkpoint_max_len(tiny_ckpt)
    assert limit == 4096
    # the defaults asked vLLM for 4096 + 64 = 4160 tokens on the tiny checkpoint, and vLLM refused to start
    length, prompt, warning = palmr.engine_lengths(4096, 64, limit)
    assert (length, prompt) == (4096, 4032) and "4160" in warning and "4096" in warning and "4032" in warning
    assert palmr.engine_lengths(1024, 64, limit) == (1088, 1024, "")        # fits: unchanged
    assert palmr.engine_lengths(4096, 64, limit, override=2048)[:2] == (2048, 1984)  # the user knows better
    assert palmr.engine_lengths(4096, 64, None)[:2] == (4160, 4096)          # a config without the field
    with pytest.raises(AssertionError, match="no room"):
        palmr.engine_lengths(4096, 4096, limit)


# -----------------------------------------------------------------------------
# padded vocabulary rows: never sampled, never scored (issue 13)

def test_padded_vocab_rows_are_never_sampled_nor_scored(tiny_ckpt, shapes_file):
    from data import read_jsonl
    processor = palmr.load_processor(tiny_ckpt)
    n_tokens = len(processor.tokenizer)
    model = grpo.prepare_model(tiny_ckpt, torch.device("cpu"), train=False)
    V = model.lm_head.weight.shape[0]
    assert n_tokens < V, "the tiny checkpoint's head is padded, as Qwen2.5-VL-7B's (152,064 rows, 151,665 tokens)"
    with torch.no_grad():  # make the padding rows the most likely tokens by far
        model.lm_head.weight[n_tokens:] = model.lm_head.weight[:n_tokens].mean(0) * 0 + 5.0
    engine = palmr.HFEngine(model, processor, 112 * 112)
    assert set(range(n_tokens, V)) <= set(engine.suppress)
    args = grpo.get_args(["--group-size", "4", "--max-new-tokens", "8"])
    samples = read_jsonl(shapes_file)[:2]
    rows, encoded = grpo.rollout(engine, processor, samples, args, step=0, rank=0)
    sampled = [t for _, c in rows for t in c.token_ids]
    assert sampled and max(sampled) < n_tokens, "a padding row was sampled"
    batch = grpo.training_batch(rows, encoded, processor.tokenizer.pad_token_id, torch.device("cpu"))
    model.scored_vocab = n_tokens
    with torch.no_grad():
        scored, _ = model.completion_logprobs(batch, 1.0)
        model.lm_head.weight[n_tokens:] = -5.0  # what the padding rows hold cannot matter any more
        again, _ = model.completion_logprobs(batch, 1.0)
        del model.scored_vocab
        unscored, _ = model.completion_logprobs(batch, 1.0)
    assert torch.equal(scored, again) and not torch.allclose(scored, unscored)
    # the sampler's own log-probs now agree with the trainer's up to the 5 vision placeholders it also
    # suppresses (log(1 - their mass), ~0.01 nats here); scoring the padding rows put them nats apart
    sampler = torch.zeros_like(scored)
    for i, (_, c) in enumerate(rows):
        sampler[i, :len(c.logprobs)] = torch.tensor(c.logprobs)
    mask = batch["mask"].bool()
    assert (sampler - scored)[mask].abs().max() < 0.05 and (sampler - unscored)[mask].abs().mean() > 1.0
