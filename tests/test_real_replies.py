"""Replies as real models write them: judge verdicts in the forms Qwen3 thinking and non-thinking models
produce (through the real HTTP client where the server's finish_reason matters), the format reward
under a chat template that prefills '<think>', and answer grading on LaTeX, Unicode and units."""
import json
import shutil

import pytest

import grpo
import judge
import palmr
from chat_server import ChatServer
from data import Sample
from judge import JudgeItem
from rewards import grade_answer, score_completion

# -----------------------------------------------------------------------------
# judge replies


@pytest.mark.parametrize("reply,expected", [
    # Qwen3 with thinking on, served without a reasoning parser: the reasoning block comes back in the text
    ("<think>\nA says 3 circles; the facts say 2. VERDICT: A? no.\n</think>\n\nVERDICT: B", "B"),
    # Qwen3-Thinking-2507: its template opens <think> in the prompt, so the reply only closes it
    ("A says 3 circles, the facts say 2, so A is worse. VERDICT: A would fit? No.\n</think>\n\n**VERDICT: B**", "B"),
    # non-thinking (enable_thinking false: the template writes an empty think block into the prompt)
    ("Response A misstates the count of circles.\n\nVERDICT: B", "B"),
    ("**Verdict:** **Response A**", "A"), ("Final verdict: [[TIE]]", "TIE"), ("VERDICT: `B`", "B"),
    ("VERDICT: Response B.", "B"), ("So **VERDICT: A** (A matches every count)", "A"),
    ("VERDICT: A\n\nA is more faithful because it names both squares.", "A"),    # the verdict line ends; prose after
    ("<think>..</think>\nVERDICT: UNFAITHFUL", "UNFAITHFUL"), ("**VERDICT: FAITHFUL**", "FAITHFUL"),
    # never a verdict
    ("A says 3 circles, the facts say 2, so VERDICT: A would fit... wait, B also says 3", None),  # mid-thought
    ("<think>A has errors. VERDICT: A", None),                    # reasoning never closed
    ("<think>Both look fine. VERDICT: TIE</think>\n\n", None),    # reasoning, then no final answer
    ("<think>VERDICT: A</think>\nI cannot decide.", None),        # a verdict inside the reasoning only
])
def test_verdict_is_read_from_the_final_answer_only(reply, expected):
    assert judge.parse_verdict(reply) == expected


def test_final_answer_follows_the_last_closing_tag():
    assert judge.final_answer("x</think>y</think>z") == "z"
    assert judge.final_answer("<think>open") is None and judge.final_answer("plain") == "plain"


FACTS = {"objects": [{"name": "circle", "count": 2, "attributes": ["red"], "location": []}]}
REF = "<think>I see 2 red circles.</think> \\boxed{2}"


@pytest.mark.parametrize("fault,reason", [("truncated", "stopped on the token limit"),
                                          ("reasoning", "reasoning but no final answer")])
def test_cut_off_judge_replies_are_counted_failures_not_verdicts(fault, reason):
    server = ChatServer()
    try:
        j = judge.make_judge("openai", server.base_url, "qwen3", max_retries=2, backoff=0.01, timeout=5)
        server.inject("MARK", fault)
        v = j.judge([JudgeItem("MARK How many circles?", FACTS, "<think>I see 3 red circles.</think> \\boxed{2}", REF)])[0]
        assert v.failed and reason in v.reason and v.s_vis == 1.0 and v.preference is None
        assert server.count("MARK") == 1, "a reply cut off at temperature 0 is not asked again"
        ok = j.judge([JudgeItem("How many circles?", FACTS, "<think>I see 3 red circles.</think> \\boxed{2}", REF)])[0]
        assert not ok.failed and ok.s_vis == 0.0   # the same item, answered: the reference is preferred
    finally:
        server.close()


def test_pointwise_truncated_reply_is_a_failure():
    server = ChatServer()
    try:
        j = judge.make_judge("openai", server.base_url, "qwen3", protocol="pointwise", max_retries=0, timeout=5)
        server.inject("MARK", "truncated")
        v = j.judge([JudgeItem("MARK q", FACTS, "<think>I see 2 red circles.</think> \\boxed{2}", None)])[0]
        assert v.failed and "token limit" in v.reason
    finally:
        server.close()


