"""Vision-SR1 (arXiv 2508.19652; official code zli12321/Vision-SR1): the policy describes the image, then
reasons; a text-only pass of the same policy, shown only that description and the question, must answer right
for the self-reward.

    python grpo.py --reward vision_sr1 --warmup-format description   # from an SR1-format warm start

Reward (official code, see_think_selfReward.py): 0.9 acc + 0.1 format + the self-reward, format graded as
<description>...</description><think>...</think> \\boxed{} (palmr.parse_description).
"""
import time

import palmr
from rewards import grade_answer, register_scheme
from variants.base import Extra, Variant


def _grade(text, gold, choices=None, s_self=None, **_):
    assert s_self is not None, "vision_sr1 needs the self-reward (variants.vision_sr1.self_rewards)"
    return palmr.parse_description(text)[1], grade_answer(palmr.parse_response(text)[1], gold, choices)


register_scheme("vision_sr1", lambda fmt, ans, vis, cov, s_self=0.0, **_: 0.9 * ans + 0.1 * fmt + s_self, grade=_grade)


def self_rewards(engine, processor, rows, args, step, rank, prefill=""):
    """Vision-SR1's self-reward per row (N,) in {0, 1}: the same policy, shown only the row's own description
    (its <description> block; the whole reply when there is none, as the official code does) and the
    question, without the image, answers once, sampled at the rollout temperature; 1 when that answer is
    right. Source: arXiv 2508.19652 and its code (zli12321/Vision-SR1, ray_trainer.py). -> list of floats."""
    prompts = []
    for s, c in rows:
        description = palmr.parse_description(prefill + c.text)[0]
        question = f"Text description: {description if description is not None else prefill + c.text}\n" \
                   f"Question: {s.question}"
        prompts.append(palmr.Prompt(palmr.render_prompt(processor, question, s.choices, image=False,
                                                        instruction=palmr.SR1_TEXT_INSTRUCTION), None))
    answers = engine.generate(prompts, n=1, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed + 1_000_003 * step + 500_009 + rank)
    return [float(grade_answer(palmr.parse_response(prefill + a[0].text)[1], s.answer, s.choices))
            for (s, _), a in zip(rows, answers)]


class VisionSR1(Variant):
    """--reward vision_sr1: the description-first instruction and the text-only self-reward pass."""
    name = "vision_sr1"

    @staticmethod
    def is_active(args):
        return "vision_sr1" in (args.reward, args.mix_reward)

    def check(self, world):
        if self.args.vllm_tp != 1:
            raise SystemExit("--reward vision_sr1 needs --vllm-tp 1: its text-only pass runs per rank")
        if prefill := palmr.template_prefill(self.args.model):  # Qwen3.5's thinking template opens <think> itself
            raise SystemExit(f"--reward vision_sr1: the chat template of {self.args.model} prefills {prefill!r}, so no "
                             f"reply can open with SR1's <description>: use a checkpoint whose template does not")

    def instruction(self, sample, scheme):
        return palmr.SR1_INSTRUCTION if scheme == "vision_sr1" else None

    def after_rollout(self, run, samples, rows):
        t = time.time()
        s_self = self_rewards(run.engine, run.processor, rows, run.args, run.step, run.rank, run.prefill)
        t = time.time() - t  # a scoring pass: counted in t_reward, not t_rollout
        return Extra(parts=[{"s_self": v} for v in s_self], reward_seconds=t, metrics={"t_self_reward": t})
