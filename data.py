"""PaLMR data: the `Sample` contract, JSONL datasets, the synthetic `shapes` task, and PaDLayer.

    python data.py shapes --n 2000 --out data/shapes              # writes data/shapes/train.jsonl + images/
    python data.py shapes --n 200 --out data/shapes --split test --seed 1

PaDLayer (METHOD.md section 1), one resumable step at a time or all in order:

    python data.py ingest    --inputs raw/chartqa.parquet raw/geo/ --out work/ingested.jsonl
    python data.py filter    --in work/ingested.jsonl --out work/filtered.jsonl --model MODEL --k 8
    python data.py facts     --in work/filtered.jsonl --out work/facts.jsonl --provider gemini
    python data.py reference --in work/facts.jsonl    --out work/train.jsonl --model MODEL --n 8
    python data.py build --inputs raw/... --work work --model MODEL --provider gemini   # all four

`ingest` reads the published layouts of the paper's sources, the RL-ready ones (EasyR1, verl, TRL
messages, FineVision, LLaVA `conversations`) and the benchmarks from one table, `LAYOUTS` (README:
"layout -> fields read"). Images are local: a row whose image is a URL is refused with that reason.
`python data.py STEP -h` lists each step's flags with their defaults.

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
import ast
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

csv.field_size_limit(2 ** 31 - 1)  # VLMEvalKit TSVs hold whole images in one field

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


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")  # http://, https://, gs://, s3://, hf:// ...


def refuse_url(value):
    """Raise ValueError when an image value is a URL: nothing here downloads, and joined onto a data folder a
    URL would only become a path that does not exist. The message keeps the URL's scheme, host and path (not
    its query, which may hold a signature) and says what to do."""
    if isinstance(value, dict):
        value = value.get("path") if not value.get("bytes") else None
    if isinstance(value, str) and _URL.match(value.strip()):
        url = value.strip().split("?", 1)[0].split("#", 1)[0]
        url = url if len(url) <= 100 else url[:97] + "..."
        raise ValueError(f"image is a URL: {url} (download the images and point the rows at local files)")


def read_jsonl(path, errors=None):
    """Samples of a JSONL file, image paths resolved against the file's folder.

    A bad row is reported (file, line, id, cause) and skipped; pass a list as `errors` to collect them.
    A row whose image is a URL is such a bad row (`refuse_url`).
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
            refuse_url(sample.image)
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


def load_image(sample, max_pixels=None):
    """The sample's image as RGB PIL through palmr.load_image (the one loader); raises ValueError naming
    the item and the cause when it is missing, corrupt or refused (a URL among them)."""
    try:
        refuse_url(sample.image)
    except ValueError as e:  # the message holds the URL without its query: not the whole value again
        raise ValueError(f"item {sample.id}: {e}") from None
    try:
        return palmr.load_image(sample.image, max_pixels=max_pixels)
    except ValueError as e:
        raise ValueError(f"item {sample.id}: {sample.image}: {e}") from None


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
    samples = [make_shapes_sample(i, rng, image_dir, size, prefix=f"shapes-{split}")
               for i in tqdm(range(n), desc=f"shapes {split}", mininterval=2)]
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


# --- ingest: the published layouts ---------------------------------------------
#
# Where each published layout keeps the id, question, answer, choices and images, as one table. A file's
# layout is the first whose `needs` columns it has (and, for `formats`, whose extension it has); `generic`
# reads any JSONL/CSV/JSON/parquet with common column names. eval.py reads benchmarks through the same
# table. Sources: each dataset's card (`dataset_info.features`) or official loader; README "Data layouts".


def _present(v):
    return v is not None and not (isinstance(v, float) and v != v) and not (isinstance(v, (str, list, tuple, dict)) and len(v) == 0)


def _first(row, *cols):
    """The first present value among `cols` (None, NaN, '' and [] are absent)."""
    return next((row[c] for c in cols if _present(dict.get(row, c))), None)


class _Reads(dict):
    """A row that remembers which columns a layout read: the others go to meta, never dropped."""

    def __init__(self, row):
        super().__init__(row)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


def _as_list(v):
    """A list from a list, a numpy array, a JSON/Python list literal ("['a', 'b']"), or one value."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, str) and v.strip()[:1] == "[":
        try:
            v = json.loads(v)
        except ValueError:
            try:
                v = ast.literal_eval(v)
            except (ValueError, SyntaxError):
                pass
    return list(v) if isinstance(v, (list, tuple)) else [v] if _present(v) else []


def _majority(answers):
    """The most frequent of several human answers (VQA style: 10 strings or {answer, answer_confidence});
    ties go to the first given. All of them stay in meta.answers."""
    texts = [a.get("answer") if isinstance(a, dict) else a for a in _as_list(answers)]
    texts = [str(t).strip() for t in texts if _present(t)]
    if not texts:
        return None
    counts = {}
    for t in texts:
        counts[t.lower()] = counts.get(t.lower(), 0) + 1
    return max(texts, key=lambda t: (counts[t.lower()], -texts.index(t)))


def _letter(index):
    """0-based answer index (int, '2', numpy int) -> its option letter."""
    return palmr.CHOICE_LETTERS[int(index)] if _present(index) else None


def _no_image_tags(text):
    """'<image>' (EasyR1, verl, LLaVA) and '<image 1>' (MMMU) tags out of a question: the prompt places the image."""
    return re.sub(r"<image(?:\s*\d+)?>", " ", str(text)) if _present(text) else text


def _turn_text(content):
    """A chat turn's text: a string, or the text parts of a list of {type, text} parts."""
    if isinstance(content, str):
        return content
    return " ".join(p.get("text") or "" for p in _as_list(content) if isinstance(p, dict) and p.get("type") == "text")


