"""LLM judging against a real HTTP server on 127.0.0.1 that injects faults; the hf backend on the tiny model."""
import json
import os
from pathlib import Path

import pytest

import judge
from chat_server import ChatServer
from judge import JudgeItem

ROOT = Path(__file__).resolve().parent.parent
FACTS = {"objects": [{"name": "circle", "count": 2, "attributes": ["red"], "location": ["top left", "top right"]},
                     {"name": "square", "count": 1, "attributes": ["blue"], "location": ["middle centre"]}],
         "relations": [], "text": [], "global": {"total_objects": 3}}
REFERENCE = "<think>I see 2 red circles and 1 blue square.</think> The answer is \\boxed{2}."


def trace(reasoning, answer="2"):
    return f"<think>{reasoning}</think> The answer is \\boxed{{{answer}}}."


GOOD = trace("I see 2 red circles and 1 blue square. So there are 2 circles.")
BAD = trace("I see 3 red circles and 1 blue square. So there are 2 circles.")


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


# -----------------------------------------------------------------------------
# parsing

@pytest.mark.parametrize("text,expected", [
    ("Reasoning...\nVERDICT: A", "A"),                                 # plain
    ("<think>I think VERDICT: B</think>\nVERDICT: A", "A"),            # a verdict inside the reasoning is ignored
    ("verdict: b", "B"),                                               # casing
    ("**VERDICT: TIE**", "TIE"),                                       # markdown
    ("VERDICT: A\nwait, no.\nVERDICT: B", "B"),                        # the last verdict wins
    ("Verdict - [A]", "A"),                                            # bracketed
    ("VERDICT: UNFAITHFUL", "UNFAITHFUL"),                             # point-wise
    ("VERDICT: faithful.", "FAITHFUL"),
    ("I prefer A.", None),                                             # no verdict line
    ("<think>VERDICT: A ... (cut off)", None),                         # unterminated reasoning only
    ("", None), (None, None),
])
def test_parse_verdict(text, expected):
    assert judge.parse_verdict(text) == expected


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
# protocol

def test_pairwise_verdicts_follow_the_judge_in_both_orders(server):
    items = [JudgeItem(f"How many circles? #{i}", FACTS, BAD if i % 2 else GOOD, REFERENCE) for i in range(16)]
    verdicts = llm_judge(server).judge(items)
    assert [v.s_vis for v in verdicts] == [0.0 if i % 2 else 1.0 for i in range(16)]
    assert [v.preference for v in verdicts] == ["reference" if i % 2 else "tie" for i in range(16)]
    first = [("[Response A]\n" + REFERENCE) in r["content"] for r in server.requests]
    assert 0 < sum(first) < len(first), "randomised order puts the reference first for some items, second for others"


def test_swap_defeats_a_position_biased_judge():
    biased = ChatServer(reply=lambda messages: "VERDICT: A")  # always prefers whatever comes first
    try:
        items = [JudgeItem(f"q{i}", FACTS, GOOD, REFERENCE) for i in range(8)]
        plain = llm_judge(biased).judge(items)
        assert {v.s_vis for v in plain} == {0.0, 1.0}, "without swap the order decides"
        swapped = llm_judge(biased, swap=True).judge(items)
        assert all(v.s_vis == 1.0 and v.preference == "tie" for v in swapped), "with swap the bias cancels out"
        assert biased.count() == 8 + 16
    finally:
        biased.close()


def test_pointwise_and_coverage(server):
    j = llm_judge(server, protocol="pointwise")
    assert [v.s_vis for v in j.judge([JudgeItem("q", FACTS, GOOD, None), JudgeItem("q", FACTS, BAD, None)])] == [1.0, 0.0]
    half = trace("I see 1 blue square.")
    assert j.coverage([JudgeItem("q", FACTS, GOOD, None), JudgeItem("q", FACTS, half, None)]) == [1.0, 0.5]


def test_items_without_reference_fall_back_to_pointwise(server):
    items = [JudgeItem("q", FACTS, BAD, REFERENCE), JudgeItem("q", FACTS, BAD, None)]
    assert [v.s_vis for v in llm_judge(server).judge(items)] == [0.0, 0.0]


# -----------------------------------------------------------------------------
# faults: every item gets an answer or a counted failure, order kept, retries bounded

