"""Dynamic sampling (DAPO, arXiv 2503.14476, section 3.2): a group whose rewards all tie has a zero group-normalised
advantage and carries no gradient, so it is replaced by groups of fresh prompts whose rewards differ.

    python grpo.py --dynamic-sampling [--dynamic-sampling-tries 4]

Where it comes from: DAPO keeps sampling "until the batch is fully filled with samples whose accuracy is neither 0
nor 1"; verl's recipe (`algorithm.filter_groups`: `metric`, `max_num_gen_batches`) keeps the groups whose metric has
a non-zero std and generates more batches until the train batch is full, stopping with an error after
`max_num_gen_batches`; EasyR1's `online_filtering` is the same filter. Our rules:
- the metric is the step's own reward (the gated PaLMR reward by default, judge included), through run.score;
- a try rolls out, on every rank, as many fresh prompts as the rank that lacks most still lacks (the same
  run.rollout calls everywhere: engines and FSDP generate together), drawn from the training items not in the step
  yet, by a seed of (seed, step, rank, try): a resumed run redraws the same;
- when --dynamic-sampling-tries run out, the rank's batch is filled with tied groups in the order they were
  drawn (verl stops the run instead): every rank ends with its usual number of prompts, and a step never trains
  on fewer;
- groups keep their order: the step's informative groups, then the redrawn ones, then any tied filler.
Tie detection reads the loop's reward without other methods' signals, so a scheme that needs them (Vision-SR1,
PEARL) is refused. The redraw's time (rollouts and scoring) is part of t_rollout and logged as t_dynamic_sampling;
the loop then scores the kept rows again (an LLM judge answers those from its cache).
"""
import time

import numpy as np
import torch
import torch.distributed as dist

import palmr
from variants.base import Variant

NEEDS_SIGNALS = ("vision_sr1", "pearl")  # schemes whose reward needs an after_rollout signal run.score lacks


def split_groups(samples, rows, rewards, group_size):
    """-> (informative, tied): [(sample, its G rows)] each, in order; a group is tied when all its rewards are equal.
    rows (len(samples) * G), rewards (len(samples) * G,)."""
    assert len(rows) == len(samples) * group_size == rewards.numel(), "rows must be G per sample"
    informative, tied = [], []
    for k, s in enumerate(samples):
        r = rewards[k * group_size:(k + 1) * group_size]
        (tied if bool((r == r[0]).all()) else informative).append((s, rows[k * group_size:(k + 1) * group_size]))
    return informative, tied


def fresh_prompts(items, exclude, n, key):
    """n items whose ids are not in `exclude`, drawn without replacement by the seed `key` (fewer when fewer exist)."""
    candidates = [s for s in items if s.id not in exclude]
    order = np.random.default_rng(key).permutation(len(candidates))[:n]
    return [candidates[i] for i in order]


class DynamicSampling(Variant):
    """--dynamic-sampling: tied groups redrawn until the rank's batch holds informative groups only, or tries run out."""
    name = "dynamic_sampling"
    resume_keys = ("dynamic_sampling", "dynamic_sampling_tries")

    @staticmethod
    def add_args(ap):
        g = ap.add_argument_group("dynamic sampling (variants/dynamic_sampling.py)")
        g.add_argument("--dynamic-sampling", action="store_true",
                       help="DAPO's dynamic sampling: groups whose rewards all tie are replaced by fresh prompts' groups")
        g.add_argument("--dynamic-sampling-tries", type=int, default=4,
                       help="dynamic sampling: rounds of extra rollouts per step at most (then tied groups fill in)")

    @staticmethod
    def is_active(args):
        return args.dynamic_sampling

    def check(self, world):
        if self.args.dynamic_sampling_tries < 1:
            raise SystemExit("--dynamic-sampling-tries must be >= 1")
        if self.args.reward in NEEDS_SIGNALS:
            raise SystemExit(f"--dynamic-sampling with --reward {self.args.reward}: its reward needs a method's "
                             "signals, which the redraw's scoring does not have")

    def redraw(self, run, samples, rows, encoded):
        start, g, want = time.time(), run.args.group_size, len(samples)
        informative, tied = split_groups(samples, rows, run.score(rows), g)
        drawn, tries, seen = want, 0, {s.id for s in samples}
        while tries < self.args.dynamic_sampling_tries:
            lacking = int(palmr.all_reduce(torch.tensor(max(0, want - len(informative))), dist.ReduceOp.MAX))
            if lacking == 0:  # every rank is full
                break
            tries += 1
            batch = fresh_prompts(run.samples, seen, lacking, [run.args.seed, run.step, run.rank, tries])
            if len(batch) < lacking:
                raise RuntimeError(f"dynamic sampling at step {run.step + 1}: {len(batch)} training items left to "
                                   f"draw, {lacking} needed (a larger --data, or fewer --dynamic-sampling-tries)")
            new_rows, new_encoded = run.rollout(batch, seed_offset=104_729 * tries)
            more, more_tied = split_groups(batch, new_rows, run.score(new_rows), g)
            informative, tied, encoded = informative + more, tied + more_tied, {**encoded, **new_encoded}
            drawn, seen = drawn + len(batch), seen | {s.id for s in batch}
        chosen = (informative + tied)[:want]
        self.last = {"drawn": drawn, "want": want, "tries": tries, "seconds": time.time() - start,
                     "informative": {id(c) for _, group in chosen[:len(informative)] for _, c in group}}
        return ([s for s, _ in chosen], [row for _, group in chosen for row in group],
                {s.id: encoded[s.id] for s, _ in chosen})

    def metrics(self, rows, parts):
        # the loop divides each sum by the global number of rows: per-row values give global means and ratios
        n, last = len(rows), self.last
        return {"ds/informative": torch.tensor(float(sum(id(c) in last["informative"] for _, c in rows))),
                "ds/drawn": torch.tensor(last["drawn"] / last["want"] * n),  # groups drawn per group trained
                "ds/tries": torch.tensor(float(last["tries"] * n)), "t_dynamic_sampling": torch.tensor(last["seconds"] * n)}

    def finish_metrics(self, metrics):
        metrics["ds/groups_drawn"] = metrics["ds/drawn"] * self.args.rollout_batch
        metrics["ds/groups_kept"] = metrics["ds/informative"] * self.args.rollout_batch

    def step_line(self, metrics):  # informative groups kept / groups drawn, in how many tries, at what extra time
        return (f" ds {metrics['ds/groups_kept']:.0f}/{metrics['ds/groups_drawn']:.0f} in {metrics['ds/tries']:.0f} "
                f"tries +{metrics['t_dynamic_sampling']:.1f}s")