def _turn(messages, role, after=None):
    """Text of the first `role` turn (after index `after`) of a message list, and its index."""
    for i, m in enumerate(_as_list(messages)):
        if m.get("role") == role and (after is None or i > after):
            return _turn_text(m.get("content")), i
    return None, None


def _llava_turns(row):
    """(question, answer) of a LLaVA row (haotian-liu/LLaVA docs/Finetune_Custom_Data.md; llava/train/train.py
    reads `from` and `value` of each turn): the first `human` turn and the `gpt` turn right after it. Later
    turns are not read (each row is one item; a follow-up question leans on the dialogue before it); their
    number is kept in meta.later_turns. Raises ValueError naming what the conversation lacks."""
    turns = [t for t in _as_list(row.get("conversations")) if isinstance(t, dict)]
    if not turns:
        raise ValueError("no conversations: a LLaVA row needs a `conversations` list of {from, value} turns")
    first = next((i for i, t in enumerate(turns) if t.get("from") == "human"), None)
    if first is None:
        raise ValueError("no human turn in `conversations`")
    if first + 1 >= len(turns) or turns[first + 1].get("from") != "gpt":
        raise ValueError("no gpt turn after the first human turn in `conversations`")
    question, answer = turns[first].get("value"), turns[first + 1].get("value")
    if not _present(question) or not _no_image_tags(question).strip():
        raise ValueError("missing question: the first human turn has no text besides <image>")
    if not _present(answer) or not str(answer).strip():
        raise ValueError("missing answer: the gpt turn has no text")
    return _no_image_tags(question), _reply(answer), len(turns) - first - 2


def _reply(text):
    """A free-text training reply as a gold: 'Answer: B.' -> 'B' (the_cauldron / FineVision style)."""
    if not _present(text):
        return None
    text = re.sub(r"^\s*(?:the\s+)?(?:final\s+)?answer\s*(?:is)?\s*[:：]?\s*", "", str(text), flags=re.IGNORECASE)
    return text.strip().rstrip(".").strip()


def mmstar_options(question):
    """MMStar keeps its options inside the question: '...\\nOptions: A: x, B: y, C: z, D: w' -> [x, y, z, w]."""
    tail = str(question).rsplit("Options:", 1)
    if len(tail) < 2:
        return None
    parts = re.split(r"(?:^|,\s*)([A-J]):\s*", tail[1].strip())
    return [p.strip() for p in parts[2::2]] or None


def _hallusion_meta(row):
    """HallusionBench keys: official JSON fields, or VLMEvalKit's TSV index (parts 3, 4, 5: set, figure,
    question, as vlmeval/dataset/utils/yorn.py Hallusion_rating splits it) and its l2-category."""
    if "set_id" in row:
        return {k: str(row.get(k)) for k in ("category", "subcategory", "set_id", "figure_id", "question_id", "visual_input")}
    parts = str(row.get("index")).split("_")
    if len(parts) < 6:
        raise ValueError(f"HallusionBench TSV index {row.get('index')!r} lacks set/figure/question parts")
    return {"category": str(row.get("category")), "subcategory": str(row.get("l2-category")),
            "set_id": parts[3], "figure_id": parts[4], "question_id": parts[5], "visual_input": "1"}


def _tsv_images(value):
    """VLMEvalKit TSV images: base64 text, or the string form of a list of base64 texts. Text that is not
    base64 passes on as bytes, so the loader reports it as this item's unreadable image."""
    values = _as_list(value) if str(value).lstrip()[:1] == "[" else [value] if _present(value) else []
    out = []
    for v in values:
        try:
            out.append(base64.b64decode(v))
        except ValueError:  # binascii.Error
            out.append(str(v).encode())
    return out


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    needs: tuple                     # columns a row of this layout always has
    question: object                 # row -> question text
    answer: object                   # row -> gold answer (letter, option text, number or words)
    images: object                   # row -> list of image values (path, bytes or {bytes, path}); [] for none
    id: object = lambda r: _first(r, "id", "question_id", "questionId", "qid", "pid", "uid", "index", "sample_index")
    choices: object = lambda r: None  # row -> option texts or None
    meta: object = lambda r: {}       # row -> extra meta fields (official keys a scorer needs)
    formats: tuple = ()              # file extensions the layout occurs in (empty: any)


