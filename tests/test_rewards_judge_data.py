"""Table-driven checks of response parsing, answer grading, reward fusion (palmr.py, rewards.py),
the rule judge (judge.py) and the data contract and synthetic shapes task (data.py)."""
import json
import random
import re

import pytest

import data
import judge
import rewards
from data import Sample, hallucinated_trace, load_image, make_shapes, read_jsonl, write_jsonl
from judge import JudgeItem, RuleJudge, claims, contradictions
from palmr import INSTRUCTION, format_question, parse_response
from rewards import SCHEMES, fuse, grade_answer, score_completion


# -----------------------------------------------------------------------------
# palmr.parse_response / format_question

@pytest.mark.parametrize("text, think, answer, well_formed", [
    # well-formed trace
    ("<think>I see 2 circles.</think> The answer is \\boxed{2}.", "I see 2 circles.", "2", True),
    # leading whitespace before <think> is allowed; think and answer are stripped
    ("  \n<think> a </think> \\boxed{ 7 }", "a", "7", True),
    # missing <think>: not well formed, but the boxed answer is still read
    ("I see 2 circles.</think> \\boxed{2}", "", "2", False),
    # no tags at all
    ("The answer is \\boxed{7}", "", "7", False),
    # text before <think>
    ("Sure! <think>a</think> \\boxed{1}", "", "1", False),
    # two </think>
    ("<think>a</think> b </think> \\boxed{1}", "a", "1", False),
    # a second <think> inside the reasoning
    ("<think>a <think> b</think> \\boxed{1}", "a <think> b", "1", False),
    # a second <think> after the reasoning
    ("<think>a</think> <think> \\boxed{1}", "a", "1", False),
    # nested braces inside \boxed
    ("<think>a</think> \\boxed{\\frac{1}{2}}", "a", "\\frac{1}{2}", True),
    # the last \boxed wins
    ("<think>a</think> \\boxed{1} or rather \\boxed{2}", "a", "2", True),
    # unbalanced \boxed{ (cut off): no answer, not well formed
    ("<think>a</think> \\boxed{1", "a", "", False),
    # last \boxed unbalanced after a good one: the cut-off last one wins, no answer
    ("<think>a</think> \\boxed{1} \\boxed{2", "a", "", False),
    # \boxed only inside the reasoning: well formed requires \boxed after </think>
    ("<think>maybe \\boxed{3}</think> done", "maybe \\boxed{3}", "", False),
    # empty \boxed{}: well formed, empty answer (graded wrong below)
    ("<think>a</think> \\boxed{}", "a", "", True),
    # no \boxed at all
    ("<think>a</think> the answer is 3", "a", "", False),
])
def test_parse_response(text, think, answer, well_formed):
    assert parse_response(text) == (think, answer, well_formed)
    assert rewards.format_reward(text) == (1.0 if well_formed else 0.0)


def test_empty_boxed_answer_is_graded_wrong():
    _, answer, well_formed = parse_response("<think>a</think> \\boxed{}")
    assert well_formed and answer == ""
    assert grade_answer(answer, "") is False       # even against an empty gold
    assert grade_answer(answer, "0") is False
    assert grade_answer(answer, "A", ["x", "y"]) is False


@pytest.mark.parametrize("question, choices, expected", [
    # open question: question, then the instruction
    ("  How many circles?  ", None, ["How many circles?", INSTRUCTION]),
    # empty choices behave as an open question
    ("Q?", [], ["Q?", INSTRUCTION]),
    # multiple choice: lettered options between question and instruction
    ("How many red shapes?", ["0", "1", "4"], ["How many red shapes?", "A. 0", "B. 1", "C. 4", INSTRUCTION]),
])
def test_format_question(question, choices, expected):
    text = format_question(question, choices)
    assert text.split("\n") == expected
    assert "<think>" in text and "\\boxed{}" in text


# -----------------------------------------------------------------------------
# rewards.grade_answer

CH = ["17", "42", "3", "5"]  # option B is "42"


