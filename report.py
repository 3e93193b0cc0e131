"""PaLMR run and study reports: what a training run or a study left on disk, read back as markdown and charts.
It owns the report of one training run (OUT/report.md, OUT/report.png from OUT/metrics.jsonl and OUT/args.json),
the GRPO-vs-PaLMR study's table and curves (OUT/results.md, OUT/curves.png, OUT/curves_long.png from
OUT/eval/results.json and OUT/<variant>-s<seed>/metrics.jsonl), and RunLogger, which writes the trainer's
metrics.jsonl and rollouts.jsonl and mirrors them to TensorBoard / W&B, with the trainer's step metrics
(step_metrics), its step line (log_step) and its run folder (one owner, logs cut back on resume:
open_run_folder). It loads no model and reads no benchmark (that is eval.py).

    python grpo.py --report --out DIR      # DIR/report.md + DIR/report.png (also written at the end of every run)
    python report.py run DIR               # the same, from this file
    python eval.py --study-report DIR      # runs/shapes_study.sh's DIR/results.md + DIR/curves.png
    python report.py study DIR             # the same, from this file

Charts need matplotlib (requirements-report.txt); without it they are skipped with a message and the markdown
is still written. Imports: palmr only, of this project (palmr <- report <- grpo, eval).
"""
import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

import palmr


# -----------------------------------------------------------------------------
# The report of one training run (grpo.py writes it at the end; `python grpo.py --report --out DIR`)

REPORT_PANELS = [  # (title, [(metric, label)]): the metrics a panel plots, when the run logged them
    ("reward and its parts", [("reward", "reward"), ("reward/fmt", "S_fmt"), ("reward/ans", "S_ans"),
                              ("reward/vis", "S_vis"), ("reward/perc", "PEARL checklist")]),
    ("gated share", [("judge/gated_zero", "S_vis = 0"), ("pearl/gated", "PEARL gate closed"),
                     ("judge/hallucinated_correct", "right answer, misread scene"), ("judge/failed", "judge failed")]),
    ("KL to the reference policy", [("kl", "k3 KL")]),
    ("entropy", [("entropy", "token entropy")]),
    ("completion length", [("completion_len", "tokens")]),
    ("step time per phase", [("t_rollout", "rollout"), ("t_reward", "reward"), ("t_train", "train")]),
]


def read_metrics(out):
    """metrics.jsonl of a run folder -> rows in step order (a resumed run's repeated steps: the last row)."""
    path = Path(out) / "metrics.jsonl"
    rows = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a torn last line of a running or killed run
        if "reward" in r:  # a training row (with its validation, if any) replaces an earlier run of that step
            rows[r.get("step", 0)] = r
        else:  # a validation-only row (--eval-before-train's step 0)
            rows.setdefault(r.get("step", 0), {}).update(r)
    return [rows[k] for k in sorted(rows)]