def test_faults_are_retried_and_order_is_kept(server):
    faults = {"#429": ["429", "429"], "#500": ["500"], "#slow": ["slow"], "#drop": ["drop"],
              "#malformed": ["malformed"], "#nocontent": ["nocontent"]}
    for marker, f in faults.items():
        server.inject(marker, *f)
    names = list(faults) + ["#ok"]
    items = [JudgeItem(f"How many circles? {m}", FACTS, BAD if k % 2 else GOOD, REFERENCE) for k, m in enumerate(names)]
    j = llm_judge(server)
    verdicts = j.judge(items)
    assert [v.s_vis for v in verdicts] == [0.0 if k % 2 else 1.0 for k in range(len(names))], "order kept"
    assert not any(v.failed for v in verdicts), [v.reason for v in verdicts]
    for marker, f in faults.items():
        assert server.count(marker) == len(f) + 1, f"{marker}: one request per fault, then success"
    assert j.stats["errors"] == 0 and j.stats["sent"] == len(names) and j.stats["latency_sum"] > 0


def test_retries_are_bounded_and_failures_counted(server):
    server.inject("#down", *["500"] * 10)
    server.inject("#garbage", "noverdict")
    items = [JudgeItem("q #down", FACTS, BAD, REFERENCE), JudgeItem("q #garbage", FACTS, BAD, REFERENCE),
             JudgeItem("q #fine", FACTS, BAD, REFERENCE)]
    verdicts = llm_judge(server, max_retries=2).judge(items)
    assert server.count("#down") == 3, "max_retries=2 -> 3 attempts, then give up"
    assert verdicts[0].failed and verdicts[0].s_vis == 1.0 and "HTTP 500" in verdicts[0].reason
    assert verdicts[1].failed and verdicts[1].s_vis == 1.0 and "unparseable" in verdicts[1].reason
    assert not verdicts[2].failed and verdicts[2].s_vis == 0.0


def test_timeouts_exhausted_are_failures(server):
    server.inject("#stuck", "slow", "slow")
    verdicts = llm_judge(server, max_retries=1).judge([JudgeItem("q #stuck", FACTS, BAD, REFERENCE)])
    assert verdicts[0].failed and "timed out" in verdicts[0].reason.lower() and server.count("#stuck") == 2


def test_cache_prevents_repeat_calls(server):
    j = llm_judge(server)
    items = [JudgeItem("q", FACTS, BAD, REFERENCE)] * 5 + [JudgeItem("q2", FACTS, GOOD, REFERENCE)]
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
    v = j.judge([JudgeItem("q #auth", FACTS, GOOD, REFERENCE)])[0]
    assert server.requests[-1]["authorization"] == "Bearer sk-secret-123"
    assert v.failed and "401" in v.reason and "not retried" in v.reason and server.count("#auth") == 1
    assert "sk-secret" not in v.reason and "sk-secret" not in json.dumps(j.stats)


def test_reasoning_switch_reaches_the_server(server):
    llm_judge(server).judge([JudgeItem("q", FACTS, GOOD, REFERENCE)])
    llm_judge(server, reasoning=False).judge([JudgeItem("q-off", FACTS, GOOD, REFERENCE)])
    flags = [r["payload"]["chat_template_kwargs"]["enable_thinking"] for r in server.requests]
    assert flags == [True, False]


# -----------------------------------------------------------------------------
# hf backend, agreement CLI

def test_hf_backend_on_the_tiny_checkpoint(tiny_ckpt):
    j = judge.make_judge("hf", model=tiny_ckpt, max_tokens=8)
    items = [JudgeItem("q", FACTS, GOOD, REFERENCE), JudgeItem("q", FACTS, BAD, REFERENCE), JudgeItem("q", FACTS, GOOD, None)]
    verdicts = j.judge(items)
    # a random tiny model writes no verdict: every item is answered, as "no preference" and counted failed
    assert len(verdicts) == 3 and all(v.failed and v.s_vis == 1.0 for v in verdicts)
    assert j.stats["sent"] == 3 and j.stats["tokens"] > 0
    assert [r.text for r in j.client.complete([[{"role": "user", "content": "hi"}]] * 2)][0] is not None


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
# the trainer with an LLM judge behind a local server

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
        assert m["judge/failed"] == 0.0 and m["judge/latency"] > 0
    assert server.count() == 2 * 2 * 4, "2 steps x 4 rollouts x 2 orders (swap)"


@pytest.mark.slow
def test_training_survives_a_judge_that_always_fails(tmp_path, tiny_ckpt, shapes_file):
    broken = ChatServer()
    broken.inject("Image facts", *["500"] * 1000)
    try:
        metrics = _train(tmp_path, tiny_ckpt, shapes_file, broken)
    finally:
        broken.close()
    assert [m["judge/failed"] for m in metrics] == [1.0, 1.0], "every item a counted failure, the run goes on"
    assert all(m["reward/vis"] == 1.0 for m in metrics), "no preference: nothing is gated"