@pytest.mark.parametrize("pred, gold, choices, expected", [
    # letter vs letter
    ("B", "B", CH, True),
    # lower-case letter
    ("b", "B", CH, True),
    # parenthesised letter
    ("(B)", "B", CH, True),
    # letter with a trailing period
    ("B.", "B", CH, True),
    # letter followed by the option text
    ("B. 42", "B", CH, True),
    # option text against a gold letter
    ("42", "B", CH, True),
    # gold given as option text, pred a letter
    ("B", "42", CH, True),
    # gold given as option text, pred the same text
    ("42", "42", CH, True),
    # wrong letter
    ("C", "B", CH, False),
    # wrong option text
    ("17", "B", CH, False),
    # a letter beyond the options is not an option
    ("E", "B", CH, False),
    # letter choices over word options
    ("A", "yes", ["yes", "no"], True),
    # yes/no: case and trailing period
    ("Yes.", "yes", None, True),
    # yes/no: upper-case gold
    ("yes", "YES", None, True),
    # yes vs no
    ("yes", "no", None, False),
    # yes/no wrapped in \text{}
    ("\\text{yes}", "yes", None, True),
    # yes/no: a longer sentence is not a yes (no substring matching)
    ("yes, there is", "yes", None, False),
    # integer vs float
    ("3", "3.0", None, True),
    # integer vs a different float
    ("3", "3.5", None, False),
    # trailing period on a number
    ("3.", "3", None, True),
    # negative numbers
    ("-2.50", "-2.5", None, True),
    # thousands separator
    ("1,000", "1000", None, True),
    # thousands separator: a different number
    ("1,000", "1", None, False),
    # fraction vs decimal
    ("3/4", "0.75", None, True),
    # LaTeX fraction vs decimal
    ("\\frac{3}{4}", "0.75", None, True),
    # decimal vs LaTeX fraction (gold side)
    ("0.5", "\\frac{1}{2}", None, True),
    # fraction vs a different decimal
    ("3/4", "0.7", None, False),
    # LaTeX equivalence (math-verify): root vs power
    ("\\sqrt{2}", "2^{1/2}", None, True),
    # LaTeX equivalence (math-verify): commuted sum
    ("x+1", "1+x", None, True),
    # LaTeX non-equivalence (math-verify)
    ("x+2", "1+x", None, False),
    # pi is not 3.14
    ("\\pi", "3.14", None, False),
    # dollar-wrapped number
    ("$5$", "5", None, True),
    # number words are not digits
    ("one", "1", None, False),
    # empty answer
    ("", "5", None, False),
    # whitespace-only answer
    ("   ", "5", None, False),
    # whitespace-only answer against yes/no
    (" \n", "no", None, False),
    # whitespace-only answer with choices
    ("  ", "B", CH, False),
    # None pred (no boxed answer)
    (None, "5", None, False),
    # None pred with choices
    (None, "B", CH, False),
])
def test_grade_answer(pred, gold, choices, expected):
    assert grade_answer(pred, gold, choices) is expected


# -----------------------------------------------------------------------------
# rewards.fuse / score_completion

FUSE_CASES = [  # (scheme, s_fmt, s_ans, s_vis, r_cov, expected)
    # palmr: everything right
    ("palmr", 1, 1, 1, 0.0, 1.0),
    # palmr gating: a hallucinating rollout gets 0 even with the right answer
    ("palmr", 1, 1, 0, 0.0, 0.0),
    # palmr: faithful, wrong answer, good format
    ("palmr", 1, 0, 1, 0.0, 0.1),
    # palmr: faithful, right answer, bad format
    ("palmr", 0, 1, 1, 0.0, 0.9),
    # palmr ignores r_cov
    ("palmr", 1, 1, 1, 1.0, 1.0),
    # pearl: no checklist pass rate given (s_perc 0) fails the gate whatever the answer (gate cases: test_pearl)
    ("pearl", 1, 1, 1, 0.0, 0.0),
    # vicrit: its own outcome reward (s_ans is the corrupted-phrase match: test_judge_bench), s_vis ignored
    ("vicrit", 1, 1, 0, 0.0, 1.0),
    # grpo: outcome only, s_vis ignored
    ("grpo", 1, 1, 0, 0.0, 1.0),
    # grpo: format only
    ("grpo", 1, 0, 1, 0.0, 0.1),
    # bonus: additive vision bonus
    ("bonus", 1, 1, 1, 0.0, 1.5),
    # bonus: vision alone
    ("bonus", 0, 0, 1, 0.0, 0.5),
    # bonus: no vision, right answer
    ("bonus", 1, 1, 0, 0.0, 1.0),
    # mix: all parts
    ("mix", 1, 1, 1, 0.0, 1.0),
    # mix: answer weight 0.2
    ("mix", 0, 1, 0, 0.0, 0.2),
    # mix: vision weight 0.7
    ("mix", 0, 0, 1, 0.0, 0.7),
    # mix: format weight 0.1
    ("mix", 1, 0, 0, 0.0, 0.1),
    # perception_r1: coverage weight 0.7, s_vis ignored
    ("perception_r1", 1, 1, 0, 0.5, 1.35),
    # perception_r1: coverage alone
    ("perception_r1", 0, 0, 1, 1.0, 0.7),
    # vision_sr1 without its self-reward (s_self 0): outcome only, s_vis and r_cov ignored (tests/test_vision_sr1.py
    # has the self-reward's hand values)
    ("vision_sr1", 1, 1, 0, 1.0, 1.0),
]