def run_report(out):
    """OUT/report.md (the final numbers, validation, the run's arguments) and OUT/report.png (reward parts,
    gated shares, KL, entropy, completion length, step time per phase, validation curves) from
    OUT/metrics.jsonl and OUT/args.json; works on a finished or a running run. -> (md path, png path or None)."""
    out = Path(out)
    rows = read_metrics(out)
    train = [r for r in rows if "reward" in r]
    args = json.loads((out / "args.json").read_text()) if (out / "args.json").exists() else {}
    counts = ("/n", "/missing_images", "/missing_predictions", "/text_only", "/hallucination_n",
              "/hallucination_failed", "/claims_per_reply")  # bookkeeping, not scores: left out of the report
    val_keys = sorted({k for r in rows for k in r if k.startswith("val/") and isinstance(r[k], (int, float))
                       and not k.endswith(counts)})
    md = [f"# Run report: {out}", ""]
    if not rows:
        md.append("No steps logged yet.")
    if train:
        last, tail = train[-1], train[-5:]
        md += [f"Step {last['step']} of {args.get('max_steps', '?')}. Last step, and the mean of the last "
               f"{len(tail)} steps:", "", "| metric | last | mean |", "|---|---|---|"]
        for _, series in REPORT_PANELS:
            for key, label in series:
                if key in last:
                    mean = statistics.mean(r[key] for r in tail if key in r)
                    md.append(f"| {label} (`{key}`) | {last[key]:.4g} | {mean:.4g} |")
    failing = [r for r in train if r.get("judge/failed", 0) > 0]
    if failing:  # a failed item passes the gate ungraded: those steps' rewards are partly plain GRPO's
        worst = max(failing, key=lambda r: r["judge/failed"])
        md[2:2] = [f"**Warning: the judge failed** on {len(failing)} of {len(train)} steps, up to "
                   f"{worst['judge/failed']:.0%} of the rollouts (step {worst['step']}); those rollouts were scored "
                   "as no preference (S_vis = 1).", ""]
    if val_keys:
        md += ["", "Validation (greedy):", "", "| step | " + " | ".join(k[4:] for k in val_keys) + " |",
               "|---" * (len(val_keys) + 1) + "|"]
        for r in rows:
            if any(k in r for k in val_keys):
                md.append(f"| {r.get('step', 0)} | " + " | ".join(
                    f"{r[k]:.4g}" if isinstance(r.get(k), (int, float)) else "-" for k in val_keys) + " |")
    if args:
        md += ["", "Arguments:", "", "| argument | value |", "|---|---|"]
        md += [f"| {k} | {json.dumps(v)[:120]} |" for k, v in sorted(args.items()) if k != "versions"]
        if args.get("versions"):
            md += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in args["versions"].items())]
    png = None
    plt = palmr.pyplot()
    if plt is not None and train:
        panels = [(t, [(k, lab) for k, lab in series if any(k in r for r in train)]) for t, series in REPORT_PANELS]
        panels = [p for p in panels if p[1]]
        if val_keys:
            panels.append(("validation (greedy)", [(k, k[4:]) for k in val_keys]))
        cols = 3
        fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(4.4 * cols, 3.2 * ((len(panels) + cols - 1) // cols)),
                                 squeeze=False)
        for ax, (title, series) in zip(axes.flat, panels):
            for key, label in series:
                pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
                if pts:
                    ax.plot(*zip(*pts), marker="o" if len(pts) < 12 else None, markersize=3, label=label)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_ylabel("seconds" if title.startswith("step time") else "tokens" if "length" in title
                          else "%" if title.startswith("validation") else "value")
            ax.grid(alpha=0.3)
            if len(series) > 1:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"{out.name}: {args.get('reward', '?')} reward, {len(train)} steps", fontsize=11)
        fig.tight_layout()
        png = out / "report.png"
        fig.savefig(png, dpi=90)
        plt.close(fig)
        md[1:1] = ["", "![report](report.png)"]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return out / "report.md", png


# -----------------------------------------------------------------------------
# The GRPO-vs-PaLMR study on shapes (runs/shapes_study.sh): table over seeds and training curves

STUDY_METRICS = [("acc", "answer acc"), ("perception_acc", "perception acc"), ("perception_complete", "complete perception"),
           ("claims_per_reply", "claims / reply"), ("hallucination_rate", "hallucination rate")]
STUDY_COLORS = {"grpo": (214, 96, 40), "palmr": (40, 110, 200), "palmr+omissions": (40, 160, 80),
                "palmr+token": (150, 70, 180), "palmr+both": (120, 120, 120), "vppo": (200, 160, 0),
                "vision_sr1": (0, 170, 170), "pearl": (200, 60, 130), "vision_sr1+sft": (90, 90, 220)}


def mean_sd(values):
    values = [v for v in values if v is not None]  # (older results.json files lack the newer metrics)
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def study_runs(results):
    """{variant: {seed: label}} from checkpoint labels `<variant>-s<seed>` (a variant may read `palmr@80`),
    variants in order of appearance; `start` is not a run."""
    runs = {}
    for label in results:
        variant, sep, seed = label.rpartition("-s")
        if sep and seed.isdigit():
            runs.setdefault(variant, {})[int(seed)] = label
    return runs


