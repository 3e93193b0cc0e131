"""PaDLayer steps on small fixtures: ingest (3 formats + bad rows), filter, facts (Gemini server), reference."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import data
import palmr
from data import Sample, read_jsonl
from gemini_server import GeminiServer

ROOT = Path(__file__).resolve().parent.parent


def _png_bytes(color, size=(60, 40)):
    import io
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _log(out):
    return [json.loads(l) for l in Path(str(out).replace(".jsonl", ".log.jsonl")).read_text().splitlines()]


# -----------------------------------------------------------------------------
# ingest

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
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({"id": ["p1", "p2"], "question": ["How many?", "Is it green?"], "answer": [["3", "three"], ["yes"]],
                      "image": [{"bytes": _png_bytes("green"), "path": "a.png"}, {"bytes": b"garbage", "path": "b.png"}],
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
    w, h = Image.open(j1.image).size
    assert w * h <= 112 * 112 and abs(w / h - 4 / 3) < 0.05, "resized to the budget, aspect kept, not cropped"
    reasons = {r["id"]: r.get("reason", "") for r in _log(out) if r["status"] == "dropped"}
    assert "missing or corrupt image" in reasons["set/j3"] and "missing or corrupt image" in reasons["set/j4"]
    assert reasons["set/j5"] == "missing answer" and reasons["hf/p2"].startswith("missing or corrupt image")
    assert any(k.startswith("set/j1#duplicate") for k in reasons), "the duplicate is reported under its own key"
    assert any("unreadable row" in r for r in reasons.values())
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
    import judge
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
    summary = data.reference_step(src, out, ScriptedEngine(texts), processor, judge.RuleJudge(), n=4)
    assert summary["kept"] == 1 and read_jsonl(out)[0].reference == texts[1]
    src2, out2 = tmp_path / "in2.jsonl", tmp_path / "ref2.jsonl"
    data.write_jsonl(src2, [s])
    summary = data.reference_step(src2, out2, ScriptedEngine(texts[2:]), processor, judge.RuleJudge(), n=2)
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
    from gemini_server import pixel_hash
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
    # tokens are counted for every reply that arrived (valid or not): at least the 7 good ones
    assert 300 * 7 <= summary["cost"]["input_tokens"] <= 300 * len(gemini.requests)
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
    partial = len(read_jsonl(out))
    assert 5 <= partial < 24, f"the kill must land mid-run ({partial} written)"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ids = [json.loads(l)["id"] for l in out.read_text().splitlines()]
    assert sorted(ids) == sorted(s.id for s in samples), "every id exactly once"
    assert len(gemini.requests) < 24 + 4, "the resumed run did not start over"


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


def test_pending_keeps_the_first_copy_of_a_repeated_id(tmp_path, shapes_file):
    s = read_jsonl(shapes_file)[0]
    src = tmp_path / "in.jsonl"
    row = json.dumps({**s.to_dict(), "image": s.image})
    src.write_text(row + "\n" + row + "\n")
    io_ = data.StepIO(tmp_path / "out.jsonl", "test")
    todo = data.pending(src, io_)
    assert [x.id for x in todo] == [s.id], "the first copy is still to do; the repeat is logged apart"
    assert any(r["id"].startswith(s.id + "#duplicate") for r in _log(tmp_path / "out.jsonl"))


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
