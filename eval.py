r"""PaLMR evaluation: the paper's benchmarks from local files, scored by their official rules, plus the
process-hallucination rate.

    python eval.py --bench shapes                                  # tiny model, held-out shapes, exact judge
    python eval.py --checkpoints base=models/Qwen2.5-VL-7B-Instruct palmr=out/palmr_7b/checkpoint-000210 \
        --bench hallusion=bench/HallusionBench.tsv mmmu=bench/mmmu_validation.parquet \
                mathvista=bench/mathvista_testmini.parquet mathverse=bench/mathverse_testmini.parquet \
                mmstar=bench/MMStar.tsv --out out/eval

    python eval.py --bench mmstar=bench/MMStar.tsv --predictions other=preds/ --out out/eval   # no model

Benchmarks are read as published, through data.py's layout table (official JSON + image folder,
Hugging Face parquet with {bytes, path} images, VLMEvalKit TSV with base64 images); each is scored by
its official rule (README, "Benchmark scoring", names the source of each). A question without an image
is asked text-only; a corrupt image is reported per item and counted (`missing_images`), not fatal.
What cannot be scored stops the run, one line, before any model loads: an unknown benchmark name, a file
whose layout (detected from its columns) is not the benchmark's (`NAME=FILE:LAYOUT` forces one), a file
with no readable item.
`--predictions LABEL=DIR` scores `<bench>.predictions.jsonl` files made elsewhere, loading no model.
Generation goes through the sampling engine (greedy by default); the prompt, decoding settings, pixel
limit and max tokens are recorded with every result, because published numbers move with them.
Predictions are cached per item (OUT/<checkpoint>/<bench>.predictions.jsonl): a rerun only generates
what is missing. `--facts FILE` (JSONL of id + facts, e.g. from `data.py facts`) enables the
process-hallucination rate on real benchmarks: among answers graded correct, the share the judge finds
unfaithful to the facts (pairwise where a reference exists, point-wise otherwise).
"""
import argparse
import ast
import json
import random
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import palmr
import report
from judge import JudgeItem, RuleJudge, claims, contradictions, make_judge
from data import LAYOUTS, detect_layout, load_images, mmstar_options, raw_rows, read_row
from rewards import grade_answer, strip_unit, unwrap_latex


# -----------------------------------------------------------------------------
# Answer extraction: one extractor for all benchmarks


def extract_answer(text):
    """The last \\boxed{...}, else the last <answer>...</answer>, else None (the benchmark's fallback);
    LaTeX text wrappers are unwrapped (\\boxed{\\text{B}} -> 'B'), as the official scorers read plain text."""
    boxed = palmr.last_boxed(text or "")
    if boxed is None:
        tags = re.findall(r"<answer>(.*?)</answer>", text or "", re.DOTALL)
        boxed = tags[-1] if tags else None
    return None if boxed is None else unwrap_latex(boxed).strip()


# -----------------------------------------------------------------------------
# Loading: one item dict per question, through data.py's layout table (the same one ingest reads)

# The layouts each benchmark is scored from (data.py's LAYOUTS names): its own published file, VLMEvalKit's
# TSV of it, and for MMStar (letter gold, options in the question) any file with question/answer/image columns.
# A file of another layout would be scored by the wrong rule (a HallusionBench file as MMMU): it is refused.
BENCH_LAYOUTS = {"hallusion": ("hallusionbench", "vlmevalkit"), "mmmu": ("mmmu", "vlmevalkit"),
                 "mathvista": ("mathvista", "vlmevalkit"), "mathverse": ("mathverse", "vlmevalkit"),
                 "mmstar": ("mmstar", "vlmevalkit", "generic")}
KNOWN_BENCHES = ("shapes", *BENCH_LAYOUTS)


def _is_hallusion_tsv(row):
    """VLMEvalKit's HallusionBench.tsv: its l2-category holds the VD_/VS_ keys its scorer splits (data.py's rule)."""
    return str(row.get("l2-category", "")).startswith(("VD_", "VS_"))


def check_layout(bench, path, row, layout):
    """SystemExit (one line) when the file's layout is not one `bench` is scored from."""
    name = layout.name + (" (HallusionBench)" if layout.name == "vlmevalkit" and _is_hallusion_tsv(row) else "")
    hallusion_tsv = layout.name == "vlmevalkit" and (bench == "hallusion") != _is_hallusion_tsv(row)
    if layout.name not in BENCH_LAYOUTS[bench] or hallusion_tsv:
        own = next(l for l in LAYOUTS if l.name == BENCH_LAYOUTS[bench][0])
        raise SystemExit(f"{path}: layout {name}, expected {bench}'s (columns {', '.join(own.needs)}; or VLMEvalKit's "
                         f"TSV of it); to score it as {bench} anyway: --bench {bench}={path}:LAYOUT")