def study_table(results, seeds=None):
    """Markdown: start, then each variant's mean ± sd over seeds, then every seed's own row."""
    shapes = {name: r["shapes"] for name, r in results.items()}
    runs = study_runs(results)
    lines = ["| run | seeds | " + " | ".join(label for _, label in STUDY_METRICS) + " |",
             "|---|---|" + "---|" * len(STUDY_METRICS)]
    lines.append("| start (warm-up) | - | " + " | ".join(mean_sd([shapes["start"][k]]) for k, _ in STUDY_METRICS) + " |")
    if "start_sr1" in shapes:  # the Vision-SR1-format warm start, evaluated under its own prompt
        lines.append("| start (SR1-format warm-up) | - | " + " | ".join(mean_sd([shapes["start_sr1"][k]])
                                                                      for k, _ in STUDY_METRICS) + " |")
    for variant, by_seed in runs.items():
        rs = [shapes[label] for s, label in sorted(by_seed.items()) if seeds is None or s in seeds]
        lines.append(f"| **{variant}** | {len(rs)} | " + " | ".join(mean_sd([r[k] for r in rs]) for k, _ in STUDY_METRICS) + " |")
    for variant, by_seed in runs.items():
        for s, label in sorted(by_seed.items()):
            if seeds is None or s in seeds:
                lines.append(f"| {variant} seed {s} | 1 | " + " | ".join(mean_sd([shapes[label][k]]) for k, _ in STUDY_METRICS) + " |")
    return "\n".join(lines)


def study_curves(out, seeds, smooth=5, variants=("grpo", "palmr"), steps=None):
    """{variant: {series: [per-step mean over seeds, moving average over `smooth` steps]}} from
    OUT/<variant>-s<seed>/metrics.jsonl (`palmr@80` reads palmr's runs), the last row per step (a resumed
    run may repeat steps), up to `steps` and the shortest run's length."""
    series = {}
    for variant in variants:
        per_seed = []
        for s in seeds:
            path = out / f"{variant.split('@')[0]}-s{s}" / "metrics.jsonl"
            if not path.exists():
                continue
            by_step = {r["step"]: r for r in map(json.loads, filter(str.strip, path.read_text().splitlines()))
                       if "reward" in r}  # training rows (a --eval-before-train row has only val/*)
            rows = [by_step[k] for k in sorted(by_step) if steps is None or k <= steps]
            per_seed.append({"reward": [r["reward"] for r in rows],
                             "answer acc (rollouts)": [r["reward/ans"] for r in rows],
                             # share of correct rollouts whose reasoning misreads the scene (rule judge)
                             "hallucination rate (rollouts)": [r["judge/hallucinated_correct"] / max(r["reward/ans"], 1e-9)
                                                               for r in rows]})
        if not per_seed:
            continue
        n = min(len(p["reward"]) for p in per_seed)
        series[variant] = {}
        for key in per_seed[0]:
            mean = [statistics.mean(p[key][i] for p in per_seed) for i in range(n)]
            series[variant][key] = [statistics.mean(mean[max(0, i - smooth + 1):i + 1]) for i in range(n)]
    return series


def _study_color(variant):
    return STUDY_COLORS.get(variant.split("@")[0], (0, 0, 0))


