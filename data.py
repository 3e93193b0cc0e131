"""PaLMR data: the `Sample` contract, JSONL datasets, and the synthetic `shapes` task.

    python data.py shapes --n 2000 --out data/shapes              # writes data/shapes/train.jsonl + images/
    python data.py shapes --n 200 --out data/shapes --split test --seed 1

`shapes` is the embedded default task: PIL-drawn scenes of a few shapes, questions of four types
(counting, yes/no existence, comparison, multiple choice), the exact scene as `facts` (the same schema
as the pseudo ground truth of real data: objects with name, count, attributes, location) and a
canonical, faithful `reference` trace in the policy's output format.
"""
import argparse
import dataclasses
import json
import os
import random
import sys
from pathlib import Path

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
GRID = 3            # scenes are laid out on a 3 x 3 grid, one shape per cell
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
        pad = cell * 0.15
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
            "relations": [], "text": [], "global": {"background": "white", "total_shapes": len(objects)}}


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


def make_shapes_sample(index, rng, image_dir, size=112, prefix="shapes"):
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


def make_shapes(n, out_dir, split="train", seed=0, size=112):
    """Write `n` shapes samples to out_dir/{split}.jsonl with PNGs under out_dir/images/; return the path."""
    out_dir = Path(out_dir)
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"shapes-{split}-{seed}")
    samples = [make_shapes_sample(i, rng, image_dir, size, prefix=f"shapes-{split}") for i in range(n)]
    write_jsonl(out_dir / f"{split}.jsonl", samples)
    return str(out_dir / f"{split}.jsonl")


DEFAULT_SHAPES = "~/.cache/palmr/shapes"


def ensure_shapes(n=2000, out_dir=DEFAULT_SHAPES, split="train", seed=0):
    """The default training set, built once; returns the JSONL path (call on rank 0, then barrier)."""
    path = Path(out_dir).expanduser() / f"{split}.jsonl"
    if not path.exists():
        make_shapes(n, path.parent, split=split, seed=seed)
    return str(path)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("shapes", help="write the synthetic shapes task")
    sp.add_argument("--n", type=int, default=2000, help="number of samples")
    sp.add_argument("--out", default="data/shapes", help="output folder (JSONL + images/)")
    sp.add_argument("--split", default="train", help="split name: the file is OUT/SPLIT.jsonl")
    sp.add_argument("--seed", type=int, default=0, help="scene and question seed")
    sp.add_argument("--size", type=int, default=112, help="image side in pixels")
    a = ap.parse_args()
    print(make_shapes(a.n, a.out, split=a.split, seed=a.seed, size=a.size))
