"""Run visibility: TensorBoard event files read back with tensorboard's own reader, a W&B stand-in, validation
during training equal to eval.py on the same checkpoint and items, and the run report (report.md/png)."""
import importlib.machinery
import json
import sys
import types

import pytest

import eval as evaluation
import grpo
import palmr

SMALL = ["--rollout-batch", "2", "--update-batch", "2", "--group-size", "2", "--max-new-tokens", "12",
         "--save-every", "100"]


def _run(tmp_path, tiny_ckpt, shapes_file, *flags):
    grpo.main(["--model", tiny_ckpt, "--data", shapes_file, "--out", str(tmp_path), *SMALL, *flags])
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tensorboard_events_and_report(tmp_path, tiny_ckpt, shapes_file):
    from PIL import Image
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
    assert Image.open(tmp_path / "report.png").size[0] > 800
    # and again on demand, without a model
    (tmp_path / "report.md").unlink()
    (tmp_path / "report.png").unlink()
    assert grpo.main(["--report", "--out", str(tmp_path)]) is None
    assert (tmp_path / "report.md").read_text() == md and (tmp_path / "report.png").exists()


@pytest.mark.slow
def test_validation_equals_eval_py(tmp_path, tiny_ckpt, shapes_file):
    run = tmp_path / "run"
    metrics = _run(run, tiny_ckpt, shapes_file, "--max-steps", "1", "--eval-every", "1", "--eval-limit", "6",
                   "--eval-max-new-tokens", "16", "--eval-before-train", "--save-every", "1",
                   "--log-rollouts-every", "0")
    assert metrics[0]["step"] == 0 and "val/shapes/acc" in metrics[0] and "reward" not in metrics[0]
    val = metrics[-1]
    assert val["step"] == 1 and val["val/shapes/n"] == 6 and val["t_val"] > 0
    report = evaluation.main(["--bench", "shapes", "--checkpoints", f"c={run / 'checkpoint-000001'}", "--limit", "6",
                              "--max-new-tokens", "16", "--out", str(tmp_path / "eval")])
    scores = report["checkpoints"]["c"]["shapes"]
    for key in ("acc", "perception_acc", "perception_complete", "claims_per_reply", "hallucination_n"):
        assert val[f"val/shapes/{key}"] == pytest.approx(scores[key]), key
    # the very same replies, item by item
    ours = evaluation.read_predictions(run / "val" / "step-000001" / "shapes.predictions.jsonl")
    theirs = evaluation.read_predictions(tmp_path / "eval" / "c" / "shapes.predictions.jsonl")
    assert len(ours) == 6 and ours == theirs


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


def test_wandb_gets_metrics_config_and_rollouts_offline(tmp_path, tiny_ckpt, shapes_file, monkeypatch):
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


def test_missing_optional_packages_are_named(tmp_path, tiny_ckpt, shapes_file, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(SystemExit, match="requirements-report.txt"):
        _run(tmp_path, tiny_ckpt, shapes_file, "--max-steps", "1", "--report-to", "tensorboard")
    # without matplotlib the markdown report is still written, and the missing chart is said
    run = tmp_path / "hand"
    run.mkdir()
    rows = [{"step": 0, "val/shapes/acc": 40.0},
            {"step": 1, "reward": 0.1, "reward/ans": 0.2, "kl": 0.0, "t_rollout": 1.0},
            {"step": 2, "reward": 0.2, "reward/ans": 0.4, "kl": 0.01, "t_rollout": 3.0, "val/shapes/acc": 50.0},
            {"step": 3, "reward": 0.9, "reward/ans": 0.9, "kl": 0.02, "t_rollout": 2.0, "val/shapes/acc": 1.0},
            {"step": 3, "reward": 0.6, "reward/ans": 0.6, "kl": 0.02, "t_rollout": 2.0}]  # step 3 again (a resume)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "rew')  # torn
    (run / "args.json").write_text(json.dumps({"max_steps": 10, "reward": "grpo"}))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    md, png = evaluation.run_report(run)
    assert png is None and not (run / "report.png").exists() and "requirements-report.txt" in capsys.readouterr().err
    text = md.read_text()
    assert "Step 3 of 10" in text
    assert "| reward (`reward`) | 0.6 | 0.3 |" in text and "| S_ans (`reward/ans`) | 0.6 | 0.4 |" in text
    assert "| rollout (`t_rollout`) | 2 | 2 |" in text
    assert "| step | shapes/acc |" in text and "| 0 | 40 |" in text and "| 2 | 50 |" in text
    assert "| 3 | 1 |" not in text  # the repeated step's row replaced the first one, validation included
    assert "| reward | \"grpo\" |" in text
    assert palmr.pyplot() is None


@pytest.mark.slow
def test_validation_and_tensorboard_under_torchrun_two_ranks(tmp_path, tiny_ckpt, shapes_file):
    import os
    import subprocess
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(evaluation.Path(grpo.__file__)),
           "--model", tiny_ckpt, "--data", shapes_file, "--out", str(tmp_path), "--max-steps", "2", "--rollout-batch", "4",
           "--update-batch", "2", "--group-size", "2", "--max-new-tokens", "12", "--save-every", "100",
           "--log-rollouts-every", "0", "--eval-every", "2", "--eval-limit", "5", "--report-to", "tensorboard"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and "val/shapes/acc" in metrics[1] and metrics[1]["val/shapes/n"] == 5
    assert (tmp_path / "val" / "step-000002" / "shapes.predictions.jsonl").exists()
    assert not list((tmp_path / "val").glob(".rank*")), "the other rank's predictions are cleaned up"
    assert list((tmp_path / "tb").glob("events.*")) and (tmp_path / "report.png").exists()
