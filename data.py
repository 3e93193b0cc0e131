"""PaLMR data: the `Sample` contract, JSONL datasets, the synthetic `shapes` task, and PaDLayer.

    python data.py shapes --n 2000 --out data/shapes              # writes data/shapes/train.jsonl + images/
    python data.py shapes --n 200 --out data/shapes --split test --seed 1

PaDLayer (METHOD.md section 1), one resumable step at a time or all in order:

    python data.py ingest    --inputs raw/chartqa.parquet raw/geo/ --out work/ingested.jsonl
    python data.py filter    --in work/ingested.jsonl --out work/filtered.jsonl --model MODEL --k 8
    python data.py facts     --in work/filtered.jsonl --out work/facts.jsonl --provider gemini
    python data.py reference --in work/facts.jsonl    --out work/train.jsonl --model MODEL --n 8
    python data.py build --inputs raw/... --work work --model MODEL --provider gemini   # all four

Every step appends one line per finished item (flushed and fsynced), keeps a log of every decision
beside its output (OUT.log.jsonl), and on restart skips the ids it has already decided: a kill loses
at most the items in flight and no id is written twice. Bad items (missing or corrupt image, missing
answer, duplicate id, unreadable row) are logged with their id and reason; the step goes on.

`shapes` is the embedded default task: PIL-drawn scenes of a few shapes, questions of four types
(counting, yes/no existence, comparison, multiple choice), the exact scene as `facts` (the same schema
as the pseudo ground truth of real data: objects with name, count, attributes, location) and a
canonical, faithful `reference` trace in the policy's output format.
"""
import argparse
import base64
import concurrent.futures
import csv
import dataclasses
import io
import json
import os
import random
import re
import sys
import time
from pathlib import Path

from tqdm import tqdm

import palmr

# -----------------------------------------------------------------------------
# The data contract


@dataclasses.dataclass
class Sample:
    id: str
    image: str                 # path, relative to the dataset file or absolute
    question: str
    answer: str
    choices: list = None       # option texts, or None for open questions
    source: str = ""           # sub-domain, e.g. "shapes/count"
    facts: dict = None         # pseudo ground truth (question-agnostic scene description)
    reference: str = None      # best-of-N (or canonical) reasoning trace
    meta: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d):
        """Build from a JSON object; unknown keys are kept in `meta`, never dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [k for k in ("id", "image", "question", "answer") if d.get(k) in (None, "")]
        if missing:
            raise ValueError(f"missing field(s) {missing}")
        known = {k: v for k, v in d.items() if k in names}
        meta = dict(known.pop("meta", None) or {})
        meta.update({k: v for k, v in d.items() if k not in names})
        known["id"], known["answer"] = str(known["id"]), str(known["answer"])
        return cls(**known, meta=meta)

    def to_dict(self):
        return dataclasses.asdict(self)


def read_jsonl(path, errors=None):
    """Samples of a JSONL file, image paths resolved against the file's folder.

    A bad row is reported (file, line, id, cause) and skipped; pass a list as `errors` to collect them.
    """
    path = Path(path)
    samples, seen = [], set()
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        raw = None
        try:
            raw = json.loads(line)
            if not isinstance(raw, dict):
                raise ValueError("row is not a JSON object")
            sample = Sample.from_dict(raw)
            if sample.id in seen:
                raise ValueError("duplicate id")
        except (ValueError, TypeError) as e:
            item = raw.get("id", "?") if isinstance(raw, dict) else "?"
            msg = f"{path}:{lineno} (id {item}): {e}"
            print(f"skipping bad row {msg}", file=sys.stderr)
            if errors is not None:
                errors.append(msg)
            continue
        seen.add(sample.id)
        if not os.path.isabs(sample.image):
            sample.image = str((path.parent / sample.image).resolve())
        samples.append(sample)
    return samples


def write_jsonl(path, samples):
    """Write atomically (temp file + rename); image paths under the file's folder are stored relative."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for s in samples:
            d = s.to_dict() if isinstance(s, Sample) else dict(s)
            try:
                d["image"] = os.path.relpath(d["image"], path.parent.resolve()) if os.path.isabs(d["image"]) \
                    and Path(d["image"]).resolve().is_relative_to(path.parent.resolve()) else d["image"]
            except ValueError:
                pass
            f.write(json.dumps(d) + "\n")
    os.replace(tmp, path)


def load_image(sample):
    """The sample's image as RGB PIL; raises ValueError naming the item when it is missing or corrupt."""
    from PIL import Image
    try:
        with Image.open(sample.image) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"item {sample.id}: cannot read image {sample.image}: {e}") from e


# -----------------------------------------------------------------------------
# The synthetic `shapes` task

KINDS = ["circle", "square", "triangle"]
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
GRID = 3            # scenes are laid out on a 3 x 3 grid, one shape per cell: at the default 84 px each
                    # cell is one 28 px merged vision token of Qwen2.5-VL (14 px patches, 2 x 2 merge)
ROWS = ["top", "middle", "bottom"]
COLS = ["left", "centre", "right"]


