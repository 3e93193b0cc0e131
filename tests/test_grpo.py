"""grpo.py: hand-computed advantages and PPO-clip + k3 loss, then the real trainer on the tiny model (log-prob
alignment, updates, checkpoints, resume, the warm start; two ranks per model family: test_families.py)."""
import json
import math
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import grpo
import judge
import palmr
from chat_server import ChatServer
from grpo import group_advantages, mixed_step_items, policy_loss
from data import Sample, read_jsonl

ROOT = Path(__file__).resolve().parent.parent


# -----------------------------------------------------------------------------
# group_advantages

def test_group_advantages_hand_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0,   # group 1: mean .25, unbiased std .5
                            1.0, 1.0, 1.0, 1.0])  # group 2: zero variance
    adv = group_advantages(rewards, 4, eps=1e-6)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-6)
    torch.testing.assert_close(adv[:4], expected)
    # a zero-variance group gives exactly zero advantage, and no NaN
    assert torch.equal(adv[4:], torch.zeros(4)), "zero-variance group must give zero advantage"
    assert not torch.isnan(adv).any()


def test_group_advantages_scales():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    # "none": centred only (Dr. GRPO)
    torch.testing.assert_close(group_advantages(rewards, 2, scale="none"), torch.tensor([0.5, -0.5, 0.0, 0.0]))
    # "batch": centred per group, scaled by the std of the whole batch
    batch_std = rewards.std()
    torch.testing.assert_close(group_advantages(rewards, 2, scale="batch", eps=0.0),
                               torch.tensor([0.5, -0.5, 0.0, 0.0]) / batch_std)
    with pytest.raises(AssertionError):  # rewards that do not split into groups
        group_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError):
        group_advantages(rewards, 2, scale="bogus")


def test_group_advantages_all_equal_batch_no_nan():
    adv = group_advantages(torch.zeros(8), 4)  # e.g. a random policy that never scores
    assert torch.equal(adv, torch.zeros(8))


# -----------------------------------------------------------------------------
# policy_loss

def _lp(x):
    return torch.tensor(x, dtype=torch.float64)


def test_policy_loss_clipping_both_sides():
    # one token per row; old_logp 0 so ratio = exp(logp)
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.5], dtype=torch.float64)[:, None]
    logp = torch.log(ratio).requires_grad_(True)
    old = torch.zeros_like(logp)
    adv = _lp([1.0, -1.0, 1.0, -1.0])
    mask = torch.ones_like(logp)
    loss, m = policy_loss(logp, old, None, adv, mask, eps_low=0.2, eps_high=0.28, beta=0.0)
    per_token = [-1.28,   # A>0, ratio above 1+eps_high: clipped at 1.28
                 0.8,     # A<0, ratio below 1-eps_low: clipped at 0.8 -> -min(-0.5, -0.8)
                 -0.5,    # A>0, ratio low: unclipped (pessimistic min keeps 0.5)
                 1.5]     # A<0, ratio high: unclipped (min keeps -1.5)
    assert loss.item() == pytest.approx(sum(per_token) / 4, abs=1e-9)
    assert m["clip_frac"].item() == pytest.approx(0.5)
    loss.backward()
    # clipped tokens carry no policy gradient; unclipped ones carry -A * ratio / N
    g = logp.grad[:, 0]
    assert g[0].item() == 0.0 and g[1].item() == 0.0, "clipped tokens must not get gradient"
    assert g[2].item() == pytest.approx(-1.0 * 0.5 / 4)
    assert g[3].item() == pytest.approx(1.0 * 1.5 / 4)


def test_policy_loss_k3_kl_and_masking():
    logp = _lp([[math.log(0.25), math.log(0.5), 0.0]])
    ref = _lp([[math.log(0.5), math.log(0.5), 5.0]])       # last token masked out: its huge KL must not count
    mask = _lp([[1.0, 1.0, 0.0]])
    adv = _lp([0.0])
    loss, m = policy_loss(logp, logp.detach(), ref, adv, mask, 0.2, 0.28, beta=0.1)
    k3 = 2.0 - math.log(2.0) - 1.0                           # exp(d) - d - 1 with d = log 2
    assert m["kl"].item() == pytest.approx(k3 / 2)            # (k3 + 0) over 2 unmasked tokens
    assert loss.item() == pytest.approx(0.1 * k3 / 2)


def test_policy_loss_token_mean_over_unmasked_rows():
    logp = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    mask = _lp([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])  # 5 tokens; an all-masked row
    adv = _lp([1.0, -2.0, 100.0])
    loss, _ = policy_loss(logp, logp.detach(), None, adv, mask, 0.2, 0.28, beta=0.0)
    # ratio 1: per-token loss -A; token-mean over 5 tokens: (4 * -1 + 1 * 2) / 5; row 3 ignored
    assert loss.item() == pytest.approx(-2.0 / 5)


def test_policy_loss_all_masked_is_zero_not_nan():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, m = policy_loss(logp, logp.detach(), logp.detach(), torch.ones(2), torch.zeros(2, 3), 0.2, 0.28, 0.01)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 3))


