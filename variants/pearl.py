"""PEARL (arXiv 2511.18437): a perception checklist about the image, answered by the policy itself, gates the
reasoning reward; the checklist's own rollouts train as GRPO groups too.

    python grpo.py --reward pearl [--pearl-items 3 --pearl-group 4 --pearl-gate 0.5]

PEARL's repository (MiliLab/PEARL) holds inference code only and the paper gives no checklist rule, reward
formula, gate or rollout counts: every rule here is ours (README "PEARL"). Per prompt: pearl_checklist's
--pearl-items questions, --pearl-group rollouts each, graded by rule; the prompt's pass rate P over them all;
R = (0.9 S_ans + 0.1 S_fmt) when P >= --pearl-gate, else 0.
"""
import dataclasses
import random
import re
import time

import torch

from palmr import COLOUR_WORDS, SAME_COLOUR, plural_noun
from rewards import grade_parts, register_scheme, score_completion
from variants.base import Extra, Variant

PEARL_GATE = 0.5  # the checklist pass rate a prompt needs (ours: not published)


def _grade(text, gold, choices=None, s_perc=None, **_):
    assert s_perc is not None, "pearl needs the checklist pass rate (variants.pearl.pearl_checks)"
    return grade_parts(text, gold, choices)


register_scheme("pearl", lambda fmt, ans, vis, cov, s_perc=0.0, gate=PEARL_GATE, **_:
                (0.9 * ans + 0.1 * fmt) if s_perc >= gate else 0.0, grade=_grade)


