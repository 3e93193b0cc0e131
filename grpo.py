"""V-GRPO: GRPO with PaLMR's vision-gated reward, for Qwen2.5-VL, Qwen3-VL and Qwen3.5: the loop, and only the loop.

    python grpo.py                                   # CPU, tiny model, synthetic shapes, rule judge
    torchrun --nproc_per_node 2 grpo.py              # the same on 2 CPU processes (FSDP2 over gloo)
    bash runs/qwen25vl_7b_8xh100.sh                  # one 8-GPU node: torchrun --nproc_per_node 8 (NCCL, bf16)
    python grpo.py --resume --out DIR                # continue the run in DIR from its latest checkpoint

One step (main): rollout (G completions per prompt, prompts strided over ranks, a prompt's group on one rank)
-> reward (format, answer, the judge's S_vis, fused by --reward; judged beside the reference and old log-prob
passes) -> group advantages -> PPO-clip + k3 KL on completion-only log-probs, AdamW, per update batch -> sync -> log.
The kernels live in kernels/ (fused LM head, shared-prefix forward); the other perception-aware methods in
variants/, which reach this loop only through the hooks of variants/base.py (lines marked `# variants`).

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
import math
import os
import shutil
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from tqdm import tqdm

import eval as evaluation  # validation runs eval.py's own generation and scorers (a departure: DESIGN.md)
import palmr
import warmup
import variants  # variants: the other perception-aware methods (README "Fork just PaLMR": delete these lines)
from data import load_image, read_jsonl
from judge import JudgeItem, check_judge, failure_share, judge_args, judge_batch, judge_from_args
from kernels.lm_head import LOGPROB_MEMORY_MIB, fused_logprobs, fused_policy_loss, logprob_chunk
from kernels.shared_prefix import prefix_attention_mask, prefix_layout, shared_prefix_hidden, use_prefix_attention
from palmr import print0
from report import check_packages, log_step, open_run_folder, report_args, run_report, start_logger, step_metrics
from rewards import SCHEMES, score_completion

warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)  # DCP in one process: as intended

# -----------------------------------------------------------------------------
# Config


def get_args(argv=None):
    """The flags (main checks them with check_args before anything loads)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=palmr.HelpFormatter)
    g = ap.add_argument_group("model and data")
    g.add_argument("--model", default=palmr.DEFAULT_TINY, help="policy checkpoint (HF folder) of a supported family "
                   "(README 'Supported models'); a tiny one (palmr.TINY: ~/.cache/palmr/tiny-*) is built if missing")
    g.add_argument("--data", default=None, help="training JSONL of Samples (default: synthetic shapes, built once)")
    g.add_argument("--mix-data", default=None, help="a second JSONL of Samples mixed into every step")
    g.add_argument("--mix-ratio", type=float, default=0.25, help="share of each step's prompts drawn from --mix-data")
    g.add_argument("--mix-reward", default=None, help="scheme of --mix-data rows without meta.reward_scheme (def.: --reward)")
    g.add_argument("--max-pixels", type=int, default=112 * 112, help="image pixel budget (resize, never crop)")
    g.add_argument("--max-prompt-tokens", type=int, default=4096, help="longer prompts are dropped at load, never truncated")
    g = ap.add_argument_group("rollout")
    g.add_argument("--group-size", type=int, default=8, help="G completions per prompt (paper: 16)")
    g.add_argument("--rollout-batch", type=int, default=8, help="prompts per step, all ranks (paper: 512)")
    g.add_argument("--update-batch", type=int, default=8, help="prompts per optimizer update, all ranks (paper: 128)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="completion length cap (8xH100 preset: 2048)")
    g.add_argument("--temperature", type=float, default=1.0, help="rollout temperature, also used for the trainer's log-probs")
    g.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus sampling")
    g.add_argument("--engine", default="auto", choices=["auto", "hf", "vllm"], help="sampler: vllm on GPUs when installed, else HF generate")
    g.add_argument("--vllm-tp", type=int, default=1, help="vLLM tensor parallel size (consecutive ranks share an engine)")
    g.add_argument("--vllm-gpu-memory", type=float, default=0.3, help="vLLM gpu_memory_utilization (KV cache + weights)")
    g.add_argument("--vllm-max-model-len", type=int, default=None,
                   help="vLLM max_model_len (default: prompt + new tokens, clamped to the checkpoint's limit)")
    g.add_argument("--is-cap", type=float, default=0.0, help="sequence-level IS correction for sampler/trainer mismatch: "
                   "mask sequences whose ratio exceeds this cap (0: off)")
    g.add_argument("--debug-logprobs", action="store_true", help="log sampler vs trainer log-prob gaps on the first batch after each sync")
    g = ap.add_argument_group("reward")
    g.add_argument("--reward", default="palmr", choices=list(SCHEMES), help="fusion scheme (rewards.py, variants/)")
    g.add_argument("--judge-max-failed", type=float, default=0.2, help="stop the run when the judge fails on more than "
                   "this share of a step's rollouts (they would pass the gate ungraded); any failure is a warning")
    judge_args(ap)  # the visual-fidelity judge's flags (judge.py)
    g = ap.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (tiny default; paper: 1e-6 for 7B)")
    g.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW decoupled weight decay")
    g.add_argument("--beta", type=float, default=1e-2, help="k3 KL weight; 0 loads no reference model")
    g.add_argument("--eps-low", type=float, default=0.2, help="PPO clip below 1")
    g.add_argument("--eps-high", type=float, default=0.28, help="PPO clip above 1")
    g.add_argument("--adv-scale", default="group", choices=["group", "batch", "none"], help="advantage std: per group, whole batch, or none")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    g = ap.add_argument_group("memory and speed")
    g.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward per rank")
    g.add_argument("--micro-tokens", type=int, default=0, help="micro-batches of about this many tokens instead of "
                   "--micro-batch rows (0: off); every rank runs the same number of micro-batches")
    g.add_argument("--shared-prefix", action=argparse.BooleanOptionalAction, default=None,
                   help="score each prompt once per group, its completions as branches of one sequence "
                   "(kernels/shared_prefix.py); default: on for CPU, where it was measured faster, off on GPUs")
    g.add_argument("--prefix-attention", default="branch", choices=["branch", "dense"],
                   help="shared-prefix attention: branch (one SDPA call per completion on [prompt; itself], exact, "
                   "no (L, L) mask) or dense ((L, L) boolean masks through SDPA); ignored with --no-shared-prefix")
    g.add_argument("--logprob-memory", type=int, default=LOGPROB_MEMORY_MIB,
                   help="GPU: MiB for the fused LM head's (chunk, V) buffers, which sets its chunk (kernels/lm_head.py)")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute decoder layers in backward")
    g.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: OMP_NUM_THREADS if set, else "
                   "every core, shared by the ranks of this machine)")
    warmup.warmup_args(ap)  # the embedded default's warm start (warmup.py)
    g = ap.add_argument_group("run folder, checkpoints and validation")
    g.add_argument("--out", default="out/grpo", help="run folder: metrics, rollouts, checkpoints (one run each)")
    g.add_argument("--max-steps", type=int, default=20, help="rollout steps to run (total, counting resumed ones)")
    g.add_argument("--seed", type=int, default=0, help="seed of data order, sampling and init")
    g.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept on disk (oldest removed)")
    g.add_argument("--log-rollouts-every", type=int, default=5, help="print a few decoded rollouts every N steps")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out (its logs and checkpoints)")
    g.add_argument("--eval-every", type=int, default=0, help="greedy validation every N steps (0: off), through "
                   "the rollout engine and eval.py's scorers, logged as val/<bench>/<metric>")
    g.add_argument("--eval-bench", nargs="+", default=["shapes"], help="validation benchmarks: shapes (the "
                   "held-out split) or NAME=FILE as eval.py takes them")
    g.add_argument("--eval-limit", type=int, default=50, help="validation: first K items of each benchmark")
    g.add_argument("--eval-max-new-tokens", type=int, default=None, help="validation reply budget "
                   "(default: --max-new-tokens)")
    g.add_argument("--eval-before-train", action="store_true", help="validate the starting policy (step 0)")
    report_args(ap)  # TensorBoard / W&B and the run report (report.py)
    variants.add_args(ap)  # variants: each method's flags, in its own group
    return ap.parse_args(argv)


