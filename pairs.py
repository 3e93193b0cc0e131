"""PaLMR's judge pairs: labelled pairs without human labels, SceneAlign-style, to measure the judge with.

    python data.py shapes --n 200 --out data/shapes       # or any Samples JSONL with facts and a reference
    python pairs.py --in data/shapes/train.jsonl --out pairs.jsonl [--variants misgrounded,paraphrase] \
        [--rewriter-base-url http://127.0.0.1:8000/v1 --rewriter-model Qwen/Qwen3-30B-A3B]   # + pairs.summary.json
    python judge.py agree --pairs pairs.jsonl --backend rule --out agree_rule.json   # gate agreement per error type
    python judge.py agree --pairs pairs.jsonl --backend openai \
        --base-url http://127.0.0.1:8000/v1 --model Qwen/Qwen3-30B-A3B --out agree.json

Each item's reference trace becomes a candidate per variant (`perturb`, rules below; only the <think>
block changes, so the final answer stays the reference's): four error types (hallucinated_entity,
misgrounded, skipped_step, over_specified; label 'reference': the judge must gate the candidate) and two
faithful variants (paraphrase, reordered; label 'tie': it must not). A variant the rules cannot make is
skipped with its reason in the summary, or, with --rewriter-base-url, asked of an OpenAI-compatible LLM.
`judge.py agree` reads the pairs and reports the gate decision per error type and protocol.
Imports: pairs.py uses palmr.py (parse_response, COLOUR_WORDS, plural_noun) and judge.py (OpenAIClient,
for the rewriter); judge.py never imports pairs.py.
"""
import argparse
import json
import os
import random
import re
import sys
import types

from judge import OpenAIClient  # the rewriter's HTTP client (retries, backoff), the judge's own
from palmr import COLOUR_WORDS, HelpFormatter, parse_response, plural_noun  # the colour list and plurals (palmr.py owns them)


# -----------------------------------------------------------------------------
# `python pairs.py`: labelled pairs without human labels, from any data with facts and references.
# The four error types are SceneAlign's failure modes (arXiv 2601.05600: hallucinated entities, mis-grounded
# relations, skipped steps, over-specified reasoning); the paper builds its negatives from scene graphs, and
# its code and templates are not public, so the rules below are ours.

ERROR_TYPES = ("hallucinated_entity", "misgrounded", "skipped_step", "over_specified")
FAITHFUL = ("paraphrase", "reordered")  # variants that must not be gated: error_type "faithful"
SHAPE_COLOURS = ("red", "green", "blue", "yellow")  # data.COLORS: the colours a shapes scene can have
SHAPE_KINDS = ("circle", "square", "triangle")
DISTRACTORS = ("dog", "umbrella", "bicycle", "clock", "bottle", "chair", "kite", "bird")  # absent objects, real data
DETAILS = ("striped", "shiny", "dotted", "wooden")  # details no facts entry states
PARAPHRASES = (("I see ", "The image shows "), ("So there are ", "That makes "), ("There is no ", "The image has no "),
               ("There is a ", "The image has a "), ("There are ", "The image has "))
OPPOSITES = {"left": "right", "right": "left", "above": "below", "below": "above", "top": "bottom",
             "bottom": "top", "over": "under", "under": "over", "inside": "outside", "outside": "inside"}
_THINK = re.compile(r"^(\s*<think>)(.*?)(</think>.*)$", re.DOTALL)
_LIST = re.compile(r"^(.*?\b(?:see|shows|has|contains)\s+)(.+)\.$")


def _entries(facts):
    """(colours, name, count) per object entry with a name (colours: its attributes that are colour words)."""
    out = []
    for o in (facts or {}).get("objects") or []:
        if isinstance(o, dict) and str(o.get("name") or "").strip():
            attrs = [str(a).strip().lower() for a in o.get("attributes") or []]
            out.append(([a for a in attrs if a in COLOUR_WORDS], str(o["name"]).strip().lower(), o.get("count")))
    return out


def _sentences(think):
    return [x for x in re.split(r"(?<=[.!?])\s+", think.strip()) if x]


def _list_items(sentence):
    """'I see 2 red circles, 1 blue square and 1 yellow circle.' -> ('I see ', [3 items]) or None."""
    m = _LIST.match(sentence)
    if not m:
        return None
    items = re.split(r",\s+|\s+and\s+", m.group(2))
    counted = r"^(?:\d+|no|one|two|three|four|five|six|seven|eight|nine|a|an)\s+\S"  # "2 red circles", not "white stripes"
    return (m.group(1), items) if all(re.match(counted, x) for x in items) else None


