"""Benchmark scoring rule by rule against the official scorers' code (worked examples from it), the
regressions the issue names, text-only HallusionBench questions, and `eval.py --predictions`.

Sources: tianyi-lab/HallusionBench utils.py; VLMEvalKit vlmeval/dataset/utils/yorn.py, vlmeval/smp/misc.py
(process_punctuation), vlmeval/utils/matching_util.py (can_infer); MMMU-Benchmark/MMMU
mmmu/utils/eval_utils.py; lupantech/MathVista evaluation/calculate_score.py. Every expected value below
is what those functions return on the same input (our extractor runs first where the input is boxed)."""
import json
import random

import pytest
from PIL import Image

import eval as ev
import palmr

# -----------------------------------------------------------------------------
# HallusionBench: VLMEvalKit's yes/no extraction, the official metrics


@pytest.mark.parametrize("text,expected", [
    ("Yes", "yes"), ("yes.", "yes"), ("Yes, it is.", "yes"), ("No, there is no cat.", "no"), ("YES!", "yes"),
    ("(Yes)", "yes"), ("Answer: No", "no"), ("No. 3.5", "no"),
    ("Yes, there is no doubt.", "unknown"),   # both words
    ("**Yes**", "unknown"),                   # '*' is not stripped by process_punctuation
    ("Yes:", "unknown"), ("Yes/No", "unknown"), ("Not really", "unknown"),
    ("Yes,1,000", "unknown"),                 # a digit,digit text deletes commas: 'yes1000'
])
def test_yes_no_is_vlmevalkits(text, expected):
    assert ev.yes_no(text) == expected


def test_boxed_yes_is_read_through_the_extractor():
    assert ev.score_item("hallusion", {"id": "x", "answer": "yes", "choices": None, "meta": {}}, "<think>..</think> \\boxed{\\text{Yes}}")


def test_unknown_counts_only_for_the_vs_question_without_an_image():
    rec = dict(category="VS", subcategory="chart", set_id="3", question_id="1", gt_answer="0", prediction="I cannot tell")
    assert ev.hallusion_scores([dict(rec, figure_id="0", visual_input="0")])["aAcc"] == 100.0
    assert ev.hallusion_scores([dict(rec, figure_id="1", visual_input="1")])["aAcc"] == 0.0
    assert ev.hallusion_scores([dict(rec, category="VD", figure_id="0", visual_input="1")])["aAcc"] == 0.0
    meta = {"category": "VS", "figure_id": "0", "visual_input": "0"}   # the per-item rule agrees (hallucination rate)
    assert ev.score_item("hallusion", {"id": "x", "answer": "no", "choices": None, "meta": meta}, "I cannot tell")
    assert not ev.score_item("hallusion", {"id": "x", "answer": "no", "choices": None, "meta": {**meta, "figure_id": "1"}}, "I cannot tell")


def _hallusion_json(tmp_path):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "0_1.png")
    rows = [{"category": "VS", "subcategory": "chart", "visual_input": "0", "set_id": "3", "figure_id": "0", "sample_note": "",
             "question_id": "1", "question": "Is X larger than Y in 2010?", "gt_answer_details": "", "gt_answer": "0", "filename": None},
            {"category": "VS", "subcategory": "chart", "visual_input": "1", "set_id": "3", "figure_id": "1", "sample_note": "",
             "question_id": "1", "question": "According to the chart, is X larger than Y?", "gt_answer_details": "",
             "gt_answer": "1", "filename": "0_1.png"}]
    (tmp_path / "HallusionBench.json").write_text(json.dumps(rows))
    return tmp_path / "HallusionBench.json"


def test_questions_without_an_image_are_asked_text_only(tmp_path, tiny_ckpt):
    # regression: the 178 no-image questions were never asked and their empty prediction scored correct
    items, problems = ev.load_bench("hallusion", _hallusion_json(tmp_path))
    assert problems == [] and [it["meta"]["text_only"] for it in items] == [True, False]
    res = ev.main(["--bench", f"hallusion={tmp_path / 'HallusionBench.json'}", "--checkpoints", f"tiny={tiny_ckpt}",
                   "--out", str(tmp_path / "out"), "--max-new-tokens", "3", "--engine", "hf"])
    cached = ev.read_predictions(tmp_path / "out" / "tiny" / "hallusion.predictions.jsonl")
    assert sorted(cached) == ["VS_chart_3_0_1", "VS_chart_3_1_1"], "both questions were generated, one without image"
    s = res["checkpoints"]["tiny"]["hallusion"]
    assert s["text_only"] == 1 and s["missing_predictions"] == 0 and s["n_questions"] == 2


