"""report.py: the run report (report.md/png) and run visibility (TensorBoard event files read back with
tensorboard's own reader, a W&B stand-in, validation during training equal to eval.py on the same checkpoint
and items), and the GRPO-vs-PaLMR study on shapes (runs/shapes_study.sh, its table and curves; issue 8)."""
import importlib.machinery
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

import eval as evaluation
import palmr
import report
# grpo is imported by the tests that train, where they use it: the rest of this file tests report.py alone

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--rollout-batch", "2", "--update-batch", "2", "--group-size", "2", "--max-new-tokens", "12",
         "--save-every", "100"]


def _run(tmp_path, tiny_ckpt, shapes_file, *flags):
    import grpo
    grpo.main(["--model", tiny_ckpt, "--data", shapes_file, "--out", str(tmp_path), *SMALL, *flags])
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def _report_png_size(rows):
    # report.png: 3 columns of 4.4 x 3.2 inch panels at 90 dpi, as many rows as the panels need
    return round(4.4 * 3 * 90), round(3.2 * rows * 90)


def _metrics(path, rewards, ans, halluc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"step": i + 1, "reward": r, "reward/ans": a, "judge/hallucinated_correct": h})
                            + "\n" for i, (r, a, h) in enumerate(zip(rewards, ans, halluc))))