L = Layout
LAYOUTS = [
    # benchmarks
    L("hallusionbench", ("gt_answer", "visual_input", "set_id", "figure_id", "question_id"),
      question=lambda r: r["question"], answer=lambda r: {"1": "yes", "0": "no"}.get(str(r["gt_answer"]).strip()),
      images=lambda r: _as_list(_first(r, "image", "filename")),  # none for the 178 asked without an image
      id=lambda r: "_".join(str(r[k]) for k in ("category", "subcategory", "set_id", "figure_id", "question_id")),
      meta=_hallusion_meta),
    L("vlmevalkit", ("index", "image", "question", "answer"), formats=(".tsv",),
      question=lambda r: r["question"], answer=lambda r: r["answer"], images=lambda r: _tsv_images(r["image"]),
      id=lambda r: str(r["index"]), choices=lambda r: [str(r[c]) for c in "ABCDEFGHIJ" if _present(r.get(c))] or None,
      meta=lambda r: _hallusion_meta(r) if str(r.get("l2-category", "")).startswith(("VD_", "VS_")) else {}),
    L("mmmu", ("options", "image_1", "question_type"),
      question=lambda r: r["question"], answer=lambda r: (_as_list(r["answer"]) or [None])[0],
      images=lambda r: [r[f"image_{k}"] for k in range(1, 8) if _present(r.get(f"image_{k}"))],
      choices=lambda r: [str(c) for c in _as_list(r["options"])] or None,
      meta=lambda r: {"answers": [str(a) for a in _as_list(r["answer"])]}),
    L("mathvista", ("pid", "question_type", "answer_type"),
      question=lambda r: r["question"], answer=lambda r: r["answer"],
      images=lambda r: _as_list(_first(r, "decoded_image", "image")),
      choices=lambda r: [str(c) for c in _as_list(r.get("choices"))] or None),
    L("mathverse", ("sample_index", "problem_version"),
      # Vision Only items have an empty question: it is in the image
      question=lambda r: r["question"] or "Answer the question shown in the image.", answer=lambda r: r["answer"],
      images=lambda r: _as_list(r.get("image"))),
    L("mmstar", ("index", "question", "answer", "category", "l2_category"),
      question=lambda r: r["question"], answer=lambda r: r["answer"], images=lambda r: _as_list(r.get("image")),
      meta=lambda r: {"options": mmstar_options(r["question"])}),  # options stay in the question text
    # RL-ready layouts
    L("verl", ("prompt", "reward_model"),
      question=lambda r: _no_image_tags(_turn(r["prompt"], "user")[0] if not isinstance(r["prompt"], str) else r["prompt"]),
      answer=lambda r: (r["reward_model"] or {}).get("ground_truth"), images=lambda r: _as_list(r.get("images")),
      id=lambda r: _first(r.get("extra_info") or {}, "index", "id")),
    L("messages", ("messages", "images"),
      question=lambda r: _no_image_tags(_turn(r["messages"], "user")[0]),
      answer=lambda r: _first(r, "answer", "solution") or _reply(_turn(r["messages"], "assistant", _turn(r["messages"], "user")[1])[0]),
      images=lambda r: _as_list(r["images"])),
    L("finevision", ("images", "texts"),  # also the_cauldron; the first turn of a multi-turn row
      question=lambda r: _no_image_tags(_as_list(r["texts"])[0]["user"]),
      answer=lambda r: _reply(_as_list(r["texts"])[0]["assistant"]), images=lambda r: _as_list(r["images"])),
    L("llava", ("conversations",),  # LLaVA instruction data (also ShareGPT4V, LLaMA-Factory's sharegpt: `images`)
      question=lambda r: _llava_turns(r)[0], answer=lambda r: _llava_turns(r)[1],
      images=lambda r: _as_list(_first(r, "image", "images")), meta=lambda r: {"later_turns": _llava_turns(r)[2]}),
    L("easyr1", ("images", "problem", "answer"),
      question=lambda r: _no_image_tags(r["problem"]), answer=lambda r: r["answer"],
      images=lambda r: _as_list(r["images"]), choices=lambda r: [str(c) for c in _as_list(r.get("choices"))] or None),
    # the paper's training sources (METHOD.md section 1), as published
    L("scienceqa", ("question", "choices", "answer", "hint", "lecture"),
      question=lambda r: (f"Context: {r['hint']}\n" if _present(r.get("hint")) else "") + r["question"],
      answer=lambda r: _letter(r["answer"]), images=lambda r: _as_list(r.get("image")),
      choices=lambda r: [str(c) for c in _as_list(r["choices"])]),
    L("aokvqa", ("question", "choices", "correct_choice_idx"),
      question=lambda r: r["question"], answer=lambda r: _letter(r["correct_choice_idx"]),
      images=lambda r: _as_list(r.get("image")) or [f"{int(r['image_id']):012d}.jpg"],  # official JSON: COCO ids
      choices=lambda r: [str(c) for c in _as_list(r["choices"])],
      meta=lambda r: {"direct_answers": _as_list(r.get("direct_answers"))}),
    L("vizwiz", ("question", "answers", "answerable"),
      question=lambda r: r["question"], images=lambda r: _as_list(r.get("image")),
      answer=lambda r: "unanswerable" if str(r["answerable"]) == "0" else _majority(r["answers"]),
      id=lambda r: _first(r, "question_id", "image"),
      meta=lambda r: {"answers": [a.get("answer") if isinstance(a, dict) else a for a in _as_list(r["answers"])]}),
    L("vqa_answers", ("question", "answers"),  # TextVQA, DocVQA, InfographicVQA, lmms-lab VizWiz: several human answers
      question=lambda r: r["question"], answer=lambda r: _majority(r["answers"]),
      images=lambda r: _as_list(_first(r, "image", "image_path")) or ([f"{r['image_id']}.jpg"] if _present(r.get("image_id")) else []),
      meta=lambda r: {"answers": [str(a) for a in _as_list(r["answers"])]}),
    L("chartqa", ("query", "label"),
      question=lambda r: r["query"], answer=lambda r: (_as_list(r["label"]) or [None])[0], images=lambda r: _as_list(r.get("image"))),
    L("figureqa", ("question_string", "image_index", "color1_name"),
      question=lambda r: r["question_string"], answer=lambda r: "yes" if int(r["answer"]) == 1 else "no",
      images=lambda r: [f"png/{r['image_index']}.png"], id=lambda r: _first(r, "question_id", "qid")),
    L("plotqa", ("question_string", "image_index"),
      question=lambda r: r["question_string"], answer=lambda r: r["answer"],
      images=lambda r: [f"png/{r['image_index']}.png"], id=lambda r: _first(r, "qid", "question_id")),
    L("tabmwp", ("question", "answer", "table_for_pd", "ques_type"),
      question=lambda r: r["question"], answer=lambda r: r["answer"], images=lambda r: [f"tables/{r['id']}.png"],
      choices=lambda r: [str(c) for c in _as_list(r.get("choices"))] or None),
    L("geometry3k", ("problem_text", "choices", "answer"),  # InterGPS: one folder per problem, data.json
      question=lambda r: r["problem_text"], answer=lambda r: r["answer"], images=lambda r: ["img_diagram.png"],
      choices=lambda r: [str(c) for c in _as_list(r["choices"])]),
    L("iconqa", ("question", "ques_type", "choices", "answer"),  # lmms-lab/ICON-QA: choices as a list string
      question=lambda r: r["question"], images=lambda r: _as_list(_first(r, "query_image", "image")),
      answer=lambda r: r["answer"], choices=lambda r: [str(c) for c in _as_list(r["choices"])] or None),
    L("clevr_math", ("template", "question", "label"),
      question=lambda r: r["question"], answer=lambda r: r["label"], images=lambda r: _as_list(r.get("image"))),
    L("clevr", ("question", "answer", "image_filename"),  # CLEVR and Super-CLEVR question files
      question=lambda r: r["question"], answer=lambda r: r["answer"], images=lambda r: [r["image_filename"]],
      id=lambda r: _first(r, "question_index", "id")),
    L("generic", (),
      question=lambda r: _first(r, "question", "query", "prompt", "problem"),
      answer=lambda r: (_as_list(_first(r, "answer", "label", "gt_answer", "ground_truth", "solution")) or [None])[0],
      images=lambda r: _as_list(_first(r, "image", "images", "image_path", "img", "file_name", "filename", "decoded_image")),
      choices=lambda r: _generic_choices(_first(r, "choices", "options"))),
]
del L


