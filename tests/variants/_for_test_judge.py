"""For tests/test_judge.py's owner to merge (the leading underscore keeps pytest from collecting this file): the
judge.py tests of the old tests/test_process_credit.py (issue 14), which test judge.py alone: omissions in the
rule judge's decision, fact coverage, locating wrong claims (rule judge, parse_wrong, locate_quotes,
merge_quotes) and an LLM judge's quotes turned into spans over HTTP. Verbatim, except that the old module's
FACTS / trace() / FULL ... are renamed CREDIT_FACTS / credit_trace() / C_FULL ..., since tests/test_judge.py
has a FACTS and a trace() of its own with other values. Token credit itself (spans -> tokens -> advantages,
the trainer) is in tests/variants/test_token_credit.py.
"""
import json

import pytest

import judge
from chat_server import ChatServer, _block
from judge import JudgeItem

CREDIT_FACTS = {"objects": [{"name": "circle", "count": 2, "attributes": ["red"], "location": []},
                            {"name": "square", "count": 1, "attributes": ["blue"], "location": []}],
                "relations": [], "text": [], "global": {"total_objects": 3}}


def credit_trace(reasoning, answer="2"):
    return f"<think>{reasoning}</think> The answer is \\boxed{{{answer}}}."


C_FULL = credit_trace("I see 2 red circles and 1 blue square.")                    # 0 wrong, covers 2 of 2 groups
C_HALF = credit_trace("I see 2 red circles.")                                       # 0 wrong, covers 1 of 2
C_NOTHING = credit_trace("I count the circles carefully.")                           # 0 wrong, covers 0 of 2
C_WRONG_FULL = credit_trace("I see 2 red circles, 1 blue square and 1 green star.")  # 1 wrong, covers 2 of 2
C_WRONG_HALF = credit_trace("I see 3 red circles and 1 blue square.")               # 1 wrong, covers 1 of 2


# (candidate, reference) -> (S_vis, preference) without and with --judge-omissions, by hand:
# contradictions decide first; with omissions, a lower coverage than the reference's also gates
@pytest.mark.parametrize("candidate, reference, off, on", [
    (C_FULL, C_FULL, (1.0, "tie"), (1.0, "tie")),
    (C_HALF, C_FULL, (1.0, "tie"), (0.0, "reference")),              # says less: gated only with omissions
    (C_NOTHING, C_FULL, (1.0, "tie"), (0.0, "reference")),
    (C_NOTHING, C_WRONG_FULL, (1.0, "candidate"), (0.0, "reference")),  # the say-less hack: fewer errors, less said
    (C_WRONG_FULL, C_FULL, (0.0, "reference"), (0.0, "reference")),
    (C_FULL, C_WRONG_HALF, (1.0, "candidate"), (1.0, "candidate")),
    (C_FULL, C_HALF, (1.0, "tie"), (1.0, "candidate")),              # says more, no more errors
    (C_WRONG_FULL, C_HALF, (0.0, "reference"), (0.0, "reference")),  # more said does not buy an error
])
def test_rule_judge_omissions_table(candidate, reference, off, on):
    for omissions, want in ((False, off), (True, on)):
        v = judge.RuleJudge(omissions=omissions).judge([JudgeItem("How many circles?", CREDIT_FACTS, candidate,
                                                                  reference)])[0]
        assert (v.s_vis, v.preference) == want, (omissions, v)


def test_fact_coverage_by_hand():
    assert [judge.fact_coverage(t, CREDIT_FACTS) for t in (C_FULL, C_HALF, C_NOTHING, C_WRONG_FULL, C_WRONG_HALF)] == \
        [1.0, 0.5, 0.0, 1.0, 0.5]


def test_rule_judge_locates_wrong_claims_exactly():
    cand = credit_trace("First 2 red circles. Then 3 blue squares and a green star.")
    v = judge.RuleJudge().judge([JudgeItem("q", CREDIT_FACTS, cand, C_FULL)])[0]
    assert [cand[a:b] for a, b in v.spans] == ["3 blue squares", "a green star"]
    assert v.s_vis == 0.0 and v.unmatched == 0


