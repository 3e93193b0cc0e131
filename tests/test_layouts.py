"""Ingest of every published layout the paper trains from (METHOD.md section 1), the RL-ready ones, and
the benchmarks: a few rows each, built exactly as the dataset's card or official loader lays them out
(columns, nesting, answer encodings), read by `data.ingest`; eval.py reads benchmarks through the same
table (`test_eval_reads_benchmarks_through_the_same_table`)."""
import base64
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import data
from data import read_jsonl


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


CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_layout_ingests_into_the_expected_samples(tmp_path, name):
    inputs, expected = CASES[name](tmp_path / "raw")
    out = tmp_path / "work" / "ingested.jsonl"
    summary = data.ingest(inputs, out, max_pixels=1003520)
    samples = {s.id: s for s in read_jsonl(out)}
    assert set(expected) <= set(samples), f"{name}: kept {sorted(samples)}, log {out.with_name('ingested.log.jsonl').read_text()}"
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
