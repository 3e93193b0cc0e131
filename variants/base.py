"""The interface a perception-aware method implements to plug into grpo.py's loop. Every hook is a no-op.

A method is a subclass of Variant in its own file of this folder, listed in variants/__init__.py. grpo.py adds
each method's flags (add_args), builds the active ones (is_active), and calls their hooks at fixed points of a
step; a method never imports grpo.py: what it needs is passed in (`run`, `ctx`).

    when        hook                                what it may do
    start       check(world)                        refuse bad flags, one line (SystemExit)
                judge_options()                     options for judge.make_judge (e.g. locate wrong claims)
    load        instruction(sample, scheme)         the prompt's instruction (None: PaLMR's)
                questions(sample)                   more questions it will ask about the same image (length filter)
                drop_reason(sample, scheme)         why an item cannot be trained on, or None
    rollout     redraw(run, samples, rows, encoded) the step's groups replaced -> (samples, rows, encoded), or None
                after_rollout(run, samples, rows)   extra generations -> Extra(parts per row, groups that train too)
    reward      reward_signals()                    keyword signals every row's reward scheme receives (a gate)
                after_reward(run, rows, located)    the judge's located wrong claims, per row (character spans)
    update      needs_old_logprobs                  old log-probs even with one update per rollout batch
                shape_advantages(ctx)               per-token advantages of every micro-batch, before any update
    log         metrics(rows, parts)                per-row sums, averaged over the global batch by the loop
                finish_metrics(metrics)             ratios of those averages, in place
                step_line(metrics)                  text added to the step line's reward parts

`run` (a namespace from grpo.py): args, engine, processor, rank, world, step, prefill (what the chat template
writes of the assistant turn), samples (the training items), rollout(samples, n, seed_offset) -> (rows, encoded),
the loop's own rollout, and score(rows) -> rewards (N,), the loop's reward of those rows (the judge included).
Rows are (Sample, palmr.Completion) pairs, group after group. Reward schemes register themselves with
rewards.register_scheme when their file is imported.
"""
import dataclasses


@dataclasses.dataclass
class Extra:
    """What after_rollout adds to a step.

    parts: per row of the step, {signal: value}; each s_<name> signal becomes the reward part <name> and reaches
    the row's reward scheme. groups: [(rows, encoded prompts, rewards (N,), group size)], more GRPO groups that
    train too, the same number per prompt on every rank, each prompt's placed right after its own group.
    reward_seconds: of this hook's time, what belongs to the reward phase (a scoring pass) rather than the
    rollout. metrics: numbers logged as they are (rank 0's), e.g. a phase's seconds."""
    parts: list = None
    groups: list = dataclasses.field(default_factory=list)
    reward_seconds: float = 0.0
    metrics: dict = dataclasses.field(default_factory=dict)


class Variant:
    """A perception-aware method: flags, a switch, and hooks on the V-GRPO loop (all no-ops here)."""
    name = "base"
    resume_keys = ()          # flags a --resume must match
    needs_old_logprobs = False

    @staticmethod
    def add_args(ap):
        """Add the method's flags to the argparse parser (under its own argument group)."""

    @staticmethod
    def is_active(args):
        """Whether these parsed flags switch the method on."""
        return False

    def __init__(self, args):
        self.args = args

    def check(self, world):
        """Refuse flags that cannot work: raise SystemExit with one line."""

    def judge_options(self):
        """Keyword options for judge.make_judge that no flag sets (e.g. locate=True)."""
        return {}

    def instruction(self, sample, scheme):
        return None

    def questions(self, sample):
        return []

    def drop_reason(self, sample, scheme):
        return None

    def redraw(self, run, samples, rows, encoded):
        """Replace the step's groups (e.g. dynamic sampling) before anything else sees them: -> (samples, rows,
        encoded) with as many samples as given, G rows each, on every rank; or None to keep them. Every rank calls
        it, and every rank must make the same run.rollout calls (engines and FSDP generate together)."""
        return None

    def after_rollout(self, run, samples, rows):
        return None

    def reward_signals(self):
        return {}

    def after_reward(self, run, rows, located):
        pass

    def shape_advantages(self, ctx):
        """-> per update, per micro-batch, advantages (B,) or (B, T) on ctx.device, and metrics (this rank's
        means, averaged over ranks by the loop); or None to keep the loop's. Runs under no_grad, before any update.
        ctx: policy, processor, rows, encoded, advantages (N,), spans (per update, the micro-batches' row
        ranges), batches (the same, built on the CPU), old_logps (per update, per micro-batch, (B, T); None
        unless needs_old_logprobs or several updates per rollout batch),
        layout(rows, encoded) -> a CPU batch, on(batch) -> on the device, device, step, temperature, clock."""
        return None

    def metrics(self, rows, parts):
        return {}

    def finish_metrics(self, metrics):
        pass

    def step_line(self, metrics):
        return ""