def load_bench(bench, path, limit=None, layout=None):
    """-> (items, problems): items are dicts with id (the benchmark's own), question, choices, answer,
    image (PIL, or None for a question asked without one), meta; problems name each item that failed.
    layout: a data.py layout name that overrides the detected one (and its check against the benchmark).

    A row without image values is asked as a text-only question (HallusionBench's 178), except in
    VLMEvalKit TSVs, which drop such rows (its skip_noimg) and so does this. A row whose image does not
    load keeps image None with meta.image_error: it is not generated, and scores as wrong. SystemExit
    (one line, before any model loads) for a missing file, a layout the benchmark is not scored from,
    or a file with no readable item."""
    if not Path(path).exists():
        raise SystemExit(f"{path}: no such file or folder (--bench {bench}=FILE)")
    rows = list(raw_rows(path))
    first = next((r for _, _, r, _ in rows if "_unreadable" not in r), {})
    if layout is None:
        layout = detect_layout(first, Path(path).suffix)
        check_layout(bench, path, first, layout)
    else:
        layout = next(l for l in LAYOUTS if l.name == layout)
    items, problems = [], []
    for _, index, raw, base in rows:
        if limit and len(items) >= limit:
            break
        try:
            item = read_row(raw, layout)
        except ValueError as e:
            problems.append(f"{bench} row {index + 1}: {e}")
            continue
        item["id"] = item["id"] or str(index)
        images = item.pop("images")
        if not images and layout.name == "vlmevalkit":
            continue
        item["image"] = None
        item["meta"]["text_only"] = not images
        item["meta"]["n_images"] = len(images)
        if images:
            try:
                item["image"] = load_images(images, base)
            except ValueError as e:
                problems.append(f"{bench} item {item['id']}: cannot read image: {str(e)[:300]}")
                item["meta"]["image_error"] = str(e)[:300]
        if bench == "hallusion":  # official JSON: gt_answer "1"/"0" (the layout reads yes/no); TSV: Yes/No
            gold = item["answer"].strip().lower()
            item["answer"], item["choices"] = {"1": "yes", "0": "no"}.get(gold, gold), None
        if bench in ("mathverse", "mmstar") and layout.name != "vlmevalkit":
            item["choices"] = None  # the options are written inside the question; the gold is a letter
        items.append(item)
    if not items:  # an acc of 0.0 over nothing would read as a result
        why = f"; first problem: {problems[0]}" if problems else ""
        raise SystemExit(f"{path}: no readable {bench} item in {len(rows)} rows (layout {layout.name}){why}")
    return items, problems


# -----------------------------------------------------------------------------
# Scoring by the official rules, each read from the official code (README, "Benchmark scoring")

_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def process_punctuation(text):
    """VLMEvalKit's (VQA eval's) punctuation rule (vlmeval/smp/misc.py): each listed mark is deleted where it
    touches a space (or the text has a digit,digit) and becomes a space elsewhere; then the first 32 periods
    not followed by a digit are deleted. ':', '*', "'" and '#' stay."""
    out = text
    for p in _VQA_PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or re.search(r"\d,\d", text)) else " ")
    return re.sub(r"\.(?!\d)", "", out, count=32)  # upstream's '(?!<=\d)' is a lookahead typo: this is what it does


def yes_no(text):
    """VLMEvalKit's YOrN_Extraction (vlmeval/dataset/utils/yorn.py): lower-case, punctuation rule, words;
    'yes' xor 'no' among the words -> that, both or neither -> 'unknown' (so '**Yes**' is unknown)."""
    words = process_punctuation((text or "").lower()).split()
    if ("yes" in words) == ("no" in words):
        return "unknown"
    return "yes" if "yes" in words else "no"


def hallusion_scores(records):
    """aAcc, fAcc, qAcc (percent) and their mean, as tianyi-lab/HallusionBench utils.py computes them, with
    VLMEvalKit's yes/no word match standing in for its GPT-4 check. records: category, subcategory,
    set_id, figure_id, question_id, visual_input, gt_answer, prediction (raw output).
    A VS question with figure 0 (asked without an image) also accepts 'unknown'; fAcc skips that figure;
    qAcc keeps it in its group (get_eval_all, get_eval_fig, get_eval_pair_all)."""
    def correct(r):
        pred = yes_no(extract_answer(r["prediction"]) or r["prediction"])
        gt = {"1": "yes", "0": "no"}.get(str(r["gt_answer"]).strip().lower(), str(r["gt_answer"]).strip().lower())
        if pred == "unknown" and r["category"] == "VS" and str(r["figure_id"]) == "0" and str(r.get("visual_input")) == "0":
            return True
        return pred == gt
    figures, groups, right = {}, {}, []
    for r in records:
        ok = correct(r)
        right.append(ok)
        key = f"{r['category']}_{r['subcategory']}_{r['set_id']}"
        if not (r["category"] == "VS" and str(r["figure_id"]) == "0"):
            figures.setdefault(f"{key}_{r['figure_id']}", []).append(ok)
        groups.setdefault(f"{key}_{r['question_id']}", []).append(ok)
    pct = lambda xs: 100.0 * sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    scores = {"aAcc": pct(right), "fAcc": pct([all(v) for v in figures.values()]),
              "qAcc": pct([all(v) for v in groups.values()])}
    scores["avg"] = (scores["aAcc"] + scores["fAcc"] + scores["qAcc"]) / 3
    scores.update(n_questions=len(records), n_figures=len(figures), n_groups=len(groups))
    return scores


