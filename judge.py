"""PaLMR's visual-fidelity judge: is a rollout's reasoning less faithful to the image than the reference's?

    vllm serve Qwen/Qwen3-30B-A3B --port 8000                     # the paper's judge, on its own GPU
    python tests/chat_server.py --port 8000                       # or, without a GPU: a test judge (exact, shapes)
    python grpo.py --judge openai --judge-base-url http://127.0.0.1:8000/v1 --judge-model Qwen/Qwen3-30B-A3B
    python judge.py agree --pairs examples/judge_pairs.jsonl --backend openai \
        --base-url http://127.0.0.1:8000/v1 --model Qwen/Qwen3-30B-A3B --out agree.json
    python pairs.py --in data/shapes/train.jsonl --out pairs.jsonl   # labelled pairs from facts (pairs.py)
    python judge.py agree --pairs pairs.jsonl --backend rule --out agree_rule.json   # per error type

The trainer sees one narrow interface: `judge.judge(items) -> list[Verdict]` (S_vis) and
`judge.coverage(items) -> list[float]` (the perception_r1 r_cov). Backends:
- `rule`: exact, for the synthetic `shapes` task, whose facts are the true scene. A trace is checked
  claim by claim ("2 red circles", "no blue square", "a triangle", "3 shapes", "a red circle at top left");
  S_vis = 0 iff the candidate contradicts the facts more often than the reference does (the pairwise
  protocol, made exact).
- `openai`: any OpenAI-compatible chat-completions server (vLLM, SGLang, a hosted API); the key comes
  from the environment variable named by `api_key_env` and never appears in logs or errors.
- `hf`: a local transformers model, batched greedy generation.
Protocols for the LLM backends: `pairwise` (the paper's: question + facts + candidate + reference, the
judge names the more faithful; S_vis = 0 iff it prefers the reference) and `pointwise` (one response
alone: faithful or not), so the two can be compared (`agree`). Our choices (flags in grpo.py):
randomised A/B order per item (seeded), optional position swap (the reference must win both orders),
a tie, an unparseable reply or a request that failed is "no preference" (S_vis = 1); failures are
counted (judge/failed) and ties are counted apart (judge/ties): two equally faithful traces tie, and
calling that a failure would make a faithful policy look like a broken judge. Before any work, `check_judge`
sends an LLM judge's server one small request, so a wrong URL, key or model name stops the run in one line.
"""
import argparse
import base64
import collections
import concurrent.futures
import dataclasses
import hashlib
import http.client
import json
import os
import random
import re
import socket
import sys
import threading
import time
import typing
import urllib.error
import urllib.parse
import urllib.request

from palmr import parse_response


@dataclasses.dataclass
class JudgeItem:
    question: str
    facts: dict        # pseudo ground truth: {"objects": [{"name", "count", "attributes", "location"}], ...}
    candidate: str     # the rollout's full response
    reference: str     # the item's reference trace (may be None: then the candidate is judged alone)


@dataclasses.dataclass
class Verdict:
    s_vis: float          # 0.0 when the judge prefers the reference (the rollout is less faithful), else 1.0
    failed: bool = False  # no usable verdict (error, unparseable reply): "no preference", s_vis 1.0
    reason: str = ""
    preference: str = None  # "reference" | "candidate" | "tie" (None: no usable verdict)
    # located errors: (start, end) character spans of the candidate's wrong claims, in JudgeItem.candidate
    spans: list = dataclasses.field(default_factory=list)
    unmatched: int = 0    # LLM judge: quoted wrong statements not found in the candidate (never guessed)


# -----------------------------------------------------------------------------
# The `rule` backend: exact claims against exact scene facts

_WORD_COUNTS = {"no": 0, "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
                "seven": 7, "eight": 8, "nine": 9, "ten": 10, "a": None, "an": None}
_COLOR_WORDS = "red|green|blue|yellow|orange|purple|black|white|gray|grey|brown|pink"
_KIND_WORDS = "circle|square|triangle|star|rectangle|shape"
_PLACE = r"(?:\s+(?:at|in)\s+(?:the\s+)?(top|middle|bottom)\s+(left|centre|center|right))?"
_CLAIM = re.compile(rf"\b(\d+|{'|'.join(_WORD_COUNTS)})\s+(?:({_COLOR_WORDS})\s+)?({_KIND_WORDS})(?:e?s)?\b{_PLACE}",
                    re.IGNORECASE)


class Claim(typing.NamedTuple):
    """One perception claim: count (None for 'a/an'), colour, kind (None for 'shape'), where (None, or a
    grid cell such as 'top left': "a red circle at top left" claims that cell holds a red circle), and
    span, the claim's (start, end) characters in the text it was read from."""
    count: typing.Optional[int]
    color: typing.Optional[str]
    kind: typing.Optional[str]
    where: typing.Optional[str] = None
    span: typing.Optional[tuple] = None


def claims(text, offset=0):
    """Perception claims in a trace, in order of appearance (spans shifted by `offset`)."""
    out = []
    for m in _CLAIM.finditer(text):
        word, color, kind = m.group(1).lower(), m.group(2), m.group(3).lower()
        count = int(word) if word.isdigit() else _WORD_COUNTS[word]
        where = f"{m.group(4).lower()} {m.group(5).lower().replace('center', 'centre')}" if m.group(4) else None
        out.append(Claim(count, color.lower() if color else None, None if kind == "shape" else kind, where,
                         (offset + m.start(), offset + m.end())))
    return out


def _reasoning(text):
    """(the reasoning to judge, its offset in text): the <think> part when well formed, else the whole text."""
    think, _, well_formed = parse_response(text)
    if well_formed and think:  # the think text starts after the first '<think>' (and any whitespace)
        return think, text.find(think, text.find("<think>") + len("<think>"))
    return text, 0


def true_count(facts, color, kind, where=None):
    """How many objects of this colour and kind (None: any) the facts hold (at `where`, if given)."""
    n = 0
    for o in facts.get("objects", []):
        if (kind is None or o.get("name") == kind) and \
                (color is None or color in [a.lower() for a in o.get("attributes", [])]):
            if where is None:
                n += o.get("count", 1)
            else:
                n += sum(str(loc).lower().replace("center", "centre") == where for loc in o.get("location") or [])
    return n


def contradictions(text, facts):
    """(claim, true count) for each claim in the reasoning that the facts contradict: a wrong count, or a
    colour/kind that is absent (from the whole scene, or from the named cell)."""
    wrong = []
    for c in claims(*_reasoning(text)):  # the reasoning; spans index into `text`
        n = true_count(facts, c.color, c.kind, c.where)
        if (c.count is None and n == 0) or (c.count is not None and c.count != n):
            wrong.append((c, n))
    return wrong


