"""PEARL (variants/pearl.py, --reward pearl): the checklist rule, the gate, the auxiliary rollouts' grading and
pass rate, the interleaved training rows, all by hand; and the trainer with it (torchrun on 2 ranks:
tests/variants/test_base.py)."""
import json
import random
import re
import time
import types

import pytest
import torch

import data
import grpo
import palmr
import variants
import variants.pearl as pearl
from data import Sample
from palmr import plural_noun
from rewards import fuse, score_completion
from variants.pearl import PEARL_GATE, Pearl, pearl_checklist, pearl_checks
from variants.token_credit import TokenCredit


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

    def wake(self):  # the engine interface (palmr.HFEngine): the rollout wakes its engine first
        pass

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
    processor = palmr.load_processor(tiny_ckpt)
    hooks = variants.active(args, 1)
    run = types.SimpleNamespace(args=args, step=2, rank=0, prefill="")  # as grpo.main builds it
    run.rollout = lambda batch, n=None, seed_offset=0: grpo.rollout(engine, processor, batch, args, run.step, 0, n,
                                                                    seed_offset, hooks)
    rows, encoded, rewards, perception = pearl_checks(run, [s])
    assert [r[0].id for r in rows] == ["a#pearl0"] * 4 + ["a#pearl1"] * 4 + ["a#pearl2"] * 4
    assert set(encoded) == {"a#pearl0", "a#pearl1", "a#pearl2"} and rows[0][0].meta == {"of": "a"}
    # correct + format = 1.0, wrong + format = 0.1, correct without the format = 0.9
    assert rewards.tolist() == pytest.approx([1, 1, 0.1, 0.9, 1, 0.1, 0.1, 0.1, 1, 1, 1, 1])
    assert perception == {"a": pytest.approx(8 / 12)}  # 3 + 1 + 4 right answers of 12
    assert engine.calls == [(3, 4, args.seed + 1_000_003 * 2 + 700_001)]  # one batched call, its own seed
    # the gate then keeps this prompt's reasoning reward (8/12 >= 0.5) and would zero it at a 0.7 gate
    reply = palmr.Completion([1], "<think>2 circles, 0 triangles</think> \\boxed{yes}", [], True)
    signals = [{"s_perc": perception["a"]}]
    kept, _, _, _ = grpo.compute_rewards(None, [(s, reply)], "pearl", signals=signals, options={"gate": 0.5})
    shut, parts, _, _ = grpo.compute_rewards(None, [(s, reply)], "pearl", signals=signals, options={"gate": 0.7})
    assert kept.tolist() == pytest.approx([1.0]) and shut.tolist() == [0.0] and parts["ans"].tolist() == [1.0]
    assert parts["perc"].tolist() == pytest.approx([8 / 12])  # the signal s_perc is logged as the part perc
    # the hook passes its gate to every row's scheme
    assert Pearl(args).reward_signals() == {"gate": PEARL_GATE} == {"gate": 0.5}


def test_interleave_groups_by_hand():
    rows = ["p0a", "p0b", "p1a", "p1b"]
    checks = ["c0x", "c0y", "c0z", "c1x", "c1y", "c1z"]
    out, adv = grpo.interleave_groups(rows, torch.tensor([1., 2., 3., 4.]), checks,
                                      torch.tensor([10., 20., 30., 40., 50., 60.]), 2)
    assert out == ["p0a", "p0b", "c0x", "c0y", "c0z", "p1a", "p1b", "c1x", "c1y", "c1z"]
    assert adv.tolist() == [1, 2, 10, 20, 30, 3, 4, 40, 50, 60]


def test_located_errors_follow_their_rows_through_the_interleaving():
    # token credit and PEARL together: the judge's located errors of the reasoning rows stay with those rows once
    # the checklist groups are interleaved; the checklist rows (never judged) get none
    completion = lambda: palmr.Completion([1, 2, 3, 4], "x", [], True)  # noqa: E731
    rows = [("p0a", completion()), ("p0b", completion()), ("p1a", completion()), ("p1b", completion())]
    checks = [(f"c{i}{j}", completion()) for i in range(2) for j in "xyz"]
    args = grpo.get_args(["--reward", "pearl", "--credit", "token", "--credit-c", "0.5"])
    hooks = variants.active(args, 1)
    assert [type(h) for h in hooks] == [TokenCredit, Pearl]  # only token credit shapes the advantages
    hooks[0].wrong = {id(rows[0][1]): [1], id(rows[2][1]): [2, 3]}  # what after_reward leaves for this step
    out, adv = grpo.interleave_groups(rows, torch.zeros(4), checks, torch.tensor([10., 20., 30., 40., 50., 60.]), 2)
    ctx = types.SimpleNamespace(rows=out, advantages=adv, spans=[[range(0, 10)]], device=torch.device("cpu"),
                                batches=[[{"mask": torch.ones(10, 4)}]])
    (shaped,), _ = hooks[0].shape_advantages(ctx)
    wrong = [[t for t in range(4) if shaped[0][r, t] != adv[r]] for r in range(10)]
    assert wrong == [[1], [], [], [], [], [2, 3], [], [], [], []]
    assert shaped[0][0, 1] == shaped[0][5, 2] == -0.5


def _recording_checks(monkeypatch):
    """Record what each step's checklist pass returned (its rows, the pass rate per prompt) and the seconds it
    took, around variants.pearl.pearl_checks."""
    seen = []

    def recording(*a, **k):
        t = time.time()
        out = pearl_checks(*a, **k)
        seen.append((out, time.time() - t))
        return out
    monkeypatch.setattr(pearl, "pearl_checks", recording)
    return seen


