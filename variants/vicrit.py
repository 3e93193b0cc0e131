"""ViCrit (arXiv 2506.10128): a description of the image with one phrase corrupted; the policy must name it.
The reward is an exact phrase match, checked by rule, so these items need no judge.

    python -m variants.vicrit --in data/shapes/train.jsonl --out data/vicrit.jsonl   # items from any facts
    python grpo.py --vicrit-data data/vicrit.jsonl [--vicrit-ratio 0.25]               # mixed into every step
    python grpo.py --reward vicrit --data data/vicrit.jsonl                             # ViCrit alone (the paper)

--vicrit-data FILE is --mix-data FILE --mix-reward vicrit, and --vicrit-ratio is --mix-ratio: the loop's
generic mix of a second dataset whose rows carry their own reward scheme.
"""
import argparse
import json
import random
import re
import sys

import torch

from data import COLORS, COLS, KINDS, NUMBER_WORDS, ROWS, Sample, read_jsonl, write_jsonl
from palmr import COLOUR_WORDS, HelpFormatter, parse_response, plural_noun
from rewards import LATEX_WRAPPERS, register_scheme
from variants.base import Variant

# -----------------------------------------------------------------------------
# The reward: the corrupted phrase, matched by rule (section 3.2)


def _phrase_key(text):
    """Lower case, LaTeX text wrappers and quotes removed, punctuation at the ends stripped, spaces collapsed."""
    text = re.sub(LATEX_WRAPPERS, r"\1", str(text))
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



def _grade(text, gold, choices=None, description=None, meta=None, **_):
    """(format, match): PaLMR's <think> format; the boxed answer against the corrupted phrase (vicrit_match)."""
    description = description if description is not None else (meta or {}).get("description")
    assert description is not None, "vicrit needs the item's description (python -m variants.vicrit: meta.description)"
    _, answer, well_formed = parse_response(text)
    return well_formed, vicrit_match(answer, gold, description)


# s_ans is the corrupted-phrase match; its rows are never sent to the judge (their reward is exact)
register_scheme("vicrit", lambda fmt, ans, vis, cov, **_: 0.9 * ans + 0.1 * fmt, grade=_grade, judged=False)


def is_vicrit(sample):
    return sample.source.startswith("vicrit/")


# -----------------------------------------------------------------------------
# The items, from any Samples with facts

VICRIT_PROMPT = ("Here is a description of the image:\n{description}\n\nExactly one phrase of this description does "
                 "not match the image. Which phrase is it? Copy it from the description into \\boxed{{}}.")
VICRIT_TYPES = ("count", "colour", "object", "location", "text")
CELLS = [f"{r} {c}" for r in ROWS for c in COLS]


def _phrase(n, attrs, name):
    return " ".join([NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)] + list(attrs)
                    + [name if n == 1 else plural_noun(name)])


