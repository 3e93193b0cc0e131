"""Located-error token credit (variants/token_credit.py, --credit token; issue 14): the judge's character spans in
the trainer's coordinates, spans -> tokens, per-token advantages, the loss that takes them, what one update
with them does to the policy, and the trainer with it. (The judge's side, omissions and locating claims, is
tested with judge.py.)"""
import json
import random
import types

import pytest
import torch
from transformers import AutoTokenizer

import grpo
import judge
import palmr
from data import Sample, hallucinated_trace, load_image, read_jsonl
from variants.token_credit import TokenCredit, span_tokens, token_advantages

FACTS = {"objects": [{"name": "circle", "count": 2, "attributes": ["red"], "location": []},
                     {"name": "square", "count": 1, "attributes": ["blue"], "location": []}],
         "relations": [], "text": [], "global": {"total_objects": 3}}


def trace(reasoning, answer="2"):
    return f"<think>{reasoning}</think> The answer is \\boxed{{{answer}}}."


FULL = trace("I see 2 red circles and 1 blue square.")  # 0 wrong, covers 2 of 2 groups


def naive_span_tokens(tokenizer, token_ids, spans):
    """span_tokens' rule by a linear scan instead of its bisection, as an oracle: token i covers characters
    [lo(i), hi(i + 1)) of the decoded text, hi(k) = len(decode(ids[:k])), lo(k) the same without a trailing
    U+FFFD (a token ending inside a multi-byte character belongs to it)."""
    texts = [tokenizer.decode(token_ids[:k], skip_special_tokens=True) for k in range(len(token_ids) + 1)]
    lo, hi = [len(t.rstrip("\ufffd")) for t in texts], [len(t) for t in texts]
    return sorted({i for s, e in spans if e > s for i in range(len(token_ids)) if lo[i] < e and hi[i + 1] > s})


# -----------------------------------------------------------------------------
# spans -> tokens, per-token advantages and the loss


def test_span_tokens_byte_level_bpe(tiny_ckpt):
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    text = "I see 3 xylophones near 2 red circles, 12\u00b0 apart."  # a rare word, a 2-byte character
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    pieces = [text[a:b] for a, b in offsets]
    start = text.index("xylophones")
    word = [i for i, (a, b) in enumerate(offsets) if a < start + 10 and b > start]  # " x", "y", ... "es"
    assert len(word) >= 3, f"the rare word must split into several tokens: {pieces}"
    assert offsets[word[0]][0] < start, "its first token starts with the space before it: a span cuts it"

    def expected(s, e):  # the fast tokenizer's own offsets as the oracle: tokens that overlap [s, e)
        return [i for i, (a, b) in enumerate(offsets) if a < e and b > s]
    cases = [(start, start + 10), (start + 3, start + 5), (start + 4, start + 4 + 1),  # whole word, cut mid-token
             (text.index("2 red"), text.index(", 12")), (text.index("\u00b0"), text.index("\u00b0") + 1),
             (0, len(text)), (len(text), len(text) + 5)]
    for s, e in cases:
        assert span_tokens(tok, ids, [(s, e)]) == expected(s, e), (text[s:e], pieces)
        assert naive_span_tokens(tok, ids, [(s, e)]) == expected(s, e), "the oracle used below agrees"
    assert span_tokens(tok, ids, [(start, start + 10)]) == word
    assert span_tokens(tok, ids, []) == [] and span_tokens(tok, [], [(0, 3)]) == []
    two = span_tokens(tok, ids, [(0, 1), (start, start + 2)])
    assert two == sorted(set(expected(0, 1) + expected(start, start + 2)))


