"""Shared fixtures: the tiny checkpoint and a small shapes dataset, built once per test session."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs the real trainer or several processes (run in CI too)")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    import palmr
    return palmr.build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def family_ckpt(tmp_path_factory):
    """family -> that family's tiny checkpoint (palmr.FAMILIES: qwen2_5_vl, qwen3_vl, qwen3_5), built once per
    session on first use."""
    import palmr
    built = {}

    def get(family):
        if family not in built:
            built[family] = palmr.build_tiny_checkpoint(tmp_path_factory.mktemp(family) / "ckpt", seed=0, family=family)
        return built[family]
    return get


@pytest.fixture(scope="session")
def shapes_file(tmp_path_factory):
    import data
    return data.make_shapes(64, tmp_path_factory.mktemp("shapes"), split="train", seed=0)


@pytest.fixture(scope="session")
def warm_ckpt(tmp_path_factory, tiny_ckpt, shapes_file):
    """The tiny checkpoint after a short supervised warm-up: writes the format, sometimes answers right."""
    import grpo
    import warmup
    out = tmp_path_factory.mktemp("warm") / "ckpt"
    warmup.warmup(tiny_ckpt, shapes_file, out, grpo.prepare_model, grpo.training_batch, steps=150, batch=16, seed=0)
    return str(out)


@pytest.fixture(scope="session")
def thinking_ckpt(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint with a chat template whose generation prompt opens the reasoning itself."""
    import json
    import shutil

    import palmr
    out = tmp_path_factory.mktemp("thinking") / "ckpt"
    shutil.copytree(tiny_ckpt, out)
    template = palmr.CHAT_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}")
    assert template != palmr.CHAT_TEMPLATE
    (out / "chat_template.jinja").write_text(template)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return str(out)


@pytest.fixture()
def mixed_items(tmp_path, shapes_file):
    """Three shapes items, then one corrupt image and one 12 x 3000 strip (the processor's limit is 200:1)."""
    import data
    from PIL import Image
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


def interruptible():
    """preexec_fn for a child the test will Ctrl-C: SIGINT back to its default. A shell that starts a job in the
    background (`cmd &`, as CI runners may start the test run) leaves SIGINT ignored, and children inherit that,
    so Python would never raise KeyboardInterrupt in them."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def preset_flags(name):
    """The grpo.py flags of a runs/ preset's args=( ... ) block, comments dropped, shell variables as placeholders."""
    import shlex
    text = (Path(__file__).resolve().parent.parent / "runs" / name).read_text()
    block = text[text.index("args=(\n") + 7:text.index("\n)\n", text.index("args=(\n"))]
    lines = [line.split("#", 1)[0] for line in block.splitlines()]
    return shlex.split(" ".join(lines).replace('"$MODEL"', "MODEL").replace('"$DATA"', "DATA")
                       .replace('"$JUDGE_URLS"', "JUDGE_URLS"))