def check_args(args, world):
    """Flag conflicts and missing inputs, refused before anything loads, as argparse refuses a bad flag: one line
    (from rank 0) and exit status 2."""
    def error(why):
        if os.environ.get("RANK", "0") == "0":
            print(f"grpo.py: error: {why}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    needs = SCHEMES[args.reward].needs | SCHEMES.get(args.mix_reward, SCHEMES[args.reward]).needs
    for ok, why in ((args.group_size >= 2, f"--group-size {args.group_size}: a group advantage compares rollouts of "
                     "one prompt, so with fewer than 2 every advantage is 0 and nothing trains"),
                    (args.rollout_batch % world == 0, f"--rollout-batch {args.rollout_batch} must divide over {world} ranks"),
                    (args.rollout_batch % args.update_batch == 0, "--rollout-batch must be a multiple of --update-batch"),
                    (palmr.local_world_size() % args.vllm_tp == 0, f"--vllm-tp {args.vllm_tp}: a node's ranks must hold whole groups"),
                    (args.update_batch % world == 0, f"--update-batch {args.update_batch} must divide over {world} ranks"),
                    (args.mix_reward in (None, *SCHEMES), f"--mix-reward {args.mix_reward}: not a reward scheme"),
                    (args.judge != "none" or not needs, f"--reward {args.reward} / --mix-reward {args.mix_reward} needs a judge"),
                    (args.judge != "openai" or (args.judge_base_url and args.judge_model),
                     "--judge openai needs --judge-base-url and --judge-model"),
                    (args.judge != "hf" or args.judge_model, "--judge hf needs --judge-model (a local folder)"),
                    (0 <= args.mix_ratio <= 1, "--mix-ratio must be in [0, 1]"),
                    (0 <= args.judge_max_failed <= 1, "--judge-max-failed must be in [0, 1]"),
                    (args.temperature > 0, "--temperature must be > 0 (the trainer's log-probs divide by it)"),
                    (min(args.max_steps, args.save_every, args.keep, args.micro_batch) >= 1,
                     "--max-steps, --save-every, --keep and --micro-batch must be >= 1"),
                    (not (args.resume and args.overwrite), "--resume and --overwrite: choose one"),
                    (not args.overwrite or not any(p and Path(args.out).resolve() in Path(p).expanduser().resolve(
                     ).parents for p in (args.model, args.data, args.mix_data)), "--overwrite would delete --model or --data"),
                    (not args.resume or (Path(args.out) / "latest").exists(), f"--resume: no checkpoint in {args.out}"),
                    (not args.data or Path(args.data).is_file(), f"--data {args.data}: no such file"),
                    (not args.mix_data or Path(args.mix_data).is_file(), f"--mix-data {args.mix_data}: no such file")):
        if not ok:
            error(why)
    if not palmr.tiny_family(args.model) and (why := palmr.check_model(args.model)):
        error(f"--model {args.model}: {why}")
    for spec in args.eval_bench if args.eval_every > 0 or args.eval_before_train else []:
        if why := evaluation.bench_problem(spec, "--eval-bench"):  # refused now, not after the model loaded
            error(why)


# -----------------------------------------------------------------------------
# Data: every rank loads the same filtered list; prompt k of the run is a pure function of (seed, k)


def row_scheme(sample, default):
    """The reward scheme of a row: its own (meta.reward_scheme; --mix-data rows get --mix-reward) or `default`."""
    return sample.meta.get("reward_scheme") or default


def instruction(sample, args, hooks):
    """The prompt's instruction: PaLMR's <think> ... \\boxed{} unless a method asks for its own."""
    scheme = row_scheme(sample, args.reward)
    return next((text for h in hooks if (text := h.instruction(sample, scheme))), palmr.INSTRUCTION)


def load_dataset(args, processor, path=None, hooks=(), scheme=None):
    """Samples that can be trained on: readable image, prompt within budget (with any other question a method
    asks about the same image), a reference where the row's scheme reads S_vis from an LLM judge, and whatever
    an active method needs (hooks' drop_reason). scheme: the reward scheme of rows that name none (--mix-data)."""
    path = path or args.data
    samples, kept, dropped = read_jsonl(path), [], {}
    for s in tqdm(samples, desc="checking data", disable=palmr.get_rank() != 0, mininterval=2):
        if scheme:
            s.meta.setdefault("reward_scheme", scheme)  # a mixed dataset's rows carry their own scheme
        own = row_scheme(s, args.reward)
        try:
            if own not in SCHEMES:
                raise ValueError(f"unknown reward scheme {own!r}")
            image = palmr.fit_pixels(load_image(s), args.max_pixels)
            n_image = processor.image_processor.get_number_of_image_patches(image.height, image.width, {}) \
                // processor.image_processor.merge_size ** 2
            count = lambda text: len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) + n_image  # noqa: E731
            n = count(palmr.render_prompt(processor, s.question, s.choices, instruction=instruction(s, args, hooks)))
            for q in (q for h in hooks for q in h.questions(s)):  # other prompts on the same image
                n = max(n, count(palmr.render_prompt(processor, q)))
            reason = "prompt too long" if n > args.max_prompt_tokens else None
            need_reference = "vis" in SCHEMES[own].needs and args.judge not in ("none", "rule")
            reason = reason or ("no reference trace" if need_reference and not s.reference else None)  # rule: facts alone
            for h in hooks:
                reason = reason or h.drop_reason(s, own)
        except ValueError as e:
            reason = str(e)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
        else:
            kept.append(s)
    print0(f"data: {len(kept)} of {len(samples)} items kept from {path}; dropped: {dropped or 'none'}")
    if not kept:
        raise SystemExit(f"{path}: no trainable items (dropped: {dropped})")
    return kept


