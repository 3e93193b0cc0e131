"""palmr.py: response parsing and the question format; prompts without an image and under a chat template
that prefills '<think>'; the one image loader (palmr.load_image, palmr.fit_pixels) on every kind of file
datasets hold, real photographs that a package ships (scikit-image's sample data), and the processor
accepting what it returns."""
import importlib.util
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import palmr
import rewards
from palmr import INSTRUCTION, format_question, parse_response
from rewards import score_completion

# -----------------------------------------------------------------------------
# palmr.parse_response / format_question


@pytest.mark.parametrize("text, think, answer, well_formed", [
    # well-formed trace
    ("<think>I see 2 circles.</think> The answer is \\boxed{2}.", "I see 2 circles.", "2", True),
    # leading whitespace before <think> is allowed; think and answer are stripped
    ("  \n<think> a </think> \\boxed{ 7 }", "a", "7", True),
    # missing <think>: not well formed, but the boxed answer is still read
    ("I see 2 circles.</think> \\boxed{2}", "", "2", False),
    # no tags at all
    ("The answer is \\boxed{7}", "", "7", False),
    # text before <think>
    ("Sure! <think>a</think> \\boxed{1}", "", "1", False),
    # two </think>
    ("<think>a</think> b </think> \\boxed{1}", "a", "1", False),
    # a second <think> inside the reasoning
    ("<think>a <think> b</think> \\boxed{1}", "a <think> b", "1", False),
    # a second <think> after the reasoning
    ("<think>a</think> <think> \\boxed{1}", "a", "1", False),
    # nested braces inside \boxed
    ("<think>a</think> \\boxed{\\frac{1}{2}}", "a", "\\frac{1}{2}", True),
    # the last \boxed wins
    ("<think>a</think> \\boxed{1} or rather \\boxed{2}", "a", "2", True),
    # unbalanced \boxed{ (cut off): no answer, not well formed
    ("<think>a</think> \\boxed{1", "a", "", False),
    # last \boxed unbalanced after a good one: the cut-off last one wins, no answer
    ("<think>a</think> \\boxed{1} \\boxed{2", "a", "", False),
    # \boxed only inside the reasoning: well formed requires \boxed after </think>
    ("<think>maybe \\boxed{3}</think> done", "maybe \\boxed{3}", "", False),
    # empty \boxed{}: well formed, empty answer (graded wrong: tests/test_rewards.py, test_grade_answer)
    ("<think>a</think> \\boxed{}", "a", "", True),
    # no \boxed at all
    ("<think>a</think> the answer is 3", "a", "", False),
])
def test_parse_response(text, think, answer, well_formed):
    assert parse_response(text) == (think, answer, well_formed)
    assert rewards.format_reward(text) == (1.0 if well_formed else 0.0)


@pytest.mark.parametrize("question, choices, expected", [
    # open question: question, then the instruction
    ("  How many circles?  ", None, ["How many circles?", INSTRUCTION]),
    # empty choices behave as an open question
    ("Q?", [], ["Q?", INSTRUCTION]),
    # multiple choice: lettered options between question and instruction
    ("How many red shapes?", ["0", "1", "4"], ["How many red shapes?", "A. 0", "B. 1", "C. 4", INSTRUCTION]),
])
def test_format_question(question, choices, expected):
    text = format_question(question, choices)
    assert text.split("\n") == expected
    assert "<think>" in text and "\\boxed{}" in text


# -----------------------------------------------------------------------------
# prompts: no image, and a template that prefills <think>

def test_render_prompt_without_an_image_has_no_placeholder(tiny_ckpt):
    processor = palmr.load_processor(tiny_ckpt)
    text = palmr.render_prompt(processor, "Is Paris in France?", image=False)
    assert "<|image_pad|>" not in text and "Is Paris in France?" in text
    enc = palmr.encode_prompt(processor, text, None, 112 * 112)
    assert set(enc) == {"input_ids"} and "pixel_values" not in palmr.collate_prompts([enc], 0)


COMPLETION = "I see 2 red circles.\n</think>\nThe answer is \\boxed{2}."


