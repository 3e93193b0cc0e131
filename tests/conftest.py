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