def mixed_step_items(n_items, n_extra, step, rollout_batch, extra_per_step, seed, rank, world):
    """This rank's prompts at `step`, `extra_per_step` of the global batch's drawn from a second dataset of n_extra
    items (--mix-data), spread evenly over the batch positions: -> [(0, index) or (1, extra index)]. Global prompt
    k = step * rollout_batch + j, j strided by rank; each source is shuffled per epoch on its own, so prompt k of
    either is a pure function of (seed, k)."""
    out, main_per_step = [], rollout_batch - extra_per_step
    for j in range(rank, rollout_batch, world):
        before = j * extra_per_step // rollout_batch  # extra positions among 0..j-1
        extra = (j + 1) * extra_per_step // rollout_batch > before
        n, k, key = (n_extra, step * extra_per_step + before, seed + 7_919) if extra else \
            (n_items, step * main_per_step + j - before, seed)
        order = np.random.default_rng([key, k // n]).permutation(n)  # one shuffle per epoch
        out.append((int(extra), int(order[k % n])))
    return out


# -----------------------------------------------------------------------------
# Rollout, reward, advantage


def rollout(engine, processor, samples, args, step, rank, n=None, seed_offset=0, hooks=()):
    """G (or n) completions for each of this rank's prompts.

    -> rows [(sample, completion)] group after group, and {sample id: encoded prompt}: each image is
    processed once per step and reused by the trainer's forward passes. With vLLM tensor parallelism
    the ranks of one engine pool their prompts, sample them together, and each keeps its own share.
    """
    engine.wake()  # idempotent: the loop's rollout, a method's redraw or extra generations
    group = getattr(engine, "tp_group", None)
    tp = args.vllm_tp if group is not None else 1  # only ranks that really share a vLLM engine share seeds
    pooled = samples
    if group is not None:
        gathered = [None] * tp
        dist.all_gather_object(gathered, samples, group=group)
        pooled = [s for part in gathered for s in part]
    prompts, encoded, own = [], {}, {s.id for s in samples}
    for s in pooled:
        text, image = palmr.render_prompt(processor, s.question, s.choices, instruction=instruction(s, args, hooks)), load_image(s)
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


def compute_rewards(judge, rows, scheme, prefill="", signals=None, options=None):
    """-> rewards (N,), parts {name: (N,)}, judge metrics, located errors; the judge is asked once for the batch.

    Each row is scored by its own scheme (meta.reward_scheme, else `scheme`); rows of a scheme that is not judged
    never reach the judge. signals: per row, a method's {s_<part>: value} (rewards.score_completion); options:
    what every row's scheme receives (a gate). Located errors: per row, the (start, end) character spans of the wrong
    claims the judge found in c.text. Format, answer and judge read the assistant turn as a whole: `prefill`
    (palmr.generation_prefill) + the completion. A failing judge never stops the run (judge.judge_batch).
    """
    n, schemes = len(rows), [row_scheme(s, scheme) for s, _ in rows]
    s_vis, r_cov, spans, stats = [1.0] * n, [0.0] * n, [[] for _ in rows], {"failed": 0, "ties": 0}
    judged = [i for i in range(n) if SCHEMES[schemes[i]].judged]
    if judge is not None and judged:
        items = [JudgeItem(rows[i][0].question, rows[i][0].facts, prefill + rows[i][1].text, rows[i][0].reference)
                 for i in judged]
        vis, where, cov, stats = judge_batch(judge, items, any("cov" in SCHEMES[schemes[i]].needs for i in judged),
                                             offset=len(prefill))
        for k, i in enumerate(judged):
            s_vis[i], spans[i], r_cov[i] = vis[k], where[k], cov[k]
    totals, parts = [], {}
    for i, ((s, c), vis, cov) in enumerate(zip(rows, s_vis, r_cov)):
        total, p = score_completion(schemes[i], prefill + c.text, s.answer, s.choices, s_vis=vis, r_cov=cov,
                                    meta=s.meta, **(signals[i] if signals else {}), **(options or {}))
        totals.append(total)
        for k, v in p.items():
            parts.setdefault(k, []).append(v)
    return torch.tensor(totals), {k: torch.tensor(v) for k, v in parts.items()}, stats, spans


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


def global_advantages(rewards, group_size, scale, rank):
    """This rank's advantages (N,), computed over the gathered global batch (a group never spans ranks); and the
    global advantages and rewards (world * N,), for the step's metrics."""
    everyone = torch.cat(palmr.all_gather(rewards))
    advantages = group_advantages(everyone, group_size, scale)
    return advantages.view(-1, rewards.numel())[rank], advantages, everyone


def interleave_groups(rows, advantages, extra_rows, extra_advantages, n_prompts):
    """Each prompt's group followed by its extra groups (a method's), so that every optimizer update (a contiguous
    share of the rows) holds whole prompts of both kinds. rows (n_prompts * G), advantages (n_prompts * G,),
    extra_rows (n_prompts * K), extra_advantages (n_prompts * K,) -> (rows, advantages (n_prompts * (G + K),))."""
    g, k = len(rows) // n_prompts, len(extra_rows) // n_prompts
    assert g * n_prompts == len(rows) and k * n_prompts == len(extra_rows), "rows must split evenly over prompts"
    out, adv = [], []
    for i in range(n_prompts):
        out += rows[i * g:(i + 1) * g] + extra_rows[i * k:(i + 1) * k]
        adv += [advantages[i * g:(i + 1) * g], extra_advantages[i * k:(i + 1) * k]]
    return out, torch.cat(adv)


def with_extra_groups(rows, encoded, extras, args, rank, n_prompts):
    """The rows to train on: the step's groups and, interleaved per prompt, any groups a method added (normalised
    over their own global groups). -> rows, encoded, place: this rank's (N,) advantages -> those of the rows. The
    order depends on no reward, so the log-prob passes run on it while the judge grades."""
    added = []
    for extra in extras:
        for g_rows, g_encoded, g_rewards, g_size in extra.groups:
            g_adv = global_advantages(g_rewards, g_size, args.adv_scale, rank)[0]
            rows = interleave_groups(rows, torch.zeros(len(rows)), g_rows, g_adv, n_prompts)[0]
            encoded, added = {**encoded, **g_encoded}, added + [(g_rows, g_adv)]

    def place(advantages):
        for g_rows, g_adv in added:
            advantages = interleave_groups([None] * len(advantages), advantages, g_rows, g_adv, n_prompts)[1]
        return advantages
    return rows, encoded, place


# -----------------------------------------------------------------------------
# Batch layout and log-probs of completion tokens only (kernels/: the fused LM head, the shared prefix)


def completion_tensors(rows, pad_id):
    """completion_ids, mask, sampler_logp (B, T) right-padded, T >= 1: the per-token tensors both layouts share."""
    width = max(1, max(len(c.token_ids) for _, c in rows))
    completion = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    sampler_logp = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (_, c) in enumerate(rows):
        completion[i, :len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
        mask[i, :len(c.token_ids)] = 1
        sampler_logp[i, :len(c.logprobs)] = torch.tensor(c.logprobs, dtype=torch.float32)
    return {"completion_ids": completion, "mask": mask, "sampler_logp": sampler_logp}


def training_batch(rows, encoded, pad_id, device):
    """Per-row layout: prompt left-padded + completion right-padded, every per-token tensor built from the same ids.

    -> dict(input_ids, attention_mask (B, P+T), pixel_values, image_grid_thw, completion_ids, mask,
    sampler_logp (B, T))
    """
    batch = palmr.collate_prompts([encoded[s.id] for s, _ in rows], pad_id)
    batch.update(completion_tensors(rows, pad_id))
    completion, mask = batch["completion_ids"], batch["mask"]
    batch["input_ids"] = torch.cat([batch["input_ids"], completion], 1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], mask], 1)
    if "mm_token_type_ids" in batch:  # completion tokens are text (the image tokens' mRoPE positions read these)
        batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(completion)], 1)
    return {k: v.to(device) for k, v in batch.items()}


