"""Located-error token credit (ours; README "Process credit"): the judge quotes the rollout's wrong claims, and
their tokens get a negative advantage, so a group whose rollouts all scored the same still teaches which
tokens were wrong. The idea is Differential Feedback's process supervision from where an error sits.

    python grpo.py --credit token [--credit-c 0.5]

Needs a judge that locates claims (judge.make_judge(locate=True): the rule judge, or an LLM judge asked to
quote them); the loop hands over each row's character spans, this file turns them into token indices.
"""
import torch

from variants.base import Variant

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



class TokenCredit(Variant):
    """--credit token: A_t = -max(|A|, c) on the tokens of the judge's located wrong claims, A elsewhere."""
    name = "token_credit"
    resume_keys = ("credit", "credit_c")

    @staticmethod
    def add_args(ap):
        g = ap.add_argument_group("located-error token credit (variants/token_credit.py)")
        g.add_argument("--credit", default="sequence", choices=["sequence", "token"],
                       help="token (ours, off by default: README 'Process credit'): the judge's located wrong claims "
                       "get a negative per-token advantage; sequence: one advantage per rollout")
        g.add_argument("--credit-c", type=float, default=0.5,
                       help="token credit: a wrong claim's tokens get advantage -max(|A|, c) (ours)")

    @staticmethod
    def is_active(args):
        return args.credit == "token"

    def __init__(self, args):
        super().__init__(args)
        self.wrong = {}  # id(completion) -> token indices of its located wrong claims, this step

    def judge_options(self):
        return {"locate": True}

    def after_reward(self, run, rows, located):
        tokenizer = run.processor.tokenizer
        self.wrong = {id(c): span_tokens(tokenizer, c.token_ids, spans) for (_, c), spans in zip(rows, located)}

    def shape_advantages(self, ctx):
        shaped = []
        for update, batches in zip(ctx.spans, ctx.batches):
            shaped.append([])
            for mb, b in zip(update, batches):
                wrong = torch.zeros(b["mask"].shape, dtype=torch.float32)  # (B, T) in {0, 1}
                for r, i in enumerate(mb):
                    wrong[r, self.wrong.get(id(ctx.rows[i][1]), [])] = 1.0  # rows not judged (extra groups): none
                adv = ctx.advantages[mb.start:mb.stop].to(ctx.device)
                shaped[-1].append(token_advantages(adv, wrong.to(ctx.device), self.args.credit_c))
        return shaped, {}

    def metrics(self, rows, parts):
        share = sum(len(self.wrong.get(id(c), [])) / max(1, len(c.token_ids)) for _, c in rows)
        return {"credit/wrong_tokens": torch.tensor(float(share))}