# -----------------------------------------------------------------------------
# format reward under a template that prefills <think>

@pytest.fixture(scope="module")
def thinking_ckpt(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint with a chat template whose generation prompt opens the reasoning itself."""
    out = tmp_path_factory.mktemp("thinking") / "ckpt"
    shutil.copytree(tiny_ckpt, out)
    template = palmr.CHAT_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}")
    assert template != palmr.CHAT_TEMPLATE
    (out / "chat_template.jinja").write_text(template)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return str(out)


COMPLETION = "I see 2 red circles.\n</think>\nThe answer is \\boxed{2}."


def test_prefilled_think_counts_as_written(thinking_ckpt, tiny_ckpt):
    processor = palmr.load_processor(thinking_ckpt)
    prompt = palmr.render_prompt(processor, "How many circles?")
    assert prompt.endswith("<|im_start|>assistant\n<think>\n") and palmr.generation_prefill(prompt) == "<think>\n"
    assert palmr.generation_prefill(palmr.render_prompt(palmr.load_processor(tiny_ckpt), "q")) == ""
    # regression: S_fmt was 0 for a correct completion because its <think> sat in the prompt
    assert score_completion("grpo", COMPLETION, "2")[1]["fmt"] == 0.0
    total, parts = score_completion("grpo", palmr.assistant_turn(prompt, COMPLETION), "2")
    assert parts["fmt"] == 1.0 and parts["ans"] == 1.0 and total == pytest.approx(1.0)


def test_trainer_rewards_read_the_whole_assistant_turn(thinking_ckpt):
    processor = palmr.load_processor(thinking_ckpt)
    prefill = palmr.generation_prefill(palmr.render_prompt(processor, ""))  # as grpo.main computes it
    s = Sample("s1", "x.png", "How many circles?", "2", facts=FACTS, reference=REF)
    rows = [(s, palmr.Completion([], COMPLETION, [], True)), (s, palmr.Completion([], "I see 3 red circles.\n</think> \\boxed{2}", [], True))]
    rewards, parts, stats, _ = grpo.compute_rewards(judge.RuleJudge(), rows, "palmr", prefill)
    assert parts["fmt"].tolist() == [1.0, 1.0] and parts["vis"].tolist() == [1.0, 0.0]
    assert rewards.tolist() == pytest.approx([1.0, 0.0])


# -----------------------------------------------------------------------------
# answer grading

@pytest.mark.parametrize("pred,gold,expected", [
    ("3e-7", "5e-7", False),                      # regression: an absolute tolerance floor made these equal
    ("3\\times10^{-7}", "5e-7", False), ("3\\times 10^{-7}", "3e-7", True),
    ("1000.0004", "1000", True), ("0.0000001", "0", False),   # relative only; a zero gold needs zero
    ("1\\,000", "1000", True), ("1{,}000", "1000", True), ("1\\ 000", "1000", True),   # LaTeX spacing
    ("\u22123", "-3", True), ("\uff11\uff12", "12", True), ("3\u00a0cm", "3", True),   # Unicode minus, full width, nbsp
    ("145^\\circ", "145", True), ("145°", "145", True), ("145^{\\circ}", "145", True), ("40 degrees", "40", True),
    ("12 cm", "12", True), ("3.5 m^2", "3.5", True), ("5 km/h", "5", True), ("12 cm", "13", False),
    ("\\text{B}", "B", True), ("\\textbf{\\text{yes}}", "yes", True), ("-\\frac{1}{2}", "-0.5", True),
    ("\\dfrac{3}{4}", "0.75", True), ("x^2+1", "1+x^{2}", True), ("", "0", False),
    # a number followed by something that is no unit stays wrong (hedges, expressions)
    ("5x", "5", False), ("5 x", "5", False), ("2i", "2", False), ("2pi", "2", False), ("3sqrt2", "3", False),
    ("2 or 3", "2", False), ("4 and 5", "4", False), ("3 to 5", "3", False), ("10 not 2", "10", False),
    ("3 m 4", "3", False),
])
def test_grade_answer_forms(pred, gold, expected):
    assert grade_answer(pred, gold) == expected
