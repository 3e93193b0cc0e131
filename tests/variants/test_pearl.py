"""PEARL (--reward pearl): the checklist rule, the gate, the auxiliary rollouts' grading and pass rate, the
interleaved training rows, all by hand; and the trainer with it (one process and torchrun on 2 ranks)."""
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import grpo
import palmr
from data import Sample
from rewards import fuse, pearl_checklist, plural_noun, score_completion

ROOT = Path(__file__).resolve().parent.parent


def obj(name, count, *attributes):
    return {"name": name, "count": count, "attributes": list(attributes), "location": []}


@pytest.mark.parametrize("name,plural", [("circle", "circles"), ("bus", "buses"), ("box", "boxes"),
                                         ("church", "churches"), ("berry", "berries"), ("key", "keys"),
                                         ("traffic light", "traffic lights"), ("glass", "glasses"),
                                         ("glasses", "glasses"), ("person", "people"), ("people", "people"),
                                         ("cactus", "cactuses"), ("tennis racket", "tennis rackets")])
def test_plural_noun(name, plural):
    assert plural_noun(name) == plural


def test_checklist_by_hand():
    facts = {"objects": [obj("square", 1, "blue"), obj("circle", 2, "red")], "relations": [], "text": []}
    # the question names circles: the red circles come first, the blue squares next, then the absent probe
    # that names circles too (blue circles; red squares is the other absent combination)
    q = "Are there more circles than triangles?"
    want = [("How many red circles are there?", "2"), ("How many blue squares are there?", "1"),
            ("How many blue circles are there?", "0")]
    assert pearl_checklist(facts, q, 3, "any key") == want
    assert pearl_checklist(facts, q, 2, "any key") == [want[0], want[2]]  # k - 1 present items, then the probe
    assert pearl_checklist(facts, q, 5, "any key") == want + want[:2]     # repeated in order up to k
    assert pearl_checklist(facts, q, 1, "any key") == [want[0]]           # room for one: a present item


def test_checklist_leaves_out_the_question_itself():
    facts = {"objects": [obj("square", 1, "blue"), obj("circle", 2, "red")]}
    items = pearl_checklist(facts, "How many red circles are there?", 2, "k")
    assert items[0] == ("How many blue squares are there?", "1")
    assert items[1] in [("How many blue circles are there?", "0"), ("How many red squares are there?", "0")]
    # a scene of one group asked about that group has nothing else to check: the trainer drops the item
    assert pearl_checklist({"objects": [obj("circle", 2, "red")]}, "How many red circles are there?", 3, "k") == []


def test_checklist_from_real_facts():
    # as data.py facts writes them (FACTS_SCHEMA): unusable entries are skipped, not guessed
    facts = {"objects": [obj("Bus", "3", "Red", " double-decker "), obj("person", 0, "standing"),
                         obj("", 2, "green"), obj("tree", "many", "green"), obj("tree", True), "not an object",
                         obj("dog", 1, "brown"), obj("bus", 3, "red", "double-decker"),  # a second such group
                         obj("car", 2, "large")],
             "relations": ["the dog is left of the bus"], "text": ["STOP"],
             "global": {"scene": "street", "total_objects": 5}}
    items = pearl_checklist(facts, "What colour is the bus?", 3, "street-1")
    # present: the bus first (the question names it; its two equal entries summed), then dog or car in the
    # key's shuffled order; trees have an unreadable count and person a count of 0: not asked. Absent: a
    # colour another entry has (tree: green) that no entry of the name has, for names whose entries all have
    # one colour (not car, person or tree: their colour is unknown), those named by the question first
    assert items[0] == ("How many red double-decker buses are there?", "6")
    assert items[1] in [("How many brown dogs are there?", "1"), ("How many large cars are there?", "2")]
    assert items[2] in [("How many brown buses are there?", "0"), ("How many green buses are there?", "0")]


def test_checklist_skips_groups_that_may_overlap():
    # attributes other than colour are not exhaustive: the red bus may be double-decker too, so neither
    # count is certain; distinct single colours exclude each other, so both counts are
    overlapping = {"objects": [obj("bus", 1, "red"), obj("bus", 2, "red", "double-decker"), obj("tree", 2),
                               obj("tree", 1, "green")]}
    assert pearl_checklist(overlapping, "q", 2, "k") == []
    exclusive = {"objects": [obj("bus", 1, "red"), obj("bus", 2, "blue", "double-decker")]}
    assert sorted(pearl_checklist(exclusive, "q", 2, "k")) == [("How many blue double-decker buses are there?", "2"),
                                                              ("How many red buses are there?", "1")]
    # an uncoloured name gets no absent probe (its colour is unknown); an entry with a bad count is not asked
    # about, but its colour still blocks the probe of its own name (green buses exist, however many)
    probes = {"objects": [obj("car", 2, "large"), obj("dog", 1, "brown"), obj("bus", "many", "green")]}
    items = pearl_checklist(probes, "q", 3, "k")
    assert items[2] in [("How many brown buses are there?", "0"), ("How many green dogs are there?", "0")]
    assert sorted(items[:2]) == [("How many brown dogs are there?", "1"), ("How many large cars are there?", "2")]
    assert pearl_checklist(None, "q", 3, "k") == [] and pearl_checklist({"objects": []}, "q", 3, "k") == []


