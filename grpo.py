"""V-GRPO: GRPO with PaLMR's vision-gated reward, for Qwen2.5-VL, in one file.

    python grpo.py                                   # CPU, tiny model, synthetic shapes, rule judge
    torchrun --nproc_per_node 2 grpo.py              # the same on 2 CPU processes (FSDP2 over gloo)
    bash runs/qwen25vl_7b_8xh100.sh                  # one 8-GPU node: torchrun --nproc_per_node 8 (NCCL, bf16)
    python grpo.py --resume --out DIR                # continue the run in DIR from its latest checkpoint

One step: rollout (G completions per prompt, prompts strided over ranks, a prompt's group on one rank)
-> reward (format, answer, the judge's S_vis, fused by --reward) -> group advantages -> completion-only
log-probs -> PPO-clip + k3 KL loss -> AdamW, repeated for each update batch of the rollout batch.

Where this departs from textbook GRPO (DeepSeekMath), on purpose:
1. Loss aggregation: token-mean over all completion tokens of the global update batch (DAPO / Dr. GRPO
   style), not a mean of per-sequence means; micro-batches are rescaled so accumulation is exact.
2. KL: the k3 estimator exp(ref - logp) - (ref - logp) - 1 added in the loss with weight beta
   (paper: not reported; ours 1e-2); beta = 0 loads no reference model at all.
3. Clipping: asymmetric PPO clip, eps_low 0.2 / eps_high 0.28 (ours, after DAPO's clip-higher).
4. Zero-variance groups: advantage (R - mean) / (std + eps) with the unbiased group std gives exactly 0,
   so such groups add no policy gradient (they still count in the token-mean); their share is logged.
5. Old log-probs: with one update per rollout batch the ratio is exactly 1 and old_logp is
   logp.detach() (no extra forward); with several updates old_logp is computed once before them.
6. IS correction for the sampler/trainer mismatch (vLLM in bf16 vs FSDP): off by default; with
   --is-cap C, each sequence's policy-gradient term is weighted by rho = exp(sum_t old_logp - sampler_logp)
   and sequences with rho > C are masked (TRL's "sequence_mask"; like verl we leave the KL term
   unweighted). The HF engine samples from the trained module itself, so rho ~ 1 there.
7. Weight sync: once per step, after the last optimizer update and before the next rollout.
Step = one rollout batch and its optimizer updates; --max-steps and checkpoints count these steps.
"""
import argparse
import dataclasses
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
import types
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import palmr
from data import ensure_shapes, hallucinated_trace, load_image, read_jsonl
from judge import JudgeItem, make_judge
from palmr import print0
from rewards import NEEDS_COV, NEEDS_VIS, SCHEMES, pearl_checklist, score_completion

# -----------------------------------------------------------------------------
# Config


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model and data
    ap.add_argument("--model", default=palmr.DEFAULT_TINY, help="policy checkpoint (HF folder); the tiny one is built if missing")
    ap.add_argument("--data", default=None, help="training JSONL of Samples (default: synthetic shapes, built once)")
    ap.add_argument("--out", default="out/grpo", help="run folder: metrics, rollouts, checkpoints")
    ap.add_argument("--max-pixels", type=int, default=112 * 112, help="image pixel budget (resize, never crop)")
    ap.add_argument("--max-prompt-tokens", type=int, default=4096, help="longer prompts are dropped at load, never truncated")
    # rollout
    ap.add_argument("--group-size", type=int, default=8, help="G completions per prompt (paper: 16)")
    ap.add_argument("--rollout-batch", type=int, default=8, help="prompts per step, all ranks (paper: 512)")
    ap.add_argument("--update-batch", type=int, default=8, help="prompts per optimizer update, all ranks (paper: 128)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="completion length cap (8xH100 preset: 2048)")
    ap.add_argument("--temperature", type=float, default=1.0, help="rollout temperature, also used for the trainer's log-probs")
    ap.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus sampling")
    ap.add_argument("--engine", default="auto", choices=["auto", "hf", "vllm"], help="sampler: vllm on GPUs when installed, else HF generate")
    ap.add_argument("--vllm-tp", type=int, default=1, help="vLLM tensor parallel size (consecutive ranks share an engine)")
    ap.add_argument("--vllm-gpu-memory", type=float, default=0.3, help="vLLM gpu_memory_utilization (KV cache + weights)")
    ap.add_argument("--vllm-max-model-len", type=int, default=None,
                    help="vLLM max_model_len (default: prompt + new tokens, clamped to the checkpoint's limit)")
    ap.add_argument("--is-cap", type=float, default=0.0, help="sequence-level IS correction for sampler/trainer mismatch: "
                    "mask sequences whose ratio exceeds this cap (0: off)")
    ap.add_argument("--debug-logprobs", action="store_true", help="log sampler vs trainer log-prob gaps on the first batch after each sync")
    # reward
    ap.add_argument("--reward", default="palmr", choices=SCHEMES, help="fusion scheme (rewards.py)")
    ap.add_argument("--judge", default="rule", choices=["rule", "openai", "hf", "none"], help="visual-fidelity judge backend (judge.py)")
    ap.add_argument("--judge-base-url", default=None, help="openai: the server, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--judge-model", default=None, help="openai: served model name; hf: local folder")
    ap.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="openai: environment variable holding the key")
    ap.add_argument("--judge-protocol", default="pairwise", choices=["pairwise", "pointwise"], help="pairwise vs the reference (paper) or each rollout alone")
    ap.add_argument("--judge-swap", action="store_true", help="ask both A/B orders; the reference must win both to gate (ours)")
    ap.add_argument("--judge-concurrency", type=int, default=32, help="openai: requests in flight per rank")
    ap.add_argument("--judge-timeout", type=float, default=300.0, help="openai: seconds per request (reasoning replies are long)")
    ap.add_argument("--judge-retries", type=int, default=4, help="openai: retries on 429/5xx/timeouts, exponential backoff")
    ap.add_argument("--judge-max-tokens", type=int, default=4096, help="judge reply budget (reasoning included)")
    ap.add_argument("--judge-no-reasoning", action="store_true", help="turn the judge's thinking off (paper: on)")
    ap.add_argument("--judge-omissions", action=argparse.BooleanOptionalAction, default=True,
                    help="stating fewer of the facts than the reference is also less faithful, so gated (ours, "
                    "on by default: README 'Process credit')")
    ap.add_argument("--credit", default="sequence", choices=["sequence", "token"],
                    help="token (ours, off by default: README 'Process credit'): the judge's located wrong claims get a "
                    "negative per-token advantage; sequence: one advantage per rollout")
    ap.add_argument("--credit-c", type=float, default=0.5,
                    help="token credit: a wrong claim's tokens get advantage -max(|A|, c) (ours)")
    ap.add_argument("--vppo", action="store_true",
                    help="VPPO (arXiv 2510.09285): advantages reweighted by each rollout's visual dependency, policy "
                    "gradient only on its most image-dependent tokens (grpo.vppo_advantages); one extra no-grad "
                    "forward with the image's patches blackened")
    ap.add_argument("--vppo-top-k", type=float, default=0.4, help="VPPO: share of each completion's tokens that "
                    "get policy gradient (official scripts: 0.4)")
    ap.add_argument("--vppo-beta-min", type=float, default=0.9, help="VPPO: smallest advantage scale (official "
                    "scripts: 0.9)")
    ap.add_argument("--vppo-mask-prob", type=float, default=0.5, help="VPPO: probability that an image patch is "
                    "blackened (official code: 0.5)")
    ap.add_argument("--pearl-items", type=int, default=3, help="PEARL: checklist questions per prompt "
                    "(rewards.pearl_checklist; ours, the paper's count is not public)")
    ap.add_argument("--pearl-group", type=int, default=4, help="PEARL: auxiliary rollouts per checklist question, "
                    "trained as their own groups (ours)")
    ap.add_argument("--pearl-gate", type=float, default=0.5, help="PEARL: checklist pass rate a prompt needs for "
                    "its reasoning reward (ours)")
    ap.add_argument("--vicrit-data", default=None, help="ViCrit items (data.py vicrit) mixed into every step; they "
                    "earn ViCrit's reward whatever --reward is")
    ap.add_argument("--vicrit-ratio", type=float, default=0.25, help="share of each step's prompts drawn from "
                    "--vicrit-data (ours; the paper trains on ViCrit alone: --reward vicrit --data FILE)")
    # optimisation
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (tiny default; paper: 1e-6 for 7B)")
    ap.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW decoupled weight decay")
    ap.add_argument("--beta", type=float, default=1e-2, help="k3 KL weight; 0 loads no reference model")
    ap.add_argument("--eps-low", type=float, default=0.2, help="PPO clip below 1")
    ap.add_argument("--eps-high", type=float, default=0.28, help="PPO clip above 1")
    ap.add_argument("--adv-scale", default="group", choices=["group", "batch", "none"], help="advantage std: per group, whole batch, or none")
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    ap.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward per rank")
    ap.add_argument("--shared-prefix", action=argparse.BooleanOptionalAction, default=None,
                    help="score each prompt once per group, its completions as branches of one sequence (README "
                    "'Shared-prefix forward'); default: on for CPU, where it was measured faster, off on GPUs")
    ap.add_argument("--prefix-attention", default="branch", choices=["branch", "dense", "flex"],
                    help="shared-prefix attention: branch (one SDPA call per completion on [prompt; itself], exact, "
                    "no (L, L) mask), dense ((L, L) boolean masks through SDPA), flex (torch flex_attention block "
                    "mask; GPU, not yet run by this project); ignored with --no-shared-prefix")
    ap.add_argument("--micro-tokens", type=int, default=0,
                    help="split each update into micro-batches of about this many tokens instead of --micro-batch rows "
                    "(0: off); every rank runs the same number of micro-batches")
    ap.add_argument("--logprobs", default="fused", choices=["fused", "naive"], help="LM-head log-prob path: chunked fused, or full logits")
    ap.add_argument("--fold-loss-grad", action=argparse.BooleanOptionalAction, default=True,
                    help="fused: compute the LM head's policy-loss gradient in the forward pass (no recompute; README)")
    ap.add_argument("--logprob-chunk", type=int, default=None,
                    help="rows per block of the fused log-prob path (default: 128 on CPU; on GPUs from --logprob-memory)")
    ap.add_argument("--logprob-memory", type=int, default=LOGPROB_MEMORY_MIB,
                    help="GPU: MiB for the fused LM head's (chunk, V) buffers, which sets the chunk (grpo.logprob_chunk)")
    ap.add_argument("--activation-checkpointing", action="store_true", help="recompute decoder layers in backward")
    ap.add_argument("--warmup-steps", type=int, default=600, help="with the default tiny model: SFT steps of a cached "
                    "warm start built before RL (0: start from the random tiny model)")
    ap.add_argument("--warmup-hallucinated", type=float, default=0.3, help="share of warm-up traces that reach the "
                    "right answer through a misread scene (ours: so the start policy hallucinates)")
    ap.add_argument("--warmup-format", default="think", choices=["think", "description"],
                    help="warm-up traces in PaLMR's <think> format, or in Vision-SR1's <description><think> format "
                    "under its instruction (the cold start its recipe assumes; cached apart)")
    ap.add_argument("--warmup-only", action="store_true", help="build (or find) the cached warm start, print its path "
                    "and exit")
    ap.add_argument("--max-steps", type=int, default=20, help="rollout steps to run (total, counting resumed ones)")
    ap.add_argument("--seed", type=int, default=0, help="seed of data order, sampling and init")
    # logging and checkpoints
    ap.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (and at the end)")
    ap.add_argument("--keep", type=int, default=2, help="checkpoints kept on disk (oldest removed)")
    ap.add_argument("--log-rollouts-every", type=int, default=5, help="print a few decoded rollouts every N steps")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    ap.add_argument("--report-to", nargs="+", default=["none"], choices=["none", "tensorboard", "wandb"],
                    help="also log every metric, the arguments and a few rollouts to TensorBoard (OUT/tb) and/or "
                    "Weights & Biases (offline unless WANDB_API_KEY or WANDB_MODE says otherwise); optional "
                    "packages: pip install -r requirements-report.txt / pip install wandb")
    ap.add_argument("--wandb-project", default="palmr", help="W&B project name")
    ap.add_argument("--eval-every", type=int, default=0, help="greedy validation every N steps (0: off), through "
                    "the rollout engine and eval.py's scorers, logged as val/<bench>/<metric>")
    ap.add_argument("--eval-bench", nargs="+", default=["shapes"], help="validation benchmarks: shapes (the "
                    "held-out split) or NAME=FILE as eval.py takes them")
    ap.add_argument("--eval-limit", type=int, default=50, help="validation: first K items of each benchmark")
    ap.add_argument("--eval-max-new-tokens", type=int, default=None, help="validation reply budget "
                    "(default: --max-new-tokens)")
    ap.add_argument("--eval-before-train", action="store_true", help="validate the starting policy (step 0)")
    ap.add_argument("--report", action="store_true", help="only write OUT/report.md and OUT/report.png for the "
                    "run in --out (finished or running) and exit")
    return ap.parse_args(argv)


