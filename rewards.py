"""PaLMR rewards: pure functions from a completion (and the judge's verdict) to a total and named parts.

    R_palmr = S_vis * (0.9 * S_ans + 0.1 * S_fmt)     # vision gates everything (METHOD.md section 2)

No I/O and no model calls here: the judge's verdicts arrive as numbers. Answer grading uses
math-verify (HuggingFace's LaTeX/sympy equivalence checker) only after cheap exact rules (choices,
yes/no, plain numbers) have had their say: it is well kept and far more complete than hand-written
LaTeX normalisation, and never does substring matching.
"""
import re
import threading
import unicodedata
from fractions import Fraction

from palmr import CHOICE_LETTERS, parse_description, parse_response

SCHEMES = ("palmr", "grpo", "bonus", "mix", "perception_r1", "vision_sr1", "pearl", "vicrit")
NEEDS_VIS = {"palmr", "bonus", "mix"}      # schemes that read S_vis
NEEDS_COV = {"perception_r1"}              # schemes that read the point-wise coverage r_cov
PEARL_GATE = 0.5                            # PEARL: the checklist pass rate a prompt needs (ours: not published)

# -----------------------------------------------------------------------------
# S_fmt


def format_reward(text):
    """1.0 when the response is <think>...</think> followed by text containing \\boxed{...}."""
    return 1.0 if parse_response(text)[2] else 0.0


# -----------------------------------------------------------------------------
# S_ans: rule-based answer grading

_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?$")
_WRAPPERS = r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox)\s*\{([^{}]*)\}"
_SPACING = r"\\[,;:! ]|\\q?quad\b|~"


def unwrap_latex(s):
    """Plain text of an answer: Unicode forms folded (NFKC: full-width digits, non-breaking and thin
    spaces; U+2212 and dashes as '-'), $...$ / \\( \\) dropped, \\text{...}-style wrappers unwrapped,
    LaTeX spacing (\\, \\; \\! \\quad ~) removed, '{,}' as ','. Case is kept."""
    s = unicodedata.normalize("NFKC", str(s)).replace("\u2212", "-").replace("\u2013", "-").replace("\u2012", "-")
    s = s.strip().strip("$").replace("\\(", "").replace("\\)", "").strip()
    for _ in range(3):  # nested wrappers: \textbf{\text{B}}
        s = re.sub(_WRAPPERS, r"\1", s)
    s = re.sub(_SPACING, "", s).replace("{,}", ",")
    return s.strip()


def normalize(s):
    """Lower-case plain text (unwrap_latex), '\\%' as '%', no trailing period, single spaces."""
    s = unwrap_latex(s).replace("\\%", "%").rstrip(".").strip().lower()
    return re.sub(r"\s+", " ", s)


def as_number(s):
    """A float for '3', '-2.50', '1,000', '3/4', '\\frac{3}{4}', '50%' (as 50), '−3' (U+2212), '3\\times10^{-7}'; else None."""
    s = normalize(s).replace(",", "").rstrip("%").strip()
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
# Fusion


def fuse(scheme, s_fmt, s_ans, s_vis, r_cov=0.0, s_self=0.0, s_perc=0.0, gate=PEARL_GATE):
    """The fusion arithmetic alone (METHOD.md section 2). s_self: Vision-SR1's self-reward (1 when the policy,
    shown only its own description and the question, answered right). s_perc: PEARL's perception score of the
    prompt (its checklist pass rate, in [0, 1]); below `gate` the reasoning reward is 0 (the gate is ours)."""
    if scheme == "palmr":          # hierarchical: a hallucinating rollout gets 0 whatever its answer
        return s_vis * (0.9 * s_ans + 0.1 * s_fmt)
    if scheme == "grpo":           # outcome only
        return 0.9 * s_ans + 0.1 * s_fmt
    if scheme == "bonus":          # additive vision bonus
        return 0.9 * s_ans + 0.1 * s_fmt + 0.5 * s_vis
    if scheme == "mix":            # (ours) the weight-to-term mapping is our reading of the paper
        return 0.2 * s_ans + 0.7 * s_vis + 0.1 * s_fmt
    if scheme == "perception_r1":  # additive point-wise coverage of the reference's visual facts
        return 0.9 * s_ans + 0.1 * s_fmt + 0.7 * r_cov
    if scheme == "vision_sr1":     # official code (see_think_selfReward.py): 0.9 acc + 0.1 format + the self-reward
        return 0.9 * s_ans + 0.1 * s_fmt + s_self
    if scheme == "vicrit":         # ViCrit (arXiv 2506.10128 section 3.2): s_ans is the corrupted-phrase match
        return 0.9 * s_ans + 0.1 * s_fmt
    if scheme == "pearl":          # the checklist gates the outcome reward (arXiv 2511.18437; gate and weights ours)
        return (0.9 * s_ans + 0.1 * s_fmt) if s_perc >= gate else 0.0
    raise ValueError(f"unknown reward scheme {scheme!r}; expected one of {SCHEMES}")