def test_prefilled_think_counts_as_written(thinking_ckpt, tiny_ckpt):
    processor = palmr.load_processor(thinking_ckpt)
    prompt = palmr.render_prompt(processor, "How many circles?")
    assert prompt.endswith("<|im_start|>assistant\n<think>\n") and palmr.generation_prefill(prompt) == "<think>\n"
    assert palmr.generation_prefill(palmr.render_prompt(palmr.load_processor(tiny_ckpt), "q")) == ""
    # regression: S_fmt was 0 for a correct completion because its <think> sat in the prompt
    assert score_completion("grpo", COMPLETION, "2")[1]["fmt"] == 0.0
    total, parts = score_completion("grpo", palmr.assistant_turn(prompt, COMPLETION), "2")
    assert parts["fmt"] == 1.0 and parts["ans"] == 1.0 and total == pytest.approx(1.0)


# -----------------------------------------------------------------------------
# palmr.load_image / fit_pixels

def saved(tmp_path, image, name, **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


def processor_accepts(image):
    """The real Qwen2.5-VL image processor (PIL backend) on the loaded image: raises if it would."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    out = Qwen2VLImageProcessorPil()(images=[image], return_tensors="pt")
    return tuple(out["image_grid_thw"][0].tolist())


def test_rgba_transparency_is_white_not_black(tmp_path):
    im = Image.new("RGBA", (40, 30), (0, 0, 0, 0))          # fully transparent black
    im.paste((255, 0, 0, 255), (0, 0, 10, 10))               # one opaque red corner
    out = palmr.load_image(saved(tmp_path, im, "a.png"))
    assert out.mode == "RGB" and out.getpixel((30, 20)) == (255, 255, 255) and out.getpixel((2, 2)) == (255, 0, 0)


def test_palette_with_a_transparent_index_is_white(tmp_path):
    im = Image.new("P", (20, 20), 0)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)          # index 0 black (transparent), 1 blue
    im.paste(1, (0, 0, 5, 5))
    path = saved(tmp_path, im, "p.png", transparency=0)
    out = palmr.load_image(path)
    assert out.getpixel((15, 15)) == (255, 255, 255) and out.getpixel((1, 1)) == (0, 0, 255)
    gif = saved(tmp_path, im, "p.gif", transparency=0)
    assert palmr.load_image(gif).getpixel((15, 15)) == (255, 255, 255)


def test_grey_alpha_and_one_bit(tmp_path):
    la = Image.new("LA", (30, 30), (0, 0))
    assert palmr.load_image(saved(tmp_path, la, "la.png")).getpixel((5, 5)) == (255, 255, 255)
    one = Image.new("1", (30, 30), 1)
    assert palmr.load_image(saved(tmp_path, one, "one.png")).getpixel((5, 5)) == (255, 255, 255)


def test_sixteen_bit_greyscale_is_rescaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 32).reshape(32, 64) * 32).astype(np.uint16)   # 0 .. 65504
    path = tmp_path / "g16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(palmr.load_image(path))[..., 0]
    assert out.min() == 0
    # every pixel is its 16-bit value rescaled to 0..255 (a plain convert saturates to white)
    assert np.array_equal(out, np.round(ramp / 65535 * 255)), "a plain convert saturates to white"
    mid = ramp[16, 32] / 65535 * 255
    assert abs(int(out[16, 32]) - mid) <= 1


def test_cmyk_jpeg_and_exif_orientation(tmp_path):
    cmyk = Image.new("CMYK", (40, 20), (0, 255, 255, 0))     # red in CMYK
    out = palmr.load_image(saved(tmp_path, cmyk, "c.jpg"))
    # C=0, M=Y=1, K=0 is RGB (255 (1-C)(1-K), 255 (1-M)(1-K), 255 (1-Y)(1-K)) = (255, 0, 0), up to JPEG loss
    assert out.mode == "RGB" and all(abs(a - b) <= 3 for a, b in zip(out.getpixel((20, 10)), (255, 0, 0)))
    exif = Image.Exif()
    exif[0x0112] = 6                                          # orientation: rotate 90 degrees clockwise
    wide = Image.new("RGB", (60, 30), "green")
    out = palmr.load_image(saved(tmp_path, wide, "rot.jpg", exif=exif))
    assert out.size == (30, 60), "EXIF orientation applied"


def test_tiny_image_is_upscaled_and_extreme_aspect_is_padded(tmp_path):
    out = palmr.load_image(saved(tmp_path, Image.new("RGB", (3, 2), "red"), "t.png"))
    # the short side (2) brought up to MIN_SIDE, the long side by the same factor: 3 * MIN_SIDE / 2
    assert out.size == (3 * palmr.MIN_SIDE // 2, palmr.MIN_SIDE)
    strip = Image.new("RGB", (3000, 12), "white")
    strip.paste((0, 0, 0), (0, 0, 3000, 12))
    out = palmr.load_image(saved(tmp_path, strip, "strip.png"))
    assert out.size == (3000, palmr.MIN_SIDE), "padded, not resized: the content keeps its scale"
    assert processor_accepts(out)                             # the raw 3000 x 12 raises in smart_resize
    with pytest.raises(ValueError, match="aspect ratio"):
        processor_accepts(strip)
    budget = palmr.load_image(saved(tmp_path, strip, "strip2.png"), max_pixels=112 * 112)
    # the budget shrinks the long side; the short side stays at MIN_SIDE (so a strip may exceed the budget)
    assert budget.size == (1159, palmr.MIN_SIDE) and processor_accepts(budget)


def test_decompression_bomb_and_corrupt_files_raise_a_named_cause(tmp_path):
    Image.new("1", (10_000, 9_000)).save(tmp_path / "bomb.png")   # 90 MP of zeros: a few KB on disk
    with pytest.raises(ValueError, match="decompression-bomb"):
        palmr.load_image(tmp_path / "bomb.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    with pytest.raises(ValueError, match="cannot read image"):
        palmr.load_image(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="cannot read image"):
        palmr.load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="no image"):
        palmr.load_image({"bytes": None, "path": None})


def test_bytes_struct_and_path_give_the_same_pixels(tmp_path):
    im = Image.new("RGBA", (50, 40), (10, 200, 30, 128))
    path = saved(tmp_path, im, "s.png")
    raw = path.read_bytes()
    a, b, c = palmr.load_image(path), palmr.load_image(raw), palmr.load_image({"bytes": raw, "path": "s.png"})
    assert a.tobytes() == b.tobytes() == c.tobytes()


SKIMAGE = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "camera.png",
           "logo.png", "page.png", "horse.png", "no_time_for_that_tiny.gif", "retina.jpg"]


@pytest.mark.parametrize("name", SKIMAGE)
def test_real_photographs_from_scikit_image(name):
    skimage = pytest.importorskip("skimage", reason="scikit-image is a test dependency (requirements.txt)")
    path = Path(os.path.dirname(skimage.__file__)) / "data" / name
    src = Image.open(path)
    out = palmr.load_image(path)
    assert out.mode == "RGB" and (out.size == src.size or max(src.size) < palmr.MIN_SIDE)  # no needless resizing
    fit = palmr.fit_pixels(out, 1003520)
    # shrunk (aspect kept, sides floored) only when over the budget
    w, h = out.size
    s = math.sqrt(1003520 / (w * h))
    assert fit.size == ((w, h) if w * h <= 1003520 else (int(w * s), int(h * s)))
    # the grid is what Qwen2.5-VL's smart_resize makes of that size (28-px units, the processor's pixel bounds),
    # in 14-px patches
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
    bounds = Qwen2VLImageProcessorPil().size
    h28, w28 = smart_resize(fit.height, fit.width, factor=28, min_pixels=bounds["shortest_edge"],
                            max_pixels=bounds["longest_edge"])
    assert processor_accepts(fit) == (1, h28 // 14, w28 // 14)
    if src.mode in ("RGBA", "LA") or "transparency" in src.info:
        alpha = np.asarray(src.convert("RGBA"))[..., 3]
        ys, xs = np.where(alpha == 0)
        if len(ys):
            assert out.getpixel((int(xs[0]), int(ys[0]))) == (255, 255, 255), "transparent pixels on white"


# -----------------------------------------------------------------------------
# everything around the vLLM engine that runs without a GPU: weight names, sampling kwargs, outputs, selection

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
    with pytest.raises(ValueError, match="CUDA"):  # what the trainer's --engine vllm says on this machine
        palmr.make_engine("vllm", None, processor, tiny_ckpt, 112 * 112, torch.device("cpu"))


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
