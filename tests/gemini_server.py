"""A real HTTP server on 127.0.0.1 speaking Gemini's `models/{model}:generateContent`, for the facts tests.

Inline image data arrives URL-safe base64 (as google-genai sends it). The server decodes the image and
answers the facts registered for its pixels (`register(image, facts)`), or a small generic scene.
Faults: `faults` is a queue consumed by the next requests in arrival order; `always` maps a pixel hash
to a fault that every request for that image gets. Kinds: "429", "500", "slow" (sleeps `slow_seconds`),
"badjson" (text that is not JSON), "schema" (JSON that breaks the facts schema).
Usage: every reply reports `prompt_tokens` in and `reply_tokens` out, plus `thought_tokens` as
usageMetadata.thoughtsTokenCount when above 0, the way a thinking model (gemini-2.5-flash) reports the
tokens it thought apart from its reply (totalTokenCount is the sum of the three; google-genai's
GenerateContentResponseUsageMetadata documents the fields).
"""
import base64
import hashlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

GENERIC = {"objects": [{"name": "thing", "count": 1, "attributes": ["grey"], "location": ["centre"]}],
           "relations": [], "text": [], "global": {"scene": "unknown", "background": "white"}}


def pixel_hash(image):
    image = image.convert("RGB")
    return hashlib.sha256(image.tobytes() + str(image.size).encode()).hexdigest()


class GeminiServer:
    def __init__(self, latency=0.0, slow_seconds=2.0, prompt_tokens=300, reply_tokens=60, thought_tokens=0):
        self.latency, self.slow_seconds = latency, slow_seconds
        self.prompt_tokens, self.reply_tokens, self.thought_tokens = prompt_tokens, reply_tokens, thought_tokens
        self.facts, self.faults, self.always, self.requests = {}, [], {}, []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self.path.endswith(":generateContent") or "/models/" not in self.path:
                    return self._send(404, {"error": {"code": 404, "message": self.path, "status": "NOT_FOUND"}})
                parts = payload["contents"][0]["parts"]
                inline = next(p["inlineData"] for p in parts if "inlineData" in p)
                image = Image.open(io.BytesIO(base64.urlsafe_b64decode(inline["data"])))
                key = pixel_hash(image)
                with server.lock:
                    server.requests.append({"path": self.path, "key": key, "api_key": self.headers.get("x-goog-api-key"),
                                            "schema": payload.get("generationConfig", {}).get("responseSchema")})
                    fault = server.always.get(key) or (server.faults.pop(0) if server.faults else None)
                    facts = server.facts.get(key, GENERIC)
                if fault in ("429", "500"):
                    status = {"429": "RESOURCE_EXHAUSTED", "500": "INTERNAL"}[fault]
                    return self._send(int(fault), {"error": {"code": int(fault), "message": "injected", "status": status}})
                time.sleep(server.slow_seconds if fault == "slow" else server.latency)
                text = {"badjson": "{objects: many", "schema": json.dumps({"objects": "many", "relations": []})}.get(
                    fault, json.dumps(facts))
                usage = {"promptTokenCount": server.prompt_tokens, "candidatesTokenCount": server.reply_tokens,
                         "totalTokenCount": server.prompt_tokens + server.reply_tokens + server.thought_tokens}
                if server.thought_tokens:  # the API leaves the field out when the model did not think
                    usage["thoughtsTokenCount"] = server.thought_tokens
                return self._send(200, {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                                                        "finishReason": "STOP"}],
                                        "usageMetadata": usage})

        class Server(ThreadingHTTPServer):
            request_queue_size = 256
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def register(self, image, facts):
        with self.lock:
            self.facts[pixel_hash(image)] = facts

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
