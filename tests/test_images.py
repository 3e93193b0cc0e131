"""The one image loader (palmr.load_image) on every kind of file datasets hold, real photographs that a
package ships (scikit-image's sample data), and the processor accepting what it returns; then one bad
item in training, eval and the PaDLayer steps: logged with its id and reason, the rest goes on."""
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import eval as ev
import grpo
import palmr


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
    assert out.min() == 0 and out.max() >= 250 and len(np.unique(out)) > 200, "a plain convert saturates to white"
    mid = ramp[16, 32] / 65535 * 255
    assert abs(int(out[16, 32]) - mid) <= 1


def test_cmyk_jpeg_and_exif_orientation(tmp_path):
    cmyk = Image.new("CMYK", (40, 20), (0, 255, 255, 0))     # red in CMYK
    out = palmr.load_image(saved(tmp_path, cmyk, "c.jpg"))
    r, g, b = out.getpixel((20, 10))
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60
    exif = Image.Exif()
    exif[0x0112] = 6                                          # orientation: rotate 90 degrees clockwise
    wide = Image.new("RGB", (60, 30), "green")
    out = palmr.load_image(saved(tmp_path, wide, "rot.jpg", exif=exif))
    assert out.size == (30, 60), "EXIF orientation applied"


def test_tiny_image_is_upscaled_and_extreme_aspect_is_padded(tmp_path):
    out = palmr.load_image(saved(tmp_path, Image.new("RGB", (3, 2), "red"), "t.png"))
    assert min(out.size) >= palmr.MIN_SIDE and abs(out.size[0] / out.size[1] - 1.5) < 0.1
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
    grid = processor_accepts(palmr.fit_pixels(out, 1003520))
    assert grid[0] == 1 and grid[1] * grid[2] * 196 <= 1003520 * 1.05
    if src.mode in ("RGBA", "LA") or "transparency" in src.info:
        alpha = np.asarray(src.convert("RGBA"))[..., 3]
        ys, xs = np.where(alpha == 0)
        if len(ys):
            assert out.getpixel((int(xs[0]), int(ys[0]))) == (255, 255, 255), "transparent pixels on white"


# -----------------------------------------------------------------------------
# one bad item: logged with its id and reason, the rest goes on

@pytest.fixture()
def mixed_items(tmp_path, shapes_file):
    """Three shapes items, then one corrupt image and one 12 x 3000 strip (the processor's limit is 200:1)."""
    samples = data.read_jsonl(shapes_file)[:3]
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    Image.new("RGB", (12, 3000), "white").save(tmp_path / "strip.png")
    bad = data.Sample("bad-corrupt", str(tmp_path / "corrupt.png"), "How many circles?", "1", facts=samples[0].facts,
                      reference=samples[0].reference)
    strip = data.Sample("tall-strip", str(tmp_path / "strip.png"), "How many circles?", "0", facts=samples[0].facts,
                        reference=samples[0].reference)
    path = tmp_path / "mixed.jsonl"
    data.write_jsonl(path, samples + [bad, strip])
    return path


def test_training_data_check_drops_the_bad_item_and_rolls_out_the_strip(mixed_items, tiny_ckpt, capsys):
    args = grpo.get_args(["--data", str(mixed_items), "--model", tiny_ckpt, "--max-pixels", "1003520",
                          "--group-size", "2", "--max-new-tokens", "2"])
    processor = palmr.load_processor(tiny_ckpt)
    kept = grpo.load_dataset(args, processor)
    assert [s.id for s in kept][-1] == "tall-strip" and "bad-corrupt" not in {s.id for s in kept} and len(kept) == 4
    assert "bad-corrupt" in capsys.readouterr().out
    engine = palmr.HFEngine(palmr.load_model(tiny_ckpt), processor, args.max_pixels)
    rows, encoded = grpo.rollout(engine, processor, kept[-2:], args, step=0, rank=0)  # the strip raised here before
    assert len(rows) == 4 and encoded["tall-strip"]["image_grid_thw"].tolist()[0][0] == 1


def test_filter_step_logs_the_bad_item_and_goes_on(mixed_items, tiny_ckpt, tmp_path):
    processor = palmr.load_processor(tiny_ckpt)
    engine = palmr.HFEngine(palmr.load_model(tiny_ckpt), processor, 1003520)   # the default budget
    summary, _ = data.filter_step(mixed_items, tmp_path / "filtered.jsonl", engine, processor, k=2, batch=5,
                                  max_new_tokens=4, min_pass=-1.0, max_pass=2.0)
    log = [json.loads(l) for l in (tmp_path / "filtered.log.jsonl").read_text().splitlines()]
    dropped = {r["id"]: r["reason"] for r in log if r["status"] == "dropped"}
    assert list(dropped) == ["bad-corrupt"] and "item bad-corrupt" in dropped["bad-corrupt"]
    assert summary["kept"] == 4, "the strip and the three shapes items were rolled out and kept"


def test_eval_generates_every_item_but_the_corrupt_one(tmp_path, tiny_ckpt):
    rows = [{"id": "ok", "question": "Colour?", "answer": "red", "image": "ok.png"},
            {"id": "strip", "question": "Colour?", "answer": "white", "image": "strip.png"},
            {"id": "broken", "question": "Colour?", "answer": "red", "image": "broken.png"}]
    Image.new("RGB", (40, 30), "red").save(tmp_path / "ok.png")
    Image.new("RGB", (3000, 12), "white").save(tmp_path / "strip.png")
    (tmp_path / "broken.png").write_bytes(b"garbage")
    (tmp_path / "bench.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = ev.main(["--bench", f"mmstar={tmp_path / 'bench.jsonl'}", "--checkpoints", f"tiny={tiny_ckpt}",
                   "--out", str(tmp_path / "out"), "--max-new-tokens", "3", "--engine", "hf"])
    cache = [json.loads(l)["id"] for l in (tmp_path / "out" / "tiny" / "mmstar.predictions.jsonl").read_text().splitlines()]
    assert sorted(cache) == ["ok", "strip"] and res["checkpoints"]["tiny"]["mmstar"]["missing_images"] == 1