# -----------------------------------------------------------------------------
# Data: every rank loads the same filtered list; prompt k of the run is a pure function of (seed, k)


def is_vicrit(sample):
    return sample.source.startswith("vicrit/")


def load_dataset(args, processor, path=None):
    """Samples that can be trained on: readable image, prompt within budget, a reference where S_vis needs one,
    a description where ViCrit's reward needs one (ViCrit items only, under --reward vicrit)."""
    path = path or args.data
    samples, kept, dropped = read_jsonl(path), [], {}
    need_reference = args.reward in NEEDS_VIS and args.judge not in ("none", "rule")  # rule judges facts alone
    for s in tqdm(samples, desc="checking data", disable=palmr.get_rank() != 0, mininterval=2):
        try:
            image = palmr.fit_pixels(load_image(s), args.max_pixels)
            text = palmr.render_prompt(processor, s.question, s.choices, instruction=palmr.SR1_INSTRUCTION
                                       if args.reward == "vision_sr1" and not is_vicrit(s) else palmr.INSTRUCTION)
            n_image = processor.image_processor.get_number_of_image_patches(image.height, image.width, {}) \
                // processor.image_processor.merge_size ** 2
            n = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) + n_image
            checklist = pearl_checklist(s.facts, s.question, args.pearl_items, s.id) if args.reward == "pearl" else []
            for q, _ in checklist:  # the checklist's prompts show the same image with another question
                n = max(n, len(processor.tokenizer(palmr.render_prompt(processor, q), add_special_tokens=False)
                               ["input_ids"]) + n_image)
            reason = "prompt too long" if n > args.max_prompt_tokens else None
            vicrit = is_vicrit(s) or (args.reward == "vicrit" and path == args.data)
            reason = reason or ("no reference trace" if need_reference and not s.reference and not vicrit else None)
            reason = reason or ("not a ViCrit item (data.py vicrit)" if vicrit and not (is_vicrit(s) and
                                isinstance(s.meta.get("description"), str)) else None)
            reason = reason or ("no checkable facts for a PEARL checklist" if args.reward == "pearl" and not checklist
                                else None)
        except ValueError as e:
            reason = str(e)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
        else:
            kept.append(s)
    print0(f"data: {len(kept)} of {len(samples)} items kept from {path}; dropped: {dropped or 'none'}")
    assert kept, f"no trainable items in {path}"
    return kept


