"""Per-row vs shared-prefix layout: tokens computed per group and the trainer's train phase, same rows, same run.

    python bench/shared_prefix.py                         # CPU: the default shape (G 8), then G 16 at larger images
    python bench/shared_prefix.py --configs g16-img448    # one configuration
    torchrun --nproc_per_node 1 bench/shared_prefix.py --model PATH --configs g16-img896-c256 --routes branch dense
                                                          # a real checkpoint on one GPU, FSDP bf16 as in the trainer

For each configuration the bench builds one rollout batch (prompts from the synthetic shapes set, the image
upscaled to the configuration's side so that the prompt holds that many image tokens; G completions per
prompt of random token ids, lengths uniform in [C/2, C]) and runs the real `grpo.train_on_rollouts` on it
(reference log-probs with beta > 0, the policy's forward + backward with the folded LM head, AdamW) in
both layouts, alternating, `--repeats` times each. It reports the medians of the phases the layout
changes (reference log-probs, policy forward+backward) and their sum, the "train phase"; the optimizer
step is the same in both and left out. Tokens per group: G(P + C) per row vs P + G C shared (unpadded,
from the actual lengths), and the tokens the forward passes really hold, padding included.
STATUS: run on CPU by this project; not yet on a GPU (no GPU was lent to the session that wrote it).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name: (group size G, image side in px, max completion length C); prompts per rollout batch come from --prompts
CONFIGS = {"default": (8, None, 64),          # the CPU default run: 84 px shapes images, 9 image tokens
           "g16-img448": (16, 448, 64),       # 256 image tokens
           "g16-img448-c256": (16, 448, 256),
           "g16-img896-c256": (16, 896, 256)}  # 1024 image tokens, about a 900x900 photo's share


def make_rows(processor, samples, group, side, max_len, max_pixels, seed=0):
    """-> rows [(sample, Completion)] group after group, and {id: encoded prompt}."""
    import torch
    import palmr
    from data import load_image
    g = torch.Generator().manual_seed(seed)
    banned = set(palmr.suppressed_token_ids(processor.tokenizer)) | set(palmr.stop_token_ids(processor.tokenizer))
    allowed = torch.tensor([t for t in range(len(processor.tokenizer)) if t not in banned])
    rows, encoded = [], {}
    budget = max(max_pixels, (side or 0) ** 2)
    size = processor.image_processor.size  # its own pixel cap (the tiny one's: 448 x 448) must not shrink the image
    if isinstance(size, dict):  # transformers 5.17: a dict
        size["longest_edge"] = max(size["longest_edge"], budget)
    else:  # 5.2x: a SizeDict
        size.longest_edge = max(size.longest_edge, budget)
    for s in samples:
        image = load_image(s)
        if side:
            image = image.resize((side, side))
        text = palmr.render_prompt(processor, s.question, s.choices)
        encoded[s.id] = palmr.encode_prompt(processor, text, image, budget)
        for _ in range(group):
            n = int(torch.randint(max_len // 2, max_len + 1, (1,), generator=g))
            ids = allowed[torch.randint(0, len(allowed), (n,), generator=g)].tolist()
            rows.append((s, palmr.Completion(ids, "", [-1.0] * n, False)))
    return rows, encoded


def forward_tokens(rows, encoded, pad_id, args):
    """Tokens the trainer's forward passes hold (padding included), summed over its micro-batches, in the
    layout args.shared_prefix selects."""
    import grpo
    layout = grpo.shared_prefix_batch if args.shared_prefix else grpo.training_batch
    spans = grpo.update_micro_batches(rows, encoded, len(rows), 1, args)[0]
    return sum(layout([rows[i] for i in mb], encoded, pad_id, "cpu")["input_ids"].numel() for mb in spans)


def args_as(args, shared):
    import copy
    args = copy.copy(args)
    args.shared_prefix = shared
    return args


def run_config(name, a, policy, reference, processor, samples, device):
    import torch
    import grpo
    group, side, max_len = CONFIGS[name]
    rows, encoded = make_rows(processor, samples, group, side, max_len, a.max_pixels)
    P = statistics.mean(len(e["input_ids"]) for e in encoded.values())
    C = statistics.mean(len(c.token_ids) for _, c in rows)
    pad = processor.tokenizer.pad_token_id
    args = grpo.get_args(["--group-size", str(group), "--rollout-batch", str(len(samples)),
                          "--update-batch", str(len(samples)), "--micro-batch", str(a.micro_batch), "--beta", "0.01",
                          "--lr", "1e-7", *a.extra])
    advantages = torch.randn(len(rows), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr)
    layouts = ["per-row"] + [f"shared-{r}" for r in a.routes]
    times = {k: [] for k in layouts}
    for rep in range(a.repeats + 1):  # the first pass of each layout warms caches and is not counted
        for k in layouts[rep % len(layouts):] + layouts[:rep % len(layouts)]:  # rotate the order
            args.shared_prefix = k != "per-row"
            policy.prefix_attention = reference.prefix_attention = k.split("-", 1)[1] if args.shared_prefix else "dense"
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = grpo.train_on_rollouts(policy, reference, optimizer, processor, rows, encoded, advantages, args, device)
            print(f"  {name} | pass {rep}/{a.repeats}{' (warm-up)' if rep == 0 else ''} | {k}: "
                  f"{t['t_ref_logprobs'] + t['t_policy']:.1f} s", flush=True)  # a config takes minutes on CPU
            if rep > 0:
                times[k].append({p: t[p] for p in ("t_ref_logprobs", "t_policy")})
    med = {k: {p: statistics.median(x[p] for x in times[k]) for p in ("t_ref_logprobs", "t_policy")} for k in times}
    train = {k: med[k]["t_ref_logprobs"] + med[k]["t_policy"] for k in med}
    row = {"config": name, "G": group, "image_side": side or 84, "prompt_len": P, "completion_len": C,
           "prompts": len(samples), "micro_batch": args.micro_batch,
           "tokens_per_group_per_row": group * (P + C), "tokens_per_group_shared": P + group * C,
           "token_ratio": group * (P + C) / (P + group * C),
           "forward_tokens_per_row": forward_tokens(rows, encoded, pad, args_as(args, False)),
           "forward_tokens_shared": forward_tokens(rows, encoded, pad, args_as(args, True)),
           "phases": med, "train_s": train, "speedup": {k: train["per-row"] / train[k] for k in layouts[1:]}}
    row["forward_token_ratio"] = row["forward_tokens_per_row"] / row["forward_tokens_shared"]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=type("Help", (
        argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}))  # defaults shown
    ap.add_argument("--configs", nargs="+", default=["default", "g16-img448", "g16-img448-c256"], choices=list(CONFIGS))
    ap.add_argument("--model", default=None, help="policy checkpoint (default: the tiny one, built here)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per rollout batch (one update)")
    ap.add_argument("--micro-batch", type=int, default=16, help="rows per micro-batch (grpo.py's default)")
    ap.add_argument("--max-pixels", type=int, default=112 * 112)
    ap.add_argument("--routes", nargs="+", default=["branch", "dense"], choices=["branch", "dense"],
                    help="shared-prefix attention routes to time against the per-row layout (grpo --prefix-attention)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per layout (after one warm-up each)")
    ap.add_argument("--out", default="out/bench_shared_prefix.json")
    ap.add_argument("extra", nargs="*", help="more grpo.py flags, after --")
    a = ap.parse_args(argv)
    import torch
    import grpo
    import palmr
    from data import ensure_shapes, read_jsonl
    _, world, device = palmr.init_dist()  # under torchrun the policy is FSDP-wrapped (bf16 compute on GPUs)
    assert world == 1, "one process: the bench times one rank's train phase"
    model = a.model or palmr.ensure_tiny_checkpoint(palmr.DEFAULT_TINY, seed=0)
    processor = palmr.load_processor(model)
    # "branch" registers kernels.shared_prefix.prefix_attention, which serves every route; each pass then sets its own
    policy = grpo.prepare_model(model, device, train=True, prefix_attention="branch")
    reference = grpo.prepare_model(model, device, train=False, prefix_attention="branch")
    samples = read_jsonl(ensure_shapes())[:a.prompts]
    start, rows = time.time(), []
    for name in a.configs:
        rows.append(run_config(name, a, policy, reference, processor, samples, device))
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x {torch.get_num_threads()} threads"
    lines = [f"{dev} | {Path(model).name} | medians of {a.repeats} passes per layout | {time.time() - start:.0f} s",
             "| config | G | P | C | tokens/group per-row -> shared | G(P+C)/(P+GC) | forward tokens (padded) | "
             "layout | ref log-probs s | policy fwd+bwd s | train-phase speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for k, ph in r["phases"].items():
            head = (f"| {r['config']} | {r['G']} | {r['prompt_len']:.0f} | {r['completion_len']:.0f} | "
                    f"{r['tokens_per_group_per_row']:.0f} -> {r['tokens_per_group_shared']:.0f} | {r['token_ratio']:.2f}x | "
                    f"{r['forward_token_ratio']:.2f}x fewer |") if k == "per-row" else "| | | | | | | |"
            speed = "1 (baseline)" if k == "per-row" else f"**{r['speedup'][k]:.2f}x**"
            lines.append(f"{head} {k} | {ph['t_ref_logprobs']:.2f} | {ph['t_policy']:.2f} | {speed} |")
    print("\n".join(lines))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"device": dev, "model": model, "rows": rows, "versions": palmr.versions()}, indent=2))
    return rows


if __name__ == "__main__":
    main()