def fact_coverage(text, facts):
    """Fraction of the facts' object groups that the reasoning states with the right count (0 without groups).

    "2 red circles" states the group (2, red, circle); "a red circle at top left, a red circle at bottom
    right" states a group of two by its cells.
    """
    groups = (facts or {}).get("objects", [])
    if not groups:
        return 0.0
    said, placed = set(), {}
    for c in claims(parse_response(text)[0] or text):  # the think part, well formed or not
        if c.where is None:
            said.add((1 if c.count is None else c.count, c.color, c.kind))  # "a red circle": a group of one
        else:
            placed.setdefault((c.color, c.kind), set()).add(c.where)
    said |= {(len(cells), col, k) for (col, k), cells in placed.items()}
    hit = sum(any((o.get("count", 1), a.lower(), o.get("name")) in said for a in o.get("attributes") or [])
              for o in groups)
    return hit / len(groups)


class RuleJudge:
    """Exact judge for tasks whose facts are the true scene (the synthetic `shapes` task).

    The candidate is less faithful (S_vis = 0) when its reasoning contradicts the facts more often than
    the reference's does; with `omissions`, also when it states fewer of the facts' object groups
    correctly than the reference does (fact_coverage), so saying less is no escape. The verdict's
    spans are the exact characters of the candidate's contradicted claims.
    """
    name = "rule"

    def __init__(self, omissions=False):
        self.omissions = omissions

    def judge(self, items):
        verdicts, reference_scores = [], {}  # a group's G rollouts share one reference: scored once
        for it in items:
            if not it.facts:
                verdicts.append(Verdict(1.0, failed=True, reason="no facts for this item"))
                continue
            bad = contradictions(it.candidate, it.facts)
            key = (it.reference, json.dumps(it.facts, sort_keys=True))
            if it.reference and key not in reference_scores:
                reference_scores[key] = (len(contradictions(it.reference, it.facts)), fact_coverage(it.reference, it.facts))
            base, ref_cov = reference_scores.get(key, (0, 0.0))
            reasons = [" ".join(str(w) for w in ("says", "a" if c.count is None else c.count, c.color,
                                                 c.kind or "shape", c.where and f"at {c.where}") if w)
                       + f", facts say {n}" for c, n in bad]
            worse, better = len(bad) > base, len(bad) < base
            if self.omissions and it.reference:
                cov = fact_coverage(it.candidate, it.facts)
                if cov < ref_cov:
                    reasons.append(f"states {cov:.0%} of the fact groups, the reference {ref_cov:.0%}")
                worse, better = worse or cov < ref_cov, (better and cov <= ref_cov) or (not worse and cov > ref_cov)
            preference = "reference" if worse else "candidate" if better else "tie"
            verdicts.append(Verdict(0.0 if worse else 1.0, reason="; ".join(reasons), preference=preference,
                                    spans=[c.span for c, _ in bad]))
        return verdicts

    def coverage(self, items):
        """Fraction of the facts' object groups that each candidate states with the right count."""
        return [fact_coverage(it.candidate, it.facts) for it in items]


# -----------------------------------------------------------------------------
# Prompts and verdict parsing for LLM judges

JUDGE_SYSTEM = ("You are a meticulous visual-fidelity judge. You cannot see the image; you are given a "
                "structured description of it (the facts), which is the ground truth.")


def facts_text(facts):
    return json.dumps(facts, indent=1, sort_keys=True) if facts else "(no facts available)"


OMISSIONS_PAIRWISE = ("A response that leaves out facts of the image that the other response states "
                      "correctly is also less faithful. ")
OMISSIONS_POINTWISE = "Leaving out facts of the image that the question depends on is also unfaithful. "
LOCATE = ("Before the verdict, quote every statement of {who} that the facts contradict or do not contain, "
          "one per line, word for word from the response: {form}. ")


def pairwise_prompt(question, facts, response_a, response_b, omissions=False, locate=False):
    """The paper's pairwise question; `omissions` adds one sentence (saying less is less faithful), `locate`
    asks for the wrong statements as `WRONG A: "..."` / `WRONG B: "..."` lines (parse_wrong)."""
    return (f"Image facts (ground truth):\n{facts_text(facts)}\n\nQuestion: {question}\n\n"
            f"[Response A]\n{response_a}\n[End of Response A]\n\n[Response B]\n{response_b}\n[End of Response B]\n\n"
            "Compare only how faithfully each response's reasoning describes the image: objects, counts, "
            "attributes, positions, relations, text and numbers, checked against the facts. Ignore style, "
            "length and whether the final answer is right. A response that states something the facts "
            "contradict, or invents what they do not contain, is less faithful. "
            + (OMISSIONS_PAIRWISE if omissions else "") + "Reason step by step. "
            + (LOCATE.format(who="either response", form='`WRONG A: "<quote>"` or `WRONG B: "<quote>"`')
               if locate else "")
            + "End with exactly one line: `VERDICT: A`, `VERDICT: B` or `VERDICT: TIE`.")


def pointwise_prompt(question, facts, response, omissions=False, locate=False):
    return (f"Image facts (ground truth):\n{facts_text(facts)}\n\nQuestion: {question}\n\n"
            f"[Response]\n{response}\n[End of Response]\n\n"
            "Check the response's reasoning against the facts: does it state anything about the image "
            "(objects, counts, attributes, positions, relations, text, numbers) that the facts contradict "
            "or do not contain? " + (OMISSIONS_POINTWISE if omissions else "") + "Reason step by step. "
            + (LOCATE.format(who="the response", form='`WRONG: "<quote>"`') if locate else "")
            + "End with exactly one line: `VERDICT: FAITHFUL` or `VERDICT: UNFAITHFUL`.")


_WRONG = re.compile(r'^[^\w\n]*WRONG(?:[ \t]+([AB]))?[ \t]*:[ \t*`]*["\u201c]?(.*?)["\u201d]?[ \t*`]*$',
                    re.IGNORECASE | re.MULTILINE)
_NOTHING = {"none", "n/a", "na", "nothing", "-"}


def parse_wrong(text):
    """[(letter or None, quote)] from the `WRONG A: "..."` lines of a reply's final answer (final_answer)."""
    answer = final_answer(text)
    if not answer:
        return []
    return [((m.group(1) or "").upper() or None, m.group(2).strip()) for m in _WRONG.finditer(answer)
            if m.group(2).strip() and m.group(2).strip().lower().strip(".") not in _NOTHING]


