"""Judge throughput against a local chat-completions server with a simulated per-request latency.

    python bench/judge.py                      # 64 items, 200 ms per reply, concurrency 1 and 32

The server (tests/chat_server.py) runs on 127.0.0.1 in this process and answers every request after
--latency seconds; the judge sends one pairwise request per item. Prints items/s for each concurrency
and the ratio against concurrency 1, measured in the same run. The cache is fresh for every run.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import judge  # noqa: E402
from chat_server import ChatServer  # noqa: E402

FACTS = {"objects": [{"name": "circle", "count": 2, "attributes": ["red"], "location": ["top left", "top right"]}]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=type("Help", (
        argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}))  # defaults shown
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.2, help="seconds the server waits before each reply")
    ap.add_argument("--concurrency", default="1,32")
    a = ap.parse_args()
    server = ChatServer(latency=a.latency)
    try:
        rates = {}
        for c in map(int, a.concurrency.split(",")):
            j = judge.make_judge("openai", server.base_url, "bench", concurrency=c, timeout=30, backoff=0.05)
            items = [judge.JudgeItem(f"How many circles? (item {i}, run {c})", FACTS,
                                     f"<think>I see {i % 3 + 1} red circles.</think> \\boxed{{2}}",
                                     "<think>I see 2 red circles.</think> \\boxed{2}") for i in range(a.items)]
            start = time.perf_counter()
            verdicts = j.judge(items)
            elapsed = time.perf_counter() - start
            assert len(verdicts) == a.items and not any(v.failed for v in verdicts)
            rates[c] = a.items / elapsed
        base = rates[min(rates)]
        print(f"{a.items} pairwise items, {a.latency * 1000:.0f} ms simulated latency per reply")
        print("| concurrency | items/s | vs concurrency 1 |")
        print("|---|---|---|")
        for c, r in rates.items():
            print(f"| {c} | {r:.2f} | {r / base:.1f}x |")
    finally:
        server.close()


if __name__ == "__main__":
    main()
