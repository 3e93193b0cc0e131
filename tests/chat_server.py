"""A real OpenAI-compatible chat-completions server on 127.0.0.1 for tests, bench/judge.py and users without a GPU.

    python tests/chat_server.py --port 8000     # serves until Ctrl-C; any model name
    python grpo.py --judge openai --judge-base-url http://127.0.0.1:8000/v1 --judge-model rule

It answers like a perfect judge: it reads the facts and responses out of judge.py's prompts and decides
with the exact `shapes` rule (judge.contradictions); any other prompt (judge.check_judge's probe) gets "OK".
Latency: every reply waits `latency` seconds plus `token_latency` per reply token (len(text) // 4, what
`usage` reports), as a served model's prefill and decode would; `spans` holds each answered request's
(arrived, answered) wall times.
Faults are injected per marker: a request whose user message contains the marker gets the next fault in
that marker's queue:
  "429" (with Retry-After: 0), "500", "401", "404" (vLLM's body for a model it does not serve), "slow"
  (answers after `slow_seconds`), "drop" (closes the connection without a reply), "malformed" (200 with a
  body that is not JSON), "nocontent" (200, JSON without choices), "noverdict" (200, a reply with no
  verdict line), "truncated" (finish_reason "length", cut off mid-thought);
  thinking that never answered, content null, under either name vLLM has used (vLLM PR #27752 renamed
  `reasoning_content` to `reasoning`, sending both for a while; PR #33402 dropped `reasoning_content`):
  "reasoning" (reasoning_content, older vLLM), "reasoning-new" (reasoning, current vLLM);
  thinking turned off, yet a reasoning parser filed the whole answer under reasoning (vLLM issues #19839,
  #53284; content "" as in TensorRT-LLM issue #14502): "answer-in-reasoning" (content null, reasoning),
  "answer-in-reasoning_content" (content null, reasoning_content), "answer-in-reasoning-empty" (content "").
"""
import argparse
import json
import re
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import judge  # noqa: E402


def _block(text, name):
    m = re.search(rf"\[{name}\]\n(.*?)\n\[End of {name}\]", text, re.DOTALL)
    return m.group(1) if m else None


def perfect_reply(messages):
    """The verdict a faithful judge gives, with a reasoning block first (as Qwen3 with thinking on)."""
    text = messages[-1]["content"]
    if "Image facts" not in text and "Visual facts" not in text:  # not a judge prompt: the start-up probe
        return "OK"
    if "COVERED:" in text:
        facts = re.findall(r"^(\d+)\. (\d+) (\w+) (\w+)", text, re.MULTILINE)
        said = {c[:3] for c in judge.claims(_block(text, "Response") or "")}  # (count, colour, kind)
        hit = [k for k, n, color, kind in facts if (int(n), color, kind) in said]
        return "<think>checking each fact</think>\nCOVERED: " + (", ".join(hit) or "none")
    facts = json.loads(text.split("Image facts (ground truth):\n", 1)[1].split("\n\nQuestion:", 1)[0])
    if "[Response A]" in text:
        bad_a = len(judge.contradictions(_block(text, "Response A"), facts))
        bad_b = len(judge.contradictions(_block(text, "Response B"), facts))
        verdict = "A" if bad_a < bad_b else "B" if bad_b < bad_a else "TIE"
        return f"<think>A has {bad_a} errors, B has {bad_b}. VERDICT: maybe</think>\nSo **VERDICT: {verdict}**"
    bad = judge.contradictions(_block(text, "Response"), facts)
    return f"<think>{len(bad)} errors</think>\nVERDICT: {'UNFAITHFUL' if bad else 'FAITHFUL'}"


# a reply that only thought: its reasoning field per fault (vLLM before and after the rename)
THOUGHT_ONLY = {"reasoning": "reasoning_content", "reasoning-new": "reasoning"}
# thinking off, the whole answer under a reasoning field: (content, field) per fault
ANSWER_IN_REASONING = {"answer-in-reasoning": (None, "reasoning"),
                       "answer-in-reasoning_content": (None, "reasoning_content"),
                       "answer-in-reasoning-empty": ("", "reasoning")}