def plural(n, word):
    return word if n == 1 else word + "s"


def draw_scene(objects, size):
    """PIL image of shapes, each {kind, color, cell: [row, col]} drawn inside its grid cell."""
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    cell = size / GRID
    for o in objects:
        r, c = o["cell"]
        # kinds differ in size as well as outline (a full square, a mid triangle, a small disc), so that
        # each kind spreads its ink differently over the cell's four 14 px patches: a tiny vision tower
        # then tells kinds apart as readily as colours (docs/LOG.md)
        pad = cell * {"square": 0.06, "triangle": 0.1, "circle": 0.24}[o["kind"]]
        x0, y0, x1, y1 = c * cell + pad, r * cell + pad, (c + 1) * cell - pad, (r + 1) * cell - pad
        fill = COLORS[o["color"]]
        if o["kind"] == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif o["kind"] == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def scene_facts(objects):
    """The exact scene in the pseudo-ground-truth schema (objects grouped by colour and kind)."""
    groups = {}
    for o in objects:
        groups.setdefault((o["color"], o["kind"]), []).append(f"{ROWS[o['cell'][0]]} {COLS[o['cell'][1]]}")
    return {"objects": [{"name": kind, "count": len(locs), "attributes": [color], "location": locs}
                        for (color, kind), locs in sorted(groups.items())],
            "relations": [], "text": [], "global": {"scene": "synthetic shapes", "background": "white",
                                                   "total_objects": len(objects)}}


def count_of(objects, color=None, kind=None):
    return sum((color is None or o["color"] == color) and (kind is None or o["kind"] == kind) for o in objects)


def inventory(objects):
    """'2 red circles, 1 blue square and 1 yellow triangle': every group with its exact count."""
    parts = [f"{n} {color} {plural(n, kind)}" for (color, kind), n in sorted(
        {(o["color"], o["kind"]): count_of(objects, o["color"], o["kind"]) for o in objects}.items())]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def make_question(objects, rng):
    """-> (qtype, question, answer, choices, reasoning): one question about the scene, its gold and why."""
    qtype = rng.choice(["count", "exists", "compare", "choice"])
    color, kind = rng.choice(list(COLORS)), rng.choice(KINDS)
    if qtype == "count":
        if rng.random() < 0.5:
            n = count_of(objects, kind=kind)
            return qtype, f"How many {kind}s are there?", str(n), None, f"So there are {n} {plural(n, kind)}."
        n = count_of(objects, color, kind)
        return qtype, f"How many {color} {kind}s are there?", str(n), None, \
            f"So there are {n} {color} {plural(n, kind)}."
    if qtype == "exists":
        if rng.random() < 0.5:  # ask about a present object half the time, so yes and no are balanced
            o = rng.choice(objects)
            color, kind = o["color"], o["kind"]
        n = count_of(objects, color, kind)
        why = f"There is a {color} {kind}." if n else f"There is no {color} {kind}."
        return qtype, f"Is there a {color} {kind} in the image?", "yes" if n else "no", None, why
    if qtype == "compare":
        a, b = rng.sample(KINDS, 2)
        na, nb = count_of(objects, kind=a), count_of(objects, kind=b)
        why = f"There are {na} {plural(na, a)} and {nb} {plural(nb, b)}."
        return qtype, f"Are there more {a}s than {b}s?", "yes" if na > nb else "no", None, why
    n = count_of(objects, color=color)
    options = sorted(rng.sample([k for k in range(7) if k != n], 3) + [n])
    why = f"So there are {n} {color} {plural(n, 'shape')}."
    return qtype, f"How many {color} shapes are there?", "ABCD"[options.index(n)], [str(k) for k in options], why


def make_shapes_sample(index, rng, image_dir, size=84, prefix="shapes"):
    """Draw one scene, save its PNG, and return its Sample (facts and canonical reference included)."""
    n_objects = rng.randint(1, 6)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n_objects)
    objects = [{"kind": rng.choice(KINDS), "color": rng.choice(list(COLORS)), "cell": list(cell)} for cell in cells]
    qtype, question, answer, choices, why = make_question(objects, rng)
    sid = f"{prefix}-{index:06d}"
    path = Path(image_dir) / f"{sid}.png"
    draw_scene(objects, size).save(path)
    reference = f"<think>I see {inventory(objects)}. {why}</think> The answer is \\boxed{{{answer}}}."
    return Sample(id=sid, image=str(path.resolve()), question=question, answer=answer, choices=choices,
                  source=f"shapes/{qtype}", facts=scene_facts(objects), reference=reference,
                  meta={"objects": objects})


def make_shapes(n, out_dir, split="train", seed=0, size=84):
    """Write `n` shapes samples to out_dir/{split}.jsonl with PNGs under out_dir/images/; return the path."""
    out_dir = Path(out_dir)
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"shapes-{split}-{seed}")
    samples = [make_shapes_sample(i, rng, image_dir, size, prefix=f"shapes-{split}") for i in range(n)]
    write_jsonl(out_dir / f"{split}.jsonl", samples)
    return str(out_dir / f"{split}.jsonl")