def locate_quotes(text, quotes):
    """Character spans of quoted statements in text -> (spans, unmatched).

    A quote matches verbatim, else case-insensitively with any run of whitespace for a space, in both
    cases as whole words (a quote "red" never marks "reddish"); a quote found nowhere is counted in
    `unmatched`, never guessed. A quote given k times takes its first k occurrences.
    """
    spans, unmatched = [], 0
    for q in quotes:
        words = q.split()
        if not words:
            continue
        left = r"\b" if re.match(r"\w", words[0]) else ""
        right = r"\b" if re.search(r"\w$", words[-1]) else ""
        found = None
        for pattern in (re.compile(left + re.escape(q.strip()) + right),
                        re.compile(left + r"\s+".join(re.escape(w) for w in words) + right, re.IGNORECASE)):
            found = next(((m.start(), m.end()) for m in pattern.finditer(text) if (m.start(), m.end()) not in spans), None)
            if found:
                break
        if found is None:
            unmatched += 1
        else:
            spans.append(found)
    return spans, unmatched


def merge_quotes(per_reply):
    """Quotes from several replies about one response (the swapped orders): a quote (compared without case
    and extra whitespace) named k times in one reply and j in another counts max(k, j) times."""
    counts, first = collections.Counter(), {}
    for quotes in per_reply:
        mine = collections.Counter(" ".join(q.lower().split()) for q in quotes)
        for q in quotes:
            first.setdefault(" ".join(q.lower().split()), q)
        counts |= mine
    return [first[k] for k, n in counts.items() for _ in range(n)]


def fact_list(facts):
    """The facts as numbered atomic statements, for the coverage protocol."""
    out = [f"{o.get('count', 1)} {' '.join(o.get('attributes') or [])} {o.get('name', '')}".replace("  ", " ").strip()
           + (f" at {', '.join(o['location'])}" if isinstance(o.get("location"), list) and o.get("location") else "")
           for o in (facts or {}).get("objects", [])]
    out += [f"relation: {r}" for r in (facts or {}).get("relations", [])]
    out += [f"visible text: {t}" for t in (facts or {}).get("text", [])]
    return out


def coverage_prompt(question, facts, response):
    listed = "\n".join(f"{i + 1}. {f}" for i, f in enumerate(fact_list(facts)))
    return (f"Visual facts of an image:\n{listed}\n\nQuestion: {question}\n\n[Response]\n{response}\n"
            "[End of Response]\n\nWhich of the numbered facts does the response state correctly (same "
            "object, count and attributes)? Reason briefly, then end with exactly one line `COVERED: ` "
            "followed by the numbers, comma-separated, or `COVERED: none`.")


def final_answer(text):
    """The part of a judge reply after its reasoning: the text after the last '</think>', whether or not
    the reply opened one (a template that prefills '<think>' leaves only the closing tag); None for a
    reply that opens '<think>' and never closes it (cut off while thinking); else the whole reply (a
    '<think>' merely quoted from a response does not make it reasoning)."""
    if text is None:
        return None
    closed = list(re.finditer(r"</think>", text, re.IGNORECASE))
    if closed:
        return text[closed[-1].end():]
    return None if re.match(r"\s*<think>", text, re.IGNORECASE) else text


_VERDICT_LINE = re.compile(r"\bverdict(?: is)? ?[:=\-\u2013]? ?(?:response )?(a|b|tie|faithful|unfaithful)[.!]?$")


def _line_verdict(line):
    """The verdict a line ends with, read after markdown is flattened: '**Verdict:** [[Response A]].' ->
    'a'; a trailing '(explanation)' is allowed; None when words follow the verdict ('VERDICT: A would
    fit... wait'). Linear time: the line is normalised first, so nothing backtracks over runs of spaces."""
    line = re.sub(r"\([^()]*\)[\s.]*$", "", line)
    line = " ".join(re.sub(r"[*_`\[\]()#>|]", " ", line).lower().split())
    m = _VERDICT_LINE.search(line)
    return m.group(1) if m else None


def parse_verdict(text):
    """'A' | 'B' | 'TIE' | 'FAITHFUL' | 'UNFAITHFUL': the last line of the reply's final answer (see
    final_answer) that a verdict ends; None when there is none. Forms read: 'VERDICT: A', '**VERDICT:
    B**', 'Verdict: **Response A**', 'Final verdict: [[TIE]]'. A reply cut off on the token limit is the
    caller's to reject (Reply.truncated): its text may end on a line that reads like a verdict."""
    for line in reversed((final_answer(text) or "").splitlines()):
        verdict = _line_verdict(line)
        if verdict:
            return verdict.upper()
    return None


def parse_covered(text, n):
    """Fraction of n numbered facts listed on the last `COVERED:` line of the final answer; None when
    there is no such line."""
    lines = re.findall(r"covered[\s*_`]*:([^\n]*)", final_answer(text) or "", re.IGNORECASE)
    if not lines or n == 0:
        return None
    picked = {int(k) for k in re.findall(r"\d+", lines[-1]) if 1 <= int(k) <= n}
    return len(picked) / n


def _why_no_verdict(reply):
    """A judge failure's reason: the request's error, reasoning never closed, or no verdict line."""
    if reply.error:
        return reply.error
    return NO_ANSWER if final_answer(reply.text) is None else "unparseable verdict"


# -----------------------------------------------------------------------------
# Clients: a list of chat requests in, replies out in the same order


@dataclasses.dataclass
class Reply:
    text: str = None     # None when the request failed
    error: str = ""      # why it failed (status, timeout, ...), never containing secrets
    truncated: bool = False  # stopped on the token limit: its text is unfinished, never a verdict
    latency: float = 0.0
    tokens: int = 0
    cached: bool = False


RETRY_STATUS = {429, 500, 502, 503, 504}
NO_ANSWER = "reasoning but no final answer"  # a live model that thought and never answered


class Endpoint(typing.NamedTuple):
    url: str     # the chat-completions URL, without credentials
    where: str   # how messages name it: scheme://host:port/path, never credentials
    basic: str   # Basic auth from user:password@ in the URL, or None


def parse_endpoint(base_url):
    """One server's base URL -> Endpoint. user:password@ in the URL (a proxy in front of the server): urllib would
    take it for the host name, so it is sent as Basic auth and the URL used, like every error message, is without it."""
    parts = urllib.parse.urlsplit(base_url.strip().rstrip("/") + "/chat/completions")
    where = f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{parts.path}"
    basic = base64.b64encode(f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
                             .encode()).decode() if parts.username else None
    return Endpoint(urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])), where, basic)


