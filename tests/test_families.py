"""The model families behind one seam (palmr.FAMILIES): Qwen2.5-VL, Qwen3-VL and Qwen3.5.

Per family, on its tiny random checkpoint (palmr.build_tiny_checkpoint(..., family=)): the hub layout (classes,
patch size, special tokens, chat template, tied head), the weight names vLLM's loader reads, the per-row layout's
padding, activation checkpointing, the data layer's engine steps, and (slow) 2 training steps under torchrun on 2
ranks that a 2-rank resume repeats bit for bit, whose checkpoint `from_pretrained` loads and eval.py evaluates.
The shared-prefix parity per family is in tests/kernels/test_shared_prefix.py.
"""
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import grpo
import palmr
from conftest import preset_flags
from data import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = list(palmr.FAMILIES)
# what the hub checkpoints of each family say (Qwen/Qwen2.5-VL-7B-Instruct, Qwen/Qwen3-VL-2B-Instruct, Qwen/Qwen3.5-2B):
# model class, ViT patch side (px), generation prefill of the chat template, tied LM head in the small checkpoints
HUB = {"qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", 14, "", False),
       "qwen3_vl": ("Qwen3VLForConditionalGeneration", 16, "", True),
       "qwen3_5": ("Qwen3_5ForConditionalGeneration", 16, "<think>\n", True)}


def _image(i=0):
    from PIL import Image
    return Image.new("RGB", (100 + 12 * i, 80), ("red", "blue", "green")[i % 3])


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_checkpoint_has_its_familys_hub_layout(family, family_ckpt):
    from transformers import AutoModelForImageTextToText
    path = family_ckpt(family)
    cls, patch, prefill, tied = HUB[family]
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert type(model).__name__ == cls and palmr.check_model(path) is None
    processor = palmr.load_processor(path)
    assert (processor.image_processor.patch_size, processor.image_processor.merge_size) == (patch, 2)
    text = palmr.render_prompt(processor, "How many circles?")
    assert palmr.generation_prefill(text) == prefill and text.count("<|image_pad|>") == 1
    enc = palmr.encode_prompt(processor, text, _image(), 112 * 112)
    grid = enc["image_grid_thw"][0].tolist()
    assert grid[1:] == [round(80 / patch / 2) * 2, round(100 / patch / 2) * 2], "patch grid of a 100 x 80 image"
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert image_id == model.config.image_token_id and sum(enc["mm_token_type_ids"]) == grid[1] * grid[2] // 4
    assert processor.tokenizer.convert_tokens_to_ids("<|vision_start|>") == model.config.vision_start_token_id
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied, "tied LM head as the hub's"
    assert (palmr.shared_prefix_exact(model.config) is None) == (family != "qwen3_5"), "linear attention: not exact"
    assert palmr.template_prefill(path) == prefill
    blocks = palmr.fsdp_blocks(model)
    n_text, n_vision = model.config.text_config.num_hidden_layers, model.config.vision_config.depth
    assert len(blocks) == n_text + n_vision, "FSDP2 shards every decoder layer and vision block"


def test_check_model_names_every_supported_family(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "vision_config": {}}))
    why = palmr.check_model(tmp_path)
    assert "'qwen2_vl'" in why and all(f"{k} ({f.name})" in why for k, f in palmr.FAMILIES.items()), why


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_names_match_what_transformers_saves(family, family_ckpt):
    # ground truth: transformers' own save_pretrained writes the hub layout that vLLM's loader reads; a tied head
    # is saved once, as the embedding, and named_parameters() lists it once too
    path = family_ckpt(family)
    model = palmr.load_model(path)
    mapped = [palmr.vllm_weight_name(n, family) for n, _ in model.named_parameters()]
    assert set(mapped) == set(load_file(f"{path}/model.safetensors")) and len(set(mapped)) == len(mapped)


# The hub names of a layer, per family, as vLLM 0.26.0's loaders take them (model_executor/models/qwen3_vl.py:
# WeightsMapper model.visual. -> visual., model.language_model. -> language_model.model., lm_head. ->
# language_model.lm_head.; qwen3_5.py: the same mapper, plus in_proj_qkv/in_proj_z -> in_proj_qkvz and
# in_proj_b/in_proj_a -> in_proj_ba stacked per shard, mtp.* skipped)
QWEN3_TEXT = r"model\.language_model\.(embed_tokens\.weight|norm\.weight|layers\.\d+\.(" \
             r"self_attn\.([qkvo]_proj\.weight|[qk]_norm\.weight)|mlp\.(gate|up|down)_proj\.weight|" \
             r"input_layernorm\.weight|post_attention_layernorm\.weight{linear}))"