def _generic_choices(value):
    if isinstance(value, dict):
        return [str(value[k]) for k in sorted(value)]
    if isinstance(value, str) and value.strip()[:1] != "[":
        return [c.strip() for c in value.split("\n") if c.strip()] or None
    return [str(c) for c in _as_list(value)] or None


def detect_layout(columns, suffix=""):
    """The first layout whose needed columns the row has (and whose formats include the file's suffix)."""
    columns = set(columns)
    return next(l for l in LAYOUTS if set(l.needs) <= columns and (not l.formats or suffix in l.formats))


def read_row(raw, layout):
    """A raw row -> {id, question, answer, choices, images (list of raw values), meta}; raises ValueError
    naming the missing field. Native ids; unknown keys go to meta; the layout's name is meta.layout."""
    raw = _Reads(raw)
    try:
        fields = {"id": layout.id(raw), "question": layout.question(raw), "answer": layout.answer(raw),
                  "choices": layout.choices(raw), "images": layout.images(raw)}
        read = set(raw.read)
        extra = layout.meta(raw)
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise ValueError(f"unreadable {layout.name} row: {type(e).__name__}: {e}") from None
    for field in ("question", "answer"):
        if not _present(fields[field]) or not str(fields[field]).strip():
            raise ValueError(f"missing {field}")
    meta = {k: v for k, v in raw.items() if k not in read and k != "source" and _jsonable(v)}
    meta.update(extra, layout=layout.name)
    return {"id": None if fields["id"] is None else str(fields["id"]), "question": " ".join(str(fields["question"]).split()),
            "answer": " ".join(str(fields["answer"]).split()), "meta": meta, "images": fields["images"],
            "choices": [" ".join(c.split()) for c in fields["choices"]] if fields["choices"] else None}


