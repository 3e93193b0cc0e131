"""Dynamic sampling (variants/dynamic_sampling.py): which groups are kept and which redrawn, by hand; and a run where
every group is informative, which the flag must leave exactly as it was. The 2-rank run with equal counts per step
is in test_base.py (TORCHRUN)."""
import json
import types

import pytest
import torch

import grpo
import palmr
from data import Sample
from variants.dynamic_sampling import DynamicSampling, fresh_prompts, split_groups


def _sample(i):
    return Sample(id=f"p{i}", image="x.png", question=f"q{i}", answer="1")


def _rows(samples, g=2):
    return [(s, palmr.Completion(text=f"{s.id} #{k}", token_ids=[1, 2], logprobs=[0.0, 0.0], finished=True))
            for s in samples for k in range(g)]


def test_split_groups_by_hand():
    samples = [_sample(i) for i in range(3)]
    rows = _rows(samples)
    informative, tied = split_groups(samples, rows, torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5]), 2)
    assert [s.id for s, _ in informative] == ["p0"] and [s.id for s, _ in tied] == ["p1", "p2"]
    assert informative[0][1] == rows[:2] and tied[1][1] == rows[4:]
    with pytest.raises(AssertionError):
        split_groups(samples, rows[:5], torch.zeros(5), 2)


def test_fresh_prompts_skip_the_step_and_repeat_by_seed():
    items = [_sample(i) for i in range(10)]
    a = fresh_prompts(items, {"p0", "p1"}, 3, [0, 5, 1, 1])
    assert len(a) == 3 and not {"p0", "p1"} & {s.id for s in a} and len({s.id for s in a}) == 3
    assert [s.id for s in a] == [s.id for s in fresh_prompts(items, {"p0", "p1"}, 3, [0, 5, 1, 1])]
    assert len(fresh_prompts(items, {s.id for s in items[:9]}, 3, [0])) == 1, "fewer when fewer are left"


def _run(items, rewards_by_id, tries=2, g=2):
    """A loop-shaped `run` whose rollouts and rewards are written by hand: each prompt's rewards come from
    rewards_by_id (per prompt: its G rewards); rollout calls are recorded."""
    args = types.SimpleNamespace(group_size=g, seed=0, dynamic_sampling_tries=tries, rollout_batch=4,
                                 reward="palmr")
    calls = []

    def rollout(batch, n=None, seed_offset=0):
        calls.append(([s.id for s in batch], seed_offset))
        return _rows(batch, g), {s.id: {"input_ids": [s.id]} for s in batch}
    score = lambda rows: torch.tensor([rewards_by_id[s.id][int(c.text.split("#")[1])] for s, c in rows])  # noqa: E731
    return types.SimpleNamespace(args=args, step=3, rank=0, samples=items, rollout=rollout, score=score), calls


def test_tied_groups_are_redrawn_and_informative_ones_kept_in_order():
    items = [_sample(i) for i in range(12)]
    step = items[:4]  # p0 and p2 informative, p1 and p3 tied (both 0 and both 1)
    rewards = {s.id: [0.0, 0.0] for s in items}
    rewards.update(p0=[1.0, 0.0], p2=[0.0, 0.5], p3=[1.0, 1.0])
    for s in items[4:]:  # every fresh prompt informative
        rewards[s.id] = [0.2, 0.7]
    run, calls = _run(items, rewards)
    method = DynamicSampling(run.args)
    samples, rows, encoded = method.redraw(run, step, _rows(step), {s.id: {"input_ids": [s.id]} for s in step})
    assert len(calls) == 1 and len(calls[0][0]) == 2, "one try, the two missing groups"
    assert not set(calls[0][0]) & {s.id for s in step}, "fresh prompts only"
    assert [s.id for s in samples] == ["p0", "p2", *calls[0][0]] and set(encoded) == {s.id for s in samples}
    assert len(rows) == 8 and [s.id for s, _ in rows[::2]] == [s.id for s in samples]
    m = method.metrics(rows, {})  # sums the loop divides by the global row count (one rank here: 8)
    assert m["ds/informative"] / 8 == 1.0 and m["ds/drawn"] / 8 == 1.5 and m["ds/tries"] / 8 == 1.0
    metrics = {k: float(v) / 8 for k, v in m.items()}
    method.finish_metrics(metrics)
    assert metrics["ds/groups_drawn"] == 6 and metrics["ds/groups_kept"] == 4


