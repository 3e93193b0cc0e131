"""Real use of the trainer (issue 25): flags and inputs refused before anything heavy, one owner per run folder,
no metrics row written twice (re-run, resume, Ctrl-C), a dead or failing judge stops the run, ranks that outlive
their launcher, thread caps. A failure names what a user would have seen go wrong."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from conftest import interruptible
import torch

import grpo
import palmr
import report
import warmup
from chat_server import ChatServer

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def refusal(capsys, argv):
    """grpo.main(argv) must stop before anything loads with argparse's exit 2; -> its error line."""
    with pytest.raises(SystemExit) as e:
        grpo.main(argv)
    assert e.value.code == 2, f"{argv}: exit {e.value.code}, not an argparse error"
    return capsys.readouterr().err.strip().splitlines()[-1]


# -----------------------------------------------------------------------------
# every input checked at parse time

@pytest.mark.parametrize("argv, says", [
    (["--group-size", "1"], "--group-size 1"),  # failed only after a full rollout
    (["--group-size", "1", "--adv-scale", "none"], "every advantage is 0"),  # trained silently with zero advantage
    (["--rollout-batch", "6", "--update-batch", "4"], "multiple of --update-batch"),
    (["--judge", "openai"], "--judge-base-url"),  # an assert inside make_judge, after the model loaded
    (["--judge", "none"], "needs a judge"),
    (["--temperature", "0"], "--temperature"),
    (["--data", "nowhere/train.jsonl"], "no such file"),
    (["--resume", "--out", "/nonexistent/run"], "no checkpoint"),
    (["--resume", "--overwrite"], "choose one"),
    (["--model", "Qwen/Qwen2.5-VL-7B-Instruct"], "not downloaded"),  # was transformers' "Repo id must be..."
    (["--eval-every", "5", "--eval-bench", "mmlu=x.tsv"], "unknown benchmark 'mmlu'"),  # after the model loaded
    (["--eval-before-train", "--eval-bench", "mmstar=nowhere/MMStar.tsv"], "no such file"),
    (["--overwrite", "--out", "out", "--data", "out/grpo/train.jsonl"], "would delete --model or --data"),
])
def test_flag_conflicts_are_argparse_errors(capsys, argv, says, tmp_path):
    if "--overwrite" in argv and "--data" in argv:  # a real --data file inside --out
        (tmp_path / "train.jsonl").write_text("")
        argv = ["--overwrite", "--out", str(tmp_path), "--data", str(tmp_path / "train.jsonl")]
    else:
        argv = argv + ["--out", "/nonexistent/never-written"]
    line = refusal(capsys, argv)
    assert "error:" in line and says in line, line