def study_plot(series, path):
    """One panel per series (reward, rollout accuracy, rollout hallucination rate), a line per variant, steps
    on x (matplotlib; skipped with a message when it is not installed). -> path, or None."""
    plt = palmr.pyplot()
    if plt is None:
        return None
    keys = list(next(iter(series.values())))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for variant, s in series.items():
            ax.plot(range(1, len(s[key]) + 1), s[key], color=[c / 255 for c in _study_color(variant)], label=variant)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean over seeds (moving average)")
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def study_report(out):
    """runs/shapes_study.sh: OUT/results.md (start, mean ± sd per variant over seeds, each seed, the versions)
    and OUT/curves.png (OUT/curves_long.png for the `<variant>@<steps>` runs) from OUT/eval/results.json
    (checkpoints `start` and `<variant>-s<seed>`) and OUT/<variant>-s<seed>/metrics.jsonl."""
    out = Path(out)
    report = json.loads((out / "eval" / "results.json").read_text())
    results = report["checkpoints"]
    if (out / "eval_sr1" / "results.json").exists():  # checkpoints trained in Vision-SR1's format, its own prompt
        results.update(json.loads((out / "eval_sr1" / "results.json").read_text())["checkpoints"])
    runs = study_runs(results)
    md = ["# GRPO vs PaLMR on shapes (held-out split, greedy; mean ± sd over seeds)", "", study_table(results), "",
          "Perception acc: % of replies with at least one scene claim and no wrong one. Complete perception: no "
          "wrong claim and every group of the scene stated with its count (saying less cannot score it). "
          "Hallucination rate: % of correct answers whose reasoning misreads the scene. All exact (rule judge). "
          "`<variant>@<N>`: the same runs continued to N steps.", ""]
    if report.get("versions"):
        md += ["Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    for name, variants in (("curves.png", [v for v in runs if "@" not in v]), ("curves_long.png", [v for v in runs if "@" in v])):
        series = {}
        for v in variants:  # a variant's curve: the seeds it ran with, up to its checkpoints' step
            steps = [re.search(r"checkpoint-(\d+)", str(results[label].get("path", ""))) for label in runs[v].values()]
            cut = min((int(m.group(1)) for m in steps if m), default=None)
            series.update(study_curves(out, sorted(runs[v]), variants=[v], steps=cut))
        if series and study_plot(series, out / name):
            md.append(f"![curves]({name})")
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


# -----------------------------------------------------------------------------
# The run folder: one owner, no row written twice (issue 25)

RUN_OUTPUTS = ("metrics.jsonl", "rollouts.jsonl", "latest", "args.json", "report.md", "report.png", "wandb_id.txt",
               "wandb_past_step.txt", "tb", "wandb", "val")  # what --overwrite removes, with checkpoint-*


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def claim_run_folder(out, resume=False, overwrite=False):
    """Make OUT this process's run folder (rank 0): OUT/run.lock holds {pid, host, started} until exit.

    Refused, SystemExit with one line: a folder another live run writes (its pid and host named; a lock left by a
    dead process on this host is taken over), and a fresh run into a folder that holds a run unless `overwrite`
    (clear_run_folder removes it later, once every check has passed) or `resume`. -> the lock's path.
    Known limits: a pid is only checked on this host (a lock from a dead run on another host is refused until
    deleted; containers sharing a host name but not pids can look dead), and two runs taking over one stale
    lock at the same instant can both pass; an flock held for the run's life would close both."""
    import atexit
    import socket
    import time
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock, host = out / "run.lock", socket.gethostname()
    if lock.exists():
        try:
            owner = json.loads(lock.read_text())
        except ValueError:
            owner = {}  # a lock torn by a crash mid-write: nobody owns it
        pid = int(owner.get("pid", 0))
        mine_or_dead = owner.get("host") == host and (pid == os.getpid() or not _alive(pid))
        if owner and not mine_or_dead:  # (mine: an earlier run of this process, e.g. grpo.main called twice)
            raise SystemExit(f"{out} is in use by pid {owner.get('pid')} on {owner.get('host')} (since "
                             f"{owner.get('started')}): wait for that run, or delete {lock} if it is gone")
        lock.unlink(missing_ok=True)  # stale: its process is gone
    held = [p.name for p in [out / "metrics.jsonl", out / "latest", *sorted(out.glob("checkpoint-*"))] if p.exists()]
    if held and not resume and not overwrite:
        raise SystemExit(f"{out} holds a run ({', '.join(held[:3])}): " + ("--resume continues it, " if (
            out / "latest").exists() else "it has no checkpoint to resume from, ") + "--overwrite replaces it, "
            "or pick another --out")
    try:  # O_EXCL: of two runs starting at once, one gets the lock
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise SystemExit(f"{out} is being claimed by another run right now: pick another --out") from None
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)

    def release():  # at exit, also on SystemExit and Ctrl-C; a SIGKILLed run leaves a stale lock (taken over)
        try:
            if json.loads(lock.read_text()).get("pid") == os.getpid():
                lock.unlink()
        except (OSError, ValueError):
            pass
    atexit.register(release)
    return lock