@pytest.mark.parametrize("scheme, s_fmt, s_ans, s_vis, r_cov, expected", FUSE_CASES)
def test_fuse_hand_values(scheme, s_fmt, s_ans, s_vis, r_cov, expected):
    assert fuse(scheme, s_fmt, s_ans, s_vis, r_cov) == pytest.approx(expected)


def test_fuse_table_covers_every_scheme():
    assert {c[0] for c in FUSE_CASES} == set(SCHEMES)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fuse_reads_vis_and_cov_as_declared(scheme):
    # NEEDS_VIS / NEEDS_COV tell the trainer which judge calls to make: they must match the arithmetic
    vis_matters = fuse(scheme, 1, 1, 0.0, 0.0) != fuse(scheme, 1, 1, 1.0, 0.0)
    cov_matters = fuse(scheme, 1, 1, 1.0, 0.0) != fuse(scheme, 1, 1, 1.0, 1.0)
    assert vis_matters == (scheme in rewards.NEEDS_VIS)
    assert cov_matters == (scheme in rewards.NEEDS_COV)


@pytest.mark.parametrize("scheme", ["nope", "", "PALMR"])
def test_fuse_unknown_scheme_raises(scheme):
    with pytest.raises(ValueError, match="unknown reward scheme"):
        fuse(scheme, 1, 1, 1)


GOOD = "<think>I see 2 red circles.</think> The answer is \\boxed{2}."


@pytest.mark.parametrize("scheme, text, gold, choices, s_vis, r_cov, total, parts", [
    # palmr, all right
    ("palmr", GOOD, "2", None, 1.0, 0.0, 1.0, {"fmt": 1.0, "ans": 1.0, "vis": 1.0, "cov": 0.0}),
    # palmr gate: right answer, hallucinated reasoning
    ("palmr", GOOD, "2", None, 0.0, 0.0, 0.0, {"fmt": 1.0, "ans": 1.0, "vis": 0.0, "cov": 0.0}),
    # palmr: wrong answer
    ("palmr", GOOD, "3", None, 1.0, 0.0, 0.1, {"fmt": 1.0, "ans": 0.0, "vis": 1.0, "cov": 0.0}),
    # grpo: no <think>, right answer
    ("grpo", "\\boxed{2}", "2", None, 1.0, 0.0, 0.9, {"fmt": 0.0, "ans": 1.0, "vis": 1.0, "cov": 0.0}),
    # bonus: right letter with choices
    ("bonus", "<think>x</think> \\boxed{B}", "B", ["1", "2"], 1.0, 0.0, 1.5,
     {"fmt": 1.0, "ans": 1.0, "vis": 1.0, "cov": 0.0}),
    # mix: empty boxed answer
    ("mix", "<think>x</think> \\boxed{}", "2", None, 1.0, 0.0, 0.8, {"fmt": 1.0, "ans": 0.0, "vis": 1.0, "cov": 0.0}),
    # perception_r1: coverage counts
    ("perception_r1", GOOD, "2", None, 0.0, 0.5, 1.35, {"fmt": 1.0, "ans": 1.0, "vis": 0.0, "cov": 0.5}),
])
def test_score_completion(scheme, text, gold, choices, s_vis, r_cov, total, parts):
    got_total, got_parts = score_completion(scheme, text, gold, choices, s_vis=s_vis, r_cov=r_cov)
    assert got_total == pytest.approx(total)
    assert got_parts == parts
    assert all(isinstance(v, float) for v in got_parts.values())


