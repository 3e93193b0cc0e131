"""The embedded default's warm start: supervised fine-tuning of the tiny random policy on the shapes references,
so that RL starts from a policy that can do the task and sometimes misreads the image, as real base models do.

    python grpo.py --warmup-only                       # build (or find) the cached warm start, print its path

grpo.py calls embedded_default (which calls ensure_warm_start when --model is the tiny default), passing its own model preparation and batch
layout (this file never imports grpo.py); the result is cached next to the tiny checkpoint, keyed by settings.
"""
import json
import math
import os
import random
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

import palmr
from data import ensure_shapes, hallucinated_trace, load_image, read_jsonl
from palmr import print0


def warmup(model_path, data_path, out_dir, prepare_model, layout, steps=300, batch=16, lr=2e-3, max_pixels=112 * 112,
           seed=0, log_every=50, hallucinated_share=0.0, trace_format="think"):
    """SFT on the samples' reference traces, a `hallucinated_share` of them misread on purpose
    (data.hallucinated_trace: same answer, one wrong group), so the start policy hallucinates like real
    base models do; save to out_dir. One process (never sharded, even under torchrun), teacher forcing on
    completion tokens only (the RL loss's batch builder and log-prob path, passed in: grpo.prepare_model,
    grpo.training_batch), AdamW with a linear
    warm-up over 5% of the steps then cosine decay to 0 (the decay is where a small model's loss drops
    most; docs/LOG.md has the recipes tried). trace_format "description": the traces in Vision-SR1's format
    (palmr.sr1_trace) under its instruction, the cold start its recipe assumes. Returns the (step, loss) pairs it logged.
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
        prompt_text = palmr.render_prompt(processor, s.question, s.choices, instruction=instruction)
        encoded[s.id] = palmr.encode_prompt(processor, prompt_text, load_image(s), max_pixels)
        trace = hallucinated_trace(s, pick) if pick.random() < hallucinated_share else s.reference
        trace = palmr.sr1_trace(trace) if trace_format == "description" else trace
        trace = completion_target(trace, palmr.generation_prefill(prompt_text))
        ids = tok(trace, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        rows.append((s, palmr.Completion(ids, trace, [0.0] * len(ids), True)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng, history, w = random.Random(seed), [], steps // 20
    for step in tqdm(range(steps), desc="warm-up", mininterval=5):
        scale = (step + 1) / w if step < w else 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))
        optimizer.param_groups[0]["lr"] = lr * scale
        b = layout(rng.sample(rows, min(batch, len(rows))), encoded, tok.pad_token_id, torch.device("cpu"))
        logp, _ = model.completion_logprobs(b, 1.0)
        loss = -(logp * b["mask"]).sum() / b["mask"].sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % log_every == 0 or step == steps - 1:
            history.append((step, float(loss.detach())))
    palmr.save_here(model, out_dir)  # on this node's builder, whatever its global rank
    palmr.copy_processor_files(model_path, out_dir)
    return history


def completion_target(trace, prefill):
    """What the policy must write after a chat template that prefills the assistant turn (Qwen3.5's '<think>\n'):
    the trace without the prefilled opening; the trace itself when nothing is prefilled. Raises ValueError when
    the template prefills something the trace does not open with (Vision-SR1's '<description>' traces after a
    '<think>' prefill; a closed, empty think block): no completion could then write the trace's format."""
    head = prefill.strip()
    if not head:
        return trace
    if not trace.startswith(head) or "</think>" in head:
        raise ValueError(f"the chat template prefills {prefill!r} and the trace opens with {trace[:20]!r}: no "
                         f"completion can write this format after that prefill")
    return trace[len(head):].lstrip()


def ensure_warm_start(base, data_path, steps, hallucinated_share, prepare_model, layout, seed=0, trace_format="think",
                      threads=0):
    """The warm-up checkpoint for these settings, built once next to `base` (palmr.builds_cache); the others wait.

    Rank 0 builds with `threads` threads, by default every core: torchrun leaves each process one thread, and the
    waiting ranks use none (on a shared machine, --threads caps it). (Measured: a data-parallel FSDP warm-up over 2 gloo ranks ran 3.2 steps/s against 4.7 for one
    process with both cores; the tiny model is too small for per-layer collectives to pay.)
    """
    sr1 = "-sr1" if trace_format == "description" else ""
    path = Path(base).with_name(f"{Path(base).name}-warm{steps}-h{hallucinated_share:g}-s{seed}{sr1}-v2")
    if palmr.builds_cache() and not (path / "config.json").exists():  # one builder per node, or one in all
        print0(f"building the warm start ({steps} SFT steps, {hallucinated_share:.0%} misread traces) -> {path}")
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")  # two builds at once never share a folder
        before = torch.get_num_threads()
        torch.set_num_threads(threads or os.cpu_count() or 1)
        try:
            warmup(base, data_path, tmp, prepare_model, layout, steps=steps, seed=seed,
                   hallucinated_share=hallucinated_share, trace_format=trace_format)
            (tmp / "versions.json").write_text(json.dumps(palmr.versions()))  # what built it (constraints.txt)
            os.replace(tmp, path)
        finally:
            torch.set_num_threads(before)
            shutil.rmtree(tmp, ignore_errors=True)  # a failed build leaves nothing half-written
    built = path / "versions.json"
    if palmr.get_rank() == 0 and built.exists() and json.loads(built.read_text()) != palmr.versions():
        print0(f"warning: the cached warm start {path} was built with {built.read_text()}, this run has "
               f"{json.dumps(palmr.versions())}: its numbers can differ from the README's (delete it to rebuild)")
    palmr.barrier()  # every rank, always
    return str(path)


def warmup_args(ap):
    """The warm start's flags, for grpo.py's parser."""
    g = ap.add_argument_group("warm start of the embedded default (warmup.py)")
    g.add_argument("--warmup-steps", type=int, default=600, help="with the default tiny model: SFT steps of a cached "
                   "warm start built before RL (0: start from the random tiny model)")
    g.add_argument("--warmup-hallucinated", type=float, default=0.3, help="share of warm-up traces that reach the "
                   "right answer through a misread scene (ours: so the start policy hallucinates)")
    g.add_argument("--warmup-format", default="think", choices=["think", "description"],
                   help="warm-up traces in PaLMR's <think> format, or in Vision-SR1's <description><think> format "
                   "under its instruction (the cold start its recipe assumes; cached apart)")
    g.add_argument("--warmup-only", action="store_true", help="build (or find) the cached warm start, print its path "
                   "and exit")


def embedded_default(args, rank, prepare_model, layout):
    """The embedded default: the tiny checkpoint, the synthetic shapes data and the cached warm start, built once
    by rank 0 when missing (the others wait); --model and --data are set to them."""
    tiny = palmr.tiny_family(args.model)  # one of the embedded tiny checkpoints (palmr.TINY), of any family
    if tiny:
        args.model = palmr.ensure_tiny_checkpoint(args.model, seed=0)
    if args.data is None:
        args.data = ensure_shapes() if palmr.builds_cache() else None
        palmr.barrier()
        args.data = args.data or ensure_shapes()
    if tiny and args.warmup_steps > 0:  # the embedded default starts from a warm, cached tiny policy
        args.model = ensure_warm_start(args.model, ensure_shapes(), args.warmup_steps, args.warmup_hallucinated,
                                       prepare_model, layout, trace_format=args.warmup_format,
                                       threads=getattr(args, "threads", 0))