def mmmu_choice(response, choices, item_id):
    """MMMU's parse_multi_choice_response (mmmu/utils/eval_utils.py): strip , . ! ? ; : ' once each from the
    ends; '(X)' first, else ' X ' between spaces, else (replies of more than 5 words) the option text;
    several -> the one whose last mention is latest; none -> a random letter. Ours: that random letter
    is seeded by the item id (the official one draws from one global seed-42 stream, so it depends on
    the order items are scored in)."""
    for ch in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(ch)
    text = f" {response} "
    letters = [chr(65 + i) for i in range(len(choices))]
    found = [c for c in letters if f"({c})" in text]
    where = lambda c: text.rfind(f"({c})")  # noqa: E731
    if not found:
        found = [c for c in letters if f" {c} " in text]
        where = lambda c: text.rfind(f" {c} ")  # noqa: E731
    if not found and len(text.split()) > 5:
        found = [c for c, opt in zip(letters, choices) if str(opt).lower() in text.lower()]
        where = lambda c: text.lower().rfind(str(choices[letters.index(c)]).lower())  # noqa: E731
    if not found:
        return random.Random(item_id).choice(letters)
    return max(found, key=lambda c: (where(c), -found.index(c)))  # ties: the first candidate (np.argmax)


def _mmmu_numbers(text):
    """MMMU's extract_numbers: three overlapping regexes (with commas, scientific, simple), all kept."""
    return (re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text) + re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
            + re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", text))


def _mmmu_normalize(s):
    """MMMU's normalize_str: a number -> [round(x, 2)]; text -> [lower] ([' x', 'x '] for one character)."""
    s = str(s).strip()
    try:
        return [round(float(s.replace(",", "")), 2)]
    except ValueError:
        s = s.lower()
        return [" " + s, s + " "] if len(s) == 1 else [s]


def mmmu_open(response, gold):
    """MMMU's parse_open_response + eval_open: lower-case, split on newlines; per piece the shortest tail
    after an indicator ('could be ', 'so ', 'is ', 'thus ', 'therefore ', 'final ', 'answer ', 'result ',
    and '=' in the last piece); those plus every number in them, normalised; correct when a text
    candidate contains a normalised gold string or a number equals a normalised gold number. A gold
    written as a list ("['24/7', '3.429']", or a list) accepts any member."""
    subs = re.split(r"\.\s(?=[A-Z])|\n", response.strip().strip(".").lower())
    indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    keys = []
    for i, sub in enumerate(subs):
        tails = [sub.split(ind)[-1].strip() for ind in indicators + (["="] if i == len(subs) - 1 else []) if ind in sub]
        tails = [t for t in tails if t]
        shortest = min(tails, key=len) if tails else None
        if shortest and shortest not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    keys = keys or [response.strip().strip(".").lower()]
    preds = {p for k in keys + [n for k in keys for n in _mmmu_numbers(k)] for p in _mmmu_normalize(k)}
    golds = gold if isinstance(gold, list) else [gold]
    if isinstance(gold, str) and gold.strip().startswith("["):
        try:
            golds = list(ast.literal_eval(gold))
        except (ValueError, SyntaxError, TypeError):  # an interval such as '[1, 2)': one string gold
            golds = [gold]
    norm = [g for x in golds for g in _mmmu_normalize(x)]
    return any((isinstance(p, str) and any(isinstance(g, str) and g in p for g in norm))
               or (not isinstance(p, str) and p in norm) for p in preds)


def edit_distance(a, b):
    """Levenshtein distance (characters), as MathVista's get_most_similar uses it."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def mathvista_prediction(extraction, item):
    """MathVista's normalize_extracted_answer (evaluation/calculate_score.py); compared to the gold by
    string equality. multi_choice: '(c)' -> 'C', a letter -> its option, anything else -> the option
    nearest by edit distance (first on ties); integer: str(int(float(x))) (truncates); float:
    str(round(float(x), precision)); list: as written. Ours, in place of its GPT extraction step: the
    boxed answer with LaTeX wrappers, the item's unit and degree signs removed; without one, the last
    number of the reply for numeric types."""
    meta, choices = item["meta"], item["choices"]
    if str(meta.get("question_type")) == "multi_choice" and choices:
        text = str(extraction).strip()
        m = re.findall(r"\(([a-zA-Z])\)", text)
        text = m[0].upper() if m else text
        letters = [chr(65 + i) for i in range(len(choices))]
        return choices[letters.index(text)] if text in letters else min(choices, key=lambda c: edit_distance(text, c))
    kind = str(meta.get("answer_type"))
    if kind in ("integer", "float"):
        text = strip_units(extraction, meta.get("unit"))
        if THOUSANDS.fullmatch(text):  # '1,000' -> '1000'; a list ('1, 2, 3', '1,2,3') stays unreadable: wrong
            text = text.replace(",", "")
        try:
            value = float(text)
            if kind == "integer":
                return str(int(value))
            return str(round(value, int(float(meta.get("precision")))))
        except (ValueError, TypeError, OverflowError):
            return None
    return str(extraction)


# A number with thousands separators: groups of three digits after the first (math-verify's parser.py
# lazy_expr_regex, format 1, with commas only). MathVista's normalize_extracted_answer calls float() on its GPT
# extraction, which writes 1000; our rule-based extraction stands in for it, so only these commas are dropped.
THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")  # '1,000' whole; '1,2,3' as 1, 2, 3


def strip_units(text, unit=None):
    """'145^\\circ' -> '145', '5 cm' (unit 'cm') -> '5', '$1.45' -> '1.45': what MathVista's extractor
    drops before a numeric comparison: the item's own `unit`, then what rewards.strip_unit knows."""
    text = unwrap_latex(str(text)).replace("$", "").strip()
    if unit:
        text = re.sub(rf"\s*{re.escape(str(unit).strip())}\s*$", "", text)
    return (strip_unit(text) or text).strip().rstrip(".").strip()