class ChatServer:
    def __init__(self, reply=perfect_reply, latency=0.0, slow_seconds=2.0, port=0, token_latency=0.0):
        self.reply, self.latency, self.slow_seconds = reply, latency, slow_seconds
        self.token_latency = token_latency  # seconds per reply token (usage's count), after `latency`
        self.faults, self.requests, self.spans, self.lock = {}, [], [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, code, body, headers=()):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = payload["messages"][-1]["content"]
                with server.lock:
                    server.requests.append({"path": self.path, "content": content, "payload": payload,
                                            "authorization": self.headers.get("Authorization")})
                    fault = next((q.pop(0) for marker, q in server.faults.items() if marker in content and q), None)
                if fault == "429":
                    return self._send(429, b'{"error": "rate limited"}', [("Retry-After", "0")])
                if fault in ("500", "401"):
                    return self._send(int(fault), b'{"error": "injected"}')
                if fault == "404":
                    error = {"message": f"The model `{payload['model']}` does not exist.", "type": "NotFoundError",
                             "param": None, "code": 404}
                    return self._send(404, json.dumps({"error": error}).encode())
                if fault == "drop":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return None
                if fault == "malformed":
                    return self._send(200, b"{this is not json")
                if fault == "nocontent":
                    return self._send(200, b'{"id": "x", "object": "chat.completion"}')
                arrived = time.time()
                text = "I am not sure." if fault == "noverdict" else server.reply(payload["messages"])
                time.sleep(server.slow_seconds if fault == "slow" else server.latency + server.token_latency * (len(text) // 4))
                with server.lock:  # when the server held this request: [arrived, answered]
                    server.spans.append((arrived, time.time()))
                message, finish = {"role": "assistant", "content": text}, "stop"
                if fault == "truncated":  # a thinking model cut off mid-thought, its template had opened <think>
                    message["content"], finish = "A says 3 circles, the facts say 2, so VERDICT: A would fit... wait, B also", "length"
                if fault in THOUGHT_ONLY:  # vLLM's reasoning parser: all of it was reasoning, no final answer
                    message = {"role": "assistant", "content": None, THOUGHT_ONLY[fault]: "Let me compare A and B"}
                if fault in ANSWER_IN_REASONING:  # thinking off, the answer filed under reasoning by the parser
                    empty, field = ANSWER_IN_REASONING[fault]
                    message = {"role": "assistant", "content": empty, field: text}
                body = {"id": "cmpl", "object": "chat.completion", "model": payload["model"],
                        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                        "usage": {"prompt_tokens": len(content) // 4, "completion_tokens": len(text) // 4,
                                  "total_tokens": (len(content) + len(text)) // 4}}
                try:
                    return self._send(200, json.dumps(body).encode())
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    return None

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # the default backlog of 5 drops SYNs under 32 concurrent clients
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def inject(self, marker, *faults):
        with self.lock:
            self.faults.setdefault(marker, []).extend(faults)

    def count(self, marker=""):
        with self.lock:
            return sum(marker in r["content"] for r in self.requests)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default 8000)")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds before each reply (default 0)")
    ap.add_argument("--token-latency", type=float, default=0.0, help="and seconds per reply token (default 0)")
    a = ap.parse_args(argv)
    try:
        server = ChatServer(latency=a.latency, port=a.port, token_latency=a.token_latency)
    except OSError as e:  # e.g. the port is taken
        raise SystemExit(f"judge test server: cannot listen on 127.0.0.1:{a.port}: {e}")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill / terminate() ends it as Ctrl-C does
    print(f"judge test server: {server.base_url} (model: any name)", flush=True)
    try:
        while server.thread.is_alive():
            server.thread.join(1.0)
    except KeyboardInterrupt:  # Ctrl-C: a clean stop, no traceback
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()