def vicrit_item(sample, rng):
    """A ViCrit item from a Sample's facts, or (None, why not).

    The description states the facts in fixed sentences (one per object entry: 'There are two red circles
    at top left and middle centre.'; each relation; 'The text "X" is visible.'). One phrase is then
    corrupted, a type drawn among those the facts allow (ours; the paper has GPT-4 swap a noun phrase of a
    human caption for a visually similar one): count (one more or one fewer), colour (a colour no entry of
    that name has), object (a kind no entry of that colour has: shapes kinds, else VICRIT_OBJECTS),
    location (an empty grid cell: shapes only), text (one character changed). The
    answer is the corrupted phrase as it reads in the description (vicrit_match grades it).
    """
    entries = []
    for o in (sample.facts or {}).get("objects") or []:
        n = o.get("count") if isinstance(o, dict) else None
        if isinstance(n, int) and not isinstance(n, bool) and n >= 1 and str(o.get("name") or "").strip():
            entries.append({"n": n, "attrs": [str(a).strip().lower() for a in o.get("attributes") or [] if str(a).strip()],
                            "name": str(o["name"]).strip().lower(),
                            "locs": [str(x) for x in o.get("location") or [] if isinstance(x, str)]})
    texts = [str(t) for t in (sample.facts or {}).get("text") or [] if str(t).strip()]
    if not entries and not texts:
        return None, "no object entries or visible text in the facts"
    shapes = all(e["name"] in KINDS for e in entries) and entries
    options = []
    for i, e in enumerate(entries):
        options += [("count", i)]
        if any(a in COLOUR_WORDS for a in e["attrs"]):
            options += [("colour", i)]
        options += [("object", i)]
        if shapes and e["locs"] and all(loc in CELLS for loc in e["locs"]):
            options += [("location", i)]
    options += [("text", i) for i, t in enumerate(texts) if re.search(r"[A-Za-z0-9]", t)]
    for kind, i in rng.sample(options, len(options)):  # the first type, in a seeded order, that the facts allow
        built = _vicrit_description(entries, texts, sample.facts, kind, i, shapes, rng)
        if built is not None:
            break
    else:
        return None, "no phrase can be corrupted"
    description, old_span, new_span = built
    if description.count(new_span) != 1:  # the phrase must point at one place, and not be true elsewhere
        return None, "the corrupted phrase is not unique in the description"
    reference = (f"<think>The description says {new_span}, but the image shows {old_span}.</think> "
                 f"The answer is \\boxed{{{new_span}}}.")
    return Sample(id=f"{sample.id}-vicrit", image=sample.image, question=VICRIT_PROMPT.format(description=description),
                  answer=new_span, source=f"vicrit/{kind}", facts=sample.facts, reference=reference,
                  meta={"description": description, "original": old_span, "error_type": kind, "of": sample.id,
                        "reward_scheme": "vicrit"}), None


def _vicrit_description(entries, texts, facts, kind, i, shapes, rng):
    """The description with phrase i of type `kind` corrupted -> (description, old phrase, new phrase), or None
    when the facts leave no wrong value of that type."""
    sentences, new_span, old_span = [], None, None
    for j, e in enumerate(entries):
        n, attrs, name, locs = e["n"], list(e["attrs"]), e["name"], list(e["locs"])
        old = _phrase(n, attrs, name)
        if j == i and kind == "count":
            n = n + 1 if n == 1 or rng.random() < 0.5 else n - 1
        elif j == i and kind == "colour":
            c = next(a for a in attrs if a in COLOUR_WORDS)
            if any(x["name"] == name and not set(x["attrs"]) & COLOUR_WORDS for x in entries):
                return None  # an entry of this name has no colour: any colour might be true of it
            palette = list(COLORS) if shapes else sorted(COLOUR_WORDS - {"gray", "grey"})  # a synonym pair
            taken = {a for x in entries if x["name"] == name for a in x["attrs"]}
            free = [x for x in palette if x not in taken]
            if not free:
                return None
            attrs[attrs.index(c)] = rng.choice(free)
        elif j == i and kind == "object":
            pool = KINDS if shapes else VICRIT_OBJECTS
            free = [k for k in pool if not any(x["name"] == k for x in entries)]  # a kind the facts do not have
            if not free:
                return None
            name = rng.choice(free)
        new = _phrase(n, attrs, name)
        sentence = f"There {'is' if n == 1 else 'are'} {new}"
        if locs:
            if j == i and kind == "location":
                k = rng.randrange(len(locs))
                free = [c for c in CELLS if not any(c in x["locs"] for x in entries)]  # an empty cell: unambiguous
                if not free:
                    return None
                old_span, locs[k] = locs[k], rng.choice(free)
                new_span = locs[k]
            sentence += " at " + (locs[0] if len(locs) == 1 else ", ".join(locs[:-1]) + " and " + locs[-1])
        sentences.append(sentence + ".")
        if j == i and kind in ("count", "colour", "object"):
            old_span, new_span = old, new
    sentences += [r[0].upper() + r[1:] + ("" if r.endswith(".") else ".") for r in
                  (str(x).strip() for x in (facts or {}).get("relations") or []) if r]
    for k, t in enumerate(texts):
        if kind == "text" and k == i:
            pos = [m.start() for m in re.finditer(r"[A-Za-z0-9]", t)]
            p = rng.choice(pos)
            ch = t[p]
            rep = str((int(ch) + 1) % 10) if ch.isdigit() else ("b" if ch.lower() == "a" else "a")
            rep = rep.upper() if ch.isupper() else rep
            old_span, new_span, t = t, t[:p] + rep + t[p + 1:], t[:p] + rep + t[p + 1:]
            if new_span in texts:
                return None  # another visible text: the corrupted one would be true
        sentences.append(f'The text "{t}" is visible.')
    return " ".join(sentences), old_span, new_span


