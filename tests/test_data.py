"""data.py: the Sample contract and JSONL; ingest of every published layout the paper trains from
(METHOD.md section 1), the RL-ready ones and the benchmarks, a few rows each, built exactly as the dataset's
card or official loader lays them out (columns, nesting, answer encodings), read by `data.ingest` (eval.py
reads benchmarks through the same table); the PaDLayer steps on small fixtures: ingest (3 formats + bad
rows), filter, facts (Gemini server), reference; one bad item logged with its id and reason while the rest
goes on; the synthetic shapes task."""
import base64
import io
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import data
import palmr
from data import Sample, hallucinated_trace, load_image, make_shapes, read_jsonl, write_jsonl
from gemini_server import GeminiServer, pixel_hash
from judge import JudgeItem, RuleJudge, contradictions
from palmr import parse_response
from rewards import grade_answer, score_completion

ROOT = Path(__file__).resolve().parent.parent

# -----------------------------------------------------------------------------
# the Sample contract, JSONL, images

BASE = {"id": "x1", "image": "img.png", "question": "How many?", "answer": "2"}


def test_sample_from_dict_keeps_unknown_keys_in_meta():
    s = Sample.from_dict({**BASE, "difficulty": 3, "meta": {"origin": "mine"}, "source": "s/t"})
    assert s.meta == {"origin": "mine", "difficulty": 3}
    assert s.source == "s/t"
    assert not hasattr(s, "difficulty")


def test_sample_from_dict_stringifies_id_and_answer():
    s = Sample.from_dict({**BASE, "id": 7, "answer": 0})
    assert (s.id, s.answer) == ("7", "0")


@pytest.mark.parametrize("drop, blank, missing", [
    # one field absent
    (["answer"], [], ["answer"]),
    # two fields absent
    (["id", "image"], [], ["id", "image"]),
    # an empty string counts as missing
    ([], ["question"], ["question"]),
    # None counts as missing
    ([], ["answer", "id"], ["id", "answer"]),
])
def test_sample_from_dict_missing_fields(drop, blank, missing):
    d = {k: v for k, v in BASE.items() if k not in drop}
    d.update({k: ("" if k == "question" else None) for k in blank})
    with pytest.raises(ValueError) as e:
        Sample.from_dict(d)
    for name in missing:
        assert repr(name) in str(e.value)
    for name in set(BASE) - set(missing):
        assert repr(name) not in str(e.value)


def test_jsonl_round_trip(tmp_path):
    (tmp_path / "images").mkdir()
    inside = tmp_path / "images" / "a.png"
    outside = tmp_path.parent / "elsewhere.png"  # not under the dataset folder: stays absolute
    samples = [
        Sample("a", str(inside), "Q1?", "yes", choices=None, source="s/1",
               facts={"objects": [{"name": "circle", "count": 1, "attributes": ["red"], "location": []}]},
               reference="<think>x</think> \\boxed{yes}", meta={"k": [1, 2]}),
        Sample("b", str(outside), "Q2?", "B", choices=["1", "2"], source="s/2"),
    ]
    path = tmp_path / "train.jsonl"
    write_jsonl(path, samples)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["image"] == "images/a.png"       # stored relative
    assert rows[1]["image"] == str(outside)         # outside the folder: absolute
    assert not (tmp_path / "train.jsonl.tmp").exists()
    errors = []
    back = read_jsonl(path, errors)
    assert errors == []
    assert back[0].image == str(inside.resolve())   # read back absolute
    assert [s.to_dict() for s in back] == [s.to_dict() for s in samples]