class OpenAIClient:
    """Chat completions over HTTP (stdlib only): bounded concurrency, per-request timeout, retries with
    exponential backoff and jitter on 429 / 5xx / timeouts / dropped connections, and a cache so that
    identical requests are sent once.

    Several servers of the same model: base_url "URL1,URL2,...". Each attempt goes to the endpoint with the fewest
    requests in flight among those not marked down, with `concurrency` requests in flight per endpoint; an endpoint
    that fails an attempt for a server-side reason (connection, timeout, 429 / 5xx, malformed reply) is skipped for
    `cooldown` seconds and the next attempt goes to another one at once (no backoff while one is up). A dead
    server thus costs its in-flight requests one attempt each (`failovers`), while the others serve."""

    def __init__(self, base_url, model, api_key_env="OPENAI_API_KEY", concurrency=32, timeout=120.0,
                 max_retries=4, backoff=1.0, max_tokens=4096, temperature=0.0, reasoning=True, extra=None,
                 cache=True, cooldown=30.0):
        self.endpoints = [parse_endpoint(u) for u in base_url.split(",") if u.strip()]
        self.where = ", ".join(e.where for e in self.endpoints)
        self.model, self.api_key_env, self.reasoning = model, api_key_env, reasoning
        self.concurrency, self.timeout, self.max_retries, self.backoff = concurrency, timeout, max_retries, backoff
        self.params = {"max_tokens": max_tokens, "temperature": temperature,
                       "chat_template_kwargs": {"enable_thinking": reasoning},  # Qwen3 on vLLM / SGLang
                       **(extra or {})}  # e.g. response_format for structured output
        self.cache, self.lock, self.use_cache, self.cache_size = {}, threading.Lock(), cache, 100_000
        self.cooldown, self.down_until = cooldown, [0.0] * len(self.endpoints)
        self.in_flight, self.failovers = [0] * len(self.endpoints), 0
        self.pool = concurrent.futures.ThreadPoolExecutor(concurrency * len(self.endpoints), thread_name_prefix="judge")

    def _pick(self):
        """The endpoint for the next attempt: the fewest in flight among those up (all, when none is up)."""
        with self.lock:
            now = time.time()
            up = [k for k in range(len(self.endpoints)) if self.down_until[k] <= now] or range(len(self.endpoints))
            k = min(up, key=lambda k: self.in_flight[k])
            self.in_flight[k] += 1
            return k

    def _release(self, k, failed):
        """An attempt on endpoint k ended; a server-side failure marks k down for `cooldown` seconds. -> whether
        another endpoint is up now (then the next attempt needs no backoff)."""
        with self.lock:
            self.in_flight[k] -= 1
            if failed and len(self.endpoints) > 1:
                self.down_until[k] = time.time() + self.cooldown
                self.failovers += 1
            now = time.time()
            return any(self.down_until[j] <= now for j in range(len(self.endpoints)) if j != k)

    def complete(self, requests):
        """requests: list of message lists -> list of Reply, in input order."""
        keys = [hashlib.sha256(json.dumps([self.model, m, self.params], sort_keys=True).encode()).hexdigest()
                for m in requests]
        replies, todo = [None] * len(requests), {}
        for i, (key, messages) in enumerate(zip(keys, requests)):
            with self.lock:
                hit = self.cache.get(key) if self.use_cache else None
            if hit is not None:
                replies[i] = dataclasses.replace(hit, cached=True, latency=0.0, tokens=0)
            else:
                todo.setdefault(key, (messages, []))[1].append(i)  # identical requests in a batch: sent once
        futures = {self.pool.submit(self._send, messages): (key, idx) for key, (messages, idx) in todo.items()}
        for future in concurrent.futures.as_completed(futures):
            key, idx = futures[future]
            reply = future.result()
            if reply.text is not None and self.use_cache:
                with self.lock:
                    self.cache[key] = reply
                    while len(self.cache) > self.cache_size:  # oldest first: dicts keep insertion order
                        self.cache.pop(next(iter(self.cache)))
            for n, i in enumerate(idx):
                replies[i] = reply if n == 0 else dataclasses.replace(reply, cached=True, latency=0.0, tokens=0)
        return replies

    def probe(self, timeout):
        """One short request to every endpoint, not retried and not cached, with the judge's own parameters (so a
        server that rejects them fails here too) but a small token budget -> the first failed Reply, else the
        slowest (check_judge)."""
        replies = [self._send([{"role": "user", "content": "Reply with the word OK."}], dict(self.params, max_tokens=16),
                              timeout, max_retries=0, endpoint=k) for k in range(len(self.endpoints))]
        return next((r for r in replies if r.text is None), max(replies, key=lambda r: r.latency))

    def _send(self, messages, params=None, timeout=None, max_retries=None, endpoint=None):
        """One request, with retries (over the endpoints, see the class) -> Reply. endpoint: this one only (probe)."""
        params = self.params if params is None else params
        timeout = self.timeout if timeout is None else timeout
        max_retries = self.max_retries if max_retries is None else max_retries
        body = json.dumps({"model": self.model, "messages": messages, **params}).encode()
        error = ""
        for attempt in range(max_retries + 1):
            k = endpoint if endpoint is not None else self._pick()
            if endpoint is not None:
                with self.lock:
                    self.in_flight[k] += 1
            reply, error, retry_after = self._attempt(self.endpoints[k], body, params, timeout)
            elsewhere = self._release(k, reply is None)
            if reply is not None:
                return reply
            if attempt < max_retries and not (elsewhere and endpoint is None):  # no other server up: back off
                delay = self.backoff * 2 ** attempt
                delay = min(60.0, float(retry_after) if retry_after and retry_after.isdigit() else delay)
                time.sleep(delay + random.uniform(0, self.backoff))  # jitter keeps ranks from retrying in step
        return Reply(error=f"{error} after {max_retries + 1} attempt{'s' if max_retries else ''}")

    def _attempt(self, end, body, params, timeout):
        """One POST to one endpoint -> (Reply, or None when another attempt may succeed; the error; Retry-After)."""
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if end.basic:  # credentials written into the URL are the explicit choice
            headers["Authorization"] = f"Basic {end.basic}"
        elif key:
            headers["Authorization"] = f"Bearer {key}"
        start, retry_after = time.time(), None
        try:
            req = urllib.request.Request(end.url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                data = json.loads(resp.read())
            choice = data["choices"][0]
            message, usage = choice["message"], data.get("usage") or {}
            text, tokens = message.get("content"), int(usage.get("total_tokens", 0))
            # vLLM's reasoning field: `reasoning_content` until vLLM PR #27752 renamed it `reasoning` (both
            # sent for a while, RFC issue #27755), then PR #33402 removed `reasoning_content`
            thought = message.get("reasoning") or message.get("reasoning_content")
            if choice.get("finish_reason") == "length":  # a rerun at temperature 0 stops there again
                return Reply(text, error=f"stopped on the token limit (max_tokens {params['max_tokens']})",
                             truncated=True, latency=time.time() - start, tokens=tokens), "", None
            if not text and thought:
                if self.reasoning:  # it thought and never answered: a rerun at temperature 0 does the same
                    return Reply(error=NO_ANSWER, latency=time.time() - start, tokens=tokens), "", None
                # thinking off, yet a reasoning parser (e.g. --reasoning-parser qwen3) filed the whole answer
                # under reasoning, content null or "" (vLLM issues #19839, #53284): that text is the answer
                text = thought
            if not isinstance(text, str):
                raise ValueError("reply has no text content")
            return Reply(text, latency=time.time() - start, tokens=tokens), "", None
        except urllib.error.HTTPError as e:
            error = f"HTTP {e.code}"
            if e.code not in RETRY_STATUS:
                return Reply(error=f"{error} from {end.where} (not retried)"), error, None
            retry_after = e.headers.get("Retry-After") if e.headers else None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, http.client.HTTPException) as e:
            error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        except (ValueError, KeyError, IndexError, TypeError) as e:  # 200 with a malformed body
            error = f"malformed reply: {type(e).__name__}: {e}"
        return None, f"{error} from {end.where}", retry_after