def _count(value):
    """A facts count as an int >= 0, or None (a missing or non-integer count makes no checklist item)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def pearl_checklist(facts, question, k, key):
    """PEARL checklist of one item: exactly k (question, answer) pairs, answers checked by grade_answer.

    Rule (ours; the paper's is not public), from the structured facts of METHOD.md section 1.3 (the synthetic
    shapes write the same schema), which list every kind of object with its count; attributes other than
    colour are not exhaustive (a 'red bus' entry may be double-decker too), colours exclude each other:
    - present groups: per object name, "How many {attributes} {plural name} are there?" -> the count of the
      entries with exactly those attributes (summed when the facts repeat an entry). A name with several
      distinct attribute sets is asked about only when each set holds exactly one colour and the colours
      differ (else a group could include another); a name with an unreadable count is not asked about;
    - one absent probe when the facts allow it: a name whose entries all carry exactly one colour, with a
      colour another entry has and none of that name has, "How many {colour} {plural name} are there?" -> "0";
    - order: items whose name or attribute words occur in the question first (the question's own evidence),
      the rest shuffled by `key`; the absent probe last; an item worded exactly as the question is left out
      (that would reward the answer twice);
    - fewer than k distinct items are repeated in order to make k, so every prompt costs the same rollouts.
    Relations and text are not checked (their answers cannot be verified by rule). -> [] when the facts give
    no present item (probes alone would be passed by always answering 0); the trainer drops such items at load.
    """
    by_name, shown = {}, {}  # name -> {sorted attributes: summed count, or None when a count is unreadable}
    for o in (facts or {}).get("objects") or []:
        if not isinstance(o, dict) or not str(o.get("name") or "").strip():
            continue
        name = str(o["name"]).strip().lower()
        said = tuple(str(a).strip().lower() for a in (o.get("attributes") or []) if str(a).strip())
        attrs = tuple(sorted(said))
        shown.setdefault((attrs, name), said)  # the facts' own word order, for the question
        n, groups = _count(o.get("count")), by_name.setdefault(name, {})
        groups[attrs] = None if n is None or groups.get(attrs, 0) is None else groups.get(attrs, 0) + n
    colour_of = lambda attrs: [SAME_COLOUR.get(a, a) for a in attrs if a in COLOUR_WORDS]  # noqa: E731
    usable = set()
    for name, groups in by_name.items():
        colours = [colour_of(a) for a in groups]
        if any(n is None for n in groups.values()):
            continue  # an unreadable count: this name's totals are unknown
        if len(groups) > 1 and not (all(len(c) == 1 for c in colours) and len({c[0] for c in colours}) == len(groups)):
            continue  # overlapping groups: one could include another
        usable.add(name)
    entries = [(said, name, by_name[name][attrs]) for (attrs, name), said in shown.items()  # in the facts' order
               if name in usable and by_name[name][attrs] >= 1]
    words = set(re.findall(r"[a-z]+", question.lower()))
    phrase = lambda attrs, name: " ".join(attrs + (plural_noun(name),))  # noqa: E731
    ask = lambda attrs, name: f"How many {phrase(attrs, name)} are there?"  # noqa: E731
    relevant = lambda attrs, name: bool(words & set(" ".join(attrs + (name, plural_noun(name))).split()))  # noqa: E731
    rng = random.Random(key)
    order = list(range(len(entries)))
    rng.shuffle(order)
    order.sort(key=lambda i: not relevant(*entries[i][:2]))  # stable: relevant first, each part shuffled
    target = question.strip().lower()
    items = [(q, str(entries[i][2])) for i in order if (q := ask(*entries[i][:2])).lower() != target]
    every = {c for groups in by_name.values() for attrs in groups for c in colour_of(attrs)}
    absent = sorted({((c,), name) for name, groups in by_name.items()
                     if all(len(colour_of(a)) == 1 for a in groups)
                     for c in every - {colour_of(a)[0] for a in groups}})
    absent = [p for p in absent if ask(*p).lower() != target]
    if not items:  # probes alone would be answered by always saying 0
        return []
    if absent:
        rng.shuffle(absent)
        absent.sort(key=lambda p: not relevant(*p))
        items = items[:max(k - 1, 1)] + [(ask(*absent[0]), "0")]
    return [items[i % len(items)] for i in range(k)] if items else []


def pearl_checks(run, samples, prefill=""):
    """PEARL's auxiliary rollouts: each prompt's checklist (pearl_checklist, --pearl-items questions on the same
    image), --pearl-group rollouts per question through the loop's own rollout, graded by rule.

    -> rows [(check sample, completion)] prompt after prompt (its questions in order, each question's
    rollouts together: groups of --pearl-group), their encoded prompts {id: ...}, their rewards (N,)
    0.9 correct + 0.1 format (the outcome reward, so perception is trained as its own task), and the
    perception score of each prompt {sample id: pass rate over all its checklist rollouts}.
    """
    args, checks = run.args, []
    for s in samples:
        for j, (q, a) in enumerate(pearl_checklist(s.facts, s.question, args.pearl_items, s.id)):
            checks.append(dataclasses.replace(s, id=f"{s.id}#pearl{j}", question=q, answer=a, choices=None,
                                              reference=None, source="pearl/checklist", meta={"of": s.id}))
    rows, encoded = run.rollout(checks, n=args.pearl_group, seed_offset=700_001)
    rewards, passed = [], {}
    for c_s, c in rows:
        total, parts = score_completion("grpo", prefill + c.text, c_s.answer)
        rewards.append(total)
        passed.setdefault(c_s.meta["of"], []).append(parts["ans"])
    return rows, encoded, torch.tensor(rewards), {k: sum(v) / len(v) for k, v in passed.items()}


class Pearl(Variant):
    """--reward pearl: checklist rollouts after the rollout, their pass rate as a gate, their groups trained."""
    name = "pearl"
    resume_keys = ("pearl_items", "pearl_group", "pearl_gate")

    @staticmethod
    def add_args(ap):
        g = ap.add_argument_group("PEARL (variants/pearl.py)")
        g.add_argument("--pearl-items", type=int, default=3, help="PEARL: checklist questions per prompt "
                       "(pearl_checklist; ours, the paper's count is not public)")
        g.add_argument("--pearl-group", type=int, default=4, help="PEARL: auxiliary rollouts per checklist question, "
                       "trained as their own groups (ours)")
        g.add_argument("--pearl-gate", type=float, default=PEARL_GATE, help="PEARL: checklist pass rate a prompt "
                       "needs for its reasoning reward (ours)")

    @staticmethod
    def is_active(args):
        return "pearl" in (args.reward, args.mix_reward)

    def __init__(self, args):
        super().__init__(args)
        self.checklist, self.last = (None, None), None

    def check(self, world):
        a = self.args
        if not (a.pearl_items >= 1 and a.pearl_group >= 2 and 0 <= a.pearl_gate <= 1):
            raise SystemExit("--pearl-items must be >= 1, --pearl-group >= 2 (a group of one has no advantage), "
                             "--pearl-gate in [0, 1]")

    def _checklist(self, sample):  # built once per item at load (questions, then drop_reason)
        if self.checklist[0] != sample.id:
            self.checklist = (sample.id, pearl_checklist(sample.facts, sample.question, self.args.pearl_items,
                                                         sample.id))
        return self.checklist[1]

    def questions(self, sample):  # the checklist's prompts show the same image with another question
        return [q for q, _ in self._checklist(sample)]

    def drop_reason(self, sample, scheme):  # every row gets its checklist groups, whatever its scheme
        return None if self._checklist(sample) else "no checkable facts for a PEARL checklist"

    def after_rollout(self, run, samples, rows):
        t = time.time()
        check_rows, check_encoded, check_rewards, passed = pearl_checks(run, samples, run.prefill)
        t = time.time() - t  # the checklist's rollouts, counted in t_rollout
        self.last = ([passed[s.id] for s, _ in rows], check_rows)
        return Extra(parts=[{"s_perc": p} for p in self.last[0]],
                     groups=[(check_rows, check_encoded, check_rewards, self.args.pearl_group)], metrics={"t_pearl": t})

    def reward_signals(self):
        return {"gate": self.args.pearl_gate}

    def metrics(self, rows, parts):
        s_perc, check_rows = self.last
        return {"pearl/perception": torch.tensor(float(sum(s_perc))),
                "pearl/gated": torch.tensor(float(sum(p < self.args.pearl_gate for p in s_perc))),
                # checklist rollouts and their generated tokens per reasoning rollout: the extra cost
                "pearl/rollouts": torch.tensor(float(len(check_rows))),
                "pearl/tokens": torch.tensor(float(sum(len(c.token_ids) for _, c in check_rows)))}

    def step_line(self, metrics):
        return f" perc {metrics['pearl/perception']:.2f}"
