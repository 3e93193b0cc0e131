"""Judge pairs without human labels (pairs.py): SceneAlign-style perturbations of reference traces, the
labelled pairs and their summary, the optional LLM rewriter, and the `python pairs.py` CLI."""
import json
import random
import re

import pytest

import data
import judge
import pairs
from chat_server import ChatServer
from data import Sample


def obj(name, count, attributes, location=()):
    return {"name": name, "count": count, "attributes": list(attributes), "location": list(location)}


SHAPES = {"objects": [obj("circle", 2, ["red"], ["top left", "top right"]), obj("square", 1, ["blue"], ["middle centre"])],
          "relations": [], "text": [], "global": {"scene": "synthetic shapes"}}
REF = "<think>I see 2 red circles and 1 blue square. So there are 2 circles.</think> The answer is \\boxed{2}."
Q = "How many circles are there?"


def variant(kind, reference=REF, facts=SHAPES, question=Q, seed=0):
    return pairs.perturb(kind, reference, facts, question, random.Random(seed))


def test_perturbations_on_shapes_by_hand():
    # hallucinated entity: an absent group named by neither the facts nor the question, into the list
    cand, detail = variant("hallucinated_entity")
    m = re.fullmatch(r"<think>I see 2 red circles, 1 blue square and 1 (\w+) (\w+)\. So there are 2 "
                                   r"circles\.</think> The answer is \\boxed\{2\}\.", cand)
    assert m and m.group(2) in ("square", "triangle") and (m.group(1), m.group(2)) != ("blue", "square")
    assert detail == f"added 1 {m.group(1)} {m.group(2)}"
    # misgrounded: the square (the question names circles) takes a colour no square has
    cand, detail = variant("misgrounded")
    new = detail.split(" -> ")[1].split()[0]
    assert new in ("red", "green", "yellow") and cand == REF.replace("1 blue square", f"1 {new} square")
    # skipped step: the observation is left out
    assert variant("skipped_step")[0] == "<think>So there are 2 circles.</think> The answer is \\boxed{2}."
    # over-specified: a detail no entry has, before the first colour mention of the entry not asked about
    cand, detail = variant("over_specified")
    word = detail.split(" -> ")[1].split()[0]
    assert word in pairs.DETAILS and cand == REF.replace("1 blue square", f"1 {word} blue square")
    # faithful: reworded, and the observation list rotated
    assert variant("paraphrase")[0] == ("<think>The image shows 2 red circles and 1 blue square. That makes 2 "
                                        "circles.</think> The answer is \\boxed{2}.")
    assert variant("reordered")[0] == ("<think>I see 1 blue square and 2 red circles. So there are 2 circles."
                                       "</think> The answer is \\boxed{2}.")


def test_perturbations_that_cannot_apply_say_why():
    one = "<think>I see 2 red circles and 1 blue square.</think> The answer is \\boxed{2}."
    assert variant("skipped_step", one) == (None, "the rule does not apply to this trace")
    assert variant("reordered", "<think>Two circles.</think> \\boxed{2}") == (None, "the rule does not apply to this trace")
    assert variant("misgrounded", "no think block \\boxed{2}") == (None, "the reference has no <think> block")
    assert variant("paraphrase", REF, {"objects": []}) == (None, "no object entries in the facts")
    with pytest.raises(ValueError, match="unknown variant"):
        variant("typo")


def test_perturbations_on_real_facts():
    facts = {"objects": [obj("bus", 1, ["red", "double-decker"]), obj("dog", 1, ["brown"])],
             "relations": ["the dog is left of the bus"], "text": ["STOP"]}
    ref = "<think>A red double-decker bus is on the road. The dog is to the left of the bus.</think> \\boxed{red}"
    q = "What colour is the bus?"
    cand, detail = variant("hallucinated_entity", ref, facts, q)
    added = detail.split("added a ")[1]
    assert cand == ref.replace("road. ", f"road. There is also a {added}. ") and added.split()[1] in pairs.DISTRACTORS
    # the bus is named by the question, so the dog's colour would be changed first; the trace never says
    # "brown dog", so the bus's colour changes
    cand, detail = variant("misgrounded", ref, facts, q)
    assert detail.startswith("red bus -> ") and cand == ref.replace("red double", detail.split()[-2] + " double")
    # no colour mention at all: a spatial word of a relation flips
    plain = "<think>A bus is on the road. The dog is to the left of the bus.</think> \\boxed{red}"
    assert variant("misgrounded", plain, facts, q) == (plain.replace("left", "right"), "left -> right")
    assert variant("over_specified", plain, facts, q) == (None, "the rule does not apply to this trace")