class HFClient:
    """A local transformers model as the judge: batched greedy generation (text only)."""

    def __init__(self, model_path, max_tokens=512, batch_size=8, device="cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
        self.torch, self.max_tokens, self.batch_size = torch, max_tokens, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
        try:
            self.model = AutoModelForCausalLM.from_pretrained(model_path)
        except ValueError:  # a vision-language checkpoint (e.g. the tiny Qwen2.5-VL): use it on text alone
            self.model = AutoModelForImageTextToText.from_pretrained(model_path)
        self.model.to(device).eval()

    def complete(self, requests):
        replies = []
        for s in range(0, len(requests), self.batch_size):
            chunk = requests[s:s + self.batch_size]
            start = time.time()
            texts = [self.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in chunk]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
            with self.torch.no_grad():
                out = self.model.generate(**enc, max_new_tokens=self.max_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            latency = (time.time() - start) / len(chunk)
            stops = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id} - {None}
            for i, row in enumerate(new):
                cut = not stops & set(row.tolist())  # no stop token: generation hit max_tokens
                replies.append(Reply(self.tokenizer.decode(row, skip_special_tokens=True), latency=latency,
                                     tokens=int(enc["attention_mask"][i].sum()) + len(row), truncated=cut,
                                     error=f"stopped on the token limit (max_tokens {self.max_tokens})" if cut else ""))
        return replies


# -----------------------------------------------------------------------------
# The LLM judge: prompts -> client -> verdicts


class LLMJudge:
    """Pairwise (or point-wise) fidelity judging through a client; `stats` describes the last batch."""

    def __init__(self, client, protocol="pairwise", swap=False, order="random", seed=0, omissions=False,
                 locate=False):
        assert protocol in ("pairwise", "pointwise"), protocol
        assert order in ("random", "fixed"), order
        self.client, self.protocol, self.swap, self.order, self.seed = client, protocol, swap, order, seed
        self.omissions, self.locate = omissions, locate  # prompt options (pairwise_prompt)
        self.name = type(client).__name__
        self.stats = {}

    def _ask(self, prompts):
        """Send the prompts; add the batch's counts to self.stats (the caller resets it per training step)."""
        before = getattr(self.client, "failovers", 0)
        replies = self.client.complete([[{"role": "system", "content": JUDGE_SYSTEM},
                                         {"role": "user", "content": p}] for p in prompts])
        sent = [r for r in replies if not r.cached and r.text is not None]
        for k, v in {"requests": len(replies), "cache_hits": sum(r.cached for r in replies), "sent": len(sent),
                     "latency_sum": sum(r.latency for r in sent), "tokens": sum(r.tokens for r in replies),
                     "errors": sum(r.text is None for r in replies),
                     "failovers": getattr(self.client, "failovers", 0) - before}.items():  # attempts a down server cost
            self.stats[k] = self.stats.get(k, 0) + v
        return replies

    def _reference_first(self, item):
        """Where the reference goes (A or B): seeded per item, so a rerun asks the same prompts (cache)."""
        if self.order == "fixed":
            return False
        digest = hashlib.sha256(f"{self.seed}|{item.question}|{item.candidate}".encode()).digest()
        return digest[0] % 2 == 1

    def judge(self, items):
        if self.protocol == "pointwise" or any(it.reference is None for it in items):
            return self._judge_pointwise(items) if self.protocol == "pointwise" else self._judge_mixed(items)
        prompts, orders = [], []
        for it in items:
            ref_first = self._reference_first(it)
            for rf in ([ref_first, not ref_first] if self.swap else [ref_first]):
                a, b = (it.reference, it.candidate) if rf else (it.candidate, it.reference)
                prompts.append(pairwise_prompt(it.question, it.facts, a, b, self.omissions, self.locate))
                orders.append(rf)
        replies = self._ask(prompts)
        per_item = 2 if self.swap else 1
        verdicts = []
        for i in range(len(items)):
            votes, reasons, quotes = [], [], []
            for k in range(per_item):
                reply, rf = replies[i * per_item + k], orders[i * per_item + k]
                v = None if reply.truncated else parse_verdict(reply.text)
                if self.locate and v is not None:  # the candidate's letter in this order
                    quotes.append([q for letter, q in parse_wrong(reply.text) if letter == ("B" if rf else "A")])
                if v in ("A", "B"):
                    votes.append("reference" if (v == "A") == rf else "candidate")
                elif v == "TIE":  # no preference: a real answer (two faithful traces), logged as judge/ties
                    votes.append("tie")
                else:  # no usable verdict: no preference, counted as a failure
                    votes.append(None)
                    reasons.append(_why_no_verdict(reply))
            if all(v == votes[0] for v in votes) and votes[0] is not None:
                preference = votes[0]
            else:  # no verdict, or the two orders disagree (position bias): no preference
                preference = "tie" if all(v is not None for v in votes) else None
            # with swap, the reference must win in both orders to gate the rollout
            spans, unmatched = locate_quotes(items[i].candidate, merge_quotes(quotes))
            verdicts.append(Verdict(0.0 if preference == "reference" else 1.0, failed=bool(reasons),
                                    reason="; ".join(reasons), preference=preference, spans=spans,
                                    unmatched=unmatched))
        return verdicts

    def _judge_pointwise(self, items):
        replies = self._ask([pointwise_prompt(it.question, it.facts, it.candidate, self.omissions, self.locate)
                             for it in items])
        verdicts = []
        for reply, it in zip(replies, items):
            v = None if reply.truncated else parse_verdict(reply.text)
            if v in ("FAITHFUL", "UNFAITHFUL"):
                quotes = [q for letter, q in parse_wrong(reply.text) if letter is None] if self.locate else []
                spans, unmatched = locate_quotes(it.candidate, quotes)
                verdicts.append(Verdict(0.0 if v == "UNFAITHFUL" else 1.0, preference=v.lower(), spans=spans,
                                        unmatched=unmatched))
            else:
                verdicts.append(Verdict(1.0, failed=True, reason=_why_no_verdict(reply)))
        return verdicts

    def _judge_mixed(self, items):
        """Pairwise where a reference exists, point-wise otherwise (evaluation of reference-less items)."""
        paired = [i for i, it in enumerate(items) if it.reference is not None]
        alone = [i for i, it in enumerate(items) if it.reference is None]
        out = [None] * len(items)
        for idx, fn in ((paired, self.judge), (alone, self._judge_pointwise)):
            if idx:
                for i, v in zip(idx, fn([items[i] for i in idx])):
                    out[i] = v
        return out

    def coverage(self, items):
        """Point-wise coverage: the fraction of the facts' statements the response states (0 on failure)."""
        replies = self._ask([coverage_prompt(it.question, it.facts, it.candidate) for it in items])
        scores = [None if r.truncated else parse_covered(r.text, len(fact_list(it.facts))) for r, it in zip(replies, items)]
        self.stats["coverage_failed"] = self.stats.get("coverage_failed", 0) + sum(s is None for s in scores)
        return [s or 0.0 for s in scores]


JUDGES = ("rule", "openai", "hf")


def make_judge(name, base_url=None, model=None, api_key_env="OPENAI_API_KEY", protocol="pairwise", swap=False,
               order="random", concurrency=32, timeout=120.0, max_retries=4, backoff=1.0, max_tokens=4096,
               reasoning=True, seed=0, omissions=False, locate=False):
    """The judge backend by name: rule | openai (needs base_url, model) | hf (needs model: a local path).

    omissions: stating fewer facts than the reference also counts as less faithful; locate: LLM judges
    also quote the wrong statements (the rule judge always locates them exactly).
    """
    if name == "rule":
        return RuleJudge(omissions=omissions)
    if name == "openai":
        assert base_url and model, "--judge openai needs --judge-base-url and --judge-model"
        client = OpenAIClient(base_url, model, api_key_env, concurrency, timeout, max_retries, backoff,
                              max_tokens, reasoning=reasoning)
    elif name == "hf":
        assert model, "--judge hf needs --judge-model (a local transformers folder)"
        client = HFClient(model, max_tokens=min(max_tokens, 512))
    else:
        raise ValueError(f"unknown judge {name!r}; available: {list(JUDGES)}")
    return LLMJudge(client, protocol=protocol, swap=swap, order=order, seed=seed, omissions=omissions, locate=locate)


# -----------------------------------------------------------------------------
# The trainer's seam: flags, construction, and one call per batch that never raises


def judge_args(ap):
    """The judge's flags, for an entry script's argparse parser (grpo.py)."""
    g = ap.add_argument_group("visual-fidelity judge (judge.py)")
    g.add_argument("--judge", default="rule", choices=["rule", "openai", "hf", "none"], help="visual-fidelity judge backend (judge.py)")
    g.add_argument("--judge-base-url", default=None, help="openai: the server, e.g. http://127.0.0.1:8000/v1; several "
                   "servers of the model comma-separated (requests spread over them, a dead one skipped)")
    g.add_argument("--judge-model", default=None, help="openai: served model name; hf: local folder")
    g.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="openai: environment variable holding the key")
    g.add_argument("--judge-protocol", default="pairwise", choices=["pairwise", "pointwise"], help="pairwise vs the reference (paper) or each rollout alone")
    g.add_argument("--judge-swap", action="store_true", help="ask both A/B orders; the reference must win both to gate (ours)")
    g.add_argument("--judge-concurrency", type=int, default=32, help="openai: requests in flight per rank")
    g.add_argument("--judge-timeout", type=float, default=300.0, help="openai: seconds per request (reasoning replies are long)")
    g.add_argument("--judge-retries", type=int, default=4, help="openai: retries on 429/5xx/timeouts, exponential backoff")
    g.add_argument("--judge-max-tokens", type=int, default=4096, help="judge reply budget (reasoning included)")
    g.add_argument("--judge-no-reasoning", action="store_true", help="turn the judge's thinking off (paper: on)")
    g.add_argument("--judge-overlap", action=argparse.BooleanOptionalAction, default=True,
                   help="grade in the background while the trainer computes the reference and old log-probs; the "
                   "rewards join before the advantages (the same verdicts either way: README 'Several judge servers')")
    g.add_argument("--judge-omissions", action=argparse.BooleanOptionalAction, default=True,
                   help="stating fewer of the facts than the reference is also less faithful, so gated (ours, "
                   "on by default: README 'Process credit')")