def test_read_jsonl_skips_and_reports_bad_rows(tmp_path):
    good = lambda i: json.dumps({**BASE, "id": f"g{i}", "image": f"i{i}.png"})
    lines = [
        good(1),                                   # line 1: good
        "{not json",                               # line 2: invalid JSON
        json.dumps({**BASE, "id": "m", "answer": None}),  # line 3: missing answer
        "",                                        # line 4: blank, silently skipped
        good(1),                                   # line 5: duplicate id
        json.dumps([BASE]),                        # line 6: a JSON list, not an object
        good(2),                                   # line 7: good
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    errors = []
    samples = read_jsonl(path, errors)
    assert [s.id for s in samples] == ["g1", "g2"]
    assert all(s.image == str((tmp_path / f"i{i}.png").resolve()) for i, s in zip((1, 2), samples))
    assert len(errors) == 4
    expected = [(2, None), (3, "answer"), (5, "duplicate id"), (6, "not a JSON object")]
    for msg, (lineno, cause) in zip(errors, expected):
        assert f"{path}:{lineno} " in msg
        assert cause is None or cause in msg
    assert "(id m)" in errors[1] and "(id g1)" in errors[2]


@pytest.mark.parametrize("content", [
    b"definitely not a png",                 # garbage bytes
    b"\x89PNG\r\n\x1a\n" + b"\x00" * 20,     # PNG signature, broken body
    None,                                    # missing file
])
def test_load_image_bad_file_names_item(tmp_path, content):
    path = tmp_path / "bad.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="item bad-item-7"):
        load_image(Sample("bad-item-7", str(path), "q", "a"))


def test_mmstar_options_parsed_from_the_question():
    q = "Which animal?\nOptions: A: a cat, B: a dog, C: a bird, D: a fish"
    assert data.mmstar_options(q) == ["a cat", "a dog", "a bird", "a fish"]


# -----------------------------------------------------------------------------
# ingest of the published layouts

def png(color="red", size=(60, 40)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def struct(color="red", name="x.png", size=(60, 40)):
    """A Hugging Face `Image` feature as parquet stores it."""
    return {"bytes": png(color, size), "path": name}


def save(path, color="red", size=(60, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# Each case writes its files under `root` and returns (inputs, {id: expected fields}).

def case_mmmu(root):  # MMMU/MMMU: options is the *string* of a Python list; images in image_1..image_7
    rows = [{"id": "validation_Art_1", "question": "Which painting is shown in <image 1>?",
             "options": "['Mona Lisa', 'The Scream', \"Van Gogh's Irises\"]", "explanation": "",
             "image_1": struct("red"), **{f"image_{k}": None for k in range(2, 8)}, "img_type": "['Paintings']",
             "answer": "B", "topic_difficulty": "Easy", "question_type": "multiple-choice", "subfield": "Art"},
            {"id": "validation_Math_15", "question": "Compare <image 1> and <image 2>. The ratio?", "options": "[]",
             "explanation": "", "image_1": struct("red"), "image_2": struct("blue", "y.png", (30, 40)),
             **{f"image_{k}": None for k in range(3, 8)}, "img_type": "['Diagrams']", "answer": "['24/7', '3.429']",
             "topic_difficulty": "Hard", "question_type": "open", "subfield": "Math"}]
    return [parquet(root / "mmmu_validation.parquet", rows)], {
        "mmmu_validation/validation_Art_1": dict(question="Which painting is shown in <image 1>?", answer="B",  # tags kept, as the official runner does
                                                 choices=["Mona Lisa", "The Scream", "Van Gogh's Irises"], size=(60, 40)),
        "mmmu_validation/validation_Math_15": dict(answer="24/7", choices=None, size=(98, 40), images=2,
                                                   meta={"answers": ["24/7", "3.429"], "question_type": "open"})}


def case_easyr1(root):  # hiyouga/geometry3k: images = list of {bytes, path}; problem carries <image>
    rows = [{"images": [struct("green")], "problem": "<image>Find x. Round to the nearest tenth.", "answer": "12.5"},
            {"images": [struct("green")], "problem": "<image>Find y.", "answer": "3\\sqrt{2}"}]
    return [parquet(root / "geometry3k_train.parquet", rows)], {
        "geometry3k_train/0": dict(question="Find x. Round to the nearest tenth.", answer="12.5", choices=None),
        "geometry3k_train/1": dict(question="Find y.", answer="3\\sqrt{2}")}


def case_verl(root):  # verl examples/data_preprocess/geo3k.py output
    rows = [{"data_source": "hiyouga/geometry3k",
             "prompt": [{"role": "user", "content": "<image>Find the area. You FIRST think ..."}],
             "images": [struct("blue")], "ability": "math", "reward_model": {"style": "rule", "ground_truth": "24"},
             "extra_info": {"split": "train", "index": 7, "answer": "24", "question": "<image>Find the area."}}]
    return [parquet(root / "geo3k_verl.parquet", rows)], {
        "geo3k_verl/7": dict(question="Find the area. You FIRST think ...", answer="24", meta={"ability": "math"})}


def case_messages(root):  # TRL conversational VLM layout (HuggingFaceH4/llava-instruct-mix-vsft)
    rows = [{"messages": [{"role": "user", "content": [{"index": 0, "text": None, "type": "image"},
                                                       {"index": None, "text": "How many cats?", "type": "text"}]},
                          {"role": "assistant", "content": [{"index": None, "text": "Answer: 2.", "type": "text"}]}],
             "images": [struct("yellow")]}]
    return [parquet(root / "llava_mix.parquet", rows)], {"llava_mix/0": dict(question="How many cats?", answer="2")}


def case_finevision(root):  # HuggingFaceM4/FineVision (and the_cauldron): images list + texts [{user, assistant}]
    rows = [{"images": [struct("red")], "texts": [{"user": "What is the highest bar?\nAnswer briefly.", "assistant": "Answer: 42"},
                                                  {"user": "And the lowest?", "assistant": "3"}],
             "source": "chartqa", "relevance_ratings": [5, 5], "relevance_min": 5,
             "visual_dependency_ratings": [5, 4], "visual_dependency_min": 4}]
    return [parquet(root / "finevision_chartqa.parquet", rows)], {
        "finevision_chartqa/0": dict(question="What is the highest bar? Answer briefly.", answer="42", source="chartqa",
                                     meta={"visual_dependency_min": 4})}


def case_chartqa(root):  # HuggingFaceM4/ChartQA: query + label (list of str)
    rows = [{"image": struct("red"), "query": "What is the value of the blue bar?", "label": ["14"], "human_or_machine": 0}]
    return [parquet(root / "chartqa.parquet", rows)], {"chartqa/0": dict(question="What is the value of the blue bar?", answer="14")}


def case_figureqa(root):  # official FigureQA qa_pairs.json: answer 0/1, images png/<image_index>.png
    save(root / "figureqa" / "png" / "5.png")
    qa = {"qa_pairs": [{"image_index": 5, "question_string": "Is Red the minimum?", "answer": 1, "question_id": 0,
                        "color1_name": "Red", "color2_name": "--None--"},
                       {"image_index": 5, "question_string": "Is Red the maximum?", "answer": 0, "question_id": 1,
                        "color1_name": "Red", "color2_name": "--None--"}]}
    (root / "figureqa" / "qa_pairs.json").write_text(json.dumps(qa))
    return [root / "figureqa" / "qa_pairs.json"], {"qa_pairs/0": dict(answer="yes"), "qa_pairs/1": dict(answer="no")}


def case_plotqa(root):  # official PlotQA qa_pairs_V2.json
    save(root / "plotqa" / "png" / "12.png")
    qa = {"qa_pairs": [{"image_index": 12, "question_string": "What is the sum of the values?", "answer": 33.5,
                        "answer_bbox": [], "template": "data_retrieval", "type": "", "qid": 901}]}
    (root / "plotqa" / "qa_pairs_V2.json").write_text(json.dumps(qa))
    return [root / "plotqa" / "qa_pairs_V2.json"], {"qa_pairs_V2/901": dict(answer="33.5")}


def case_tabmwp(root):  # PromptPG problems_train.json: a dict keyed by pid; tables/<pid>.png
    save(root / "tabmwp" / "tables" / "1042.png", size=(200, 80))
    probs = {"1042": {"question": "Which is greater?", "choices": ["31", "29"], "answer": "31", "unit": None,
                      "table_title": "Scores", "table": "A | 31\nB | 29", "table_for_pd": {"A": ["31"]}, "row_num": 2,
                      "column_num": 2, "solution": "...", "ques_type": "multi_choice", "ans_type": "extractive_text",
                      "grade": 3, "split": "train"}}
    (root / "tabmwp" / "problems_train.json").write_text(json.dumps(probs))
    return [root / "tabmwp" / "problems_train.json"], {
        "problems_train/1042": dict(answer="31", choices=["31", "29"], size=(200, 80), meta={"ques_type": "multi_choice"})}


def case_geometry3k_intergps(root):  # InterGPS: <split>/<id>/data.json + img_diagram.png
    save(root / "geometry3k" / "train" / "2101" / "img_diagram.png")
    (root / "geometry3k" / "train" / "2101" / "data.json").write_text(json.dumps({
        "id": 2101, "problem_text": "Find x.", "annotat_text": "Find x in the figure.", "choices": ["3", "4", "5", "6"],
        "answer": "C", "problem_type_graph": ["Triangle"], "problem_type_goal": ["Length"]}))
    return [root / "geometry3k" / "train"], {"geometry3k-train/2101":  # a split folder: its dataset names it
         dict(question="Find x.", answer="C", choices=["3", "4", "5", "6"])}


def case_scienceqa(root):  # derek-thomas/ScienceQA: answer is an int index; image null on text-only rows
    rows = [{"image": struct("blue"), "question": "Which animal is shown?", "choices": ["cat", "dog"], "answer": 1,
             "hint": "Look at the picture.", "task": "closed choice", "grade": "grade2", "subject": "natural science",
             "topic": "biology", "category": "Animals", "skill": "x", "lecture": "...", "solution": "..."},
            {"image": None, "question": "Which is a mammal?", "choices": ["frog", "whale"], "answer": 1, "hint": "",
             "task": "closed choice", "grade": "grade2", "subject": "s", "topic": "t", "category": "c", "skill": "x",
             "lecture": "", "solution": ""}]
    return [parquet(root / "scienceqa_train.parquet", rows)], {
        "scienceqa_train/0": dict(question="Context: Look at the picture. Which animal is shown?", answer="B",
                                  choices=["cat", "dog"])}


def case_aokvqa(root):  # A-OKVQA: choices + correct_choice_idx, 10 direct answers
    rows = [{"image": struct("red"), "question_id": "22MexNkBPpdZGX6sxbxVBH", "question": "What is the man holding?",
             "choices": ["bat", "ball", "glove", "racket"], "correct_choice_idx": 3,
             "direct_answers": ["racket"] * 10, "difficult_direct_answer": False, "rationales": ["..."] * 3}]
    return [parquet(root / "aokvqa_val.parquet", rows)], {
        "aokvqa_val/22MexNkBPpdZGX6sxbxVBH": dict(answer="D", choices=["bat", "ball", "glove", "racket"])}


def case_vizwiz(root):  # official VizWiz val.json: 10 {answer, answer_confidence}, answerable 0/1, images in val/
    save(root / "vizwiz" / "val" / "VizWiz_val_00000001.jpg")
    save(root / "vizwiz" / "val" / "VizWiz_val_00000002.jpg")
    ann = [{"image": "VizWiz_val_00000001.jpg", "question": "What is this?", "answer_type": "other", "answerable": 1,
            "answers": [{"answer": "soup", "answer_confidence": "yes"}] * 6 + [{"answer": "can", "answer_confidence": "maybe"}] * 4},
           {"image": "VizWiz_val_00000002.jpg", "question": "What colour?", "answer_type": "unanswerable", "answerable": 0,
            "answers": [{"answer": "unsuitable", "answer_confidence": "yes"}] * 10}]
    (root / "vizwiz" / "val.json").write_text(json.dumps(ann))
    return [root / "vizwiz" / "val.json"], {"vizwiz-val/VizWiz_val_00000001.jpg": dict(answer="soup"),  # split-named file:
                                            "vizwiz-val/VizWiz_val_00000002.jpg": dict(answer="unanswerable")}  # its folder names it


def case_textvqa(root):  # TextVQA: 10 human answers -> the most frequent (all kept in meta.answers)
    rows = [{"image_id": "abc", "question_id": 34602, "question": "What brand?", "question_tokens": ["what", "brand"],
             "image": struct("red"), "image_width": 60, "image_height": 40, "flickr_original_url": "", "flickr_300k_url": "",
             "answers": ["nokia"] * 3 + ["Nokia"] * 4 + ["samsung"] * 3, "image_classes": ["phone"], "set_name": "train",
             "ocr_tokens": ["NOKIA"]}]
    return [parquet(root / "textvqa_train.parquet", rows)], {"textvqa_train/34602": dict(answer="nokia")}


def case_docvqa(root):  # lmms-lab/DocVQA: questionId, answers list
    rows = [{"questionId": "337", "question": "What is the date?", "question_types": ["handwritten"], "image": struct("white"),
             "docId": 279, "ucsf_document_id": "xnbl0037", "ucsf_document_page_no": "1",
             "answers": ["1/8/93", "January 8, 1993"], "data_split": "validation"}]
    return [parquet(root / "docvqa_val.parquet", rows)], {
        "docvqa_val/337": dict(answer="1/8/93", meta={"answers": ["1/8/93", "January 8, 1993"]})}


def case_infovqa(root):  # lmms-lab/DocVQA config InfographicVQA
    rows = [{"questionId": "98313", "question": "How many?", "answers": ["4"], "answer_type": ["single span"],
             "image": struct("white"), "image_url": "", "operation/reasoning": ["counting"], "ocr": "{}", "data_split": "val"}]
    return [parquet(root / "infovqa_val.parquet", rows)], {"infovqa_val/98313": dict(answer="4")}


def case_clevr_math(root):  # dali-does/clevr-math: label is the int answer
    rows = [{"template": "subtraction", "id": "CLEVR_val_000001_0", "question": "Subtract all cubes. How many objects are left?",
             "image": struct("gray"), "label": 3}]
    return [parquet(root / "clevr_math.parquet", rows)], {"clevr_math/CLEVR_val_000001_0": dict(answer="3")}


def case_superclevr(root):  # Super-CLEVR / CLEVR questions file: {info, questions: [...]}, images/<file>
    save(root / "superclevr" / "images" / "superCLEVR_new_000001.png")
    qs = {"info": {"split": "val"}, "questions": [{"image_filename": "superCLEVR_new_000001.png", "image_index": 1,
                                                   "question": "Is there a red bus?", "answer": "yes", "question_index": 11,
                                                   "split": "val", "program": []}]}
    (root / "superclevr" / "superCLEVR_questions_30k.json").write_text(json.dumps(qs))
    return [root / "superclevr" / "superCLEVR_questions_30k.json"], {"superCLEVR_questions_30k/11": dict(answer="yes")}


def case_iconqa(root):  # lmms-lab/ICON-QA: choices as a list string, answer text
    rows = [{"question_id": "q1", "question": "How many dots?", "choices": "['2', '3', '4']", "answer": "3",
             "query_image": struct("white"), "choice_image_0": None, "choice_image_1": None, "ques_type": "choose_txt",
             "label": "", "grade": "grade1", "skills": "counting"}]
    return [parquet(root / "iconqa_val.parquet", rows)], {"iconqa_val/q1": dict(answer="3", choices=["2", "3", "4"])}


def case_mathvista(root):  # AI4Math/MathVista: decoded_image struct, choices, unit, precision
    rows = [{"pid": "1", "question": "Find the angle.", "image": "images/1.jpg", "decoded_image": struct("red"),
             "choices": ["135°", "140°", "145°", "150°"], "unit": None, "precision": None, "answer": "145°",
             "question_type": "multi_choice", "answer_type": "text", "metadata": {"category": "math-targeted-vqa"},
             "query": "Hint: ..."},
            {"pid": "2", "question": "How long?", "image": "images/2.jpg", "decoded_image": struct("red"), "choices": None,
             "unit": "cm", "precision": 1.0, "answer": "1.5", "question_type": "free_form", "answer_type": "float",
             "metadata": {"category": "math-targeted-vqa"}, "query": "..."}]
    return [parquet(root / "mathvista_testmini.parquet", rows)], {
        "mathvista_testmini/1": dict(answer="145°", choices=["135°", "140°", "145°", "150°"]),
        "mathvista_testmini/2": dict(answer="1.5", choices=None, meta={"unit": "cm", "precision": 1.0})}


def case_mathverse(root):  # AI4Math/MathVerse testmini: Vision Only has an empty question
    rows = [{"sample_index": "1", "problem_index": "1", "problem_version": "Vision Only", "question": "", "image": struct("red"),
             "answer": "B", "question_type": "multi-choice", "metadata": {"subject": "Plane Geometry"},
             "query_wo": "...", "query_cot": "...", "question_for_eval": "..."}]
    return [parquet(root / "mathverse_testmini.parquet", rows)], {
        "mathverse_testmini/1": dict(question="Answer the question shown in the image.", answer="B",
                                     meta={"problem_version": "Vision Only"})}


def case_mmstar(root):  # Lin-Chen/MMStar: options inside the question, meta_info struct
    rows = [{"index": 0, "question": "What is shown?\nOptions: A: a cat, B: a dog, C: a bird, D: a fish", "image": struct("red"),
             "answer": "B", "category": "coarse perception", "l2_category": "image scene and topic",
             "meta_info": {"source": "MMBench", "split": "val", "image_path": "x.png"}}]
    return [parquet(root / "mmstar.parquet", rows)], {
        "mmstar/0": dict(answer="B", choices=None, meta={"options": ["a cat", "a dog", "a bird", "a fish"]})}


def case_hallusion_json(root):  # tianyi-lab/HallusionBench HallusionBench.json: strings; filename null without image
    save(root / "hb" / "VD" / "math" / "0_1.png")
    rows = [{"category": "VD", "subcategory": "math", "visual_input": "2", "set_id": "0", "figure_id": "1",
             "sample_note": "", "question_id": "0", "question": "Is angle A 30 degrees?", "gt_answer_details": "...",
             "gt_answer": "1", "filename": "./VD/math/0_1.png"},
            {"category": "VS", "subcategory": "chart", "visual_input": "0", "set_id": "3", "figure_id": "0",
             "sample_note": "", "question_id": "1", "question": "Is X larger than Y?", "gt_answer_details": "...",
             "gt_answer": "0", "filename": None}]
    (root / "hb" / "HallusionBench.json").write_text(json.dumps(rows))
    return [root / "hb" / "HallusionBench.json"], {"HallusionBench/VD_math_0_1_0": dict(answer="yes", meta={"figure_id": "1"})}


def case_vlmevalkit_tsv(root):  # VLMEvalKit TSV: base64 images; a short image cell names the row it shares
    img = base64.b64encode(png("green")).decode()
    root.mkdir(parents=True, exist_ok=True)
    lines = ["index\timage\tquestion\tanswer\tA\tB\tcategory\tl2-category",
             f"10\t{img}\tWhat colour?\tA\tgreen\tred\tcoarse perception\tcolour",
             "11\t10\tWhich shade?\tB\tlight\tdark\tcoarse perception\tcolour"]
    (root / "MMStar_vlm.tsv").write_text("\n".join(lines) + "\n")
    return [root / "MMStar_vlm.tsv"], {"MMStar_vlm/10": dict(answer="A", choices=["green", "red"]),
                                       "MMStar_vlm/11": dict(answer="B", choices=["light", "dark"], size=(60, 40))}


def case_llava(root):  # LLaVA docs/Finetune_Custom_Data.md: a JSON list of {id, image, conversations [{from, value}]}
    uid = "997bb945-628d-4724-b370-b84de974a19f"
    save(root / "llava" / "part-000001" / f"{uid}.jpg", "green")            # image paths: relative, JPEG
    save(root / "llava" / "coco" / "train2017" / "000000033471.jpg", "blue", (64, 48))
    rows = [{"id": uid, "image": f"part-000001/{uid}.jpg",
             "conversations": [{"from": "human", "value": "<image>\nWhat colour is the picture?"},
                               {"from": "gpt", "value": "Green."}]},
            # multi-turn, <image> after the question (llava_instruct_150k writes it either side)
            {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
             "conversations": [{"from": "human", "value": "What are the colors of the bus in the image?\n<image>"},
                               {"from": "gpt", "value": "The bus in the image is white and red."},
                               {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                               {"from": "gpt", "value": "The back of the bus features an advertisement."}]}]
    (root / "llava" / "llava_instruct.json").write_text(json.dumps(rows, indent=2))
    return [root / "llava" / "llava_instruct.json"], {
        f"llava_instruct/{uid}": dict(question="What colour is the picture?", answer="Green", choices=None,
                                      meta={"later_turns": 0, "native_id": uid}),
        "llava_instruct/000000033471": dict(question="What are the colors of the bus in the image?", size=(64, 48),
                                            answer="The bus in the image is white and red", meta={"later_turns": 2})}


CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_layout_ingests_into_the_expected_samples(tmp_path, name):
    inputs, expected = CASES[name](tmp_path / "raw")
    out = tmp_path / "work" / "ingested.jsonl"
    summary = data.ingest(inputs, out, max_pixels=1003520)
    samples = {s.id: s for s in read_jsonl(out)}
    assert set(expected) == set(samples), f"{name}: kept {sorted(samples)}, log {out.with_name('ingested.log.jsonl').read_text()}"
    log = {r["id"]: r for r in map(json.loads, out.with_name("ingested.log.jsonl").read_text().splitlines())}
    for sid, want in expected.items():
        s = samples[sid]
        for field in ("question", "answer", "choices", "source"):
            if field in want:
                assert getattr(s, field) == want[field], f"{name} {sid}: {field} {getattr(s, field)!r} != {want[field]!r}"
        for key, value in want.get("meta", {}).items():
            assert s.meta.get(key) == value, f"{name} {sid}: meta.{key} {s.meta.get(key)!r} != {value!r}"
        if "size" in want:
            assert Image.open(s.image).size == want["size"]
        assert log[sid]["images"] == want.get("images", 1) and log[sid]["layout"] == s.meta["layout"]
    assert summary["several_images_tiled"] == sum(w.get("images", 1) > 1 for w in expected.values())


def test_each_layout_is_detected_by_name(tmp_path):
    seen = {}
    for name, fn in CASES.items():
        inputs, expected = fn(tmp_path / name)
        data.ingest(inputs, tmp_path / name / "out.jsonl")
        seen[name] = {s.meta["layout"] for s in read_jsonl(tmp_path / name / "out.jsonl")}
    assert seen["mmmu"] == {"mmmu"} and seen["easyr1"] == {"easyr1"} and seen["verl"] == {"verl"}
    assert seen["scienceqa"] == {"scienceqa"} and seen["vizwiz"] == {"vizwiz"} and seen["textvqa"] == {"vqa_answers"}
    assert seen["hallusion_json"] == {"hallusionbench"} and seen["vlmevalkit_tsv"] == {"vlmevalkit"}
    assert seen["tabmwp"] == {"tabmwp"} and seen["figureqa"] == {"figureqa"} and seen["mathvista"] == {"mathvista"}
    assert seen["llava"] == {"llava"}
    assert all(seen[n] != {"generic"} for n in seen), f"every published layout has its own row in LAYOUTS: {seen}"


def test_text_only_rows_are_dropped_with_the_reason(tmp_path):
    inputs, _ = case_scienceqa(tmp_path)
    data.ingest(inputs, tmp_path / "out.jsonl")
    log = [json.loads(l) for l in (tmp_path / "out.log.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in log if r["status"] == "dropped"] == [("scienceqa_train/1", "no image (a text-only row)")]


def test_integer_ids_of_two_datasets_never_collide(tmp_path):
    a = parquet(tmp_path / "chartqa.parquet", [{"id": 1, "image": struct(), "query": "q1", "label": ["1"]}])
    b = parquet(tmp_path / "clevr_math.parquet", [{"template": "t", "id": 1, "question": "q2", "image": struct(), "label": 2}])
    summary = data.ingest([a, b], tmp_path / "out.jsonl")
    assert summary["kept"] == 2 and sorted(s.id for s in read_jsonl(tmp_path / "out.jsonl")) == ["chartqa/1", "clevr_math/1"]


def test_mmmu_options_string_is_a_list_not_one_choice(tmp_path):
    # the regression the issue names: options "['a', 'b']" became one choice, image_1 was "missing image"
    inputs, _ = case_mmmu(tmp_path)
    s = {s.id: s for s in read_jsonl(_ingest(inputs, tmp_path))}["mmmu_validation/validation_Art_1"]
    assert len(s.choices) == 3 and s.answer == "B"


def _ingest(inputs, tmp_path):
    data.ingest(inputs, tmp_path / "out.jsonl")
    return tmp_path / "out.jsonl"


def test_shards_named_alike_get_their_dataset_folder_as_source(tmp_path):
    # HF downloads are all train-00000-of-00001.parquet: two datasets must not collide
    a = parquet(tmp_path / "chartqa" / "data" / "train-00000-of-00001.parquet", [{"image": struct(), "query": "q", "label": ["1"]}])
    b = parquet(tmp_path / "geo3k" / "data" / "train-00000-of-00001.parquet", [{"images": [struct()], "problem": "p", "answer": "2"}])
    summary = data.ingest([a, b], tmp_path / "out.jsonl")
    assert summary["kept"] == 2
    assert sorted(s.id for s in read_jsonl(tmp_path / "out.jsonl")) == ["chartqa-train-00000-of-00001/0", "geo3k-train-00000-of-00001/0"]
    c = parquet(tmp_path / "other" / "chartqa.parquet", [{"image": struct(), "query": "q", "label": ["1"]}])
    d = parquet(tmp_path / "more" / "chartqa.parquet", [{"image": struct(), "query": "q", "label": ["1"]}])
    with pytest.raises(SystemExit, match="share the source name"):
        data.ingest([c, d], tmp_path / "out2.jsonl")


def test_hallusionbench_as_parquet_is_still_hallusionbench(tmp_path):
    rows = [{"category": "VD", "subcategory": "math", "visual_input": "1", "set_id": "0", "figure_id": "0", "sample_note": "",
             "question_id": "0", "question": "Is it?", "gt_answer_details": "", "gt_answer": "0", "filename": None,
             "image": struct()}]
    inputs = [parquet(tmp_path / "hallusion_bench.parquet", rows)]
    s = read_jsonl(_ingest(inputs, tmp_path))[0]
    assert s.meta["layout"] == "hallusionbench" and s.id == "hallusion_bench/VD_math_0_0_0" and s.answer == "no"


def test_llava_rows_with_broken_conversations_are_dropped_by_name_and_the_rest_kept(tmp_path):
    root = tmp_path / "llava"
    save(root / "images" / "a.jpg", "red")
    ask = lambda q="<image>\nHow many?", a="2": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    rows = [{"id": "ok1", "image": "images/a.jpg", "conversations": ask()},
            {"id": "empty", "image": "images/a.jpg", "conversations": []},                   # no turns
            {"id": "absent", "image": "images/a.jpg"},                                        # no conversations key
            {"id": "nogpt", "image": "images/a.jpg", "conversations": ask()[:1]},             # question only
            {"id": "gptfirst", "image": "images/a.jpg", "conversations": ask()[::-1][:1]},    # no human turn
            {"id": "noanswer", "image": "images/a.jpg", "conversations": ask(a=None)},        # gpt value null
            {"id": "tagonly", "image": "images/a.jpg", "conversations": ask(q="<image>")},    # nothing but the tag
            {"id": "textonly", "conversations": ask(q="What is 2 + 2?", a="4")},             # LLaVA's text-only rows
            {"id": "ok2", "image": "images/a.jpg", "conversations": ask(q="Is it red?\n<image>", a="Yes")}]
    (root / "mix.json").write_text(json.dumps(rows))
    out = tmp_path / "work" / "ingested.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "data.py"), "ingest", "--inputs", str(root / "mix.json"),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept = {s.id: s for s in read_jsonl(out)}
    assert sorted(kept) == ["mix/ok1", "mix/ok2"], "the good rows survive the bad ones"
    assert (kept["mix/ok1"].question, kept["mix/ok1"].answer) == ("How many?", "2")
    assert (kept["mix/ok2"].question, kept["mix/ok2"].answer) == ("Is it red?", "Yes")
    reasons = {r["id"]: r["reason"] for r in _log(out) if r["status"] == "dropped"}
    assert reasons == {"mix/empty": "no conversations: a LLaVA row needs a `conversations` list of {from, value} turns",
                       "mix/absent": "no conversations: a LLaVA row needs a `conversations` list of {from, value} turns",
                       "mix/nogpt": "no gpt turn after the first human turn in `conversations`",
                       "mix/gptfirst": "no human turn in `conversations`",
                       "mix/noanswer": "missing answer: the gpt turn has no text",
                       "mix/tagonly": "missing question: the first human turn has no text besides <image>",
                       "mix/textonly": "no image (a text-only row)"}
    for item, reason in reasons.items():  # and each is named on stderr as it happens
        assert f"item {item} " in proc.stderr and reason in proc.stderr


class CountingServer:
    """A real HTTP server on 127.0.0.1 that serves a PNG to any GET and counts the requests: a URL pointing
    at it would load if the code fetched."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                body = png("red")
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_image_urls_are_refused_with_the_reason_and_never_fetched(tmp_path):
    http = CountingServer()
    try:
        save(tmp_path / "raw" / "local.png", "blue")
        signed = f"{http.url}/imgs/a.png?X-Amz-Signature=s3cr3t"
        rows = [{"id": "local", "image": "local.png", "question": "q", "answer": "a"},
                {"id": "http", "image": signed, "question": "q", "answer": "a"},
                {"id": "https", "image": "https://example.org/b.jpg", "question": "q", "answer": "a"},
                {"id": "gs", "images": ["local.png", "gs://bucket/c.png"], "question": "q", "answer": "a"},
                {"id": "s3", "image": {"bytes": None, "path": "s3://bucket/d.png"}, "question": "q", "answer": "a"}]
        (tmp_path / "raw" / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = tmp_path / "work" / "ingested.jsonl"
        summary = data.ingest([tmp_path / "raw" / "set.jsonl"], out)
        assert [s.id for s in read_jsonl(out)] == ["set/local"] and summary["dropped"] == {"image is a URL": 4}
        reasons = {r["id"]: r["reason"] for r in _log(out) if r["status"] == "dropped"}
        hint = "(download the images and point the rows at local files)"
        assert reasons == {"set/http": f"image is a URL: {http.url}/imgs/a.png {hint}",  # the signature is not logged
                           "set/https": f"image is a URL: https://example.org/b.jpg {hint}",
                           "set/gs": f"image is a URL: gs://bucket/c.png {hint}",
                           "set/s3": f"image is a URL: s3://bucket/d.png {hint}"}
        # a Samples JSONL (what filter, facts, reference and grpo.py read): the row is reported by id and skipped
        (tmp_path / "samples.jsonl").write_text(json.dumps({**BASE, "id": "u1", "image": signed}) + "\n"
                                                + json.dumps({**BASE, "id": "u2", "image": "raw/local.png"}) + "\n")
        errors = []
        assert [s.id for s in read_jsonl(tmp_path / "samples.jsonl", errors)] == ["u2"]
        assert len(errors) == 1 and "(id u1): image is a URL: http://127.0.0.1" in errors[0]
        io_ = data.StepIO(tmp_path / "facts.jsonl", "facts")
        assert [s.id for s in data.pending(tmp_path / "samples.jsonl", io_)] == ["u2"]
        io_.close()
        assert [r["id"] for r in _log(tmp_path / "facts.jsonl") if "image is a URL" in r["reason"]] == ["u1"]
        with pytest.raises(ValueError, match=r"^item u3: image is a URL: s3://bucket/e.png \(download") as e:
            data.load_image(Sample("u3", "s3://bucket/e.png?X-Amz-Signature=s3cr3t", "q", "a"))
        assert "s3cr3t" not in str(e.value)
        with pytest.raises(ValueError, match="image is a URL"):  # eval.py resolves benchmark images here
            data.load_images([signed], tmp_path)
        assert http.requests == [], "nothing is downloaded"
    finally:
        http.close()


def _log(out):
    return [json.loads(l) for l in Path(str(out).replace(".jsonl", ".log.jsonl")).read_text().splitlines()]


# -----------------------------------------------------------------------------
# PaDLayer ingest: three formats and bad rows

@pytest.fixture()
def raw_inputs(tmp_path):
    """The same kind of items in the three on-disk formats, with bad rows among them."""
    root = tmp_path / "raw"
    (root / "jsonl_imgs").mkdir(parents=True)
    Image.new("RGB", (400, 300), "red").save(root / "jsonl_imgs" / "big.png")       # over the pixel budget
    Image.new("RGB", (50, 50), "blue").save(root / "jsonl_imgs" / "small.png")
    (root / "jsonl_imgs" / "corrupt.png").write_bytes(b"\x89PNG not really")
    rows = [
        {"id": "j1", "image": "jsonl_imgs/big.png", "question": " What  colour? ", "answer": " Red ", "difficulty": 3},
        {"question_id": "j2", "image_path": "jsonl_imgs/small.png", "query": "Pick one", "label": "B",
         "options": {"A": "red", "B": "blue"}},
        {"id": "j3", "image": "jsonl_imgs/missing.png", "question": "q", "answer": "a"},   # missing image
        {"id": "j4", "image": "jsonl_imgs/corrupt.png", "question": "q", "answer": "a"},   # corrupt image
        {"id": "j5", "image": "jsonl_imgs/small.png", "question": "q"},                    # missing answer
        {"id": "j1", "image": "jsonl_imgs/small.png", "question": "again", "answer": "x"}, # duplicate id
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "{this row is not json")                                               # unreadable row
    (root / "set.jsonl").write_text("\n".join(lines) + "\n")
    # Hugging Face parquet: images as {bytes, path} structs
    table = pa.table({"id": ["p1", "p2"], "question": ["How many?", "Is it green?"], "answer": [["3", "three"], ["yes"]],
                      "image": [{"bytes": png("green"), "path": "a.png"}, {"bytes": b"garbage", "path": "b.png"}],
                      "choices": [None, None], "extra_field": ["kept", "kept too"]})
    pq.write_table(table, root / "hf.parquet")
    # a folder of images with a CSV annotation file
    (root / "folder").mkdir()
    Image.new("RGB", (30, 30), "yellow").save(root / "folder" / "y.png")
    (root / "folder" / "annotations.csv").write_text("id,file_name,question,answer,note\nc1,y.png,Colour?,yellow,hi\n")
    return [root / "set.jsonl", root / "hf.parquet", root / "folder"]


def test_ingest_three_formats_and_bad_rows(tmp_path, raw_inputs):
    out = tmp_path / "work" / "ingested.jsonl"
    summary = data.ingest(raw_inputs, out, max_pixels=112 * 112)
    samples = {s.id: s for s in read_jsonl(out)}
    assert sorted(samples) == ["folder/c1", "hf/p1", "set/j1", "set/j2"], "ids are namespaced by their source"
    j1, j2, p1, c1 = samples["set/j1"], samples["set/j2"], samples["hf/p1"], samples["folder/c1"]
    assert j1.question == "What colour?" and j1.answer == "Red"                           # normalised
    assert j1.meta == {"difficulty": 3, "layout": "generic", "native_id": "j1"}           # unknown keys kept
    assert j2.choices == ["red", "blue"] and j2.answer == "B"                             # options dict -> list
    assert p1.answer == "3" and p1.meta["extra_field"] == "kept"                          # first of a list answer
    assert c1.meta["note"] == "hi" and c1.source == "folder"                              # the folder names the source
    # 400 x 300 over a 112 x 112 budget: both sides scaled by sqrt(budget / pixels), rounded down
    scale = math.sqrt(112 * 112 / (400 * 300))
    assert Image.open(j1.image).size == (int(400 * scale), int(300 * scale)), "resized to the budget, aspect kept, not cropped"
    reasons = {r["id"]: r.get("reason", "") for r in _log(out) if r["status"] == "dropped"}
    assert "missing or corrupt image" in reasons["set/j3"] and "missing or corrupt image" in reasons["set/j4"]
    assert reasons["set/j5"] == "missing answer" and reasons["hf/p2"].startswith("missing or corrupt image")
    assert sum(k.startswith("set/j1#duplicate") for k in reasons) == 1, "the duplicate is reported under its own key"
    assert sum("unreadable row" in r for r in reasons.values()) == 1
    assert summary["kept"] == 4 and summary["layouts"] == {"generic": 4}
    # a second run decides nothing again and writes nothing twice
    again = data.ingest(raw_inputs, out, max_pixels=112 * 112)
    assert [s.id for s in read_jsonl(out)].count("set/j1") == 1 and again["kept"] == 4
    assert len(_log(out)) == len(reasons) + 4


# -----------------------------------------------------------------------------
# filter and reference with the real engine

def test_filter_keeps_by_pass_rate_and_writes_the_report(tmp_path, tiny_ckpt, shapes_file):
    src = tmp_path / "in.jsonl"
    data.write_jsonl(src, read_jsonl(shapes_file)[:6])
    processor = palmr.load_processor(tiny_ckpt)
    engine = palmr.HFEngine(palmr.load_model(tiny_ckpt), processor, 112 * 112)
    out = tmp_path / "filtered.jsonl"
    summary, report = data.filter_step(src, out, engine, processor, k=2, batch=4, max_new_tokens=8, max_pixels=112 * 112)
    # the random tiny model never answers right: pass rate 0 everywhere, dropped as too hard (0 < rate < 1)
    assert summary == {"kept": 0, "dropped": {"too hard": 6}, "failed": {}}
    md = Path(report).read_text()
    assert "| shapes/" in md and out.with_suffix(".report.png").exists()
    assert sum(int(line.split("|")[2]) for line in md.splitlines() if line.startswith("| shapes/")) == 6
    out2 = tmp_path / "loose.jsonl"
    summary, _ = data.filter_step(src, out2, engine, processor, k=2, min_pass=0.0, max_pass=1.0, batch=4,
                                  max_new_tokens=8, max_pixels=112 * 112, exclusive=False)
    assert summary["kept"] == 6 and all("pass_rate" in s.meta for s in read_jsonl(out2))


class ScriptedEngine:
    """The sampling interface with fixed completions: lets the test choose which rollouts are correct."""

    def __init__(self, texts):
        self.texts = texts

    def generate(self, prompts, n, max_new_tokens, temperature=1.0, top_p=1.0, seed=0):
        return [[palmr.Completion([1], t, [0.0], True) for t in self.texts[:n]] for _ in prompts]


def test_reference_picks_the_most_faithful_correct_rollout(tmp_path, shapes_file, tiny_ckpt):
    processor = palmr.load_processor(tiny_ckpt)
    s = next(x for x in read_jsonl(shapes_file) if x.source == "shapes/count")
    n = int(s.answer)
    inventory = s.reference.split("<think>I see ")[1].split(".")[0]
    texts = [f"<think>I see 7 purple stars. So there are {n} things.</think> \\boxed{{{n}}}",    # correct, unfaithful
             f"<think>I see {inventory}.</think> The answer is \\boxed{{{n}}}.",                 # correct, faithful
             f"<think>I see {inventory}.</think> The answer is \\boxed{{{n + 1}}}.",             # faithful, wrong
             "no format at all"]
    src, out = tmp_path / "in.jsonl", tmp_path / "ref.jsonl"
    data.write_jsonl(src, [s])
    summary = data.reference_step(src, out, ScriptedEngine(texts), processor, RuleJudge(), n=4)
    assert summary["kept"] == 1 and read_jsonl(out)[0].reference == texts[1]
    src2, out2 = tmp_path / "in2.jsonl", tmp_path / "ref2.jsonl"
    data.write_jsonl(src2, [s])
    summary = data.reference_step(src2, out2, ScriptedEngine(texts[2:]), processor, RuleJudge(), n=2)
    assert summary == {"kept": 0, "dropped": {"no correct rollout": 1}, "failed": {}}


# -----------------------------------------------------------------------------
# facts through a real Gemini-protocol server

@pytest.fixture()
def gemini(monkeypatch):
    server = GeminiServer(slow_seconds=1.5)
    monkeypatch.setenv("GEMINI_API_KEY", "gk-test-secret")
    yield server
    server.close()


def _facts_inputs(tmp_path, shapes_file, n):
    samples = read_jsonl(shapes_file)[:n]
    src = tmp_path / "in.jsonl"
    data.write_jsonl(src, [Sample(**{**s.to_dict(), "facts": None}) for s in samples])
    return src, samples


def test_facts_with_faults_retries_and_validation(tmp_path, shapes_file, gemini):
    src, samples = _facts_inputs(tmp_path, shapes_file, 8)
    for s in samples:
        gemini.register(data.load_image(s), s.facts)
    gemini.faults = ["429", "500", "slow", "badjson", "schema", "429"]
    doomed = samples[3]
    gemini.always[pixel_hash(data.load_image(doomed))] = "schema"   # never valid: must end as a failure
    provider = data.GeminiProvider("gemini-2.5-flash", base_url=gemini.base_url, timeout=1.0)
    out = tmp_path / "facts.jsonl"
    summary = data.facts_step(src, out, provider, concurrency=4, retries=3, backoff=0.01)
    written = {s.id: s.facts for s in read_jsonl(out)}
    assert doomed.id not in written, "invalid facts are never written"
    assert written == {s.id: s.facts for s in samples if s.id != doomed.id}, "each item gets its own image's facts"
    assert summary["failed"] == {"invalid reply": 1} and summary["kept"] == 7
    fail = next(r for r in _log(out) if r["status"] == "failed")
    assert fail["id"] == doomed.id and fail["reason"].startswith("invalid reply: facts")
    assert sum(r["key"] == pixel_hash(data.load_image(doomed)) for r in gemini.requests) == 4, "1 + 3 retries"
    # requests: one per item, one more per injected fault, 3 more for the doomed item's retries
    assert len(gemini.requests) == 8 + 6 + 3
    # tokens are counted for every reply that arrived (valid or not; 300 in, 60 out each): all requests but
    # the 429s, the 500 and the slow one (timed out)
    assert summary["cost"]["input_tokens"] == 300 * (17 - 4) and summary["cost"]["output_tokens"] == 60 * (17 - 4)
    assert summary["cost"]["usd"] == pytest.approx((summary["cost"]["input_tokens"] * 0.30
                                                    + summary["cost"]["output_tokens"] * 2.50) / 1e6)
    assert all(r["api_key"] == "gk-test-secret" and r["schema"]["type"] == "OBJECT" for r in gemini.requests)
    assert "gk-test-secret" not in out.read_text() + Path(str(out).replace(".jsonl", ".log.jsonl")).read_text()
    # a re-run retries only the failure (which fails again) and writes nothing twice
    before = len(gemini.requests)
    data.facts_step(src, out, provider, concurrency=4, retries=0, backoff=0.01)
    assert len(gemini.requests) == before + 1 and len(read_jsonl(out)) == 7


def test_facts_killed_mid_run_resumes_with_every_id_once(tmp_path, shapes_file, gemini):
    src, samples = _facts_inputs(tmp_path, shapes_file, 24)
    gemini.latency = 0.15
    out = tmp_path / "facts.jsonl"
    cmd = [sys.executable, str(ROOT / "data.py"), "facts", "--in", str(src), "--out", str(out), "--provider", "gemini",
           "--base-url", gemini.base_url, "--concurrency", "2", "--backoff", "0.01"]
    env = {**os.environ, "GEMINI_API_KEY": "gk-test-secret"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # requests already sent reach the server's log
    partial = len(read_jsonl(out))
    assert 5 <= partial < 24, f"the kill must land mid-run ({partial} written)"
    before = len(gemini.requests)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ids = [json.loads(l)["id"] for l in out.read_text().splitlines()]
    assert sorted(ids) == sorted(s.id for s in samples), "every id exactly once"
    assert len(gemini.requests) == before + (24 - partial), "the resumed run asks only for the ids not yet written"


def test_pending_keeps_the_first_copy_of_a_repeated_id(tmp_path, shapes_file):
    s = read_jsonl(shapes_file)[0]
    src = tmp_path / "in.jsonl"
    row = json.dumps({**s.to_dict(), "image": s.image})
    src.write_text(row + "\n" + row + "\n")
    io_ = data.StepIO(tmp_path / "out.jsonl", "test")
    todo = data.pending(src, io_)
    assert [x.id for x in todo] == [s.id], "the first copy is still to do; the repeat is logged apart"
    assert sum(r["id"].startswith(s.id + "#duplicate") for r in _log(tmp_path / "out.jsonl")) == 1


class BlockedProvider:
    """Gemini returns no text when a reply is blocked: the provider raises ValueError for it."""
    calls = 0

    def describe(self, png):
        BlockedProvider.calls += 1
        if BlockedProvider.calls % 2:
            raise ValueError("no text in the reply (finish reason: SAFETY)")
        return json.dumps({"objects": [], "relations": [], "text": [], "global": {}}), 10, 5


def test_facts_keeps_good_items_when_others_are_blocked(tmp_path, shapes_file):
    src, samples = _facts_inputs(tmp_path, shapes_file, 4)
    out = tmp_path / "facts.jsonl"
    summary = data.facts_step(src, out, BlockedProvider(), concurrency=1, retries=0, backoff=0.0)
    assert summary["kept"] == 2 and summary["failed"] == {"invalid reply": 2}, summary
    assert len(read_jsonl(out)) == 2


def test_facts_cost_bills_thinking_tokens_at_the_output_price(tmp_path, shapes_file, monkeypatch):
    # gemini-2.5-flash thinks by default: usageMetadata.thoughtsTokenCount, apart from candidatesTokenCount,
    # billed at the output price ("Output price (including thinking tokens)", Gemini API pricing)
    server = GeminiServer(prompt_tokens=258, reply_tokens=70, thought_tokens=900)
    monkeypatch.setenv("GEMINI_API_KEY", "gk-test-secret")
    try:
        src, _ = _facts_inputs(tmp_path, shapes_file, 3)
        provider = data.GeminiProvider("gemini-2.5-flash", base_url=server.base_url, timeout=10.0)
        out = tmp_path / "facts.jsonl"
        summary = data.facts_step(src, out, provider, concurrency=2, retries=0, price_in=0.30, price_out=2.50)
    finally:
        server.close()
    assert summary["kept"] == 3
    cost = summary["cost"]
    assert (cost["input_tokens"], cost["output_tokens"], cost["thought_tokens"]) == (3 * 258, 3 * (70 + 900), 3 * 900)
    # by hand: 774 in * 0.30 + 2910 out * 2.50 = 232.2 + 7275 = 7507.2 micro-USD
    assert cost["usd"] == pytest.approx(0.0075072)
    assert all((r["output_tokens"], r["thought_tokens"]) == (970, 900) for r in _log(out) if r["status"] == "kept")


# -----------------------------------------------------------------------------
# one bad item: logged with its id and reason, the rest goes on

def test_filter_step_logs_the_bad_item_and_goes_on(mixed_items, tiny_ckpt, tmp_path):
    processor = palmr.load_processor(tiny_ckpt)
    engine = palmr.HFEngine(palmr.load_model(tiny_ckpt), processor, 1003520)   # the default budget
    summary, _ = data.filter_step(mixed_items, tmp_path / "filtered.jsonl", engine, processor, k=2, batch=5,
                                  max_new_tokens=4, min_pass=-1.0, max_pass=2.0)
    log = [json.loads(l) for l in (tmp_path / "filtered.log.jsonl").read_text().splitlines()]
    dropped = {r["id"]: r["reason"] for r in log if r["status"] == "dropped"}
    assert list(dropped) == ["bad-corrupt"] and "item bad-corrupt" in dropped["bad-corrupt"]
    assert summary["kept"] == 4, "the strip and the three shapes items were rolled out and kept"


# -----------------------------------------------------------------------------
# the synthetic shapes task

@pytest.fixture(scope="module")
def shapes40(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes40")
    path = make_shapes(n=40, out_dir=out, seed=0)
    errors = []
    samples = read_jsonl(path, errors)
    assert errors == []
    return out, path, samples


def test_make_shapes_rows_and_images(shapes40):
    out, path, samples = shapes40
    assert len(samples) == 40
    assert len({s.id for s in samples}) == 40
    assert len(list((out / "images" / "train").glob("*.png"))) == 40
    for s in samples[:5]:
        assert load_image(s).size == (84, 84)  # one 28-px vision token per grid cell


def test_make_shapes_sources(shapes40):
    _, _, samples = shapes40
    assert {s.source for s in samples} == {"shapes/count", "shapes/exists", "shapes/compare", "shapes/choice"}
    for s in samples:  # choices exactly on the multiple-choice questions
        assert (s.choices is not None) == (s.source == "shapes/choice")


def test_make_shapes_facts_match_objects(shapes40):
    _, _, samples = shapes40
    for s in samples:
        objects = s.meta["objects"]
        assert sum(o["count"] for o in s.facts["objects"]) == len(objects), s.id
        assert s.facts["global"]["total_objects"] == len(objects), s.id
        for g in s.facts["objects"]:
            n = sum(o["kind"] == g["name"] and o["color"] == g["attributes"][0] for o in objects)
            assert g["count"] == n == len(g["location"]), s.id


def test_make_shapes_references_are_faithful(shapes40):
    _, _, samples = shapes40
    rj = RuleJudge()
    # judged alone (reference None) so that the reference cannot excuse its own contradictions
    verdicts = rj.judge([JudgeItem(s.question, s.facts, s.reference, None) for s in samples])
    assert [v.s_vis for v in verdicts] == [1.0] * 40
    assert all(not v.failed for v in verdicts)
    assert all(contradictions(s.reference, s.facts) == [] for s in samples)
    assert rj.coverage([JudgeItem(s.question, s.facts, s.reference, None) for s in samples]) == [1.0] * 40


def test_hallucinated_trace_keeps_the_answer_and_is_gated(shapes40):
    # the check above is not vacuous: one misread object (data.hallucinated_trace, the warm-up's
    # controlled hallucination) keeps the answer, is one contradiction, and makes the judge prefer the reference
    _, _, samples = shapes40
    rng, items = random.Random(0), []
    for s in samples:
        bad = hallucinated_trace(s, rng)
        assert bad != s.reference and parse_response(bad)[1] == s.answer, s.id
        [(claim, n)] = contradictions(bad, s.facts)
        assert claim.count != n, s.id  # a group the scene does not hold, or a wrong count
        items.append(JudgeItem(s.question, s.facts, bad, s.reference))
    assert [v.s_vis for v in RuleJudge().judge(items)] == [0.0] * 40


def test_make_shapes_reference_answers_grade_correct(shapes40):
    _, _, samples = shapes40
    for s in samples:
        _, answer, well_formed = parse_response(s.reference)
        assert well_formed, s.id
        assert answer == s.answer, s.id
        assert grade_answer(answer, s.answer, s.choices), s.id
        total, parts = score_completion("palmr", s.reference, s.answer, s.choices)
        assert total == pytest.approx(1.0) and parts["ans"] == 1.0, s.id


def test_make_shapes_deterministic(tmp_path, shapes40):
    _, path, _ = shapes40
    again = make_shapes(n=40, out_dir=tmp_path / "again", seed=0)
    assert open(again).read() == open(path).read()
    other = make_shapes(n=40, out_dir=tmp_path / "other", seed=1)
    assert open(other).read() != open(path).read()  # the seed matters


# -----------------------------------------------------------------------------
# the PaDLayer build on shapes, then grpo.py trains on its output


@pytest.mark.slow
def test_build_on_shapes_gives_a_file_grpo_trains_on(tmp_path, shapes_file, warm_ckpt, gemini):
    import argparse
    for s in read_jsonl(shapes_file):
        gemini.register(data.load_image(s), s.facts)
    work = tmp_path / "work"
    a = argparse.Namespace(cmd="build", inputs=[shapes_file], work=str(work), max_pixels=112 * 112, model=warm_ckpt,
                           k=4, min_pass=0.0, max_pass=1.0, n=4, batch=16, max_new_tokens=64, seed=0,
                           provider="gemini", facts_model="gemini-2.5-flash", base_url=gemini.base_url,
                           api_key_env="OPENAI_API_KEY", concurrency=8, retries=2, backoff=0.01, timeout=10.0,
                           price_in=0.3, price_out=2.5, judge="rule", judge_base_url=None, judge_model=None)
    out = data.run_step(a)
    assert out["ingest"]["kept"] == 64
    kept = read_jsonl(work / "train.jsonl")
    assert kept, f"nothing survived: {out}"
    by_id = {s.id: s for s in read_jsonl(shapes_file)}
    for s in kept:
        assert s.facts == by_id[s.meta["native_id"]].facts, "facts come from the provider, for this item's image"
        assert 0 < s.meta["pass_rate"] < 1 and s.reference and palmr.parse_response(s.reference)[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "grpo.py"),
           "--data", str(work / "train.jsonl"), "--model", warm_ckpt, "--out", str(tmp_path / "run"),
           "--max-steps", "1", "--rollout-batch", "2", "--update-batch", "2", "--group-size", "2",
           "--max-new-tokens", "16"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "step 1/1" in proc.stdout and (tmp_path / "run" / "checkpoint-000001").exists()


# -----------------------------------------------------------------------------
# the CLI: each command's -h lists only its own flags, with their defaults

ROLLOUTS = {"--model": None, "--batch": "8", "--max-new-tokens": "256", "--seed": "0"}
FILTER = {"--k": "8", "--min-pass": "0.0", "--max-pass": "1.0"}
FACTS = {"--provider": "gemini", "--facts-model": None, "--base-url": None, "--api-key-env": "OPENAI_API_KEY",
         "--concurrency": "16", "--retries": "4", "--backoff": "1.0", "--timeout": "120.0", "--price-in": "0.3",
         "--price-out": "2.5"}
REFERENCE = {"--n": "8", "--judge": "rule", "--judge-base-url": None, "--judge-model": None}
STEP_FLAGS = {  # command -> {flag: default shown, None for a required flag or one without a default}
    "shapes": {"--n": "2000", "--out": "data/shapes", "--split": "train", "--seed": "0", "--size": "84"},
    "ingest": {"--inputs": None, "--out": None, "--max-pixels": "1003520"},
    "filter": {"--in": None, "--out": None, "--max-pixels": "1003520", **ROLLOUTS, **FILTER},
    "facts": {"--in": None, "--out": None, **FACTS},
    "reference": {"--in": None, "--out": None, "--max-pixels": "1003520", **ROLLOUTS, **REFERENCE},
    "build": {"--inputs": None, "--work": None, "--max-pixels": "1003520", **ROLLOUTS, **FILTER, **FACTS, **REFERENCE},
}


def _help(*argv):
    proc = subprocess.run([sys.executable, str(ROOT / "data.py"), *argv, "-h"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "100"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.parametrize("step", sorted(STEP_FLAGS))
def test_each_command_help_lists_its_own_flags_with_defaults(step):
    text = _help(step)
    entries, flag = {}, None  # flag -> its help text (wrapped lines joined)
    for line in text.splitlines():
        m = re.match(r"^  (--[a-z-]+)", line)
        if m:
            flag = m.group(1)
            entries[flag] = line
        elif flag and line.startswith("    "):
            entries[flag] += " " + line.strip()
        else:
            flag = None
    entries.pop("--help", None)
    assert set(entries) == set(STEP_FLAGS[step]), f"{step} -h: extra {set(entries) - set(STEP_FLAGS[step])}, " \
                                                  f"missing {set(STEP_FLAGS[step]) - set(entries)}"
    for flag, default in STEP_FLAGS[step].items():
        if default is not None:
            assert f"(default: {default})" in " ".join(entries[flag].split()), f"{step} {flag}: {entries[flag]}"


def test_readme_data_commands_still_parse_and_help_lists_every_command():
    # the commands README shows (and runs/*.sh, if any) must keep working with the per-command flags
    import shlex
    top = _help()
    for step in STEP_FLAGS:
        assert re.search(rf"^    {step}\b", top, re.MULTILINE), f"{step} missing from data.py -h:\n{top}"
    text = (ROOT / "README.md").read_text() + "".join(p.read_text() for p in sorted((ROOT / "runs").glob("*.sh")))
    text = text.replace("\\\n", " ")
    commands = [shlex.split(re.split(r"[`#]", line.split("python data.py ", 1)[1])[0])
                for line in text.splitlines() if "python data.py " in line]
    assert len(commands) >= 5, commands
    for argv in commands:
        data.build_parser().parse_args(argv)  # exits (SystemExit) on a flag the command no longer has