def test_policy_loss_needs_ref_when_beta():
    logp = torch.zeros(1, 2)
    with pytest.raises(AssertionError):
        policy_loss(logp, logp, None, torch.ones(1), torch.ones(1, 2), 0.2, 0.28, beta=0.1)


# -----------------------------------------------------------------------------
# data order

def step_items(n_items, step, rollout_batch, seed, rank, world):
    """This rank's prompt indices at `step` from one dataset (no --mix-data)."""
    return [i for _, i in mixed_step_items(n_items, 0, step, rollout_batch, 0, seed, rank, world)]


def test_step_items_partition_and_epochs():
    n, batch, world = 10, 4, 2
    by_k = {}
    for step in range(5):  # 20 prompts = 2 epochs of 10
        ranks = [step_items(n, step, batch, seed=0, rank=r, world=world) for r in range(world)]
        assert len(ranks[0]) == len(ranks[1]) == 2, "prompts are strided evenly over ranks"
        for r, items in enumerate(ranks):
            for j, item in enumerate(items):
                by_k[step * batch + r + j * world] = item
    seen = [by_k[k] for k in range(20)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10)), "each epoch visits every item once"
    assert seen[:10] != seen[10:], "epochs are reshuffled"
    assert step_items(n, 3, batch, 0, 1, world) == step_items(n, 3, batch, 0, 1, world), "pure function of (seed, step)"


# -----------------------------------------------------------------------------
# The real trainer on the tiny model


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
    processor = palmr.load_processor(tiny_ckpt)
    model = grpo.prepare_model(tiny_ckpt, torch.device("cpu"), train=False, shard=False)
    if not palmr.takes_token_types(model):
        pytest.skip("this transformers finds image tokens in input_ids itself")
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


# -----------------------------------------------------------------------------
# compute_rewards under a template that prefills <think>

FACTS = {"objects": [{"name": "circle", "count": 2, "attributes": ["red"], "location": []}]}
REF = "<think>I see 2 red circles.</think> \\boxed{2}"


COMPLETION = "I see 2 red circles.\n</think>\nThe answer is \\boxed{2}."


def test_trainer_rewards_read_the_whole_assistant_turn(thinking_ckpt):
    processor = palmr.load_processor(thinking_ckpt)
    prefill = palmr.generation_prefill(palmr.render_prompt(processor, ""))  # as grpo.main computes it
    s = Sample("s1", "x.png", "How many circles?", "2", facts=FACTS, reference=REF)
    rows = [(s, palmr.Completion([], COMPLETION, [], True)), (s, palmr.Completion([], "I see 3 red circles.\n</think> \\boxed{2}", [], True))]
    rewards, parts, stats, _ = grpo.compute_rewards(judge.RuleJudge(), rows, "palmr", prefill)
    assert parts["fmt"].tolist() == [1.0, 1.0] and parts["vis"].tolist() == [1.0, 0.0]
    assert rewards.tolist() == pytest.approx([1.0, 0.0])


# -----------------------------------------------------------------------------
# the trainer with an LLM judge behind a local server (tests/chat_server.py)

@pytest.fixture()
def server():
    s = ChatServer(latency=0.05)  # every reply 50 ms late: the logged mean latency must show it
    yield s
    s.close()