def judge_from_args(args, **options):
    """The judge these flags ask for (make_judge), or None for --judge none; options: e.g. locate=True."""
    return None if args.judge == "none" else make_judge(
        args.judge, args.judge_base_url, args.judge_model, args.judge_api_key_env, protocol=args.judge_protocol,
        swap=args.judge_swap, concurrency=args.judge_concurrency, timeout=args.judge_timeout,
        max_retries=args.judge_retries, max_tokens=args.judge_max_tokens, reasoning=not args.judge_no_reasoning,
        seed=args.seed, omissions=args.judge_omissions, **options)


def check_judge(judge):
    """Probe an LLM judge's server once before any work (the trainer's start, `judge.py agree`) -> the probe's
    latency in seconds, or None when there is no server to probe (rule, hf, None). A refused connection, an
    HTTP error (401: the key; 404: the model name), a timeout or a malformed body raise SystemExit with one
    line naming the endpoint and the cause: a run would otherwise log every judgement as failed for days."""
    client = getattr(judge, "client", None)
    if not isinstance(client, OpenAIClient):
        return None
    timeout = min(client.timeout, 30.0)  # a live server answers 16 tokens in seconds, even under load
    reply = client.probe(timeout)
    # a reply cut off on the token limit, or reasoning with no final text, still comes from a live model
    if reply.text is None and not reply.truncated and reply.error != NO_ANSWER:
        key = f"; is ${client.api_key_env} set to the server's key?"  # the variable's name, never its value
        hint = {"HTTP 401": key, "HTTP 403": key, "HTTP 404": "; does the URL end in /v1, and does the server "
                "serve this model (GET /v1/models)?"}.get(reply.error[:8], "")
        hint = f"; no reply within {timeout:g} s" if "timed out" in reply.error else hint
        raise SystemExit(f"judge check failed for model {client.model!r}: {reply.error}{hint}")
    return reply.latency


