"""judge.py: the rule judge (claims, contradictions, coverage); verdict parsing, including replies as real
models write them (Qwen3 thinking and non-thinking forms); LLM judging against a real HTTP server on
127.0.0.1 that injects faults (the server's finish_reason matters for cut-off replies); the hf backend on
the tiny model; the start-up probe (check_judge); the agreement CLI; the test server's command line."""
import hashlib
import base64
import json
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import interruptible

import data
import judge
import pairs
from chat_server import ChatServer, _block, perfect_reply
from judge import JudgeItem, RuleJudge, claims, contradictions

ROOT = Path(__file__).resolve().parent.parent


# -----------------------------------------------------------------------------
# the rule judge: claims, RuleJudge.judge, RuleJudge.coverage

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
    j = judge.make_judge("rule")
    assert type(j) is RuleJudge and j.omissions is False
    # it judges as RuleJudge does: a faithful trace passes, a miscount is gated
    items = [JudgeItem("q", FACTS, trace("I see 2 red circles."), None), JudgeItem("q", FACTS, trace("I see 3 red circles."), None)]
    assert [v.s_vis for v in j.judge(items)] == [1.0, 0.0]


# -----------------------------------------------------------------------------
# parsing: verdict and coverage lines

@pytest.mark.parametrize("text,expected", [
    ("Reasoning...\nVERDICT: A", "A"),                                 # plain
    ("<think>I think VERDICT: B</think>\nVERDICT: A", "A"),            # a verdict inside the reasoning is ignored
    ("verdict: b", "B"),                                               # casing
    ("**VERDICT: TIE**", "TIE"),                                       # markdown
    ("VERDICT: A\nwait, no.\nVERDICT: B", "B"),                        # the last verdict wins
    ("Verdict - [A]", "A"),                                            # bracketed
    ("VERDICT: UNFAITHFUL", "UNFAITHFUL"),                             # point-wise
    ("VERDICT: faithful.", "FAITHFUL"),                                # point-wise, lower case, period
    # real replies: Qwen3 with thinking on, served without a reasoning parser: the reasoning block comes back in the text
    ("<think>\nA says 3 circles; the facts say 2. VERDICT: A? no.\n</think>\n\nVERDICT: B", "B"),
    # real replies: Qwen3-Thinking-2507: its template opens <think> in the prompt, so the reply only closes it
    ("A says 3 circles, the facts say 2, so A is worse. VERDICT: A would fit? No.\n</think>\n\n**VERDICT: B**", "B"),
    # real replies: non-thinking (enable_thinking false: the template writes an empty think block into the prompt)
    ("Response A misstates the count of circles.\n\nVERDICT: B", "B"),
    ("**Verdict:** **Response A**", "A"),                              # bold label, "Response A"
    ("Final verdict: [[TIE]]", "TIE"),                                 # double brackets
    ("VERDICT: `B`", "B"),                                             # code span
    ("VERDICT: Response B.", "B"),                                     # "Response B."
    ("So **VERDICT: A** (A matches every count)", "A"),                # bold inside a sentence
    ("VERDICT: A\n\nA is more faithful because it names both squares.", "A"),    # the verdict line ends; prose after
    ("<think>..</think>\nVERDICT: UNFAITHFUL", "UNFAITHFUL"),          # point-wise after reasoning
    ("**VERDICT: FAITHFUL**", "FAITHFUL"),                             # point-wise in bold
    # a padded markdown table made the old pattern backtrack for minutes (n^5 in the run of spaces)
    pytest.param("| Criterion | Verdict" + " " * 5000 + "|\nVERDICT: A", "A", id="padded-table"),
    pytest.param("VERDICT" + " " * 5000 + "x", None, id="padded-no-verdict"),
    # never a verdict
    ("I prefer A.", None),                                             # no verdict line
    ("<think>VERDICT: A ... (cut off)", None),                         # unterminated reasoning only
    ("A says 3 circles, the facts say 2, so VERDICT: A would fit... wait, B also says 3", None),  # mid-thought
    ("<think>A has errors. VERDICT: A", None),                         # reasoning never closed
    ("<think>Both look fine. VERDICT: TIE</think>\n\n", None),         # reasoning, then no final answer
    ("<think>VERDICT: A</think>\nI cannot decide.", None),             # a verdict inside the reasoning only
    ("", None),                                                        # empty reply
    (None, None),                                                      # no reply
])
def test_parse_verdict(text, expected):
    # the verdict is read from the final answer only
    assert judge.parse_verdict(text) == expected


