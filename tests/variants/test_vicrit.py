"""ViCrit (variants/vicrit.py): the item builder (python -m variants.vicrit), the corrupted-phrase match and reward,
ViCrit rows skipping the judge, the generic mix (--vicrit-data = --mix-data FILE --mix-reward vicrit) and the
trainer with it. (From tests/test_judge_bench.py.)"""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import grpo
import judge
import palmr
import variants
import variants.vicrit as vicrit
from data import Sample
from rewards import score_completion
from variants.vicrit import vicrit_match

ROOT = Path(__file__).resolve().parents[2]


def obj(name, count, attributes, location=()):
    return {"name": name, "count": count, "attributes": list(attributes), "location": list(location)}


SHAPES = {"objects": [obj("circle", 2, ["red"], ["top left", "top right"]), obj("square", 1, ["blue"], ["middle centre"])],
          "relations": [], "text": [], "global": {"scene": "synthetic shapes"}}
REF = "<think>I see 2 red circles and 1 blue square. So there are 2 circles.</think> The answer is \\boxed{2}."


def test_vicrit_count_corruption_by_hand():
    facts = {"objects": [obj("circle", 1, ["red"], ["top left"])], "relations": ["the circle is alone"], "text": []}
    description, old, new = vicrit._vicrit_description(
        [{"n": 1, "attrs": ["red"], "name": "circle", "locs": ["top left"]}], [], facts, "count", 0, True, random.Random(0))
    assert (old, new) == ("one red circle", "two red circles")  # one -> always one more
    assert description == "There are two red circles at top left. The circle is alone."


@pytest.mark.parametrize("seed", range(12))
def test_vicrit_items_change_exactly_one_phrase(seed):
    rng = random.Random(seed)
    objects = [{"kind": rng.choice(data.KINDS), "color": rng.choice(list(data.COLORS)), "cell": [r, c]}
               for r, c in rng.sample([(r, c) for r in range(3) for c in range(3)], rng.randint(1, 5))]
    facts = data.scene_facts(objects)
    facts["text"] = ["EXIT 4"] if seed % 3 == 0 else []
    s = Sample(id=f"s{seed}", image="x.png", question="q", answer="a", facts=facts)
    item, why = vicrit.vicrit_item(s, random.Random(seed))
    assert why is None and item.answer in item.meta["description"] and item.answer != item.meta["original"]
    kind = item.meta["error_type"]
    assert item.source == f"vicrit/{kind}" and item.question == vicrit.VICRIT_PROMPT.format(description=item.meta["description"])
    truth = item.meta["description"].replace(item.answer, item.meta["original"], 1)
    assert item.meta["description"].count(item.answer) == 1, "the corrupted phrase is unambiguous"
    for sentence in truth.split(". "):  # with the corruption undone, every sentence is true of the scene
        if sentence.startswith("There "):
            words = sentence.split()
            n, color, kind_word = data.NUMBER_WORDS.index(words[2]), words[3], words[4]
            assert n == data.count_of(objects, color, kind_word if n == 1 else kind_word[:-1]), truth
    cells = [f"{data.ROWS[o['cell'][0]]} {data.COLS[o['cell'][1]]}" for o in objects]
    if kind == "count":
        old, new = (data.NUMBER_WORDS.index(x.split()[0]) for x in (item.meta["original"], item.answer))
        assert abs(old - new) == 1
    if kind in ("colour", "object"):
        n, color, kind_word = item.answer.split()
        assert data.count_of(objects, color, kind_word if n == "one" else kind_word[:-1]) == 0
    if kind == "location":
        assert item.answer in vicrit.CELLS and item.answer not in cells
    if kind == "text":
        assert item.meta["original"] == "EXIT 4" and len(item.answer) == 6 and item.answer != "EXIT 4"


@pytest.mark.parametrize("seed", range(40))
def test_vicrit_items_on_real_facts_are_never_true(seed):
    # uncoloured kinds: the object swap may not name a kind the facts have; texts: a changed text may not be
    # another visible text; gray and grey are one colour; the answer occurs once
    facts = {"objects": [obj("dog", 1, []), obj("cat", 1, []), obj("car", 2, ["gray"]), obj("car", 1, ["red"])],
             "relations": [], "text": ["4", "5"]}
    item, why = vicrit.vicrit_item(Sample(id=f"r{seed}", image="x", question="q", answer="a", facts=facts),
                                 random.Random(seed))
    assert why is None and item.meta["description"].count(item.answer) == 1
    kind = item.meta["error_type"]
    if kind == "object":
        assert item.answer.split()[-1] not in ("dog", "cat", "car", "cars", "dogs", "cats")
    if kind == "text":
        assert item.answer not in ("4", "5")
    if kind == "colour":
        assert "grey" not in item.answer and "gray" not in item.answer