def _jsonable(v):
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


_SPLIT_FILE = re.compile(r"^(?:train|test|val|valid|validation|dev|testmini|data)(?:[-_]\d+(?:-of-\d+)?)?$")


def source_name(path):
    """The name ids are namespaced by: the file's stem (a folder's name), or, for one named like a split or
    a shard (train-00000-of-00001.parquet, test.jsonl, InterGPS's train/), the dataset folder above it
    joined to it (data/ and split folders skipped)."""
    path = Path(path).resolve()
    if not _SPLIT_FILE.match(path.stem):
        return path.stem
    folder = next((p.name for p in path.parents if p.name and not _SPLIT_FILE.match(p.name)), "dataset")
    return f"{folder}-{path.stem}"


def raw_rows(path):
    """(source, index, raw dict, folder for relative image paths) of a dataset file or folder.

    JSONL; JSON (a list of rows, a dict of rows keyed by id as TabMWP, or a dict holding the list under
    data / questions / qa_pairs / annotations as DocVQA, TextVQA, CLEVR, FigureQA and PlotQA); CSV;
    VLMEvalKit TSV (an image cell of <= 64 characters names the row whose image it shares); parquet;
    a folder with annotations.{jsonl,json,csv}, or of one sub-folder per item with data.json (InterGPS)."""
    path = Path(path)
    if path.is_dir():
        ann = next((path / n for n in ("annotations.jsonl", "annotations.json", "annotations.csv") if (path / n).exists()), None)
        if ann is not None:
            yield from ((source_name(path), i, raw, path) for _, i, raw, _ in raw_rows(ann))  # the folder names the source
            return
        items = sorted(p.parent for p in path.glob("*/data.json"))
        if not items:
            raise ValueError(f"{path}: a folder needs annotations.jsonl/.json/.csv or one sub-folder per item with data.json")
        for i, folder in enumerate(items):
            raw = json.loads((folder / "data.json").read_text())
            yield source_name(path), i, {"id": folder.name, **raw} if isinstance(raw, dict) else {"_unreadable": "data.json is not an object"}, folder
        return
    source = source_name(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        for i, raw in enumerate(pq.read_table(path).to_pylist()):
            yield source, i, raw, path.parent
    elif path.suffix in (".csv", ".tsv"):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
        if path.suffix == ".tsv":  # VLMEvalKit: a short image cell is the index of the row holding the image
            full = {r.get("index"): r.get("image") for r in rows if len(r.get("image") or "") > 64}
            for r in rows:
                if 0 < len(r.get("image") or "") <= 64:
                    r["image"] = full.get(r["image"], r["image"])
        for i, raw in enumerate(rows):
            yield source, i, raw, path.parent
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            key = next((k for k in ("data", "questions", "qa_pairs", "annotations") if isinstance(data.get(k), list)), None)
            data = data[key] if key else [{"id": k, **v} for k, v in data.items()]
        for i, raw in enumerate(data):
            yield source, i, raw, path.parent
    else:
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                try:
                    yield source, i, json.loads(line), path.parent
                except ValueError as e:
                    yield source, i, {"_unreadable": f"line {i + 1}: {e}"}, path.parent


_BELOW = {}  # base folder -> {relative path suffix: file} of the files one or two folders below it


def resolve_image(value, base):
    """A relative image path against the dataset's folder, else one or two sub-folders below it (published
    archives keep images in images/, val/, png/, documents/ ...; the folders are indexed once per base);
    bytes and structs pass through. A URL raises ValueError (`refuse_url`)."""
    if isinstance(value, dict) and value.get("bytes"):
        return value
    refuse_url(value)
    if isinstance(value, dict):
        value = value.get("path")
    if not isinstance(value, str) or os.path.isabs(value):
        return value
    direct = Path(base) / value
    if direct.is_file():
        return str(direct)
    key = str(Path(base).resolve())
    if key not in _BELOW:  # a COCO-sized folder takes a while: show the count as it goes
        index = {}
        for pattern in ("*/*", "*/*/*", "*/*/*/*"):
            found = tqdm(Path(base).glob(pattern), desc=f"indexing {base}/{pattern}", unit=" files", mininterval=2,
                         leave=False)
            for f in sorted(found):
                rel = f.relative_to(base).parts
                for k in (1, 2):  # the path as written below one or two folder levels
                    if len(rel) > k and f.is_file():
                        index.setdefault("/".join(rel[k:]), str(f))
        _BELOW[key] = index
    return _BELOW[key].get(Path(value).as_posix().lstrip("./"), str(direct))  # missing: load_image names it


def load_images(values, base, max_pixels=None):
    """One RGB image from a row's image values; several are tiled left to right into one (the policy
    prompt holds one image), with 8 px of white between them. Raises ValueError naming the bad one."""
    from PIL import Image
    images = []
    for k, v in enumerate(values):
        try:
            images.append(palmr.load_image(resolve_image(v, base)))
        except ValueError as e:
            raise ValueError(f"image {k + 1} of {len(values)}: {e}" if len(values) > 1 else str(e)) from None
    if len(images) == 1:
        return palmr.fit_pixels(images[0], max_pixels)
    gap = 8
    canvas = Image.new("RGB", (sum(im.width for im in images) + gap * (len(images) - 1), max(im.height for im in images)),
                       (255, 255, 255))
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    return palmr.fit_pixels(canvas, max_pixels)


def ingest(inputs, out_path, max_pixels=1003520):
    """Read local datasets (any layout of LAYOUTS) into Samples; images resized to the pixel budget (never
    cropped) and saved as PNG. Ids are namespaced by source (`chartqa/1042`), so two datasets' integer
    ids never collide. Rows with several images are tiled into one (logged as `images: n`); rows with
    no image (text-only) are dropped with that reason."""
    io_ = StepIO(out_path, "ingest")
    image_dir = Path(out_path).parent / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    decided, seen = set(io_.done), set()  # decided: by an earlier run; seen: ids met in this run
    sources = [source_name(path) for path in inputs]
    clash = sorted({n for n in sources if sources.count(n) > 1})
    if clash:  # their ids would collide and the later input's rows would all be dropped as duplicates
        raise SystemExit(f"ingest: inputs share the source name(s) {clash}: rename the files or folders apart")
    for path in inputs:
        print(f"ingest: {path}: reading", file=sys.stderr)  # a large JSON or parquet takes a while to load
        rows = list(raw_rows(path))
        first = next((raw for _, _, raw, _ in rows if "_unreadable" not in raw), {})
        layout = detect_layout(first, Path(path).suffix)  # one layout per file, from its first readable row
        print(f"ingest: {path}: layout {layout.name}", file=sys.stderr)
        for source, index, raw, base in tqdm(rows, desc=f"ingest {Path(path).name}", mininterval=2):
            try:
                native = layout.id(raw) if "_unreadable" not in raw else None
            except (KeyError, IndexError, TypeError, ValueError):
                native = None
            item = f"{source}/{native if _present(native) else index}"
            if item in seen:  # reported under its own key, so the first occurrence stays the item
                dup = f"{item}#duplicate-{index}"
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
                fields = read_row(raw, layout)
                images = fields.pop("images")
                if not images:
                    raise ValueError("no image (a text-only row)")
                for value in images:  # its own reason, not "missing or corrupt image"
                    refuse_url(value)
                try:
                    image = load_images(images, base, max_pixels)
                except ValueError as e:
                    raise ValueError(f"missing or corrupt image: {e}") from None
                target = image_dir / f"{safe_name(item)}.png"
                image.save(target)
                fields.update(id=item, image=str(target.resolve()), source=str(raw.get("source") or source))
                fields["meta"]["native_id"] = fields["meta"].get("native_id", native)
                io_.keep(Sample(**fields), source=source, layout=layout.name, images=len(images))
            except ValueError as e:
                print(f"ingest: item {item} ({path}): {e}", file=sys.stderr)
                io_.drop(item, str(e))
    summary = io_.summary()
    kept = [r for r in StepIO._recover(io_.log) if r["status"] == "kept"]
    summary["layouts"] = {n: sum(r.get("layout") == n for r in kept) for n in sorted({r.get("layout") for r in kept})}
    summary["several_images_tiled"] = sum(r.get("images", 1) > 1 for r in kept)
    io_.close()
    return summary


def safe_name(item_id):
    """A file name for an id: readable part plus a hash, so ids differing in punctuation never collide."""
    import hashlib
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in item_id)[:80]
    return f"{readable}-{hashlib.sha1(item_id.encode()).hexdigest()[:10]}"