def _join(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _mentions(think, facts, question):
    """Colour-and-name mentions of the facts' entries in the text, those not named by the question first:
    [(match of the colour word, colour, name)]."""
    words = set(re.findall(r"[a-z]+", question.lower()))
    found = []
    for colours, name, _ in _entries(facts):
        for c in colours:
            pat = rf"\b{re.escape(c)}\b(?=(?:\s+[\w-]+){{0,2}}?\s+(?:{re.escape(plural_noun(name))}|{re.escape(name)})\b)"
            for m in re.finditer(pat, think, re.IGNORECASE):
                found.append((bool({c, name, plural_noun(name)} & words), m.start(), m, c, name))
    return [(m, c, name) for _, _, m, c, name in sorted(found, key=lambda f: (f[0], f[1]))]


def perturb(kind, reference, facts, question, rng):
    """One variant of a reference trace: -> (candidate, detail) or (None, why not).

    kind: an ERROR_TYPES member (the candidate must be gated) or a FAITHFUL member (it must not be). Only
    the <think> block changes, so the final answer stays the reference's. Rules (ours):
    - hallucinated_entity: adds an object the facts do not have, named by neither the facts nor the
      question (shapes: '1 {colour} {kind}' into the observation list; other data: 'There is also a
      {colour} {DISTRACTORS member}.' after the first sentence);
    - misgrounded: a stated colour of an entry becomes a colour no entry of that name has (entries the
      question names last); without one, a spatial word of a facts relation becomes its opposite;
    - skipped_step: the first sentence (the observation) is left out, when another one remains and the
      first names an object or colour of the facts that the rest does not;
    - over_specified: a detail no entry has (DETAILS) is put before the first colour mention;
    - paraphrase: fixed rewordings (PARAPHRASES); reordered: the observation list rotated by one.
    """
    m = _THINK.match(reference or "")
    if not m:
        return None, "the reference has no <think> block"
    head, think, tail = m.groups()
    sents = _sentences(think)
    if not sents:
        return None, "empty <think> block"
    entries = _entries(facts)
    if not entries:
        return None, "no object entries in the facts"
    words = set(re.findall(r"[a-z]+", question.lower()))
    out = detail = None
    if kind == "hallucinated_entity":
        names = {n for _, n, _ in entries}
        if names <= set(SHAPE_KINDS):
            have = {(c, n) for cs, n, _ in entries for c in cs}
            options = [(c, k) for c in SHAPE_COLOURS for k in SHAPE_KINDS
                       if (c, k) not in have and c not in words and k not in words and k + "s" not in words]
            if options:
                c, k = rng.choice(options)
                listed = _list_items(sents[0])
                if listed:
                    sents[0] = listed[0] + _join(listed[1] + [f"1 {c} {k}"]) + "."
                else:
                    sents.insert(1, f"There is also 1 {c} {k}.")
                detail = f"added 1 {c} {k}"
        else:
            options = [d for d in DISTRACTORS if d not in names and d not in words and d + "s" not in words]
            if options:
                d, c = rng.choice(options), rng.choice(sorted(COLOUR_WORDS - {"gray", "magenta", "cyan"}))
                sents.insert(1, f"There is also a {c} {d}.")
                detail = f"added a {c} {d}"
    elif kind == "misgrounded":
        palette = SHAPE_COLOURS if {n for _, n, _ in entries} <= set(SHAPE_KINDS) else \
            sorted(COLOUR_WORDS - {"gray", "grey"})  # a synonym pair: one for the other would be true
        body = " ".join(sents)
        for hit, c, name in _mentions(body, facts, question):
            if any(n == name and not cs for cs, n, _ in entries):
                continue  # an entry of this name has no colour: another colour might be true of it
            taken = {x for cs, n, _ in entries if n == name for x in cs}
            options = [x for x in palette if x not in taken and x not in words]  # keeps the answer's derivation
            if options:
                new = rng.choice(options)
                body = body[:hit.start()] + new + body[hit.end():]
                sents, detail = [body], f"{c} {name} -> {new} {name}"
                break
        else:
            if (facts or {}).get("relations"):
                hit = re.search(rf"\b({'|'.join(OPPOSITES)})\b", body)
                if hit:
                    new = OPPOSITES[hit.group(1)]
                    sents, detail = [body[:hit.start()] + new + body[hit.end():]], f"{hit.group(1)} -> {new}"
    elif kind == "skipped_step":
        named = lambda text: {w for cs, n, _ in entries for w in cs + [n, plural_noun(n)]  # noqa: E731
                              if re.search(rf"\b{re.escape(w)}\b", text, re.IGNORECASE)}
        if len(sents) >= 2 and named(sents[0]) - named(" ".join(sents[1:])):  # it said something the rest does not
            detail, sents = f"left out: {sents[0]}", sents[1:]
    elif kind == "over_specified":
        body = " ".join(sents)
        taken = {str(a).lower() for o in (facts or {}).get("objects") or [] if isinstance(o, dict)
                 for a in o.get("attributes") or []}
        hits = _mentions(body, facts, question)
        options = [d for d in DETAILS if d not in taken]
        if hits and options:
            hit, c, name = hits[0]
            d = rng.choice(options)
            sents, detail = [body[:hit.start()] + d + " " + body[hit.start():]], f"{c} {name} -> {d} {c} {name}"
    elif kind == "paraphrase":
        body = " ".join(sents)
        new = body
        for a, b in PARAPHRASES:
            new = new.replace(a, b)
        if new != body:
            sents, detail = [new], "reworded"
    elif kind == "reordered":
        listed = _list_items(sents[0])
        if listed and len(listed[1]) >= 2:
            sents[0] = listed[0] + _join(listed[1][1:] + listed[1][:1]) + "."
            detail = "observation list rotated"
    else:
        raise ValueError(f"unknown variant {kind!r}; expected one of {ERROR_TYPES + FAITHFUL}")
    if detail is None:
        return None, "the rule does not apply to this trace"
    out = head + " ".join(sents) + tail
    if parse_response(out)[1] != parse_response(reference)[1]:
        return None, "the final answer changed"
    return out, detail


REWRITE = {  # the optional LLM rewriter's instruction per variant (ours)
    "hallucinated_entity": "mentions one object that is NOT among the facts, stated as plainly as the others",
    "misgrounded": "gets one attribute or spatial relation of an object wrong, contradicting the facts",
    "skipped_step": "leaves out one step of its visual observation",
    "over_specified": "adds one specific visual detail that the facts do not support",
    "paraphrase": "says exactly the same things in different words",
    "reordered": "states the same observations in a different order",
}


def rewrite_prompt(kind, question, facts, reference):
    return (f"Image facts (ground truth):\n{json.dumps(facts, ensure_ascii=False)}\n\nQuestion: {question}\n\n"
            f"[Response]\n{reference}\n[End of Response]\n\nRewrite the response so that it {REWRITE[kind]}. "
            "Change nothing else: keep the <think>...</think> layout and the final \\boxed{} answer exactly. "
            "Reply with the rewritten response only.")


def make_pairs(samples, seed=0, rewriter=None, kinds=ERROR_TYPES + FAITHFUL):
    """Labelled pairs from Samples with facts and a reference trace: -> (pairs, summary).

    Each pair: id, source_id, question, facts, answer, candidate, reference, label ('reference' for the
    error types: the reference is more faithful, the rollout must be gated; 'tie' for the faithful
    variants), error_type (an ERROR_TYPES member or 'faithful'), variant, detail, made_by ('rule' or
    'llm'). Deterministic per (seed, item id). With a rewriter (an OpenAIClient), a variant the rule
    cannot make is asked of the LLM (thinking off: the reply is the rewritten trace, <think> block and
    all); it is kept only when it differs from the reference and keeps the <think> format and the final
    answer.
    summary: per variant, made / rewritten / skipped reasons / rewriter failures.
    """
    pairs, summary, todo = [], {k: {"made": 0, "rewritten": 0, "rewriter_failed": 0, "skipped": {}} for k in kinds}, []
    for s in samples:
        for kind in kinds:
            if not s.facts or not s.reference:
                why = "no facts" if not s.facts else "no reference trace"
                summary[kind]["skipped"][why] = summary[kind]["skipped"].get(why, 0) + 1
                continue
            cand, detail = perturb(kind, s.reference, s.facts, s.question, random.Random(f"pairs|{seed}|{s.id}|{kind}"))
            if cand is None:
                todo.append((s, kind, detail))
                continue
            pairs.append(_pair(s, kind, cand, detail, "rule"))
            summary[kind]["made"] += 1
    replies = rewriter.complete([[{"role": "user", "content": rewrite_prompt(k, s.question, s.facts, s.reference)}]
                                 for s, k, _ in todo]) if rewriter is not None and todo else [None] * len(todo)
    for (s, kind, why), reply in zip(todo, replies):
        if reply is not None:
            text = None if reply.truncated or reply.text is None else reply.text.strip()  # asked with thinking off
            ok = (text and text != s.reference.strip() and parse_response(text)[2]
                  and parse_response(text)[1] == parse_response(s.reference)[1])
            if ok:
                pairs.append(_pair(s, kind, text, "LLM rewrite", "llm"))
                summary[kind]["made"] += 1
                summary[kind]["rewritten"] += 1
                continue
            summary[kind]["rewriter_failed"] += 1
            why = reply.error or "the rewrite changed the answer or the format, or changed nothing"
        summary[kind]["skipped"][why] = summary[kind]["skipped"].get(why, 0) + 1
    return pairs, summary


def _pair(s, kind, candidate, detail, made_by):
    faithful = kind in FAITHFUL
    return {"id": f"{s.id}:{kind}", "source_id": s.id, "question": s.question, "facts": s.facts, "answer": s.answer,
            "candidate": candidate, "reference": s.reference, "label": "tie" if faithful else "reference",
            "error_type": "faithful" if faithful else kind, "variant": kind, "detail": detail, "made_by": made_by}


def read_items(path):
    """Items of a Samples JSONL for pairs.py (id, question, answer, facts, reference), without importing
    data.py (pairs.py, like judge.py, sits below it): -> (items, errors); a bad row is named on stderr and
    skipped."""
    items, errors = [], []
    for lineno, line in enumerate(open(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            missing = [k for k in ("id", "question", "answer") if not isinstance(row, dict) or row.get(k) in (None, "")]
            if missing:
                raise ValueError(f"missing field(s) {missing}")
        except ValueError as e:
            errors.append(f"{path}:{lineno}: {e}")
            print(f"skipping bad row {errors[-1]}", file=sys.stderr)
            continue
        items.append(types.SimpleNamespace(id=str(row["id"]), question=row["question"], answer=str(row["answer"]),
                                           facts=row.get("facts"), reference=row.get("reference")))
    return items, errors


def _pairs_cli(a):
    samples, errors = read_items(a.inp)
    kinds = tuple(k for k in a.variants.split(",") if k)
    unknown = set(kinds) - set(ERROR_TYPES + FAITHFUL)
    assert not unknown, f"unknown variants {sorted(unknown)}; expected {ERROR_TYPES + FAITHFUL}"
    rewriter = None
    if a.rewriter_base_url:
        assert a.rewriter_model, "--rewriter-base-url needs --rewriter-model"
        rewriter = OpenAIClient(a.rewriter_base_url, a.rewriter_model, a.rewriter_api_key_env, a.concurrency,
                                a.timeout, reasoning=False, temperature=0.0)
    pairs, summary = make_pairs(samples, a.seed, rewriter, kinds)
    with open(a.out, "w") as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    summary = {"items": len(samples), "unreadable": len(errors), "pairs": len(pairs), "variants": summary}
    with open(os.path.splitext(a.out)[0] + ".summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    for k, v in summary["variants"].items():
        print(f"{k}: {v['made']} made ({v['rewritten']} by the rewriter, {v['rewriter_failed']} rewrites failed)"
              + (f"; skipped {v['skipped']}" if v["skipped"] else ""), file=sys.stderr)
    print(f"{len(pairs)} pairs from {len(samples)} items -> {a.out}", file=sys.stderr)
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--in", dest="inp", required=True, help="Samples JSONL with facts and reference")
    ap.add_argument("--out", required=True, help="pairs JSONL (a .summary.json goes next to it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(ERROR_TYPES + FAITHFUL), help="comma-separated subset")
    ap.add_argument("--rewriter-base-url", help="optional OpenAI-compatible LLM for variants the rule cannot make")
    ap.add_argument("--rewriter-model")
    ap.add_argument("--rewriter-api-key-env", default="OPENAI_API_KEY")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=120.0)
    return _pairs_cli(ap.parse_args(argv))


if __name__ == "__main__":
    main()