def test_vicrit_item_without_facts():
    assert vicrit.vicrit_item(Sample(id="z", image="x", question="q", answer="a", facts={"objects": []}),
                            random.Random(0)) == (None, "no object entries or visible text in the facts")


@pytest.mark.parametrize("pred,ok", [
    ("two blue squares", True), ("Two Blue Squares.", True), ("\"two blue squares\"", True),
    ("\\text{two blue squares}", True),
    ("are two blue squares at bottom", True),   # words copied from the description around the span: allowed
    ("two blue squares at top", False),          # ... but not words the description does not have there
    ("blue squares", False), ("one blue circle", False), (None, False), ("", False),
    # copying more than the phrase's sentence, or more than 3 extra words, earns nothing (no copy-all hack)
    ("There is one blue circle at bottom right. There are two blue squares at bottom left.", False),
    ("bottom right. There are two blue squares", False),
    ("There are two blue squares at bottom left", False),  # 5 extra words
    ("There are two blue squares at", True),                # 3 extra words, one sentence
])
def test_vicrit_match(pred, ok):
    d = "There is one blue circle at bottom right. There are two blue squares at bottom left."
    assert vicrit_match(pred, "two blue squares", d) is ok


def test_vicrit_reward_by_hand():
    d = "There are two blue squares at bottom left."
    total, parts = score_completion("vicrit", "<think>the squares</think> \\boxed{two blue squares}", "two blue squares",
                                    description=d)
    assert total == pytest.approx(1.0) and parts["ans"] == 1.0
    total, _ = score_completion("vicrit", "\\boxed{two blue squares}", "two blue squares", description=d)
    assert total == pytest.approx(0.9)  # right phrase, no <think>
    total, _ = score_completion("vicrit", "<think>x</think> \\boxed{bottom left}", "two blue squares", description=d)
    assert total == pytest.approx(0.1)
    with pytest.raises(AssertionError, match="description"):
        score_completion("vicrit", "\\boxed{x}", "x")


def test_vicrit_rows_skip_the_judge():
    class Recording:
        stats = {}

        def judge(self, items):
            self.seen = [it.question for it in items]
            return [judge.Verdict(0.0, preference="reference") for _ in items]
    # a ViCrit row carries its own scheme (meta.reward_scheme: grpo.load_dataset sets it for --vicrit-data / --mix-data rows)
    vic = Sample(id="v-vicrit", image="x", question="find it", answer="two blue squares", source="vicrit/count",
                 meta={"description": "There are two blue squares.", "reward_scheme": "vicrit"})
    plain = Sample(id="p", image="x", question="how many?", answer="2", facts=SHAPES, reference=REF)
    c = lambda t: palmr.Completion([1], t, [0.0], True)  # noqa: E731
    j = Recording()
    rewards, parts, stats, _ = grpo.compute_rewards(j, [(vic, c("<think>x</think> \\boxed{two blue squares}")),
                                                        (plain, c("<think>x</think> \\boxed{2}"))], "palmr")
    assert j.seen == ["how many?"]  # the ViCrit row was not sent to the judge
    assert rewards.tolist() == pytest.approx([1.0, 0.0]) and parts["vis"].tolist() == [1.0, 0.0]


def test_mixed_step_items():
    for step in range(3):  # no extra data: every prompt from the main set, 4 per rank
        for rank in range(2):
            assert [src for src, _ in grpo.mixed_step_items(50, 0, step, 8, 0, 7, rank, 2)] == [0] * 4
    got = [grpo.mixed_step_items(50, 20, step, 8, 2, 7, rank, 2) for step in range(10) for rank in range(2)]
    per_step = [sum(src for src, _ in got[2 * s] + got[2 * s + 1]) for s in range(10)]
    assert per_step == [2] * 10  # 2 of the 8 global prompts come from the extra set, every step
    extra = [i for g in got for src, i in g if src == 1]
    assert sorted(extra) == list(range(20)), "one epoch of the extra set over 10 steps, each item once"


def _recording_rewards(monkeypatch):
    """Record each step's rows and reward parts, around grpo.compute_rewards."""
    seen, compute_rewards = [], grpo.compute_rewards

    def recording(judge_, rows, *a, **k):
        out = compute_rewards(judge_, rows, *a, **k)
        seen.append((rows, out[1]))
        return out
    monkeypatch.setattr(grpo, "compute_rewards", recording)
    return seen