# --- filter (learnability) ---------------------------------------------------

def _rollouts(engine, processor, samples, n, max_new_tokens, temperature, seed, max_pixels, io_):
    """n rollouts of each sample whose image loads (the others are dropped, with their reason, in io_)
    -> (samples kept, groups of assistant turns: the template's prefilled tail + each completion)."""
    prompts, kept = [], []
    for s in samples:
        try:
            prompts.append(palmr.Prompt(palmr.render_prompt(processor, s.question, s.choices), load_image(s, max_pixels)))
            kept.append(s)
        except ValueError as e:
            print(f"{io_.step}: {e}", file=sys.stderr)
            io_.drop(s.id, f"missing or corrupt image: {e}")
    if not kept:
        return [], []
    groups = engine.generate(prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    return kept, [[palmr.assistant_turn(p.text, c.text) for c in g] for p, g in zip(prompts, groups)]


def filter_step(in_path, out_path, engine, processor, k=8, min_pass=0.0, max_pass=1.0, batch=8,
                max_new_tokens=256, temperature=1.0, seed=0, max_pixels=1003520, exclusive=True):
    """Keep items whose pass rate over k rollouts lies in [min_pass, max_pass] (exclusive ends by default:
    0 < rate < 1); write a pass-rate histogram per source (markdown + PNG) beside the output."""
    from rewards import grade_answer
    io_ = StepIO(out_path, "filter")
    todo = pending(in_path, io_)
    print(f"filter: {len(todo)} items to do ({len(io_.done)} already decided), {k} rollouts each", file=sys.stderr)
    for start in tqdm(range(0, len(todo), batch), desc="filter", mininterval=2):
        chunk, groups = _rollouts(engine, processor, todo[start:start + batch], k, max_new_tokens, temperature,
                                  seed + start, max_pixels, io_)
        for s, group in zip(chunk, groups):
            rate = sum(grade_answer(palmr.parse_response(text)[1], s.answer, s.choices) for text in group) / k
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
    """Histogram of pass rates per source: a markdown table and a PNG bar chart (when matplotlib is there)."""
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
    plt = palmr.pyplot()  # the chart (matplotlib, optional): one panel of bars per source
    if plt is not None and table:
        fig, axes = plt.subplots(len(table), 1, figsize=(1.0 + 0.5 * (k + 1), 1.9 * len(table)), squeeze=False)
        for ax, (src, hist) in zip(axes[:, 0], sorted(table.items())):
            ax.bar(range(k + 1), hist, color="#3c6ec8")
            ax.set_xticks(range(k + 1), [f"{b:.2f}" for b in bins], fontsize=7)
            ax.set_title(src, fontsize=9)
            ax.set_ylabel("items")
        axes[-1, 0].set_xlabel(f"pass rate over {k} rollouts")
        fig.tight_layout()
        fig.savefig(png_path, dpi=90)
        plt.close(fig)
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
        """-> (reply text, input tokens, output tokens, thinking tokens); raises RetryableError or ValueError.

        Output tokens are the billed ones: usageMetadata's candidatesTokenCount plus thoughtsTokenCount (a
        thinking model such as gemini-2.5-flash counts its thoughts apart from the reply, and the pricing page
        bills them at the output price: "Output price (including thinking tokens)"); thinking tokens are
        that second part again, for the summary. Field names: google-genai GenerateContentResponseUsageMetadata."""
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
        thoughts = getattr(usage, "thoughts_token_count", 0) or 0
        return (r.text, getattr(usage, "prompt_token_count", 0) or 0,
                (getattr(usage, "candidates_token_count", 0) or 0) + thoughts, thoughts)


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
        return reply.text, reply.tokens, 0, 0


def facts_step(in_path, out_path, provider, concurrency=16, retries=4, backoff=1.0, price_in=0.30, price_out=2.50):
    """Question-agnostic structured facts per image: concurrent requests, retries with backoff on
    transient errors and invalid replies, every reply validated; cost in USD from per-1M-token prices
    (defaults: Gemini 2.5 Flash list prices, check yours). `provider.describe(png)` returns (text, input
    tokens, output tokens, thinking tokens), the thinking ones already inside the output ones (billed at the
    output price); the summary's cost reports all three."""
    io_ = StepIO(out_path, "facts")
    todo = pending(in_path, io_)
    print(f"facts: {len(todo)} items to do ({len(io_.done)} already decided), {concurrency} requests in flight", file=sys.stderr)
    cost = {"input_tokens": 0, "output_tokens": 0, "thought_tokens": 0}

    def work(sample):
        with open(sample.image, "rb") as f:
            png = f.read()
        buf = io.BytesIO()
        palmr.load_image(png).save(buf, format="PNG")  # decode check + one format for every provider
        reason, tokens = "", {"input_tokens": 0, "output_tokens": 0, "thought_tokens": 0}
        for attempt in range(retries + 1):
            try:
                text, *used = provider.describe(buf.getvalue())
                for key, n in zip(tokens, used):  # every reply that arrived is paid for, valid or not
                    tokens[key] += n
                facts = json.loads(text)
                validate(facts, FACTS_SCHEMA)
                return facts, "", tokens
            except RetryableError as e:
                reason = f"provider: {e}"
            except FatalError as e:
                return None, f"provider: {e}", tokens
            except (ValueError, TypeError) as e:  # invalid JSON or schema: ask again
                reason = f"invalid reply: {e}"
            if attempt < retries:
                time.sleep(backoff * 2 ** attempt + random.uniform(0, backoff))
        return None, reason, tokens

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = {pool.submit(work, s): s for s in todo}
        for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="facts", mininterval=2):
            s = futures[future]
            try:
                facts, reason, tokens = future.result()
            except (OSError, ValueError) as e:
                io_.drop(s.id, f"missing or corrupt image: {e}")
                continue
            except Exception as e:  # noqa: BLE001 -- one bad item must not discard the others' paid replies
                io_.fail(s.id, f"error: {type(e).__name__}: {e}")
                continue
            for key, n in tokens.items():
                cost[key] += n
            if facts is None:
                print(f"facts: item {s.id} failed after {retries + 1} attempts: {reason}", file=sys.stderr)
                io_.fail(s.id, reason, **tokens)
            else:
                s.facts = facts
                io_.keep(s, **tokens)
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
    print(f"reference: {len(todo)} items to do ({len(io_.done)} already decided), {n} rollouts each", file=sys.stderr)
    for start in tqdm(range(0, len(todo), batch), desc="reference", mininterval=2):
        chunk, groups = _rollouts(engine, processor, todo[start:start + batch], n, max_new_tokens, temperature,
                                  seed + start, max_pixels, io_)
        pools = []
        for s, group in zip(chunk, groups):
            good = []
            for text in group:
                _, answer, well_formed = palmr.parse_response(text)
                if well_formed and grade_answer(answer, s.answer, s.choices) and text not in good:
                    good.append(text)
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
    model_path = palmr.ensure_tiny_checkpoint(model_path or palmr.DEFAULT_TINY) if model_path is None or \
        palmr.tiny_family(model_path) else model_path
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