def test_model_check_says_what_it_found(tmp_path, tiny_ckpt, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text(json.dumps({"model_type": "llava", "vision_config": {}}))
    cases = {"empty": "no config.json", "llama": "model_type 'llama' (a text-only model)",
             "llava": "model_type 'llava'; supported: qwen2_5_vl"}
    for name, says in cases.items():
        line = refusal(capsys, ["--model", str(tmp_path / name)])
        assert says in line, f"{name}: {line}"
    assert palmr.check_model(tiny_ckpt) is None, "the tiny Qwen2.5-VL must pass"


def test_help_has_groups_and_defaults():
    out = subprocess.run([sys.executable, "grpo.py", "-h"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=120).stdout
    for group in ("model and data:", "rollout:", "reward:", "optimisation:", "memory and speed:",
                  "run folder, checkpoints and validation:", "visual-fidelity judge (judge.py):"):
        assert group in out, f"-h lacks the group {group!r}"
    flat = " ".join(out.split())
    assert "G completions per prompt (paper: 16) (default: 8)" in flat, "-h must show defaults"


def test_threads_cap(monkeypatch, tmp_path):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert palmr.cpu_threads(3) == 3
    assert palmr.cpu_threads() == max(1, (os.cpu_count() or 1) // 2), "local ranks share the cores"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert palmr.cpu_threads() == 1, "OMP_NUM_THREADS is honoured"
    # the warm start ran with every core whatever the user asked: it now takes --threads
    seen = []
    monkeypatch.setattr(warmup, "warmup", lambda *a, **k: seen.append(torch.get_num_threads()) or
                        Path(a[2]).mkdir(parents=True))
    monkeypatch.setattr(warmup.palmr, "versions", lambda: {})
    warmup.ensure_warm_start(str(tmp_path / "base"), "unused.jsonl", 3, 0.3, None, None, threads=1)
    assert seen == [1], f"the warm start ran with {seen} threads, not --threads 1"


# -----------------------------------------------------------------------------
# the run folder: one owner, refused re-runs, logs cut back on resume

def test_claim_refuses_a_used_folder_and_a_live_owner(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
    with pytest.raises(SystemExit, match="holds a run .*it has no checkpoint to resume from, --overwrite replaces"):
        report.claim_run_folder(out)  # (no `latest`: --resume would be refused, so it is not suggested)
    (out / "checkpoint-000001").mkdir()
    (out / "latest").write_text("checkpoint-000001")
    with pytest.raises(SystemExit, match="holds a run .*--resume continues it, --overwrite replaces it"):
        report.claim_run_folder(out)
    lock = report.claim_run_folder(out, overwrite=True)
    report.clear_run_folder(out)  # start_logger's, once every check passed
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoint-000001").exists(), "--overwrite clears"
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.unlink()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname(), "started": "then"}))
        with pytest.raises(SystemExit, match=f"in use by pid {owner.pid} on {socket.gethostname()}"):
            report.claim_run_folder(out, resume=True)
    finally:
        owner.kill()
        owner.wait()
    assert report.claim_run_folder(out, resume=True) == lock, "a dead owner's lock is taken over"


def test_trim_cuts_both_logs_back_atomically(tmp_path):
    rows = [{"step": s, "reward": s / 10} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "rew')
    (tmp_path / "rollouts.jsonl").write_text("".join(json.dumps({"step": s, "id": "x"}) + "\n" for s in (5, 5, 10)))
    assert report.trim_run_logs(tmp_path, 3) == 10
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (tmp_path / "rollouts.jsonl").read_text() == "", "rollouts of steps 5 and 10 are past the checkpoint"
    assert not list(tmp_path.glob("*.tmp"))


class FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged = [], []

    def init(self, **kw):
        self.inits.append(kw)
        return types.SimpleNamespace(finish=lambda: None)

    def log(self, row, step):
        self.logged.append((self.inits[-1]["id"], step, row))


def test_wandb_resume_past_its_checkpoint_opens_a_new_run_and_replays(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    args = types.SimpleNamespace(wandb_project="p", reward="palmr")
    (tmp_path / "wandb_id.txt").write_text("run-old")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward": s}) + "\n" for s in (1, 2)))
    # W&B logged steps 1-4 before the kill; the checkpoint is step 2: W&B would drop the rerun steps 3 and 4
    report.RunLogger(["wandb"], tmp_path, args, start=2, logged=4)
    new_id = fake.inits[-1]["id"]
    assert new_id != "run-old" and (tmp_path / "wandb_id.txt").read_text() == new_id
    assert [(i, s) for i, s, _ in fake.logged] == [(new_id, 1), (new_id, 2)], "the kept rows, replayed once"
    # a resume from the step W&B stopped at continues the same run, nothing replayed
    report.RunLogger(["wandb"], tmp_path, args, start=2, logged=2)
    assert fake.inits[-1]["id"] == new_id and fake.inits[-1]["resume"] == "allow" and len(fake.logged) == 2


def _steps(out):
    return [json.loads(l)["step"] for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _cmd(out, tiny_ckpt, shapes_file, *flags):
    return [sys.executable, "grpo.py", "--model", tiny_ckpt, "--data", shapes_file, "--out", str(out),
            "--rollout-batch", "2", "--update-batch", "2", "--group-size", "2", "--max-new-tokens", "8",
            "--log-rollouts-every", "1", *flags]


@pytest.mark.slow
def test_rerun_resume_twice_and_ctrl_c_write_each_step_once(tmp_path, tiny_ckpt, shapes_file):
    out = tmp_path / "run"
    run = lambda *f: subprocess.run(_cmd(out, tiny_ckpt, shapes_file, *f), cwd=ROOT, env=ENV,  # noqa: E731
                                    capture_output=True, text=True, timeout=600)
    first = run("--max-steps", "3", "--save-every", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    again = run("--max-steps", "3")  # the same command twice: appended steps 1-3 again
    assert again.returncode != 0 and "holds a run" in again.stderr and _steps(out) == [1, 2, 3], again.stderr
    warm = run("--warmup-only")  # writes nothing to --out (runs/shapes_study.sh asks for the warm start so)
    assert warm.returncode == 0 and warm.stdout.strip().splitlines()[-1] == tiny_ckpt, warm.stderr[-1500:]
    # resume from the step-3 checkpoint, twice
    assert run("--max-steps", "4", "--save-every", "2", "--resume").returncode == 0
    assert _steps(out) == [1, 2, 3, 4]
    assert run("--max-steps", "5", "--save-every", "2", "--resume").returncode == 0
    assert _steps(out) == [1, 2, 3, 4, 5]
    # Ctrl-C during step 7 or later, then resume
    proc = subprocess.Popen(_cmd(out, tiny_ckpt, shapes_file, "--max-steps", "40", "--save-every", "2", "--resume"),
                            cwd=ROOT, env=ENV, preexec_fn=interruptible, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and (len(_steps(out)) < 7 or proc.poll() is not None):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: --resume continues"), err[-500:]
    assert not (out / "run.lock").exists(), "Ctrl-C releases the run folder"
    cut = int((out / "latest").read_text().split("-")[-1])
    assert run("--max-steps", str(cut + 2), "--save-every", "2", "--resume").returncode == 0
    steps = _steps(out)
    assert steps == list(range(1, cut + 3)), f"each step exactly once: {steps}"
    rollout_steps = [json.loads(l)["step"] for l in (out / "rollouts.jsonl").read_text().splitlines()]
    assert rollout_steps == [s for s in steps for _ in range(2)], "two rollouts per step, each step once"
    md = (out / "report.md").read_text()
    assert f"Step {cut + 2} of {cut + 2}" in md, "the report agrees with metrics.jsonl"


@pytest.mark.slow
def test_second_writer_is_refused_with_the_owner(tmp_path, tiny_ckpt, shapes_file):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out, tiny_ckpt, shapes_file, "--max-steps", "40"), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "run.lock").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, f"the first run ended: {proc.stderr.read()[-1500:]}"
        second = subprocess.run(_cmd(out, tiny_ckpt, shapes_file, "--max-steps", "2", "--overwrite"), cwd=ROOT,
                                env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode != 0 and f"in use by pid {proc.pid} on {socket.gethostname()}" in second.stderr, \
            second.stderr[-1000:]
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_ranks_exit_when_the_launcher_is_killed(tmp_path, tiny_ckpt, shapes_file):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *_cmd(
        out, tiny_ckpt, shapes_file, "--max-steps", "200")[1:]]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not ((out / "metrics.jsonl").exists() and _steps(out)):
            time.sleep(0.5)
        ranks = [int(p) for p in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                                text=True).stdout.split()]
        assert len(ranks) == 2, f"torchrun's ranks: {ranks}"
        launcher.kill()  # kill -9 on the launcher
        launcher.wait()
        deadline = time.time() + 30
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() and "Z" not in Path(
                f"/proc/{p}/stat").read_text().split()[2] for p in ranks):
            time.sleep(0.5)
        alive = [p for p in ranks if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]]
        assert not alive, f"ranks {alive} outlived their launcher by 30 s"
    finally:
        for p in subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split():
            os.kill(int(p), signal.SIGKILL)


# -----------------------------------------------------------------------------
# the judge: probed at start, watched during the run

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _judge_flags(url):
    return ["--judge", "openai", "--judge-base-url", url, "--judge-model", "m", "--judge-timeout", "2",
            "--judge-retries", "1"]


def test_refused_judge_url_stops_before_the_first_step(tmp_path, tiny_ckpt, shapes_file):
    port = _free_port()
    proc = subprocess.run(_cmd(tmp_path / "run", tiny_ckpt, shapes_file, "--max-steps", "2", *_judge_flags(
        f"http://127.0.0.1:{port}/v1")), cwd=ROOT, env={**ENV, "OPENAI_API_KEY": "sk-secret-123"},
        capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert f"127.0.0.1:{port}" in line and "refused" in line.lower(), line
    assert "sk-secret" not in proc.stderr + proc.stdout, "the API key must not be printed"
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "no step may run"


@pytest.mark.slow
def test_judge_failing_mid_run_stops_at_the_threshold(tmp_path, tiny_ckpt, shapes_file):
    server = ChatServer()
    server.inject("Image facts", *["500"] * 1000)  # judge requests fail; the start-up probe does not carry facts
    try:
        with pytest.raises(SystemExit, match=r"step 1: the judge failed on 100% of the rollouts .* stopped before its"):
            grpo.main(_cmd(tmp_path, tiny_ckpt, shapes_file, "--max-steps", "3", *_judge_flags(server.base_url))[2:])
        assert not (tmp_path / "metrics.jsonl").exists(), "no update and no row from ungraded rewards"
    finally:
        server.close()


def test_judge_failures_below_the_threshold_are_a_warning(tmp_path, capsys):
    row = {"step": 3, "reward": 0.5, "reward/fmt": 1.0, "reward/ans": 0.5, "reward/vis": 1.0, "entropy": 0.2,
           "adv_std": 0.5, "zero_var_groups": 0.5, "kl": 0.01, "clip_frac": 0.0, "completion_len": 40.0,
           "judge/failed": 0.125, "judge/gated_zero": 0.0, "t_rollout": 1.0, "t_reward": 0.1, "t_train": 1.0}
    args = types.SimpleNamespace(max_steps=5, judge_max_failed=0.2, log_rollouts_every=0, report_to=["none"])
    logger = report.RunLogger(["none"], tmp_path, args)
    report.log_step(row, [], torch.zeros(0), args, 2, logger, [])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step 3/5 |") and "judge failed 0.12" in out[0]
    assert out[1] == ("  warning: the judge failed on 12% of this step's rollouts (scored as no preference; the run "
                      "stops above --judge-max-failed 0.2)"), out
    assert "Warning: the judge failed** on 1 of 1 steps, up to 12%" in report.run_report(tmp_path)[0].read_text()
    row["judge/failed"] = 0.0
    report.log_step(row, [], torch.zeros(0), args, 3, logger, [])
    assert "warning" not in capsys.readouterr().out, "no failure, no warning"


def test_refused_start_with_overwrite_deletes_nothing_and_wandb_marker_survives(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-000004").mkdir()
    (out / "latest").write_text("checkpoint-000004")
    (out / "wandb_id.txt").write_text("run-old")
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward": s}) + "\n" for s in range(1, 7)))
    report.claim_run_folder(out, overwrite=True)  # the claim alone deletes nothing: a later refusal keeps the run
    assert (out / "checkpoint-000004").exists() and (out / "metrics.jsonl").exists()
    # a resume from step 4 whose start then fails: W&B still has steps 5-6, the next resume must know it
    assert report.trim_run_logs(out, 4) == 6
    assert report.trim_run_logs(out, 4) == 6, "the second resume still sees the steps W&B kept"
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    report.RunLogger(["wandb"], out, types.SimpleNamespace(wandb_project="p"), start=4, logged=6)
    assert fake.inits[-1]["id"] != "run-old" and [s for _, s, _ in fake.logged] == [1, 2, 3, 4]
    assert not (out / "wandb_past_step.txt").exists(), "replayed once"