def shared_prefix_batch(rows, encoded, pad_id, device):
    """Shared-prefix layout (kernels/shared_prefix.py prefix_layout): each run of consecutive rows with the same
    prompt is one sequence, the prompt once and then the run's completions; plus training_batch's completion_ids,
    mask, sampler_logp (B, T) for the same rows in the same order."""
    batch = completion_tensors(rows, pad_id)
    batch.update(prefix_layout([s.id for s, _ in rows], [encoded[s.id] for s, _ in rows],
                               [c.token_ids for _, c in rows], pad_id))
    return {k: v.to(device) for k, v in batch.items()}


def completion_hidden(model, batch):
    """(B, T, H) last hidden states at the positions that predict the completion tokens, and the LM head's
    scored rows (V', H): an FSDP forward, so inside it the head's weight is the unsharded full tensor.
    `batch` is in either layout (training_batch, shared_prefix_batch)."""
    # the LM head's padding rows beyond the tokenizer are never sampled (palmr.suppressed_token_ids), so
    # they are not scored either: the softmax runs over the tokenizer's rows only (scored_vocab)
    head = lambda: model.lm_head.weight[:getattr(model, "scored_vocab", None)]  # noqa: E731
    if "branch" in batch:
        return shared_prefix_hidden(model, batch), head()
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")  # types: 3-D mRoPE
    out = model.model(**palmr.model_inputs(model, {k: batch[k] for k in keys if k in batch}), use_cache=False)
    T = batch["completion_ids"].shape[1]
    P = batch["input_ids"].shape[1] - T
    return out.last_hidden_state[:, P - 1:P - 1 + T], head()  # never logits for prompt or image tokens