def _flags_rollouts(p):
    g = p.add_argument_group("rollouts (filter, reference)")
    g.add_argument("--model", default=None, help="policy for rollouts (default: the tiny checkpoint)")
    g.add_argument("--batch", type=int, default=8, help="items per generate call")
    g.add_argument("--max-new-tokens", type=int, default=256, help="tokens per rollout")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")


def _flags_filter(p):
    g = p.add_argument_group("filter: keep the learnable items")
    g.add_argument("--k", type=int, default=8, help="rollouts per item")
    g.add_argument("--min-pass", type=float, default=0.0, help="keep pass rate > this")
    g.add_argument("--max-pass", type=float, default=1.0, help="keep pass rate < this")


def _flags_facts(p):
    g = p.add_argument_group("facts: the structured description of each image")
    g.add_argument("--provider", default="gemini", choices=["gemini", "openai"], help="who writes them")
    g.add_argument("--facts-model", default=None, help="model name (default for gemini: gemini-2.5-flash)")
    g.add_argument("--base-url", default=None, help="endpoint override (gemini) or server (openai)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai: env var holding the key")
    g.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    g.add_argument("--retries", type=int, default=4, help="retries per item (transient errors, invalid JSON)")
    g.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubled each time")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    g.add_argument("--price-in", type=float, default=0.30, help="USD per 1M input tokens")
    g.add_argument("--price-out", type=float, default=2.50, help="USD per 1M output tokens (thinking tokens included)")