# -----------------------------------------------------------------------------
# judge: claims, RuleJudge.judge, RuleJudge.coverage

FACTS = {"objects": [
    {"name": "circle", "count": 2, "attributes": ["red"], "location": ["top left", "top right"]},
    {"name": "square", "count": 1, "attributes": ["blue"], "location": ["middle centre"]},
]}  # 3 shapes: 2 red circles, 1 blue square


def trace(reasoning, answer="1"):
    return f"<think>{reasoning}</think> The answer is \\boxed{{{answer}}}."


@pytest.mark.parametrize("text, expected", [
    # number word + colour + plural kind
    ("two red circles", [(2, "red", "circle")]),
    # digits, total over shapes (kind None)
    ("3 shapes", [(3, None, None)]),
    # "no" is a count of 0
    ("no green square", [(0, "green", "square")]),
    # "zero" and "one", no colour
    ("zero squares and one circle", [(0, None, "square"), (1, None, "circle")]),
    # "an" is an existence claim (count None)
    ("an orange star", [(None, "orange", "star")]),
    # "a" is an existence claim
    ("There is a blue triangle.", [(None, "blue", "triangle")]),
    # case-insensitive
    ("Ten Blue Triangles", [(10, "blue", "triangle")]),
    # multi-digit count
    ("12 circles", [(12, None, "circle")]),
    # several claims in order
    ("I see 1 red circle, 2 blue squares and 4 yellow stars.",
     [(1, "red", "circle"), (2, "blue", "square"), (4, "yellow", "star")]),
    # no perception claims
    ("I think the answer is 3.", []),
    # "one of the" is not a count claim
    ("one of the circles", []),
    # a located claim names one grid cell ("center" is read as "centre")
    ("I see a red circle at top left and a blue square in the middle center.",
     [(None, "red", "circle", "top left"), (None, "blue", "square", "middle centre")]),
    # "at" without a cell is no location
    ("a red circle at last", [(None, "red", "circle")]),
])
def test_claims(text, expected):
    found = claims(text)
    assert [c._replace(span=None) for c in found] == [judge.Claim(*e) for e in expected]
    for c in found:  # each claim's span is exactly its own text
        assert [d._replace(span=None) for d in claims(text[c.span[0]:c.span[1]])] == [c._replace(span=None)]


@pytest.mark.parametrize("candidate, reference, s_vis", [
    # faithful trace
    (trace("I see 2 red circles and 1 blue square."), None, 1.0),
    # faithful with number words and a total
    (trace("There are two red circles, one blue square, 3 shapes in all."), None, 1.0),
    # wrong count: 3 red circles when 2
    (trace("I see 3 red circles."), None, 0.0),
    # absent colour/kind: a blue triangle when none
    (trace("There is a blue triangle."), None, 0.0),
    # absent colour of a present kind
    (trace("There is a green circle."), None, 0.0),
    # correct negative: no green square when there is none
    (trace("There is no green square."), None, 1.0),
    # wrong negative: no red circles when there are 2
    (trace("There are no red circles."), None, 0.0),
    # wrong total
    (trace("I see 2 shapes."), None, 0.0),
    # right total
    (trace("I see 3 shapes."), None, 1.0),
    # kind count without colour
    (trace("I see 2 circles and 1 square."), None, 1.0),
    # no perception claims at all
    (trace("The answer must be 1."), None, 1.0),
    # a faithful reference does not excuse a contradiction
    (trace("I see 3 red circles."), trace("I see 2 red circles."), 0.0),
    # pairwise: reference has 1 contradiction, candidate 1: not gated
    (trace("I see 3 red circles."), trace("I see 4 shapes."), 1.0),
    # pairwise: reference has 1 contradiction, candidate 2: gated
    (trace("I see 3 red circles and a blue triangle."), trace("I see 4 shapes."), 0.0),
    # pairwise: candidate better than a bad reference
    (trace("I see 2 red circles."), trace("I see 4 shapes and a green star."), 1.0),
    # malformed candidate: the whole text is judged
    ("I see 5 red circles. \\boxed{5}", None, 0.0),
    # located claims, every cell right (the shapes reference format)
    (trace("I see a red circle at top left, a red circle at top right and a blue square at middle centre."),
     None, 1.0),
    # a present kind and colour in the wrong cell is a misread
    (trace("I see a blue square at top left."), None, 0.0),
    # another colour in a right cell
    (trace("I see a red circle at top left and a blue circle at top right."), None, 0.0),
])
def test_rule_judge(candidate, reference, s_vis):
    [v] = RuleJudge().judge([JudgeItem("How many circles?", FACTS, candidate, reference)])
    assert v.s_vis == s_vis
    assert v.failed is False
    assert bool(v.reason) == bool(contradictions(candidate, FACTS))  # a reason names each contradiction