MCQ_REJECT = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
              "I'm sorry, but without the image provided", "Cannot determine the answer")


def mcq_letter(answer, options):
    """VLMEvalKit's can_infer (vlmeval/utils/matching_util.py) without a judge model: options {letter: text}.
    can_infer_option: . ( ) [ ] , : ; ! * # { } become spaces; exactly one option letter as a whole
    word, within the last 4 words -> it; else 'answer is X' anywhere -> X (ours: not the article in 'the
    answer is a cube'); else can_infer_text: one option text inside a reply at most twice as long as all
    options -> its letter. Else 'Z' (wrong)."""
    if any(r in answer for r in MCQ_REJECT):
        return "Z"
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", answer).split()
    present = [c for c in options if c in words]
    if len(present) == 1 and words.index(present[0]) > len(words) - 5:
        return present[0]
    if not present and "Z" in words:
        return "Z"
    # upstream's _VERBOSE_ANSWER_RE reads any letter after 'answer is', case-insensitively, so 'the answer is a
    # cube' gives A. Ours: a capital letter as a whole word, or a lower-case one with no word after it ('answer
    # is b.'): the article 'a' before a noun is not an option.
    m = re.search(r"(?i:(?:correct\s+)?answer\s+is)\s+\**\(?(?:([A-J])\b|([a-j])(?![\w-])(?!\s*\**\s*[A-Za-z]))", answer)
    letter = m and (m.group(1) or m.group(2)).upper()
    if letter and letter in options:
        return letter
    texts = {k: str(v).lower() for k, v in options.items() if v}
    if texts and len(answer) <= 2 * sum(len(v) for v in texts.values()):
        hits = [k for k, v in texts.items() if v in answer.lower()]
        if len(hits) == 1:
            return hits[0]
    return "Z"


def _options(item, n=4):
    """{letter: text} of an item: its choices, MMStar's options parsed from the question, or bare letters."""
    texts = item["choices"] or item["meta"].get("options") or mmstar_options(item.get("question", "")) or [""] * n
    return {chr(65 + i): t for i, t in enumerate(texts)}


def score_item(bench, item, prediction):
    """Is this prediction correct under the benchmark's official rule? The rule runs on our extracted
    answer (last \\boxed{}, else <answer>), or on the whole reply when there is none."""
    boxed = extract_answer(prediction)
    answer = boxed if boxed is not None else (prediction or "")
    meta, choices, gold = item["meta"], item["choices"], item["answer"]
    if bench == "hallusion":
        pred = yes_no(answer)
        no_image = meta.get("category") == "VS" and str(meta.get("figure_id")) == "0" and str(meta.get("visual_input")) == "0"
        return pred == gold or (pred == "unknown" and no_image)  # the official rule, as in hallusion_scores
    if bench == "mmmu":
        if choices and str(meta.get("question_type", "multiple-choice")) == "multiple-choice":
            return mmmu_choice(answer, choices, item["id"]) == gold.strip()
        return mmmu_open(answer, meta.get("answers") or gold)  # a list gold accepts any member
    if bench == "mathvista":
        kind = str(meta.get("answer_type"))
        if boxed is None and kind in ("integer", "float"):
            numbers = NUMBER.findall(answer)
            answer = numbers[-1] if numbers else ""
        pred = mathvista_prediction(answer, item)
        if str(meta.get("question_type")) != "multi_choice" and kind == "text":
            return pred is not None and grade_answer(pred, gold)  # no official rule: math equivalence
        return pred == gold
    if bench == "mathverse":  # its official scorer is a GPT judge (or exact string match): see README
        if str(meta.get("question_type", "")).startswith("multi"):
            return mcq_letter(answer, _options(item, 5)) == gold.strip().upper()
        return grade_answer(answer, gold)
    if bench == "mmstar":
        return mcq_letter(answer, _options(item)) == gold.strip().upper()
    return grade_answer(answer, gold, choices)  # shapes and anything rule-graded


