"""eval.py: official scoring rules by hand, loaders for the three formats, and end-to-end runs."""
import base64
import io
import json
import math

import pytest
from PIL import Image

import eval as ev


def rec(cat, sub, set_id, fig, q, gt, pred, visual_input="1"):
    return {"category": cat, "subcategory": sub, "set_id": set_id, "figure_id": fig, "question_id": q,
            "gt_answer": gt, "prediction": pred, "visual_input": visual_input}


# -----------------------------------------------------------------------------
# HallusionBench

def test_hallusion_scores_by_hand():
    records = [
        # figure VD_chart_0_0 holds two questions, one wrong -> that figure's fAcc is 0
        rec("VD", "chart", 0, 0, 0, "1", "Yes, it is."),           # right
        rec("VD", "chart", 0, 0, 1, "0", "\\boxed{yes}"),          # wrong (boxed answer wins)
        # figure VD_chart_0_1, both right
        rec("VD", "chart", 0, 1, 0, "0", "No."),
        rec("VD", "chart", 0, 1, 1, "1", "yes"),
        # VS set 1: the question without an image (figure 0) may answer "unknown"; figure 0 is not a figure
        rec("VS", "map", 1, 0, 0, "1", "I cannot tell.", visual_input="0"),   # unknown -> right (official rule)
        rec("VS", "map", 1, 1, 0, "0", "yes and no"),                         # both words -> unknown -> wrong
        # a question group of size 1
        rec("VD", "ocr", 2, 0, 7, "1", "yes"),
    ]
    s = ev.hallusion_scores(records)
    # aAcc: right = q1, q3, q4, q5(unknown ok), q7 = 5 of 7
    assert s["aAcc"] == pytest.approx(100 * 5 / 7)
    # figures: VD_chart_0_0 (x), VD_chart_0_1 (ok), VS_map_1_1 (x), VD_ocr_2_0 (ok) -> 2 of 4
    assert s["n_figures"] == 4 and s["fAcc"] == pytest.approx(50.0)
    # question groups: VD_chart_0_0 {right, right(No)} -> ok; VD_chart_0_1 {wrong, right} -> x;
    # VS_map_1_0 {unknown ok, wrong} -> x; VD_ocr_2_7 {right} -> ok  => 2 of 4
    assert s["n_groups"] == 4 and s["qAcc"] == pytest.approx(50.0)
    assert s["avg"] == pytest.approx((100 * 5 / 7 + 50 + 50) / 3)


def test_unknown_is_wrong_when_the_question_has_an_image():
    s = ev.hallusion_scores([rec("VS", "map", 1, 1, 0, "1", "maybe", visual_input="1")])
    assert s["aAcc"] == 0.0


@pytest.mark.parametrize("text,expected", [
    ("Yes.", "yes"), ("no, it is not", "no"), ("Yes and no", "unknown"), ("I don't know", "unknown"),
    ("Nope", "unknown"),  # word match, not substring: 'nope' is not 'no'
])
def test_yes_no(text, expected):
    assert ev.yes_no(text) == expected


# -----------------------------------------------------------------------------
# MMMU

CHOICES = ["12", "15 cm", "twenty", "none of these"]


@pytest.mark.parametrize("response,expected", [
    ("(B)", "B"),                                               # bracketed letter
    ("The answer is C.", "C"),                                  # bare letter between spaces
    ("I think the length must be 15 cm in total here", "B"),    # option text, in a longer reply
    ("(A) looks wrong, so (D)", "D"),                           # several candidates: the last mentioned
    ("D", "D"),
])
def test_mmmu_choice_parsing(response, expected):
    assert ev.mmmu_choice(response, CHOICES, "item-1") == expected


def test_mmmu_unparseable_choice_is_random_but_reproducible():
    picks = {ev.mmmu_choice("no idea", CHOICES, f"id{i}") for i in range(30)}
    assert len(picks) > 1 and ev.mmmu_choice("no idea", CHOICES, "id3") == ev.mmmu_choice("??", CHOICES, "id3")