def _train(tmp_path, tiny_ckpt, shapes_file, server, *flags):
    import grpo
    grpo.main(["--model", tiny_ckpt, "--data", shapes_file, "--out", str(tmp_path), "--max-steps", "2",
               "--rollout-batch", "2", "--update-batch", "2", "--group-size", "2", "--max-new-tokens", "12",
               "--judge", "openai", "--judge-base-url", server.base_url, "--judge-model", "judge-model",
               "--judge-timeout", "2", "--judge-retries", "1", *flags])
    return [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_with_openai_judge_logs_judge_metrics(tmp_path, tiny_ckpt, shapes_file, server):
    metrics = _train(tmp_path, tiny_ckpt, shapes_file, server, "--judge-swap")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        for k in ("judge/failed", "judge/ties", "judge/latency", "judge/gated_zero", "judge/tokens"):
            assert k in m, k
        # the mean request latency: the server's injected 50 ms plus local HTTP overhead (well under 0.2 s here)
        assert m["judge/failed"] == 0.0 and 0.05 <= m["judge/latency"] < 0.25, m["judge/latency"]
    assert server.count("Image facts") == 2 * 2 * 4, "2 steps x 4 rollouts x 2 orders (swap), besides the start-up probe"


@pytest.mark.slow
def test_training_survives_a_judge_that_always_fails(tmp_path, tiny_ckpt, shapes_file):
    broken = ChatServer()
    broken.inject("Image facts", *["500"] * 1000)
    try:  # --judge-max-failed 1: the run goes on whatever the judge does (its default 0.2 stops it)
        metrics = _train(tmp_path, tiny_ckpt, shapes_file, broken, "--judge-max-failed", "1")
    finally:
        broken.close()
    assert [m["judge/failed"] for m in metrics] == [1.0, 1.0], "every item a counted failure, the run goes on"
    assert all(m["reward/vis"] == 1.0 for m in metrics), "no preference: nothing is gated"


# -----------------------------------------------------------------------------
# the judge beside the log-prob passes (--judge-overlap, issue 27), and judge servers that die mid-run

def _timed_passes(monkeypatch):
    """Record each step's log-prob passes as (start, end) wall times, around grpo.logprob_passes."""
    windows, passes = [], grpo.logprob_passes

    def timed(*a, **k):
        start = time.time()
        out = passes(*a, **k)
        windows.append((start, time.time()))
        return out
    monkeypatch.setattr(grpo, "logprob_passes", timed)
    return windows


def _numbers(out):
    """A run's metrics without its wall times, and its logged rollouts (verdict-driven rewards, row by row)."""
    metrics = [{k: v for k, v in json.loads(l).items() if not k.startswith("t_") and k != "judge/latency"}
               for l in (out / "metrics.jsonl").read_text().splitlines()]
    return metrics, (out / "rollouts.jsonl").read_text()


@pytest.mark.slow
def test_the_judge_grades_beside_the_logprob_passes_and_changes_no_number(tmp_path, tiny_ckpt, shapes_file,
                                                                           monkeypatch):
    windows, seen = _timed_passes(monkeypatch), {}
    for flag in ("--judge-overlap", "--no-judge-overlap"):
        server = ChatServer(latency=0.5)  # every verdict half a second away: longer than the tiny model's passes
        windows.clear()
        try:  # two updates per step: the reference and the old log-probs are both computed before the rewards
            policy = grpo.main(["--model", tiny_ckpt, "--data", shapes_file, "--out", str(tmp_path / flag),
                                "--max-steps", "2", "--rollout-batch", "2", "--update-batch", "1", "--group-size", "2",
                                "--max-new-tokens", "12", "--judge", "openai", "--judge-base-url", server.base_url,
                                "--judge-model", "m", "--judge-swap", "--log-rollouts-every", "1", flag])
        finally:
            server.close()
        spans = server.spans[1:]  # the first is check_judge's start-up probe
        assert len(spans) == 2 * 4 * 2 and len(windows) == 2, "2 steps x 4 rollouts x 2 orders, one pass per step"
        during = [any(a < end and b > start for a, b in spans) for start, end in windows]
        assert during == ([True, True] if flag == "--judge-overlap" else [False, False]), (flag, during)
        seen[flag] = _numbers(tmp_path / flag), {n: p.detach().clone() for n, p in policy.named_parameters()}
    (metrics, rollouts), params = seen["--judge-overlap"]
    assert metrics[1]["judge/ties"] + metrics[1]["judge/gated_zero"] > 0, "the judge had verdicts to give"
    assert (metrics, rollouts) == seen["--no-judge-overlap"][0], "the same verdicts, rewards and updates"
    assert all(torch.equal(params[n], p) for n, p in seen["--no-judge-overlap"][1].items())


def _two_servers_run(tmp_path, tiny_ckpt, shapes_file, monkeypatch, kill):
    """3 steps against two judge servers; after step 1's rewards, `kill` of them are closed (killed mid-run)."""
    servers, compute = [ChatServer(), ChatServer()], grpo.compute_rewards
    calls = []

    def then_kill(*a, **k):
        out = compute(*a, **k)
        calls.append(1)
        if len(calls) == 1:
            for s in servers[:kill]:
                s.close()
        return out
    monkeypatch.setattr(grpo, "compute_rewards", then_kill)
    try:
        grpo.main(["--model", tiny_ckpt, "--data", shapes_file, "--out", str(tmp_path), "--max-steps", "3",
                   "--rollout-batch", "2", "--update-batch", "2", "--group-size", "2", "--max-new-tokens", "12",
                   "--judge", "openai", "--judge-base-url", ",".join(s.base_url for s in servers), "--judge-model", "m",
                   "--judge-timeout", "2", "--judge-retries", "1", "--judge-concurrency", "2"])
    finally:
        for s in servers[kill:]:
            s.close()
    return [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_judge_server_killed_mid_run_is_survived_while_another_serves(tmp_path, tiny_ckpt, shapes_file, monkeypatch):
    metrics = _two_servers_run(tmp_path, tiny_ckpt, shapes_file, monkeypatch, kill=1)
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["judge/failed"] == 0 for m in metrics)
    assert metrics[0]["judge/failovers"] == 0 and metrics[1]["judge/failovers"] > 0, "the dead server was tried once"


@pytest.mark.slow
def test_with_every_judge_server_killed_the_run_stops_by_the_failure_rule(tmp_path, tiny_ckpt, shapes_file, monkeypatch):
    with pytest.raises(SystemExit, match=r"step 2: the judge failed on 100% of the rollouts .*stopped before its update"):
        _two_servers_run(tmp_path, tiny_ckpt, shapes_file, monkeypatch, kill=2)
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (tmp_path / "latest").read_text() == "checkpoint-000001", "step 1 is kept for --resume"


# -----------------------------------------------------------------------------
# one bad item in training (load_dataset, rollout)

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


# -----------------------------------------------------------------------------
# importance-sampling correction for the sampler/trainer mismatch, and the padded LM-head rows

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
