"""PaLMR rewards: pure functions from a completion (and the judge's verdict) to a total and named parts.

    R_palmr = S_vis * (0.9 * S_ans + 0.1 * S_fmt)     # vision gates everything (METHOD.md section 2)

No I/O and no model calls here: the judge's verdicts arrive as numbers. The fusion schemes live in a registry
(SCHEMES, register_scheme: verl's pattern); this file registers the paper's (palmr and its ablations grpo, bonus,
mix) and Perception-R1's, and each method in variants/ registers its own when imported. Answer grading uses
math-verify (HuggingFace's LaTeX/sympy equivalence checker) only after cheap exact rules (choices,
yes/no, plain numbers) have had their say: it is well kept and far more complete than hand-written
LaTeX normalisation, and never does substring matching.
"""
import dataclasses
import re
import threading
import unicodedata
from fractions import Fraction
from typing import Callable

from palmr import CHOICE_LETTERS, parse_response

# -----------------------------------------------------------------------------
# S_fmt


def format_reward(text):
    """1.0 when the response is <think>...</think> followed by text containing \\boxed{...}."""
    return 1.0 if parse_response(text)[2] else 0.0


# -----------------------------------------------------------------------------
# S_ans: rule-based answer grading

_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?$")
LATEX_WRAPPERS = r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox)\s*\{([^{}]*)\}"
_SPACING = r"\\[,;:! ]|\\q?quad\b|~"


def unwrap_latex(s):
    """Plain text of an answer: Unicode forms folded (NFKC: full-width digits, non-breaking and thin
    spaces; U+2212 and dashes as '-'), $...$ / \\( \\) dropped, \\text{...}-style wrappers unwrapped,
    LaTeX spacing (\\, \\; \\! \\quad ~) removed, '{,}' as ','. Case is kept."""
    s = unicodedata.normalize("NFKC", str(s)).replace("\u2212", "-").replace("\u2013", "-").replace("\u2012", "-")
    s = s.strip().strip("$").replace("\\(", "").replace("\\)", "").strip()
    for _ in range(3):  # nested wrappers: \textbf{\text{B}}
        s = re.sub(LATEX_WRAPPERS, r"\1", s)
    s = re.sub(_SPACING, "", s).replace("{,}", ",")
    return s.strip()


def normalize(s):
    """Lower-case plain text (unwrap_latex), '\\%' as '%', no trailing period, single spaces."""
    s = unwrap_latex(s).replace("\\%", "%").rstrip(".").strip().lower()
    return re.sub(r"\s+", " ", s)


# Commas: thousands separators only in groups of three ('1,000', '12,345.5'), as math-verify's number regex
# reads them (math_verify/parser.py, lazy_expr_regex format 1); any other comma makes a list ('1,2,3',
# '2, 3'), which math-verify parses as a set (order-free: '3, 2' equals '2, 3') and which is never one number.
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")


def as_number(s):
    """A float for '3', '-2.50', '1,000', '3/4', '\\frac{3}{4}', '50%' (as 50), '−3' (U+2212), '3\\times10^{-7}'; else None
    ('1,2,3' and '1, 2, 3' are lists, not 123)."""
    s = normalize(s).rstrip("%").strip().strip(",").strip()  # a stray comma ('3,') is not a list
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    m = re.fullmatch(r"(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", s)
    if m:
        s = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    m = re.fullmatch(r"([-+]?[\d.]+)\s*(?:\\times|\\cdot|x|\*)\s*10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?", s)
    if m:  # 3\times10^{-7}
        s = f"{m.group(1)}e{m.group(2)}"
    try:
        if _NUMBER.match(s):
            return float(s)
        if re.fullmatch(r"[-+]?\d+\s*/\s*\d+", s):
            return float(Fraction(s.replace(" ", "")))
    except (ValueError, ZeroDivisionError):
        return None
    return None