def test_final_answer_follows_the_last_closing_tag():
    assert judge.final_answer("x</think>y</think>z") == "z"
    assert judge.final_answer("<think>open") is None and judge.final_answer("plain") == "plain"


@pytest.mark.parametrize("text,n,expected", [
    ("COVERED: 1, 3", 4, 0.5),
    ("<think>COVERED: 1,2,3,4</think>COVERED: 2", 4, 0.25),   # reasoning ignored
    ("COVERED: none", 3, 0.0),
    ("COVERED: 1, 1, 9", 2, 0.5),                             # duplicates and out-of-range numbers ignored
    ("no line", 3, None),
])
def test_parse_covered(text, n, expected):
    assert judge.parse_covered(text, n) == expected


# -----------------------------------------------------------------------------
# LLM judging against a real HTTP server on 127.0.0.1 (tests/chat_server.py: a perfect judge with faults)

LLM_FACTS = {"objects": [{"name": "circle", "count": 2, "attributes": ["red"], "location": ["top left", "top right"]},
                         {"name": "square", "count": 1, "attributes": ["blue"], "location": ["middle centre"]}],
             "relations": [], "text": [], "global": {"total_objects": 3}}
REFERENCE = "<think>I see 2 red circles and 1 blue square.</think> The answer is \\boxed{2}."
GOOD = trace("I see 2 red circles and 1 blue square. So there are 2 circles.", answer="2")
BAD = trace("I see 3 red circles and 1 blue square. So there are 2 circles.", answer="2")


@pytest.fixture()
def server():
    s = ChatServer(slow_seconds=1.5)
    yield s
    s.close()


def llm_judge(server, **kw):
    opts = dict(concurrency=8, timeout=0.5, max_retries=3, backoff=0.01, max_tokens=256)
    opts.update(kw)
    swap = opts.pop("swap", False)
    protocol = opts.pop("protocol", "pairwise")
    return judge.make_judge("openai", server.base_url, "judge-model", protocol=protocol, swap=swap, **opts)


def spy_on(client):
    """Record what a client is asked and what it answers (the judge's stats are computed from these)."""
    calls = {"requests": [], "replies": []}
    complete = client.complete

    def wrapped(requests):
        replies = complete(requests)
        calls["requests"] += requests
        calls["replies"] += replies
        return replies
    client.complete = wrapped
    return calls


# -----------------------------------------------------------------------------
# protocol

def test_pairwise_verdicts_follow_the_judge_in_both_orders(server):
    items = [JudgeItem(f"How many circles? #{i}", LLM_FACTS, BAD if i % 2 else GOOD, REFERENCE) for i in range(16)]
    verdicts = llm_judge(server).judge(items)
    assert [v.s_vis for v in verdicts] == [0.0 if i % 2 else 1.0 for i in range(16)]
    assert [v.preference for v in verdicts] == ["reference" if i % 2 else "tie" for i in range(16)]
    first = {int(re.search(r"Question: How many circles\? #(\d+)\n", r["content"]).group(1)):
             ("[Response A]\n" + REFERENCE) in r["content"] for r in server.requests}
    # the order is seeded per item (seed 0, question, candidate): a rerun asks the same prompts
    expected = {i: hashlib.sha256(f"0|{it.question}|{it.candidate}".encode()).digest()[0] % 2 == 1
                for i, it in enumerate(items)}
    assert first == expected
    assert sum(expected.values()) == 8, "randomised order puts the reference first for some items, second for others"


