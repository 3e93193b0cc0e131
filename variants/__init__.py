"""Perception-aware methods beside PaLMR, each one file, plugged into grpo.py through variants/base.py.

    python grpo.py --credit token          # located-error token credit (token_credit.py)
    python grpo.py --vppo                  # VPPO (vppo.py)
    python grpo.py --reward vision_sr1     # Vision-SR1 (vision_sr1.py)
    python grpo.py --reward pearl          # PEARL (pearl.py)
    python grpo.py --vicrit-data FILE      # ViCrit items mixed in (vicrit.py; build them: python -m variants.vicrit)
    python grpo.py --dynamic-sampling      # DAPO's dynamic sampling: tied groups redrawn (dynamic_sampling.py)
Perception-R1 is a reward scheme only (rewards.py). Deleting this folder and the lines of grpo.py marked
`# variants` leaves plain PaLMR (README "Fork just PaLMR").
"""
from variants.base import Extra, Variant
from variants.dynamic_sampling import DynamicSampling
from variants.pearl import Pearl
from variants.token_credit import TokenCredit
from variants.vicrit import ViCrit
from variants.vision_sr1 import VisionSR1
from variants.vppo import VPPO

VARIANTS = [TokenCredit, VPPO, VisionSR1, Pearl, ViCrit, DynamicSampling]  # hooks run in this order


def register(cls):
    """Plug in a method defined outside this folder (a fork's, examples/toy_variant.py), before grpo.get_args."""
    if cls not in VARIANTS:
        VARIANTS.append(cls)
    return cls


def add_args(ap):
    """Every method's flags, each under its own group."""
    for v in VARIANTS:
        v.add_args(ap)


def resume_keys():
    return tuple(k for v in VARIANTS for k in v.resume_keys)


def active(args, world):
    """The methods these flags switch on, checked (SystemExit on a bad flag). At most one may shape the per-token
    advantages: two would overwrite each other."""
    on = [v(args) for v in VARIANTS if v.is_active(args)]
    shaping = [v.name for v in on if type(v).shape_advantages is not Variant.shape_advantages]
    if len(shaping) > 1:
        raise SystemExit(f"{' and '.join(shaping)} both set per-token advantages: choose one")
    for v in on:
        v.check(world)
    return on


__all__ = ["Extra", "Variant", "VARIANTS", "add_args", "active", "register", "resume_keys"]