def mixed_step_items(n_items, n_extra, step, rollout_batch, extra_per_step, seed, rank, world):
    """Like step_items, with `extra_per_step` of the global batch's prompts drawn from a second dataset of
    n_extra items (ViCrit), spread evenly over the batch positions: -> [(0, index) or (1, extra index)]. Each
    source is shuffled per epoch on its own, so prompt k of either is a pure function of (seed, k)."""
    out, main_per_step = [], rollout_batch - extra_per_step
    for j in range(rank, rollout_batch, world):
        before = j * extra_per_step // rollout_batch  # extra positions among 0..j-1
        extra = (j + 1) * extra_per_step // rollout_batch > before
        n, k, key = (n_extra, step * extra_per_step + before, seed + 7_919) if extra else \
            (n_items, step * main_per_step + j - before, seed)
        order = np.random.default_rng([key, k // n]).permutation(n)
        out.append((int(extra), int(order[k % n])))
    return out


def step_items(n_items, step, rollout_batch, seed, rank, world):
    """Indices of this rank's prompts at `step`: global prompt k = step*rollout_batch + j, j strided by rank."""
    out = []
    for j in range(rank, rollout_batch, world):
        k = step * rollout_batch + j
        order = np.random.default_rng([seed, k // n_items]).permutation(n_items)  # one shuffle per epoch
        out.append(int(order[k % n_items]))
    return out


# -----------------------------------------------------------------------------
# Rollout and reward


def make_engine(args, policy, processor, model_path, rank, world, device):
    """The sampler: HF generate on the policy module, or a colocated vLLM engine per rank (GPU)."""
    name = palmr.select_engine(args.engine, device.type == "cuda", importlib.util.find_spec("vllm") is not None)
    if name == "hf":
        return palmr.HFEngine(policy, processor, args.max_pixels)
    assert world % args.vllm_tp == 0, f"--vllm-tp {args.vllm_tp} must divide the world size {world}"
    max_model_len, args.max_prompt_tokens, warning = palmr.engine_lengths(
        args.max_prompt_tokens, args.max_new_tokens, palmr.checkpoint_max_len(model_path), args.vllm_max_model_len)
    if warning:
        print0(f"vllm: {warning}")
    engine = palmr.VLLMEngine(model_path, processor, args.max_pixels, seed=args.seed + rank // args.vllm_tp,
                              tensor_parallel_size=args.vllm_tp, gpu_memory_utilization=args.vllm_gpu_memory,
                              max_model_len=max_model_len)
    engine.tp_group = dist.new_subgroups(group_size=args.vllm_tp)[0] if args.vllm_tp > 1 else None
    return engine


def rollout(engine, processor, samples, args, step, rank, n=None, seed_offset=0):
    """G (or n) completions for each of this rank's prompts.

    -> rows [(sample, completion)] group after group, and {sample id: encoded prompt}: each image is
    processed once per step and reused by the trainer's forward passes. With vLLM tensor parallelism
    the ranks of one engine pool their prompts, sample them together, and each keeps its own share.
    """
    group = getattr(engine, "tp_group", None)
    tp = args.vllm_tp if group is not None else 1  # only ranks that really share a vLLM engine share seeds
    pooled = samples
    if group is not None:
        gathered = [None] * tp
        dist.all_gather_object(gathered, samples, group=group)
        pooled = [s for part in gathered for s in part]
    prompts, encoded, own = [], {}, {s.id for s in samples}
    for s in pooled:
        # ViCrit items keep PaLMR's format: their reward grades <think> then \boxed{}
        instruction = palmr.SR1_INSTRUCTION if args.reward == "vision_sr1" and not is_vicrit(s) else palmr.INSTRUCTION
        text, image = palmr.render_prompt(processor, s.question, s.choices, instruction=instruction), load_image(s)
        if s.id in own:  # the trainer needs only its own prompts encoded
            encoded[s.id] = palmr.encode_prompt(processor, text, image, args.max_pixels)
        prompts.append(palmr.Prompt(text, image, encoded.get(s.id)))
    engine_id = rank // tp  # the ranks sharing an engine share its seed
    groups = engine.generate(prompts, n=n or args.group_size, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p,
                             seed=args.seed + 1_000_003 * step + engine_id + seed_offset)  # fixed per (seed, step, engine)
    if group is not None:
        mine = (rank % tp) * len(samples)
        groups = groups[mine:mine + len(samples)]
    return [(s, c) for s, completions in zip(samples, groups) for c in completions], encoded


def self_rewards(engine, processor, rows, args, step, rank, prefill=""):
    """Vision-SR1's self-reward per row (N,) in {0, 1}: the same policy, shown only the row's own description
    (its <description> block; the whole reply when there is none, as the official code does) and the
    question, without the image, answers once, sampled at the rollout temperature; 1 when that answer is
    right. Source: arXiv 2508.19652 and its code (zli12321/Vision-SR1, ray_trainer.py). -> list of floats."""
    from rewards import grade_answer
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


def pearl_checks(engine, processor, samples, args, step, rank, prefill=""):
    """PEARL's auxiliary rollouts (arXiv 2511.18437): each prompt's checklist (rewards.pearl_checklist,
    --pearl-items questions on the same image), --pearl-group rollouts per question, graded by rule.

    -> rows [(check sample, completion)] prompt after prompt (its questions in order, each question's
    rollouts together: groups of --pearl-group), their encoded prompts {id: ...}, their rewards (N,)
    0.9 correct + 0.1 format (the outcome reward, so perception is trained as its own task), and the
    perception score of each prompt {sample id: pass rate over all its checklist rollouts}.
    """
    checks = []
    for s in samples:
        for j, (q, a) in enumerate(pearl_checklist(s.facts, s.question, args.pearl_items, s.id)):
            checks.append(dataclasses.replace(s, id=f"{s.id}#pearl{j}", question=q, answer=a, choices=None,
                                              reference=None, source="pearl/checklist", meta={"of": s.id}))
    rows, encoded = rollout(engine, processor, checks, args, step, rank, n=args.pearl_group, seed_offset=700_001)
    rewards, passed = [], {}
    for c_s, c in rows:
        total, parts = score_completion("grpo", prefill + c.text, c_s.answer)
        rewards.append(total)
        passed.setdefault(c_s.meta["of"], []).append(parts["ans"])
    return rows, encoded, torch.tensor(rewards), {k: sum(v) / len(v) for k, v in passed.items()}


def interleave_checks(rows, advantages, wrong, check_rows, check_advantages, n_prompts):
    """PEARL's training rows: each prompt's reasoning group followed by its checklist groups, so that every
    optimizer update (a contiguous share of the rows) holds whole prompts of both kinds.

    rows (n_prompts * G), advantages (n_prompts * G,), wrong (per row, or None), check_rows (n_prompts * K),
    check_advantages (n_prompts * K,) -> (rows, advantages (n_prompts * (G + K),), wrong or None); the
    checklist rows have no located wrong claims."""
    g, k = len(rows) // n_prompts, len(check_rows) // n_prompts
    assert g * n_prompts == len(rows) and k * n_prompts == len(check_rows), "rows must split evenly over prompts"
    out, adv, out_wrong = [], [], None if wrong is None else []
    for i in range(n_prompts):
        out += rows[i * g:(i + 1) * g] + check_rows[i * k:(i + 1) * k]
        adv += [advantages[i * g:(i + 1) * g], check_advantages[i * k:(i + 1) * k]]
        if wrong is not None:
            out_wrong += wrong[i * g:(i + 1) * g] + [[] for _ in range(k)]
    return out, torch.cat(adv), out_wrong


def compute_rewards(judge, rows, scheme, prefill="", s_self=None, s_perc=None, gate=0.5):
    """-> rewards (N,), parts {name: (N,)}, judge metrics, located errors; the judge is asked once for the batch.

    Located errors: per row, the (start, end) character spans of the wrong claims the judge found, in
    the completion's own text (c.text; spans inside the prefill are dropped).

    Format, answer and judge read the assistant turn as a whole: `prefill` (what the chat template
    already wrote of it, e.g. '<think>\n', see palmr.generation_prefill) + the completion.

    A judge that fails (server down, bad replies) never stops the run: its items count as failures
    with S_vis = 1 ("no preference") and the error is printed once per batch.
    """
    n = len(rows)
    s_vis, r_cov, failed, stats, stats_ties, spans = [1.0] * n, [0.0] * n, 0, {}, 0, [[] for _ in rows]
    unmatched = 0
    judged = [i for i, (s, _) in enumerate(rows) if not is_vicrit(s)]  # ViCrit items have their own exact reward
    if judge is not None and judged:
        items = [JudgeItem(rows[i][0].question, rows[i][0].facts, prefill + rows[i][1].text, rows[i][0].reference)
                 for i in judged]
        judge.stats = {}
        try:
            verdicts = judge.judge(items)
            failed = sum(v.failed for v in verdicts)
            stats_ties = sum(v.preference == "tie" for v in verdicts)
            unmatched = sum(v.unmatched for v in verdicts)
            k = len(prefill)
            for i, v in zip(judged, verdicts):
                s_vis[i], spans[i] = v.s_vis, [(max(a - k, 0), b - k) for a, b in v.spans if b > k]
            if scheme in NEEDS_COV:
                for i, c in zip(judged, judge.coverage(items)):
                    r_cov[i] = c
        except Exception as e:  # noqa: BLE001 -- a judge outage must not kill a multi-day run
            print(f"[rank {palmr.get_rank()}] judge failed on this batch, counted as no preference: "
                  f"{type(e).__name__}: {e}", flush=True)
            failed = len(judged)
        stats = dict(judge.stats, unmatched=unmatched)
    totals, parts = [], {}
    for i, ((s, c), vis, cov) in enumerate(zip(rows, s_vis, r_cov)):
        vicrit = is_vicrit(s)
        total, p = score_completion("vicrit" if vicrit else scheme, prefill + c.text, s.answer, s.choices, s_vis=vis,
                                    r_cov=cov, s_self=None if s_self is None else s_self[i],  # logged, not fused
                                    s_perc=None if s_perc is None else s_perc[i], gate=gate,
                                    description=s.meta.get("description") if vicrit else None)
        totals.append(total)
        for k, v in p.items():
            parts.setdefault(k, []).append(v)
    stats["failed"], stats["ties"] = failed, stats_ties
    return torch.tensor(totals), {k: torch.tensor(v) for k, v in parts.items()}, stats, spans


def span_tokens(tokenizer, token_ids, spans):
    """Indices of the tokens whose decoded characters overlap any (start, end) character span. -> sorted list

    Characters are those of decode(token_ids) with special tokens skipped, as the engines decode c.text.
    Token i covers [lo(i), hi(i + 1)), with hi(k) = len(decode(ids[:k])) and lo(k) the same without a
    trailing U+FFFD: a byte-level token that ends inside a multi-byte character belongs to that
    character, as do the tokens that complete it. A span cut mid-token marks the whole token. Found by
    bisection over prefix decodes, O(log T) decodes per span.
    """
    n, cache = len(token_ids), {0: (0, 0)}

    def lengths(k):  # (lo, hi) characters decoded from the first k tokens
        if k not in cache:
            text = tokenizer.decode(token_ids[:k], skip_special_tokens=True)
            cache[k] = (len(text.rstrip("\ufffd")), len(text))
        return cache[k]

    def first(pred, lo, hi):  # smallest k in [lo, hi) with pred(k), or hi
        while lo < hi:
            mid = (lo + hi) // 2
            if pred(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    marked = set()
    for s, e in spans:
        if e <= s or n == 0:
            continue
        i0 = first(lambda k: lengths(k + 1)[1] > s, 0, n)   # first token ending after s
        i1 = first(lambda k: lengths(k)[0] >= e, 0, n) - 1  # last token starting before e
        marked.update(range(i0, i1 + 1))
    return sorted(marked)


def token_advantages(advantages, wrong, c):
    """Per-token advantages with located-error credit. advantages (B,), wrong (B, T) in {0, 1} -> (B, T)

    A_t = A outside the judge's located wrong claims and -max(|A|, c) inside them: never positive,
    whatever the sequence's advantage, and -c when A = 0, so a group whose rollouts all scored the
    same (for PaLMR, typically all gated) still teaches which tokens were wrong. (Ours: the Differential
    Feedback idea of process supervision from the positions an error occupies.)
    """
    a = advantages[:, None].expand(wrong.shape)
    return torch.where(wrong.bool(), -torch.clamp(a.abs(), min=c), a)


def blacken_patches(pixel_values, image_mean, image_std, prob, generator):
    """VPPO's image perturbation, random patch blackening: each 14 x 14 patch row of Qwen2.5-VL's processed
    pixel_values (N, C * T * ps * ps), channel-major as the processor flattens it, is set with probability
    `prob` to the normalised value of a black pixel, (0 - mean_c) / std_c. -> (N, C*T*ps*ps), a new tensor.

    Source: VPPO's official code (huaixuheqing/VPPO-RL, verl/workers/perc_utils.py `random_patch_blackening`,
    patch 14, black_prob 0.5), which blackens 14-pixel blocks of the image before the processor; here the
    blocks are the processor's own patches, so every patch is wholly black or untouched.
    """
    n, width = pixel_values.shape
    channels = len(image_mean)
    black = -torch.tensor(image_mean, dtype=pixel_values.dtype) / torch.tensor(image_std, dtype=pixel_values.dtype)
    rows = torch.rand(n, generator=generator) < prob
    out = pixel_values.clone().view(n, channels, width // channels)
    out[rows] = black.to(out.device)[None, :, None]
    return out.view(n, width)


def vppo_dependency(logp, masked_logp, mask):
    """Per-token visual dependency S_t (B, T): how much a token's probability falls when the image is masked,
    the k3 estimate of KL(pi(. | image) || pi(. | masked image)) at the sampled token, clamped to [0, 10]:
    d = clamp(masked_logp - logp, -20, 20), S = exp(d) - d - 1. 0 where mask is 0. (VPPO official code,
    dp_actor.py: the divergence is computed on the sampled tokens only, not over the vocabulary.)"""
    d = (masked_logp - logp).clamp(-20.0, 20.0)
    return ((torch.exp(d) - d - 1.0).clamp(0.0, 10.0)) * mask


def vppo_advantages(advantages, dependency, mask, top_k=0.4, beta_min=0.9):
    """VPPO's two steps on GRPO advantages (B,), given S_t (B, T) and mask (B, T) -> (B, T) advantages, metrics.

    1. Trajectory advantage shaping: s_i = mean of S_t over row i's tokens; n_i = (s_i - min) / (max - min)
       over the rows given; alpha_i = beta_min + n_i (beta_max - beta_min), beta_max = beta_min +
       (1 - beta_min) / mean(n), so the alphas average 1; all alphas are 1 when max - min <= 1e-6.
    2. Token gradient filtering: per row, the ceil(top_k * T_i) tokens with the largest S_t keep
       A_i * alpha_i, the others get advantage 0 (no policy gradient; they still count in the token-mean
       and in the KL term, as in the official code).
    Source: arXiv 2510.09285 and its code (huaixuheqing/VPPO-RL, dp_actor.py), whose scripts use top_k 0.4 and
    beta_min 0.9. Ours: min, max and mean over the rows given (one rank's update batch); the official code
    takes min/max over a device's PPO mini-batch and the mean over its micro-batch.
    """
    mask = mask.bool()
    tokens = mask.sum(1)
    s = (dependency * mask).sum(1) / tokens.clamp(min=1)
    rows = tokens > 0  # an empty completion has no tokens to weight
    alpha = torch.ones_like(s)
    if rows.any() and float(s[rows].max() - s[rows].min()) > 1e-6:
        n = ((s - s[rows].min()) / (s[rows].max() - s[rows].min())).clamp(0.0, 1.0)
        mu = n[rows].mean()
        beta_max = beta_min + (1.0 - beta_min) / (mu + 1e-8)
        alpha = beta_min + n * (beta_max - beta_min)
    keep = torch.zeros_like(mask)
    ranked = dependency.masked_fill(~mask, float("-inf")).argsort(dim=1, descending=True, stable=True)
    for i, n_tokens in enumerate(tokens.tolist()):  # one device sync, not one per row
        keep[i, ranked[i, :math.ceil(top_k * n_tokens)]] = True
    keep &= mask
    metrics = {"vppo/dependency": float((dependency * mask).sum() / mask.sum().clamp(min=1)),
               "vppo/alpha_min": float(alpha.min()), "vppo/alpha_max": float(alpha.max()),
               "vppo/kept": float(keep.sum() / mask.sum().clamp(min=1))}
    return (advantages * alpha)[:, None] * keep, metrics


# -----------------------------------------------------------------------------
# Advantage


def group_advantages(rewards, group_size, scale="group", eps=1e-6):
    """A_i = (R_i - mean of its group) / (std + eps); rewards laid out group after group. (N,) -> (N,)"""
    assert rewards.numel() % group_size == 0, f"{rewards.numel()} rewards do not split into groups of {group_size}"
    r = rewards.float().view(-1, group_size)  # (groups, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        assert group_size > 1, "a group std needs group_size >= 2"
        centred = centred / (r.std(dim=1, keepdim=True) + eps)  # unbiased std; zero-variance group -> 0
    elif scale == "batch":
        centred = centred / (r.std() + eps) if r.numel() > 1 else centred
    elif scale != "none":
        raise ValueError(f"unknown advantage scale {scale!r}")
    return centred.view(-1)


# -----------------------------------------------------------------------------
# Log-probs of completion tokens only


PREFIX_ATTENTION = "palmr_prefix"  # the text model's attention implementation for --prefix-attention branch/flex
_compiled_flex = None


class PrefixBranches:
    """The shared-prefix layout as prefix_attention sees it, from branch (S, L) (shared_prefix_batch): per
    sequence, the prompt length and each completion's [start, end) in the sequence, in order."""

    def __init__(self, branch):
        self.shape = tuple(branch.shape)
        self.spans = []
        for row in branch.tolist():
            prompt = row.count(0)  # the prompt comes first
            runs = []
            for i in range(prompt, len(row)):
                if row[i] < 0:
                    break
                if not runs or row[i] != row[i - 1]:
                    runs.append([i, i + 1])
                else:
                    runs[-1][1] = i + 1
            self.spans.append((prompt, [tuple(r) for r in runs]))


def branch_attention(query, key, value, layout, scaling):
    """Exact attention of the shared-prefix layout without an (L, L) mask: per sequence, the prompt attends
    causally to itself, and each completion to the prompt and causally to itself: one SDPA call on
    [prompt keys; its keys] with PyTorch's lower-right causal bias (`causal_lower_right`), which CUDA runs
    with the flash or memory-efficient kernels and no mask tensor. The work and memory are those of the
    per-row layout's attention, with the prompt's keys computed once. Grouped keys are repeated to the query
    heads first (what transformers' SDPA path does too), since the lower-right flash path takes no GQA.
    query (S, Hq, L, D), key/value (S, Hkv, L, D) -> (S, Hq, L, D); padding rows are 0 (never read)."""
    from torch.nn.attention.bias import causal_lower_right
    sdpa = torch.nn.functional.scaled_dot_product_attention
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = []
    for s, (prompt, runs) in enumerate(layout.spans):
        q, k, v = query[s:s + 1], key[s:s + 1], value[s:s + 1]
        parts = [sdpa(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], is_causal=True, scale=scaling)]
        for start, end in runs:
            keys = torch.cat([k[:, :, :prompt], k[:, :, start:end]], 2)
            values = torch.cat([v[:, :, :prompt], v[:, :, start:end]], 2)
            parts.append(sdpa(q[:, :, start:end], keys, values, scale=scaling,
                              attn_mask=causal_lower_right(end - start, prompt + end - start)))
        done = runs[-1][1] if runs else prompt
        parts.append(query.new_zeros((1, query.shape[1], query.shape[2] - done, query.shape[3])))
        out.append(torch.cat(parts, 2))
    return torch.cat(out, 0)


def prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The text model's attention function (transformers' AttentionInterface) for the shared-prefix layout:
    branch_attention when the mask is a PrefixBranches, torch flex_attention when it is a BlockMask (both
    from prefix_attention_mask), PyTorch SDPA for every other mask (per-row forwards, HF generation and
    evaluation). query (B, Hq, L, D), key/value (B, Hkv, L, D) -> (B, L, Hq, D), None.
    A registered function because Qwen2.5-VL's text model has no flex_attention support in transformers 5.2x
    (from_pretrained refuses it). flex_attention is compiled on GPUs; on CPU PyTorch runs it uncompiled and has
    no backward for it, so the tests check its forward only. The flex route is UNVERIFIED on a GPU.
    """
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if isinstance(attention_mask, PrefixBranches):
        return branch_attention(query, key, value, attention_mask, scaling).transpose(1, 2).contiguous(), None
    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    global _compiled_flex
    if query.is_cuda and _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)  # dynamo marks the changing (S, L) dynamic after one recompile
    fn = _compiled_flex if query.is_cuda else flex_attention
    out = fn(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def use_prefix_attention(model, route):
    """Record the shared-prefix attention route (`branch`, `dense`, `flex`) on the model; for branch and flex,
    switch the text model's attention to prefix_attention (the vision tower keeps its own)."""
    if route != "dense":
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)
        AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)  # the masks of ordinary forwards: SDPA's
        model.set_attn_implementation({"text_config": PREFIX_ATTENTION})
    model.prefix_attention = route
    return model


def _completion_tensors(rows, pad_id, wrong=None):
    """completion_ids, mask, sampler_logp (B, T) right-padded, T >= 1, and wrong (B, T) when `wrong` (per row:
    token indices of located wrong claims): the per-token tensors both layouts share."""
    width = max(1, max(len(c.token_ids) for _, c in rows))
    completion = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    sampler_logp = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (_, c) in enumerate(rows):
        completion[i, :len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
        mask[i, :len(c.token_ids)] = 1
        sampler_logp[i, :len(c.logprobs)] = torch.tensor(c.logprobs, dtype=torch.float32)
    out = {"completion_ids": completion, "mask": mask, "sampler_logp": sampler_logp}
    if wrong is not None:
        out["wrong"] = torch.zeros((len(rows), width), dtype=torch.float32)
        for i, idx in enumerate(wrong):
            out["wrong"][i, idx] = 1.0
    return out


def training_batch(rows, encoded, pad_id, device, wrong=None):
    """Per-row layout: prompt left-padded + completion right-padded, every per-token tensor built from the same ids.

    -> dict(input_ids, attention_mask (B, P+T), pixel_values, image_grid_thw, completion_ids, mask,
    sampler_logp (B, T)), and wrong (B, T) when `wrong` (per row: token indices of located wrong claims)
    """
    batch = palmr.collate_prompts([encoded[s.id] for s, _ in rows], pad_id)
    batch.update(_completion_tensors(rows, pad_id, wrong))
    completion, mask = batch["completion_ids"], batch["mask"]
    batch["input_ids"] = torch.cat([batch["input_ids"], completion], 1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], mask], 1)
    if "mm_token_type_ids" in batch:  # completion tokens are text (mRoPE positions, palmr.mrope_needs_token_types)
        batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(completion)], 1)
    return {k: v.to(device) for k, v in batch.items()}


