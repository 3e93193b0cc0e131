"""The reward schemes the variants register (rewards.register_scheme), by hand, beside the paper's own
(tests/test_rewards.py): every registered scheme has a hand-computed row, and its declared judge needs match its
arithmetic."""
import pytest

import rewards
import variants  # noqa: F401 -- importing the package registers the variants' schemes
from rewards import SCHEMES, fuse

OWN = {"palmr", "grpo", "bonus", "mix", "perception_r1"}  # registered by rewards.py itself
assert OWN <= set(rewards.SCHEMES)

FUSE_CASES = [  # (scheme, s_fmt, s_ans, s_vis, r_cov, expected)
    # pearl: no checklist pass rate given (s_perc 0) fails the gate whatever the answer (gate cases: test_pearl)
    ("pearl", 1, 1, 1, 0.0, 0.0),
    # vicrit: its own outcome reward (s_ans is the corrupted-phrase match: test_judge_bench), s_vis ignored
    ("vicrit", 1, 1, 0, 0.0, 1.0),
    # vision_sr1 without its self-reward (s_self 0): outcome only, s_vis and r_cov ignored (tests/test_vision_sr1.py
    # has the self-reward's hand values)
    ("vision_sr1", 1, 1, 0, 1.0, 1.0),
]


@pytest.mark.parametrize("scheme, s_fmt, s_ans, s_vis, r_cov, expected", FUSE_CASES)
def test_fuse_hand_values(scheme, s_fmt, s_ans, s_vis, r_cov, expected):
    assert fuse(scheme, s_fmt, s_ans, s_vis, r_cov) == pytest.approx(expected)


def test_fuse_table_covers_every_variant_scheme():
    assert {c[0] for c in FUSE_CASES} == set(SCHEMES) - OWN, "a variant's scheme without a hand-computed row"


def test_only_vicrit_rows_skip_the_judge():
    # a scheme that is not judged never reaches the judge: only ViCrit's exact phrase match
    assert {name for name, s in SCHEMES.items() if not s.judged} == {"vicrit"}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_fuse_reads_vis_and_cov_as_declared(scheme):
    # a scheme's `needs` tells the trainer which judge calls to make: it must match the arithmetic
    vis_matters = fuse(scheme, 1, 1, 0.0, 0.0) != fuse(scheme, 1, 1, 1.0, 0.0)
    cov_matters = fuse(scheme, 1, 1, 1.0, 0.0) != fuse(scheme, 1, 1, 1.0, 1.0)
    assert vis_matters == ("vis" in SCHEMES[scheme].needs)
    assert cov_matters == ("cov" in SCHEMES[scheme].needs)


# -----------------------------------------------------------------------------
# from tests/test_real_replies.py: the trainer's rewards (grpo.compute_rewards) under a template that prefills <think>
