"""rewards.py: answer grading in one table (letters, yes/no, numbers, LaTeX, Unicode, units), the fusion
arithmetic of the schemes rewards.py registers itself, and score_completion. The variants' schemes
(pearl, vicrit, vision_sr1) are tested with their variants."""
import pytest

import rewards
from rewards import SCHEMES, fuse, grade_answer, score_completion

# -----------------------------------------------------------------------------
# rewards.grade_answer

CH = ["17", "42", "3", "5"]  # option B is "42"


@pytest.mark.parametrize("pred, gold, choices, expected", [
    # --- multiple choice
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
    # a letter in \text{} (LaTeX wrapper unwrapped)
    ("\\text{B}", "B", None, True),
    # --- yes/no
    # yes/no: case and trailing period
    ("Yes.", "yes", None, True),
    # yes/no: upper-case gold
    ("yes", "YES", None, True),
    # yes vs no
    ("yes", "no", None, False),
    # yes/no wrapped in \text{}
    ("\\text{yes}", "yes", None, True),
    # yes/no in nested wrappers \textbf{\text{}}
    ("\\textbf{\\text{yes}}", "yes", None, True),
    # yes/no: a longer sentence is not a yes (no substring matching)
    ("yes, there is", "yes", None, False),
    # --- plain numbers
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
    # regression: an absolute tolerance floor made 3e-7 and 5e-7 equal
    ("3e-7", "5e-7", None, False),
    # scientific notation in LaTeX vs a different e-number
    ("3\\times10^{-7}", "5e-7", None, False),
    # scientific notation in LaTeX (spaced) vs the same e-number
    ("3\\times 10^{-7}", "3e-7", None, True),
    # relative tolerance only: 1000.0004 is 1000
    ("1000.0004", "1000", None, True),
    # a zero gold needs an exact zero
    ("0.0000001", "0", None, False),
    # dollar-wrapped number
    ("$5$", "5", None, True),
    # number words are not digits
    ("one", "1", None, False),
    # --- LaTeX and Unicode spellings of a number
    # LaTeX thin space as thousands separator
    ("1\\,000", "1000", None, True),
    # LaTeX {,} as thousands separator
    ("1{,}000", "1000", None, True),
    # LaTeX escaped space as thousands separator
    ("1\\ 000", "1000", None, True),
    # Unicode minus sign
    ("\u22123", "-3", None, True),
    # full-width digits
    ("\uff11\uff12", "12", None, True),
    # non-breaking space before a unit
    ("3\u00a0cm", "3", None, True),
    # --- fractions and math equivalence
    # fraction vs decimal
    ("3/4", "0.75", None, True),
    # LaTeX fraction vs decimal
    ("\\frac{3}{4}", "0.75", None, True),
    # \dfrac vs decimal
    ("\\dfrac{3}{4}", "0.75", None, True),
    # negative LaTeX fraction vs decimal
    ("-\\frac{1}{2}", "-0.5", None, True),
    # decimal vs LaTeX fraction (gold side)
    ("0.5", "\\frac{1}{2}", None, True),
    # fraction vs a different decimal
    ("3/4", "0.7", None, False),
    # LaTeX equivalence (math-verify): root vs power
    ("\\sqrt{2}", "2^{1/2}", None, True),
    # LaTeX equivalence (math-verify): commuted sum
    ("x+1", "1+x", None, True),
    # LaTeX equivalence (math-verify): commuted sum with a power in braces
    ("x^2+1", "1+x^{2}", None, True),
    # LaTeX non-equivalence (math-verify)
    ("x+2", "1+x", None, False),
    # pi is not 3.14
    ("\\pi", "3.14", None, False),
    # --- units and degree signs off a numeric answer
    # degrees as ^\circ
    ("145^\\circ", "145", None, True),
    # degree sign
    ("145°", "145", None, True),
    # degrees as ^{\circ}
    ("145^{\\circ}", "145", None, True),
    # degrees as a word
    ("40 degrees", "40", None, True),
    # a length unit
    ("12 cm", "12", None, True),
    # an area unit
    ("3.5 m^2", "3.5", None, True),
    # a speed unit
    ("5 km/h", "5", None, True),
    # a unit does not rescue a wrong number
    ("12 cm", "13", None, False),
    # --- a number followed by something that is no unit stays wrong (hedges, expressions)
    # a variable
    ("5x", "5", None, False),
    # a spaced variable
    ("5 x", "5", None, False),
    # an imaginary number
    ("2i", "2", None, False),
    # a multiple of pi
    ("2pi", "2", None, False),
    # a multiple of a root
    ("3sqrt2", "3", None, False),
    # a hedge with "or"
    ("2 or 3", "2", None, False),
    # a hedge with "and"
    ("4 and 5", "4", None, False),
    # a range
    ("3 to 5", "3", None, False),
    # a negation
    ("10 not 2", "10", None, False),
    # a unit-like letter followed by another number
    ("3 m 4", "3", None, False),
    # --- empty and missing answers (an empty \boxed{} parses to "")
    # empty answer
    ("", "5", None, False),
    # empty answer against a zero gold
    ("", "0", None, False),
    # empty answer even against an empty gold
    ("", "", None, False),
    # empty answer with choices
    ("", "A", ["x", "y"], False),
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


# Commas (issue 25): thousands separators in groups of three are one number; any other comma makes a list,
# graded as math-verify grades it (math_verify/parser.py lazy_expr_regex format 1; grader.py
# sympy_deep_compare_set_and_tuple: a set, compared order-free), never as the digits run together.
@pytest.mark.parametrize("pred, gold, expected", [
    ("1,000", "1000", True), ("1000", "1,000", True), ("12,345.5", "12345.5", True), ("-1,000", "-1000", True),
    ("1,000,000", "1000000", True), ("1,000 cm", "1000", True),        # with a unit
    ("1,2,3", "123", False), ("1, 2, 3", "123", False),                # a list is not 123
    ("1,00", "100", False), ("12,34", "1234", False),                  # not groups of three
    ("2,3", "2, 3", True), ("3, 2", "2, 3", True),                     # list gold: sets, order-free
    ("2, 3, 4", "2, 3", False), ("23", "2, 3", False), ("1, 2, 3", "3", False),
    ("3,", "3", True), ("3, ", "3", True),                             # a stray comma is not a list (review)
])
def test_grade_answer_commas(pred, gold, expected):
    assert grade_answer(pred, gold) is expected



# -----------------------------------------------------------------------------
# rewards.fuse / score_completion, for the schemes rewards.py registers (the variants' in their own tests)

OWN_SCHEMES = sorted(name for name, s in SCHEMES.items() if s.fuse.__module__ == "rewards")

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
]


@pytest.mark.parametrize("scheme, s_fmt, s_ans, s_vis, r_cov, expected", FUSE_CASES)
def test_fuse_hand_values(scheme, s_fmt, s_ans, s_vis, r_cov, expected):
    assert fuse(scheme, s_fmt, s_ans, s_vis, r_cov) == pytest.approx(expected)


def test_fuse_table_covers_every_scheme():
    assert {c[0] for c in FUSE_CASES} == set(OWN_SCHEMES)


@pytest.mark.parametrize("scheme", OWN_SCHEMES)
def test_fuse_reads_vis_and_cov_as_declared(scheme):
    # a scheme's `needs` tells the trainer which judge calls to make: it must match the arithmetic
    vis_matters = fuse(scheme, 1, 1, 0.0, 0.0) != fuse(scheme, 1, 1, 1.0, 0.0)
    cov_matters = fuse(scheme, 1, 1, 1.0, 0.0) != fuse(scheme, 1, 1, 1.0, 1.0)
    assert vis_matters == ("vis" in rewards.SCHEMES[scheme].needs)
    assert cov_matters == ("cov" in rewards.SCHEMES[scheme].needs)


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
    # plain Python floats, as logged (repr tells 1.0 from 1, True or numpy.float64(1.0))
    assert {k: repr(v) for k, v in got_parts.items()} == {k: repr(v) for k, v in parts.items()}