def shared_prefix_batch(rows, encoded, pad_id, device, wrong=None):
    """Shared-prefix layout: each run of consecutive rows with the same prompt (a group, or part of one) is one
    sequence, the prompt once and then the run's completions, each completion seeing the prompt and its own
    earlier tokens only (prefix_attention_mask). The vision tower and every prompt token run once per run
    instead of once per row; README "Shared-prefix forward".

    -> dict(input_ids (S, L) right-padded; branch (S, L): 0 on the prompt, j on the sequence's j-th completion
    (j >= 1), -1 on padding; shift (S, L): how many positions a completion token sits after where it would be
    alone after its prompt (the total length of the earlier completions of its sequence; 0 on the prompt);
    hidden_index (B, T): the flat index into (S * L) of the position whose hidden state predicts each
    completion token (the prompt's last token for the first one); pixel_values and image_grid_thw once per
    sequence; mm_token_type_ids (S, L) where the installed transformers needs them; and training_batch's
    completion_ids, mask, sampler_logp (B, T) [, wrong (B, T)], for the same rows in the same order).
    """
    runs = []  # [prompt id, row indices]
    for i, (s, _) in enumerate(rows):
        if runs and runs[-1][0] == s.id:
            runs[-1][1].append(i)
        else:
            runs.append([s.id, [i]])
    batch = _completion_tensors(rows, pad_id, wrong)
    hidden_at = torch.zeros_like(batch["completion_ids"])  # (B, T): position in its own sequence
    seqs = []  # (ids, branch, shift, types)
    for k, (sid, idx) in enumerate(runs):
        e = encoded[sid]
        ids, P = list(e["input_ids"]), len(e["input_ids"])
        branch, shift = [0] * P, [0] * P
        types = list(e.get("mm_token_type_ids", [0] * P))
        for j, i in enumerate(idx, 1):
            c = rows[i][1].token_ids
            start = len(ids)
            hidden_at[i, :len(c)] = torch.tensor([P - 1] + list(range(start, start + len(c) - 1)))[:len(c)]
            ids += list(c)
            branch += [j] * len(c)
            shift += [start - P] * len(c)
            types += [0] * len(c)
        seqs.append((ids, branch, shift, types))
    S, L = len(seqs), max(len(q[0]) for q in seqs)
    full = lambda fill: torch.full((S, L), fill, dtype=torch.long)  # noqa: E731
    batch["input_ids"], batch["branch"], batch["shift"], types = full(pad_id), full(-1), full(0), full(0)
    for k, (ids, branch, shift, typ) in enumerate(seqs):
        for name, values in (("input_ids", ids), ("branch", branch), ("shift", shift)):
            batch[name][k, :len(values)] = torch.tensor(values, dtype=torch.long)
        types[k, :len(typ)] = torch.tensor(typ, dtype=torch.long)
    row_seq = torch.tensor([k for k, (_, idx) in enumerate(runs) for _ in idx], dtype=torch.long)
    batch["hidden_index"] = row_seq[:, None] * L + hidden_at  # masked positions point at a valid index (unread)
    vision = [encoded[sid] for sid, _ in runs if "pixel_values" in encoded[sid]]
    if vision:
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in vision])
        batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in vision])
        if palmr.mrope_needs_token_types():
            batch["mm_token_type_ids"] = types
    return {k: v.to(device) for k, v in batch.items()}


def prefix_attention_mask(branch, route="branch", implementation="sdpa", dtype=torch.float32):
    """The shared-prefix layout's attention rule, from branch (S, L) (shared_prefix_batch), in the form `route`
    and the text model's attention `implementation` take.

    Rule: query i sees key j iff j <= i, j is not padding, and j is on the prompt or on i's own completion; a
    padding query sees itself too, so its softmax is finite (its output is never read).
    -> route branch: a PrefixBranches (branch_attention; no (L, L) tensor). route flex: a torch BlockMask
    (fully masked blocks skipped; built compiled on GPUs, where its memory is linear in L). route dense: an (S, 1, L, L) mask, bool (True = attend,
    PyTorch SDPA's convention) for sdpa, additive float (0 or finfo(dtype).min) for eager. Raises ValueError
    for a dense mask and any other implementation (flash-attention kernels take no custom mask).
    """
    S, L = branch.shape
    if route == "branch":
        return PrefixBranches(branch)
    if route == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def allowed(b, h, q, kv):
            key, query = branch[b, kv], branch[b, q]
            return ((kv <= q) & (key >= 0) & ((key == 0) | (key == query))) | (kv == q)
        # compiled on GPUs, so the (S, 1, L, L) mask is never materialised; uncompiled (CPU tests) it is
        return create_block_mask(allowed, B=S, H=None, Q_LEN=L, KV_LEN=L, device=branch.device, _compile=branch.is_cuda)
    key, query = branch[:, None, :], branch[:, :, None]  # broadcast, not gathered: (S, L, L) bools only
    causal = torch.ones((L, L), dtype=torch.bool, device=branch.device).tril()
    mask = (causal & (key >= 0) & ((key == 0) | (key == query))) | torch.eye(L, dtype=torch.bool, device=branch.device)
    if implementation in ("sdpa", PREFIX_ATTENTION):  # prefix_attention hands a tensor mask to SDPA
        return mask[:, None]
    if implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=branch.device).masked_fill(~mask, torch.finfo(dtype).min)[:, None]
    raise ValueError(f"a dense shared-prefix mask needs an attention implementation that takes one (sdpa, eager), "
                     f"not {implementation!r}; use --prefix-attention branch or --no-shared-prefix")


class FusedLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T / T)[targets] and the entropy, `chunk` rows at a time.

    Memory: one or two (chunk, V) buffers, allocated once per call and reused by every block (fresh
    large allocations cost page faults on CPU); the (N, V) logits never exist. Precision: the matmul
    runs in the input dtype (as the sampler's does), its block is cast to fp32 (fp64 stays fp64) before
    temperature, log-sum-exp and softmax; gradients come out in the inputs' dtypes, each block's matmul
    summing in fp32. Backward recomputes each
    block: d logp / d logits = (onehot - p) / T, so with s = g / T per row,
    grad_hidden = s * (W[target] - p W) and grad_weight = sum_rows (onehot - p)^T (s * h).
    The row scale s is applied to the (chunk, H) operands, never to the (chunk, V) block.
    """

    @staticmethod
    def _logits(hidden, weight, buf, temperature):
        """Write the temperature-scaled logits of `hidden` rows into buf (c, V) and return it."""
        if hidden.dtype == buf.dtype:
            torch.mm(hidden, weight.T, out=buf)
        else:
            buf.copy_(hidden @ weight.T)  # bf16 matmul, then fp32 from here on
        return buf.div_(temperature) if temperature != 1.0 else buf

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for gradcheck
        n, c = hidden.shape[0], min(chunk_size, hidden.shape[0])
        logp, entropy, lse = (torch.empty(n, dtype=acc, device=hidden.device) for _ in range(3))
        block = torch.empty(c, weight.shape[0], dtype=acc, device=hidden.device)  # (c, V)
        probs = torch.empty_like(block)
        for s in range(0, n, c):
            e = min(s + c, n)
            x = FusedLogprobs._logits(hidden[s:e], weight, block[:e - s], temperature)
            m = x.amax(-1, keepdim=True)
            x.sub_(m)  # shifted logits: exp cannot overflow
            p = torch.exp(x, out=probs[:e - s])  # unnormalised probabilities
            z = p.sum(-1)
            log_z = z.log()
            lse[s:e] = m.squeeze(1) + log_z
            logp[s:e] = x.gather(1, targets[s:e, None]).squeeze(1) - log_z
            entropy[s:e] = log_z - p.mul_(x).sum(-1) / z  # -sum q log q with q = p / z
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk_size = temperature, c
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        acc, n, c = lse.dtype, hidden.shape[0], ctx.chunk_size
        # gradients in the inputs' dtypes, as in FusedPolicyLoss: fp32 sums inside each block's matmul
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        block = torch.empty(c, weight.shape[0], dtype=acc, device=hidden.device)
        scale = grad_logp.to(acc)[:, None] / ctx.temperature  # (N, 1)
        for s in range(0, n, c):
            e = min(s + c, n)
            p = FusedLogprobs._logits(hidden[s:e], weight, block[:e - s], ctx.temperature)
            p.sub_(lse[s:e, None]).exp_()  # softmax, in place
            p[torch.arange(e - s, device=p.device), targets[s:e]] -= 1.0  # p - onehot = -(d logp / d logits) * T
            d = p if hidden.dtype == acc else p.to(hidden.dtype)  # matmuls in the input dtype
            h = (hidden[s:e].to(acc) * -scale[s:e]).to(hidden.dtype)  # (c, H): s * h, with the sign of (onehot - p)
            torch.mm(d, weight, out=grad_hidden[s:e])
            grad_weight.addmm_(d.T, h)  # in place: no (V, H) temporary per block
            grad_hidden[s:e].mul_(-scale[s:e].to(hidden.dtype))
        return grad_hidden, grad_weight, None, None, None


def fused_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=128):
    """Per-token log-probs of `targets` under softmax(hidden @ weight.T / temperature), and the entropy.

    hidden (N, H), weight (V, H), targets (N,) -> logp (N,) differentiable w.r.t. hidden and weight,
    entropy (N,) detached; both fp32 (fp64 for fp64 inputs). The (N, V) logits never exist.
    """
    assert hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1], "hidden (N, H), weight (V, H)"
    assert targets.shape == hidden.shape[:1], "one target per row"
    if hidden.shape[0] == 0:  # no completion tokens here: keep the head in the graph (FSDP expects its grad)
        zero = ((hidden.sum() + weight.sum()) * 0.0).float()
        return zero.expand(0), torch.zeros(0, device=hidden.device)
    return FusedLogprobs.apply(hidden, weight, targets, float(temperature), int(chunk_size))


def naive_logprobs(hidden, weight, targets, temperature=1.0):
    """The textbook path, (N, V) logits and their log-softmax in full: the reference the tests compare to."""
    logits = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32)) / temperature  # (N, V), fp64 stays
    log_p = logits.log_softmax(-1)
    return log_p.gather(1, targets[:, None]).squeeze(1), -(log_p.exp() * log_p).sum(-1).detach()


class FusedPolicyLoss(torch.autograd.Function):
    """A token loss of the log-probs, with its LM-head gradients computed in the forward pass: no recompute.

    Each block of rows is visited once: its logits, log-sum-exp, log-prob and entropy (as FusedLogprobs),
    then g = d loss / d logp for those rows from `token_loss` (by autograd on the (c,) log-probs) (an elementwise function of the rows'
    log-probs, e.g. PPO-clip + k3 KL: `token_policy_loss`), then, in the logits buffer itself,
    d loss / d logits = g / T * (onehot - softmax), and grad_hidden / grad_weight from it. Backward only
    scales the stored gradients by the scalar upstream gradient. Three (N, H) x (H, V) matmuls per call,
    as the naive path; FusedLogprobs needs four (backward recomputes the logits). The same idea as
    Liger-Kernel's fused linear cross-entropy (which is Triton); here plain PyTorch.

    Memory: two (chunk, V) fp32 buffers (and a bf16 copy for bf16 inputs), and the (N, H) and (V, H)
    gradients in the inputs' dtypes (the naive path's backward makes those two as well); the (N, V)
    logits never exist. The stored gradients are scaled in place in backward, so a graph through this
    function supports one backward (a second raises RuntimeError).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, token_loss):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        n, c = hidden.shape[0], min(chunk_size, hidden.shape[0])
        logp, entropy = (torch.empty(n, dtype=acc, device=hidden.device) for _ in range(2))
        # gradients in the inputs' dtypes: each block's matmul sums in fp32, the sum over blocks is rounded
        # to the weight's dtype. For bf16 that costs precision (measured in review: 24 blocks, 0.59% relative
        # error of grad_weight vs 0.17% for one bf16 GEMM) and saves an fp32 (V, H) accumulator (2 GiB at 7B)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        block = torch.empty(c, weight.shape[0], dtype=acc, device=hidden.device)  # (c, V)
        probs = torch.empty_like(block)
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, n, c):
            e, rows = min(s + c, n), torch.arange(min(s + c, n) - s, device=hidden.device)
            x = FusedLogprobs._logits(hidden[s:e], weight, block[:e - s], temperature)
            x.sub_(x.amax(-1, keepdim=True))  # shifted logits
            p = torch.exp(x, out=probs[:e - s])  # unnormalised probabilities
            z = p.sum(-1)
            log_z = z.log()
            logp[s:e] = x[rows, targets[s:e]] - log_z
            entropy[s:e] = log_z - p.mul_(x).sum(-1) / z  # -sum q log q with q = p / z (p is scratch now)
            with torch.enable_grad():
                lp = logp[s:e].detach().requires_grad_(True)
                part = token_loss(lp, s, e).sum()
                (g,) = torch.autograd.grad(part, lp)
            loss += part.detach().to(acc)
            scale = g.to(acc) / temperature  # (c,): d loss / d logits = scale * (onehot - q)
            x.sub_(log_z[:, None]).exp_().mul_(-scale[:, None])  # in the logits buffer: q, then -scale * q
            x[rows, targets[s:e]] += scale  # now d loss / d logits
            d = x if hidden.dtype == acc else x.to(hidden.dtype)  # bf16 / fp16: matmuls in the input dtype
            torch.mm(d, weight, out=grad_hidden[s:e])
            grad_weight.addmm_(d.T, hidden[s:e])  # in place: no (V, H) temporary per block
        ctx.grads = grad_hidden, grad_weight  # intermediates, not inputs or outputs: kept on ctx
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, grad_logp, grad_entropy):
        if ctx.grads is None:
            raise RuntimeError("fused_policy_loss: one backward per forward (its stored gradients are scaled in "
                               "place, with no (V, H) temporary); run the forward again")
        (grad_hidden, grad_weight), ctx.grads = ctx.grads, None
        return grad_hidden.mul_(grad_loss), grad_weight.mul_(grad_loss), None, None, None, None