def completion_loss(model, batch, temperature, token_loss=None):
    """An FSDP forward of a micro-batch through the fused LM head (kernels/lm_head.py), completion tokens only.

    token_loss None: -> logp (B, T) differentiable, entropy (B, T); 0 where masked (fused_logprobs).
    token_loss(logp_rows, start, end) -> per-token losses of the completion tokens start:end, counted in row-major
    order over the (B, T) mask: -> loss () with the LM-head gradient folded into the forward (fused_policy_loss),
    logp and entropy (B, T) detached.
    """
    hidden, weight = completion_hidden(model, batch)  # only completion positions reach the LM head
    mask = batch["mask"].bool()
    dtype = torch.promote_types(torch.float32, hidden.dtype)  # float32, or float64 for a float64 model (tests)
    logp = torch.zeros(mask.shape, dtype=dtype, device=hidden.device)
    entropy = torch.zeros(mask.shape, dtype=dtype, device=hidden.device)
    rows, targets = hidden[mask], batch["completion_ids"][mask]
    if token_loss is None:
        logp[mask], entropy[mask] = fused_logprobs(rows, weight, targets, temperature, model.logprob_chunk)
        return logp, entropy
    loss, logp[mask], entropy[mask] = fused_policy_loss(rows, weight, targets, token_loss, temperature,
                                                        model.logprob_chunk)
    return loss, logp, entropy


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
    (B, T) old_logp (None: the current log-probs, one update per rollout batch), ref_logp (None when beta = 0),
    mask; advantages (B,) or (B, T); is_weights (B,) or None. -> token_loss(logp_rows, start, end): the per-token
    losses of unmasked tokens start:end (row-major) over the micro-batch's token count (sum: policy_loss's loss)."""
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


def prepare_model(path, device, train, activation_checkpointing=False, logprob_memory=LOGPROB_MEMORY_MIB, shard=True,
                  prefix_attention="dense"):
    """Load, optionally checkpoint activations, shard with FSDP2 (when distributed and `shard`), register forwards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    from transformers import AutoTokenizer
    model = palmr.load_model(path, dtype=torch.float32 if train or device.type == "cpu" else torch.bfloat16,
                             device=device)
    use_prefix_attention(model, prefix_attention)
    model.requires_grad_(train)
    if activation_checkpointing:  # transformers >= 5.2x renamed it; 5.17 (vLLM 0.26's era) has the old name
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # completion_logprobs(batch, temperature) -> (B, T) log-probs, entropies; both are FSDP forwards
    model.completion_logprobs = model.completion_loss = types.MethodType(completion_loss, model)
    # the head's padding rows beyond the tokenizer are never sampled, so never scored (palmr.suppressed_token_ids)
    model.scored_vocab = len(AutoTokenizer.from_pretrained(path))
    model.logprob_chunk = logprob_chunk(model.scored_vocab, device.type, logprob_memory)
    if shard and dist.is_initialized():
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if device.type == "cuda" else MixedPrecisionPolicy()
        for block in palmr.fsdp_blocks(model):  # decoder layers and vision blocks, of any family
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)  # root: embeddings, merger, final norm, LM head
        for method in ("completion_logprobs", "completion_loss", "generate"):
            register_fsdp_forward_method(model, method)
    model.train(train)
    return model


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
            n = int(palmr.all_reduce(torch.tensor(n), dist.ReduceOp.MAX))
            parts = split_tokens(tokens, n)
        else:
            parts = micro_batches(per_update, args.micro_batch)
        spans.append([range(u * per_update + p.start, u * per_update + p.stop) for p in parts])
    return spans


def micro_batch_loss(policy, b, old, ref, adv, args):
    """One micro-batch's forward: -> loss (with its gradient path), policy_loss metrics, entropy (B, T), the old
    log-probs used (B, T), IS metrics or None. The folded LM head (completion_loss) needs each token's loss as a
    function of its own log-prob alone: IS weights from this very forward's log-probs (one update per rollout
    batch) are not known before it, so that case takes the unfolded path."""
    is_weights = is_m = None
    if args.is_cap > 0 and old is not None:
        is_weights, is_m = sequence_is_weights(old, b["sampler_logp"], b["mask"], args.is_cap)
    folded = None
    if args.is_cap > 0 and old is None:
        logp, entropy = policy.completion_logprobs(b, args.temperature)  # (B, T) each
    else:
        folded, logp, entropy = policy.completion_loss(b, args.temperature, masked_token_loss(
            old, ref, adv, b["mask"], args.eps_low, args.eps_high, args.beta, is_weights))
    old = logp.detach() if old is None else old
    if args.is_cap > 0 and is_weights is None:
        is_weights, is_m = sequence_is_weights(old, b["sampler_logp"], b["mask"], args.is_cap)
    loss, m = policy_loss(logp, old, ref, adv, b["mask"], args.eps_low, args.eps_high, args.beta, is_weights)
    # folded: the same value (logp is detached there: metrics only), gradients from the fold
    return (loss if folded is None else folded), m, entropy, old, is_m