def hallucinated_trace(sample, rng):
    """The canonical trace with one group of its inventory misread (another kind, another colour, or a
    count off by one; always a claim the scene contradicts) and the same final answer: a right answer
    reached through wrong perception, for the SFT warm-up."""
    think, rest = sample.reference.split("</think>", 1)
    head, tail = think.split(". ", 1) if ". " in think else (think, "")
    g = rng.choice(list(re.finditer(r"(\d+) (red|green|blue|yellow) (circle|square|triangle)s?", head)))
    n, color, kind = int(g.group(1)), g.group(2), g.group(3)
    objects = (sample.meta or {}).get("objects")
    assert objects is not None, f"item {sample.id}: a misread trace needs a shapes item (its meta.objects)"
    misreads = ([(n, color, k) for k in KINDS if k != kind] + [(n, c, kind) for c in COLORS if c != color]
                + [(n + 1, color, kind)] + ([(n - 1, color, kind)] if n > 1 else []))
    misreads = [m for m in misreads if count_of(objects, m[1], m[2]) != n] or [(n + 1, color, kind)]
    n, color, kind = rng.choice(misreads)
    head = head[:g.start()] + f"{n} {color} {plural(n, kind)}" + head[g.end():]
    return head + (". " + tail if tail else "") + "</think>" + rest


DEFAULT_SHAPES = "~/.cache/palmr/shapes-v2"  # bump the suffix whenever the generator's output changes


def ensure_shapes(n=2000, out_dir=DEFAULT_SHAPES, split="train", seed=0):
    """The default training set, built once; returns the JSONL path (call on rank 0, then barrier)."""
    path = Path(out_dir).expanduser() / f"{split}.jsonl"
    if not path.exists():
        make_shapes(n, path.parent, split=split, seed=seed)
    return str(path)



# -----------------------------------------------------------------------------
# PaDLayer: resumable steps over JSONL


class StepIO:
    """Append-only output of one step plus its decision log; knows which ids are already decided."""

    def __init__(self, out_path, step):
        self.out, self.step = Path(out_path), step
        self.log = self.out.with_name(self.out.name.replace(".jsonl", "") + ".log.jsonl")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.done = set()
        kept = self._recover(self.out)
        self.done |= {d["id"] for d in kept}
        self.done |= {d["id"] for d in self._recover(self.log) if d.get("status") == "dropped"}
        self.out_f, self.log_f = open(self.out, "a"), open(self.log, "a")

    @staticmethod
    def _recover(path):
        """Rows of a JSONL file; a torn last line (killed mid-write) is cut off so appends start clean."""
        if not path.exists():
            return []
        raw = path.read_bytes()
        end = raw.rfind(b"\n") + 1
        if end < len(raw):
            with open(path, "r+b") as f:
                f.truncate(end)
        return [json.loads(line) for line in raw[:end].decode().splitlines() if line.strip()]

    def _append(self, f, row):
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())

    def keep(self, sample, **info):
        """Write a finished item (before its log line: a kill in between re-runs nothing)."""
        d = sample.to_dict() if isinstance(sample, Sample) else sample
        d["image"] = os.path.relpath(d["image"], self.out.parent.resolve()) if os.path.isabs(d["image"]) else d["image"]
        self._append(self.out_f, d)
        self.done.add(d["id"])
        self._append(self.log_f, {"id": d["id"], "step": self.step, "status": "kept", **info})

    def drop(self, item_id, reason, **info):
        self._append(self.log_f, {"id": item_id, "step": self.step, "status": "dropped", "reason": reason, **info})
        self.done.add(item_id)

    def fail(self, item_id, reason, **info):
        """A failure (server error, invalid reply): logged, not decided, so a re-run tries it again."""
        self._append(self.log_f, {"id": item_id, "step": self.step, "status": "failed", "reason": reason, **info})

    def summary(self):
        """{kept, dropped: {reason: n}, failed: {reason: n}} over the whole log (all runs)."""
        rows = self._recover(self.log)
        last = {}
        for r in rows:
            last[r["id"]] = r
        out = {"kept": sum(r["status"] == "kept" for r in last.values()), "dropped": {}, "failed": {}}
        for r in last.values():
            if r["status"] in ("dropped", "failed"):
                key = r["reason"].split(":")[0]
                out[r["status"]][key] = out[r["status"]].get(key, 0) + 1
        return out

    def close(self):
        self.out_f.close()
        self.log_f.close()


def pending(in_path, io_):
    """The input's samples that this step has not decided yet (bad input rows are logged as dropped)."""
    errors = []
    samples = read_jsonl(in_path, errors=errors)
    for e in errors:
        item = e.split("(id ", 1)[1].split(")", 1)[0] if "(id " in e else e
        if e.endswith("duplicate id"):  # the first copy is the item: log the repeat under its own key
            item = f"{item}#duplicate-line{e.split(':')[-2].split(' ')[0]}"
        if item not in io_.done:
            io_.drop(item, f"bad row: {e}")
    return [s for s in samples if s.id not in io_.done]


# --- ingest ------------------------------------------------------------------