@pytest.mark.parametrize("response,gold,expected", [
    ("approximately 3.14159", "3.14", True),      # numbers match at 2 decimals
    ("1,200 units", "1200", True),
    ("about 3.2", "3.14", False),
    ("the Krebs cycle", "krebs cycle", True),     # normalised string inside the reply
    ("x = 5", "['5', '5.0']", True),              # a list of acceptable golds
])
def test_mmmu_open(response, gold, expected):
    assert ev.mmmu_open(response, gold) == expected


# -----------------------------------------------------------------------------
# MathVista and MathVerse

def _item(answer, choices=None, **meta):
    return {"id": "x", "question": "q", "answer": answer, "choices": choices, "meta": meta, "image": None}


@pytest.mark.parametrize("pred,item,expected", [
    ("\\boxed{B}", _item("5", ["3", "5", "7"], question_type="multi_choice"), True),      # letter -> option text
    ("\\boxed{5}", _item("5", ["3", "5", "7"], question_type="multi_choice"), True),      # the option text itself
    ("\\boxed{C}", _item("5", ["3", "5", "7"], question_type="multi_choice"), False),
    ("\\boxed{3}", _item("3", answer_type="integer", question_type="free_form"), True),
    ("\\boxed{3.0}", _item("3", answer_type="integer", question_type="free_form"), True),
    ("\\boxed{3.5}", _item("3", answer_type="integer", question_type="free_form"), True),    # official: int(float(x)) truncates
    ("\\boxed{2.5}", _item("3", answer_type="integer", question_type="free_form"), False),
    ("\\boxed{1.26}", _item("1.3", answer_type="float", precision=1.0, question_type="free_form"), True),
    ("\\boxed{0.333}", _item("0.33", answer_type="float", precision=2.0, question_type="free_form"), True),
    ("\\boxed{0.34}", _item("0.33", answer_type="float", precision=2.0, question_type="free_form"), False),
    ("\\boxed{\\frac{1}{2}}", _item("0.5", answer_type="text", question_type="free_form"), True),  # math equivalence
])
def test_mathvista_rules(pred, item, expected):
    assert ev.score_item("mathvista", item, pred) == expected


def test_mathverse_per_version_and_vision_only():
    items = [_item("A", question_type="multi-choice", problem_version="Vision Only"),
             _item("B", question_type="multi-choice", problem_version="Vision Only"),
             _item("4", question_type="free-form", problem_version="Text Dominant")]
    for i, it in enumerate(items):
        it["id"] = str(i)
    preds = {"0": "\\boxed{A}", "1": "\\boxed{(C)}", "2": "\\boxed{2^2}"}
    scores, right = ev.aggregate("mathverse", items, preds)
    assert right == [True, False, True]
    assert scores["acc/Vision Only"] == 50.0 and scores["vision_only"] == 50.0 and scores["acc/Text Dominant"] == 100.0
    assert scores["acc"] == pytest.approx(200 / 3)


@pytest.mark.parametrize("pred,expected", [("\\boxed{B}", True), ("B. blue", True), ("(b)", False),  # VLMEvalKit: lower case is no letter
                                           ("\\boxed{C}", False), ("", False)])
def test_mmstar_letter_match(pred, expected):
    assert ev.score_item("mmstar", _item("B"), pred) == expected


def test_extract_answer_order():
    assert ev.extract_answer("<answer>x</answer> then \\boxed{y}") == "y"
    assert ev.extract_answer("<answer>x</answer> and <answer>z</answer>") == "z"
    assert ev.extract_answer("plain") is None


# -----------------------------------------------------------------------------
# loaders: official JSON + images, parquet, VLMEvalKit TSV; bad images are counted, not fatal

def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return buf.getvalue()