def aggregate(bench, items, predictions):
    """Benchmark scores from items and their raw predictions."""
    right = [score_item(bench, it, predictions[it["id"]])  # math-verify may take seconds: a bar after 5 s
             for it in tqdm(items, desc=f"score {bench}", mininterval=2, delay=5)]
    acc = 100.0 * sum(right) / max(1, len(right))
    if bench == "hallusion":
        recs = [{**{k: it["meta"].get(k) for k in ("category", "subcategory", "set_id", "figure_id", "question_id",
                                                      "visual_input")}, "gt_answer": it["answer"],
                 "prediction": predictions[it["id"]]} for it in items]
        return hallusion_scores(recs), right
    if bench == "mathverse":
        versions = {}
        for it, ok in zip(items, right):
            versions.setdefault(str(it["meta"].get("problem_version", "all")), []).append(ok)
        out = {"acc": acc, **{f"acc/{v}": 100.0 * sum(x) / len(x) for v, x in sorted(versions.items())}}
        out["vision_only"] = out.get("acc/Vision Only", float("nan"))
        return out, right
    return {"acc": acc}, right


# -----------------------------------------------------------------------------
# Process hallucination

def hallucination(judge, items, predictions, right, facts):
    """Among correct answers with facts, the share the judge finds unfaithful -> dict with judge and n."""
    judged = [(it, predictions[it["id"]]) for it, ok in zip(items, right) if ok and facts.get(it["id"])]
    if not judged:
        return {"hallucination_rate": None, "hallucination_n": 0}
    verdicts = judge.judge([JudgeItem(it["question"], facts[it["id"]], pred, it.get("reference")) for it, pred in judged])
    usable = [v for v in verdicts if not v.failed]
    rate = 100.0 * sum(v.s_vis == 0 for v in usable) / max(1, len(usable))
    return {"hallucination_rate": rate, "hallucination_n": len(usable), "hallucination_failed": len(verdicts) - len(usable),
            "judge": getattr(judge, "name", type(judge).__name__)}


def shapes_perception(items, predictions):
    """shapes only (exact facts): perception accuracy = share of replies whose reasoning makes at least one
    scene claim and no wrong one; complete perception = no wrong claim and every group of the scene stated
    with its count (a reply that says less cannot score it); claims per reply; hallucination = among
    correct answers, the share with a wrong claim."""
    ok_perception, complete, n_claims, halluc, n_correct = 0, 0, 0, 0, 0
    coverage = RuleJudge().coverage([JudgeItem(it["question"], it["facts"], predictions[it["id"]], None) for it in items])
    for it, cov in zip(items, coverage):
        text = predictions[it["id"]]
        think, answer, _ = palmr.parse_response(text)
        wrong = contradictions(text, it["facts"])
        said = claims(think or text)
        ok_perception += bool(said) and not wrong
        complete += cov == 1.0 and not wrong
        n_claims += len(said)
        if grade_answer(answer, it["answer"], it["choices"]):
            n_correct += 1
            halluc += bool(wrong)
    n = max(1, len(items))
    return {"perception_acc": 100.0 * ok_perception / n, "perception_complete": 100.0 * complete / n,
            "claims_per_reply": n_claims / n,
            "hallucination_rate": 100.0 * halluc / n_correct if n_correct else None,
            "hallucination_n": n_correct, "judge": "rule"}


# -----------------------------------------------------------------------------
# Generation with a cache per item

def read_predictions(path):
    """{id: prediction} of a predictions JSONL ({"id", "prediction"} per line); a torn last line is skipped."""
    out = {}
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                row = json.loads(line)
                out[str(row["id"])] = row["prediction"]
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a killed run: regenerate that item
    return out


def generate(engine, processor, bench, items, cache_path, args):
    """Greedy (or sampled) predictions, appended per batch to cache_path -> ({id: text}, problems).

    A prediction is the assistant turn as a whole (the template's prefilled tail + the completion).
    Items with an image and text-only questions are batched apart; items whose image did not load
    are not generated. A batch that fails is retried item by item, so one bad item is reported with
    its id and cause and the others still get their predictions."""
    cache, problems = read_predictions(cache_path), []
    todo = [it for it in items if it["id"] not in cache and (it["image"] is not None or it["meta"].get("text_only"))]
    cache_path.parent.mkdir(parents=True, exist_ok=True)

    def run(chunk, seed):
        instruction = getattr(args, "instruction", palmr.INSTRUCTION)
        prompts = [palmr.Prompt(palmr.render_prompt(processor, it["question"], it["choices"], image=it["image"] is not None,
                                                    instruction=instruction), it["image"]) for it in chunk]
        outs = engine.generate(prompts, n=1, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_p=args.top_p, seed=seed)
        return [palmr.assistant_turn(p.text, c.text) for p, (c,) in zip(prompts, outs)]

    with open(cache_path, "a") as f:
        for kind in (True, False):  # with an image, then text-only
            part = [it for it in todo if (it["image"] is not None) == kind]
            for s in tqdm(range(0, len(part), args.batch), desc=f"{bench}", mininterval=2, disable=not part):
                chunk = part[s:s + args.batch]
                try:
                    texts = run(chunk, args.seed + s)
                except (ValueError, RuntimeError, AssertionError):  # find the item(s) at fault
                    texts = []
                    for k, it in enumerate(chunk):
                        try:
                            texts += run([it], args.seed + s + k)
                        except (ValueError, RuntimeError, AssertionError) as e1:
                            problems.append(f"{bench} item {it['id']}: generation failed: {type(e1).__name__}: {str(e1)[:200]}")
                            texts.append(None)
                for it, text in zip(chunk, texts):
                    if text is not None:
                        cache[it["id"]] = text
                        f.write(json.dumps({"id": it["id"], "prediction": text}) + "\n")
                f.flush()
    return cache, problems