ALIASES = {"id": ("id", "question_id", "qid", "pid", "uid"),
           "question": ("question", "query", "prompt", "problem"),
           "answer": ("answer", "label", "gt_answer", "ground_truth", "solution"),
           "image": ("image", "image_path", "img", "file_name", "filename", "decoded_image"),
           "choices": ("choices", "options")}


def normalize_row(raw, source, index):
    """A raw annotation dict -> Sample fields (image left as found: a path or bytes); unknown keys -> meta."""
    def pick(field):
        for k in ALIASES[field]:
            if k in raw and raw[k] not in (None, ""):
                return k, raw[k]
        return None, None
    used, out = set(), {}
    for field in ALIASES:
        key, value = pick(field)
        used.add(key)
        out[field] = value
    if out["question"] is None:
        raise ValueError("missing question")
    if out["answer"] is None:
        raise ValueError("missing answer")
    if out["image"] is None:
        raise ValueError("missing image")
    answer = out["answer"][0] if isinstance(out["answer"], list) and out["answer"] else out["answer"]
    choices = out["choices"]
    if isinstance(choices, str):
        try:
            choices = json.loads(choices)
        except ValueError:
            choices = [c.strip() for c in choices.split("\n") if c.strip()]
    if isinstance(choices, dict):
        choices = [choices[k] for k in sorted(choices)]
    if hasattr(choices, "tolist"):
        choices = choices.tolist()
    return {"id": str(out["id"] if out["id"] is not None else f"{source}-{index}"),
            "question": " ".join(str(out["question"]).split()), "answer": " ".join(str(answer).split()),
            "choices": [" ".join(str(c).split()) for c in choices] if choices else None,
            "image": out["image"], "source": str(raw.get("source") or source),
            "meta": {k: v for k, v in raw.items() if k not in used and k != "source" and _jsonable(v)}}


def _jsonable(v):
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def raw_rows(path):
    """(source, index, raw dict, folder for relative image paths) from a JSONL file, a parquet file, or a
    folder of images with annotations.json / annotations.jsonl / annotations.csv."""
    path = Path(path)
    if path.is_dir():
        ann = next((path / n for n in ("annotations.jsonl", "annotations.json", "annotations.csv") if (path / n).exists()), None)
        if ann is None:
            raise ValueError(f"{path}: a folder needs annotations.jsonl, annotations.json or annotations.csv")
        yield from ((path.name, i, raw, path) for _, i, raw, _ in raw_rows(ann))  # the folder names the source
        return
    source = path.stem
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        for i, raw in enumerate(table.to_pylist()):
            yield source, i, raw, path.parent
    elif path.suffix == ".csv":
        with open(path, newline="") as f:
            for i, raw in enumerate(csv.DictReader(f)):
                yield source, i, raw, path.parent
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
        rows = data if isinstance(data, list) else [{"id": k, **v} for k, v in data.items()]
        for i, raw in enumerate(rows):
            yield source, i, raw, path.parent
    else:
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                try:
                    yield source, i, json.loads(line), path.parent
                except ValueError as e:
                    yield source, i, {"_unreadable": f"line {i + 1}: {e}"}, path.parent


def open_image(value, base):
    """PIL image from a path (relative to base), raw bytes, or a {bytes, path} struct (HF parquet)."""
    from PIL import Image
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        im = Image.open(io.BytesIO(value))
    else:
        p = Path(value) if os.path.isabs(str(value)) else Path(base) / str(value)
        im = Image.open(p)
    im.load()
    return im.convert("RGB")


def ingest(inputs, out_path, max_pixels=1003520):
    """Read local datasets into Samples; images resized to the pixel budget (never cropped) and saved."""
    io_ = StepIO(out_path, "ingest")
    image_dir = Path(out_path).parent / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    decided, seen = set(io_.done), set()  # decided: by an earlier run; seen: ids met in this run
    for path in inputs:
        for source, index, raw, base in tqdm(list(raw_rows(path)), desc=f"ingest {Path(path).name}", mininterval=2):
            item = str(next((raw[k] for k in ALIASES["id"] if raw.get(k) not in (None, "")), f"{source}-{index}"))
            if item in seen:  # reported under its own key, so the first occurrence stays the item
                dup = f"{item}#duplicate-{source}-{index}"
                if dup not in decided:
                    print(f"ingest: item {item} ({path}, row {index + 1}): duplicate id", file=sys.stderr)
                    io_.drop(dup, "duplicate id")
                continue
            seen.add(item)
            if item in decided:
                continue
            try:
                if "_unreadable" in raw:
                    raise ValueError(f"unreadable row: {raw['_unreadable']}")
                fields = normalize_row(raw, source, index)
                fields["id"] = item
                try:
                    image = palmr.fit_pixels(open_image(fields["image"], base), max_pixels)
                except (OSError, ValueError) as e:
                    raise ValueError(f"missing or corrupt image: {type(e).__name__}: {e}") from e
                target = image_dir / f"{safe_name(item)}.png"
                image.save(target)
                fields["image"] = str(target.resolve())
                io_.keep(Sample(**fields), source=source)
            except ValueError as e:
                print(f"ingest: item {item} ({path}): {e}", file=sys.stderr)
                io_.drop(item, str(e))
    summary = io_.summary()
    io_.close()
    return summary


