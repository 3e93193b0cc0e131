"""Process credit (issue 14): omissions in the judge's decision, located errors, per-token advantages."""
import json

import pytest
import torch
from transformers import AutoTokenizer

import grpo
import judge
from chat_server import ChatServer, _block
from judge import JudgeItem

FACTS = {"objects": [{"name": "circle", "count": 2, "attributes": ["red"], "location": []},
                     {"name": "square", "count": 1, "attributes": ["blue"], "location": []}],
         "relations": [], "text": [], "global": {"total_objects": 3}}


def trace(reasoning, answer="2"):
    return f"<think>{reasoning}</think> The answer is \\boxed{{{answer}}}."


FULL = trace("I see 2 red circles and 1 blue square.")                    # 0 wrong, covers 2 of 2 groups
HALF = trace("I see 2 red circles.")                                       # 0 wrong, covers 1 of 2
NOTHING = trace("I count the circles carefully.")                           # 0 wrong, covers 0 of 2
WRONG_FULL = trace("I see 2 red circles, 1 blue square and 1 green star.")  # 1 wrong, covers 2 of 2
WRONG_HALF = trace("I see 3 red circles and 1 blue square.")               # 1 wrong, covers 1 of 2


# (candidate, reference) -> (S_vis, preference) without and with --judge-omissions, by hand:
# contradictions decide first; with omissions, a lower coverage than the reference's also gates
@pytest.mark.parametrize("candidate, reference, off, on", [
    (FULL, FULL, (1.0, "tie"), (1.0, "tie")),
    (HALF, FULL, (1.0, "tie"), (0.0, "reference")),              # says less: gated only with omissions
    (NOTHING, FULL, (1.0, "tie"), (0.0, "reference")),
    (NOTHING, WRONG_FULL, (1.0, "candidate"), (0.0, "reference")),  # the say-less hack: fewer errors, less said
    (WRONG_FULL, FULL, (0.0, "reference"), (0.0, "reference")),
    (FULL, WRONG_HALF, (1.0, "candidate"), (1.0, "candidate")),
    (FULL, HALF, (1.0, "tie"), (1.0, "candidate")),              # says more, no more errors
    (WRONG_FULL, HALF, (0.0, "reference"), (0.0, "reference")),  # more said does not buy an error
])
def test_rule_judge_omissions_table(candidate, reference, off, on):
    for omissions, want in ((False, off), (True, on)):
        v = judge.RuleJudge(omissions=omissions).judge([JudgeItem("How many circles?", FACTS, candidate, reference)])[0]
        assert (v.s_vis, v.preference) == want, (omissions, v)


def test_fact_coverage_by_hand():
    assert [judge.fact_coverage(t, FACTS) for t in (FULL, HALF, NOTHING, WRONG_FULL, WRONG_HALF)] == [1.0, 0.5, 0.0, 1.0, 0.5]


def test_rule_judge_locates_wrong_claims_exactly():
    cand = trace("First 2 red circles. Then 3 blue squares and a green star.")
    v = judge.RuleJudge().judge([JudgeItem("q", FACTS, cand, FULL)])[0]
    assert [cand[a:b] for a, b in v.spans] == ["3 blue squares", "a green star"]
    assert v.s_vis == 0.0 and v.unmatched == 0


def test_omission_sentences_are_in_the_prompts_only_when_asked():
    plain = judge.pairwise_prompt("q", FACTS, FULL, HALF)
    assert judge.OMISSIONS_PAIRWISE not in plain and "WRONG" not in plain
    assert judge.OMISSIONS_PAIRWISE in judge.pairwise_prompt("q", FACTS, FULL, HALF, omissions=True)
    assert judge.OMISSIONS_POINTWISE in judge.pointwise_prompt("q", FACTS, FULL, omissions=True)
    assert 'WRONG B: "<quote>"' in judge.pairwise_prompt("q", FACTS, FULL, HALF, locate=True)
    assert judge.pairwise_prompt("q", FACTS, FULL, HALF, locate=True).endswith("`VERDICT: TIE`.")


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
        cand = trace("I see 3 red circles and 1 blue square.")
        v = j.judge([JudgeItem("q", FACTS, cand, FULL)])[0]
        assert v.s_vis == 0.0 and [cand[a:b] for a, b in v.spans] == ["3 red circles"]
        # the invented quote is counted once per reply whose letter was the candidate's
        assert v.unmatched == (1 if swap else int(_candidate_is_a(j, cand)))
        assert all("WRONG" in r["content"] for r in server.requests), "the prompt asks for the quotes"
    finally:
        server.close()


def _candidate_is_a(j, cand):
    return not j._reference_first(JudgeItem("q", FACTS, cand, FULL))


# -----------------------------------------------------------------------------
# spans -> tokens, per-token advantages and the loss