def test_swap_defeats_a_position_biased_judge():
    biased = ChatServer(reply=lambda messages: "VERDICT: A")  # always prefers whatever comes first
    try:
        items = [JudgeItem(f"q{i}", LLM_FACTS, GOOD, REFERENCE) for i in range(8)]
        plain = llm_judge(biased).judge(items)
        assert {v.s_vis for v in plain} == {0.0, 1.0}, "without swap the order decides"
        swapped = llm_judge(biased, swap=True).judge(items)
        assert all(v.s_vis == 1.0 and v.preference == "tie" for v in swapped), "with swap the bias cancels out"
        assert biased.count() == 8 + 16
    finally:
        biased.close()


def test_pointwise_and_coverage(server):
    j = llm_judge(server, protocol="pointwise")
    assert [v.s_vis for v in j.judge([JudgeItem("q", LLM_FACTS, GOOD, None), JudgeItem("q", LLM_FACTS, BAD, None)])] == [1.0, 0.0]
    half = trace("I see 1 blue square.", answer="2")
    assert j.coverage([JudgeItem("q", LLM_FACTS, GOOD, None), JudgeItem("q", LLM_FACTS, half, None)]) == [1.0, 0.5]


def test_items_without_reference_fall_back_to_pointwise(server):
    items = [JudgeItem("q", LLM_FACTS, BAD, REFERENCE), JudgeItem("q", LLM_FACTS, BAD, None)]
    assert [v.s_vis for v in llm_judge(server).judge(items)] == [0.0, 0.0]


# -----------------------------------------------------------------------------
# faults: every item gets an answer or a counted failure, order kept, retries bounded

def test_faults_are_retried_and_order_is_kept(server):
    faults = {"#429": ["429", "429"], "#500": ["500"], "#slow": ["slow"], "#drop": ["drop"],
              "#malformed": ["malformed"], "#nocontent": ["nocontent"]}
    for marker, f in faults.items():
        server.inject(marker, *f)
    names = list(faults) + ["#ok"]
    items = [JudgeItem(f"How many circles? {m}", LLM_FACTS, BAD if k % 2 else GOOD, REFERENCE) for k, m in enumerate(names)]
    j = llm_judge(server)
    calls = spy_on(j.client)
    start = time.time()
    verdicts = j.judge(items)
    elapsed = time.time() - start
    assert [v.s_vis for v in verdicts] == [0.0 if k % 2 else 1.0 for k in range(len(names))], "order kept"
    assert not any(v.failed for v in verdicts), [v.reason for v in verdicts]
    for marker, f in faults.items():
        assert server.count(marker) == len(f) + 1, f"{marker}: one request per fault, then success"
    assert j.stats["errors"] == 0 and j.stats["sent"] == len(names)
    # latency: the sum over the replies sent (each its last attempt's time, within the batch's wall time)
    latencies = [r.latency for r in calls["replies"] if not r.cached and r.text is not None]
    assert len(latencies) == len(names) and all(0 < t <= elapsed for t in latencies)
    assert j.stats["latency_sum"] == pytest.approx(sum(latencies))


def test_retries_are_bounded_and_failures_counted(server):
    server.inject("#down", *["500"] * 10)
    server.inject("#garbage", "noverdict")
    items = [JudgeItem("q #down", LLM_FACTS, BAD, REFERENCE), JudgeItem("q #garbage", LLM_FACTS, BAD, REFERENCE),
             JudgeItem("q #fine", LLM_FACTS, BAD, REFERENCE)]
    verdicts = llm_judge(server, max_retries=2).judge(items)
    assert server.count("#down") == 3, "max_retries=2 -> 3 attempts, then give up"
    assert verdicts[0].failed and verdicts[0].s_vis == 1.0 and "HTTP 500" in verdicts[0].reason
    assert verdicts[1].failed and verdicts[1].s_vis == 1.0 and "unparseable" in verdicts[1].reason
    assert not verdicts[2].failed and verdicts[2].s_vis == 0.0