def test_checklist_answers_match_the_scene():
    """On 300 synthetic scenes every checklist answer equals the scene's own count (data.count_of)."""
    rng = random.Random(0)
    asked = absent = 0
    for i in range(300):
        n = rng.randint(1, 6)
        cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
        objects = [{"kind": rng.choice(data.KINDS), "color": rng.choice(list(data.COLORS)), "cell": list(c)}
                   for c in cells]
        _, question, *_ = data.make_question(objects, rng)
        for q, a in pearl_checklist(data.scene_facts(objects), question, 3, f"s{i}"):
            color, kind = re.fullmatch(r"How many (\w+) (\w+)s are there\?", q).groups()
            assert int(a) == data.count_of(objects, color, kind), (q, a, objects)
            asked += 1
            absent += a == "0"
    assert asked > 800 and 100 < absent < asked / 2


def test_gate_by_hand():
    assert fuse("pearl", 1.0, 1.0, 0.0, s_perc=0.5) == pytest.approx(1.0)  # at the gate: passes; S_vis unused
    assert fuse("pearl", 1.0, 1.0, 1.0, s_perc=0.49) == 0.0                # below: the reasoning reward is 0
    assert fuse("pearl", 1.0, 0.0, 1.0, s_perc=1.0) == pytest.approx(0.1)
    assert fuse("pearl", 1.0, 1.0, 1.0, s_perc=0.7, gate=0.75) == 0.0
    total, parts = score_completion("pearl", "<think>2 circles</think> \\boxed{2}", "2", s_perc=2 / 3)
    assert total == pytest.approx(1.0) and parts["perc"] == pytest.approx(2 / 3)
    with pytest.raises(AssertionError, match="checklist pass rate"):
        score_completion("pearl", "<think>x</think> \\boxed{2}", "2")


class ScriptedEngine:
    """Answers each question with the scripted replies for it, in order (sampling itself is the real engine's
    job, run in the trainer tests below); records what it was asked."""

    def __init__(self, replies):
        self.replies, self.calls = replies, []

    def generate(self, prompts, n, max_new_tokens, temperature, top_p, seed):
        self.calls.append((len(prompts), n, seed))
        out = []
        for p in prompts:
            question = next(q for q in self.replies if q in p.text)
            out.append([palmr.Completion([5] * (k + 1), r, [], True) for k, r in enumerate(self.replies[question][:n])])
        return out


def test_pearl_checks_grade_and_pass_rate(tiny_ckpt, tmp_path):
    from PIL import Image
    Image.new("RGB", (56, 56), "white").save(tmp_path / "a.png")
    facts = {"objects": [obj("square", 1, "blue"), obj("circle", 2, "red")]}
    s = Sample(id="a", image=str(tmp_path / "a.png"), question="Are there more circles than triangles?",
               answer="yes", facts=facts)
    ok = lambda a: f"<think>counting</think> \\boxed{{{a}}}"  # noqa: E731
    engine = ScriptedEngine({"red circles": [ok(2), ok(2), ok(3), "\\boxed{2}"],
                             "blue squares": [ok(1), ok(0), ok(0), ok(0)],
                             "blue circles": [ok(0), ok(0), ok(0), ok(0)]})
    args = grpo.get_args(["--reward", "pearl", "--judge", "none", "--pearl-items", "3", "--pearl-group", "4"])
    rows, encoded, rewards, perception = grpo.pearl_checks(engine, palmr.load_processor(tiny_ckpt), [s], args,
                                                           step=2, rank=0)
    assert [r[0].id for r in rows] == ["a#pearl0"] * 4 + ["a#pearl1"] * 4 + ["a#pearl2"] * 4
    assert set(encoded) == {"a#pearl0", "a#pearl1", "a#pearl2"} and rows[0][0].meta == {"of": "a"}
    # correct + format = 1.0, wrong + format = 0.1, correct without the format = 0.9
    assert rewards.tolist() == pytest.approx([1, 1, 0.1, 0.9, 1, 0.1, 0.1, 0.1, 1, 1, 1, 1])
    assert perception == {"a": pytest.approx(8 / 12)}  # 3 + 1 + 4 right answers of 12
    assert engine.calls == [(3, 4, args.seed + 1_000_003 * 2 + 700_001)]  # one batched call, its own seed
    # the gate then keeps this prompt's reasoning reward (8/12 >= 0.5) and would zero it at a 0.7 gate
    reply = palmr.Completion([1], "<think>2 circles, 0 triangles</think> \\boxed{yes}", [], True)
    kept, _, _, _ = grpo.compute_rewards(None, [(s, reply)], "pearl", s_perc=[perception["a"]], gate=0.5)
    shut, parts, _, _ = grpo.compute_rewards(None, [(s, reply)], "pearl", s_perc=[perception["a"]], gate=0.7)
    assert kept.tolist() == pytest.approx([1.0]) and shut.tolist() == [0.0] and parts["ans"].tolist() == [1.0]