def score_completion(scheme, text, gold, choices=None, s_vis=1.0, r_cov=0.0, s_self=None, s_perc=None,
                     gate=PEARL_GATE, description=None):
    """-> (total, parts) for one completion; parts are logged as reward/<name>. vision_sr1 grades its own
    format (palmr.parse_description) and adds the part `self` (s_self, required for that scheme); pearl adds
    the part `perc` (s_perc, the prompt's checklist pass rate, required for that scheme); vicrit grades the
    answer with vicrit_match against the item's description (required for that scheme)."""
    _, answer, well_formed = parse_response(text)
    if scheme == "vision_sr1":
        assert s_self is not None, "vision_sr1 needs the self-reward (grpo.self_rewards)"
        well_formed = parse_description(text)[1]
    assert scheme != "pearl" or s_perc is not None, "pearl needs the checklist pass rate (grpo.pearl_checks)"
    if scheme == "vicrit":
        assert description is not None, "vicrit needs the item's description (data.py vicrit: meta.description)"
        right = vicrit_match(answer, gold, description)
    else:
        right = grade_answer(answer, gold, choices)
    parts = {"fmt": 1.0 if well_formed else 0.0, "ans": 1.0 if right else 0.0,
             "vis": float(s_vis), "cov": float(r_cov)}
    if s_self is not None:
        parts["self"] = float(s_self)
    if s_perc is not None:
        parts["perc"] = float(s_perc)
    return fuse(scheme, parts["fmt"], parts["ans"], parts["vis"], parts["cov"], parts.get("self", 0.0),
                parts.get("perc", 0.0), gate), parts


# -----------------------------------------------------------------------------
# PEARL's perception checklist. Source of the idea: "Perceptual-Evidence Anchored Reinforced Learning for
# Multimodal Reasoning" (arXiv 2511.18437). Its checklist rule is not public; this rule is ours.


SAME_COLOUR = {"gray": "grey"}  # spellings of one colour: never a different colour of each other
COLOUR_WORDS = {"red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "grey",
                "gray", "cyan", "magenta"}  # basic colour terms: an object has one, so another is a checkable absence


IRREGULAR_PLURALS = {"person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
                     "goose": "geese", "foot": "feet", "tooth": "teeth", "sheep": "sheep", "fish": "fish",
                     "deer": "deer", "people": "people", "men": "men", "women": "women", "children": "children"}


def plural_noun(name):
    """English plural of a lower-case noun phrase's last word (box -> boxes, berry -> berries, person ->
    people). A word already plural by the regular rule ('glasses', 'scissors': a final s not after s, u or
    i) is left as it is; so is any word the rules get wrong, which leaves the question readable and its
    answer unaffected."""
    head, _, last = name.rpartition(" ")
    if last in IRREGULAR_PLURALS:
        last = IRREGULAR_PLURALS[last]
    elif re.search(r"[^siu]s$", last):
        pass
    elif re.search(r"(s|x|z|ch|sh)$", last):
        last += "es"
    elif re.search(r"[^aeiou]y$", last):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}" if head else last