def failure_share(stats, n):
    """The share of a step's rows whose judgement failed (judge_batch's stats of this rank's n rows), over every
    rank: call it on every rank, so that all of them take the same decision on it."""
    import torch

    import palmr
    counts = palmr.all_reduce(torch.tensor([float(stats.get("failed", 0)), float(n)], dtype=torch.float64))
    return float(counts[0] / counts[1].clamp(min=1))


def judge_batch(judge, items, coverage=False, offset=0):
    """Verdicts for a batch of JudgeItems -> s_vis, spans, r_cov (per item) and stats (failed, ties, unmatched and
    the backend's own counters). spans: the located wrong claims' (start, end) character spans, moved back by
    `offset` characters (a prefill the response text starts with; spans inside it are dropped). r_cov: the
    point-wise coverage, asked only when `coverage`.

    A judge that fails (server down, bad replies) never raises here: its items count as failures with S_vis = 1
    ("no preference", METHOD.md) and the error is printed once per batch; the trainer stops when their share
    (failure_share) passes --judge-max-failed.
    """
    n = len(items)
    s_vis, spans, r_cov, failed, ties, unmatched = [1.0] * n, [[] for _ in items], [0.0] * n, 0, 0, 0
    judge.stats = {}
    try:
        verdicts = judge.judge(items)
        failed = sum(v.failed for v in verdicts)
        ties = sum(v.preference == "tie" for v in verdicts)
        unmatched = sum(v.unmatched for v in verdicts)
        for k, v in enumerate(verdicts):
            s_vis[k], spans[k] = v.s_vis, [(max(a - offset, 0), b - offset) for a, b in v.spans if b > offset]
        if coverage:
            r_cov = list(judge.coverage(items))
    except Exception as e:  # noqa: BLE001 -- a judge outage must not kill a multi-day run
        print(f"[rank {os.environ.get('RANK', '0')}] judge failed on this batch, counted as no preference: "
              f"{type(e).__name__}: {e}", flush=True)
        failed = n
    return s_vis, spans, r_cov, dict(judge.stats, unmatched=unmatched, failed=failed, ties=ties)


# -----------------------------------------------------------------------------
# `python judge.py agree`: judge-human agreement of the pairwise and point-wise protocols


def agreement_report(judge, pairs):
    """pairs: dicts with question, facts, candidate, reference, label in {candidate, reference, tie}."""
    items = [JudgeItem(p["question"], p["facts"], p["candidate"], p["reference"]) for p in pairs]
    labels = [p["label"] for p in pairs]
    assert set(labels) <= {"candidate", "reference", "tie"}, f"labels must be candidate/reference/tie: {set(labels)}"
    judge.protocol = "pairwise"
    pair_verdicts = judge.judge(items)
    pair_pred = [v.preference or "tie" for v in pair_verdicts]
    # point-wise: each response judged alone; the preference follows from the two verdicts
    judge.protocol = "pointwise"
    cand = judge.judge(items)
    ref = judge.judge([JudgeItem(it.question, it.facts, it.reference, None) for it in items])
    judge.protocol = "pairwise"
    point_pred = ["candidate" if c.s_vis > r.s_vis else "reference" if r.s_vis > c.s_vis else "tie"
                  for c, r in zip(cand, ref)]
    n = len(pairs)
    return {"n": n, "agreement": sum(p == l for p, l in zip(pair_pred, labels)) / max(1, n),
            "failed": sum(v.failed for v in pair_verdicts),
            "pointwise_agreement": sum(p == l for p, l in zip(point_pred, labels)) / max(1, n),
            "pointwise_failed": sum(v.failed for v in cand + ref),
            "first_failure": next((v.reason for v in pair_verdicts + cand + ref if v.failed), None),
            "swap": judge.swap, "judge": judge.name,
            "items": [{"label": l, "pairwise": p, "pointwise": q} for l, p, q in zip(labels, pair_pred, point_pred)]}


def gate_report(judges, pairs):
    """Per protocol and per error type: does the judge gate what it should? -> dict (JSON-able).

    judges: {protocol name: judge} (e.g. pairwise, pairwise+swap, pointwise; rule, rule+omissions).
    A pair should be gated when its label is 'reference' (the SceneAlign negatives); the faithful variants
    (and 'candidate' / 'tie' labels) must not be. Per (protocol, error type): n, agreement (gate decision
    right), gated (share gated), false_gate (faithful pairs gated, only for 'faithful'), failed (share
    with no usable verdict), tokens per item, latency (mean seconds per request sent; LLM judges) and
    seconds per item (wall time of the type's batch / n). Each type is one batch, so its counts are its own.
    Over all protocols and types: judged (verdicts asked for), failed_count and first_failure (its reason).
    """
    by_type = collections.defaultdict(list)
    for p in pairs:
        by_type[p.get("error_type") or ("faithful" if p["label"] != "reference" else "unspecified")].append(p)
    report = {"n": len(pairs), "types": {t: len(v) for t, v in by_type.items()}, "protocols": {},
              "judged": 0, "failed_count": 0, "first_failure": None}
    for name, j in judges.items():
        rows, overall = {}, {"n": 0, "right": 0, "failed": 0, "tokens": 0, "seconds": 0.0}
        for t, group in by_type.items():
            items = [JudgeItem(p["question"], p["facts"], p["candidate"],
                               None if getattr(j, "protocol", "pairwise") == "pointwise" else p["reference"])
                     for p in group]
            j.stats, start = {}, time.time()
            verdicts = j.judge(items)
            seconds = time.time() - start
            report["first_failure"] = report["first_failure"] or next((v.reason for v in verdicts if v.failed), None)
            gated = [v.s_vis == 0.0 for v in verdicts]
            should = [p["label"] == "reference" for p in group]
            right = sum(g == w for g, w in zip(gated, should))
            failed, tokens = sum(v.failed for v in verdicts), j.stats.get("tokens", 0)
            n = len(group)
            rows[t] = {"n": n, "agreement": right / n, "gated": sum(gated) / n,
                       "false_gate": sum(gated) / n if t == "faithful" else None, "failed": failed / n,
                       "tokens_per_item": tokens / n,
                       "latency": j.stats.get("latency_sum", 0.0) / max(1, j.stats.get("sent", 0)),
                       "seconds_per_item": seconds / n}
            for k, v in (("n", n), ("right", right), ("failed", failed), ("tokens", tokens), ("seconds", seconds)):
                overall[k] += v
        report["judged"] += overall["n"]
        report["failed_count"] += overall["failed"]
        n = max(1, overall["n"])
        report["protocols"][name] = {"overall": {"agreement": overall["right"] / n, "failed": overall["failed"] / n,
                                                 "tokens_per_item": overall["tokens"] / n,
                                                 "seconds_per_item": overall["seconds"] / n}, "types": rows}
    return report