def test_interleave_checks_by_hand():
    rows = ["p0a", "p0b", "p1a", "p1b"]
    checks = ["c0x", "c0y", "c0z", "c1x", "c1y", "c1z"]
    out, adv, wrong = grpo.interleave_checks(rows, torch.tensor([1., 2., 3., 4.]), [[1], [], [2, 3], []], checks,
                                             torch.tensor([10., 20., 30., 40., 50., 60.]), 2)
    assert out == ["p0a", "p0b", "c0x", "c0y", "c0z", "p1a", "p1b", "c1x", "c1y", "c1z"]
    assert adv.tolist() == [1, 2, 10, 20, 30, 3, 4, 40, 50, 60]
    assert wrong == [[1], [], [], [], [], [2, 3], [], [], [], []]
    assert grpo.interleave_checks(rows, torch.zeros(4), None, checks, torch.zeros(6), 2)[2] is None


def test_trainer_step_with_the_real_engine(tmp_path, tiny_ckpt, shapes_file):
    grpo.main(["--model", tiny_ckpt, "--data", shapes_file, "--out", str(tmp_path), "--max-steps", "1",
               "--reward", "pearl", "--judge", "none", "--rollout-batch", "2", "--update-batch", "2",
               "--group-size", "2", "--max-new-tokens", "12", "--pearl-items", "2", "--pearl-group", "3",
               "--save-every", "100", "--log-rollouts-every", "0"])
    m = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert m["pearl/rollouts"] == pytest.approx(2 * 3 / 2) and m["t_pearl"] > 0  # per reasoning rollout
    assert 0.0 <= m["pearl/perception"] <= 1.0 and m["reward/perc"] == pytest.approx(m["pearl/perception"])
    # trained tokens: the reasoning rollouts and the checklist rollouts (2 prompts x 2 + 2 x 2 x 3 rows)
    assert m["tokens"] == pytest.approx((m["completion_len"] + m["pearl/tokens"]) * 4, rel=1e-6)


def test_trainer_gate_closes_every_group(tmp_path, tiny_ckpt, shapes_file):
    # a gate of 1.0 passes only prompts whose 6 checklist rollouts are all right: the random tiny policy has
    # none, so every reasoning reward is 0 while the checklist groups still train (tokens > the reasoning rows')
    grpo.main(["--model", tiny_ckpt, "--data", shapes_file, "--out", str(tmp_path), "--max-steps", "1",
               "--reward", "pearl", "--judge", "none", "--rollout-batch", "2", "--update-batch", "2",
               "--group-size", "2", "--max-new-tokens", "12", "--pearl-items", "2", "--pearl-group", "3",
               "--pearl-gate", "1.0", "--save-every", "100", "--log-rollouts-every", "0"])
    m = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert m["pearl/perception"] < 1.0 and m["pearl/gated"] == 1.0 and m["reward"] == 0.0
    assert m["tokens"] > m["completion_len"] * 4


@pytest.mark.slow
def test_pearl_under_torchrun_two_ranks(tmp_path, tiny_ckpt, shapes_file):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "grpo.py"),
           "--model", tiny_ckpt, "--data", shapes_file, "--out", str(tmp_path), "--max-steps", "2",
           "--reward", "pearl", "--judge", "none", "--rollout-batch", "4", "--update-batch", "2",
           "--group-size", "2", "--max-new-tokens", "12", "--pearl-items", "2", "--pearl-group", "2",
           "--save-every", "100", "--log-rollouts-every", "0"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["pearl/rollouts"] == pytest.approx(2.0) and m["t_pearl"] > 0 for m in metrics)
    for m in metrics:  # the gate, seen from the logged means: a gated prompt's rollouts all earn 0, others <= 1
        assert m["reward"] <= 1.0 - m["pearl/gated"] + 1e-6
    saved = json.loads((tmp_path / "args.json").read_text())
    assert saved["reward"] == "pearl" and saved["pearl_items"] == 2 and saved["pearl_group"] == 2