def test_rule_judge_judges_reasoning_not_answer():
    # a well-formed trace is judged on its <think> part only
    text = "<think>I see 2 red circles.</think> So \\boxed{3 red circles}"
    assert contradictions(text, FACTS) == []
    text = "<think>I see 3 red circles.</think> \\boxed{3}"
    [(claim, n)] = contradictions(text, FACTS)
    assert (claim[:4], n) == ((3, "red", "circle", None), 2) and text[slice(*claim.span)] == "3 red circles"


@pytest.mark.parametrize("facts", [
    None,  # missing facts
    {},    # empty facts
])
def test_rule_judge_without_facts_fails_open(facts):
    [v] = RuleJudge().judge([JudgeItem("q", facts, trace("I see 9 purple stars."), None)])
    assert v.failed is True
    assert v.s_vis == 1.0  # a failure is "no preference"


def test_rule_judge_batch_keeps_order():
    items = [JudgeItem("q", FACTS, trace(t), None) for t in ("3 red circles", "2 red circles", "a blue star")]
    assert [v.s_vis for v in RuleJudge().judge(items)] == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("candidate, facts, expected", [
    # both groups stated with the right count
    (trace("I see 2 red circles and 1 blue square."), FACTS, 1.0),
    # 1 of 2 groups stated correctly
    (trace("I see two red circles."), FACTS, 0.5),
    # the other group, by number word
    (trace("I see one blue square."), FACTS, 0.5),
    # right group, wrong count
    (trace("I see 3 red circles and 1 blue square."), FACTS, 0.5),
    # only totals and kinds without colour: no group stated
    (trace("I see 3 shapes."), FACTS, 0.0),
    # "a blue square" states the group of one blue square (1 of 2 groups)
    (trace("There is a blue square."), FACTS, 0.5),
    # "a red circle" does not state the group of two red circles
    (trace("There is a red circle."), FACTS, 0.0),
    # no claims
    (trace("No idea."), FACTS, 0.0),
    # located claims add up to groups: two red circles in two cells, and the blue square
    (trace("I see a red circle at top left, a red circle at top right and a blue square at middle centre."),
     FACTS, 1.0),
    # one red circle located: the group of two is not stated
    (trace("I see a red circle at top left and a blue square at middle centre."), FACTS, 0.5),
    # malformed candidate: the whole text is read
    ("I see 2 red circles and 1 blue square. \\boxed{3}", FACTS, 1.0),
    # no facts
    (trace("I see 2 red circles."), None, 0.0),
    # facts with no objects
    (trace("I see 2 red circles."), {"objects": []}, 0.0),
])
def test_rule_coverage(candidate, facts, expected):
    assert RuleJudge().coverage([JudgeItem("q", facts, candidate, None)]) == [pytest.approx(expected)]


def test_rule_coverage_attribute_case():
    # regression: coverage once compared fact attributes case-sensitively, unlike contradictions()
    facts = {"objects": [{"name": "circle", "count": 2, "attributes": ["Red"], "location": []}]}
    candidate = trace("I see 2 red circles.")
    assert contradictions(candidate, facts) == []   # the judge reads "Red" as red ...
    assert RuleJudge().coverage([JudgeItem("q", facts, candidate, None)]) == [1.0]  # ... coverage should too