def test_official_json_with_image_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (40, 30), "red").save(tmp_path / "imgs" / "0_0.png")
    rows = [{"category": "VD", "subcategory": "chart", "set_id": "0", "figure_id": "0", "question_id": "0",
             "question": "Is it red?", "gt_answer": "1", "filename": "imgs/0_0.png", "visual_input": "1"},
            {"category": "VS", "subcategory": "map", "set_id": "1", "figure_id": "0", "question_id": "0",
             "question": "Is Paris in France?", "gt_answer": "1", "filename": None, "visual_input": "0"},
            {"category": "VD", "subcategory": "chart", "set_id": "0", "figure_id": "1", "question_id": "0",
             "question": "Is it blue?", "gt_answer": "0", "filename": "imgs/missing.png", "visual_input": "1"}]
    (tmp_path / "HallusionBench.json").write_text(json.dumps(rows))
    items, problems = ev.load_bench("hallusion", tmp_path / "HallusionBench.json")
    assert [it["answer"] for it in items] == ["yes", "yes", "no"]
    assert items[0]["image"].size == (40, 30) and items[1]["image"] is None
    assert len(problems) == 1 and "missing.png" in problems[0] and items[2]["meta"]["image_error"]


def test_parquet_with_image_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({"pid": ["1", "2"], "question": ["How many?", "Which?"],
                      "decoded_image": [{"bytes": _png("blue"), "path": "1.png"}, {"bytes": b"broken", "path": "2.png"}],
                      "choices": [None, ["3", "5"]], "answer": ["4", "5"], "question_type": ["free_form", "multi_choice"],
                      "answer_type": ["integer", "text"], "precision": [None, None]})
    pq.write_table(table, tmp_path / "mathvista.parquet")
    items, problems = ev.load_bench("mathvista", tmp_path / "mathvista.parquet")
    assert items[0]["choices"] is None and items[1]["choices"] == ["3", "5"]
    assert items[0]["image"] is not None and items[1]["image"] is None and len(problems) == 1


def test_vlmevalkit_tsv_with_base64(tmp_path):
    good = base64.b64encode(_png("green")).decode()
    bad = base64.b64encode(b"not an image at all" * 20).decode()
    lines = ["index\timage\tquestion\tanswer\tcategory",
             f"0\t{good}\tWhat colour? Options: A: green, B: red\tA\tcoarse perception",
             f"1\t{bad}\tWhich? Options: A: x, B: y\tB\tmath"]
    (tmp_path / "MMStar.tsv").write_text("\n".join(lines) + "\n")
    items, problems = ev.load_bench("mmstar", tmp_path / "MMStar.tsv")
    assert [it["id"] for it in items] == ["0", "1"] and items[0]["image"].size == (40, 30)
    assert items[1]["image"] is None and len(problems) == 1 and "item 1" in problems[0]


def test_end_to_end_on_a_tsv_with_the_cache(tmp_path, tiny_ckpt):
    good = base64.b64encode(_png("green")).decode()
    lines = ["index\timage\tquestion\tanswer\tcategory"] + \
            [f"{i}\t{good if i != 2 else 'bm90IGFuIGltYWdl' * 30}\tPick. Options: A: a, B: b\tA\tc" for i in range(4)]
    (tmp_path / "MMStar.tsv").write_text("\n".join(lines) + "\n")
    argv = ["--bench", f"mmstar={tmp_path / 'MMStar.tsv'}", "--checkpoints", f"tiny={tiny_ckpt}",
            "--out", str(tmp_path / "out"), "--max-new-tokens", "4", "--engine", "hf"]
    res = ev.main(argv)
    scores = res["checkpoints"]["tiny"]["mmstar"]
    assert scores["n"] == 4 and scores["missing_images"] == 1 and 0 <= scores["acc"] <= 100
    cache = tmp_path / "out" / "tiny" / "mmstar.predictions.jsonl"
    assert len(cache.read_text().splitlines()) == 3, "items without an image are not generated"
    assert res["settings"]["decoding"] == "greedy" and res["settings"]["max_new_tokens"] == 4
    ev.main(argv)
    assert len(cache.read_text().splitlines()) == 3, "a rerun reads the cache instead of generating again"
    assert (tmp_path / "out" / "results.md").read_text().startswith("| checkpoint |")


