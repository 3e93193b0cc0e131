"""PaLMR's visual-fidelity judge: is a rollout's reasoning less faithful to the image than the reference's?

    python -c "import judge; print(judge.make_judge('rule'))"

The trainer sees one narrow interface: `judge.judge(items) -> list[Verdict]` (pairwise, S_vis) and
`judge.coverage(items) -> list[float]` (point-wise, the perception_r1 r_cov). Backends:
- `rule`: exact, for the synthetic `shapes` task, whose facts are the true scene. A trace is checked
  claim by claim ("2 red circles", "no blue square", "a triangle", "3 shapes"); S_vis = 0 iff the
  candidate contradicts the facts more often than the reference does (the pairwise protocol, made exact).
LLM backends (an OpenAI-compatible server, a local transformers model) plug into the same interface.
"""
import dataclasses
import re

from palmr import parse_response


@dataclasses.dataclass
class JudgeItem:
    question: str
    facts: dict        # pseudo ground truth: {"objects": [{"name", "count", "attributes", "location"}], ...}
    candidate: str     # the rollout's full response
    reference: str     # the item's reference trace (may be None: then the candidate is judged alone)


@dataclasses.dataclass
class Verdict:
    s_vis: float         # 0.0 when the judge prefers the reference (the rollout is less faithful), else 1.0
    failed: bool = False  # the judge gave no usable verdict (counted as "no preference": s_vis 1.0)
    reason: str = ""


# -----------------------------------------------------------------------------
# The `rule` backend: exact claims against exact scene facts

_WORD_COUNTS = {"no": 0, "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
                "seven": 7, "eight": 8, "nine": 9, "ten": 10, "a": None, "an": None}
_COLOR_WORDS = "red|green|blue|yellow|orange|purple|black|white|gray|grey|brown|pink"
_KIND_WORDS = "circle|square|triangle|star|rectangle|shape"
_CLAIM = re.compile(rf"\b(\d+|{'|'.join(_WORD_COUNTS)})\s+(?:({_COLOR_WORDS})\s+)?({_KIND_WORDS})(?:e?s)?\b",
                    re.IGNORECASE)


def claims(text):
    """Perception claims in a trace: (count or None for 'a/an', colour or None, kind or None for 'shape')."""
    out = []
    for m in _CLAIM.finditer(text):
        word, color, kind = m.group(1).lower(), m.group(2), m.group(3).lower()
        count = int(word) if word.isdigit() else _WORD_COUNTS[word]
        out.append((count, color.lower() if color else None, None if kind == "shape" else kind))
    return out


def true_count(facts, color, kind):
    """How many objects of this colour and kind (None: any) the facts hold."""
    return sum(o.get("count", 1) for o in facts.get("objects", [])
               if (kind is None or o.get("name") == kind)
               and (color is None or color in [a.lower() for a in o.get("attributes", [])]))


def contradictions(text, facts):
    """Claims in the reasoning that the facts contradict (a wrong count, or a colour/kind that is absent)."""
    think, _, well_formed = parse_response(text)
    body = think if well_formed else text  # judge the reasoning; fall back to the whole text
    wrong = []
    for count, color, kind in claims(body):
        n = true_count(facts, color, kind)
        if (count is None and n == 0) or (count is not None and count != n):
            wrong.append((count, color, kind, n))
    return wrong


class RuleJudge:
    """Exact judge for tasks whose facts are the true scene (the synthetic `shapes` task)."""
    name = "rule"

    def judge(self, items):
        verdicts = []
        for it in items:
            if not it.facts:
                verdicts.append(Verdict(1.0, failed=True, reason="no facts for this item"))
                continue
            bad = contradictions(it.candidate, it.facts)
            base = len(contradictions(it.reference, it.facts)) if it.reference else 0
            reason = "; ".join(" ".join(str(w) for w in ("says", "a" if c is None else c, col, k or "shape") if w)
                               + f", facts say {n}" for c, col, k, n in bad)
            verdicts.append(Verdict(0.0 if len(bad) > base else 1.0, reason=reason))
        return verdicts

    def coverage(self, items):
        """Fraction of the facts' object groups that the candidate states with the right count."""
        scores = []
        for it in items:
            groups = (it.facts or {}).get("objects", [])
            if not groups:
                scores.append(0.0)
                continue
            said = {(1 if c is None else c, col, k)  # "a red circle" states a group of one
                    for c, col, k in claims(parse_response(it.candidate)[0] or it.candidate)}
            hit = sum(any((o.get("count", 1), a.lower(), o.get("name")) in said for a in o.get("attributes") or [])
                      for o in groups)
            scores.append(hit / len(groups))
        return scores


JUDGES = {"rule": RuleJudge}


def make_judge(name, **kwargs):
    """The judge backend by name (see JUDGES)."""
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; available: {sorted(JUDGES)}")
    return JUDGES[name](**kwargs)