@pytest.mark.parametrize("name", ["nope", "", "RULE"])
def test_make_judge_unknown_raises(name):
    with pytest.raises(ValueError, match="unknown judge"):
        judge.make_judge(name)


def test_make_judge_rule():
    assert isinstance(judge.make_judge("rule"), RuleJudge)


# -----------------------------------------------------------------------------
# data: Sample, JSONL, images

BASE = {"id": "x1", "image": "img.png", "question": "How many?", "answer": "2"}


def test_sample_from_dict_keeps_unknown_keys_in_meta():
    s = Sample.from_dict({**BASE, "difficulty": 3, "meta": {"origin": "mine"}, "source": "s/t"})
    assert s.meta == {"origin": "mine", "difficulty": 3}
    assert s.source == "s/t"
    assert not hasattr(s, "difficulty")


def test_sample_from_dict_stringifies_id_and_answer():
    s = Sample.from_dict({**BASE, "id": 7, "answer": 0})
    assert (s.id, s.answer) == ("7", "0")


@pytest.mark.parametrize("drop, blank, missing", [
    # one field absent
    (["answer"], [], ["answer"]),
    # two fields absent
    (["id", "image"], [], ["id", "image"]),
    # an empty string counts as missing
    ([], ["question"], ["question"]),
    # None counts as missing
    ([], ["answer", "id"], ["id", "answer"]),
])
def test_sample_from_dict_missing_fields(drop, blank, missing):
    d = {k: v for k, v in BASE.items() if k not in drop}
    d.update({k: ("" if k == "question" else None) for k in blank})
    with pytest.raises(ValueError) as e:
        Sample.from_dict(d)
    for name in missing:
        assert repr(name) in str(e.value)
    for name in set(BASE) - set(missing):
        assert repr(name) not in str(e.value)


def test_jsonl_round_trip(tmp_path):
    (tmp_path / "images").mkdir()
    inside = tmp_path / "images" / "a.png"
    outside = tmp_path.parent / "elsewhere.png"  # not under the dataset folder: stays absolute
    samples = [
        Sample("a", str(inside), "Q1?", "yes", choices=None, source="s/1",
               facts={"objects": [{"name": "circle", "count": 1, "attributes": ["red"], "location": []}]},
               reference="<think>x</think> \\boxed{yes}", meta={"k": [1, 2]}),
        Sample("b", str(outside), "Q2?", "B", choices=["1", "2"], source="s/2"),
    ]
    path = tmp_path / "train.jsonl"
    write_jsonl(path, samples)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["image"] == "images/a.png"       # stored relative
    assert rows[1]["image"] == str(outside)         # outside the folder: absolute
    assert not (tmp_path / "train.jsonl.tmp").exists()
    errors = []
    back = read_jsonl(path, errors)
    assert errors == []
    assert back[0].image == str(inside.resolve())   # read back absolute
    assert [s.to_dict() for s in back] == [s.to_dict() for s in samples]


