"""Vision-SR1 (variants/vision_sr1.py, --reward vision_sr1): the description format, the fused reward by hand, the
text-only self-reward pass (its prompts, its grading), the trainer with it (torchrun on 2 ranks:
tests/variants/test_base.py), and the SR1-format warm start."""
import json
import time
from pathlib import Path

import pytest

import grpo
import palmr
import report
import variants
import variants.vision_sr1 as vision_sr1
import warmup
from data import Sample
from rewards import fuse, score_completion
from variants.vision_sr1 import VisionSR1, self_rewards


@pytest.mark.parametrize("text,description,ok", [
    ("<description>2 red circles</description>\n<think>two</think> \\boxed{2}", "2 red circles", True),
    ("  <description> a\nb </description><think>x</think>\\boxed{\\frac{1}{2}}\n", "a\nb", True),
    ("<think>x</think> \\boxed{2}", None, False),                                   # PaLMR's format: no description
    ("<description>a</description><think>b</think>\\boxed{2} and more", "a", False),  # text after the answer
    ("<think>b</think><description>a</description>\\boxed{2}", "a", False),          # wrong order
    # the official compute_score deletes spaces around < > / before its format check (qwen2.5vl-32b writes them)
    ("<description>a</description>\n< think >b< /think > \\boxed{2}", "a", True),
    ("<description>a</ description><think>b</think>\\boxed{2}", None, True),        # no exact block: no description
    ("<description>a</description><think>b</think> the answer: \\boxed{2}", "a", False),  # text before the box
])
def test_parse_description(text, description, ok):
    assert palmr.parse_description(text) == (description, ok)


def test_reward_by_hand():
    good = "<description>2 red circles</description><think>count</think> \\boxed{2}"
    assert fuse("vision_sr1", 1.0, 1.0, 0.0, s_self=1.0) == pytest.approx(2.0)
    total, parts = score_completion("vision_sr1", good, "2", s_self=1.0)
    assert total == pytest.approx(2.0) and parts["fmt"] == 1.0 and parts["ans"] == 1.0 and parts["self"] == 1.0
    total, parts = score_completion("vision_sr1", good, "3", s_self=1.0)    # a description that answers, a wrong answer
    assert total == pytest.approx(0.1 + 1.0)
    total, parts = score_completion("vision_sr1", "<think>count</think> \\boxed{2}", "2", s_self=0.0)
    assert total == pytest.approx(0.9) and parts["fmt"] == 0.0            # PaLMR's format is not SR1's
    with pytest.raises(AssertionError):
        score_completion("vision_sr1", good, "2")


class ScriptedEngine:
    """Records the prompts it gets and answers each with the next scripted reply (sampling is the real
    engine's job, tested in the trainer runs below)."""

    def __init__(self, replies):
        self.replies, self.prompts = list(replies), []

    def generate(self, prompts, n, max_new_tokens, temperature, top_p, seed):
        self.prompts += prompts
        return [[palmr.Completion([], self.replies.pop(0), [], True)] for _ in prompts]


def test_self_rewards_prompt_and_grading(tiny_ckpt):
    processor = palmr.load_processor(tiny_ckpt)
    s = Sample(id="a", image="x.png", question="How many circles?", answer="2")
    rows = [(s, palmr.Completion([], "<description>two red circles</description><think>t</think>\\boxed{2}", [], True)),
            (s, palmr.Completion([], "<think>I see 3 circles</think>\\boxed{3}", [], True))]
    engine = ScriptedEngine(["<think>the text says two</think> \\boxed{2}", "<think>three</think> \\boxed{3}"])
    args = grpo.get_args(["--reward", "vision_sr1", "--judge", "none"])
    assert self_rewards(engine, processor, rows, args, step=0, rank=0) == [1.0, 0.0]
    first, second = (p.text for p in engine.prompts)
    assert all(p.image is None for p in engine.prompts) and "<|image_pad|>" not in first + second
    assert "Text description: two red circles\nQuestion: How many circles?" in first
    assert "<description>" not in first and palmr.SR1_TEXT_INSTRUCTION in first
    # no description block: the whole reply stands in for it (official code), answer included
    assert "Text description: <think>I see 3 circles</think>\\boxed{3}\nQuestion:" in second


def test_trainer_step_with_the_real_engine(tmp_path, tiny_ckpt, shapes_file, monkeypatch):
    # the self-rewards the hook computed, and the seconds they took, recorded around variants.vision_sr1.self_rewards
    seen = []

    def recording(*a, **k):
        t = time.time()
        out = self_rewards(*a, **k)
        seen.append((out, time.time() - t))
        return out
    monkeypatch.setattr(vision_sr1, "self_rewards", recording)
    grpo.main(["--model", tiny_ckpt, "--data", shapes_file, "--out", str(tmp_path), "--max-steps", "1",
               "--reward", "vision_sr1", "--judge", "none", "--rollout-batch", "2", "--update-batch", "2",
               "--group-size", "2", "--max-new-tokens", "12", "--save-every", "100", "--log-rollouts-every", "0"])
    m = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert len(seen) == 1 and len(seen[0][0]) == 4  # one text-only pass per step, one answer per rollout
    (s_self, seconds), = seen
    assert m["reward/self"] == pytest.approx(sum(s_self) / 4)
    assert m["t_self_reward"] == pytest.approx(seconds, abs=0.05)  # the pass's own time (0.05 s: the wrapper's)
    assert m["reward"] == pytest.approx(0.9 * m["reward/ans"] + 0.1 * m["reward/fmt"] + m["reward/self"])