def gate_chart(report, path):
    """Bar chart of gate agreement (%) per error type, a bar per protocol (matplotlib; skipped with a message
    when it is not installed). -> path, or None."""
    from palmr import pyplot
    plt = pyplot()
    if plt is None:
        return None
    types, protocols = list(report["types"]), list(report["protocols"])
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(types), 3.6))
    width = 0.8 / max(1, len(protocols))
    for k, name in enumerate(protocols):
        values = [100 * report["protocols"][name]["types"][t]["agreement"] for t in types]
        ax.bar([i + (k - (len(protocols) - 1) / 2) * width for i in range(len(types))], values, width, label=name)
    ax.set_xticks(range(len(types)), [f"{t}\n(n={report['types'][t]})" for t in types], fontsize=8)
    ax.set_ylabel("gate decision right (%)")
    ax.set_ylim(0, 105)
    ax.set_title("judge agreement per error type (faithful: not gated)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ag = sub.add_parser("agree", help="agreement of the judge with labels: pairwise vs point-wise, per error type")
    ag.add_argument("--pairs", required=True, help="JSONL: question, facts, candidate, reference, label "
                    "[, error_type] (e.g. from pairs.py)")
    ag.add_argument("--backend", default="openai", choices=list(JUDGES))
    ag.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    ag.add_argument("--model", help="served model name (openai) or local folder (hf)")
    ag.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    ag.add_argument("--swap", action="store_true", help="ask both A/B orders; the reference must win both")
    ag.add_argument("--no-reasoning", action="store_true", help="turn the judge's thinking off")
    ag.add_argument("--omissions", action="store_true", help="stating fewer facts than the reference is also "
                    "less faithful (the trainer's --judge-omissions)")
    ag.add_argument("--protocols", default=None, help="comma-separated, for the per-type gate report: pairwise, "
                    "pairwise+swap, pointwise (LLM backends; default all three) or rule, rule+omissions (rule)")
    ag.add_argument("--concurrency", type=int, default=32)
    ag.add_argument("--timeout", type=float, default=120.0)
    ag.add_argument("--max-failed", type=float, default=0.1, help="refuse to report agreement when more than this "
                    "share of the judgements failed (no usable verdict: a server error, an unparseable reply); "
                    "default 0.1")
    ag.add_argument("--out", required=True, help="JSON report path (the chart goes next to it, .png)")
    a = ap.parse_args(argv)
    pairs = [json.loads(line) for line in open(a.pairs) if line.strip()]
    rule = a.backend == "rule"
    names = (a.protocols or ("rule,rule+omissions" if rule else "pairwise,pairwise+swap,pointwise")).split(",")
    if rule:
        assert set(names) <= {"rule", "rule+omissions"}, f"--backend rule has protocols rule, rule+omissions: {names}"
        judges = {n: RuleJudge(omissions=n.endswith("omissions")) for n in names}
        report = {"judge": "rule"}
    else:
        assert set(names) <= {"pairwise", "pairwise+swap", "pointwise"}, f"unknown protocols {names}"
        base = make_judge(a.backend, a.base_url, a.model, a.api_key_env, swap=a.swap, concurrency=a.concurrency,
                          timeout=a.timeout, reasoning=not a.no_reasoning, omissions=a.omissions)
        check_judge(base)  # a refused URL or a wrong model stops here, in one line, before any work
        report = agreement_report(base, pairs)  # the three-way labels: pairwise and point-wise agreement
        # a client (and cache) per protocol, so that each one's tokens and latency are its own
        judges = {n: make_judge(a.backend, a.base_url, a.model, a.api_key_env, swap=n == "pairwise+swap",
                                protocol="pointwise" if n == "pointwise" else "pairwise", concurrency=a.concurrency,
                                timeout=a.timeout, reasoning=not a.no_reasoning, omissions=a.omissions)
                  for n in names}
    gate = report["gate"] = gate_report(judges, pairs)
    # agreement over judgements that mostly never happened (a server gone down, replies without a verdict)
    # would measure the outage, not the judge: refuse it, naming the first cause
    judged, failed, first = gate["judged"], gate["failed_count"], gate["first_failure"]
    if not rule:  # the three-way agreement asked n pairwise and 2n point-wise judgements too
        judged, failed = judged + 3 * report["n"], failed + report["failed"] + report["pointwise_failed"]
        first = report["first_failure"] or first
    if failed > a.max_failed * judged:
        raise SystemExit(f"judge.py agree: {failed} of {judged} judgements failed (first: {first}): no agreement "
                         f"reported (--max-failed {a.max_failed})")
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)
    chart = gate_chart(report["gate"], os.path.splitext(a.out)[0] + ".png")
    head = "" if rule else (f"pairwise agreement {report['agreement']:.3f} (failed {report['failed']}) | "
                            f"point-wise agreement {report['pointwise_agreement']:.3f} | ")
    print(f"n {len(pairs)} | {head}gate agreement " + ", ".join(
        f"{n} {r['overall']['agreement']:.3f}" for n, r in report["gate"]["protocols"].items())
        + f" -> {a.out}, {chart}", file=sys.stderr)
    for n, r in report["gate"]["protocols"].items():
        print(f"  {n}: " + " | ".join(f"{t} {v['agreement']:.2f}" for t, v in r["types"].items()), file=sys.stderr)
    return report



if __name__ == "__main__":
    main()