def test_read_jsonl_skips_and_reports_bad_rows(tmp_path):
    good = lambda i: json.dumps({**BASE, "id": f"g{i}", "image": f"i{i}.png"})
    lines = [
        good(1),                                   # line 1: good
        "{not json",                               # line 2: invalid JSON
        json.dumps({**BASE, "id": "m", "answer": None}),  # line 3: missing answer
        "",                                        # line 4: blank, silently skipped
        good(1),                                   # line 5: duplicate id
        json.dumps([BASE]),                        # line 6: a JSON list, not an object
        good(2),                                   # line 7: good
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    errors = []
    samples = read_jsonl(path, errors)
    assert [s.id for s in samples] == ["g1", "g2"]
    assert all(s.image == str((tmp_path / f"i{i}.png").resolve()) for i, s in zip((1, 2), samples))
    assert len(errors) == 4
    expected = [(2, None), (3, "answer"), (5, "duplicate id"), (6, "not a JSON object")]
    for msg, (lineno, cause) in zip(errors, expected):
        assert f"{path}:{lineno} " in msg
        assert cause is None or cause in msg
    assert "(id m)" in errors[1] and "(id g1)" in errors[2]


@pytest.mark.parametrize("content", [
    b"definitely not a png",                 # garbage bytes
    b"\x89PNG\r\n\x1a\n" + b"\x00" * 20,     # PNG signature, broken body
    None,                                    # missing file
])
def test_load_image_bad_file_names_item(tmp_path, content):
    path = tmp_path / "bad.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="item bad-item-7"):
        load_image(Sample("bad-item-7", str(path), "q", "a"))


# -----------------------------------------------------------------------------
# data: the synthetic shapes task

@pytest.fixture(scope="module")
def shapes40(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes40")
    path = make_shapes(n=40, out_dir=out, seed=0)
    errors = []
    samples = read_jsonl(path, errors)
    assert errors == []
    return out, path, samples


def test_make_shapes_rows_and_images(shapes40):
    out, path, samples = shapes40
    assert len(samples) == 40
    assert len({s.id for s in samples}) == 40
    assert len(list((out / "images" / "train").glob("*.png"))) == 40
    for s in samples[:5]:
        assert load_image(s).size == (84, 84)  # one 28-px vision token per grid cell


def test_make_shapes_sources(shapes40):
    _, _, samples = shapes40
    assert {s.source for s in samples} == {"shapes/count", "shapes/exists", "shapes/compare", "shapes/choice"}
    for s in samples:  # choices exactly on the multiple-choice questions
        assert (s.choices is not None) == (s.source == "shapes/choice")


def test_make_shapes_facts_match_objects(shapes40):
    _, _, samples = shapes40
    for s in samples:
        objects = s.meta["objects"]
        assert sum(o["count"] for o in s.facts["objects"]) == len(objects), s.id
        assert s.facts["global"]["total_objects"] == len(objects), s.id
        for g in s.facts["objects"]:
            n = sum(o["kind"] == g["name"] and o["color"] == g["attributes"][0] for o in objects)
            assert g["count"] == n == len(g["location"]), s.id


def test_make_shapes_references_are_faithful(shapes40):
    _, _, samples = shapes40
    rj = RuleJudge()
    # judged alone (reference None) so that the reference cannot excuse its own contradictions
    verdicts = rj.judge([JudgeItem(s.question, s.facts, s.reference, None) for s in samples])
    assert [v.s_vis for v in verdicts] == [1.0] * 40
    assert all(not v.failed for v in verdicts)
    assert all(contradictions(s.reference, s.facts) == [] for s in samples)
    assert rj.coverage([JudgeItem(s.question, s.facts, s.reference, None) for s in samples]) == [1.0] * 40


def test_hallucinated_trace_keeps_the_answer_and_is_gated(shapes40):
    # the check above is not vacuous: one misread object (data.hallucinated_trace, the warm-up's
    # controlled hallucination) keeps the answer, is one contradiction, and makes the judge prefer the reference
    _, _, samples = shapes40
    rng, items = random.Random(0), []
    for s in samples:
        bad = hallucinated_trace(s, rng)
        assert bad != s.reference and parse_response(bad)[1] == s.answer, s.id
        [(claim, n)] = contradictions(bad, s.facts)
        assert claim.count != n, s.id  # a group the scene does not hold, or a wrong count
        items.append(JudgeItem(s.question, s.facts, bad, s.reference))
    assert [v.s_vis for v in RuleJudge().judge(items)] == [0.0] * 40


def test_make_shapes_reference_answers_grade_correct(shapes40):
    _, _, samples = shapes40
    for s in samples:
        _, answer, well_formed = parse_response(s.reference)
        assert well_formed, s.id
        assert answer == s.answer, s.id
        assert grade_answer(answer, s.answer, s.choices), s.id
        total, parts = score_completion("palmr", s.reference, s.answer, s.choices)
        assert total == pytest.approx(1.0) and parts["ans"] == 1.0, s.id


def test_make_shapes_deterministic(tmp_path, shapes40):
    _, path, _ = shapes40
    again = make_shapes(n=40, out_dir=tmp_path / "again", seed=0)
    assert open(again).read() == open(path).read()
    other = make_shapes(n=40, out_dir=tmp_path / "other", seed=1)
    assert open(other).read() != open(path).read()  # the seed matters