def test_span_tokens_byte_level_bpe(tiny_ckpt):
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    text = "I see 3 xylophones near 2 red circles, 12\u00b0 apart."  # a rare word, a 2-byte character
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    pieces = [text[a:b] for a, b in offsets]
    start = text.index("xylophones")
    word = [i for i, (a, b) in enumerate(offsets) if a < start + 10 and b > start]  # " x", "y", ... "es"
    assert len(word) >= 3, f"the rare word must split into several tokens: {pieces}"
    assert offsets[word[0]][0] < start, "its first token starts with the space before it: a span cuts it"

    def expected(s, e):  # the fast tokenizer's own offsets as the oracle: tokens that overlap [s, e)
        return [i for i, (a, b) in enumerate(offsets) if a < e and b > s]
    cases = [(start, start + 10), (start + 3, start + 5), (start + 4, start + 4 + 1),  # whole word, cut mid-token
             (text.index("2 red"), text.index(", 12")), (text.index("\u00b0"), text.index("\u00b0") + 1),
             (0, len(text)), (len(text), len(text) + 5)]
    for s, e in cases:
        assert grpo.span_tokens(tok, ids, [(s, e)]) == expected(s, e), (text[s:e], pieces)
    assert grpo.span_tokens(tok, ids, [(start, start + 10)]) == word
    assert grpo.span_tokens(tok, ids, []) == [] and grpo.span_tokens(tok, [], [(0, 3)]) == []
    two = grpo.span_tokens(tok, ids, [(0, 1), (start, start + 2)])
    assert two == sorted(set(expected(0, 1) + expected(start, start + 2)))


def test_token_advantages_by_hand():
    adv = torch.tensor([1.0, -0.2, 0.0, -2.0])
    wrong = torch.tensor([[0, 1, 1], [1, 0, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.float32)
    got = grpo.token_advantages(adv, wrong, c=0.5)
    want = torch.tensor([[1.0, -1.0, -1.0], [-0.5, -0.2, -0.2], [0.0, 0.0, -0.5], [-2.0, -2.0, -2.0]])
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert (got[wrong.bool()] < 0).all(), "a located error never gets a positive advantage"


def test_policy_loss_takes_per_token_advantages():
    # at ratio 1 and beta 0 the loss is -(token-mean of A_t): with A (2, 3) and mask [[1,1,1],[1,0,0]],
    # -(1 - 1 - 1 + -0.5) / 4 = 0.375; a (B,) advantage equals its value on every token
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    a_tok = torch.tensor([[1.0, -1.0, -1.0], [-0.5, 7.0, 7.0]])
    loss, _ = grpo.policy_loss(logp, logp.detach(), None, a_tok, mask, 0.2, 0.28, 0.0)
    assert float(loss) == pytest.approx(0.375)
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g, torch.tensor([[-0.25, 0.25, 0.25], [0.125, 0.0, 0.0]]))
    a_seq = torch.tensor([0.3, -0.6])
    l1, _ = grpo.policy_loss(logp, logp.detach(), None, a_seq, mask, 0.2, 0.28, 0.0)
    l2, _ = grpo.policy_loss(logp, logp.detach(), None, a_seq[:, None].expand(2, 3), mask, 0.2, 0.28, 0.0)
    assert float(l1) == float(l2) == pytest.approx(-(0.3 * 3 - 0.6) / 4)
    # the folded path's closure takes the same (B, T) advantages
    token_loss = grpo.masked_token_loss(None, None, a_tok, mask, 0.2, 0.28, 0.0)
    assert float(token_loss(logp[mask.bool()], 0, 4).sum()) == pytest.approx(0.375)


def test_compute_rewards_returns_spans_in_completion_coordinates():
    import palmr
    from data import Sample
    s = Sample(id="x", image="", question="How many circles?", answer="2", facts=FACTS, reference=FULL)  # noqa
    text = "I see 3 red circles.</think> The answer is \\boxed{2}."
    c = palmr.Completion(token_ids=[1], text=text, logprobs=[0.0], finished=True)
    rewards, parts, stats, spans = grpo.compute_rewards(judge.RuleJudge(), [(s, c)], "palmr", prefill="<think>")
    assert [text[a:b] for a, b in spans[0]] == ["3 red circles"] and float(rewards[0]) == 0.0


@pytest.mark.slow
def test_token_credit_and_omissions_train(tmp_path, tiny_ckpt, shapes_file):
    # two steps with both mechanisms on: the metrics say what was located, and the run resumes with them
    flags = ["--model", tiny_ckpt, "--data", shapes_file, "--out", str(tmp_path), "--rollout-batch", "4",
             "--update-batch", "2", "--group-size", "2", "--max-new-tokens", "16", "--warmup-steps", "0",
             "--credit", "token", "--judge-omissions", "--max-steps", "2", "--save-every", "2"]
    grpo.main(flags)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0.0 <= r["credit/wrong_tokens"] <= 1.0 and 0.0 <= r["credit/located"] <= 1.0
                                  for r in rows)
    args = json.loads((tmp_path / "args.json").read_text())
    assert args["credit"] == "token" and args["judge_omissions"] is True
    assert set(args["versions"]) == {"python", "torch", "transformers", "tokenizers"}
    with pytest.raises(AssertionError, match="credit"):  # a resume must keep the credit scheme
        grpo.main([*flags[:-4], "--credit", "sequence", "--max-steps", "3", "--resume"])