def test_sr1_trace_by_hand():
    trace = "<think>I see 2 red circles and 1 blue square. So there are 2 circles.</think> The answer is \\boxed{2}."
    sr1 = palmr.sr1_trace(trace)
    assert sr1 == ("<description>I see 2 red circles and 1 blue square.</description><think>So there are 2 "
                   "circles.</think> \\boxed{2}")
    assert palmr.parse_description(sr1) == ("I see 2 red circles and 1 blue square.", True)  # S_fmt = 1 for SR1
    assert score_completion("vision_sr1", sr1, "2", s_self=1.0)[0] == pytest.approx(2.0)
    one = palmr.sr1_trace("<think>Two circles</think> \\boxed{2}")  # one sentence: in both blocks
    assert one == "<description>Two circles</description><think>Two circles</think> \\boxed{2}"
    with pytest.raises(AssertionError, match="not a <think>"):
        palmr.sr1_trace("no format at all")


def test_sr1_format_warm_start_and_its_evaluation(tmp_path, tiny_ckpt, shapes_file):
    import shutil
    import eval as evaluation
    base = tmp_path / "tiny"
    shutil.copytree(tiny_ckpt, base)
    build = (grpo.prepare_model, grpo.training_batch)  # warmup.py takes the trainer's model and batch layout
    path = warmup.ensure_warm_start(str(base), shapes_file, 2, 0.5, *build, trace_format="description")
    assert Path(path).name == "tiny-warm2-h0.5-s0-sr1-v2" and (Path(path) / "config.json").exists()
    # cached apart from the <think>-format warm start of the same settings
    assert warmup.ensure_warm_start(str(base), shapes_file, 2, 0.5, *build) != path
    results = evaluation.main(["--bench", "shapes", "--checkpoints", f"w={path}", "--limit", "2", "--max-new-tokens", "4",
                               "--prompt", "sr1", "--out", str(tmp_path / "ev")])
    assert results["settings"]["prompt"] == palmr.SR1_INSTRUCTION and results["checkpoints"]["w"]["shapes"]["n"] == 2
    table = report.study_table({"start": results["checkpoints"]["w"], "start_sr1": results["checkpoints"]["w"]})
    assert "| start (SR1-format warm-up) | - |" in table


def test_instruction_and_flags():
    args = grpo.get_args(["--reward", "vision_sr1", "--judge", "none"])
    hooks = variants.active(args, 1)
    assert [type(h) for h in hooks] == [VisionSR1]
    s = Sample(id="a", image="x.png", question="q", answer="2")
    assert grpo.instruction(s, args, hooks) == palmr.SR1_INSTRUCTION
    mixed = Sample(id="b", image="x.png", question="q", answer="2", meta={"reward_scheme": "grpo"})  # a --mix-data row
    assert grpo.instruction(mixed, args, hooks) == palmr.INSTRUCTION
    with pytest.raises(SystemExit, match="--vllm-tp 1"):
        variants.active(grpo.get_args(["--reward", "vision_sr1", "--judge", "none", "--vllm-tp", "2"]), 2)


class ValidationEngine(ScriptedEngine):
    """The rollout engine as eval.Validator drives it: wake, sleep and a pixel budget besides generate."""
    max_pixels = 112 * 112

    def wake(self):
        pass

    def sleep(self):
        pass


@pytest.mark.parametrize("reward,instruction", [("vision_sr1", palmr.SR1_INSTRUCTION), ("grpo", palmr.INSTRUCTION)])
def test_validation_asks_in_the_training_format(reward, instruction, tmp_path, tiny_ckpt):
    # regression: grpo.py --eval-every validated a --reward vision_sr1 policy with PaLMR's <think> prompt; the
    # official config formats train and val items with one format_prompt (see_think_format.jinja)
    import eval as evaluation
    args = grpo.get_args(["--reward", reward, "--judge", "none", "--eval-bench", "shapes", "--eval-limit", "2"])
    engine = ValidationEngine(["<description>a</description><think>b</think> \\boxed{2}"] * 2)
    metrics, _ = evaluation.Validator(args, engine, palmr.load_processor(tiny_ckpt), tmp_path, rank=0)(step=3)
    assert len(engine.prompts) == 2 and all(instruction in p.text for p in engine.prompts)
    assert metrics["val/shapes/n"] == 2