# Units a numeric answer may carry against a plain numeric gold: a closed list, so that '5x', '2 or 3'
# and '3 to 5' stay wrong. One-letter units (m g s h l v w j) need a space before them: '5 m', not '2i'.
_UNIT_WORDS = ("mm|cm|dm|km|in|inch|inches|ft|feet|foot|yd|yards?|miles?|mi|mg|kg|lbs?|oz|tons?|ml|liters?|litres?|"
               "sec|secs|seconds?|mins?|minutes?|hrs?|hours?|days?|weeks?|months?|years?|mph|kph|kmh|dollars?|cents?|"
               "euros?|yuan|pounds?|units?|square units|cubic units|sq units|degrees?|deg|radians?|rad|kj|kw|kwh|mw|hz|"
               "khz|pa|kpa|mol|ohms?|people|persons?|students?|items?|points?|pieces?|times|meters?|metres?|grams?|"
               "centimeters?|centimetres?|kilometers?|kilometres?|millimeters?|millimetres?|kilograms?")
_UNIT = re.compile(rf"^([-+]?[\d.,]*\d\.?)\s*(?:\^\s*\{{?\\circ\}}?|°\s*[cf]?|%|\\%|"
                   rf"(?:(?:\s[mgshlvwj]|(?:{_UNIT_WORDS}))(?:\s*\^\s*\{{?[23]\}}?|[23²³])?(?:\s*/\s*(?:[a-z]|{_UNIT_WORDS}))?))$")


def strip_unit(s):
    """'145^\\circ', '145°', '12 cm', '3.5 m^2', '5 km/h', '40 degrees' -> the number's text; None when
    the text is not a number followed by one known unit (or a degree or percent sign)."""
    m = _UNIT.match(normalize(s))
    return m.group(1).strip() if m else None


def numbers_close(a, b, rel=1e-6):
    """Relative tolerance only (no absolute floor: 3e-7 and 5e-7 differ); a zero gold needs an exact zero."""
    return abs(a - b) <= rel * abs(b)


def choice_letter(text, choices):
    """The option letter a text names: 'B', '(B)', 'B.', 'B. 42', or the option's own text; else None."""
    letters = CHOICE_LETTERS[:len(choices)]
    t = normalize(text)
    m = re.fullmatch(r"\(?([a-j])\)?(?:[.:)]\s*(.*))?", t)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    for letter, option in zip(letters, choices):
        if t == normalize(str(option)):
            return letter
    return None


def _math_equal(pred, gold):
    """LaTeX/sympy equivalence via math-verify; its timeouts use signals, so only in the main thread."""
    from math_verify import parse, verify
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        g = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
        p = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
        if not (g and p and verify(g, p, timeout_seconds=timeout)):
            return False
        try:  # math-verify rounds floats to 6 places (3e-7 == 5e-7): numbers get the relative rule instead
            gv, pv = float(g[0]), float(p[0])
        except (TypeError, ValueError):
            return True  # not plain numbers (expressions, sets, intervals): math-verify's verdict stands
        return numbers_close(pv, gv)
    except Exception:  # math-verify raises on pathological input; an ungradable answer is wrong
        return False


def grade_answer(pred, gold, choices=None):
    """True when `pred` (the boxed answer) matches `gold` under rule-based grading. Empty is wrong."""
    if pred is None or not normalize(pred) or gold is None:
        return False
    if choices:  # gold is a letter or an option's text; pred may be either
        gold_letter = choice_letter(str(gold), choices)
        if gold_letter is not None:
            return choice_letter(pred, choices) == gold_letter
    p, g = normalize(pred), normalize(str(gold))
    if g in ("yes", "no"):
        return p == g
    gn, pn = as_number(g), as_number(p)
    if gn is not None and pn is None and strip_unit(p) is not None:
        pn = as_number(strip_unit(p))  # '145°' or '12 cm' against a plain numeric gold: the unit is not graded
    if gn is not None and pn is not None:
        return numbers_close(pn, gn)
    if p == g:
        return True
    if gn is not None and pn is None and not re.search(r"[\\^{}a-z]", p):
        return False  # a numeric gold against plain non-numeric text: nothing for math-verify to find
    return _math_equal(unwrap_latex(pred), unwrap_latex(str(gold)))


