"""warmup.py: the embedded default's SFT warm start (its loss falls; built once, cached, complete)."""
import shutil
from pathlib import Path

import torch

import grpo
import warmup


def test_warmup_loss_falls_on_a_small_budget(tmp_path, tiny_ckpt, shapes_file):
    history = warmup.warmup(tiny_ckpt, shapes_file, tmp_path / "warm", grpo.prepare_model, grpo.training_batch,
                            steps=24, batch=8, log_every=23, hallucinated_share=0.5)
    (first, loss0), (last, loss1) = history[0], history[-1]
    assert first == 0 and last == 23 and loss1 < 0.5 * loss0, history
    assert (tmp_path / "warm" / "tokenizer.json").exists(), "the warm start is a complete checkpoint folder"


def test_warm_start_is_built_once(tmp_path, tiny_ckpt, shapes_file):
    base = tmp_path / "tiny"
    shutil.copytree(tiny_ckpt, base)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun leaves each rank
    try:
        path = warmup.ensure_warm_start(str(base), shapes_file, 2, 0.5, grpo.prepare_model, grpo.training_batch)
        assert torch.get_num_threads() == 1, "the thread count is restored after the build"
    finally:
        torch.set_num_threads(threads)
    assert Path(path) == tmp_path / "tiny-warm2-h0.5-s0-v2"
    # a complete checkpoint: every tensor of the base model, in its shape
    from safetensors import safe_open

    def tensors(folder):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert tensors(Path(path)) == tensors(base)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny", "tiny-warm2-h0.5-s0-v2"]  # no temp folder left
    stamp = (Path(path) / "model.safetensors").stat().st_mtime_ns
    assert warmup.ensure_warm_start(str(base), shapes_file, 2, 0.5, grpo.prepare_model, grpo.training_batch) == path
    assert (Path(path) / "model.safetensors").stat().st_mtime_ns == stamp, "the cached warm start is reused"