def bench_scores(name, items, preds, judge=None, facts=None, path=""):
    """Scores of one benchmark from {id: prediction}: the official aggregate, counts, and the perception /
    hallucination columns (shapes: exact; others: with a judge and facts). A missing prediction (image
    unreadable, generation failed, or absent from a predictions file) is scored as a wrong empty answer
    and counted. Used by main() and by the trainer's validation (grpo.py --eval-every)."""
    n_missing = sum(it["id"] not in preds for it in items)
    preds = {**{it["id"]: "" for it in items}, **preds}
    scores, right = aggregate(name, items, preds)
    scores.update(n=len(items), missing_images=sum(it["image"] is None and not it["meta"].get("text_only") for it in items),
                  text_only=sum(bool(it["meta"].get("text_only")) for it in items), missing_predictions=n_missing)
    if name == "shapes":
        scores.update(shapes_perception(items, preds))
    elif judge is not None:
        stem = Path(path).stem  # facts written by data.py carry ids namespaced by the file
        facts = facts or {}
        scores.update(hallucination(judge, items, preds, right,
                                    {it["id"]: facts.get(it["id"]) or facts.get(f"{stem}/{it['id']}") for it in items}))
    return scores


def parse_bench(spec):
    """`shapes`, NAME=FILE or NAME=FILE:LAYOUT -> (name, path, layout or None); SystemExit (one line) for an
    unknown benchmark or layout, or a benchmark without its file."""
    name, _, path = spec.partition("=")
    if name not in KNOWN_BENCHES:
        raise SystemExit(f"--bench {spec}: unknown benchmark {name!r}; known: {', '.join(KNOWN_BENCHES)}")
    if name != "shapes" and not path:
        raise SystemExit(f"--bench {spec}: {name} needs its file: {name}=FILE")
    head, _, tail = path.rpartition(":")
    if head and not Path(path).exists():  # FILE:LAYOUT (a path may hold ':' itself, so only when FILE is not one)
        if tail not in {l.name for l in LAYOUTS}:
            raise SystemExit(f"--bench {spec}: unknown layout {tail!r}; known: {', '.join(l.name for l in LAYOUTS)}")
        return name, head, tail
    return name, path, None


def bench_problem(spec, flag="--bench"):
    """Why a benchmark spec cannot run (parse_bench's refusal, or its file missing), checked before any model
    loads; None when it can."""
    try:
        path = parse_bench(spec)[1]
    except SystemExit as e:
        return str(e)
    return f"{flag} {spec}: no such file" if path and not Path(path).exists() else None


def load_items(spec, limit=None):
    """`shapes`, NAME=FILE or NAME=FILE:LAYOUT -> (name, path, items, problems)."""
    name, path, layout = parse_bench(spec)
    items, problems = shapes_items(limit) if name == "shapes" else load_bench(name, path, limit, layout)
    return name, path, items, problems