QWEN3_VISION = r"model\.visual\.(patch_embed\.proj\.(weight|bias)|pos_embed\.weight|" \
               r"blocks\.\d+\.(norm[12]|attn\.qkv|attn\.proj|mlp\.linear_fc[12])\.(weight|bias)|" \
               r"(merger|deepstack_merger_list\.\d+)\.(norm|linear_fc[12])\.(weight|bias))"
LINEAR_ATTENTION = r"|linear_attn\.(in_proj_(qkv|z|b|a)\.weight|conv1d\.weight|out_proj\.weight|norm\.weight|dt_bias|A_log)"


def _real_config(family):
    """The 8B-class hub config of a family (Qwen/Qwen3-VL-8B-Instruct, Qwen/Qwen3.5-9B config.json), for the meta device."""
    import transformers
    text = dict(hidden_size=4096, intermediate_size=12288, max_position_embeddings=262144, tie_word_embeddings=False)
    if family == "qwen3_vl":
        return transformers.Qwen3VLConfig(
            text_config=dict(vocab_size=151936, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                             head_dim=128, rope_parameters={"rope_type": "default", "mrope_section": [24, 20, 20],
                                                            "mrope_interleaved": True, "rope_theta": 5e6}, **text),
            vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                               deepstack_visual_indexes=[8, 16, 24]), tie_word_embeddings=False)
    return transformers.Qwen3_5Config(
        text_config=dict(vocab_size=248320, num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4,
                         head_dim=256, full_attention_interval=4, rope_parameters={
                             "rope_type": "default", "mrope_section": [11, 11, 10], "mrope_interleaved": True,
                             "rope_theta": 1e7, "partial_rotary_factor": 0.25}, **text),
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096),
        tie_word_embeddings=False)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_weight_names_for_the_real_8b_class_layouts(family):
    # the names the trainer streams for the real 8B-class configs, matched against what vLLM 0.26.0's loaders of the
    # family accept (its mappers read from its source above; vLLM itself cannot run here)
    from transformers import AutoModelForImageTextToText
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(_real_config(family))
    mapped = [palmr.vllm_weight_name(n, family) for n, _ in model.named_parameters()]
    hub = re.compile(rf"^(lm_head\.weight|{QWEN3_TEXT.format(linear=LINEAR_ATTENTION if family == 'qwen3_5' else '')}"
                     rf"|{QWEN3_VISION})$")
    bad = [n for n in mapped if not hub.match(n)]
    assert not bad, f"names vLLM's {family} loader would not recognise: {bad[:5]}"
    assert "lm_head.weight" in mapped and "model.visual.pos_embed.weight" in mapped
    layers = 36 if family == "qwen3_vl" else 32
    assert {int(n.split(".")[3]) for n in mapped if n.startswith("model.language_model.layers.")} == set(range(layers))
    if family == "qwen3_vl":
        assert sum("deepstack_merger_list" in n for n in mapped) == 3 * 6, "3 DeepStack mergers: norm, fc1, fc2"
    else:  # 3 linear-attention layers per full-attention layer
        assert sum(n.endswith("linear_attn.in_proj_qkv.weight") for n in mapped) == 24
        assert sum(n.endswith("self_attn.q_proj.weight") for n in mapped) == 8


def _rows(processor, n=3):
    """Three prompts of different lengths (different image sizes: left padding differs), a completion each."""
    from data import Sample
    rows, encoded = [], {}
    tok = processor.tokenizer
    for i in range(n):
        s = Sample(id=f"s{i}", image="", question="How many circles?" + " Answer." * i, answer="2")
        encoded[s.id] = palmr.encode_prompt(processor, palmr.render_prompt(processor, s.question), _image(i), 112 * 112)
        ids = tok("I see 2 red circles.</think> The answer is \\boxed{2}."[:20 + 9 * i], add_special_tokens=False)["input_ids"]
        rows.append((s, palmr.Completion(ids, "", [0.0] * len(ids), False)))
    return rows, encoded