def test_render_prompt_without_an_image_has_no_placeholder(tiny_ckpt):
    processor = palmr.load_processor(tiny_ckpt)
    text = palmr.render_prompt(processor, "Is Paris in France?", image=False)
    assert "<|image_pad|>" not in text and "Is Paris in France?" in text
    enc = palmr.encode_prompt(processor, text, None, 112 * 112)
    assert set(enc) == {"input_ids"} and "pixel_values" not in palmr.collate_prompts([enc], 0)


def test_vlmevalkit_hallusion_tsv_groups_by_index_parts(tmp_path):
    # Hallusion_rating: set, figure, question = index.split('_')[3:6]; keys with l2-category
    import base64
    import io
    buf = io.BytesIO()
    Image.new("RGB", (30, 30), "red").save(buf, format="PNG")
    img = base64.b64encode(buf.getvalue()).decode()
    lines = ["index\timage\tquestion\tanswer\tcategory\tl2-category"]
    for idx, ans in [("VD_figure_x_0_0_0", "Yes"), ("VD_figure_x_0_0_1", "No"), ("VD_figure_x_0_1_0", "No")]:
        lines.append(f"{idx}\t{img}\tq?\t{ans}\tVD\tVD_figure")
    lines.append("VS_chart_x_3_0_1\t\tno image\tNo\tVS\tVS_chart")   # VLMEvalKit drops image-less rows
    (tmp_path / "HallusionBench.tsv").write_text("\n".join(lines) + "\n")
    items, _ = ev.load_bench("hallusion", tmp_path / "HallusionBench.tsv")
    assert [it["id"] for it in items] == ["VD_figure_x_0_0_0", "VD_figure_x_0_0_1", "VD_figure_x_0_1_0"]
    preds = {"VD_figure_x_0_0_0": "\\boxed{Yes}", "VD_figure_x_0_0_1": "\\boxed{Yes}", "VD_figure_x_0_1_0": "\\boxed{No}"}
    s, right = ev.aggregate("hallusion", items, preds)
    assert right == [True, False, True]
    assert s["n_figures"] == 2 and s["fAcc"] == 50.0     # figure 0 has a wrong question, figure 1 is right
    assert s["n_groups"] == 2 and s["qAcc"] == 50.0      # question 0 over figures 0, 1 right; question 1 wrong


# -----------------------------------------------------------------------------
# MMMU: parse_multi_choice_response, parse_open_response + eval_open

MMMU_OPTIONS = ["75 V", "23.3 cos(250t) V", "45 V", "95 V"]


@pytest.mark.parametrize("response,expected", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("Answer: B", "B"), ("The answer is B.", "B"),
    ("I think (A) is wrong, the answer is (C)", "C"),      # pass 1: the last '(X)'
    ("The answer is (B) not C", "B"),                      # pass 1 found one: pass 2 never runs
    ("A or C, probably C", "C"),                           # pass 2: the last ' X '
    ("The correct option is 45 V", "C"),                   # pass 3: option text, more than 5 words
    ("Between 75 V and 95 V I pick 95 V", "D"),            # pass 3: the latest mention wins
])
def test_mmmu_choice_is_the_official_parser(response, expected):
    assert ev.mmmu_choice(response, MMMU_OPTIONS, "validation_Physics_1") == expected


@pytest.mark.parametrize("response", ["A. 75 V", "45 V", "b", "(b)", "C)", "The answer is **C**"])
def test_mmmu_unparsed_choices_fall_to_the_seeded_random_letter(response):
    # official: no pass matches these; the random pick is seeded per item here (ours: reproducible)
    assert ev.mmmu_choice(response, MMMU_OPTIONS, "id-9") == random.Random("id-9").choice("ABCD")