def shapes_items(limit):
    from data import ensure_shapes, load_image, read_jsonl
    path = ensure_shapes(n=200, split="test", seed=1)
    items = []
    for s in read_jsonl(path)[:limit]:
        items.append({"id": s.id, "question": s.question, "choices": s.choices, "answer": s.answer,
                      "image": load_image(s), "facts": s.facts, "reference": s.reference, "meta": {"source": s.source}})
    return items, []


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=palmr.HelpFormatter)  # layout kept, defaults shown
    # what to evaluate
    g = ap.add_argument_group("benchmarks and models")
    g.add_argument("--bench", nargs="+", default=["shapes"], metavar="NAME=FILE[:LAYOUT]",
                   help=f"NAME one of {', '.join(KNOWN_BENCHES)} (shapes needs no file); the file's layout is detected "
                        "from its columns and refused when it is not the benchmark's; :LAYOUT (a data.py layout name, "
                        "e.g. mmstar=preds.jsonl:generic) overrides the detection")
    g.add_argument("--checkpoints", nargs="+", default=None, metavar="[LABEL=]PATH",
                   help="LABEL=PATH or PATH (none: the tiny checkpoint, unless --predictions is given)")
    g.add_argument("--predictions", nargs="+", default=[], metavar="LABEL=DIR",
                   help="score predictions made elsewhere, no model loaded: DIR/<bench>.predictions.jsonl of "
                        "{id, prediction} (the layout of OUT/<checkpoint>/); LABEL is the column")
    g.add_argument("--out", default="out/eval", help="results.json, results.md and the prediction caches")
    g.add_argument("--limit", type=int, default=None, help="first N items of each benchmark (quick runs)")
    # generation: recorded with every result
    g = ap.add_argument_group("generation")
    g.add_argument("--prompt", default="palmr", choices=["palmr", "sr1"], help="the instruction every checkpoint "
                   "gets: PaLMR's <think> format, or Vision-SR1's <description><think> (for policies trained in it)")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="tokens per reply (a cut reply has no answer)")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, with --temperature > 0")
    g.add_argument("--max-pixels", type=int, default=1003520, help="image pixel budget (shapes: 112 x 112)")
    g.add_argument("--batch", type=int, default=16, help="prompts per generate call")
    g.add_argument("--engine", default="auto", choices=["auto", "hf", "vllm"], help="auto: vLLM when installed and on GPU")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (per batch: seed + offset)")
    # process-hallucination rate
    g = ap.add_argument_group("process-hallucination rate")
    g.add_argument("--facts", default=None, help="JSONL of {id, facts[, reference]} for the hallucination rate")
    g.add_argument("--judge", default="rule", choices=["rule", "openai", "hf"], help="the visual-fidelity judge (judge.py)")
    g.add_argument("--judge-base-url", default=None, help="--judge openai: the server's /v1 URL")
    g.add_argument("--judge-model", default=None, help="--judge openai: model name; --judge hf: a local folder")
    g = ap.add_argument_group("other")
    g.add_argument("--study-report", default=None, metavar="OUT",
                   help="only write runs/shapes_study.sh's OUT/results.md and OUT/curves.png from its runs")
    a = ap.parse_args(argv)
    a.instruction = palmr.SR1_INSTRUCTION if a.prompt == "sr1" else palmr.INSTRUCTION
    if a.study_report:
        return report.study_report(a.study_report)
    out = Path(a.out)
    checkpoints = {}
    for c in a.checkpoints or ([] if a.predictions else [palmr.ensure_tiny_checkpoint()]):
        label, _, path = c.rpartition("=") if "=" in c else (Path(c).name, "", c)
        checkpoints[label] = palmr.ensure_tiny_checkpoint(path) if palmr.tiny_family(path) else path
    made_elsewhere = {}
    for c in a.predictions:
        label, _, path = c.partition("=")
        assert path and Path(path).is_dir(), f"--predictions {c}: expected LABEL=DIR with <bench>.predictions.jsonl files"
        made_elsewhere[label] = Path(path)
    benches = {name: path for name, path, _ in map(parse_bench, a.bench)}  # every spec checked before any loading
    loaded = {}  # read (and refused) before a judge or checkpoint loads
    for spec in a.bench:
        name, _, items, problems = load_items(spec, a.limit)
        loaded[name] = (items, problems)
        for p in problems:
            print(p, file=sys.stderr)
    facts = {}
    if a.facts:
        for line in Path(a.facts).read_text().splitlines():
            row = json.loads(line)
            facts[str(row["id"])] = row.get("facts")
    judge = make_judge(a.judge, a.judge_base_url, a.judge_model) if a.facts else None
    settings = {"prompt": a.instruction, "decoding": "greedy" if a.temperature <= 0 else
                f"temperature {a.temperature}, top_p {a.top_p}", "max_new_tokens": a.max_new_tokens,
                "max_pixels": {b: (112 * 112 if b == "shapes" else a.max_pixels) for b in benches},
                "limit": a.limit, "answer_extraction": "last \\boxed{}, else <answer>, else the benchmark's rule"}
    results = {"settings": settings, "checkpoints": {}}

    def score(label, name, items, preds, problems):
        for p in problems:
            print(p, file=sys.stderr)
        results["checkpoints"][label][name] = bench_scores(name, items, preds, judge, facts, benches[name])

    for label, folder in made_elsewhere.items():
        results["checkpoints"][label] = {"path": str(folder), "predictions": "made elsewhere"}
        for name, (items, _) in loaded.items():
            preds = read_predictions(folder / f"{name}.predictions.jsonl")
            score(label, name, items, preds, [f"{label}: no predictions file for {name} in {folder}"] if not preds else [])
    for label, path in checkpoints.items():
        processor = palmr.load_processor(path)
        engine_name = palmr.select_engine(a.engine, torch.cuda.is_available(), _has_vllm())
        results["checkpoints"][label] = {"path": str(path)}
        engine = palmr.HFEngine(palmr.load_model(path, device="cuda" if torch.cuda.is_available() else "cpu"),
                                processor, a.max_pixels) if engine_name == "hf" else \
            palmr.VLLMEngine(path, processor, a.max_pixels, seed=a.seed)  # loaded once per checkpoint
        for name, (items, _) in loaded.items():
            engine.max_pixels = settings["max_pixels"][name]
            preds, problems = generate(engine, processor, name, items, out / label / f"{name}.predictions.jsonl", a)
            score(label, name, items, preds, problems)
    (out).mkdir(parents=True, exist_ok=True)
    results["versions"] = palmr.versions()  # what the numbers were measured with (constraints.txt)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown_table(results)
    (out / "results.md").write_text(table + "\n")
    print(table)
    return results