def safe_name(item_id):
    """A file name for an id: readable part plus a hash, so ids differing in punctuation never collide."""
    import hashlib
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in item_id)[:80]
    return f"{readable}-{hashlib.sha1(item_id.encode()).hexdigest()[:10]}"


# --- filter (learnability) ---------------------------------------------------

def _rollouts(engine, processor, samples, n, max_new_tokens, temperature, seed, max_pixels):
    prompts = [palmr.Prompt(palmr.render_prompt(processor, s.question, s.choices), load_image(s)) for s in samples]
    return engine.generate(prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)


def filter_step(in_path, out_path, engine, processor, k=8, min_pass=0.0, max_pass=1.0, batch=8,
                max_new_tokens=256, temperature=1.0, seed=0, max_pixels=1003520, exclusive=True):
    """Keep items whose pass rate over k rollouts lies in [min_pass, max_pass] (exclusive ends by default:
    0 < rate < 1); write a pass-rate histogram per source (markdown + PNG) beside the output."""
    from rewards import grade_answer
    io_ = StepIO(out_path, "filter")
    todo = pending(in_path, io_)
    for start in tqdm(range(0, len(todo), batch), desc="filter", mininterval=2):
        chunk = []
        for s in todo[start:start + batch]:
            try:
                load_image(s)
                chunk.append(s)
            except ValueError as e:
                io_.drop(s.id, str(e))
        if not chunk:
            continue
        groups = _rollouts(engine, processor, chunk, k, max_new_tokens, temperature, seed + start, max_pixels)
        for s, group in zip(chunk, groups):
            rate = sum(grade_answer(palmr.parse_response(c.text)[1], s.answer, s.choices) for c in group) / k
            lo_ok = rate > min_pass if exclusive else rate >= min_pass
            hi_ok = rate < max_pass if exclusive else rate <= max_pass
            if lo_ok and hi_ok:
                s.meta["pass_rate"] = rate
                io_.keep(s, pass_rate=rate, source=s.source)
            else:
                io_.drop(s.id, "too hard" if not lo_ok else "too easy", pass_rate=rate, source=s.source)
    report = pass_rate_report(io_.log, Path(out_path).with_suffix(".report.md"), Path(out_path).with_suffix(".report.png"), k)
    summary = io_.summary()
    io_.close()
    return summary, report


def pass_rate_report(log_path, md_path, png_path, k):
    """Histogram of pass rates per source: a markdown table and a PNG bar chart (PIL only)."""
    from PIL import Image, ImageDraw
    rows = [r for r in StepIO._recover(Path(log_path)) if "pass_rate" in r]
    bins = [i / k for i in range(k + 1)]
    table = {}
    for r in rows:
        hist = table.setdefault(r.get("source") or "?", [0] * (k + 1))
        hist[min(k, round(r["pass_rate"] * k))] += 1
    lines = ["| source | " + " | ".join(f"{b:.2f}" for b in bins) + " | kept |",
             "|---" * (k + 3) + "|"]
    kept = {}
    for r in rows:
        kept[r.get("source") or "?"] = kept.get(r.get("source") or "?", 0) + (r["status"] == "kept")
    for src, hist in sorted(table.items()):
        lines.append(f"| {src} | " + " | ".join(map(str, hist)) + f" | {kept.get(src, 0)} |")
    Path(md_path).write_text("Pass rate over k rollouts (columns: rate; cells: items)\n\n" + "\n".join(lines) + "\n")
    # the chart: one row of bars per source
    w, row_h, pad = 60 + 40 * (k + 1), 90, 10
    img = Image.new("RGB", (w, max(1, len(table)) * row_h + 30), "white")
    draw = ImageDraw.Draw(img)
    for r, (src, hist) in enumerate(sorted(table.items())):
        top, peak = r * row_h + pad, max(hist) or 1
        draw.text((4, top), src[:14], fill="black")
        for b, n in enumerate(hist):
            x0 = 60 + 40 * b
            h = int((row_h - 30) * n / peak)
            draw.rectangle([x0, top + row_h - 20 - h, x0 + 30, top + row_h - 20], fill=(60, 110, 200))
            draw.text((x0, top + row_h - 18), f"{bins[b]:.2f}", fill="black")
    img.save(png_path)
    return str(md_path)


# --- facts (pseudo ground truth) ---------------------------------------------

FACTS_SCHEMA = {  # the fixed schema of METHOD.md section 1.3; Gemini's response_schema subset of OpenAPI
    "type": "object",
    "properties": {
        "objects": {"type": "array", "items": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "count": {"type": "integer"},
                           "attributes": {"type": "array", "items": {"type": "string"}},
                           "location": {"type": "array", "items": {"type": "string"}}},
            "required": ["name", "count", "attributes", "location"]}},
        "relations": {"type": "array", "items": {"type": "string"}},
        "text": {"type": "array", "items": {"type": "string"}},
        "global": {"type": "object", "properties": {"scene": {"type": "string"}, "background": {"type": "string"},
                                                    "style": {"type": "string"}, "total_objects": {"type": "integer"}}},
    },
    "required": ["objects", "relations", "text", "global"]}