# -----------------------------------------------------------------------------
# Fusion: the paper's schemes, in a registry other methods add theirs to (variants/, verl's pattern)


@dataclasses.dataclass(frozen=True)
class Scheme:
    """A reward scheme. fuse(fmt, ans, vis, cov, **signals) -> total; grade(text, gold, choices, **signals) ->
    (format ok, answer right); needs: the judge signals the total reads ({"vis", "cov"}); judged: whether the
    judge is asked about its rows at all (S_vis is logged for every judged row, fused or not)."""
    fuse: Callable[..., float]
    grade: Callable[..., tuple] = None
    needs: frozenset = frozenset()
    judged: bool = True


SCHEMES = {}  # name -> Scheme; the paper's below, the variants' from their own files


def register_scheme(name, fuse, grade=None, needs=(), judged=True):
    """Add a reward scheme (--reward NAME); grade defaults to PaLMR's format and answer rules (grade_parts)."""
    SCHEMES[name] = Scheme(fuse, grade or grade_parts, frozenset(needs), judged)


def grade_parts(text, gold, choices=None, **_):
    """(S_fmt, S_ans) as booleans: <think>...</think> then \\boxed{}, and the boxed answer graded against gold."""
    _, answer, well_formed = parse_response(text)
    return well_formed, grade_answer(answer, gold, choices)


# The paper's fusion schemes (METHOD.md section 2). S_vis gates everything in palmr: a hallucinating rollout
# gets 0 whatever its answer; the others are the paper's ablations and Perception-R1, the closest prior work.
register_scheme("palmr", lambda fmt, ans, vis, cov, **_: vis * (0.9 * ans + 0.1 * fmt), needs={"vis"})
register_scheme("grpo", lambda fmt, ans, vis, cov, **_: 0.9 * ans + 0.1 * fmt)          # outcome only
register_scheme("bonus", lambda fmt, ans, vis, cov, **_: 0.9 * ans + 0.1 * fmt + 0.5 * vis, needs={"vis"})
# (ours) mix: the weight-to-term mapping is our reading of the paper
register_scheme("mix", lambda fmt, ans, vis, cov, **_: 0.2 * ans + 0.7 * vis + 0.1 * fmt, needs={"vis"})
# Perception-R1: additive point-wise coverage of the reference's visual facts (r_cov)
register_scheme("perception_r1", lambda fmt, ans, vis, cov, **_: 0.9 * ans + 0.1 * fmt + 0.7 * cov, needs={"cov"})


def fuse(scheme, s_fmt, s_ans, s_vis, r_cov=0.0, **signals):
    """The fusion arithmetic alone (METHOD.md section 2) -> float. signals: what a registered scheme reads
    besides the four parts (e.g. a variant's s_self or s_perc, a gate). Raises ValueError for an unknown scheme."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown reward scheme {scheme!r}; expected one of {tuple(SCHEMES)}")
    return SCHEMES[scheme].fuse(s_fmt, s_ans, s_vis, r_cov, **signals)


def score_completion(scheme, text, gold, choices=None, s_vis=1.0, r_cov=0.0, **signals):
    """-> (total, parts) for one completion; parts are logged as reward/<name>: fmt, ans, vis, cov, and one part
    per signal named s_<part> (a variant's own score, e.g. s_self -> part `self`). Other signals (a gate, an
    item's meta) reach the scheme's grade and fuse functions only."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown reward scheme {scheme!r}; expected one of {tuple(SCHEMES)}")
    well_formed, right = SCHEMES[scheme].grade(text, gold, choices, **signals)
    parts = {"fmt": 1.0 if well_formed else 0.0, "ans": 1.0 if right else 0.0, "vis": float(s_vis), "cov": float(r_cov)}
    parts.update({k[2:]: float(v) for k, v in signals.items() if k.startswith("s_") and v is not None})
    return SCHEMES[scheme].fuse(parts["fmt"], parts["ans"], parts["vis"], parts["cov"], **signals), parts