def fused_policy_loss(hidden, weight, targets, token_loss, temperature=1.0, chunk_size=128):
    """sum_i token_loss(logp_i) over rows, differentiable w.r.t. hidden and weight, gradients folded in forward.

    hidden (N, H), weight (V, H), targets (N,); token_loss(logp_rows (c,), start, end) -> (c,) per-row losses
    of rows start:end, differentiable in logp_rows and elementwise (row i's loss depends on logp_i only).
    -> loss (), logp (N,) and entropy (N,), the last two detached. Same values as
    token_loss(fused_logprobs(...)[0]).sum(), one matmul fewer (FusedPolicyLoss).
    """
    assert hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1], "hidden (N, H), weight (V, H)"
    assert targets.shape == hidden.shape[:1], "one target per row"
    if hidden.shape[0] == 0:  # keep the head in the graph (FSDP expects its grad)
        zero = ((hidden.sum() + weight.sum()) * 0.0).float()
        return zero, torch.zeros(0, device=hidden.device), torch.zeros(0, device=hidden.device)
    return FusedPolicyLoss.apply(hidden, weight, targets, float(temperature), int(chunk_size), token_loss)


def _completion_hidden(model, batch):
    """(B, T, H) last hidden states at the positions that predict the completion tokens, and the LM head's
    scored rows (V', H): an FSDP forward, so inside it the head's weight is the unsharded full tensor.
    `batch` is in either layout (training_batch, shared_prefix_batch)."""
    if "branch" in batch:
        return _shared_prefix_hidden(model, batch), model.lm_head.weight[:getattr(model, "scored_vocab", None)]
    types = {"mm_token_type_ids": batch["mm_token_type_ids"]} if "mm_token_type_ids" in batch else {}
    out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"], use_cache=False,
                      **types)  # with the image tokens' types, the 3-D mRoPE positions the checkpoint was trained with
    T = batch["completion_ids"].shape[1]
    P = batch["input_ids"].shape[1] - T
    # the LM head's padding rows beyond the tokenizer are never sampled (palmr.suppressed_token_ids), so
    # they are not scored either: the softmax runs over the tokenizer's rows only (scored_vocab)
    return out.last_hidden_state[:, P - 1:P - 1 + T], model.lm_head.weight[:getattr(model, "scored_vocab", None)]


def _shared_prefix_hidden(model, batch):
    """(B, T, H) hidden states of a shared_prefix_batch: one forward over its sequences with the block mask and
    each completion's mRoPE positions continuing from its prompt's, as if it were alone after the prompt."""
    ids, branch = batch["input_ids"], batch["branch"]
    valid = (branch >= 0).long()
    types = {"mm_token_type_ids": batch["mm_token_type_ids"]} if "mm_token_type_ids" in batch else {}
    if "image_grid_thw" in batch:  # the model's own 3-D positions of prompt + completions laid end to end ...
        positions = model.model.get_rope_index(input_ids=ids, image_grid_thw=batch["image_grid_thw"],
                                               attention_mask=valid, **types)[0]
    else:
        positions = (valid.cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1)
    positions = positions - batch["shift"][None]  # ... then each completion moved back to follow its prompt
    language = model.model.language_model
    route = getattr(model, "prefix_attention", "dense")
    mask = prefix_attention_mask(branch, route, language.config._attn_implementation, language.embed_tokens.weight.dtype)
    if route == "branch":  # not a tensor: handed to every layer as is, past transformers' mask preparation
        assert all(t == "full_attention" for t in language.config.layer_types), "branch attention: no sliding windows"
        mask = {t: mask for t in set(language.config.layer_types)}
    vision = {"pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]} \
        if "pixel_values" in batch else {}
    out = model.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **vision, **types)
    return out.last_hidden_state.flatten(0, 1)[batch["hidden_index"]]


def completion_loss(model, batch, temperature, token_loss):
    """The policy loss of a micro-batch with the LM-head gradient folded into the forward (fused_policy_loss).

    token_loss(logp_rows, start, end) -> per-token losses of the completion tokens start:end, counted in
    row-major order over the (B, T) mask. -> loss (), logp (B, T) and entropy (B, T) detached (0 where masked).
    """
    hidden, weight = _completion_hidden(model, batch)
    mask = batch["mask"].bool()
    dtype = torch.promote_types(torch.float32, hidden.dtype)  # float32, or float64 for a float64 model (tests)
    logp = torch.zeros(mask.shape, dtype=dtype, device=hidden.device)
    entropy = torch.zeros(mask.shape, dtype=dtype, device=hidden.device)
    loss, logp[mask], entropy[mask] = fused_policy_loss(hidden[mask], weight, batch["completion_ids"][mask],
                                                        token_loss, temperature, model.logprob_chunk)
    return loss, logp, entropy


def completion_logprobs(model, batch, temperature):
    """(B, T) log-probs and entropies of the completion tokens; masked positions are 0. An FSDP forward."""
    hidden, weight = _completion_hidden(model, batch)  # only completion positions reach the LM head
    mask = batch["mask"].bool()
    dtype = torch.promote_types(torch.float32, hidden.dtype)  # float32, or float64 for a float64 model (tests)
    logp = torch.zeros(mask.shape, dtype=dtype, device=hidden.device)
    entropy = torch.zeros(mask.shape, dtype=dtype, device=hidden.device)
    if model.logprob_impl == "fused":
        logp[mask], entropy[mask] = fused_logprobs(hidden[mask], weight, batch["completion_ids"][mask], temperature,
                                                   model.logprob_chunk)
    else:
        logp[mask], entropy[mask] = naive_logprobs(hidden[mask], weight, batch["completion_ids"][mask], temperature)
    return logp, entropy


# -----------------------------------------------------------------------------
# Loss


def sequence_is_weights(old_logp, sampler_logp, mask, cap):
    """Sequence-level importance weights for the sampler/trainer mismatch, masked above a cap. -> (B,), metrics

    rho = exp(sum_t (old_logp - sampler_logp)): the probability of the whole completion under the trainer's
    policy over the sampler's. Sequences with rho > cap are dropped (weight 0); the rest keep weight rho.
    """
    mask = mask.float()
    log_rho = ((old_logp - sampler_logp) * mask).sum(-1)  # (B,)
    rho = torch.exp(log_rho.clamp(max=20.0))  # the clamp only avoids inf: such sequences are masked anyway
    keep = rho <= cap
    metrics = {"is/ratio_mean": rho.mean(), "is/masked_frac": (~keep).float().mean(),
               "is/token_logp_gap": ((old_logp - sampler_logp).abs() * mask).sum() / mask.sum().clamp(min=1.0)}
    return torch.where(keep, rho, torch.zeros_like(rho)), metrics


def token_policy_loss(logp, old_logp, ref_logp, advantages, eps_low, eps_high, beta, is_weights=None):
    """PPO-clip + beta * k3 KL per token, before masking. All inputs broadcast to logp's shape. -> loss, kl, clipped

    Elementwise: a token's loss depends on its own log-prob only (what fused_policy_loss relies on).
    """
    ratio = torch.exp(logp - old_logp)
    per_token = -torch.minimum(ratio * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages)
    if is_weights is not None:
        per_token = per_token * is_weights
    kl = torch.zeros_like(logp)
    if beta > 0:
        assert ref_logp is not None, "beta > 0 needs ref_logp"
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1  # k3: unbiased, always >= 0
        per_token = per_token + beta * kl
    clipped = ((ratio < 1 - eps_low) & (advantages < 0)) | ((ratio > 1 + eps_high) & (advantages > 0))
    return per_token, kl, clipped


def policy_loss(logp, old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta, is_weights=None):
    """PPO-clip + beta * k3 KL, token-mean over unmasked tokens. (B, T) inputs; advantages (B,), or (B, T)
    per token (token_advantages): a (B,) advantage means the same as that value on every token.

    is_weights (B,), optional: importance weights on the policy-gradient term (sequence_is_weights).
    """
    mask = mask.float()
    n_tokens = mask.sum().clamp(min=1.0)  # guard: an all-masked micro-batch gives 0, never NaN
    adv = advantages if advantages.dim() == 2 else advantages[:, None]
    per_token, kl, clipped = token_policy_loss(logp, old_logp, ref_logp, adv, eps_low, eps_high, beta,
                                               None if is_weights is None else is_weights[:, None])
    loss = (per_token * mask).sum() / n_tokens
    metrics = {"kl": (kl * mask).sum().detach() / n_tokens,
               "clip_frac": (clipped.float() * mask).sum() / n_tokens}
    return loss, metrics


def masked_token_loss(old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta, is_weights=None):
    """policy_loss as a function of the unmasked tokens' log-probs, for completion_loss (fused_policy_loss).

    (B, T) old_logp (None: the current log-probs, one update per rollout batch), ref_logp (None when
    beta = 0), mask; advantages (B,) or (B, T); is_weights (B,) or None. -> token_loss(logp_rows, start, end): the
    per-token losses of unmasked tokens start:end (row-major), each divided by the micro-batch's token count,
    so that their sum over all tokens is policy_loss(...)'s loss.
    """
    keep = mask.bool()
    n_tokens = keep.sum().clamp(min=1).float()
    adv = (advantages if advantages.dim() == 2 else advantages[:, None]).expand(keep.shape)[keep]
    old = None if old_logp is None else old_logp[keep]
    ref = None if ref_logp is None else ref_logp[keep]
    isw = None if is_weights is None else is_weights[:, None].expand(keep.shape)[keep]

    def token_loss(logp, s, e):
        per_token, _, _ = token_policy_loss(logp, logp.detach() if old is None else old[s:e],
                                            None if ref is None else ref[s:e], adv[s:e], eps_low, eps_high, beta,
                                            None if isw is None else isw[s:e])
        return per_token / n_tokens
    return token_loss


# -----------------------------------------------------------------------------
# Model setup: FSDP2 per decoder layer and vision block


LOGPROB_CHUNK_CPU = 128  # CPU: the measured best (bench/logprob.py, README)
LOGPROB_MEMORY_MIB = 1024  # GPU: the fused LM head's (chunk, V) working set, README "LM head"