def test_timeouts_exhausted_are_failures(server):
    server.inject("#stuck", "slow", "slow")
    verdicts = llm_judge(server, max_retries=1).judge([JudgeItem("q #stuck", LLM_FACTS, BAD, REFERENCE)])
    assert verdicts[0].failed and "timed out" in verdicts[0].reason.lower() and server.count("#stuck") == 2


def test_cache_prevents_repeat_calls(server):
    j = llm_judge(server)
    items = [JudgeItem("q", LLM_FACTS, BAD, REFERENCE)] * 5 + [JudgeItem("q2", LLM_FACTS, GOOD, REFERENCE)]
    first = j.judge(items)
    assert server.count() == 2, "identical requests in one batch go out once"
    j.stats = {}
    again = j.judge(items)
    assert server.count() == 2 and j.stats["cache_hits"] == 6, "a repeated batch is answered from the cache"
    assert [v.s_vis for v in first] == [v.s_vis for v in again]


def test_api_key_is_sent_but_never_reported(server, monkeypatch):
    monkeypatch.setenv("PALMR_TEST_KEY", "sk-secret-123")
    server.inject("#auth", "401")
    j = judge.make_judge("openai", server.base_url, "m", api_key_env="PALMR_TEST_KEY", max_retries=3, backoff=0.01)
    v = j.judge([JudgeItem("q #auth", LLM_FACTS, GOOD, REFERENCE)])[0]
    assert server.requests[-1]["authorization"] == "Bearer sk-secret-123"
    assert v.failed and "401" in v.reason and "not retried" in v.reason and server.count("#auth") == 1
    assert "sk-secret" not in v.reason and "sk-secret" not in json.dumps(j.stats)


def test_reasoning_switch_reaches_the_server(server):
    llm_judge(server).judge([JudgeItem("q", LLM_FACTS, GOOD, REFERENCE)])
    llm_judge(server, reasoning=False).judge([JudgeItem("q-off", LLM_FACTS, GOOD, REFERENCE)])
    flags = [r["payload"]["chat_template_kwargs"]["enable_thinking"] for r in server.requests]
    assert flags == [True, False]


# -----------------------------------------------------------------------------
# the start-up probe (check_judge): one small request; a dead endpoint stops the run in one line

def test_check_judge_probes_once_and_is_a_no_op_without_a_server(server):
    latency = judge.check_judge(llm_judge(server, max_tokens=4096, reasoning=False))
    assert isinstance(latency, float) and latency > 0
    payload = server.requests[0]["payload"]
    assert server.count() == 1 and payload["max_tokens"] <= 16, "one small request"
    assert payload["chat_template_kwargs"] == {"enable_thinking": False}, "with the judge's own parameters"
    assert judge.check_judge(judge.make_judge("rule")) is None and judge.check_judge(None) is None
    assert server.count() == 1


@pytest.mark.parametrize("fault", ["truncated", "reasoning", "reasoning-new", "noverdict"])
def test_check_judge_passes_a_live_server_whatever_it_answers(server, fault):
    server.inject("", fault)  # "" is in every request: the probe gets the fault
    assert judge.check_judge(llm_judge(server)) > 0 and server.count() == 1


@pytest.mark.parametrize("fault,cause,hint", [
    ("401", "http 401", "is $palmr_test_key set to the server's key?"),
    ("404", "http 404", "does the server serve this model (get /v1/models)?"),
    ("malformed", "malformed reply: jsondecodeerror", ""),
    ("nocontent", "malformed reply: keyerror", ""),
    ("slow", "timed out", "no reply within 0.5 s"),  # the client's timeout (0.5 s) is below the probe's 30 s
    ("drop", "remote end closed connection", ""),
])
def test_check_judge_stops_on_a_dead_endpoint_in_one_line(server, monkeypatch, fault, cause, hint):
    monkeypatch.setenv("PALMR_TEST_KEY", "sk-secret-123")
    server.inject("", fault)
    j = llm_judge(server, api_key_env="PALMR_TEST_KEY", max_retries=4)
    with pytest.raises(SystemExit) as e:
        judge.check_judge(j)
    message = str(e.value)
    assert "\n" not in message and j.client.where in message and "'judge-model'" in message, message
    assert cause in message.lower() and hint in message.lower(), message
    assert "sk-secret" not in message and server.count() == 1, "one probe, not retried, the key never shown"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_judge_names_a_refused_url_without_its_credentials():
    port = _free_port()  # nothing listens there
    with pytest.raises(SystemExit) as e:
        judge.check_judge(judge.make_judge("openai", f"http://127.0.0.1:{port}/v1", "m", backoff=0.01))
    assert f"http://127.0.0.1:{port}/v1/chat/completions" in str(e.value) and "refused" in str(e.value)
    with pytest.raises(SystemExit) as e:
        judge.check_judge(judge.make_judge("openai", f"http://me:pw-secret@127.0.0.1:{port}/v1", "m", backoff=0.01))
    assert f"http://127.0.0.1:{port}/v1" in str(e.value) and "pw-secret" not in str(e.value)