class FakeWandb(types.ModuleType):
    """Records what the trainer hands to W&B (the real package is optional and not installed in CI)."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.calls = []
        fake = self

        class Table:
            def __init__(self, columns):
                self.columns, self.data = columns, []

            def add_data(self, *row):
                self.data.append(row)

        class Run:
            def finish(self):
                fake.calls.append(("finish",))
        self.Table, self._run = Table, Run()

    def init(self, **kw):
        self.calls.append(("init", kw))
        return self._run

    def log(self, data, step=None):
        self.calls.append(("log", data, step))


# -----------------------------------------------------------------------------
# The module itself


def test_report_imports_no_trainer_or_benchmark_code():
    # palmr <- report <- grpo, eval: report.py loads neither, nor what they load
    code = "import sys, report; print(sorted({'eval', 'grpo', 'data', 'judge', 'rewards'} & set(sys.modules)))"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"


def test_run_logger_tensorboard_and_wandb(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    args = types.SimpleNamespace(reward="palmr", max_steps=2, wandb_project="p", judge_api_key_env="OPENAI_API_KEY")
    logger = report.RunLogger(["tensorboard", "wandb"], tmp_path, args)
    rows = [{"step": 1, "reward": 0.25, "kl": 0.0, "flag": True}, {"step": 2, "reward": 0.5, "kl": 0.125, "name": "x"}]
    for r in rows:
        logger.log(r, r["step"])
    logger.rollouts([{"id": "a", "question": "q?", "answer": "2", "completion": "c", "reward": 1.0}], 2)
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward")] == [(1, 0.25), (2, 0.5)]
    assert [(e.step, e.value) for e in acc.Scalars("kl")] == [(1, 0.0), (2, 0.125)]
    assert sorted(t for t in acc.Tags()["scalars"]) == ["kl", "reward"]  # no bools, strings or the step itself
    init = [c for c in fake.calls if c[0] == "init"]
    run_id = (tmp_path / "wandb_id.txt").read_text()
    assert len(init) == 1 and init[0][1]["mode"] == "offline" and init[0][1]["id"] == run_id
    assert init[0][1]["config"] == {"reward": "palmr", "max_steps": 2, "wandb_project": "p",
                                    "judge_api_key_env": "OPENAI_API_KEY"}
    assert [c for c in fake.calls if c[0] == "log" and "reward" in c[1]] == [
        ("log", {"reward": 0.25, "kl": 0.0}, 1), ("log", {"reward": 0.5, "kl": 0.125}, 2)]
    tables = [c[1]["rollouts"] for c in fake.calls if c[0] == "log" and "rollouts" in c[1]]
    assert len(tables) == 1 and tables[0].data == [("a", "q?", "2", "c", 1.0)]
    assert fake.calls[-1] == ("finish",)


# -----------------------------------------------------------------------------
# The study on shapes


def test_report_table_and_plot(tmp_path, capsys):
    res = {"start": {"acc": 60.0, "perception_acc": 20.0, "perception_complete": 10.0, "claims_per_reply": 4.0,
                     "hallucination_rate": 70.0}}
    for seed, (g, p) in enumerate([(50.0, 30.0), (60.0, 40.0)]):
        res[f"grpo-s{seed}"] = {"acc": 60.0, "perception_acc": 10.0, "perception_complete": 5.0, "claims_per_reply": 4.0,
                                "hallucination_rate": g}
        res[f"palmr-s{seed}"] = {"acc": 62.0, "perception_acc": 30.0, "perception_complete": 20.0 + seed,
                                 "claims_per_reply": 3.0, "hallucination_rate": p}
        _metrics(tmp_path / f"grpo-s{seed}" / "metrics.jsonl", [0.5, 0.6, 0.7], [0.5, 0.6, 0.7], [0.25, 0.3, 0.35])
        _metrics(tmp_path / f"palmr-s{seed}" / "metrics.jsonl", [0.1, 0.2, 0.3], [0.5, 0.5, 0.5], [0.25, 0.2, 0.0])
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps(
        {"checkpoints": {name: {"path": "x", "shapes": r} for name, r in res.items()}}))
    evaluation.main(["--study-report", str(tmp_path)])
    md = (tmp_path / "results.md").read_text()
    assert "| **grpo** | 2 | 60.0 ± 0.0 | 10.0 ± 0.0 | 5.0 ± 0.0 | 4.0 ± 0.0 | 55.0 ± 7.1 |" in md  # mean ± sample sd
    assert "| **palmr** | 2 | 62.0 ± 0.0 | 30.0 ± 0.0 | 20.5 ± 0.7 | 3.0 ± 0.0 | 35.0 ± 7.1 |" in md
    assert "| start (warm-up) | - | 60.0 | 20.0 | 10.0 | 4.0 | 70.0 |" in md
    assert "| palmr seed 1 | 1 | 62.0 | 30.0 | 21.0 | 3.0 | 40.0 |" in md
    # curves: per-step mean over seeds, hallucination rate = hallucinated correct / correct, smoothed
    series = report.study_curves(tmp_path, [0, 1], smooth=1)
    assert series["palmr"]["hallucination rate (rollouts)"] == pytest.approx([0.5, 0.4, 0.0])
    assert series["grpo"]["reward"] == pytest.approx([0.5, 0.6, 0.7])
    assert report.study_curves(tmp_path, [0, 1], smooth=2)["grpo"]["reward"] == pytest.approx([0.5, 0.55, 0.65])
    img = Image.open(tmp_path / "curves.png").convert("RGB")
    colors = {c for _, c in img.getcolors(1 << 20)}
    assert report.STUDY_COLORS["grpo"] in colors and report.STUDY_COLORS["palmr"] in colors  # both lines drawn
    # report.py's own command writes the very same report
    printed = capsys.readouterr().out
    (tmp_path / "results.md").unlink()
    assert report.main(["study", str(tmp_path)]) is None
    assert (tmp_path / "results.md").read_text() == md and capsys.readouterr().out == printed


@pytest.mark.slow
def test_default_run_builds_the_warm_start_on_two_ranks(tmp_path):
    # regression: rank 0 once built the warm-up with an FSDP-sharded model and hung (the other rank was
    # waiting at a barrier, not in the all-gathers); rank 0 now builds it unsharded, alone
    env = dict(os.environ, HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "grpo.py"),
                        "--warmup-steps", "4", "--warmup-only"], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    warm = tmp_path / "home" / ".cache" / "palmr" / "tiny-qwen25vl-warm4-h0.3-s0-v2"
    assert p.stdout.strip().splitlines()[-1] == str(warm)
    from transformers import AutoModelForImageTextToText
    AutoModelForImageTextToText.from_pretrained(warm)  # a complete checkpoint


@pytest.mark.slow
def test_study_script_end_to_end(tmp_path):
    # the real script on a toy budget, with its own empty ~/.cache: warm start, 2 rewards x 1 seed, eval,
    # report
    env = dict(os.environ, HOME=str(tmp_path / "home"), SEEDS="0", STEPS="1", WARMUP="2", LIMIT="4",
               VARIANTS="grpo palmr+both", LONG_STEPS="2", LONG_SEEDS="0", LONG_VARIANTS="palmr+both",
               PYTHONPATH=str(ROOT))
    out = tmp_path / "study"
    p = subprocess.run(["bash", str(ROOT / "runs" / "shapes_study.sh"), str(out)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    results = json.loads((out / "eval" / "results.json").read_text())["checkpoints"]
    assert set(results) == {"start", "grpo-s0", "palmr+both-s0", "palmr+both@2-s0"}
    assert all(r["shapes"]["n"] == 4 for r in results.values())
    md = (out / "results.md").read_text()
    assert "| **palmr+both** | 1 |" in md and "| **palmr+both@2** | 1 |" in md and "Versions: python" in md
    # one panel per series (reward, rollout accuracy, rollout hallucination rate), 4.2 x 3.4 inches at 100 dpi
    assert Image.open(out / "curves.png").size == Image.open(out / "curves_long.png").size == (round(3 * 4.2 * 100), 340)
    # the long run is the same run resumed: one metrics file, 2 steps, both checkpoints kept
    assert len((out / "palmr+both-s0" / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "palmr+both-s0" / "checkpoint-000001").is_dir() and (out / "palmr+both-s0" / "checkpoint-000002").is_dir()
    args = json.loads((out / "palmr+both-s0" / "args.json").read_text())
    assert args["credit"] == "token" and args["judge_omissions"] and args["versions"]["torch"] == torch.__version__


# -----------------------------------------------------------------------------
# The report of one run, and what the trainer shows while it runs


@pytest.mark.slow
def test_tensorboard_events_and_report(tmp_path, tiny_ckpt, shapes_file):
    import grpo
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    metrics = _run(tmp_path, tiny_ckpt, shapes_file, "--max-steps", "3", "--report-to", "tensorboard",
                   "--log-rollouts-every", "1")
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    for key in ("reward", "reward/ans", "kl", "entropy", "t_train", "completion_len"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2, 3], key
        assert [e.value for e in events] == pytest.approx([m[key] for m in metrics], rel=1e-6, abs=1e-7), key
    texts = acc.Tags()["tensors"]
    assert any(t.startswith("args") for t in texts) and any(t.startswith("rollouts") for t in texts)
    rollout_text = acc.Tensors([t for t in texts if t.startswith("rollouts")][0])
    assert len(rollout_text) == 3 and b"Q: " in rollout_text[-1].tensor_proto.string_val[0]
    # the report, written at the end of the run
    md = (tmp_path / "report.md").read_text()
    assert f"| reward (`reward`) | {metrics[-1]['reward']:.4g} |" in md and "![report](report.png)" in md
    assert "| reward | \"palmr\" |" in md and "Step 3 of 3" in md
    # 6 panels (reward parts, gated share, KL, entropy, completion length, step time): 2 rows
    png = Image.open(tmp_path / "report.png")
    assert png.size == _report_png_size(rows=2)
    pixels = png.convert("RGB").tobytes()
    # and again on demand, without a model: the same report, the same chart
    (tmp_path / "report.md").unlink()
    (tmp_path / "report.png").unlink()
    assert grpo.main(["--report", "--out", str(tmp_path)]) is None
    assert (tmp_path / "report.md").read_text() == md
    assert Image.open(tmp_path / "report.png").convert("RGB").tobytes() == pixels


@pytest.mark.slow
def test_validation_equals_eval_py(tmp_path, tiny_ckpt, shapes_file, monkeypatch):
    run = tmp_path / "run"
    timed = {}  # validation's generation, timed here: {step folder: seconds}
    generate = evaluation.generate

    def timed_generate(engine, processor, bench, items, cache_path, args):
        t = time.time()
        result = generate(engine, processor, bench, items, cache_path, args)
        timed[cache_path.parent.name] = time.time() - t
        return result
    monkeypatch.setattr(evaluation, "generate", timed_generate)
    metrics = _run(run, tiny_ckpt, shapes_file, "--max-steps", "1", "--eval-every", "1", "--eval-limit", "6",
                   "--eval-max-new-tokens", "16", "--eval-before-train", "--save-every", "1",
                   "--log-rollouts-every", "0")
    assert metrics[0]["step"] == 0 and "val/shapes/acc" in metrics[0] and "reward" not in metrics[0]
    val = metrics[-1]
    assert val["step"] == 1 and val["val/shapes/n"] == 6
    # t_val: the validation's generation (timed above) and its scoring by the rule judge (milliseconds)
    assert sorted(timed) == ["step-000000", "step-000001"] and val["t_val"] == pytest.approx(timed["step-000001"], abs=0.1)
    results = evaluation.main(["--bench", "shapes", "--checkpoints", f"c={run / 'checkpoint-000001'}", "--limit", "6",
                               "--max-new-tokens", "16", "--out", str(tmp_path / "eval")])
    scores = results["checkpoints"]["c"]["shapes"]
    for key in ("acc", "perception_acc", "perception_complete", "claims_per_reply", "hallucination_n"):
        assert val[f"val/shapes/{key}"] == pytest.approx(scores[key]), key
    # the very same replies, item by item
    ours = evaluation.read_predictions(run / "val" / "step-000001" / "shapes.predictions.jsonl")
    theirs = evaluation.read_predictions(tmp_path / "eval" / "c" / "shapes.predictions.jsonl")
    assert len(ours) == 6 and ours == theirs


def test_wandb_gets_metrics_config_and_rollouts_offline(tmp_path, tiny_ckpt, shapes_file, monkeypatch):
    import grpo
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-logged")
    metrics = _run(tmp_path, tiny_ckpt, shapes_file, "--max-steps", "2", "--report-to", "wandb",
                   "--log-rollouts-every", "2", "--save-every", "2")
    init = [c for c in fake.calls if c[0] == "init"]
    assert len(init) == 1 and init[0][1]["mode"] == "offline" and init[0][1]["config"]["reward"] == "palmr"
    assert init[0][1]["config"]["judge_api_key_env"] == "OPENAI_API_KEY"
    logs = [c for c in fake.calls if c[0] == "log" and "reward" in c[1]]
    assert [c[2] for c in logs] == [1, 2] and [c[1]["reward"] for c in logs] == pytest.approx([m["reward"] for m in metrics])
    tables = [c[1]["rollouts"] for c in fake.calls if c[0] == "log" and "rollouts" in c[1]]
    assert len(tables) == 1 and len(tables[0].data) == 2 and tables[0].columns[0] == "id"
    assert fake.calls[-1] == ("finish",) and "sk-never-logged" not in repr(fake.calls)
    # a --resume continues the same W&B run (its id is kept in the run folder)
    grpo.main(["--model", tiny_ckpt, "--data", shapes_file, "--out", str(tmp_path), *SMALL, "--save-every", "2",
               "--max-steps", "3", "--report-to", "wandb", "--resume", "--log-rollouts-every", "0"])
    inits = [c[1] for c in fake.calls if c[0] == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] and inits[1]["resume"] == "allow"
    assert [c[2] for c in fake.calls if c[0] == "log" and "reward" in c[1]][-1] == 3


def _hand_run(run):
    """A run folder written by hand: validation-only step 0, steps 1-3, step 3 again (a resume), a torn line."""
    run.mkdir()
    rows = [{"step": 0, "val/shapes/acc": 40.0},
            {"step": 1, "reward": 0.1, "reward/ans": 0.2, "kl": 0.0, "t_rollout": 1.0},
            {"step": 2, "reward": 0.2, "reward/ans": 0.4, "kl": 0.01, "t_rollout": 3.0, "val/shapes/acc": 50.0},
            {"step": 3, "reward": 0.9, "reward/ans": 0.9, "kl": 0.02, "t_rollout": 2.0, "val/shapes/acc": 1.0},
            {"step": 3, "reward": 0.6, "reward/ans": 0.6, "kl": 0.02, "t_rollout": 2.0}]  # step 3 again (a resume)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "rew')  # torn
    (run / "args.json").write_text(json.dumps({"max_steps": 10, "reward": "grpo"}))
    return run


def test_missing_optional_packages_are_named(tmp_path, tiny_ckpt, shapes_file, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(SystemExit, match="requirements-report.txt"):
        _run(tmp_path, tiny_ckpt, shapes_file, "--max-steps", "1", "--report-to", "tensorboard")
    # without matplotlib the markdown report is still written, and the missing chart is said
    run = _hand_run(tmp_path / "hand")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    md, png = report.run_report(run)
    assert png is None and not (run / "report.png").exists() and "requirements-report.txt" in capsys.readouterr().err
    text = md.read_text()
    assert "Step 3 of 10" in text
    assert "| reward (`reward`) | 0.6 | 0.3 |" in text and "| S_ans (`reward/ans`) | 0.6 | 0.4 |" in text
    assert "| rollout (`t_rollout`) | 2 | 2 |" in text
    assert "| step | shapes/acc |" in text and "| 0 | 40 |" in text and "| 2 | 50 |" in text
    assert "| 3 | 1 |" not in text  # the repeated step's row replaced the first one, validation included
    assert "| reward | \"grpo\" |" in text
    assert palmr.pyplot() is None


def test_run_report_command(tmp_path, capsys):
    # `python report.py run DIR`: the report of a run folder, chart included, as run_report writes it
    run = _hand_run(tmp_path / "hand")
    md, png = report.main(["run", str(run)])
    assert (md, png) == (run / "report.md", run / "report.png")
    assert capsys.readouterr().out == f"{md}, {png}\n"
    text = md.read_text()
    assert text.splitlines()[:3] == [f"# Run report: {run}", "", "![report](report.png)"]
    # 4 panels (reward parts, KL, step time, validation): 2 rows
    assert Image.open(png).size == _report_png_size(rows=2)
    assert [r["step"] for r in report.read_metrics(run)] == [0, 1, 2, 3]
    assert report.read_metrics(run)[3]["reward"] == 0.6 and "val/shapes/acc" not in report.read_metrics(run)[3]


@pytest.mark.slow
def test_validation_and_tensorboard_under_torchrun_two_ranks(tmp_path, tiny_ckpt, shapes_file):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "grpo.py"),
           "--model", tiny_ckpt, "--data", shapes_file, "--out", str(tmp_path), "--max-steps", "2", "--rollout-batch", "4",
           "--update-batch", "2", "--group-size", "2", "--max-new-tokens", "12", "--save-every", "100",
           "--log-rollouts-every", "0", "--eval-every", "2", "--eval-limit", "5", "--report-to", "tensorboard"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and "val/shapes/acc" in metrics[1] and metrics[1]["val/shapes/n"] == 5
    assert (tmp_path / "val" / "step-000002" / "shapes.predictions.jsonl").exists()
    assert not list((tmp_path / "val").glob(".rank*")), "the other rank's predictions are cleaned up"
    # rank 0's events hold what metrics.jsonl holds, validation included
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward")] == [
        (m["step"], pytest.approx(m["reward"], rel=1e-6, abs=1e-7)) for m in metrics]
    assert [(e.step, e.value) for e in acc.Scalars("val/shapes/acc")] == [
        (2, pytest.approx(metrics[1]["val/shapes/acc"], rel=1e-6, abs=1e-7))]
    # 7 panels (reward parts, gated share, KL, entropy, completion length, step time, validation): 3 rows
    assert Image.open(tmp_path / "report.png").size == _report_png_size(rows=3)