def logprob_chunk(vocab, device_type, memory_mib=LOGPROB_MEMORY_MIB):
    """Rows per block of the fused LM head: CPU's measured best, or on a GPU as many rows as fit `memory_mib`.

    A block of c rows holds two fp32 (c, V) buffers and, for bf16 inputs, one bf16 copy: 10 bytes per
    logit. Rounded down to a multiple of 64 rows (at least 64). Qwen2.5-VL-7B (V 152,064), 1024 MiB: 704.
    """
    if device_type != "cuda":
        return LOGPROB_CHUNK_CPU
    return max(64, memory_mib * 2 ** 20 // (10 * vocab) // 64 * 64)


def prepare_model(path, device, train, activation_checkpointing=False, logprobs="fused", chunk=None,
                  logprob_memory=LOGPROB_MEMORY_MIB, shard=True, prefix_attention="dense"):
    """Load, optionally checkpoint activations, shard with FSDP2 (when distributed and `shard`), register forwards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    model = palmr.load_model(path, dtype=torch.float32 if train or device.type == "cpu" else torch.bfloat16,
                             device=device)
    use_prefix_attention(model, prefix_attention)
    model.requires_grad_(train)
    if activation_checkpointing:  # transformers >= 5.2x renamed it; 5.17 (vLLM 0.26's era) has the old name
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.completion_logprobs = types.MethodType(completion_logprobs, model)
    model.completion_loss = types.MethodType(completion_loss, model)
    # the head's padding rows beyond the tokenizer are never sampled, so never scored (palmr.suppressed_token_ids)
    from transformers import AutoTokenizer
    model.scored_vocab = len(AutoTokenizer.from_pretrained(path))
    model.logprob_impl = logprobs
    model.logprob_chunk = chunk or logprob_chunk(model.scored_vocab, device.type, logprob_memory)
    if shard and dist.is_initialized():
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if device.type == "cuda" else MixedPrecisionPolicy()
        for block in list(model.model.visual.blocks) + list(model.model.language_model.layers):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)  # root: embeddings, merger, final norm, LM head
        register_fsdp_forward_method(model, "completion_logprobs")
        register_fsdp_forward_method(model, "completion_loss")
        register_fsdp_forward_method(model, "generate")
    model.train(train)
    return model


def all_reduce(x, op=dist.ReduceOp.SUM):
    if dist.is_initialized():
        dist.all_reduce(x, op=op)
    return x


# -----------------------------------------------------------------------------
# One optimisation pass over a rollout batch


def micro_batches(n, size):
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def row_tokens(rows, encoded, shared):
    """Tokens each row adds to a forward pass: its completion, plus its prompt unless (shared layout) the row
    before it has the same prompt. Padding not counted."""
    return [len(c.token_ids) + (0 if shared and i > 0 and rows[i - 1][0].id == s.id else len(encoded[s.id]["input_ids"]))
            for i, (s, c) in enumerate(rows)]


def split_tokens(tokens, n):
    """Rows with these token counts, in order -> n contiguous, non-empty ranges (n <= len(tokens)) cut where the
    running sum first reaches k / n of the total."""
    assert 1 <= n <= len(tokens), f"{n} micro-batches for {len(tokens)} rows"
    total, parts, start, acc = sum(tokens), [], 0, 0
    for i, t in enumerate(tokens):
        acc += t
        left_rows, left_parts = len(tokens) - i - 1, n - len(parts) - 1
        if left_parts > 0 and (acc >= total * (len(parts) + 1) / n or left_rows == left_parts):
            parts.append(range(start, i + 1))
            start = i + 1
    parts.append(range(start, len(tokens)))
    return parts


def update_micro_batches(rows, encoded, per_update, n_updates, args):
    """Per update, the micro-batches of this rank's rows (ranges into rows): --micro-batch rows each, or with
    --micro-tokens about that many tokens each (row_tokens in the layout used). Under FSDP every rank must run
    the same number of forwards, so the count is the largest any rank needs."""
    spans = []
    for u in range(n_updates):
        if args.micro_tokens > 0:
            tokens = row_tokens(rows[u * per_update:(u + 1) * per_update], encoded, bool(args.shared_prefix))
            n = min(len(tokens), max(1, math.ceil(sum(tokens) / args.micro_tokens)))
            n = int(all_reduce(torch.tensor(n), dist.ReduceOp.MAX))
            parts = split_tokens(tokens, n)
        else:
            parts = micro_batches(per_update, args.micro_batch)
        spans.append([range(u * per_update + p.start, u * per_update + p.stop) for p in parts])
    return spans


def full_parameters(model):
    """(name, full tensor) one at a time: under FSDP2 each full_tensor() is an all-gather on every rank."""
    for name, p in model.named_parameters():
        yield name, (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()


def vppo_masked_prompts(encoded, processor, prob, seed):
    """{id: encoded prompt with its image's patches blackened} (blacken_patches), a fixed draw per (seed, id)."""
    ip = processor.image_processor
    return {sid: {**e, "pixel_values": blacken_patches(e["pixel_values"], ip.image_mean, ip.image_std, prob,
                                                       torch.Generator().manual_seed(seed + zlib.crc32(sid.encode())))}
            if "pixel_values" in e else e for sid, e in encoded.items()}


def _pad_cat(tensors):
    """(B_j, T_j) tensors -> one (sum B_j, max T_j) tensor, zero-padded on the right."""
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors])


def train_on_rollouts(policy, reference, optimizer, processor, rows, encoded, advantages, args, device, wrong=None,
                      step=0):
    """PPO-clip updates over this rank's rows (group after group); -> metrics averaged over tokens.

    wrong: per row, the token indices of the judge's located wrong claims (span_tokens); with
    --credit token they get token_advantages' negative credit. step: seeds VPPO's image masks.
    """
    world = palmr.get_world_size()
    n_updates = args.rollout_batch // args.update_batch
    per_update = len(rows) // n_updates  # this rank's sequences per optimizer update
    spans = update_micro_batches(rows, encoded, per_update, n_updates, args)
    pad_id = processor.tokenizer.pad_token_id
    # micro-batches wait on the CPU and go to the device one at a time (pixel values are per row, or per
    # prompt in the shared-prefix layout)
    token_credit = args.credit == "token" and wrong is not None
    layout = shared_prefix_batch if args.shared_prefix else training_batch
    batches = [[layout([rows[i] for i in mb], encoded, pad_id, "cpu", [wrong[i] for i in mb] if token_credit
                       else None) for mb in update] for update in spans]
    vppo = getattr(args, "vppo", False)
    on = lambda b: {k: v.to(device, non_blocking=True) for k, v in b.items()}  # noqa: E731
    clock = PhaseClock(device)
    fold = policy.logprob_impl == "fused" and args.fold_loss_grad
    with torch.no_grad():  # reference and (for several updates) old log-probs, before any update
        ref_logps = [[reference.completion_logprobs(on(b), args.temperature)[0] for b in update]
                     for update in batches] if args.beta > 0 else None
        clock.lap("t_ref_logprobs" if args.beta > 0 else None)
        old_logps = [[policy.completion_logprobs(on(b), args.temperature)[0] for b in update]
                     for update in batches] if n_updates > 1 or vppo else None
        clock.lap("t_old_logprobs" if n_updates > 1 or vppo else None)
        vppo_adv, vppo_m = [], {}
        if vppo:  # the same rows scored with the image's patches blackened: each token's visual dependency
            masked = vppo_masked_prompts(encoded, processor, args.vppo_mask_prob, 1_000_003 * args.seed + step)
            for u, update in enumerate(spans):
                masks = [b["mask"].to(device) for b in batches[u]]
                dependency = [vppo_dependency(old_logps[u][j], policy.completion_logprobs(on(layout(
                    [rows[i] for i in mb], masked, pad_id, "cpu")), args.temperature)[0], masks[j])
                    for j, mb in enumerate(update)]
                adv, m = vppo_advantages(advantages[update[0].start:update[-1].stop].to(device), _pad_cat(dependency),
                                         _pad_cat(masks), args.vppo_top_k, args.vppo_beta_min)
                vppo_adv.append(list(adv.split([len(mb) for mb in update])))
                for k, v in m.items():
                    vppo_m[k] = vppo_m.get(k, 0.0) + v / n_updates
            clock.lap("t_vppo")
    totals = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "grad_norm": 0.0, "tokens": 0.0}
    if args.is_cap > 0:
        totals.update({"is/ratio_mean": 0.0, "is/masked_frac": 0.0, "is/token_logp_gap": 0.0})
    for u in range(n_updates):
        local_tokens = sum(float(b["mask"].sum()) for b in batches[u])
        global_tokens = float(all_reduce(torch.tensor(local_tokens)))
        for j, (b, span) in enumerate(zip(batches[u], spans[u])):
            # FSDP2 reduce-scatters after every micro-batch: skipping it (no-sync) would hold the full
            # unsharded fp32 gradients on every rank, ~30 GB for a 7B policy
            b = on(b)
            old = old_logps[u][j] if old_logps is not None else None
            ref = ref_logps[u][j] if ref_logps is not None else None
            adv = advantages[span.start:span.stop].to(device)  # (B,)
            if token_credit:
                adv = token_advantages(adv, b["wrong"], args.credit_c)  # (B, T)
            if vppo:
                adv = vppo_adv[u][j][:, :b["mask"].shape[1]]  # (B, T)
            is_weights = is_m = None
            if args.is_cap > 0 and old is not None:
                is_weights, is_m = sequence_is_weights(old, b["sampler_logp"], b["mask"], args.is_cap)
            # the folded LM head needs each token's loss as a function of its own log-prob alone: IS weights
            # from this very forward's log-probs (one update per rollout batch) are not known before it
            if fold and not (args.is_cap > 0 and old is None):
                folded, logp, entropy = policy.completion_loss(b, args.temperature, masked_token_loss(
                    old, ref, adv, b["mask"], args.eps_low, args.eps_high, args.beta, is_weights))
            else:
                folded, (logp, entropy) = None, policy.completion_logprobs(b, args.temperature)  # (B, T) each
            old = logp.detach() if old is None else old
            if args.is_cap > 0 and is_weights is None:
                is_weights, is_m = sequence_is_weights(old, b["sampler_logp"], b["mask"], args.is_cap)
            for k, v in (is_m or {}).items():
                totals[k] += float(v) * len(span) / len(rows)  # mean over this rank's sequences
            if args.debug_logprobs and u == 0 and j == 0:  # first batch after the last weight sync
                gap = (old - b["sampler_logp"]).abs()[b["mask"].bool()]
                totals["debug/logprob_gap_max"] = float(gap.max()) if gap.numel() else 0.0
                totals["debug/logprob_gap_mean"] = float(gap.mean()) if gap.numel() else 0.0
            loss, m = policy_loss(logp, old, ref, adv, b["mask"], args.eps_low, args.eps_high, args.beta, is_weights)
            if folded is not None:  # same value (logp is detached here: metrics only); gradients from the fold
                loss = folded
            # token-mean over the global update batch: FSDP averages gradients over ranks, hence * world
            weight = float(b["mask"].sum()) / max(global_tokens, 1.0)
            (loss * weight * world).backward()
            totals["loss"] += float(loss.detach()) * weight
            totals["kl"] += float(m["kl"]) * weight
            totals["clip_frac"] += float(m["clip_frac"]) * weight
            totals["entropy"] += float((entropy * b["mask"]).sum()) / max(global_tokens, 1.0)
        clock.lap("t_policy")  # forward + backward of the update's micro-batches
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.lap("t_optimizer")
        totals["grad_norm"] += float(grad_norm) / n_updates
        totals["tokens"] += global_tokens
    for k in ("loss", "kl", "clip_frac", "entropy"):  # each rank holds its share of the token-weighted sum
        totals[k] = float(all_reduce(torch.tensor(totals[k]))) / n_updates
    totals.update(vppo_m)
    for k in [k for k in totals if k.startswith(("is/", "debug/", "vppo/"))]:  # per-rank means -> mean over ranks
        totals[k] = float(all_reduce(torch.tensor(totals[k]))) / world
    return {**totals, **clock.times}


class PhaseClock:
    """Wall time per phase, summed over laps (seconds); on CUDA each lap waits for the device first, so a
    phase is charged for its own kernels (one sync per phase, not per kernel)."""

    def __init__(self, device):
        self.cuda, self.times, self.last = device.type == "cuda", {}, None
        self.lap(None)

    def lap(self, name):
        if self.cuda:
            torch.cuda.synchronize()
        now = time.time()
        if name is not None:
            self.times[name] = self.times.get(name, 0.0) + now - self.last
        self.last = now


# -----------------------------------------------------------------------------
# Supervised warm-up: a tiny policy that can do the task (and misread it sometimes), before RL


def sr1_trace(trace):
    """A `<think>...</think> ... \\boxed{a}` trace in Vision-SR1's format: its first sentence (the observation)
    as the description, the rest as the reasoning: `<description>...</description><think>...</think> \\boxed{a}`
    (palmr.parse_description's layout; arXiv 2508.19652). A one-sentence trace keeps it in both blocks."""
    think, answer, well_formed = palmr.parse_response(trace)
    assert well_formed and think, f"not a <think> ... \\boxed{{}} trace: {trace[:80]!r}"
    head, _, tail = think.strip().partition(". ")
    head, tail = (head + ".", tail) if tail else (head, head)
    return f"<description>{head}</description><think>{tail}</think> \\boxed{{{answer}}}"