def _train(tmp_path, tiny_ckpt, shapes_file, *flags):
    grpo.main(["--model", tiny_ckpt, "--data", shapes_file, "--out", str(tmp_path), "--max-steps", "1",
               "--reward", "pearl", "--judge", "none", "--rollout-batch", "2", "--update-batch", "2",
               "--group-size", "2", "--max-new-tokens", "12", "--pearl-items", "2", "--pearl-group", "3",
               "--save-every", "100", "--log-rollouts-every", "0", *flags])
    return json.loads((tmp_path / "metrics.jsonl").read_text())


def test_trainer_step_with_the_real_engine(tmp_path, tiny_ckpt, shapes_file, monkeypatch):
    seen = _recording_checks(monkeypatch)
    m = _train(tmp_path, tiny_ckpt, shapes_file)
    ((check_rows, _, _, passed), seconds), = seen
    assert len(check_rows) == 2 * 2 * 3 and len(passed) == 2  # 2 prompts x 2 questions x 3 rollouts
    assert m["pearl/rollouts"] == pytest.approx(2 * 3 / 2)  # per reasoning rollout
    assert m["t_pearl"] == pytest.approx(seconds, abs=0.05)  # the checklist pass's own time (0.05 s: the wrapper's)
    # every prompt's G = 2 rollouts carry its pass rate: the mean over rows is the mean over prompts
    assert m["pearl/perception"] == pytest.approx(sum(passed.values()) / 2)
    assert m["reward/perc"] == pytest.approx(m["pearl/perception"])
    assert m["pearl/gated"] == pytest.approx(sum(p < PEARL_GATE for p in passed.values()) / 2)
    assert m["pearl/tokens"] == pytest.approx(sum(len(c.token_ids) for _, c in check_rows) / 4)
    # trained tokens: the reasoning rollouts and the checklist rollouts (2 prompts x 2 + 2 x 2 x 3 rows)
    assert m["tokens"] == pytest.approx((m["completion_len"] + m["pearl/tokens"]) * 4, rel=1e-6)


def test_trainer_gate_closes_every_group(tmp_path, tiny_ckpt, shapes_file, monkeypatch):
    # a gate of 1.0 passes only prompts whose 6 checklist rollouts are all right: the random tiny policy has
    # none, so every reasoning reward is 0 while the checklist groups still train (their tokens count)
    seen = _recording_checks(monkeypatch)
    m = _train(tmp_path, tiny_ckpt, shapes_file, "--pearl-gate", "1.0")
    ((check_rows, _, _, passed), _), = seen
    assert max(passed.values()) < 1.0 and m["pearl/perception"] == pytest.approx(sum(passed.values()) / 2)
    assert m["pearl/gated"] == 1.0 and m["reward"] == 0.0
    assert m["tokens"] == pytest.approx((m["completion_len"] + m["pearl/tokens"]) * 4, rel=1e-6)
    assert m["pearl/tokens"] == pytest.approx(sum(len(c.token_ids) for _, c in check_rows) / 4)


def test_pearl_flags_are_checked():
    for flags in (["--pearl-items", "0"], ["--pearl-group", "1"], ["--pearl-gate", "1.5"]):
        with pytest.raises(SystemExit, match="--pearl-items must be >= 1"):
            variants.active(grpo.get_args(["--reward", "pearl", *flags]), 1)
    hook, = variants.active(grpo.get_args(["--reward", "pearl"]), 1)
    facts = {"objects": [obj("square", 1, "blue"), obj("circle", 2, "red")]}
    s = Sample(id="a", image="x", question="Are there more circles than triangles?", answer="yes", facts=facts)
    assert hook.questions(s) == [q for q, _ in pearl_checklist(facts, s.question, 3, "a")]  # length-checked at load
    assert hook.drop_reason(s, "pearl") is None
    lone = Sample(id="b", image="x", question="How many red circles are there?", answer="2",
                  facts={"objects": [obj("circle", 2, "red")]})
    assert hook.drop_reason(lone, "pearl") == "no checkable facts for a PEARL checklist"
    # a --mix-data row with another scheme gets checklist groups too, so it needs a checklist as well
    assert hook.drop_reason(lone, "grpo") == "no checkable facts for a PEARL checklist"


def test_rows_of_another_scheme_without_a_checklist_are_dropped_too():
    # every row gets checklist groups under --reward pearl (a --mix-data row too), so one without checkable facts
    # would leave its prompt without groups: dropped at load whatever its own scheme (review of issue 24)
    import grpo
    from data import Sample
    from variants.pearl import Pearl
    hook = Pearl(grpo.get_args(["--reward", "pearl", "--mix-data", "x.jsonl", "--mix-reward", "grpo"]))
    textual = Sample("t1", "x.png", "What does the sign say?", "stop", facts={"objects": [], "text": ["STOP"]})
    assert hook.drop_reason(textual, "grpo") == "no checkable facts for a PEARL checklist"
    counted = Sample("c1", "x.png", "How many circles?", "2",
                     facts={"objects": [{"name": "circle", "count": 2, "attributes": ["red"]}]})
    assert hook.drop_reason(counted, "grpo") is None


def test_a_mixed_dataset_under_pearl_switches_pearl_on():
    import grpo
    from variants.pearl import Pearl
    from variants.vision_sr1 import VisionSR1
    args = grpo.get_args(["--reward", "palmr", "--mix-data", "x.jsonl", "--mix-reward", "pearl"])
    assert Pearl.is_active(args) and not VisionSR1.is_active(args)