def test_credentials_in_the_url_are_sent_as_basic_auth(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server = ChatServer()  # urllib took "me:pw@127.0.0.1" for a host name: "Name or service not known"
    try:
        url = server.base_url.replace("http://", "http://me:p%40ss@")
        assert judge.check_judge(judge.make_judge("openai", url, "m")) is not None
        assert server.requests[-1]["authorization"] == "Basic " + base64.b64encode(b"me:p@ss").decode()
    finally:
        server.close()


# -----------------------------------------------------------------------------
# cut-off replies from a thinking model: counted failures, not verdicts

REPLY_FACTS = {"objects": [{"name": "circle", "count": 2, "attributes": ["red"], "location": []}]}
REF = "<think>I see 2 red circles.</think> \\boxed{2}"


@pytest.mark.parametrize("fault,reason", [("truncated", "stopped on the token limit"),
                                          # reasoning only, under vLLM's old name and its current one
                                          ("reasoning", "reasoning but no final answer"),
                                          ("reasoning-new", "reasoning but no final answer")])
def test_cut_off_judge_replies_are_counted_failures_not_verdicts(fault, reason):
    server = ChatServer()
    try:
        j = judge.make_judge("openai", server.base_url, "qwen3", max_retries=2, backoff=0.01, timeout=5)
        server.inject("MARK", fault)
        v = j.judge([JudgeItem("MARK How many circles?", REPLY_FACTS, "<think>I see 3 red circles.</think> \\boxed{2}", REF)])[0]
        assert v.failed and reason in v.reason and v.s_vis == 1.0 and v.preference is None
        assert server.count("MARK") == 1, "a reply cut off at temperature 0 is not asked again"
        ok = j.judge([JudgeItem("How many circles?", REPLY_FACTS, "<think>I see 3 red circles.</think> \\boxed{2}", REF)])[0]
        assert not ok.failed and ok.s_vis == 0.0   # the same item, answered: the reference is preferred
    finally:
        server.close()


@pytest.mark.parametrize("fault", ["answer-in-reasoning", "answer-in-reasoning_content", "answer-in-reasoning-empty"])
def test_thinking_off_answer_filed_under_reasoning_is_the_answer(server, fault):
    """Thinking off + a reasoning parser: vLLM files the whole answer under reasoning (issues #19839, #53284)."""
    item = JudgeItem("MARK How many circles?", REPLY_FACTS, "<think>I see 3 red circles.</think> \\boxed{2}", REF)
    server.inject("MARK", fault, fault)
    off = judge.make_judge("openai", server.base_url, "qwen3", reasoning=False, max_retries=2, backoff=0.01, timeout=5)
    v = off.judge([item])[0]
    assert not v.failed and v.s_vis == 0.0 and v.preference == "reference", v.reason
    # thinking on, the same shape is reasoning that never answered: a failure, not asked again
    on = judge.make_judge("openai", server.base_url, "qwen3", max_retries=2, backoff=0.01, timeout=5)
    v = on.judge([item])[0]
    assert v.failed and v.reason == "reasoning but no final answer" and server.count("MARK") == 2


def test_pointwise_truncated_reply_is_a_failure():
    server = ChatServer()
    try:
        j = judge.make_judge("openai", server.base_url, "qwen3", protocol="pointwise", max_retries=0, timeout=5)
        server.inject("MARK", "truncated")
        v = j.judge([JudgeItem("MARK q", REPLY_FACTS, "<think>I see 2 red circles.</think> \\boxed{2}", None)])[0]
        assert v.failed and "token limit" in v.reason
    finally:
        server.close()


# -----------------------------------------------------------------------------
# hf backend, agreement CLI

def test_hf_backend_on_the_tiny_checkpoint(tiny_ckpt):
    j = judge.make_judge("hf", model=tiny_ckpt, max_tokens=8)
    items = [JudgeItem("q", LLM_FACTS, GOOD, REFERENCE), JudgeItem("q", LLM_FACTS, BAD, REFERENCE), JudgeItem("q", LLM_FACTS, GOOD, None)]
    calls = spy_on(j.client)
    verdicts = j.judge(items)
    # a random tiny model writes no verdict: every item is answered, as "no preference" and counted failed
    assert len(verdicts) == 3 and all(v.failed and v.s_vis == 1.0 for v in verdicts)
    # it never stops either: each reply runs to max_tokens (8), and tokens count the prompt and the reply
    assert all("token limit" in v.reason for v in verdicts)
    tok = j.client.tokenizer
    prompt_tokens = sum(len(tok(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False)["input_ids"]) for m in calls["requests"])
    assert len(calls["requests"]) == 3 and j.stats["sent"] == 3 and j.stats["tokens"] == prompt_tokens + 3 * 8
    texts = [r.text for r in j.client.complete([[{"role": "user", "content": "hi"}]] * 2)]
    assert texts[0] is not None and texts[0] == texts[1], "greedy: the same prompt twice, the same reply"


def test_agree_cli_reports_both_protocols(server, tmp_path):
    out = tmp_path / "report.json"
    judge.main(["agree", "--pairs", str(ROOT / "examples" / "judge_pairs.jsonl"), "--backend", "openai",
                "--base-url", server.base_url, "--model", "judge-model", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["n"] == 14 and report["failed"] == 0  # ties are answers ("no preference"), not failures
    assert report["agreement"] == 1.0, "a perfect judge agrees with the hand labels pairwise"
    # point-wise only says faithful / unfaithful per response: between two flawed traces (the last two
    # pairs) it sees no preference, so even a perfect point-wise judge gets those two wrong
    assert report["pointwise_agreement"] == pytest.approx(12 / 14)
    assert [i["pointwise"] for i in report["items"][-2:]] == ["tie", "tie"]


# -----------------------------------------------------------------------------
# Omissions, coverage and located wrong claims (the judge side of process credit; token credit itself:
# tests/variants/test_token_credit.py)

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


# -----------------------------------------------------------------------------
# Judge benchmark without human labels: the per-type gate report (judge.py agree) over pairs.py's pairs

def _shapes_pairs(n=40):
    samples = data.read_jsonl(data.make_shapes(n, Path(tempfile.mkdtemp()), seed=5))
    return pairs.make_pairs(samples, seed=0)[0]


def test_gate_report_rule_judge_by_type():
    pairs = _shapes_pairs()
    report = judge.gate_report({"rule": judge.RuleJudge(), "rule+omissions": judge.RuleJudge(omissions=True)}, pairs)
    rule = report["protocols"]["rule"]["types"]
    # contradictions only: added and recoloured groups are caught, a skipped observation and an unsupported
    # detail are not (no claim is wrong), faithful variants are never gated
    assert rule["hallucinated_entity"]["agreement"] == 1.0 and rule["misgrounded"]["agreement"] == 1.0
    assert rule["skipped_step"]["agreement"] == 0.0 and rule["over_specified"]["agreement"] == 0.0
    assert rule["faithful"]["agreement"] == 1.0 and rule["faithful"]["false_gate"] == 0.0
    assert rule["misgrounded"]["false_gate"] is None and rule["faithful"]["failed"] == 0.0
    omissions = report["protocols"]["rule+omissions"]["types"]
    assert omissions["skipped_step"]["agreement"] > 0.9 and omissions["faithful"]["false_gate"] == 0.0
    n = sum(report["types"].values())
    assert report["n"] == n == len(pairs) and report["types"]["faithful"] > report["types"]["misgrounded"]


def test_agree_cli_per_type_on_a_local_server(tmp_path):
    pairs = _shapes_pairs(12)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    server = ChatServer(reply=perfect_reply)
    try:
        out = tmp_path / "agree.json"
        judge.main(["agree", "--pairs", str(path), "--backend", "openai", "--base-url", server.base_url,
                    "--model", "judge", "--out", str(out), "--timeout", "5"])
    finally:
        server.close()
    report = json.loads(out.read_text())
    gate = report["gate"]["protocols"]
    assert set(gate) == {"pairwise", "pairwise+swap", "pointwise"}
    for name in gate:  # the server judges by contradictions alone, like the rule judge
        types = gate[name]["types"]
        assert types["hallucinated_entity"]["agreement"] == 1.0 and types["misgrounded"]["agreement"] == 1.0
        assert types["skipped_step"]["agreement"] == 0.0 and types["faithful"]["false_gate"] == 0.0
        assert types["faithful"]["failed"] == 0.0 and types["misgrounded"]["tokens_per_item"] > 0
    # swap asks twice per pair: twice the tokens
    assert gate["pairwise+swap"]["overall"]["tokens_per_item"] == pytest.approx(
        2 * gate["pairwise"]["overall"]["tokens_per_item"], rel=0.05)
    from PIL import Image
    assert Image.open(tmp_path / "agree.png").size[0] > 400


def test_agree_cli_stops_on_a_refused_url_before_any_work(tmp_path):
    port, out = _free_port(), tmp_path / "agree.json"
    start = time.time()
    with pytest.raises(SystemExit) as e:
        judge.main(["agree", "--pairs", str(ROOT / "examples" / "judge_pairs.jsonl"), "--backend", "openai",
                    "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "judge", "--out", str(out)])
    message = str(e.value)
    assert "\n" not in message and f"127.0.0.1:{port}/v1" in message and "refused" in message, message
    assert not out.exists() and time.time() - start < 5, "one probe, no retries, no report"


def test_agree_cli_refuses_to_report_when_too_many_judgements_failed(server, tmp_path):
    out = tmp_path / "agree.json"
    argv = ["agree", "--pairs", str(ROOT / "examples" / "judge_pairs.jsonl"), "--backend", "openai", "--base-url",
            server.base_url, "--model", "judge", "--protocols", "pairwise", "--out", str(out)]
    # the first 10 judge requests (the three-way report's pairwise batch of 14) get no verdict line; judgements:
    # 14 pairwise + 28 point-wise (three-way report) + 14 (gate report, pairwise) = 56, and 10/56 > 0.1
    server.inject("Image facts", *["noverdict"] * 10)
    with pytest.raises(SystemExit) as e:
        judge.main(argv)
    assert str(e.value) == ("judge.py agree: 10 of 56 judgements failed (first: unparseable verdict): no agreement "
                            "reported (--max-failed 0.1)")
    assert not out.exists()
    server.inject("Image facts", *["noverdict"] * 10)  # the same again, with a looser threshold: reported
    report = judge.main(argv + ["--max-failed", "0.2"])
    assert report["failed"] == 10 and report["gate"]["failed_count"] == 0 and report["gate"]["judged"] == 14
    assert json.loads(out.read_text())["first_failure"] == "unparseable verdict"


# -----------------------------------------------------------------------------
# tests/chat_server.py's command line: a judge a user without a GPU can start

@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C, kill
def test_chat_server_command_line_judges_until_stopped(stop):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "chat_server.py"), "--port", str(port)],
                            preexec_fn=interruptible,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = select.select([proc.stdout], [], [], 60)[0]  # the import of judge.py (torch) takes seconds
        line = proc.stdout.readline() if ready else ""
        assert line == f"judge test server: http://127.0.0.1:{port}/v1 (model: any name)\n", (line, proc.poll())
        j = judge.make_judge("openai", f"http://127.0.0.1:{port}/v1", "rule", timeout=10, max_retries=0)
        assert judge.check_judge(j) > 0
        verdicts = j.judge([JudgeItem("q", LLM_FACTS, GOOD, REFERENCE), JudgeItem("q", LLM_FACTS, BAD, REFERENCE)])
        assert [(v.failed, v.s_vis) for v in verdicts] == [(False, 1.0), (False, 0.0)], [v.reason for v in verdicts]
    finally:
        proc.send_signal(stop)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0 and "Traceback" not in err and err == "", err


# -----------------------------------------------------------------------------
# several servers of one judge model (issue 27): spread, a dead one skipped, none alive


def _asks(n, tag="q"):
    return [[{"role": "user", "content": f"{tag} {i}"}] for i in range(n)]


def test_requests_are_spread_over_the_endpoints_with_their_own_concurrency():
    a, b = ChatServer(latency=0.2), ChatServer(latency=0.2)
    try:
        client = judge.OpenAIClient(f"{a.base_url}, {b.base_url}", "judge", concurrency=4, timeout=5, max_retries=0,
                                    cache=False)
        assert client.where == f"{a.base_url}/chat/completions, {b.base_url}/chat/completions"
        replies = client.complete(_asks(16))
        assert [r.text for r in replies] == ["OK"] * 16 and client.failovers == 0
        assert client.pool._max_workers == 8, "4 in flight per server"
        assert min(a.count("q "), b.count("q ")) >= 4, (a.count("q "), b.count("q "))  # fewest in flight first
    finally:
        a.close()
        b.close()


def test_a_dead_endpoint_is_skipped_while_the_other_serves():
    a, b = ChatServer(), ChatServer()
    client = judge.OpenAIClient(f"{a.base_url},{b.base_url}", "judge", concurrency=2, timeout=2, max_retries=2,
                                backoff=5.0, cache=False)  # a backoff would show in the time: there is none
    try:
        assert [r.text for r in client.complete(_asks(4, "before"))] == ["OK"] * 4
        b.close()  # killed mid-run
        t = time.time()
        replies = client.complete(_asks(8, "after"))
        assert [r.text for r in replies] == ["OK"] * 8, [r.error for r in replies]
        assert time.time() - t < 4.0 and a.count("after") == 8, "a 5 s backoff would show here"
        assert 1 <= client.failovers <= 2, "the dead server costs its in-flight requests one attempt each"
        # a judge's stats carry the count (the trainer logs judge/failovers)
        j = judge.LLMJudge(client)
        j._ask(["still up"])
        assert j.stats["errors"] == 0 and j.stats["failovers"] == 0, "b is skipped while it is marked down"
    finally:
        a.close()


def test_with_every_endpoint_dead_each_request_fails_after_its_attempts():
    a, b = ChatServer(), ChatServer()
    urls = f"{a.base_url},{b.base_url}"
    a.close()
    b.close()
    client = judge.OpenAIClient(urls, "judge", concurrency=2, timeout=2, max_retries=1, backoff=0.01, cache=False)
    replies = client.complete(_asks(3))
    assert all(r.text is None and "after 2 attempts" in r.error for r in replies), [r.error for r in replies]
    with pytest.raises(SystemExit, match="judge check failed"):
        judge.check_judge(judge.LLMJudge(client))


def test_check_judge_names_the_endpoint_that_is_down_at_start():
    a, b = ChatServer(), ChatServer()
    dead = b.base_url
    b.close()
    try:
        client = judge.OpenAIClient(f"{a.base_url},{dead}", "judge", timeout=2, max_retries=0)
        with pytest.raises(SystemExit) as e:
            judge.check_judge(judge.LLMJudge(client))
        assert f"{dead}/chat/completions" in str(e.value) and a.base_url not in str(e.value)
    finally:
        a.close()