VICRIT_OBJECTS = ("dog", "cat", "car", "bus", "chair", "table", "bottle", "cup", "bird", "tree", "person", "clock")


def vicrit_step(in_path, out_path, seed=0):
    """`python -m variants.vicrit`: one ViCrit item per Sample with facts (vicrit_item), deterministic per (seed, id);
    items whose facts allow none are named on stderr and counted. -> summary dict."""
    errors = []
    samples = read_jsonl(in_path, errors=errors)
    items, skipped = [], {}
    for s in samples:
        item, why = vicrit_item(s, random.Random(f"vicrit|{seed}|{s.id}"))
        if item is None:
            print(f"vicrit: skipping {s.id}: {why}", file=sys.stderr)
            skipped[why] = skipped.get(why, 0) + 1
        else:
            items.append(item)
    write_jsonl(out_path, items)
    types = {}
    for it in items:
        types[it.meta["error_type"]] = types.get(it.meta["error_type"], 0) + 1
    return {"items": len(items), "of": len(samples), "unreadable": len(errors), "skipped": skipped, "types": types}



class _MixViCrit(argparse.Action):
    """--vicrit-data FILE: the loop's --mix-data FILE, its rows scored by the vicrit scheme."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.mix_data, namespace.mix_reward = values, "vicrit"


class ViCrit(Variant):
    """ViCrit rows (--vicrit-data, or --reward vicrit): items checked at load, their accuracy logged."""
    name = "vicrit"

    @staticmethod
    def add_args(ap):
        g = ap.add_argument_group("ViCrit (variants/vicrit.py)")
        g.add_argument("--vicrit-data", action=_MixViCrit, dest="mix_data", metavar="FILE", default=argparse.SUPPRESS,
                       help="ViCrit items (python -m variants.vicrit) mixed into every step; they earn ViCrit's reward "
                       "whatever --reward is (= --mix-data FILE --mix-reward vicrit)")
        g.add_argument("--vicrit-ratio", type=float, dest="mix_ratio", metavar="R", default=argparse.SUPPRESS, help="= --mix-ratio (ours; the "
                       "paper trains on ViCrit alone: --reward vicrit --data FILE)")

    @staticmethod
    def is_active(args):
        return "vicrit" in (args.reward, args.mix_reward)

    def drop_reason(self, sample, scheme):
        if (scheme == "vicrit" or is_vicrit(sample)) and not (is_vicrit(sample) and
                                                               isinstance(sample.meta.get("description"), str)):
            return "not a ViCrit item (python -m variants.vicrit)"
        return None

    def metrics(self, rows, parts):
        vic = torch.tensor([is_vicrit(s) for s, _ in rows], dtype=torch.bool)
        return {"vicrit/rows": vic.float().sum(), "vicrit/correct": (parts["ans"] * vic).sum()}

    def finish_metrics(self, metrics):  # ViCrit's answer accuracy over its own rows
        metrics["vicrit/acc"] = metrics.pop("vicrit/correct") / metrics["vicrit/rows"] if metrics["vicrit/rows"] else 0.0


def main(argv=None):
    ap = argparse.ArgumentParser(description="ViCrit items (find the corrupted phrase) from any Samples with facts",
                                 formatter_class=HelpFormatter)
    ap.add_argument("--in", dest="input", required=True, help="Samples JSONL with facts")
    ap.add_argument("--out", required=True, help="ViCrit items JSONL (train with --vicrit-data or --reward vicrit)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    summary = vicrit_step(a.input, a.out, a.seed)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