def warmup(model_path, data_path, out_dir, steps=300, batch=16, lr=2e-3, max_pixels=112 * 112, seed=0, log_every=50,
           hallucinated_share=0.0, trace_format="think"):
    """SFT on the samples' reference traces, a `hallucinated_share` of them misread on purpose
    (data.hallucinated_trace: same answer, one wrong group), so the start policy hallucinates like real
    base models do; save to out_dir. One process (never sharded, even under torchrun), teacher forcing on
    completion tokens only (the same batch builder and log-prob path as the RL loss), AdamW with a linear
    warm-up over 5% of the steps then cosine decay to 0 (the decay is where a small model's loss drops
    most; docs/LOG.md has the recipes tried). trace_format "description": the traces in Vision-SR1's format
    (sr1_trace) under its instruction, the cold start its recipe assumes. Returns the (step, loss) pairs it logged.
    """
    torch.manual_seed(seed)
    processor = palmr.load_processor(model_path)
    model = prepare_model(model_path, torch.device("cpu"), train=True, shard=False)
    model.scored_vocab = None  # SFT over the full head, as the cached warm starts (-v2) behind README's numbers were built
    samples = [s for s in read_jsonl(data_path) if s.reference]
    assert samples, f"no traces to warm up on in {data_path}"
    tok, pick = processor.tokenizer, random.Random(f"warmup-{seed}")
    encoded, rows = {}, []
    for s in samples:
        instruction = palmr.SR1_INSTRUCTION if trace_format == "description" else palmr.INSTRUCTION
        encoded[s.id] = palmr.encode_prompt(processor, palmr.render_prompt(processor, s.question, s.choices,
                                                                           instruction=instruction),
                                            load_image(s), max_pixels)
        trace = hallucinated_trace(s, pick) if pick.random() < hallucinated_share else s.reference
        trace = sr1_trace(trace) if trace_format == "description" else trace
        ids = tok(trace, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        rows.append((s, palmr.Completion(ids, trace, [0.0] * len(ids), True)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng, history, w = random.Random(seed), [], steps // 20
    for step in tqdm(range(steps), desc="warm-up", mininterval=5):
        scale = (step + 1) / w if step < w else 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))
        optimizer.param_groups[0]["lr"] = lr * scale
        b = training_batch(rng.sample(rows, min(batch, len(rows))), encoded, tok.pad_token_id, torch.device("cpu"))
        logp, _ = model.completion_logprobs(b, 1.0)
        loss = -(logp * b["mask"]).sum() / b["mask"].sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % log_every == 0 or step == steps - 1:
            history.append((step, float(loss.detach())))
    model.save_pretrained(out_dir)
    copy_processor_files(model_path, out_dir)
    return history


def ensure_warm_start(base, data_path, steps, hallucinated_share, seed=0, trace_format="think"):
    """The warm-up checkpoint for these settings, built once next to `base` by rank 0; the others wait.

    Rank 0 builds with every core: torchrun leaves each process one thread, and the waiting ranks use
    none. (Measured: a data-parallel FSDP warm-up over 2 gloo ranks ran 3.2 steps/s against 4.7 for one
    process with both cores; the tiny model is too small for per-layer collectives to pay.)
    """
    sr1 = "-sr1" if trace_format == "description" else ""
    path = Path(base).with_name(f"{Path(base).name}-warm{steps}-h{hallucinated_share:g}-s{seed}{sr1}-v2")
    if palmr.get_rank() == 0 and not (path / "config.json").exists():
        print0(f"building the warm start ({steps} SFT steps, {hallucinated_share:.0%} misread traces) -> {path}")
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")  # two builds at once never share a folder
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or threads)
        try:
            warmup(base, data_path, tmp, steps=steps, seed=seed, hallucinated_share=hallucinated_share,
                   trace_format=trace_format)
            (tmp / "versions.json").write_text(json.dumps(palmr.versions()))  # what built it (constraints.txt)
            os.replace(tmp, path)
        finally:
            torch.set_num_threads(threads)
            shutil.rmtree(tmp, ignore_errors=True)  # a failed build leaves nothing half-written
    built = path / "versions.json"
    if palmr.get_rank() == 0 and built.exists() and json.loads(built.read_text()) != palmr.versions():
        print0(f"warning: the cached warm start {path} was built with {built.read_text()}, this run has "
               f"{json.dumps(palmr.versions())}: its numbers can differ from the README's (delete it to rebuild)")
    palmr.barrier()  # every rank, always
    return str(path)


# -----------------------------------------------------------------------------
# Checkpoints: a Hugging Face folder + trainer state, written by rank 0


PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "preprocessor_config.json", "video_preprocessor_config.json",
                   "processor_config.json", "chat_template.json", "chat_template.jinja")


def copy_processor_files(src, dst):
    """Tokenizer, processor configs and chat template travel with the weights. An allowlist: copying the
    source's model.safetensors.index.json would point loaders (vLLM) at weight shards that do not exist."""
    for name in PROCESSOR_FILES:
        if (Path(src) / name).is_file() and not (Path(dst) / name).exists():
            shutil.copy(Path(src) / name, Path(dst) / name)


def save_checkpoint(policy, optimizer, args, step):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(policy, options=opts)
    optim_sd = get_optimizer_state_dict(policy, optimizer, options=opts)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [None] * palmr.get_world_size()
    dist.all_gather_object(rngs, rng) if dist.is_initialized() else rngs.__setitem__(0, rng)
    out = Path(args.out)
    if palmr.get_rank() == 0:
        final, tmp = out / f"checkpoint-{step:06d}", out / f".checkpoint-{step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save_pretrained(tmp, state_dict=model_sd)
        copy_processor_files(args.model_source, tmp)
        torch.save({"step": step, "data_position": step * args.rollout_batch,  # prompts consumed so far
                    "optimizer": optim_sd, "rng": rngs, "args": vars(args)}, tmp / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (out / "latest.tmp").write_text(final.name)
        os.replace(out / "latest.tmp", out / "latest")
        for old in sorted(out.glob("checkpoint-*"))[:-args.keep]:
            shutil.rmtree(old, ignore_errors=True)
    palmr.barrier()
    return out / f"checkpoint-{step:06d}"


# -----------------------------------------------------------------------------
# Run visibility: TensorBoard / W&B, validation during training (README "Watching a run")


class RunLogger:
    """Rank 0's mirror of metrics.jsonl in TensorBoard (OUT/tb) and/or Weights & Biases. The packages are
    optional: a missing one stops the run at start with the command that installs it. W&B runs offline
    (files under OUT/wandb, no account) unless WANDB_MODE or WANDB_API_KEY says otherwise; its key is read
    by wandb itself from the environment and never passes through here. The arguments hold environment
    variable names (--judge-api-key-env), never their values."""

    def __init__(self, targets, out, args, start=0):
        self.tb = self.wandb = None
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
            id_file = Path(out) / "wandb_id.txt"  # one W&B run per run folder: a --resume continues it
            run_id = id_file.read_text().strip() if id_file.exists() else f"{Path(out).name}-{os.urandom(4).hex()}"
            id_file.write_text(run_id)
            self.wandb = wandb
            self.run = wandb.init(project=args.wandb_project, name=Path(out).name, dir=str(out), config=config,
                                  mode=mode, id=run_id, resume="allow")

    def log(self, metrics, step):
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "step"}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def rollouts(self, records, step):
        """A few decoded rollouts: [{id, question, answer, completion, reward}]."""
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


