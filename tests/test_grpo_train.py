"""The real trainer on the tiny model: log-prob alignment, updates, checkpoints, resume, two ranks."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import grpo
import palmr
from data import read_jsonl

ROOT = Path(__file__).resolve().parent.parent


def _setup(tiny_ckpt, shapes_file, *flags):
    args = grpo.get_args(["--model", tiny_ckpt, "--data", shapes_file, *flags])
    processor = palmr.load_processor(tiny_ckpt)
    policy = grpo.prepare_model(tiny_ckpt, torch.device("cpu"), train=True)
    samples = read_jsonl(shapes_file)[:args.rollout_batch]
    return args, processor, policy, samples


def _rollouts(policy, processor, samples, args, step=0):
    engine = palmr.HFEngine(policy, processor, args.max_pixels)
    return grpo.rollout(engine, processor, samples, args, step, rank=0)


def test_sampler_and_trainer_logprobs_agree(tiny_ckpt, shapes_file):
    # the trainer must score completions at the sampling temperature, at the right positions
    args, processor, policy, samples = _setup(tiny_ckpt, shapes_file, "--temperature", "0.7", "--rollout-batch", "2")
    rows, enc = _rollouts(policy, processor, samples, args)
    batch = grpo.training_batch(rows, enc, processor.tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        logp = policy.completion_logprobs(batch, 0.7)[0]
        wrong_temp = policy.completion_logprobs(batch, 1.0)[0]
    mask = batch["mask"].bool()
    sampler = torch.zeros_like(logp)
    for i, (_, c) in enumerate(rows):
        sampler[i, :len(c.logprobs)] = torch.tensor(c.logprobs)
    diff = (logp - sampler)[mask].abs()
    # the sampler never draws the 5 vision placeholders (palmr.VISION_TOKENS) and renormalises without
    # them; on the random tiny model that mass is ~0.5%, so allow 0.02 nats; a trained policy gives ~0
    assert diff.max() < 0.02, f"sampler vs trainer log-probs differ by {diff.max():.4f}: position or temperature bug"
    assert (wrong_temp - sampler)[mask].abs().mean() > 5 * diff.mean(), "the check must see a temperature mismatch"


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_zero_advantage_step_leaves_parameters_unchanged(tiny_ckpt, shapes_file):
    args, processor, policy, samples = _setup(tiny_ckpt, shapes_file, "--weight-decay", "0", "--beta", "0.05",
                                              "--rollout-batch", "4", "--update-batch", "2", "--micro-batch", "3")
    reference = grpo.prepare_model(tiny_ckpt, torch.device("cpu"), train=False)
    rows, enc = _rollouts(policy, processor, samples, args)
    before = _params(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.0)
    stats = grpo.train_on_rollouts(policy, reference, optimizer, processor, rows, enc, torch.zeros(len(rows)), args,
                                   torch.device("cpu"))
    # no advantage and policy == reference (k3 KL has zero gradient there): nothing may move, nothing NaN
    assert stats["grad_norm"] == 0.0 and stats["kl"] == 0.0
    for n, p in policy.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed in a zero-advantage step"


def test_training_changes_parameters_towards_advantaged_completions(tiny_ckpt, shapes_file):
    args, processor, policy, samples = _setup(tiny_ckpt, shapes_file, "--beta", "0", "--rollout-batch", "2",
                                              "--update-batch", "2", "--lr", "1e-3")
    rows, enc = _rollouts(policy, processor, samples, args)
    adv = torch.tensor([1.0, -1.0] * (len(rows) // 2))  # reward completions 0, 2, ... and punish 1, 3, ...
    batch = grpo.training_batch(rows, enc, processor.tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        logp0 = (policy.completion_logprobs(batch, 1.0)[0] * batch["mask"]).sum(1)
    before = _params(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    for _ in range(3):
        grpo.train_on_rollouts(policy, None, optimizer, processor, rows, enc, adv, args, torch.device("cpu"))
    with torch.no_grad():
        logp1 = (policy.completion_logprobs(batch, 1.0)[0] * batch["mask"]).sum(1)
    changed = [n for n, p in policy.named_parameters() if not torch.equal(p, before[n])]
    assert "lm_head.weight" in changed and any("visual" in n for n in changed), "LM and vision tower must train"
    delta = logp1 - logp0
    assert (delta[adv > 0] > 0).all() and (delta[adv < 0] < 0).all(), f"log-prob moved the wrong way: {delta}"


def _run(tmp, tiny_ckpt, shapes_file, *flags):
    return grpo.main(["--model", tiny_ckpt, "--data", shapes_file, "--out", str(tmp), "--rollout-batch", "4",
                      "--update-batch", "2", "--group-size", "2", "--max-new-tokens", "16", "--lr", "1e-3", *flags])


@pytest.mark.slow
def test_checkpoint_is_a_loadable_hf_folder(tmp_path, tiny_ckpt, shapes_file):
    from transformers import AutoModelForImageTextToText
    _run(tmp_path, tiny_ckpt, shapes_file, "--max-steps", "2", "--save-every", "1", "--keep", "1")
    ckpt = tmp_path / (tmp_path / "latest").read_text()
    assert ckpt.name == "checkpoint-000002" and not (tmp_path / "checkpoint-000001").exists(), "--keep 1"
    model = AutoModelForImageTextToText.from_pretrained(ckpt)
    processor = palmr.load_processor(str(ckpt))
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    metrics = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ("reward", "reward/fmt", "reward/ans", "reward/vis", "adv_std", "zero_var_groups", "kl", "clip_frac",
                "completion_len", "t_rollout", "t_train", "judge/failed", "judge/gated_zero"):
        assert key in metrics[0], f"metric {key} missing"


@pytest.mark.slow
def test_resume_2_plus_2_equals_4_straight(tmp_path, tiny_ckpt, shapes_file):
    _run(tmp_path / "straight", tiny_ckpt, shapes_file, "--max-steps", "4", "--save-every", "4")
    _run(tmp_path / "resumed", tiny_ckpt, shapes_file, "--max-steps", "2", "--save-every", "2")
    _run(tmp_path / "resumed", tiny_ckpt, shapes_file, "--max-steps", "4", "--save-every", "2", "--resume")
    a = load_file(tmp_path / "straight" / "checkpoint-000004" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoint-000004" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    ref = load_file(Path(tiny_ckpt) / "model.safetensors")
    assert any(not torch.equal(a[k], ref[k]) for k in a), "the run must have changed the weights"
    ma = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(l) for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(ma[2:], mb[2:]):  # same rollouts (sampling seeds, data position) and the same losses
        for k in ("reward", "completion_len", "kl", "loss", "grad_norm"):
            assert x[k] == y[k], f"step {x['step']}: {k} {x[k]} != {y[k]} after resume"


@pytest.mark.slow
def test_torchrun_two_ranks_keep_identical_parameters(tmp_path, tiny_ckpt, shapes_file):
    script = ROOT / "tests" / "dist_probe.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path),
           tiny_ckpt, shapes_file]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    digests = [json.loads((tmp_path / f"params_rank{r}.json").read_text()) for r in range(2)]
    assert digests[0] == digests[1], "ranks disagree on the full parameters"
    # and the gathered parameters are what the checkpoint holds (reloaded: the file uses the hub's names)
    from transformers import AutoModelForImageTextToText
    saved = dict(AutoModelForImageTextToText.from_pretrained(tmp_path / "checkpoint-000002").named_parameters())
    assert saved.keys() == digests[0].keys()
    for name, value in digests[0].items():
        assert hashlib.sha256(saved[name].detach().contiguous().numpy().tobytes()).hexdigest() == value, name
    assert "step 2/2" in proc.stdout


def test_activation_checkpointing_gives_the_same_gradients(tiny_ckpt, shapes_file):
    args, processor, policy, samples = _setup(tiny_ckpt, shapes_file, "--rollout-batch", "2")
    rows, enc = _rollouts(policy, processor, samples, args)
    batch = grpo.training_batch(rows, enc, processor.tokenizer.pad_token_id, torch.device("cpu"))
    grads = []
    for ac in (False, True):
        model = grpo.prepare_model(tiny_ckpt, torch.device("cpu"), train=True, activation_checkpointing=ac)
        logp, _ = model.completion_logprobs(batch, 1.0)
        logp.sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[1]["model.language_model.layers.0.mlp.up_proj.weight"] is not None
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")


@pytest.mark.slow
def test_two_rank_resume_equals_straight(tmp_path, tiny_ckpt, shapes_file):
    # under FSDP2 the optimizer state is broadcast from rank 0 on resume (set_optimizer_state_dict)
    def run(out, steps, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "grpo.py"),
               "--model", tiny_ckpt, "--data", shapes_file, "--out", str(out), "--max-steps", str(steps),
               "--rollout-batch", "4", "--update-batch", "2", "--group-size", "2", "--max-new-tokens", "12",
               "--lr", "1e-3", "--save-every", "2", *extra]
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run(tmp_path / "straight", 3)
    run(tmp_path / "resumed", 2)
    run(tmp_path / "resumed", 3, "--resume")
    a = load_file(tmp_path / "straight" / "checkpoint-000003" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoint-000003" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after a 2-rank resume"


def test_warmup_loss_falls_on_a_small_budget(tmp_path, tiny_ckpt, shapes_file):
    history = grpo.warmup(tiny_ckpt, shapes_file, tmp_path / "warm", steps=24, batch=8, log_every=23,
                          hallucinated_share=0.5)
    (first, loss0), (last, loss1) = history[0], history[-1]
    assert first == 0 and last == 23 and loss1 < 0.5 * loss0, history
    assert (tmp_path / "warm" / "tokenizer.json").exists(), "the warm start is a complete checkpoint folder"


def test_hf_engine_ranks_get_distinct_seeds_whatever_vllm_tp_says(tiny_ckpt, shapes_file):
    # regression: --vllm-tp once divided the seed's rank part even for the HF engine, so two ranks drew
    # the same completions for the same prompts
    args, processor, policy, samples = _setup(tiny_ckpt, shapes_file, "--rollout-batch", "1", "--vllm-tp", "2",
                                              "--max-new-tokens", "12")
    engine = palmr.HFEngine(policy, processor, args.max_pixels)
    a, _ = grpo.rollout(engine, processor, samples[:1], args, 0, rank=0)
    b, _ = grpo.rollout(engine, processor, samples[:1], args, 0, rank=1)
    assert [c.token_ids for _, c in a] != [c.token_ids for _, c in b]


def test_trainer_forward_uses_the_3d_mrope_positions(tiny_ckpt):
    # regression: transformers 5.2x builds Qwen2.5-VL's (t, h, w) positions only when given
    # mm_token_type_ids; without them image tokens got 1-D text positions (logits off by ~2 on the warm
    # start), unlike vLLM and the checkpoint's pretraining. Left-padded batch vs each row alone with its
    # positions from the model's own get_rope_index (the official rule), unpadded.
    import palmr
    from PIL import Image
    from data import Sample
    if not palmr.mrope_needs_token_types():
        pytest.skip("this transformers finds image tokens in input_ids itself")
    processor = palmr.load_processor(tiny_ckpt)
    model = grpo.prepare_model(tiny_ckpt, torch.device("cpu"), train=False, logprobs="naive", shard=False)
    tok, image_id = processor.tokenizer, processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    rows, encoded = [], {}
    for i, size in enumerate([(112, 112), (56, 84)]):  # different grids: different prompt lengths, left padding
        s = Sample(id=f"s{i}", image="", question="How many circles?", answer="2")
        encoded[s.id] = palmr.encode_prompt(processor, palmr.render_prompt(processor, s.question),
                                            Image.new("RGB", size, "white"), 112 * 112)
        ids = tok("<think>I see 2 red circles.</think> The answer is \\boxed{2}."[:40 + 5 * i], add_special_tokens=False)["input_ids"]
        rows.append((s, palmr.Completion(token_ids=ids, text="", logprobs=[0.0] * len(ids), finished=False)))
    batch = grpo.training_batch(rows, encoded, tok.pad_token_id, "cpu")
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == image_id).long()), "1 exactly on image tokens"
    with torch.no_grad():
        logp, _ = model.completion_logprobs(batch, 1.0)
        flat = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
        logp_1d, _ = model.completion_logprobs(flat, 1.0)  # the old, wrong forward
        grids = batch["image_grid_thw"]
        for i, (s, c) in enumerate(rows):
            ids = torch.tensor([encoded[s.id]["input_ids"] + c.token_ids])
            types = (ids == image_id).long()
            pos, _ = model.model.get_rope_index(ids, image_grid_thw=grids[i:i + 1], attention_mask=torch.ones_like(ids),
                                                mm_token_type_ids=types)
            assert pos.shape == (3, 1, ids.shape[1]) and not torch.equal(pos[0], pos[1]), "3-D positions"
            hidden = model.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=encoded[s.id]["pixel_values"],
                                 image_grid_thw=grids[i:i + 1], position_ids=pos, use_cache=False).last_hidden_state
            P, T = len(encoded[s.id]["input_ids"]), len(c.token_ids)
            logits = hidden[0, P - 1:P - 1 + T] @ model.lm_head.weight[:model.scored_vocab].T  # the tokenizer's rows
            want = logits.float().log_softmax(-1).gather(1, ids[0, P:, None]).squeeze(1)
            torch.testing.assert_close(logp[i, :T], want, atol=2e-5, rtol=0)
            assert (logp_1d[i, :T] - want).abs().max() > 1e-3, "1-D positions must give other log-probs"