def _has_vllm():
    import importlib.util
    return importlib.util.find_spec("vllm") is not None


HEADLINE = {"hallusion": ["aAcc", "fAcc", "qAcc", "avg"], "mathverse": ["acc", "vision_only"],
            "shapes": ["acc", "perception_acc", "perception_complete", "claims_per_reply", "hallucination_rate"]}


def markdown_table(results):
    """Checkpoints side by side, one column per benchmark metric."""
    cols = []
    for label, res in results["checkpoints"].items():
        for bench, scores in res.items():
            if bench in ("path", "predictions"):
                continue
            for m in HEADLINE.get(bench, ["acc"]) + (["hallucination_rate"] if "judge" in scores and bench != "shapes" else []):
                if (bench, m) not in cols:
                    cols.append((bench, m))
    head = "| checkpoint | " + " | ".join(f"{b} {m}" for b, m in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for label, res in results["checkpoints"].items():
        cells = []
        for b, m in cols:
            v = res.get(b, {}).get(m)
            cells.append("-" if v is None or v != v else f"{v:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    s = results["settings"]
    lines.append(f"\nDecoding: {s['decoding']}, max {s['max_new_tokens']} new tokens, pixels {s['max_pixels']}; "
                 f"answers: {s['answer_extraction']}. Hallucination rate: % of correct answers judged unfaithful.")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Validation during training (grpo.py --eval-every; README "Watching a run")


class Validator:
    """Greedy validation of the training policy through its rollout engine and this file's generation and
    scorers (the same prompt, extraction and scoring as `python eval.py`). Every rank generates every item
    (HF generate under FSDP keeps the ranks' forwards in step; keep --eval-limit small); rank 0 scores.
    grpo.py imports this file for it: a departure from DESIGN.md ("nothing imports eval.py"), so that
    validation runs eval.py's own code rather than a copy; no cycle (eval never imports grpo). The prompt is
    the one the run trains with (--reward vision_sr1: palmr.SR1_INSTRUCTION), not eval.py's --prompt default.

    Validator(args, engine, processor, out, rank) reads --eval-bench once (the shapes held-out split built by
    rank 0); validator(step) -> ({val/<bench>/<metric>: number} on rank 0, {} elsewhere; seconds), with the
    predictions in OUT/val/step-NNNNNN/.
    """

    def __init__(self, args, engine, processor, out, rank):
        from data import ensure_shapes
        self.args, self.engine, self.processor, self.out, self.rank = args, engine, processor, Path(out), rank
        if "shapes" in args.eval_bench:
            if rank == 0:
                ensure_shapes(n=200, split="test", seed=1)
            palmr.barrier()
        if (args.eval_max_new_tokens or 0) > args.max_new_tokens and not isinstance(engine, palmr.HFEngine):
            palmr.print0(f"warning: --eval-max-new-tokens {args.eval_max_new_tokens} exceeds --max-new-tokens "
                         f"{args.max_new_tokens}: vLLM's max_model_len was sized for the latter and may cut replies")
        # the prompt the policy trains with (a method's own, e.g. Vision-SR1's <description> format; PaLMR's
        # otherwise), as Vision-SR1's EasyR1 config formats train and val items with one format_prompt
        import variants
        self.instruction = next((text for v in variants.VARIANTS if v.is_active(args)
                                 if (text := v(args).instruction(None, args.reward))), palmr.INSTRUCTION)
        self.benches = []
        for spec in args.eval_bench:
            name, path, items, problems = load_items(spec, args.eval_limit)
            self.benches.append((name, path, items))
            for p in problems if rank == 0 else []:
                print(p, file=sys.stderr)

    def __call__(self, step):
        import shutil
        import time
        import types
        t, args, engine, rank = time.time(), self.args, self.engine, self.rank
        engine.wake()
        gen = types.SimpleNamespace(max_new_tokens=args.eval_max_new_tokens or args.max_new_tokens,
                                    temperature=0.0, top_p=1.0, batch=16, seed=args.seed, instruction=self.instruction)
        folder = self.out / "val" / (f"step-{step:06d}" if rank == 0 else f".rank{rank}-step-{step:06d}")
        metrics, kept = {}, engine.max_pixels
        for name, path, items in self.benches:
            engine.max_pixels = 112 * 112 if name == "shapes" else args.max_pixels  # main()'s rule (shapes: 112 x 112)
            cache = folder / f"{name}.predictions.jsonl"
            cache.unlink(missing_ok=True)  # a resumed run revalidates this step with the weights it has now
            preds, problems = generate(engine, self.processor, name, items, cache, gen)
            if rank == 0:
                for p in problems:
                    print(p, file=sys.stderr)
                scores = bench_scores(name, items, preds, path=path)
                metrics.update({f"val/{name}/{k}": float(v) for k, v in scores.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)})
        engine.max_pixels = kept
        if rank != 0:
            shutil.rmtree(folder, ignore_errors=True)
        engine.sleep()
        return metrics, time.time() - t


if __name__ == "__main__":
    main()