def logprob_passes(policy, reference, processor, rows, encoded, args, device, hooks=()):
    """What the updates need that no reward changes, computed while the judge grades (--judge-overlap): per update,
    the micro-batches (spans: ranges into rows; batches: CPU tensors, sent to the device one at a time by on), and
    under no_grad the reference log-probs (beta > 0) and old log-probs (several updates, or a method asks), (B, T)."""
    clock, n_updates = palmr.PhaseClock(device), args.rollout_batch // args.update_batch
    spans = update_micro_batches(rows, encoded, len(rows) // n_updates, n_updates, args)
    form, pad_id = shared_prefix_batch if args.shared_prefix else training_batch, processor.tokenizer.pad_token_id
    layout, on = lambda r, e: form(r, e, pad_id, "cpu"), lambda b: {k: v.to(device, non_blocking=True) for k, v in b.items()}
    batches = [[layout([rows[i] for i in mb], encoded) for mb in update] for update in spans]
    need_old = n_updates > 1 or any(h.needs_old_logprobs for h in hooks)
    with torch.no_grad():
        ref_logps = [[reference.completion_logprobs(on(b), args.temperature)[0] for b in update]
                     for update in batches] if args.beta > 0 else None
        clock.lap("t_ref_logprobs" if args.beta > 0 else None)
        old_logps = [[policy.completion_logprobs(on(b), args.temperature)[0] for b in update]
                     for update in batches] if need_old else None
        clock.lap("t_old_logprobs" if need_old else None)
    return types.SimpleNamespace(n_updates=n_updates, spans=spans, batches=batches, layout=layout, on=on, clock=clock,
                                 need_old=need_old, ref_logps=ref_logps, old_logps=old_logps, seconds=time.time() - clock.started)


def train_on_rollouts(policy, reference, optimizer, processor, rows, encoded, advantages, args, device, hooks=(),
                      step=0, passes=None):
    """PPO-clip updates over this rank's rows (group after group); -> metrics averaged over tokens.

    advantages (N,), one per row; hooks: active methods (variants/), whose shape_advantages may replace them by
    per-token ones before any update. step: passed to the hooks (e.g. to seed a method's random draws).
    passes: logprob_passes of these rows, when the loop ran them already (beside the judge).
    """
    p = passes or logprob_passes(policy, reference, processor, rows, encoded, args, device, hooks)
    world, n_updates, spans, batches, on, clock, shaped, shaped_m = (palmr.get_world_size(), p.n_updates, p.spans,
                                                                     p.batches, p.on, p.clock, None, {})
    clock.lap(None)  # the update's own time from here, not the wait on the judge since the passes
    with torch.no_grad():
        ctx = types.SimpleNamespace(policy=policy, processor=processor, rows=rows, encoded=encoded, spans=spans,
                                    advantages=advantages, batches=batches, old_logps=p.old_logps, on=on, device=device,
                                    layout=p.layout, step=step, clock=clock, temperature=args.temperature)
        for h in hooks:  # a method's per-token advantages (variants/base.py); at most one shapes them
            shaped, shaped_m = h.shape_advantages(ctx) or (shaped, shaped_m)
    totals = dict.fromkeys(("loss", "kl", "clip_frac", "entropy", "grad_norm", "tokens"), 0.0)
    for u in range(n_updates):
        global_tokens = float(palmr.all_reduce(torch.tensor(sum(float(b["mask"].sum()) for b in batches[u]))))
        for j, (b, span) in enumerate(zip(batches[u], spans[u])):
            # FSDP2 reduce-scatters after every micro-batch: skipping it (no-sync) would hold the full
            # unsharded fp32 gradients on every rank, ~30 GB for a 7B policy
            b = on(b)
            adv = shaped[u][j] if shaped is not None else advantages[span.start:span.stop].to(device)  # (B,) or (B, T)
            loss, m, entropy, old, is_m = micro_batch_loss(policy, b, p.old_logps[u][j] if p.need_old else None,
                                                           p.ref_logps[u][j] if p.ref_logps else None, adv, args)
            for k, v in (is_m or {}).items():
                totals[k] = totals.get(k, 0.0) + float(v) * len(span) / len(rows)  # mean over this rank's rows
            if args.debug_logprobs and u == 0 and j == 0:  # first batch after the last weight sync
                gap = (old - b["sampler_logp"]).abs()[b["mask"].bool()]
                totals["debug/logprob_gap_max"] = float(gap.max()) if gap.numel() else 0.0
                totals["debug/logprob_gap_mean"] = float(gap.mean()) if gap.numel() else 0.0
            # token-mean over the global update batch: FSDP averages gradients over ranks, hence * world
            weight = float(b["mask"].sum()) / max(global_tokens, 1.0)
            (loss * weight * world).backward()
            for k, v in (("loss", loss.detach()), ("kl", m["kl"]), ("clip_frac", m["clip_frac"])):
                totals[k] += float(v) * weight
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
        totals[k] = float(palmr.all_reduce(torch.tensor(totals[k]))) / n_updates
    totals.update(shaped_m)
    for k in [k for k in totals if k.startswith(("is/", "debug/")) or k in shaped_m]:  # rank means -> global
        totals[k] = float(palmr.all_reduce(torch.tensor(totals[k]))) / world
    return {**totals, **clock.times}


# -----------------------------------------------------------------------------
# Checkpoints (a Hugging Face folder + trainer state, written by rank 0) and resume


def save_checkpoint(policy, optimizer, args, step):
    """OUT/checkpoint-STEP: a Hugging Face folder, streamed (palmr.save_streamed); the AdamW state sharded by DCP
    (optimizer/: each rank writes its shards, none gathered; loads on any number of ranks); trainer_state.pt."""
    rngs, out = palmr.rng_states(), Path(args.out)
    final, tmp = out / f"checkpoint-{step:06d}", out / f".checkpoint-{step:06d}.tmp"
    if palmr.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    palmr.barrier()  # --out is one folder every rank sees (README "Running on several nodes")
    with palmr.sigint_deferred():  # Ctrl-C now stops after the checkpoint, never inside it
        palmr.save_streamed(policy, tmp)
        dcp.save({"optimizer": get_optimizer_state_dict(policy, optimizer)}, checkpoint_id=tmp / "optimizer")
        if palmr.get_rank() == 0:
            palmr.copy_processor_files(args.model_source, tmp)
            torch.save({"step": step, "data_position": step * args.rollout_batch,  # prompts consumed so far
                        "rng": rngs, "args": vars(args)}, tmp / "trainer_state.pt")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            (out / "latest.tmp").write_text(final.name)
            os.replace(out / "latest.tmp", out / "latest")
            for old in sorted(out.glob("checkpoint-*"))[:-args.keep]:
                shutil.rmtree(old, ignore_errors=True)
        palmr.barrier()
    return final


RESUME_MUST_MATCH = ("model", "data", "seed", "group_size", "rollout_batch", "update_batch", "reward", "judge",
                     "lr", "beta", "temperature", "max_new_tokens", "judge_omissions", "mix_data", "mix_ratio",
                     "mix_reward")


def load_trainer_state(ckpt, policy, optimizer, args):
    """Restore optimizer, RNG and step from a checkpoint folder (weights were loaded from it already)."""
    # mmap: an old checkpoint's optimizer tensors are read only where used (rank 0 broadcasts them)
    state = torch.load(Path(ckpt) / "trainer_state.pt", weights_only=False, map_location="cpu", mmap=True)
    keys, old = RESUME_MUST_MATCH, dict(state["args"])
    keys += variants.resume_keys()  # variants: each method's own flags (those registered by now included)
    if old.get("vicrit_data"):  # saved before --mix-data existed (issue 24): its ViCrit flags were that mix
        old.update(mix_data=old["vicrit_data"], mix_reward="vicrit", mix_ratio=old.get("vicrit_ratio", 0.25))
    defaults = vars(get_args([]))  # a run saved before an option existed ran with its default
    saved = {k: old.get(k, defaults.get(k)) for k in keys}
    differ = {k: (saved[k], getattr(args, k)) for k in keys if saved[k] != getattr(args, k)}
    if differ:
        raise SystemExit(f"--resume with other settings than the run in {args.out}: {differ} (saved, given)")
    if (Path(ckpt) / "optimizer").is_dir():  # sharded: DCP reshards it to this run's ranks, whatever their number
        sd = {"optimizer": get_optimizer_state_dict(policy, optimizer)}  # the state's layout, initialised
        dcp.load(sd, checkpoint_id=Path(ckpt) / "optimizer")
        set_optimizer_state_dict(policy, optimizer, sd["optimizer"])
    else:  # a checkpoint from before issue 27: one gathered state, broadcast from rank 0
        many = palmr.get_world_size() > 1
        set_optimizer_state_dict(policy, optimizer, state["optimizer"] if palmr.get_rank() == 0 or not many else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=many))
    if not palmr.restore_rng(state["rng"]):  # rollouts are seeded by step and rank, not by these states
        print0(f"resume on {palmr.get_world_size()} ranks from {len(state['rng'])}: RNG states not restored")
    return state["step"]