def test_when_tries_run_out_tied_groups_fill_the_batch():
    items = [_sample(i) for i in range(12)]
    step = items[:2]
    rewards = {s.id: [0.0, 0.0] for s in items}  # nothing is ever informative
    rewards["p1"] = [0.0, 1.0]
    run, calls = _run(items, rewards, tries=3)
    method = DynamicSampling(run.args)
    samples, rows, _ = method.redraw(run, step, _rows(step), {s.id: {} for s in step})
    assert len(calls) == 3 and [len(c[0]) for c in calls] == [1, 1, 1], "each try draws what is still missing"
    assert len({c[1] for c in calls}) == 3, "each try samples with its own seed"
    assert [s.id for s in samples] == ["p1", "p0"], "the informative group, then the first tied one drawn"
    assert len(rows) == 4 and method.last["tries"] == 3 and method.last["drawn"] == 5


def test_every_group_informative_draws_nothing():
    items = [_sample(i) for i in range(6)]
    rewards = {s.id: [0.0, 1.0] for s in items}
    run, calls = _run(items, rewards)
    step_rows = _rows(items[:3])
    samples, rows, _ = DynamicSampling(run.args).redraw(run, items[:3], step_rows, {s.id: {} for s in items[:3]})
    assert calls == [] and samples == items[:3] and rows == step_rows


def test_schemes_that_need_a_methods_signals_are_refused():
    args = grpo.get_args(["--dynamic-sampling", "--reward", "pearl", "--judge", "none"])
    with pytest.raises(SystemExit, match="--dynamic-sampling with --reward pearl"):
        DynamicSampling(args).check(1)
    with pytest.raises(SystemExit, match="tries must be >= 1"):
        DynamicSampling(grpo.get_args(["--dynamic-sampling", "--dynamic-sampling-tries", "0"])).check(1)


@pytest.mark.slow
def test_with_every_group_informative_the_flag_changes_nothing(tmp_path, tiny_ckpt, shapes_file, monkeypatch):
    # the loop's rewards made distinct within every group (the real parts kept): no group ties, nothing is redrawn
    compute = grpo.compute_rewards

    def distinct(*a, **k):
        rewards, parts, stats, located = compute(*a, **k)
        return rewards + 0.01 * torch.arange(rewards.numel()), parts, stats, located
    monkeypatch.setattr(grpo, "compute_rewards", distinct)
    runs = {}
    for flag in ([], ["--dynamic-sampling"]):
        out = tmp_path / ("ds" if flag else "plain")
        policy = grpo.main(["--model", tiny_ckpt, "--data", shapes_file, "--out", str(out), "--max-steps", "2",
                            "--rollout-batch", "2", "--update-batch", "2", "--group-size", "2", "--max-new-tokens", "8",
                            "--log-rollouts-every", "1", *flag])
        metrics = [{k: v for k, v in json.loads(l).items() if not k.startswith(("t_", "ds/"))}
                   for l in (out / "metrics.jsonl").read_text().splitlines()]
        runs[bool(flag)] = metrics, (out / "rollouts.jsonl").read_text(), dict(policy.named_parameters())
    assert runs[True][0] == runs[False][0] and runs[True][1] == runs[False][1]
    assert all(torch.equal(p, runs[False][2][n]) for n, p in runs[True][2].items())
    ds = [json.loads(l) for l in (tmp_path / "ds" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["ds/tries"], m["ds/groups_drawn"], m["ds/groups_kept"]) for m in ds] == [(0, 2, 2), (0, 2, 2)]