def clear_run_folder(out):
    """--overwrite: remove the run that OUT holds (its logs, TensorBoard and W&B files, validation predictions and
    checkpoints). Called once every check has passed (start_logger), so a refused start deletes nothing."""
    import shutil
    out = Path(out)
    for p in [*(out / name for name in RUN_OUTPUTS), *out.glob("checkpoint-*"), *out.glob(".checkpoint-*")]:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def trim_run_logs(out, step):
    """Cut OUT/metrics.jsonl and OUT/rollouts.jsonl back to the rows of steps <= `step` (a resumed run logs the
    later ones again), each by an atomic replace; a torn last line goes too. -> the last step the files held
    before (so the logger knows whether W&B already has steps past `step`)."""
    last = 0
    for name in ("metrics.jsonl", "rollouts.jsonl"):
        path = Path(out) / name
        if not path.exists():
            continue
        kept = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            last = max(last, int(row.get("step", 0)))
            if int(row.get("step", 0)) <= step:
                kept.append(line)
        tmp = path.with_name(name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, path)
    past = Path(out) / "wandb_past_step.txt"  # W&B keeps steps the files no longer have: RunLogger replays once
    last = max(last, int(past.read_text()) if past.exists() else 0)
    if last > step and (Path(out) / "wandb_id.txt").exists():
        past.write_text(str(last))  # survives a resume that fails before its logger starts
    return last


def open_run_folder(out, resume=False, overwrite=False, start=0):
    """Rank 0 claims OUT (claim_run_folder) and, resuming from the checkpoint of step `start`, cuts its logs back
    to that step (trim_run_logs); a refusal stops every rank, with rank 0's one line. -> the last step the logs
    held before the cut (0 on a fresh run), for RunLogger, on rank 0 (0 elsewhere)."""
    def claim():
        claim_run_folder(out, resume, overwrite)
        return trim_run_logs(out, start) if resume else 0
    return palmr.rank0_or_stop(claim) or 0


# -----------------------------------------------------------------------------
# The trainer's step metrics and step line; metrics.jsonl / rollouts.jsonl, mirrored to TensorBoard / W&B
# (grpo.py --report-to; README "Watching a run")