FACTS_PROMPT = ("Describe this image as structured facts, without guessing what anyone might ask about it. "
                "List every distinct kind of object with its exact count, attributes (colour, size, shape, "
                "state) and locations; spatial relations between objects; all visible text and numbers "
                "verbatim (axis labels, values, legends, signs); and global attributes (scene, background, "
                "style). Answer with JSON that follows the given schema.")


def validate(value, schema, where="facts"):
    """Check a JSON value against FACTS_SCHEMA's subset of JSON Schema; raise ValueError naming the path."""
    kind = schema["type"]
    types = {"object": dict, "array": list, "string": str, "integer": int}
    if not isinstance(value, types[kind]) or (kind == "integer" and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {kind}, got {type(value).__name__}")
    if kind == "integer" and value < 0:
        raise ValueError(f"{where}: negative count")
    if kind == "object":
        for key in schema.get("required", []):
            if key not in value:
                raise ValueError(f"{where}: missing {key!r}")
        for key, sub in schema.get("properties", {}).items():
            if key in value and value[key] is not None:
                validate(value[key], sub, f"{where}.{key}")
    if kind == "array":
        for i, item in enumerate(value):
            validate(item, schema["items"], f"{where}[{i}]")


class RetryableError(Exception):
    """A provider error worth retrying (429, 5xx, timeout, dropped connection)."""


class FatalError(Exception):
    """A provider error that retrying cannot fix (4xx other than 429: key, quota, request)."""


class GeminiProvider:
    """Gemini through google-genai; `base_url` overrides the endpoint (tests, proxies). The key comes from
    GEMINI_API_KEY or GOOGLE_API_KEY and is never printed."""

    def __init__(self, model="gemini-2.5-flash", base_url=None, timeout=120.0):
        from google import genai
        from google.genai import types
        key = os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")
        if not key:
            raise SystemExit("facts --provider gemini: set GEMINI_API_KEY (or GOOGLE_API_KEY)")
        self.types, self.model = types, model
        self.client = genai.Client(api_key=key, http_options=types.HttpOptions(
            base_url=base_url, timeout=int(timeout * 1000), retry_options=types.HttpRetryOptions(attempts=1)))

    def describe(self, png):
        """-> (reply text, input tokens, output tokens); raises RetryableError or ValueError."""
        from google.genai import errors
        try:
            r = self.client.models.generate_content(
                model=self.model, contents=[self.types.Part.from_bytes(data=png, mime_type="image/png"), FACTS_PROMPT],
                config=self.types.GenerateContentConfig(response_mime_type="application/json",
                                                        response_schema=FACTS_SCHEMA, temperature=0.0))
        except errors.APIError as e:
            if e.code in (429, 500, 502, 503, 504):
                raise RetryableError(f"HTTP {e.code}") from None
            raise FatalError(f"HTTP {e.code}: {e.status}") from None  # a bad key or request: retrying cannot help
        except Exception as e:  # noqa: BLE001 -- transport errors come from httpx or httpx2, by version
            name = type(e).__name__
            if isinstance(e, OSError) or any(w in name for w in ("Timeout", "Connect", "Network", "Transport", "Protocol")):
                raise RetryableError(name) from None
            raise
        usage = r.usage_metadata
        if not isinstance(r.text, str):  # blocked (safety, recitation) or cut off before any text
            raise ValueError(f"no text in the reply (finish reason: {getattr(r.candidates[0], 'finish_reason', '?') if r.candidates else 'none'})")
        return r.text, getattr(usage, "prompt_token_count", 0) or 0, getattr(usage, "candidates_token_count", 0) or 0


class OpenAIVisionProvider:
    """A self-hosted VLM behind an OpenAI-compatible server (structured output via response_format)."""

    def __init__(self, model, base_url, api_key_env="OPENAI_API_KEY", timeout=120.0, concurrency=16):
        from judge import OpenAIClient  # the same HTTP client (retries, backoff) as the judge
        self.client = OpenAIClient(base_url, model, api_key_env, concurrency=concurrency, timeout=timeout, max_retries=0,
                                   max_tokens=4096, reasoning=False, cache=False,
                                   extra={"response_format": {"type": "json_schema", "json_schema": {
                                       "name": "facts", "schema": FACTS_SCHEMA}}})

    def describe(self, png):
        url = "data:image/png;base64," + base64.b64encode(png).decode()
        reply = self.client.complete([[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": FACTS_PROMPT}]}]])[0]
        if reply.text is None:
            if "not retried" in reply.error:  # a 4xx other than 429
                raise FatalError(reply.error)
            raise RetryableError(reply.error)
        return reply.text, reply.tokens, 0


def facts_step(in_path, out_path, provider, concurrency=16, retries=4, backoff=1.0, price_in=0.30, price_out=2.50):
    """Question-agnostic structured facts per image: concurrent requests, retries with backoff on
    transient errors and invalid replies, every reply validated; cost in USD from per-1M-token prices
    (defaults: Gemini 2.5 Flash list prices, check yours)."""
    io_ = StepIO(out_path, "facts")
    todo = pending(in_path, io_)
    cost = {"input_tokens": 0, "output_tokens": 0}

    def work(sample):
        with open(sample.image, "rb") as f:
            png = f.read()
        buf = io.BytesIO()
        open_image(png, ".").save(buf, format="PNG")  # decode check + one format for every provider
        reason, tokens_in, tokens_out = "", 0, 0
        for attempt in range(retries + 1):
            try:
                text, t_in, t_out = provider.describe(buf.getvalue())
                tokens_in, tokens_out = tokens_in + t_in, tokens_out + t_out
                facts = json.loads(text)
                validate(facts, FACTS_SCHEMA)
                return facts, "", tokens_in, tokens_out
            except RetryableError as e:
                reason = f"provider: {e}"
            except FatalError as e:
                return None, f"provider: {e}", tokens_in, tokens_out
            except (ValueError, TypeError) as e:  # invalid JSON or schema: ask again
                reason = f"invalid reply: {e}"
            if attempt < retries:
                time.sleep(backoff * 2 ** attempt + random.uniform(0, backoff))
        return None, reason, tokens_in, tokens_out

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = {pool.submit(work, s): s for s in todo}
        for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="facts", mininterval=2):
            s = futures[future]
            try:
                facts, reason, t_in, t_out = future.result()
            except (OSError, ValueError) as e:
                io_.drop(s.id, f"missing or corrupt image: {e}")
                continue
            except Exception as e:  # noqa: BLE001 -- one bad item must not discard the others' paid replies
                io_.fail(s.id, f"error: {type(e).__name__}: {e}")
                continue
            cost["input_tokens"] += t_in
            cost["output_tokens"] += t_out
            if facts is None:
                print(f"facts: item {s.id} failed after {retries + 1} attempts: {reason}", file=sys.stderr)
                io_.fail(s.id, reason, input_tokens=t_in, output_tokens=t_out)
            else:
                s.facts = facts
                io_.keep(s, input_tokens=t_in, output_tokens=t_out)
    cost["usd"] = (cost["input_tokens"] * price_in + cost["output_tokens"] * price_out) / 1e6
    summary = {**io_.summary(), "cost": cost}
    io_.close()
    return summary


# --- reference (best-of-N) ---------------------------------------------------

def reference_step(in_path, out_path, engine, processor, judge, n=8, batch=8, max_new_tokens=256,
                   temperature=1.0, seed=0, max_pixels=1003520):
    """N rollouts per item; among the correct, well-formed ones keep the one the judge finds most
    faithful to the facts (a king-of-the-hill tournament of pairwise verdicts); no correct one: dropped."""
    from rewards import grade_answer
    from judge import JudgeItem
    io_ = StepIO(out_path, "reference")
    todo = pending(in_path, io_)
    for start in tqdm(range(0, len(todo), batch), desc="reference", mininterval=2):
        chunk = todo[start:start + batch]
        groups = _rollouts(engine, processor, chunk, n, max_new_tokens, temperature, seed + start, max_pixels)
        pools = []
        for s, group in zip(chunk, groups):
            good = []
            for c in group:
                _, answer, well_formed = palmr.parse_response(c.text)
                if well_formed and grade_answer(answer, s.answer, s.choices) and c.text not in good:
                    good.append(c.text)
            pools.append(good)
        best = [p[0] if p else None for p in pools]
        for rnd in range(1, n):  # each round: the current best of every item against its next challenger
            idx = [i for i, p in enumerate(pools) if len(p) > rnd]
            if not idx:
                break
            verdicts = judge.judge([JudgeItem(chunk[i].question, chunk[i].facts, pools[i][rnd], best[i]) for i in idx])
            for i, v in zip(idx, verdicts):
                if v.preference == "candidate":  # strictly more faithful than the current best
                    best[i] = pools[i][rnd]
        for s, b, p in zip(chunk, best, pools):
            if b is None:
                io_.drop(s.id, "no correct rollout", n=n)
            else:
                s.reference = b
                io_.keep(s, correct=len(p), n=n)
    summary = io_.summary()
    io_.close()
    return summary


# --- the CLI -----------------------------------------------------------------

def _engine(model_path, max_pixels):
    model_path = palmr.ensure_tiny_checkpoint() if model_path in (None, palmr.DEFAULT_TINY) else model_path
    processor = palmr.load_processor(model_path)
    model = palmr.load_model(model_path)
    return palmr.HFEngine(model, processor, max_pixels), processor


def _provider(a):
    if a.provider == "gemini":
        return GeminiProvider(a.facts_model or "gemini-2.5-flash", a.base_url, a.timeout)
    assert a.base_url and a.facts_model, "--provider openai needs --base-url and --facts-model"
    return OpenAIVisionProvider(a.facts_model, a.base_url, a.api_key_env, a.timeout, a.concurrency)


def _judge(a):
    from judge import make_judge
    return make_judge(a.judge, a.judge_base_url, a.judge_model)


def run_step(a):
    """One CLI step (or `build`: all of them into --work); prints and returns the summaries."""
    out = {}
    if a.cmd in ("ingest", "build"):
        target = Path(a.work) / "ingested.jsonl" if a.cmd == "build" else a.out
        out["ingest"] = ingest(a.inputs, target, a.max_pixels)
    if a.cmd in ("filter", "facts", "reference", "build"):
        w = Path(a.work) if a.cmd == "build" else None
        paths = {"filter": (w / "ingested.jsonl", w / "filtered.jsonl") if w else (a.input, a.out),
                 "facts": (w / "filtered.jsonl", w / "facts.jsonl") if w else (a.input, a.out),
                 "reference": (w / "facts.jsonl", w / "train.jsonl") if w else (a.input, a.out)}
        steps = ["filter", "facts", "reference"] if a.cmd == "build" else [a.cmd]
        engine = processor = None
        for step in steps:
            src, dst = paths[step]
            if step in ("filter", "reference") and engine is None:
                engine, processor = _engine(a.model, a.max_pixels)
            if step == "filter":
                out["filter"], report = filter_step(src, dst, engine, processor, a.k, a.min_pass, a.max_pass,
                                                    a.batch, a.max_new_tokens, seed=a.seed, max_pixels=a.max_pixels)
                print(Path(report).read_text())
            elif step == "facts":
                out["facts"] = facts_step(src, dst, _provider(a), a.concurrency, a.retries, a.backoff,
                                          a.price_in, a.price_out)
            else:
                out["reference"] = reference_step(src, dst, engine, processor, _judge(a), a.n, a.batch,
                                                  a.max_new_tokens, seed=a.seed, max_pixels=a.max_pixels)
    for step, summary in out.items():
        print(f"{step}: {json.dumps(summary)}")
    return out

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("shapes", help="write the synthetic shapes task")
    sp.add_argument("--n", type=int, default=2000, help="number of samples")
    sp.add_argument("--out", default="data/shapes", help="output folder (JSONL + images/)")
    sp.add_argument("--split", default="train", help="split name: the file is OUT/SPLIT.jsonl")
    sp.add_argument("--seed", type=int, default=0, help="scene and question seed")
    sp.add_argument("--size", type=int, default=84, help="image side in pixels (84: one 28-px vision token per grid cell)")
    for name in ("ingest", "filter", "facts", "reference", "build"):
        p = sub.add_parser(name, help=f"PaDLayer step: {name}" if name != "build" else "all steps in order")
        if name in ("ingest", "build"):
            p.add_argument("--inputs", nargs="+", required=True, help="JSONL files, parquet files, annotated image folders")
        if name == "build":
            p.add_argument("--work", required=True, help="folder for every step's output; train.jsonl is the result")
        else:
            if name != "ingest":
                p.add_argument("--in", dest="input", required=True, help="the previous step's JSONL")
            p.add_argument("--out", required=True, help="this step's JSONL (appended; resumable)")
        p.add_argument("--max-pixels", type=int, default=1003520, help="image pixel budget (resize, never crop)")
        p.add_argument("--model", default=None, help="policy for rollouts (default: the tiny checkpoint)")
        p.add_argument("--k", type=int, default=8, help="filter: rollouts per item")
        p.add_argument("--min-pass", type=float, default=0.0, help="filter: keep pass rate > this")
        p.add_argument("--max-pass", type=float, default=1.0, help="filter: keep pass rate < this")
        p.add_argument("--n", type=int, default=8, help="reference: rollouts per item (best-of-N)")
        p.add_argument("--batch", type=int, default=8, help="items per generate call")
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--provider", default="gemini", choices=["gemini", "openai"], help="facts: who writes them")
        p.add_argument("--facts-model", default=None, help="facts: model name (gemini default: gemini-2.5-flash)")
        p.add_argument("--base-url", default=None, help="facts: endpoint override (gemini) or server (openai)")
        p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="facts, openai: env var with the key")
        p.add_argument("--concurrency", type=int, default=16, help="facts: requests in flight")
        p.add_argument("--retries", type=int, default=4, help="facts: retries per item (transient errors, invalid JSON)")
        p.add_argument("--backoff", type=float, default=1.0, help="facts: first retry delay, doubled each time")
        p.add_argument("--timeout", type=float, default=120.0, help="facts: seconds per request")
        p.add_argument("--price-in", type=float, default=0.30, help="facts: USD per 1M input tokens")
        p.add_argument("--price-out", type=float, default=2.50, help="facts: USD per 1M output tokens")
        p.add_argument("--judge", default="rule", choices=["rule", "openai", "hf"], help="reference: ranks the correct rollouts")
        p.add_argument("--judge-base-url", default=None)
        p.add_argument("--judge-model", default=None)
    a = ap.parse_args()
    if a.cmd == "shapes":
        print(make_shapes(a.n, a.out, split=a.split, seed=a.seed, size=a.size))
    else:
        run_step(a)