@pytest.mark.parametrize("response,gold,expected", [
    ("The answer is 1.06", "1.06", True), ("The answer is 9.2", "9.20", True), ("12.966", "12.97", True),
    ("0.285", "0.286", False),                               # round(0.285, 2) is 0.28 in binary floats
    ("So the total is 2,000,000 dollars.", "2000000", True), ("The answer is 14", "4", False),
    ("Thus the value is 8.2e3.", "3", True),                 # the regexes also pull 8 and 3 out of 8.2e3
    ("The answer is 5. The explanation is long", "5", False),  # lower-cased first: no sentence split
    ("The answer is 5.\nThis is because x", "5", True), ("There are 2 apples and 3 pears", "3", True),
    ("it undergoes transformation", "Transformation", True), ("The answer is C", "C", True),
    ("x = 3.4289", "['24/7', '3.429']", True), ("The final answer is 24/7", "['24/7', '3.429']", True),
    ("0.015625", "1/64", False),
])
def test_mmmu_open_is_the_official_rule(response, gold, expected):
    assert ev.mmmu_open(response, gold) == expected


# -----------------------------------------------------------------------------
# MathVista: normalize_extracted_answer + string equality

DEG = ["135°", "140°", "145°", "150°"]


def _mv(answer, choices=None, **meta):
    meta.setdefault("question_type", "multi_choice" if choices else "free_form")
    return {"id": "1", "answer": answer, "choices": choices, "meta": meta}


@pytest.mark.parametrize("pred,item,expected", [
    ("\\boxed{145}", _mv("145°", DEG, answer_type="text"), True),      # nearest option by edit distance
    ("\\boxed{C}", _mv("145°", DEG, answer_type="text"), True), ("\\boxed{(c)}", _mv("145°", DEG, answer_type="text"), True),
    ("\\boxed{(C) 145°}", _mv("145°", DEG, answer_type="text"), True),
    ("\\boxed{c}", _mv("145°", DEG, answer_type="text"), False),       # bare lower case: distance 4 to all, first wins
    ("\\boxed{The answer is C}", _mv("145°", DEG, answer_type="text"), False),
    ("\\boxed{3.7}", _mv("3", answer_type="integer"), True), ("\\boxed{-2.5}", _mv("-2", answer_type="integer"), True),
    ("\\boxed{1e3}", _mv("1000", answer_type="integer"), True),
    ("\\boxed{1.449}", _mv("1.45", answer_type="float", precision=2.0), True),
    ("\\boxed{2.675}", _mv("2.68", answer_type="float", precision=2.0), False),
    ("\\boxed{3}", _mv("3.0", answer_type="float", precision=1.0), True),
    ("\\boxed{[2007, 2008]}", _mv("[2007, 2008]", answer_type="list"), True),
    ("\\boxed{[2007,2008]}", _mv("[2007, 2008]", answer_type="list"), False),
    # our extraction step (the official one is a GPT call): unit and degree signs off numeric answers
    ("\\boxed{145^\\circ}", _mv("145", answer_type="integer"), True),
    ("\\boxed{5\\text{ cm}}", _mv("5", answer_type="integer", unit="cm"), True),
    ("The length is 5 cm, so 5.", _mv("5", answer_type="integer", unit="cm"), True),   # no box: last number
])
def test_mathvista_is_the_official_normalisation(pred, item, expected):
    assert ev.score_item("mathvista", item, pred) == expected


# -----------------------------------------------------------------------------
# MMStar (VLMEvalKit can_infer, no judge model) and MathVerse multiple choice

ANIMALS = {"id": "0", "answer": "B", "choices": None,
           "meta": {"options": ["cat", "dog", "bird", "fish"]}}


@pytest.mark.parametrize("pred,letter", [
    ("A", "A"), ("B.", "B"), ("(C)", "C"), ("Answer: D", "D"), ("The answer is B", "B"), ("Option B", "B"),
    ("C) bird", "C"), ("[D]", "D"), ("#B", "B"), ("A and B", "Z"), ("B or C", "Z"), ("BC", "Z"), ("b", "Z"),
    ("B-", "Z"), ("B is correct because the dog is there", "Z"), ("dog", "B"), ("Dog.", "B"), ("a dog", "B"),
    ("cat and dog", "Z"), ("dogfish", "Z"), ("Z", "Z"), ("", "Z"), ("Cannot determine the answer", "Z"),
    ("answer is b", "B"), ("The correct answer is **C**. Here's why: not A and not D", "C"),
])
def test_mcq_letter_is_vlmevalkits_can_infer(pred, letter):
    assert ev.mcq_letter(pred, ev._options(ANIMALS)) == letter