class RunLogger:
    """Rank 0's writer of OUT/metrics.jsonl and OUT/rollouts.jsonl, mirrored to TensorBoard (OUT/tb) and/or
    Weights & Biases when --report-to asks. The packages are
    optional: a missing one stops the run at start with the command that installs it. W&B runs offline
    (files under OUT/wandb, no account) unless WANDB_MODE or WANDB_API_KEY says otherwise; its key is read
    by wandb itself from the environment and never passes through here. The arguments hold environment
    variable names (--judge-api-key-env), never their values."""

    def __init__(self, targets, out, args, start=0, logged=0):
        self.tb = self.wandb = None
        self.out = Path(out)
        targets = [t for t in targets if t != "none"]
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None), list))}
        if "tensorboard" in targets:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise SystemExit(f"--report-to tensorboard needs the tensorboard package ({e}): "
                                 "pip install -r requirements-report.txt") from None
            # a resumed run drops the events after its checkpoint's step (they are logged again)
            self.tb = SummaryWriter(log_dir=str(Path(out) / "tb"), purge_step=start + 1 if start else None)
            if not start:
                self.tb.add_text("args", "\n".join(f"    {k}: {json.dumps(v)}" for k, v in sorted(config.items())), 0)
                self.tb.add_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                     for k, v in config.items()}, {}, run_name=".")
        if "wandb" in targets:
            try:
                import wandb
            except ImportError:
                raise SystemExit("--report-to wandb needs the wandb package: pip install wandb") from None
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            # One W&B run per run folder: a --resume continues it. But W&B keeps a run's history and drops any
            # row whose step is not above the last one it has (its "step must be monotonically increasing"
            # warning), so a resume from a checkpoint older than the last logged step would keep the dead
            # run's rows for those steps. Then the resume opens a new W&B run and replays the rows
            # metrics.jsonl kept (each step once). W&B's rewind (resume_from) needs the server: not offline.
            id_file = Path(out) / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else None
            replay = bool(start and run_id and logged > start)
            if run_id is None or replay:
                run_id = f"{Path(out).name}-{os.urandom(4).hex()}"
            id_file.write_text(run_id)
            self.wandb = wandb
            self.run = wandb.init(project=args.wandb_project, name=Path(out).name, dir=str(out), config=config,
                                  mode=mode, id=run_id, resume="allow")
            if replay:
                for row in read_metrics(out):
                    wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(
                        v, bool) and k != "step"}, step=row.get("step", 0))
            (Path(out) / "wandb_past_step.txt").unlink(missing_ok=True)

    def log(self, metrics, step):
        """One row of OUT/metrics.jsonl (appended), mirrored to TensorBoard / W&B."""
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "step"}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def rollouts(self, records, step):
        """A few decoded rollouts [{step, id, question, answer, completion, reward}]: appended to OUT/rollouts.jsonl,
        printed, mirrored to TensorBoard / W&B."""
        with open(self.out / "rollouts.jsonl", "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
                print(f"  [{r['id']}] Q: {r['question']} | gold {r['answer']} | R {r['reward']:.2f}\n"
                      f"  > {r['completion'][:300]!r}")
        if self.tb is not None:
            self.tb.add_text("rollouts", "\n\n".join(
                f"**{r['id']}** Q: {r['question']} | gold {r['answer']} | R {r['reward']:.2f}\n\n    {r['completion']}"
                for r in records), step)
        if self.wandb is not None:
            table = self.wandb.Table(columns=["id", "question", "answer", "completion", "reward"])
            for r in records:
                table.add_data(r["id"], r["question"], r["answer"], r["completion"], r["reward"])
            self.wandb.log({"rollouts": table}, step=step)

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.run.finish()


def step_metrics(rows, encoded, rewards, parts, judge_stats, located, all_adv, all_rewards, args, hooks, world):
    """The step's metrics, means over the global batch of reasoning rows (a method's extra groups are its own):
    every rank reduces the same keys, so call it on every rank."""
    import torch
    lengths = torch.tensor([float(len(c.token_ids)) for _, c in rows])
    local = {"reward": rewards.sum(), **{f"reward/{k}": v.sum() for k, v in parts.items()},
             "completion_len": lengths.sum(),
             "prompt_len": torch.tensor(float(sum(len(encoded[s.id]["input_ids"]) for s, _ in rows))),
             "image_patches": torch.tensor(float(sum(encoded[s.id]["pixel_values"].shape[0] for s, _ in rows))),
             "finished": torch.tensor(float(sum(c.finished for _, c in rows))),
             "judge/failed": torch.tensor(float(judge_stats["failed"])), "judge/ties": torch.tensor(float(judge_stats["ties"])),
             "judge/gated_zero": (parts["vis"] == 0).float().sum(),
             "judge/hallucinated_correct": ((parts["vis"] == 0) & (parts["ans"] == 1)).float().sum(),
             "credit/located": torch.tensor(float(sum(bool(sp) for sp in located))),  # rollouts with a located error
             "judge/unmatched": torch.tensor(float(judge_stats.get("unmatched", 0)))}
    for h in hooks:  # decided by flags: every rank reduces the same keys
        local.update(h.metrics(rows, parts))
    metrics = {k: float(palmr.all_reduce(v.double().clone())) / (len(rows) * world) for k, v in local.items()}
    if args.judge in ("openai", "hf"):  # decided by flags, never by this rank's stats: every rank reduces
        sums = palmr.all_reduce(torch.tensor([judge_stats.get(k, 0) for k in ("latency_sum", "sent", "tokens", "cache_hits",
                                                                               "failovers")], dtype=torch.float64))
        metrics.update({"judge/latency": float(sums[0] / sums[1].clamp(min=1)), "judge/tokens": float(sums[2]),
                        "judge/cache_hits": float(sums[3]), "judge/failovers": float(sums[4])})
    for h in hooks:
        h.finish_metrics(metrics)
    groups = all_rewards.view(-1, args.group_size)
    metrics.update(adv_std=float(all_adv.std()), zero_var_groups=float((groups.std(dim=1) == 0).float().mean()))
    return metrics


def log_step(m, rows, rewards, args, step, logger, hooks):
    """Rank 0: the step's metrics (report.RunLogger: metrics.jsonl, TensorBoard/W&B), the step line, and every
    --log-rollouts-every steps a few rollouts."""
    logger.log(m, step + 1)
    print(f"step {step + 1}/{args.max_steps} | reward {m['reward']:.3f} (fmt {m['reward/fmt']:.2f} "
          f"ans {m['reward/ans']:.2f} vis {m['reward/vis']:.2f}" + "".join(h.step_line(m) for h in hooks)
          + f") | ent {m['entropy']:.2f} adv_std {m['adv_std']:.2f} zero_var {m['zero_var_groups']:.2f} | kl "
          f"{m['kl']:.4f} clip {m['clip_frac']:.3f} | len {m['completion_len']:.1f} | judge failed "
          f"{m['judge/failed']:.2f} gated {m['judge/gated_zero']:.2f} | gen {m['t_rollout']:.1f}s rew "
          f"{m['t_reward']:.1f}s train {m['t_train']:.1f}s", flush=True)
    if m.get("judge/failed", 0) > 0:  # failed items pass the gate ungraded (S_vis 1): the reward is partly GRPO's
        print(f"  warning: the judge failed on {m['judge/failed']:.0%} of this step's rollouts (scored as no "
              f"preference; the run stops above --judge-max-failed {getattr(args, 'judge_max_failed', 0.2):g})", flush=True)
    if any(k.startswith("val/") for k in m):
        print("  validation: " + " ".join(f"{k} {v:.3g}" for k, v in m.items()
                                          if k.endswith(("/acc", "/hallucination_rate", "/perception_acc"))))
    if args.log_rollouts_every and (step + 1) % args.log_rollouts_every == 0:
        logger.rollouts([{"step": step + 1, "id": s.id, "question": s.question, "answer": s.answer, "completion":
                          c.text, "reward": r} for (s, c), r in list(zip(rows, rewards.tolist()))[:2]], step + 1)


def report_args(ap):
    """The flags of watching a run, for grpo.py's parser."""
    g = ap.add_argument_group("watching a run (report.py)")
    g.add_argument("--report-to", nargs="+", default=["none"], choices=["none", "tensorboard", "wandb"],
                   help="also log every metric, the arguments and a few rollouts to TensorBoard (OUT/tb) and/or "
                   "Weights & Biases (offline unless WANDB_API_KEY or WANDB_MODE says otherwise); optional "
                   "packages: pip install -r requirements-report.txt / pip install wandb")
    g.add_argument("--wandb-project", default="palmr", help="W&B project name")
    g.add_argument("--report", action="store_true", help="only write OUT/report.md and OUT/report.png for the "
                   "run in --out (finished or running) and exit")


def check_packages(targets):
    """Stop (every rank, before any model loads) when --report-to names a package that is not installed."""
    import importlib.util
    for target in ("tensorboard", "wandb"):
        if target in targets and importlib.util.find_spec(target) is None:
            raise SystemExit(f"--report-to {target} needs the {target} package: " + (
                "pip install -r requirements-report.txt" if target == "tensorboard" else "pip install wandb"))


def start_logger(args, out, rank, start, logged=0):
    """OUT/args.json and the RunLogger on rank 0 (None elsewhere); a logger that fails there stops every rank.
    logged: the last step the run folder held before a resume (trim_run_logs)."""
    import torch
    import torch.distributed as dist
    logger, ok = None, 1
    if rank == 0:
        if getattr(args, "overwrite", False) and not start:
            clear_run_folder(out)
        (Path(out) / "args.json").write_text(json.dumps({**vars(args), "versions": palmr.versions()}, indent=2))
        try:
            logger = RunLogger(args.report_to, out, args, start, logged)
        except (Exception, SystemExit) as e:  # noqa: BLE001 -- every rank must stop, not rank 0 alone
            print(f"--report-to: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            ok = 0
    if not int(palmr.all_reduce(torch.tensor(ok), dist.ReduceOp.MIN)):
        raise SystemExit("--report-to failed on rank 0 (above)")
    return logger


# -----------------------------------------------------------------------------
# Command line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="DIR/report.md and DIR/report.png of a training run folder, finished or running"
                   ).add_argument("out", metavar="DIR")
    sub.add_parser("study", help="runs/shapes_study.sh's DIR/results.md and DIR/curves.png from its runs"
                   ).add_argument("out", metavar="DIR")
    a = ap.parse_args(argv)
    if a.command == "run":
        md, png = run_report(a.out)
        print(f"{md}" + (f", {png}" if png else ""))
        return md, png
    return study_report(a.out)


if __name__ == "__main__":
    main()
