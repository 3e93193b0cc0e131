"""A toy method written against variants/base.py (README "Adding a method"): PaLMR's gated reward plus a small
bonus when the reasoning names a colour that the image's facts contain.

    python -m examples.toy_variant --reward palmr_colour --colour-bonus 0.1 --max-steps 2

A real method is a file in variants/ listed in variants/__init__.py's VARIANTS; then it is just `python grpo.py`.
"""
from palmr import COLOUR_WORDS, parse_response
from rewards import register_scheme
from variants.base import Extra, Variant

# the reward scheme: a registered fusion rule; s_colour arrives as a per-row signal and is logged as reward/colour
register_scheme("palmr_colour", lambda fmt, ans, vis, cov, s_colour=0.0, bonus=0.1, **_:
                vis * (0.9 * ans + 0.1 * fmt) + bonus * s_colour, needs={"vis"})


def names_a_colour(text, facts):
    """1.0 when the <think> block names a colour word that some object of the facts has, else 0.0."""
    words = set((parse_response(text)[0] or "").lower().replace(".", " ").split())
    colours = {a for o in (facts or {}).get("objects") or [] for a in o.get("attributes") or [] if a in COLOUR_WORDS}
    return float(bool(words & colours))


class ColourBonus(Variant):
    name = "colour_bonus"
    resume_keys = ("colour_bonus",)  # a --resume must keep it

    @staticmethod
    def add_args(ap):
        ap.add_argument_group("toy colour bonus (examples/toy_variant.py)").add_argument(
            "--colour-bonus", type=float, default=0.1, help="reward added when the reasoning names a true colour")

    @staticmethod
    def is_active(args):
        return args.reward == "palmr_colour"

    def after_rollout(self, run, samples, rows):  # one signal per row, scored before the judge is asked
        return Extra(parts=[{"s_colour": names_a_colour(run.prefill + c.text, s.facts)} for s, c in rows])

    def reward_signals(self):  # keyword options every row's scheme receives
        return {"bonus": self.args.colour_bonus}

    def metrics(self, rows, parts):  # per-row sums; the loop averages them over the global batch
        return {"colour/named": parts["colour"].sum()}

    def step_line(self, metrics):
        return f" colour {metrics['colour/named']:.2f}"


if __name__ == "__main__":  # an entry script, like grpo.py itself: plug the toy in, then run the trainer
    import grpo
    import variants
    variants.register(ColourBonus)
    grpo.main()