def test_token_advantages_by_hand():
    adv = torch.tensor([1.0, -0.2, 0.0, -2.0])
    wrong = torch.tensor([[0, 1, 1], [1, 0, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.float32)
    got = token_advantages(adv, wrong, c=0.5)
    want = torch.tensor([[1.0, -1.0, -1.0], [-0.5, -0.2, -0.2], [0.0, 0.0, -0.5], [-2.0, -2.0, -2.0]])
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert (got[wrong.bool()] < 0).all(), "a located error never gets a positive advantage"


def test_policy_loss_takes_per_token_advantages():
    # at ratio 1 and beta 0 the loss is -(token-mean of A_t): with A (2, 3) and mask [[1,1,1],[1,0,0]],
    # -(1 - 1 - 1 + -0.5) / 4 = 0.375; a (B,) advantage equals its value on every token
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    a_tok = torch.tensor([[1.0, -1.0, -1.0], [-0.5, 7.0, 7.0]])
    loss, _ = grpo.policy_loss(logp, logp.detach(), None, a_tok, mask, 0.2, 0.28, 0.0)
    assert float(loss.detach()) == pytest.approx(0.375)
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g, torch.tensor([[-0.25, 0.25, 0.25], [0.125, 0.0, 0.0]]))
    a_seq = torch.tensor([0.3, -0.6])
    l1, _ = grpo.policy_loss(logp, logp.detach(), None, a_seq, mask, 0.2, 0.28, 0.0)
    l2, _ = grpo.policy_loss(logp, logp.detach(), None, a_seq[:, None].expand(2, 3), mask, 0.2, 0.28, 0.0)
    assert float(l1.detach()) == float(l2.detach()) == pytest.approx(-(0.3 * 3 - 0.6) / 4)
    # the folded path's closure takes the same (B, T) advantages
    token_loss = grpo.masked_token_loss(None, None, a_tok, mask, 0.2, 0.28, 0.0)
    assert float(token_loss(logp[mask.bool()], 0, 4).sum().detach()) == pytest.approx(0.375)


def test_compute_rewards_returns_spans_in_completion_coordinates():
    s = Sample(id="x", image="", question="How many circles?", answer="2", facts=FACTS, reference=FULL)
    text = "I see 3 red circles.</think> The answer is \\boxed{2}."
    c = palmr.Completion(token_ids=[1], text=text, logprobs=[0.0], finished=True)
    rewards, parts, stats, spans = grpo.compute_rewards(judge.RuleJudge(), [(s, c)], "palmr", prefill="<think>")
    assert [text[a:b] for a, b in spans[0]] == ["3 red circles"] and float(rewards[0]) == 0.0


def test_after_reward_and_shaping_by_hand(tiny_ckpt):
    # after_reward turns each row's character spans into its token indices; shape_advantages gives those
    # tokens -max(|A|, c) and every other token (and every row it has no spans for) the row's advantage
    processor = palmr.load_processor(tiny_ckpt)
    tok = processor.tokenizer
    args = grpo.get_args(["--credit", "token", "--credit-c", "0.5"])
    texts = ["I see 3 red circles.", "I see 2 red circles."]
    rows = [(None, palmr.Completion(tok(t, add_special_tokens=False)["input_ids"], t, [], True)) for t in texts]
    hook = TokenCredit(args)
    hook.after_reward(types.SimpleNamespace(processor=processor), rows, [[(6, 19)], []])
    ids = rows[0][1].token_ids
    marked = hook.wrong[id(rows[0][1])]
    assert marked == naive_span_tokens(tok, ids, [(6, 19)]) and hook.wrong[id(rows[1][1])] == []
    assert tok.decode([ids[i] for i in marked]).strip() == "3 red circles"
    extra = (None, palmr.Completion([5, 6], "xy", [], True))  # a row the judge never saw (a method's extra group)
    width = max(len(ids), len(rows[1][1].token_ids))
    ctx = types.SimpleNamespace(rows=rows + [extra], spans=[[range(0, 2), range(2, 3)]], device=torch.device("cpu"),
                                advantages=torch.tensor([0.0, 1.0, -2.0]),
                                batches=[[{"mask": torch.ones(2, width)}, {"mask": torch.ones(1, 2)}]])
    (shaped,), metrics = hook.shape_advantages(ctx)
    want = torch.zeros(2, width)
    want[0, marked] = -0.5  # A = 0: the wrong claim's tokens get -c
    want[1] = 1.0
    torch.testing.assert_close(shaped[0], want, atol=0, rtol=0)
    torch.testing.assert_close(shaped[1], torch.tensor([[-2.0, -2.0]]), atol=0, rtol=0)
    assert metrics == {}
    share = hook.metrics(rows, None)["credit/wrong_tokens"]  # summed per row; the loop averages over rows
    assert float(share) == pytest.approx(len(marked) / len(ids))


# -----------------------------------------------------------------------------
# what one update with token credit does to the policy


def _credit_rows(warm_ckpt, shapes_file, processor):
    """Two prompts x 2 rows of token ids written by hand: prompt 0's first row is its reference trace with one
    group misread (data.hallucinated_trace), the other rows are references."""
    tok = processor.tokenizer
    samples = read_jsonl(shapes_file)[:2]
    encoded = {s.id: palmr.encode_prompt(processor, palmr.render_prompt(processor, s.question, s.choices),
                                         load_image(s), 112 * 112) for s in samples}
    end = tok.convert_tokens_to_ids("<|im_end|>")

    def completion(text):
        ids = tok(text, add_special_tokens=False)["input_ids"] + [end]
        return palmr.Completion(ids, text, [0.0] * len(ids), True)
    texts = [hallucinated_trace(samples[0], random.Random(0)), samples[0].reference, samples[1].reference,
             samples[1].reference]
    return [(samples[i // 2], completion(t)) for i, t in enumerate(texts)], encoded


def test_located_claim_lowers_exactly_its_tokens(warm_ckpt, shapes_file):
    args = grpo.get_args(["--model", warm_ckpt, "--data", shapes_file, "--rollout-batch", "2", "--update-batch", "2",
                          "--group-size", "2", "--beta", "0", "--credit", "token"])
    processor = palmr.load_processor(warm_ckpt)
    rows, encoded = _credit_rows(warm_ckpt, shapes_file, processor)
    policy = grpo.prepare_model(warm_ckpt, torch.device("cpu"), train=True)
    batch = grpo.training_batch(rows, encoded, processor.tokenizer.pad_token_id, torch.device("cpu"))
    mask = batch["mask"].bool()

    def logprobs():
        with torch.no_grad():
            return policy.completion_logprobs(batch, args.temperature)[0]

    def params():
        return {n: p.detach().clone() for n, p in policy.named_parameters()}
    hook, run = TokenCredit(args), types.SimpleNamespace(processor=processor)
    zero = torch.zeros(len(rows))  # every group's advantage is 0: no sequence-level policy gradient anywhere

    # no located span: a zero-advantage update changes nothing at all, bit for bit
    start, before = params(), logprobs()
    hook.after_reward(run, rows, [[] for _ in rows])
    grpo.train_on_rollouts(policy, None, torch.optim.SGD(policy.parameters(), lr=0.05), processor, rows, encoded,
                           zero, args, torch.device("cpu"), hooks=[hook])
    assert all(torch.equal(p, start[n]) for n, p in params().items())
    assert torch.equal(logprobs(), before)

    # one wrong claim, located by the rule judge in the misread row alone
    _, _, _, located = grpo.compute_rewards(judge.make_judge("rule", locate=True), rows, "palmr")
    assert located[0] and not any(located[1:]), located
    hook.after_reward(run, rows, located)
    text, ids = rows[0][1].text, rows[0][1].token_ids
    marked = torch.zeros_like(mask)
    for i, (_, c) in enumerate(rows):
        marked[i, hook.wrong[id(c)]] = True
    claim = " ".join(text[a:b] for a, b in located[0])
    assert tok_text(processor, [ids[i] for i in hook.wrong[id(rows[0][1])]]) == claim  # e.g. "2 green squares"
    assert 1 <= int(marked.sum()) <= 5, "a few tokens"
    grpo.train_on_rollouts(policy, None, torch.optim.SGD(policy.parameters(), lr=0.05), processor, rows, encoded,
                           zero, args, torch.device("cpu"), hooks=[hook])
    delta = logprobs() - before
    drop, rest = delta[marked], delta[mask & ~marked]
    # Measured on the warm checkpoint (SGD lr 0.05, no clipping: grad norm 0.35; "2 green squares", 3 tokens):
    # the marked tokens fall by 0.03, 0.27 and 1.67 nats (mean 0.66); every unmarked token of every row moves
    # by at most 0.074 (the same-prompt reference row), 0.053 on the other prompt's rows, mean |change| 0.003
    # to 0.009 per row. Unmarked tokens get no policy gradient (A = 0); they move only through the weights
    # they share with the marked ones. Hence: every marked token falls, by 0.3 nats on average (half the
    # measured), while no unmarked token moves by more than 0.2 (2.7x the measured) or a fifth of that mean
    # drop, and their mean |change| stays under 0.02 (2x the worst row).
    assert (drop < 0).all(), drop
    assert float(drop.mean()) < -0.3, drop
    assert float(rest.abs().max()) < min(0.2, 0.2 * float(-drop.mean())), float(rest.abs().max())
    for i in range(len(rows)):
        others = delta[i][mask[i] & ~marked[i]]
        assert float(others.abs().mean()) < 0.02, (i, float(others.abs().mean()))


def tok_text(processor, ids):
    return processor.tokenizer.decode(ids, skip_special_tokens=True).strip()


# -----------------------------------------------------------------------------
# the trainer


@pytest.mark.slow
def test_token_credit_and_omissions_train(tmp_path, warm_ckpt, shapes_file, monkeypatch):
    # two steps with both mechanisms on: the metrics say what was located, and the run resumes with them
    seen, compute_rewards = [], grpo.compute_rewards

    def recording(judge_, rows, *a, **k):
        out = compute_rewards(judge_, rows, *a, **k)
        seen.append((rows, out[3]))
        return out
    monkeypatch.setattr(grpo, "compute_rewards", recording)
    flags = ["--model", warm_ckpt, "--data", shapes_file, "--out", str(tmp_path), "--rollout-batch", "4",
             "--update-batch", "2", "--group-size", "2", "--max-new-tokens", "32", "--warmup-steps", "0",
             "--credit", "token", "--judge-omissions", "--max-steps", "2", "--save-every", "2"]
    grpo.main(flags)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and len(seen) == 2
    tok = palmr.load_processor(warm_ckpt).tokenizer
    for m, (rows, located) in zip(metrics, seen):  # the step's means over its rows, recomputed from the judge's spans
        assert len(rows) == 8 and len(located) == 8
        assert m["credit/located"] == pytest.approx(sum(bool(sp) for sp in located) / 8)
        share = [len(naive_span_tokens(tok, c.token_ids, sp)) / max(1, len(c.token_ids))
                 for (_, c), sp in zip(rows, located)]
        assert m["credit/wrong_tokens"] == pytest.approx(sum(share) / 8)
    args = json.loads((tmp_path / "args.json").read_text())
    assert args["credit"] == "token" and args["judge_omissions"] is True
    assert set(args["versions"]) == {"python", "torch", "transformers", "tokenizers"}
    with pytest.raises(SystemExit, match="credit"):  # a resume must keep the credit scheme
        grpo.main([*flags[:-4], "--credit", "sequence", "--max-steps", "3", "--resume"])