def _flags_reference(p):
    g = p.add_argument_group("reference: best-of-N trace")
    g.add_argument("--n", type=int, default=8, help="rollouts per item")
    g.add_argument("--judge", default="rule", choices=["rule", "openai", "hf"], help="ranks the correct rollouts")
    g.add_argument("--judge-base-url", default=None, help="judge server (--judge openai)")
    g.add_argument("--judge-model", default=None, help="judge model name or path (--judge openai, hf)")


STEPS = {  # step -> (one-line help, its flag groups)
    "ingest": ("read local datasets (any layout of LAYOUTS) into Samples", ()),
    "filter": ("keep items whose pass rate over k rollouts is inside the bounds", (_flags_rollouts, _flags_filter)),
    "facts": ("write each image's structured facts (Gemini or an OpenAI-compatible VLM)", (_flags_facts,)),
    "reference": ("pick the most faithful correct of N rollouts as the reference", (_flags_rollouts, _flags_reference)),
    "build": ("all four steps in order into --work", (_flags_rollouts, _flags_filter, _flags_facts, _flags_reference)),
}


def build_parser():
    """The CLI: `shapes`, then the PaDLayer steps; each step's -h lists only the flags it reads."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=palmr.HelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, title="commands", metavar="COMMAND")
    sp = sub.add_parser("shapes", help="write the synthetic shapes task", formatter_class=palmr.HelpFormatter,
                        description="Write the synthetic shapes task: OUT/SPLIT.jsonl and OUT/images/SPLIT/.")
    sp.add_argument("--n", type=int, default=2000, help="number of samples")
    sp.add_argument("--out", default="data/shapes", help="output folder (JSONL + images/)")
    sp.add_argument("--split", default="train", help="split name: the file is OUT/SPLIT.jsonl")
    sp.add_argument("--seed", type=int, default=0, help="scene and question seed")
    sp.add_argument("--size", type=int, default=84, help="image side in pixels (84: one 28-px vision token per grid cell)")
    for name, (about, groups) in STEPS.items():
        p = sub.add_parser(name, help=f"PaDLayer: {about}", description=f"PaDLayer {name}: {about}.", formatter_class=palmr.HelpFormatter)
        g = p.add_argument_group("input and output")
        if name in ("ingest", "build"):
            g.add_argument("--inputs", nargs="+", required=True, help="dataset files (JSONL, JSON, CSV, TSV, parquet) or folders")
        if name == "build":
            g.add_argument("--work", required=True, help="folder for every step's output; train.jsonl is the result")
        else:
            if name != "ingest":
                g.add_argument("--in", dest="input", required=True, help="the previous step's JSONL")
            g.add_argument("--out", required=True, help="this step's JSONL (appended; resumable)")
        if name != "facts":  # facts sends the stored (already resized) images as they are
            g.add_argument("--max-pixels", type=int, default=1003520, help="image pixel budget (resize, never crop)")
        for add in groups:
            add(p)
    return ap


if __name__ == "__main__":
    a = build_parser().parse_args()
    if a.cmd == "shapes":
        print(make_shapes(a.n, a.out, split=a.split, seed=a.seed, size=a.size))
    else:
        run_step(a)