# -----------------------------------------------------------------------------
# Setup and the main loop


def build_trainer(args, device, resume_from):
    """-> policy (from the latest checkpoint when resuming), frozen reference (None when beta = 0), AdamW, step."""
    if args.shared_prefix is None:  # measured faster on CPU; not yet measured on a GPU (README)
        args.shared_prefix = device.type != "cuda"
    args.shared_prefix = args.shared_prefix and palmr.shared_prefix_allowed(args.model)  # Qwen3.5: per row, said once
    route = args.prefix_attention if args.shared_prefix else "dense"  # dense: the model's own attention untouched
    policy = prepare_model(resume_from or args.model, device, train=True, prefix_attention=route,
                           activation_checkpointing=args.activation_checkpointing, logprob_memory=args.logprob_memory)
    reference = prepare_model(args.model, device, train=False, logprob_memory=args.logprob_memory,
                              prefix_attention=route) if args.beta > 0 else None
    if args.shared_prefix:  # fail now, not at the first forward, on an attention implementation without custom masks
        prefix_attention_mask(torch.zeros((1, 1), dtype=torch.long), route, policy.config.text_config._attn_implementation)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    start = load_trainer_state(resume_from, policy, optimizer, args) if resume_from else 0
    return policy, reference, optimizer, start


def main(argv=None):
    """Run V-GRPO; returns the trained (possibly FSDP-sharded) policy module."""
    import transformers
    args = get_args(argv)
    if args.report:  # a finished or running run's report; loads no model
        return print(", ".join(str(path) for path in run_report(args.out) if path))
    check_args(args, int(os.environ.get("WORLD_SIZE", 1)))  # conflicts, --model, files, --resume: exit 2
    check_packages(args.report_to)  # every rank stops, not just rank 0
    rank, world, device = palmr.init_dist(args.threads)
    hooks = []  # the active perception-aware methods (variants/): none for plain PaLMR
    hooks = variants.active(args, world)  # variants: the methods these flags switch on
    out = Path(args.out)
    resume_from = out / (out / "latest").read_text().strip() if args.resume else None
    logged = 0 if args.warmup_only else open_run_folder(  # one owner; a resume's logs cut back to its checkpoint
        out, args.resume, args.overwrite, int(resume_from.name.split("-")[-1]) if resume_from else 0)
    judge = judge_from_args(args, **{k: v for h in hooks for k, v in h.judge_options().items()})
    palmr.rank0_or_stop(check_judge, None if args.warmup_only else judge)  # a dead judge stops the run here
    warmup.embedded_default(args, rank, prepare_model, training_batch)  # tiny model, shapes, warm start
    if args.warmup_only:
        return print0(args.model)
    transformers.set_seed(args.seed)  # random, numpy, torch
    args.model_source = args.model
    processor = palmr.load_processor(args.model)
    samples = load_dataset(args, processor, hooks=hooks)
    mixed = load_dataset(args, processor, args.mix_data, hooks, args.mix_reward or args.reward) if args.mix_data else []
    if shared := {s.id for s in samples} & {s.id for s in mixed}:
        raise SystemExit(f"--data and --mix-data share {len(shared)} item ids (e.g. {min(shared)}): rename one set")
    policy, reference, optimizer, start = build_trainer(args, device, resume_from)
    engine, args.max_prompt_tokens = palmr.make_engine(  # HF generate on the policy, or a colocated vLLM per rank
        args.engine, policy, processor, resume_from or args.model, args.max_pixels, device, args.seed, args.vllm_tp,
        args.vllm_gpu_memory, args.max_prompt_tokens, args.max_new_tokens, args.vllm_max_model_len)
    if resume_from:  # the sampler must start from exactly the trainer's weights
        engine.load_weights(palmr.full_parameters(policy))
    n_mixed = int(args.mix_ratio * args.rollout_batch + 0.5) if mixed else 0  # mixed prompts per step
    if mixed:
        print0(f"mix: {n_mixed} of the {args.rollout_batch} prompts of every step come from {args.mix_data}"
               + (" (none: raise --mix-ratio or --rollout-batch)" if n_mixed == 0 else ""))
    prefill = palmr.generation_prefill(palmr.render_prompt(processor, ""))  # '' for Qwen2.5-VL's own template
    logger = start_logger(args, out, rank, start, logged)  # rank 0's; None elsewhere
    validator = evaluation.Validator(args, engine, processor, out, rank) if args.eval_every > 0 or args.eval_before_train else None
    if args.eval_before_train and start == 0:
        val = validator(0)[0]
        if rank == 0:
            logger.log({"step": 0, **val}, 0)
            print("validation at step 0: " + " ".join(f"{k} {v:.3g}" for k, v in val.items()), flush=True)
    print0(f"V-GRPO | world {world} on {device.type} | engine {type(engine).__name__} | reward {args.reward} judge "
           f"{args.judge} | G {args.group_size} rollout {args.rollout_batch} update {args.update_batch} prompts | "
           f"steps {start}->{args.max_steps}" + (f" (resumed from {resume_from.name})" if resume_from else ""))
    run = types.SimpleNamespace(args=args, engine=engine, processor=processor, rank=rank, world=world, prefill=prefill,
                                samples=samples, score=lambda rows: compute_rewards(judge, rows, args.reward, prefill)[0])
    run.rollout = lambda batch, n=None, seed_offset=0: rollout(engine, processor, batch, args, run.step, rank, n,
                                                               seed_offset, hooks)

    for step in range(start, args.max_steps):
        t0, run.step = time.time(), step
        # 1. rollout: this rank's prompts, G completions each, and any generations a method adds (Extra)
        mine = [(mixed if src else samples)[i] for src, i in mixed_step_items(
            len(samples), len(mixed), step, args.rollout_batch, n_mixed, args.seed, rank, world)]
        rows, encoded = run.rollout(mine)
        for h in hooks:  # a method may replace the step's groups (dynamic sampling: tied groups redrawn)
            mine, rows, encoded = h.redraw(run, mine, rows, encoded) or (mine, rows, encoded)
        extras = [e for h in hooks if (e := h.after_rollout(run, mine, rows)) is not None]
        engine.sleep()
        moved, t1 = sum(e.reward_seconds for e in extras), time.time()  # a method's scoring: the reward phase's
        # 2. reward: format, answer and the judge's S_vis, fused by each row's scheme; the judge grades in the
        # background while the reference and old log-probs (no reward in them) are computed, joined here
        signals = [{k: v for e in extras if e.parts for k, v in e.parts[i].items()} for i in range(len(rows))]
        options = {k: v for h in hooks for k, v in h.reward_signals().items()}
        graded = palmr.Background(compute_rewards, judge, rows, args.reward, prefill, signals, options, wait=not args.judge_overlap)
        train_rows, train_encoded, place = with_extra_groups(rows, encoded, extras, args, rank, len(mine))
        passes = logprob_passes(policy, reference, processor, train_rows, train_encoded, args, device, hooks)
        rewards, parts, judge_stats, located = graded.result()
        if (failed := failure_share(judge_stats, len(rows))) > args.judge_max_failed:  # no update on ungraded rewards
            save_checkpoint(policy, optimizer, args, step) if step > start and step % args.save_every else None
            raise SystemExit(f"step {step + 1}: the judge failed on {failed:.0%} of the rollouts (over "
                             f"--judge-max-failed {args.judge_max_failed:g}; errors above): stopped before its update")
        for h in hooks:
            h.after_reward(run, rows, located)
        # 3. advantage: group-normalised over the global batch (a group never spans ranks)
        (advantages, all_adv, all_rewards), t2 = global_advantages(rewards, args.group_size, args.adv_scale, rank), time.time()
        # 4. update: PPO-clip + k3 KL, one AdamW step per update batch
        stats = train_on_rollouts(policy, reference, optimizer, processor, train_rows, train_encoded,
                                  place(advantages), args, device, hooks, step, passes)
        # 5. weight sync: vLLM gets the new weights streamed; the HF engine shares the module
        t_sync = time.time()
        engine.load_weights(palmr.full_parameters(policy))
        t3 = time.time()
        # 6. log, validate, checkpoint
        val, stats["t_weight_sync"], stats["t_judge"] = {}, t3 - t_sync, graded.seconds  # t_reward: what it cost
        if args.eval_every > 0 and (step + 1) % args.eval_every == 0:
            val, stats["t_val"] = validator(step + 1)
        metrics = step_metrics(rows, encoded, rewards, parts, judge_stats, located, all_adv, all_rewards, args, hooks, world)
        metrics = {"step": step + 1, **metrics, **stats, **{k: v for e in extras for k, v in e.metrics.items()},
                   "t_rollout": t1 - t0 - moved, "t_train": t3 - t2 + passes.seconds, "t_reward": t2 - t1 - passes.seconds + moved}
        if rank == 0:
            log_step({**metrics, **val}, rows, rewards, args, step, logger, hooks)
        if (step + 1) % args.save_every == 0 or step + 1 == args.max_steps:
            print0(f"saved {save_checkpoint(policy, optimizer, args, step + 1)}")
    if rank == 0:
        logger.close()
        md, png = run_report(out)
        print(f"report: {md}" + (f", {png}" if png else ""), flush=True)
    return policy


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C reaches every rank: one line, not a traceback per rank
        if palmr.get_rank() == 0:
            print("interrupted: --resume continues from the latest checkpoint", file=sys.stderr, flush=True)
        sys.exit(130)
    if dist.is_initialized():
        dist.destroy_process_group()
