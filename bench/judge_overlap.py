"""PaLMR's step time over GRPO's when the judge is a server with a realistic latency, with and without the judge
running beside the trainer's log-prob passes (grpo.py --judge-overlap), side by side in one run.

    python bench/judge_overlap.py                               # 0.5 1 2 3 s per request, 64 and 128 in flight, ~15 min
    python bench/judge_overlap.py --latencies 1 --concurrency 64 --steps 3        # one point

The judge: tests/chat_server.py in this process, an OpenAI-compatible HTTP server on 127.0.0.1 that judges
exactly (the shapes rule). Each reply carries --reply-tokens tokens of reasoning and waits the request's latency
minus their decode time (--token-latency per token), then the decode time: one request costs the latency asked
for (and the verdict's few tokens), reply_tokens * token_latency of it per token. --concurrency: requests in flight
per rank, one or several values (each a sweep over the latencies).

The trainer: grpo.py on the embedded default (tiny Qwen2.5-VL, its cached warm start, shapes), a fresh process per
configuration, --lr 0 so that every configuration samples the same rollouts and scores the same batches: they
differ only in the reward. GRPO (--reward grpo --judge none) runs first and last (its mean is the baseline; both are
printed, to show drift), and between them PaLMR (--judge openai) at each latency, without and with the overlap.

Step time: the sum of a step's phases (rollout, the reward's unhidden part, train: log-prob passes, update, weight
sync), the median over the steps after the first. Overhead: PaLMR's step time / GRPO's - 1; it carries the run-to-run
spread of identical work (GRPO first vs last), so the last column gives the judge's own share: its unhidden time
(t_reward, what the loop waited for it beyond the passes) / GRPO's step. Also printed per
configuration: the judge's wall time per step (t_judge: one batch of rollout_batch * group_size requests) and the
log-prob passes' (reference + old). With the overlap, a step costs max(judge, passes) instead of their sum, so
the judge is free while it is shorter than the passes; the last lines say up to which latency the overhead stays
within --target, measured and as predicted by (judge - passes) / GRPO step.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from chat_server import ChatServer, perfect_reply  # noqa: E402

FILLER = "checking "  # reasoning filler: usage counts len(text) // 4 tokens, so 4 words ~ 9 tokens


def judge_server(latency, reply_tokens, token_latency):
    """A perfect shapes judge whose requests take about `latency` seconds each: a reasoning block of about
    reply_tokens tokens before the verdict, decoded at token_latency s/token, after latency minus that."""
    words = reply_tokens * 4 // len(FILLER)

    def reply(messages):  # the start-up probe's "OK" has no <think>: unchanged
        return perfect_reply(messages).replace("<think>", "<think>" + FILLER * words, 1)
    decode = token_latency * reply_tokens
    if decode > latency:
        raise SystemExit(f"bench: {reply_tokens} tokens at {token_latency} s take longer than a {latency} s request")
    return ChatServer(reply=reply, latency=latency - decode, token_latency=token_latency)


def run_trainer(out, steps, flags, args):
    cmd = [sys.executable, str(ROOT / "grpo.py"), "--out", str(out), "--max-steps", str(steps), "--lr", "0",
           "--rollout-batch", str(args.rollout_batch), "--group-size", str(args.group_size),
           "--update-batch", str(args.update_batch), "--max-new-tokens", str(args.max_new_tokens),
           "--log-rollouts-every", "0", "--save-every", str(steps + 1),
           *(["--model", args.model] if args.model else []), *(["--data", args.data] if args.data else []), *flags]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench: grpo.py {' '.join(flags)} failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
    metrics = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()][1:]
    med = lambda key: statistics.median(m.get(key, 0.0) for m in metrics)  # noqa: E731
    step = statistics.median(m["t_rollout"] + m["t_reward"] + m["t_train"] for m in metrics)
    return {"step_s": step, "judge_s": med("t_judge"), "passes_s": med("t_ref_logprobs") + med("t_old_logprobs"),
            "unhidden_s": med("t_reward"), "request_s": med("judge/latency"), "failed": med("judge/failed"),
            "completion_len": med("completion_len")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=type("Help", (
        argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}))
    ap.add_argument("--latencies", default="0.5,1,2,3", help="seconds per judge request, comma-separated")
    ap.add_argument("--reply-tokens", type=int, default=400, help="reasoning tokens per reply")
    ap.add_argument("--token-latency", type=float, default=0.001, help="seconds per reply token (part of the latency)")
    ap.add_argument("--concurrency", default="64,128", help="judge requests in flight per rank, comma-separated")
    ap.add_argument("--steps", type=int, default=5, help="steps per configuration (the first is not timed)")
    ap.add_argument("--rollout-batch", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--update-batch", type=int, default=8, help="several updates per step: old log-probs are computed")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--target", type=float, default=0.10, help="the overhead goal")
    ap.add_argument("--model", default=None, help="policy folder (default: the embedded default's warm start)")
    ap.add_argument("--data", default=None, help="training JSONL (default: the synthetic shapes)")
    ap.add_argument("--out", default=None, help="folder for the runs and judge_overlap.json (default: a temp dir)")
    args = ap.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="judge_overlap_"))
    out.mkdir(parents=True, exist_ok=True)
    latencies = [float(x) for x in args.latencies.split(",")]
    concurrencies = [int(x) for x in args.concurrency.split(",")]
    start = time.time()
    warm = subprocess.run([sys.executable, str(ROOT / "grpo.py"), "--warmup-only"], capture_output=True, text=True) \
        if args.model is None else None
    if warm is not None and warm.returncode != 0:  # the embedded default's warm start, built once and cached (not timed)
        raise SystemExit(f"bench: the warm start failed:\n{warm.stderr[-2000:]}")
    grpo_flags = ["--reward", "grpo", "--judge", "none"]
    rows = {"grpo (first)": run_trainer(out / "grpo-first", args.steps, grpo_flags, args)}
    for concurrency in concurrencies:
        for latency in latencies:
            server = judge_server(latency, args.reply_tokens, args.token_latency)
            try:
                for overlap in ("--no-judge-overlap", "--judge-overlap"):
                    name = f"palmr {latency:g}s c{concurrency} {'overlap' if overlap == '--judge-overlap' else 'serial'}"
                    rows[name] = run_trainer(out / name.replace(" ", "-"), args.steps, [
                        "--judge", "openai", "--judge-base-url", server.base_url, "--judge-model", "bench",
                        "--judge-concurrency", str(concurrency), overlap], args)
                    rows[name].update(latency=latency, concurrency=concurrency)
            finally:
                server.close()
    rows["grpo (last)"] = run_trainer(out / "grpo-last", args.steps, grpo_flags, args)
    base = (rows["grpo (first)"]["step_s"] + rows["grpo (last)"]["step_s"]) / 2
    requests = args.rollout_batch * args.group_size
    print(f"judge overlap | tiny Qwen2.5-VL, CPU | {requests} judge requests per step | {args.steps - 1} timed steps "
          f"each | GRPO step {base:.2f} s (first {rows['grpo (first)']['step_s']:.2f}, last "
          f"{rows['grpo (last)']['step_s']:.2f}: the run-to-run spread of identical work)")
    print("| run | s/request (measured) | judge s/step | passes s/step | unhidden judge s | step s | overhead vs GRPO "
          "| unhidden / GRPO step |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        r["overhead"], r["unhidden_share"] = r["step_s"] / base - 1, r["unhidden_s"] / base
        print(f"| {name} | {r['request_s']:.2f} | {r['judge_s']:.2f} | {r['passes_s']:.2f} | {r['unhidden_s']:.2f} | "
              f"{r['step_s']:.2f} | {r['overhead']:+.1%} | {r['unhidden_share']:.1%} |")
    passes = statistics.median(r["passes_s"] for n, r in rows.items() if n.startswith("palmr"))
    for concurrency in concurrencies:
        for mode in ("serial", "overlap"):
            mine = [r for n, r in rows.items() if n.endswith(f"c{concurrency} {mode}")]
            ok = [r["latency"] for r in mine if r["overhead"] <= args.target]
            hidden = [r["latency"] for r in mine if r["unhidden_share"] <= args.target]
            print(f"c{concurrency} {mode}: overhead <= {args.target:.0%} " + (f"up to {max(ok):g} s" if ok else
                  "at no latency measured") + f" per request; unhidden judge <= {args.target:.0%} of the GRPO step "
                  + (f"up to {max(hidden):g} s" if hidden else "at no latency measured"))
        waves = -(-requests // concurrency)
        print(f"c{concurrency} overlap, predicted: the judge hides behind the passes ({passes:.2f} s) while its {waves} "
              f"wave(s) of requests take no longer; within {args.target:.0%} while a request takes <= "
              f"{(passes + args.target * base) / waves:.2f} s ((passes + {args.target:g} x GRPO step) / waves)")
    failed = {n: r["failed"] for n, r in rows.items() if r["failed"]}
    if failed:
        print(f"WARNING: judge failures in {failed}")
    (out / "judge_overlap.json").write_text(json.dumps({"args": vars(args), "grpo_step_s": base, "runs": rows},
                                                       indent=2))
    print(f"{out / 'judge_overlap.json'} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