def _count(value):
    """A facts count as an int >= 0, or None (a missing or non-integer count makes no checklist item)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def pearl_checklist(facts, question, k, key):
    """PEARL checklist of one item: exactly k (question, answer) pairs, answers checked by grade_answer.

    Rule (ours; the paper's is not public), from the structured facts of METHOD.md section 1.3 (the synthetic
    shapes write the same schema), which list every kind of object with its count; attributes other than
    colour are not exhaustive (a 'red bus' entry may be double-decker too), colours exclude each other:
    - present groups: per object name, "How many {attributes} {plural name} are there?" -> the count of the
      entries with exactly those attributes (summed when the facts repeat an entry). A name with several
      distinct attribute sets is asked about only when each set holds exactly one colour and the colours
      differ (else a group could include another); a name with an unreadable count is not asked about;
    - one absent probe when the facts allow it: a name whose entries all carry exactly one colour, with a
      colour another entry has and none of that name has, "How many {colour} {plural name} are there?" -> "0";
    - order: items whose name or attribute words occur in the question first (the question's own evidence),
      the rest shuffled by `key`; the absent probe last; an item worded exactly as the question is left out
      (that would reward the answer twice);
    - fewer than k distinct items are repeated in order to make k, so every prompt costs the same rollouts.
    Relations and text are not checked (their answers cannot be verified by rule). -> [] when the facts give
    no present item (probes alone would be passed by always answering 0); the trainer drops such items at load.
    """
    import random
    by_name, shown = {}, {}  # name -> {sorted attributes: summed count, or None when a count is unreadable}
    for o in (facts or {}).get("objects") or []:
        if not isinstance(o, dict) or not str(o.get("name") or "").strip():
            continue
        name = str(o["name"]).strip().lower()
        said = tuple(str(a).strip().lower() for a in (o.get("attributes") or []) if str(a).strip())
        attrs = tuple(sorted(said))
        shown.setdefault((attrs, name), said)  # the facts' own word order, for the question
        n, groups = _count(o.get("count")), by_name.setdefault(name, {})
        groups[attrs] = None if n is None or groups.get(attrs, 0) is None else groups.get(attrs, 0) + n
    colour_of = lambda attrs: [SAME_COLOUR.get(a, a) for a in attrs if a in COLOUR_WORDS]  # noqa: E731
    usable = set()
    for name, groups in by_name.items():
        colours = [colour_of(a) for a in groups]
        if any(n is None for n in groups.values()):
            continue  # an unreadable count: this name's totals are unknown
        if len(groups) > 1 and not (all(len(c) == 1 for c in colours) and len({c[0] for c in colours}) == len(groups)):
            continue  # overlapping groups: one could include another
        usable.add(name)
    entries = [(said, name, by_name[name][attrs]) for (attrs, name), said in shown.items()  # in the facts' order
               if name in usable and by_name[name][attrs] >= 1]
    words = set(re.findall(r"[a-z]+", question.lower()))
    phrase = lambda attrs, name: " ".join(attrs + (plural_noun(name),))  # noqa: E731
    ask = lambda attrs, name: f"How many {phrase(attrs, name)} are there?"  # noqa: E731
    relevant = lambda attrs, name: bool(words & set(" ".join(attrs + (name, plural_noun(name))).split()))  # noqa: E731
    rng = random.Random(key)
    order = list(range(len(entries)))
    rng.shuffle(order)
    order.sort(key=lambda i: not relevant(*entries[i][:2]))  # stable: relevant first, each part shuffled
    target = question.strip().lower()
    items = [(q, str(entries[i][2])) for i in order if (q := ask(*entries[i][:2])).lower() != target]
    every = {c for groups in by_name.values() for attrs in groups for c in colour_of(attrs)}
    absent = sorted({((c,), name) for name, groups in by_name.items()
                     if all(len(colour_of(a)) == 1 for a in groups)
                     for c in every - {colour_of(a)[0] for a in groups}})
    absent = [p for p in absent if ask(*p).lower() != target]
    if not items:  # probes alone would be answered by always saying 0
        return []
    if absent:
        rng.shuffle(absent)
        absent.sort(key=lambda p: not relevant(*p))
        items = items[:max(k - 1, 1)] + [(ask(*absent[0]), "0")]
    return [items[i % len(items)] for i in range(k)] if items else []


# -----------------------------------------------------------------------------
# ViCrit's answer check (arXiv 2506.10128 section 3.2)


def _phrase_key(text):
    """Lower case, LaTeX text wrappers and quotes removed, punctuation at the ends stripped, spaces collapsed."""
    text = re.sub(_WRAPPERS, r"\1", str(text))
    text = re.sub(r"[\"'\u201c\u201d\u2018\u2019`]", "", text.lower())
    return " ".join(text.split()).strip(" .,;:!?")


VICRIT_EXTRA_WORDS = 3  # words copied around the phrase that the match forgives (ours: the paper gives no number)


def vicrit_match(pred, span, description):
    """True when the boxed answer names the corrupted phrase: equal to it after _phrase_key, or containing
    it with at most VICRIT_EXTRA_WORDS more words, copied from the same sentence of the description around
    it (the paper: extra words copied verbatim from the caption before or after the span are not
    penalised; the bound and the sentence are ours, so that copying the whole description earns nothing).
    None (no answer) is False."""
    if pred is None:
        return False
    p, t = _phrase_key(pred), _phrase_key(span)
    if not t or not re.search(rf"(?<!\w){re.escape(t)}(?!\w)", p):
        return False
    if p == t:
        return True
    sentences = [_phrase_key(x) for x in re.split(r"(?<=[.!?])\s+", description)]
    return len(p.split()) - len(t.split()) <= VICRIT_EXTRA_WORDS and any(
        re.search(rf"(?<!\w){re.escape(p)}(?!\w)", x) for x in sentences)