@pytest.mark.parametrize("family", FAMILIES)
def test_per_row_layout_equals_each_row_alone(family, family_ckpt):
    # left padding must not leak into any layer: softmax attention masks it, Qwen3.5's linear-attention layers zero
    # padded states (their recurrence would otherwise carry the padding into the prompt)
    path = family_ckpt(family)
    processor = palmr.load_processor(path)
    model = grpo.prepare_model(path, torch.device("cpu"), train=False, shard=False)
    rows, encoded = _rows(processor)
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        together, _ = model.completion_logprobs(grpo.training_batch(rows, encoded, pad, "cpu"), 1.0)
        for i, row in enumerate(rows):
            alone, _ = model.completion_logprobs(grpo.training_batch([row], encoded, pad, "cpu"), 1.0)
            T = len(row[1].token_ids)
            torch.testing.assert_close(together[i, :T], alone[0, :T], atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_checkpointing_gives_the_same_gradients(family, family_ckpt):
    path = family_ckpt(family)
    processor = palmr.load_processor(path)
    rows, encoded = _rows(processor, 2)
    batch = grpo.training_batch(rows, encoded, processor.tokenizer.pad_token_id, "cpu")
    grads = []
    for ac in (False, True):
        model = grpo.prepare_model(path, torch.device("cpu"), train=True, activation_checkpointing=ac)
        logp, _ = model.completion_logprobs(batch, 1.0)
        logp.sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(g is not None for g in grads[0].values()), "every parameter, the tied head's embedding too, gets one"
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")


def test_qwen35_trains_with_the_per_row_layout_and_says_so(family_ckpt, capsys):
    # the shared prefix is exact for softmax attention only: on Qwen3.5 the trainer falls back, with one line
    path = family_ckpt("qwen3_5")
    args = grpo.get_args(["--model", path, "--shared-prefix", "--beta", "0"])
    grpo.build_trainer(args, torch.device("cpu"), None)
    assert args.shared_prefix is False
    assert capsys.readouterr().out.count("shared prefix: off for this model (linear_attention layers") == 1
    processor = palmr.load_processor(path)
    rows, encoded = _rows(processor, 2)
    model = grpo.prepare_model(path, torch.device("cpu"), train=False, shard=False)
    with pytest.raises(AssertionError, match="exact for attention layers only"):
        model.completion_logprobs(grpo.shared_prefix_batch(rows, encoded, processor.tokenizer.pad_token_id, "cpu"), 1.0)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_data_layer_steps_run_on_the_family(family, family_ckpt, shapes_file, tmp_path):
    # the learnability filter and best-of-N references sample through the same engine as the trainer
    from judge import RuleJudge
    path = family_ckpt(family)
    processor = palmr.load_processor(path)
    engine = palmr.HFEngine(palmr.load_model(path), processor, 112 * 112)
    src = tmp_path / "in.jsonl"
    data.write_jsonl(src, read_jsonl(shapes_file)[:3])
    data.filter_step(src, tmp_path / "kept.jsonl", engine, processor, k=2, batch=3, max_new_tokens=8,
                     max_pixels=112 * 112, exclusive=False)
    assert len(read_jsonl(tmp_path / "kept.jsonl")) == 3, "pass rates in [0, 1] inclusive: every item kept"
    data.reference_step(src, tmp_path / "ref.jsonl", engine, processor, RuleJudge(), n=2, batch=3, max_new_tokens=8,
                        max_pixels=112 * 112)
    log = [json.loads(line) for line in (tmp_path / "ref.log.jsonl").read_text().splitlines()]
    assert sorted((d["id"], d["status"] in ("kept", "dropped")) for d in log) == [(f"shapes-train-{i:06d}", True)
                                                                                 for i in range(3)], log


def _torchrun(script, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), *map(str, args)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


FLAGS = ["--rollout-batch", "4", "--update-batch", "2", "--group-size", "2", "--max-new-tokens", "16", "--lr", "1e-3",
         "--save-every", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_train_resume_load_and_evaluate(family, family_ckpt, shapes_file, tmp_path):
    import eval as ev
    from transformers import AutoModelForImageTextToText
    path = family_ckpt(family)
    # 2 steps on 2 ranks (FSDP2, gloo), with validation at step 2: the ranks hold the same full parameters
    straight = tmp_path / "straight"
    proc = _torchrun(ROOT / "tests" / "dist_probe.py", straight, path, shapes_file, "--save-every", "1",
                     "--eval-every", "2", "--eval-limit", "2")
    assert "step 2/2" in proc.stdout
    digests = [json.loads((straight / f"params_rank{r}.json").read_text()) for r in range(2)]
    assert digests[0] == digests[1], "ranks disagree on the full parameters"
    # the checkpoint is a hub folder of the family: from_pretrained gives back the trained parameters
    ckpt = straight / "checkpoint-000002"
    saved = dict(AutoModelForImageTextToText.from_pretrained(ckpt).named_parameters())
    assert saved.keys() == digests[0].keys() and palmr.load_config(ckpt).model_type == family
    for name, value in digests[0].items():
        assert hashlib.sha256(saved[name].detach().contiguous().numpy().tobytes()).hexdigest() == value, name
    assert any("val/" in k for k in json.loads((straight / "metrics.jsonl").read_text().splitlines()[-1])), \
        "validation ran"
    # 1 step, then --resume to 2 on 2 ranks: the same weights bit for bit, the same step-2 metrics
    resumed = tmp_path / "resumed"
    _torchrun(ROOT / "grpo.py", "--model", path, "--data", shapes_file, "--out", resumed, "--max-steps", "1", *FLAGS)
    _torchrun(ROOT / "grpo.py", "--model", path, "--data", shapes_file, "--out", resumed, "--max-steps", "2", *FLAGS,
              "--resume")
    a, b = load_file(ckpt / "model.safetensors"), load_file(resumed / "checkpoint-000002" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "a 2-rank resume differs"
    ma = json.loads((straight / "metrics.jsonl").read_text().splitlines()[1])
    mb = json.loads((resumed / "metrics.jsonl").read_text().splitlines()[1])
    assert all(ma[k] == mb[k] for k in ("reward", "completion_len", "kl", "loss", "grad_norm"))
    # and eval.py evaluates the checkpoint
    res = ev.main(["--bench", "shapes", "--checkpoints", f"{family}={ckpt}", "--limit", "4", "--max-new-tokens", "8",
                   "--out", str(tmp_path / "eval")])
    s = res["checkpoints"][family]["shapes"]
    assert s["n"] == 4 and s["judge"] == "rule" and s["acc"] is not None


@pytest.mark.parametrize("preset,tokens_px", [("qwen3vl_8b_8xh100.sh", 32), ("qwen35_9b_8xh100.sh", 32)])
def test_family_presets_change_only_what_the_family_needs(preset, tokens_px):
    base, own = preset_flags("qwen25vl_7b_8xh100.sh"), preset_flags(preset)
    assert 'exec bash runs/qwen25vl_7b_8xh100.sh "${args[@]}" "$@"' in (ROOT / "runs" / preset).read_text()
    a, b = vars(grpo.get_args(base)), vars(grpo.get_args(base + own))  # later flags win, as in the preset
    changed = {k for k in a if a[k] != b[k]}
    assert changed == {"out", "max_pixels", "vllm_gpu_memory"}, changed
    # the same image budget in merged vision tokens: 28 px per token for Qwen2.5-VL, 32 px for the Qwen3 families
    assert a["max_pixels"] // 28 ** 2 == b["max_pixels"] // tokens_px ** 2 == 1280


def test_completion_target_drops_a_prefilled_opening_and_refuses_what_cannot_follow_it():
    import warmup
    trace = "<think> I see 2 red circles.</think> \\boxed{2}"
    assert warmup.completion_target(trace, "") == trace
    assert warmup.completion_target(trace, "<think>\n") == "I see 2 red circles.</think> \\boxed{2}"
    with pytest.raises(ValueError, match="prefills '<think>\\\\n'"):  # Vision-SR1's traces after Qwen3.5's prefill
        warmup.completion_target(palmr.sr1_trace(trace), "<think>\n")
    with pytest.raises(ValueError):  # Qwen3's non-thinking prefill closes an empty think block
        warmup.completion_target(trace, "<think>\n\n</think>\n\n")


def test_tiny_paths_name_their_family(tmp_path):
    assert palmr.tiny_family("~/.cache/palmr/tiny-qwen3vl") == "qwen3_vl"
    assert palmr.tiny_family(os.path.expanduser("~/.cache/palmr/tiny-qwen35/")) == "qwen3_5"
    assert palmr.tiny_family(palmr.DEFAULT_TINY) == "qwen2_5_vl" and palmr.tiny_family(tmp_path) is None
    # an embedded tiny checkpoint not built yet still answers from its family's template
    assert palmr.template_prefill("~/.cache/palmr/tiny-qwen35") == "<think>\n"


def test_vision_sr1_refuses_a_template_that_opens_think(family_ckpt, shapes_file, tmp_path, capsys):
    with pytest.raises(SystemExit, match="prefills '<think>"):
        grpo.main(["--model", family_ckpt("qwen3_5"), "--data", shapes_file, "--out", str(tmp_path / "o"),
                   "--reward", "vision_sr1", "--max-steps", "1"])
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen3_5"])
def test_activation_checkpointing_recomputes_the_shared_prefix_layout(family, family_ckpt):
    # the recompute in backward must see the same layout (PrefixBranches.mask carries it): the same gradients
    path = family_ckpt(family)
    processor = palmr.load_processor(path)
    rows, encoded = _rows(processor, 2)
    rows = [rows[0], (rows[0][0], rows[1][1])]  # one prompt, two completions: one group in the shared layout
    batch = grpo.shared_prefix_batch(rows, encoded, processor.tokenizer.pad_token_id, "cpu")
    assert batch["branch"].shape[0] == 1, "one sequence"
    grads = []
    for ac in (False, True):
        model = grpo.prepare_model(path, torch.device("cpu"), train=True, activation_checkpointing=ac,
                                   prefix_attention="branch")
        logp, _ = model.completion_logprobs(batch, 1.0)
        logp.sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")