@pytest.mark.slow
def test_shapes_bench_runs_and_prints_the_table(tmp_path, tiny_ckpt, capsys):
    res = ev.main(["--bench", "shapes", "--checkpoints", f"tiny={tiny_ckpt}", "--limit", "8", "--max-new-tokens", "8",
                   "--out", str(tmp_path)])
    s = res["checkpoints"]["tiny"]["shapes"]
    assert s["n"] == 8 and s["judge"] == "rule" and s["acc"] == 0.0 and s["hallucination_rate"] is None
    out = capsys.readouterr().out
    assert ("| checkpoint | shapes acc | shapes perception_acc | shapes perception_complete | shapes claims_per_reply "
            "| shapes hallucination_rate |") in out


def test_shapes_hallucination_is_exact():
    facts = {"objects": [{"name": "circle", "count": 2, "attributes": ["red"], "location": []}]}
    items = [{"id": str(i), "question": "How many circles?", "answer": "2", "choices": None, "facts": facts} for i in range(3)]
    preds = {"0": "<think>I see 2 red circles.</think> \\boxed{2}",       # right, faithful
             "1": "<think>I see 3 red circles.</think> \\boxed{2}",       # right, hallucinated
             "2": "<think>I see 2 red circles.</think> \\boxed{3}"}       # wrong answer, faithful
    s = ev.shapes_perception(items, preds)
    assert s["perception_acc"] == pytest.approx(200 / 3) and s["hallucination_rate"] == 50.0 and s["hallucination_n"] == 2
    assert not math.isnan(s["perception_acc"])
    assert s["perception_complete"] == pytest.approx(200 / 3) and s["claims_per_reply"] == 1.0


def test_shapes_complete_perception_does_not_reward_saying_less():
    # a reply that states one group of two and stops is faithful but incomplete (the gate's known hack)
    facts = {"objects": [{"name": "circle", "count": 2, "attributes": ["red"], "location": []},
                         {"name": "square", "count": 1, "attributes": ["blue"], "location": []}]}
    items = [{"id": str(i), "question": "q", "answer": "yes", "choices": None, "facts": facts} for i in range(3)]
    preds = {"0": "<think>I see 2 red circles, </think> \\boxed{yes}",                    # faithful, incomplete
             "1": "<think>I see 2 red circles and 1 blue square.</think> \\boxed{yes}",   # faithful, complete
             "2": "<think>I see 2 red circles and 2 blue squares.</think> \\boxed{yes}"}  # one wrong claim
    s = ev.shapes_perception(items, preds)
    assert s["perception_acc"] == pytest.approx(200 / 3)
    assert s["perception_complete"] == pytest.approx(100 / 3)
    assert s["claims_per_reply"] == pytest.approx(5 / 3)


def test_hallucination_rate_with_facts_pairwise_and_pointwise():
    # real benchmarks: the rate comes from a judge over correct answers that have facts
    import judge
    facts = {"objects": [{"name": "circle", "count": 2, "attributes": ["red"], "location": []}]}
    ref = "<think>I see 2 red circles.</think> \\boxed{2}"
    items = [{"id": "a", "question": "q", "reference": ref}, {"id": "b", "question": "q", "reference": None},
             {"id": "c", "question": "q", "reference": ref}, {"id": "d", "question": "q", "reference": None}]
    preds = {"a": "<think>I see 3 red circles.</think> \\boxed{2}",   # correct, unfaithful (pairwise vs reference)
             "b": "<think>I see 2 red circles.</think> \\boxed{2}",   # correct, faithful (judged alone)
             "c": "<think>I see 2 red circles.</think> \\boxed{2}",   # correct, faithful
             "d": "<think>I see 5 red circles.</think> \\boxed{9}"}   # wrong answer: not counted
    right = [True, True, True, False]
    s = ev.hallucination(judge.RuleJudge(), items, preds, right, {k: facts for k in "abcd"})
    assert s["hallucination_rate"] == pytest.approx(100 / 3) and s["hallucination_n"] == 3 and s["judge"] == "rule"
    # items without facts are not judged
    s = ev.hallucination(judge.RuleJudge(), items, preds, right, {"a": facts})
    assert s["hallucination_rate"] == 100.0 and s["hallucination_n"] == 1