def _samples(tmp_path):
    return [Sample(id="a", image="a.png", question=Q, answer="2", facts=SHAPES, reference=REF),
            Sample(id="b", image="b.png", question=Q, answer="2", facts=SHAPES,
                   reference="<think>I see 2 red circles and 1 blue square.</think> The answer is \\boxed{2}."),
            Sample(id="c", image="c.png", question=Q, answer="2", facts=None, reference=REF)]


def test_make_pairs_labels_and_summary(tmp_path):
    made, summary = pairs.make_pairs(_samples(tmp_path), seed=3)
    again, _ = pairs.make_pairs(_samples(tmp_path), seed=3)
    assert made == again, "deterministic per (seed, id)"
    by_id = {p["id"]: p for p in made}
    assert by_id["a:misgrounded"]["label"] == "reference" and by_id["a:misgrounded"]["error_type"] == "misgrounded"
    assert by_id["a:paraphrase"]["label"] == "tie" and by_id["a:paraphrase"]["error_type"] == "faithful"
    assert all(p["reference"] != p["candidate"] and p["made_by"] == "rule" for p in made)
    assert len(made) == 6 + 5  # b has no second sentence to skip
    assert summary["skipped_step"] == {"made": 1, "rewritten": 0, "rewriter_failed": 0,
                                       "skipped": {"no facts": 1, "the rule does not apply to this trace": 1}}


def test_rewriter_fills_gaps_and_its_failures_are_counted(tmp_path):
    def reply(messages):
        text = messages[-1]["content"]
        ref = text.split("[Response]\n")[1].split("\n[End of Response]")[0]
        if "leaves out one step" in text:  # a good rewrite
            return ref.replace("I see 2 red circles and ", "I see ")
        return ref.replace("\\boxed{2}", "\\boxed{3}")  # changes the answer: must be rejected
    server = ChatServer(reply=reply)
    try:
        client = judge.OpenAIClient(server.base_url, "rewriter", concurrency=4, timeout=5, max_retries=0)
        one = _samples(tmp_path)[1]  # one sentence: the rule cannot skip a step, but can reword it
        made, summary = pairs.make_pairs([one], rewriter=client, kinds=("skipped_step", "paraphrase"))
        assert [(p["variant"], p["made_by"]) for p in made] == [("paraphrase", "rule"), ("skipped_step", "llm")]
        assert made[1]["candidate"] == "<think>I see 1 blue square.</think> The answer is \\boxed{2}."
        assert made[1]["label"] == "reference" and summary["skipped_step"]["rewritten"] == 1
        # no colour, no relation, no list: the rule makes nothing; a rewrite that changes the answer is refused
        bare = Sample(id="x", image="x.png", question="q", answer="2", facts=SHAPES, reference="<think>Two.</think> \\boxed{2}")
        made, summary = pairs.make_pairs([bare], rewriter=client, kinds=("misgrounded",))
        assert made == [] and summary["misgrounded"]["rewriter_failed"] == 1
        assert "changed the answer" in next(iter(summary["misgrounded"]["skipped"]))
        # a server error is counted with its cause, and the item is skipped
        server.inject("says exactly the same", "500")
        made, summary = pairs.make_pairs([bare], rewriter=client, kinds=("paraphrase",))
        assert made == [] and summary["paraphrase"]["rewriter_failed"] == 1
        assert "HTTP 500" in next(iter(summary["paraphrase"]["skipped"]))
    finally:
        server.close()


def test_pairs_cli_writes_pairs_and_summary(tmp_path):
    src = data.make_shapes(6, tmp_path / "s", seed=2)
    with open(src, "a") as f:
        f.write("{not json\n")
    summary = pairs.main(["--in", src, "--out", str(tmp_path / "p.jsonl"), "--variants", "misgrounded,paraphrase"])
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert summary["items"] == 6 and summary["unreadable"] == 1 and summary["pairs"] == len(lines) == 12
    assert json.loads((tmp_path / "p.summary.json").read_text())["variants"]["misgrounded"]["made"] == 6


def test_judge_variants_keep_their_labels_on_real_traces():
    facts = {"objects": [obj("bus", 1, ["gray"]), obj("dog", 1, [])], "relations": [], "text": []}
    ref = "<think>The bus has red and white stripes. A gray bus waits.</think> \\boxed{gray}"
    assert variant("reordered", ref, facts, "q")[0] is None  # "red and white stripes" is not a list of objects
    cand, detail = variant("hallucinated_entity", ref, facts, "q")
    assert cand.startswith("<think>The bus has red and white stripes. There is also a ")  # a sentence, not the list
    for seed in range(20):  # gray and grey are one colour: never the "wrong" colour of each other
        cand, detail = variant("misgrounded", ref, facts, "What colour is it?", seed)
        assert "grey" not in cand and "gray bus ->" in detail
    for seed in range(20):  # the colour the question names is never the new one
        cand, detail = variant("misgrounded", REF, SHAPES, "How many green shapes are there?", seed)
        assert "green" not in detail