def test_omission_sentences_are_in_the_prompts_only_when_asked():
    plain = judge.pairwise_prompt("q", CREDIT_FACTS, C_FULL, C_HALF)
    assert judge.OMISSIONS_PAIRWISE not in plain and "WRONG" not in plain
    assert judge.OMISSIONS_PAIRWISE in judge.pairwise_prompt("q", CREDIT_FACTS, C_FULL, C_HALF, omissions=True)
    assert judge.OMISSIONS_POINTWISE in judge.pointwise_prompt("q", CREDIT_FACTS, C_FULL, omissions=True)
    assert 'WRONG B: "<quote>"' in judge.pairwise_prompt("q", CREDIT_FACTS, C_FULL, C_HALF, locate=True)
    assert judge.pairwise_prompt("q", CREDIT_FACTS, C_FULL, C_HALF, locate=True).endswith("`VERDICT: TIE`.")


def test_parse_wrong_reads_only_the_final_answer():
    reply = ('<think>WRONG A: "a thought, not an answer"</think>\n'
             'WRONG B: "3 red circles"\n- **WRONG A:** \u201c1 green star\u201d\nwrong: "x"\nVERDICT: A')
    assert judge.parse_wrong(reply) == [("B", "3 red circles"), ("A", "1 green star"), (None, "x")]
    assert judge.parse_wrong("<think>no final answer") == []


def test_locate_quotes_verbatim_loose_repeated_and_unmatched():
    text = "I see 3 red  Circles.\nThen 3 red circles again, and a star, a reddish one."
    spans, unmatched = judge.locate_quotes(text, ["3 red circles", "3 red circles", "a moon", "a star"])
    assert [text[a:b] for a, b in spans] == ["3 red circles", "3 red  Circles", "a star"]  # verbatim first
    assert unmatched == 1, "a quote found nowhere is counted, never guessed"
    spans, unmatched = judge.locate_quotes(text, ["red", "red"])  # whole words: never inside "reddish"
    assert [text[a:b] for a, b in spans] == ["red", "red"] and all(a < text.index("reddish") for a, _ in spans)
    assert judge.locate_quotes(text, ["dish"]) == ([], 1)


def test_parse_wrong_edge_lines():
    assert judge.parse_wrong('WRONG A:\nWRONG B: "3 red circles"\nVERDICT: A') == [("B", "3 red circles")]
    assert judge.parse_wrong('`WRONG B: "3 red circles"`\nWRONG A: none\nWRONG: n/a\nVERDICT: A') == [
        ("B", "3 red circles")]


def test_merge_quotes_across_swapped_replies():
    # the same claim named in both orders counts once; a claim named twice in one reply counts twice
    merged = judge.merge_quotes([["3 red circles", "a star", "a star"], ["3 Red  circles", "a star"]])
    assert merged == ["3 red circles", "a star", "a star"]


def _locating_reply(messages):
    """A judge that names the candidate's wrong claims (exactly, by the shapes rule) and one invented quote."""
    text = messages[-1]["content"]
    facts = json.loads(text.split("Image facts (ground truth):\n", 1)[1].split("\n\nQuestion:", 1)[0])
    lines, bad = [], {}
    for letter in "AB":
        body = _block(text, f"Response {letter}")
        wrong = judge.contradictions(body, facts)
        bad[letter] = len(wrong)
        lines += [f'WRONG {letter}: "{body[c.span[0]:c.span[1]]}"' for c, _ in wrong]
    lines.append('WRONG A: "a purple elephant"')  # in neither response
    verdict = "A" if bad["A"] < bad["B"] else "B" if bad["B"] < bad["A"] else "TIE"
    return "<think>checking</think>\n" + "\n".join(lines) + f"\nVERDICT: {verdict}"


@pytest.mark.parametrize("swap", [False, True])
def test_llm_judge_quotes_become_spans_over_http(swap):
    server = ChatServer(reply=_locating_reply)
    try:
        j = judge.make_judge("openai", server.base_url, "m", swap=swap, locate=True, concurrency=4, timeout=5,
                             max_retries=1, backoff=0.01)
        cand = credit_trace("I see 3 red circles and 1 blue square.")
        v = j.judge([JudgeItem("q", CREDIT_FACTS, cand, C_FULL)])[0]
        assert v.s_vis == 0.0 and [cand[a:b] for a, b in v.spans] == ["3 red circles"]
        # the invented quote is counted once per reply whose letter was the candidate's
        assert v.unmatched == (1 if swap else int(_candidate_is_a(j, cand)))
        assert all("WRONG" in r["content"] for r in server.requests), "the prompt asks for the quotes"
    finally:
        server.close()


def _candidate_is_a(j, cand):
    return not j._reference_first(JudgeItem("q", CREDIT_FACTS, cand, C_FULL))