@pytest.mark.parametrize("bench,item", [
    ("mmstar", ANIMALS),
    ("mathverse", {"id": "1", "answer": "B", "choices": None, "meta": {"question_type": "multi-choice"}}),
    ("mmmu", {"id": "2", "answer": "B", "choices": ["1", "2", "3", "4"], "meta": {"question_type": "multiple-choice"}}),
])
def test_boxed_text_letter_is_read_on_every_benchmark(bench, item):
    # regression: \boxed{\text{B}} was wrong on MMMU (random letter), MMStar and MathVerse
    assert ev.score_item(bench, item, "<think>the second one</think> The answer is \\boxed{\\text{B}}.")
    assert ev.score_item(bench, item, "\\boxed{\\textbf{B}}")


def test_mmstar_options_parsed_from_the_question():
    q = "Which animal?\nOptions: A: a cat, B: a dog, C: a bird, D: a fish"
    from data import mmstar_options
    assert mmstar_options(q) == ["a cat", "a dog", "a bird", "a fish"]


# -----------------------------------------------------------------------------
# eval.py --predictions: score predictions made elsewhere, no model loaded

def test_predictions_made_elsewhere_are_scored_without_a_model(tmp_path, monkeypatch):
    monkeypatch.setattr(palmr, "load_model", lambda *a, **k: pytest.fail("--predictions must not load a model"))
    bench = _hallusion_json(tmp_path)
    mmstar = tmp_path / "mmstar.jsonl"
    mmstar.write_text("\n".join(json.dumps({"index": i, "question": "Which?\nOptions: A: cat, B: dog", "image": "0_1.png",
                                            "answer": "AB"[i % 2], "category": "c", "l2_category": "l"}) for i in range(4)) + "\n")
    made = tmp_path / "other_model"
    made.mkdir()
    (made / "hallusion.predictions.jsonl").write_text(
        json.dumps({"id": "VS_chart_3_0_1", "prediction": "I cannot tell without the chart."}) + "\n" +
        json.dumps({"id": "VS_chart_3_1_1", "prediction": "<think>X is higher</think> \\boxed{Yes}"}) + "\n")
    (made / "mmstar.predictions.jsonl").write_text("\n".join(json.dumps({"id": str(i), "prediction": p}) for i, p in
                                                             enumerate(["\\boxed{A}", "dog", "B", "\\boxed{\\text{A}}"])) + "\n")
    res = ev.main(["--bench", f"hallusion={bench}", f"mmstar={mmstar}", "--predictions", f"other={made}",
                   "--out", str(tmp_path / "out")])
    h, m = res["checkpoints"]["other"]["hallusion"], res["checkpoints"]["other"]["mmstar"]
    assert h["aAcc"] == 100.0 and h["qAcc"] == 100.0 and h["n_figures"] == 1    # unknown is right on the VS no-image question
    assert m["acc"] == 50.0 and m["missing_predictions"] == 0                   # A ok, dog->B ok, B vs A wrong, A vs B wrong
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["checkpoints"]["other"]["mmstar"]["acc"] == 50.0
    assert "| other |" in (tmp_path / "out" / "results.md").read_text()


def test_mmmu_list_gold_and_odd_golds():
    item = {"id": "validation_Math_15", "answer": "24/7", "choices": None,
            "meta": {"question_type": "open", "answers": ["24/7", "3.429"]}}
    assert ev.score_item("mmmu", item, "x = 3.4289")          # any member of the list gold
    assert ev.mmmu_open("it is [1, 2)", "[1, 2)")             # not a Python literal: one string gold, no crash


def test_corrupt_base64_in_a_tsv_is_a_counted_image_error(tmp_path):
    import base64
    import io
    buf = io.BytesIO()
    Image.new("RGB", (30, 30), "red").save(buf, format="PNG")
    good = base64.b64encode(buf.getvalue()).decode()
    lines = ["index\timage\tquestion\tanswer\tA\tB", f"0\t{good}\tq?\tA\tx\ty", f"1\t{'%%%not base64%%%' * 10}\tq?\tB\tx\ty"]
    (tmp_path / "MMStar.tsv").write_text("\n".join(lines) + "\n")
    items, problems = ev.load_bench("mmstar", tmp_path / "MMStar.tsv")
    assert [it["id"] for it in items] == ["0", "1"] and items[1]["image"] is None and "item 1" in problems[0]


def test_judge_verdict_lines_with_long_padding_parse_quickly():
    # a padded markdown table made the old pattern backtrack for minutes (n^5 in the run of spaces)
    import judge
    assert judge.parse_verdict("| Criterion | Verdict" + " " * 5000 + "|\nVERDICT: A") == "A"
    assert judge.parse_verdict("VERDICT" + " " * 5000 + "x") is None