def validate(engine, processor, benches, args, step, out, rank):
    """Greedy validation of the current policy through the rollout engine and eval.py's generation and
    scorers (the same prompt, extraction and scoring as `python eval.py`). Every rank generates every item
    (HF generate under FSDP keeps the ranks' forwards in step; keep --eval-limit small); rank 0 scores.
    -> {val/<bench>/<metric>: number} on rank 0, {} elsewhere; predictions in OUT/val/step-NNNNNN/.

    This and --report import eval.py, lazily: a departure from DESIGN.md ("nothing imports eval.py") so that
    validation runs eval.py's own generation and scorers rather than a copy; eval.py imports nothing of
    grpo.py, so there is no cycle, and training without validation never loads it."""
    import eval as evaluation
    gen = types.SimpleNamespace(max_new_tokens=args.eval_max_new_tokens or args.max_new_tokens, temperature=0.0,
                                top_p=1.0, batch=16, seed=args.seed)
    folder = Path(out) / "val" / (f"step-{step:06d}" if rank == 0 else f".rank{rank}-step-{step:06d}")
    metrics = {}
    kept = engine.max_pixels
    for name, path, items in benches:
        engine.max_pixels = 112 * 112 if name == "shapes" else args.max_pixels  # eval.py's rule (shapes: 112 x 112)
        cache = folder / f"{name}.predictions.jsonl"
        cache.unlink(missing_ok=True)  # a resumed run revalidates this step with the weights it has now
        preds, problems = evaluation.generate(engine, processor, name, items, cache, gen)
        if rank == 0:
            for p in problems:
                print(p, file=sys.stderr)
            scores = evaluation.bench_scores(name, items, preds, path=path)
            metrics.update({f"val/{name}/{k}": float(v) for k, v in scores.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
    engine.max_pixels = kept
    if rank != 0:
        shutil.rmtree(folder, ignore_errors=True)
    return metrics


RESUME_MUST_MATCH = ("model", "data", "seed", "group_size", "rollout_batch", "update_batch", "reward", "judge",
                     "lr", "beta", "temperature", "max_new_tokens", "judge_omissions", "credit", "credit_c",
                     "vppo", "vppo_top_k", "vppo_beta_min", "vppo_mask_prob", "pearl_items", "pearl_group", "pearl_gate",
                     "vicrit_data", "vicrit_ratio")


def load_trainer_state(ckpt, policy, optimizer, args):
    """Restore optimizer, RNG and step from a checkpoint folder (weights were loaded from it already)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    # mmap: the optimizer tensors are read only where used (rank 0 broadcasts them; a 7B AdamW state
    # is ~60 GB, too much to load once per rank)
    state = torch.load(Path(ckpt) / "trainer_state.pt", weights_only=False, map_location="cpu", mmap=True)
    defaults = vars(get_args([]))  # a run saved before an option existed ran with its default
    saved = {k: state["args"].get(k, defaults.get(k)) for k in RESUME_MUST_MATCH}
    differ = {k: (saved[k], getattr(args, k)) for k in RESUME_MUST_MATCH if saved[k] != getattr(args, k)}
    assert not differ, f"--resume with other settings than the run in {args.out}: {differ} (saved, given)"
    distributed = dist.is_initialized() and palmr.get_world_size() > 1
    set_optimizer_state_dict(policy, optimizer, state["optimizer"] if palmr.get_rank() == 0 or not distributed else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed))
    rng = state["rng"][palmr.get_rank()]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state["step"]


# -----------------------------------------------------------------------------
# Main loop


def main(argv=None):
    """Run V-GRPO; returns the trained (possibly FSDP-sharded) policy module."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # no per-shard bars when loading and saving checkpoints
    args = get_args(argv)
    if args.report:  # a finished or running run's report; loads no model
        import eval as evaluation
        md, png = evaluation.run_report(args.out)
        print(f"{md}" + (f", {png}" if png else ""))
        return None
    for target, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):  # every rank stops, not just rank 0
        if target in args.report_to and importlib.util.find_spec(module) is None:
            raise SystemExit(f"--report-to {target} needs the {module} package: "
                             + ("pip install -r requirements-report.txt" if module == "tensorboard" else "pip install wandb"))
    rank, world, device = palmr.init_dist()
    assert args.rollout_batch % world == 0, f"--rollout-batch {args.rollout_batch} must divide over {world} ranks"
    assert args.rollout_batch % args.update_batch == 0, "--rollout-batch must be a multiple of --update-batch"
    assert args.update_batch % world == 0, f"--update-batch {args.update_batch} must divide over {world} ranks"
    assert args.judge != "none" or args.reward not in NEEDS_VIS | NEEDS_COV, f"--reward {args.reward} needs a judge"
    assert args.reward != "vision_sr1" or args.vllm_tp == 1, "--reward vision_sr1: its text-only pass runs per rank"
    assert not (args.vppo and args.credit == "token"), "--vppo and --credit token both set per-token advantages"
    assert 0 <= args.vicrit_ratio <= 1, "--vicrit-ratio in [0, 1]"
    assert args.pearl_items >= 1 and args.pearl_group >= 2 and 0 <= args.pearl_gate <= 1, \
        "--pearl-items >= 1, --pearl-group >= 2 (a group of one has no advantage), --pearl-gate in [0, 1]"
    assert 0 < args.vppo_top_k <= 1 and 0 <= args.vppo_mask_prob <= 1 and 0 <= args.vppo_beta_min <= 1, \
        "--vppo-top-k in (0, 1], --vppo-mask-prob and --vppo-beta-min in [0, 1]"
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    tiny = args.model == palmr.DEFAULT_TINY
    if tiny:
        args.model = palmr.ensure_tiny_checkpoint(args.model, seed=0)
    if args.data is None:
        args.data = ensure_shapes() if rank == 0 else None
        palmr.barrier()
        args.data = args.data or ensure_shapes()
    if tiny and args.warmup_steps > 0:  # the embedded default starts from a warm, cached tiny policy
        args.model = ensure_warm_start(args.model, ensure_shapes(), args.warmup_steps, args.warmup_hallucinated,
                                       trace_format=args.warmup_format)
    if args.warmup_only:
        print0(args.model)
        return None
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)

    # policy (from the latest checkpoint when resuming), frozen reference, optimizer
    latest = out / "latest"
    resume_from = out / latest.read_text().strip() if args.resume and latest.exists() else None
    assert not args.resume or resume_from is not None, f"--resume: no checkpoint in {out}"
    args.model_source = args.model
    processor = palmr.load_processor(args.model)
    if args.shared_prefix is None:  # measured faster on CPU; not yet measured on a GPU (README)
        args.shared_prefix = device.type != "cuda"
    route = args.prefix_attention if args.shared_prefix else "dense"  # dense: the model's own attention untouched
    assert route != "flex" or device.type == "cuda", "--prefix-attention flex needs a GPU: PyTorch has no " \
        "flex_attention backward on CPU (use branch)"
    policy = prepare_model(resume_from or args.model, device, train=True,
                           activation_checkpointing=args.activation_checkpointing, logprobs=args.logprobs,
                           chunk=args.logprob_chunk, logprob_memory=args.logprob_memory, prefix_attention=route)
    reference = prepare_model(args.model, device, train=False, logprobs=args.logprobs, chunk=args.logprob_chunk,
                              logprob_memory=args.logprob_memory, prefix_attention=route) if args.beta > 0 else None
    if args.shared_prefix:  # fail now, not at the first forward, on an attention implementation without custom masks
        prefix_attention_mask(torch.zeros((1, 1), dtype=torch.long), route,
                              policy.model.language_model.config._attn_implementation)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    start = load_trainer_state(resume_from, policy, optimizer, args) if resume_from else 0
    engine = make_engine(args, policy, processor, resume_from or args.model, rank, world, device)
    if resume_from:  # the sampler must start from exactly the trainer's weights
        engine.load_weights(full_parameters(policy))
    judge = None if args.judge == "none" else make_judge(
        args.judge, args.judge_base_url, args.judge_model, args.judge_api_key_env, protocol=args.judge_protocol,
        swap=args.judge_swap, concurrency=args.judge_concurrency, timeout=args.judge_timeout,
        max_retries=args.judge_retries, max_tokens=args.judge_max_tokens, reasoning=not args.judge_no_reasoning,
        seed=args.seed, omissions=args.judge_omissions, locate=args.credit == "token")
    samples = load_dataset(args, processor)
    vicrit = load_dataset(args, processor, args.vicrit_data) if args.vicrit_data else []
    n_vicrit = int(args.vicrit_ratio * args.rollout_batch + 0.5) if vicrit else 0  # ViCrit prompts per step
    if vicrit:
        print0(f"vicrit: {n_vicrit} of the {args.rollout_batch} prompts of every step come from {args.vicrit_data}"
               + (" (none: raise --vicrit-ratio or --rollout-batch)" if n_vicrit == 0 else ""))
    prefill = palmr.generation_prefill(palmr.render_prompt(processor, ""))  # '' for Qwen2.5-VL's own template
    if rank == 0:
        (out / "args.json").write_text(json.dumps({**vars(args), "versions": palmr.versions()}, indent=2))
    logger, ok = None, 1
    if rank == 0:
        try:
            logger = RunLogger(args.report_to, out, args, start)
        except (Exception, SystemExit) as e:  # noqa: BLE001 -- every rank must stop, not rank 0 alone
            print(f"--report-to: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            ok = 0
    if not int(all_reduce(torch.tensor(ok), dist.ReduceOp.MIN)):
        raise SystemExit("--report-to failed on rank 0 (above)")
    val_benches = []
    if args.eval_every > 0 or args.eval_before_train:
        import eval as evaluation
        if "shapes" in args.eval_bench:  # the held-out split, built once by rank 0 (the others wait)
            if rank == 0:
                ensure_shapes(n=200, split="test", seed=1)
            palmr.barrier()
        if (args.eval_max_new_tokens or 0) > args.max_new_tokens and not isinstance(engine, palmr.HFEngine):
            print0(f"warning: --eval-max-new-tokens {args.eval_max_new_tokens} exceeds --max-new-tokens "
                   f"{args.max_new_tokens}: vLLM's max_model_len was sized for the latter and may cut replies")
        for spec in args.eval_bench:
            name, path, items, problems = evaluation.load_items(spec, args.eval_limit)
            val_benches.append((name, path, items))
            for p in problems if rank == 0 else []:
                print(p, file=sys.stderr)
    if args.eval_before_train and start == 0:
        engine.wake()
        val = validate(engine, processor, val_benches, args, 0, out, rank)
        engine.sleep()
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": 0, **val}) + "\n")
            logger.log(val, 0)
            print("validation at step 0: " + " ".join(f"{k} {v:.3g}" for k, v in val.items()), flush=True)
    print0(f"V-GRPO | world {world} on {device.type} | engine {type(engine).__name__} | reward {args.reward} judge {args.judge} | "
           f"G {args.group_size} rollout {args.rollout_batch} update {args.update_batch} prompts | "
           f"steps {start}->{args.max_steps}" + (f" (resumed from {resume_from.name})" if resume_from else ""))

    for step in range(start, args.max_steps):
        t0 = time.time()
        # rollout
        mine = [(vicrit if src else samples)[i] for src, i in mixed_step_items(
            len(samples), len(vicrit), step, args.rollout_batch, n_vicrit, args.seed, rank, world)]
        engine.wake()
        rows, encoded = rollout(engine, processor, mine, args, step, rank)
        t_self = time.time()
        s_self = self_rewards(engine, processor, rows, args, step, rank, prefill) \
            if args.reward == "vision_sr1" else None  # a second, text-only rollout per completion
        t_self = time.time() - t_self
        t_pearl = time.time()
        pearl = pearl_checks(engine, processor, mine, args, step, rank, prefill) if args.reward == "pearl" else None
        t_pearl = time.time() - t_pearl  # the checklist's auxiliary rollouts, counted in t_rollout
        engine.sleep()
        t1 = time.time()
        # reward and advantage (advantages over the gathered global batch; a group never spans ranks)
        s_perc = [pearl[3][s.id] for s, _ in rows] if pearl else None
        rewards, parts, judge_stats, located = compute_rewards(judge, rows, args.reward, prefill, s_self, s_perc,
                                                               args.pearl_gate)
        wrong = [span_tokens(processor.tokenizer, c.token_ids, sp) for (_, c), sp in zip(rows, located)] \
            if args.credit == "token" else None  # only token credit needs the spans as tokens
        gathered = [torch.zeros_like(rewards) for _ in range(world)]
        dist.all_gather(gathered, rewards) if dist.is_initialized() else gathered.__setitem__(0, rewards)
        all_adv = group_advantages(torch.cat(gathered), args.group_size, args.adv_scale)
        advantages = all_adv.view(world, -1)[rank]
        train_rows, train_encoded, train_adv, train_wrong = rows, encoded, advantages, wrong
        if pearl:  # the checklist groups train too, each after its prompt's group (equal counts on every rank)
            check_rows, check_encoded, check_rewards, _ = pearl
            got = [torch.zeros_like(check_rewards) for _ in range(world)]
            dist.all_gather(got, check_rewards) if dist.is_initialized() else got.__setitem__(0, check_rewards)
            check_adv = group_advantages(torch.cat(got), args.pearl_group, args.adv_scale).view(world, -1)[rank]
            train_rows, train_adv, train_wrong = interleave_checks(rows, advantages, wrong, check_rows, check_adv,
                                                                   len(mine))
            train_encoded = {**encoded, **check_encoded}
        t2 = time.time()
        # optimisation
        stats = train_on_rollouts(policy, reference, optimizer, processor, train_rows, train_encoded, train_adv, args,
                                  device, train_wrong, step=step)
        t_sync = time.time()
        engine.load_weights(full_parameters(policy))  # vLLM: stream the new weights; HF: shares the module
        t3 = time.time()
        stats["t_weight_sync"] = t3 - t_sync
        val = {}
        if args.eval_every > 0 and (step + 1) % args.eval_every == 0:
            t_val = time.time()
            engine.wake()
            val = validate(engine, processor, val_benches, args, step + 1, out, rank)
            engine.sleep()
            stats["t_val"] = time.time() - t_val

        # metrics: mean over the global batch
        lengths = torch.tensor([float(len(c.token_ids)) for _, c in rows])
        groups = torch.cat(gathered).view(-1, args.group_size)
        local = {"reward": rewards.sum(), **{f"reward/{k}": v.sum() for k, v in parts.items()},
                 "completion_len": lengths.sum(),
                 "prompt_len": torch.tensor(float(sum(len(encoded[s.id]["input_ids"]) for s, _ in rows))),
                 "image_patches": torch.tensor(float(sum(encoded[s.id]["pixel_values"].shape[0] for s, _ in rows))), "finished": torch.tensor(float(sum(c.finished for _, c in rows))),
                 "judge/failed": torch.tensor(float(judge_stats["failed"])),
                 "judge/ties": torch.tensor(float(judge_stats["ties"])),
                 "judge/gated_zero": (parts["vis"] == 0).float().sum(),
                 "judge/hallucinated_correct": ((parts["vis"] == 0) & (parts["ans"] == 1)).float().sum(),
                 # located errors: rollouts with one (and with token credit, the share of tokens marked)
                 "credit/located": torch.tensor(float(sum(bool(sp) for sp in located))),
                 "judge/unmatched": torch.tensor(float(judge_stats.get("unmatched", 0)))}
        if args.vicrit_data or args.reward == "vicrit":  # decided by flags: every rank reduces the same keys
            vic = torch.tensor([is_vicrit(s) for s, _ in rows], dtype=torch.bool)
            local.update({"vicrit/rows": vic.float().sum(), "vicrit/correct": (parts["ans"] * vic).sum()})
        if pearl:
            local.update({"pearl/perception": torch.tensor(float(sum(s_perc))),
                          "pearl/gated": torch.tensor(float(sum(p < args.pearl_gate for p in s_perc))),
                          # checklist rollouts and their generated tokens per reasoning rollout: the extra cost
                          "pearl/rollouts": torch.tensor(float(len(pearl[0]))),
                          "pearl/tokens": torch.tensor(float(sum(len(c.token_ids) for _, c in pearl[0])))})
        if wrong is not None:
            local["credit/wrong_tokens"] = torch.tensor(float(sum(len(w) / max(1, len(c.token_ids))
                                                                  for w, (_, c) in zip(wrong, rows))))
        n_rows = len(rows) * world
        metrics = {k: float(all_reduce(v.double().clone())) / n_rows for k, v in local.items()}
        if args.judge in ("openai", "hf"):  # decided by flags, never by this rank's stats: every rank reduces
            sums = all_reduce(torch.tensor([judge_stats.get(k, 0) for k in ("latency_sum", "sent", "tokens", "cache_hits")],
                                           dtype=torch.float64))
            metrics.update({"judge/latency": float(sums[0] / sums[1].clamp(min=1)), "judge/tokens": float(sums[2]),
                            "judge/cache_hits": float(sums[3])})
        if "vicrit/rows" in metrics:  # ViCrit's answer accuracy over its own rows
            metrics["vicrit/acc"] = metrics.pop("vicrit/correct") / metrics["vicrit/rows"] if metrics["vicrit/rows"] else 0.0
        metrics.update(step=step + 1, adv_std=float(all_adv.std()),
                       zero_var_groups=float((groups.std(dim=1) == 0).float().mean()),
                       **stats, t_rollout=t1 - t0 - t_self, t_reward=t2 - t1 + t_self, t_train=t3 - t2)
        if s_self is not None:
            metrics["t_self_reward"] = t_self  # the text-only pass, counted in t_reward
        if pearl:
            metrics["t_pearl"] = t_pearl  # the checklist rollouts, counted in t_rollout
        if rank == 0:
            metrics.update(val)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            logger.log(metrics, step + 1)
            print(f"step {step + 1}/{args.max_steps} | reward {metrics['reward']:.3f} (fmt {metrics['reward/fmt']:.2f} "
                  f"ans {metrics['reward/ans']:.2f} vis {metrics['reward/vis']:.2f}"
                  + (f" perc {metrics['pearl/perception']:.2f}" if pearl else "")
                  + f") | ent {metrics['entropy']:.2f} adv_std {metrics['adv_std']:.2f} "
                  f"zero_var {metrics['zero_var_groups']:.2f} | kl {metrics['kl']:.4f} clip {metrics['clip_frac']:.3f} "
                  f"| len {metrics['completion_len']:.1f} | judge failed {metrics['judge/failed']:.2f} gated "
                  f"{metrics['judge/gated_zero']:.2f} | gen {metrics['t_rollout']:.1f}s rew {metrics['t_reward']:.1f}s train {t3 - t2:.1f}s",
                  flush=True)
            if val:
                print("  validation: " + " ".join(f"{k} {v:.3g}" for k, v in val.items()
                                                  if k.endswith(("/acc", "/hallucination_rate", "/perception_acc"))))
            if args.log_rollouts_every and (step + 1) % args.log_rollouts_every == 0:
                records = [{"step": step + 1, "id": s.id, "question": s.question, "answer": s.answer,
                            "completion": c.text, "reward": r} for (s, c), r in list(zip(rows, rewards.tolist()))[:2]]
                with open(out / "rollouts.jsonl", "a") as f:
                    for rec in records:
                        f.write(json.dumps(rec) + "\n")
                        print(f"  [{rec['id']}] Q: {rec['question']} | gold {rec['answer']} | R {rec['reward']:.2f}\n"
                              f"  > {rec['completion'][:300]!r}")
                logger.rollouts(records, step + 1)
        if (step + 1) % args.save_every == 0 or step + 1 == args.max_steps:
            path = save_checkpoint(policy, optimizer, args, step + 1)
            print0(f"saved {path}")
    if rank == 0:
        logger.close()
        import eval as evaluation
        md, png = evaluation.run_report(out)
        print(f"report: {md}" + (f", {png}" if png else ""), flush=True)
    return policy


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