@pytest.mark.slow
def test_trainer_mixes_vicrit_items(tmp_path, tiny_ckpt, shapes_file, monkeypatch):
    vic = tmp_path / "vicrit.jsonl"
    proc = subprocess.run([sys.executable, "-m", "variants.vicrit", "--in", shapes_file, "--out", str(vic)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # the CLI (was `data.py vicrit`)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["items"] == 64 and sum(summary["types"].values()) == 64
    assert summary == vicrit.vicrit_step(shapes_file, tmp_path / "again.jsonl", seed=0)
    assert (tmp_path / "again.jsonl").read_text() == vic.read_text(), "deterministic per (seed, id)"
    seen = _recording_rewards(monkeypatch)
    grpo.main(["--model", tiny_ckpt, "--data", shapes_file, "--out", str(tmp_path / "run"), "--max-steps", "1",
               "--vicrit-data", str(vic), "--vicrit-ratio", "0.5", "--rollout-batch", "4", "--update-batch", "4",
               "--group-size", "2", "--max-new-tokens", "12", "--save-every", "100", "--log-rollouts-every", "0"])
    m = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    (rows, parts), = seen
    is_vic = [vicrit.is_vicrit(s) for s, _ in rows]
    assert [s.meta.get("reward_scheme") for s, _ in rows] == ["vicrit" if v else None for v in is_vic]
    assert m["vicrit/rows"] == 0.5 and sum(is_vic) == 4
    # ViCrit's accuracy over its own rows, recomputed from the step's answer parts
    assert m["vicrit/acc"] == pytest.approx(sum(a for a, v in zip(parts["ans"].tolist(), is_vic) if v) / 4)
    grpo.main(["--model", tiny_ckpt, "--data", str(vic), "--reward", "vicrit", "--out", str(tmp_path / "only"),
               "--max-steps", "1", "--rollout-batch", "2", "--update-batch", "2", "--group-size", "2",
               "--max-new-tokens", "12", "--save-every", "100", "--log-rollouts-every", "0"])
    m = json.loads((tmp_path / "only" / "metrics.jsonl").read_text())
    assert m["vicrit/rows"] == 1.0
    assert m["reward"] == pytest.approx(0.9 * m["reward/ans"] + 0.1 * m["reward/fmt"])


def test_vicrit_flags_mean_the_generic_mix():
    args = grpo.get_args(["--vicrit-data", "v.jsonl", "--vicrit-ratio", "0.5"])
    assert (args.mix_data, args.mix_reward, args.mix_ratio) == ("v.jsonl", "vicrit", 0.5)
    assert [type(h) for h in variants.active(args, 1)] == [vicrit.ViCrit]
    assert [type(h) for h in variants.active(grpo.get_args(["--reward", "vicrit"]), 1)] == [vicrit.ViCrit]
    assert variants.active(grpo.get_args([]), 1) == []


def test_vicrit_drops_what_is_not_a_vicrit_item():
    hook = vicrit.ViCrit(grpo.get_args(["--reward", "vicrit"]))
    item = Sample(id="v", image="x", question="q", answer="a", source="vicrit/count", meta={"description": "d"})
    plain = Sample(id="p", image="x", question="q", answer="a", source="shapes")
    assert hook.drop_reason(item, "vicrit") is None and hook.drop_reason(plain, "palmr") is None
    assert hook.drop_reason(plain, "vicrit") == "not a ViCrit item (python -m variants.vicrit)"
    no_description = Sample(id="n", image="x", question="q", answer="a", source="vicrit/count")
    assert hook.drop_reason(no_description, "palmr") == "not a ViCrit item (python -m variants.vicrit)"


def test_resume_reads_a_pre_mix_vicrit_run_as_its_mix(tmp_path):
    # a run saved before --mix-data existed stored --vicrit-data / --vicrit-ratio; resuming it with the same flags
    # must be accepted, and with another file refused (issue 24 review; the mapping is in grpo.load_trainer_state)
    import random as pyrandom

    import numpy as np
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    old_args = {k: v for k, v in vars(grpo.get_args([])).items() if k not in ("mix_data", "mix_ratio", "mix_reward")}
    old_args.update(vicrit_data="items.jsonl", vicrit_ratio=0.5)
    rng = {"torch": torch.get_rng_state(), "python": pyrandom.getstate(), "numpy": np.random.get_state(), "cuda": None}
    torch.save({"step": 3, "args": old_args, "rng": [rng], "optimizer": get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True))}, tmp_path / "trainer_state.pt")
    same = grpo.get_args(["--vicrit-data", "items.jsonl", "--vicrit-ratio", "0.5"])
    assert grpo.load_trainer_state(tmp_path, model, optimizer, same) == 3
    other = grpo.get_args(["--vicrit-data", "other.jsonl", "--vicrit-ratio", "0.5"])
    with pytest.raises(SystemExit, match="mix_data"):
        grpo.load_trainer_state(tmp_path, model, optimizer, other)
