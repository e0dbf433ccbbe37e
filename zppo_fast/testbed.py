"""The testbed: an easy and a hard family of word problems, built so that ZPPO's premise holds on a CPU.

The paper's claims concern the zone of proximal development: questions the student fails on its own
(0 of 8) but can learn from when a teacher's candidate answers are in its prompt. This task makes
that situation at toy scale, with every piece a fair analog of the paper's setting:

* easy family: one step, "Ann has 12 pens, loses 5. How many pens does Ann have now?", solved as
  `<think>12-5=7</think>\\n\\boxed{7}`;
* hard family: two steps, "Ann has 12 pens, loses 5, gets 3 more. ...", solved as the chain
  `<think>12-5=7, 7+3=10</think>\\n\\boxed{10}`. Every step of a hard chain is itself an easy fact
  (each step adds or takes at most `max_operand`, and every partial result lies in [0, max_value]),
  so what the hard family needs beyond the easy one is the procedure -- carry the result on and
  take the next step -- not new arithmetic;
* the student's warm-up (`warmup_example(STUDENT, ...)`) holds easy questions only: plain ones, and
  candidate-reading ones -- BCQ and NCQ prompts built by `zppo_fast.prompts` exactly as the trainer
  builds them, from an easy question, its worked solution and wrong traces of the kinds a student
  writes (a wrong result, the wrong operation, the step skipped) -- whose target is the correct
  solution. This is the analog of instruction tuning: the student learns to read candidates on a
  distribution disjoint from the hard family. To make following a candidate differ from recalling
  the fact, three in four correct candidates take a detour the plain warm-up never writes ("14+3":
  "14-2=12; 12+5=17"), and the target follows it; the wrong ones beside them mostly stop after the
  first step. (An earlier recipe split the operand, "14+1=15; 15+2=17": the student learned to copy
  the first step and derive the second from the question, and on hard BCQ prompts it scored 0.10
  against 0.08 plain -- it could not use candidates, the method's premise.) No hard question,
  answer or worked solution is ever in the student's warm-up (tests/test_testbed.py checks ids and
  texts: a hard chain joins its steps with ", ", a detour "; "), nor in
  the tokenizer's corpus;
* the teacher is stronger on the hard family because its warm-up (`warmup_example(TEACHER, ...)`)
  holds both families' training questions, as a larger model's pre-training would.

Ids: the easy facts' questions (fact-major, `len(WORDINGS)` wordings each), then the hard facts'.
A fact's split is a function of its content (a hash), so a held-out fact is never trained on under
another wording. Training ids: every wording of the easy training facts and one seeded wording per hard
training fact (the two families come out about even). Held-out ids per family: every held-out fact's
wordings, interleaved fact by fact, so an evaluation of the first n covers as many facts as it can.
"""

from __future__ import annotations

import hashlib
import random

from zppo_fast import prompts
from zppo_fast.task import ITEMS, NAMES, ArithmeticTask, Problem

EASY, HARD = "easy", "hard"
STUDENT, TEACHER = "student", "teacher"
WORDINGS = [(name, item) for name in NAMES for item in ITEMS]
Fact = tuple[int, tuple[tuple[str, int], ...]]  # (start, ((op, operand), ...))


def _facts(steps: int, max_value: int, max_operand: int) -> list[Fact]:
    """Every fact of `steps` steps whose partial results all lie in [0, max_value], in a fixed order."""
    facts: list[Fact] = []

    def extend(start: int, value: int, done: tuple[tuple[str, int], ...]) -> None:
        if len(done) == steps:
            facts.append((start, done))
            return
        for op in "+-":
            for b in range(max_operand + 1):
                nxt = value + b if op == "+" else value - b
                if 0 <= nxt <= max_value:
                    extend(start, nxt, done + ((op, b),))

    for start in range(max_value + 1):
        extend(start, start, ())
    return facts


def _unit(key: str) -> float:
    """A deterministic number in [0, 1) for `key` (the same on every machine and Python)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2**64


def chain(fact: Fact) -> tuple[str, int]:
    """The worked steps of a fact, "12-5=7, 7+3=10", and its answer."""
    value, steps = fact[0], []
    for op, b in fact[1]:
        nxt = value + b if op == "+" else value - b
        steps.append(f"{value}{op}{b}={nxt}")
        value = nxt
    return ", ".join(steps), value


def solution_text(thinking: str, answer: int | str) -> str:
    """The closing instruction's format: the reasoning in <think>, the answer in \\boxed{}."""
    return f"<think>{thinking}</think>\n\\boxed{{{answer}}}"


class TestbedTask:
    """Easy (one step) and hard (two steps) word problems; `problem(id)` gives any question by id."""

    def __init__(self, max_value: int = 19, max_operand: int = 9, heldout_fraction: float = 0.15,
                 easy_heldout_fraction: float = 0.3, seed: int = 0):
        if max_value < 1 or max_operand < 1 or not (0 < heldout_fraction < 1 and 0 < easy_heldout_fraction < 1):
            raise ValueError(f"bad testbed settings: max_value={max_value} (>= 1), max_operand={max_operand} (>= 1), "
                             f"heldout_fraction={heldout_fraction} and easy_heldout_fraction={easy_heldout_fraction} "
                             "(in (0, 1))")
        self.seed, self.max_value, self.max_operand = seed, max_value, max_operand
        self.facts = {EASY: _facts(1, max_value, max_operand), HARD: _facts(2, max_value, max_operand)}
        fraction = {EASY: easy_heldout_fraction, HARD: heldout_fraction}
        self._heldout = {fam: [i for i, f in enumerate(fs) if _unit(f"{seed}:split:{f}") < fraction[fam]]
                         for fam, fs in self.facts.items()}
        self._train = {fam: [i for i, f in enumerate(fs) if _unit(f"{seed}:split:{f}") >= fraction[fam]]
                       for fam, fs in self.facts.items()}
        self._offset = {EASY: 0, HARD: len(self.facts[EASY]) * len(WORDINGS)}

    def __len__(self) -> int:
        return (len(self.facts[EASY]) + len(self.facts[HARD])) * len(WORDINGS)

    def _id(self, family: str, fact: int, wording: int) -> int:
        return self._offset[family] + fact * len(WORDINGS) + wording

    def _locate(self, qid: int) -> tuple[str, int, int]:
        if not 0 <= qid < len(self):
            raise KeyError(f"question id {qid} is outside the testbed's range [0, {len(self)})")
        family = EASY if qid < self._offset[HARD] else HARD
        fact, wording = divmod(qid - self._offset[family], len(WORDINGS))
        return family, fact, wording

    def family(self, qid: int) -> str:
        return self._locate(qid)[0]

    def problem(self, qid: int) -> Problem:
        family, index, wording = self._locate(qid)
        fact = self.facts[family][index]
        name, item = WORDINGS[wording]
        steps = ", ".join(f"gets {b} more" if op == "+" else f"loses {b}" for op, b in fact[1])
        question = f"{name} has {fact[0]} {item}, {steps}. How many {item} does {name} have now?"
        thinking, answer = chain(fact)
        return Problem(qid, question, str(answer), solution_text(thinking, answer), family=family)

    def train_ids(self) -> list[int]:
        easy = [self._id(EASY, f, w) for f in self._train[EASY] for w in range(len(WORDINGS))]
        hard = [self._id(HARD, f, random.Random(f"{self.seed}:wording:{f}").randrange(len(WORDINGS)))
                for f in self._train[HARD]]
        return easy + hard

    def heldout_ids(self, family: str | None = None) -> list[int]:
        """Held-out questions of one family (both: easy then hard), interleaved fact by fact."""
        families = [family] if family is not None else [EASY, HARD]
        ids = []
        for fam in families:
            orders = [random.Random(f"{self.seed}:heldout:{f}").sample(range(len(WORDINGS)), len(WORDINGS))
                      for f in self._heldout[fam]]
            ids += [self._id(fam, f, order[k]) for k in range(len(WORDINGS)) for f, order in
                    zip(self._heldout[fam], orders)]
        return ids

    shared_warmup = False  # the student's and the teacher's warm-ups see different data

    def heldout_sets(self, size: int, seed: int = 0) -> dict[str, list[int]]:
        """The trainer's held-out evaluation: the first `size` held-out ids of each family (as many
        facts as `size` allows; `seed` is unused: the sets are fixed by the task)."""
        return {fam: self.heldout_ids(fam)[:size] for fam in (HARD, EASY)}

    def tokenizer_texts(self, size: int = 4000, seed: int = 0) -> list[str]:
        """Questions and solutions of `size` seeded easy training ids, for the in-process tokenizer's
        corpus (nothing of the hard family: the student's tokenizer is part of its warm-up)."""
        easy = [self._id(EASY, f, w) for f in self._train[EASY] for w in range(len(WORDINGS))]
        ids = random.Random(seed).sample(easy, min(size, len(easy)))
        return [t for i in ids for t in (self.problem(i).question, self.problem(i).solution)]

    # ------------------------------------------------------------------ warm-up data
    def warmup_example(self, role: str, rng: random.Random, reading_share: float = 0.5) -> tuple[int, str, str]:
        """One supervised example `(question id, user text, target)` of `role`'s warm-up; the user text
        is what `zppo_fast.data.chat_prompt_ids` wraps (the closing instruction is added there).

        teacher: a plain question of either family. student: an easy question, plain or (with
        probability `reading_share`) inside a BCQ (70%) or NCQ (30%) prompt.
        """
        if role == TEACHER:
            family = rng.choice((EASY, HARD))
            p = self.problem(self._id(family, rng.choice(self._train[family]), rng.randrange(len(WORDINGS))))
            return p.id, p.question, p.solution
        if role != STUDENT:
            raise ValueError(f"warm-up role must be {STUDENT!r} or {TEACHER!r}, got {role!r}")
        index = rng.choice(self._train[EASY])
        p = self.problem(self._id(EASY, index, rng.randrange(len(WORDINGS))))
        if rng.random() >= reading_share:
            return p.id, p.question, p.solution
        fact = self.facts[EASY][index]
        if rng.random() < 0.7:
            correct, wrong = self.reading_pair(fact, rng)
            return p.id, prompts.build_bcq(p.question, correct, wrong, rng), correct
        pairs = [self.reading_pair(fact, rng) for _ in range(rng.randint(1, 3))]
        wrong = [w for _, w in pairs]
        return p.id, prompts.build_ncq(p.question, wrong, [boxed(w) for w in wrong]), pairs[0][0]

    def reading_pair(self, fact: Fact, rng: random.Random) -> tuple[str, str]:
        """(a correct, a wrong) worked solution of an easy fact, as candidates.

        Three in four correct ones (where the fact allows) take a detour: a first step of either
        operation and any operand, then the step from there to the answer ("14+3": "14-2=12;
        12+5=17"). The plain warm-up never writes a detour, so the only way to write one is to
        follow the candidate, both of its steps. The wrong ones are of the kinds a student writes:
        for a detour, stopping after the first step (mostly), a wrong last result or the wrong last
        operation; for one step, a wrong result, the wrong operation or the step skipped (the
        starting number as the answer).
        """
        start, ((op, b),) = fact
        answer = chain(fact)[1]
        if rng.random() < 0.75:
            detours = [(op1, b1, middle) for op1 in "+-" for b1 in range(1, self.max_operand + 1)
                       if (op1, b1) != (op, b) and 0 <= (middle := _apply(op1, start, b1)) <= self.max_value
                       and 1 <= abs(answer - middle) <= self.max_operand]
            if detours:
                op1, b1, middle = rng.choice(detours)
                op2, b2 = ("+" if answer > middle else "-"), abs(answer - middle)
                # "; " where a hard chain has ", ": no text of the warm-up is ever a hard worked solution
                first = f"{start}{op1}{b1}={middle}"
                correct = solution_text(f"{first}; {middle}{op2}{b2}={answer}", answer)
                kind = "stopped" if rng.random() < 0.6 else rng.choice(("result", "operation"))
                if kind == "stopped":
                    return correct, solution_text(first, middle)
                last_op = _OTHER[op2] if kind == "operation" else op2
                wrong = _wrong_result(answer, _apply(last_op, middle, b2) if kind == "operation" else None, rng)
                return correct, solution_text(f"{first}; {middle}{last_op}{b2}={wrong}", wrong)
        correct = solution_text(chain(fact)[0], answer)
        kind = rng.choice(("skipped", "result", "operation"))
        if kind == "skipped" and start != answer:  # "+ 0" / "- 0": skipping is right; a wrong result instead
            return correct, solution_text(str(start), start)
        last_op = _OTHER[op] if kind == "operation" else op
        wrong = _wrong_result(answer, _apply(last_op, start, b) if kind == "operation" else None, rng)
        return correct, solution_text(f"{start}{last_op}{b}={wrong}", wrong)


_OTHER = {"+": "-", "-": "+"}


def _apply(op: str, x: int, y: int) -> int:
    return x + y if op == "+" else x - y


def _wrong_result(answer: int, result: int | None, rng: random.Random) -> int:
    """`result` (the wrong operation's) where it is wrong and not negative, else the answer off by
    one or two ("+ 0" as "- 0" is right: off by one instead)."""
    if result is None:
        result = answer + rng.choice((-2, -1, 1, 2))
    return result if result != answer and result >= 0 else answer + 1


def boxed(solution: str) -> str:
    """The answer inside a worked solution's \\boxed{}."""
    return solution.rsplit("\\boxed{", 1)[1].rstrip("}")


def embedded_task(cfg) -> TestbedTask | ArithmeticTask:
    """The embedded task a `zppo_fast.config.TaskConfig` asks for (`kind`), with its settings."""
    if cfg.kind == "testbed":
        return TestbedTask(cfg.max_value, cfg.max_operand, cfg.heldout_fraction, cfg.easy_heldout_fraction, cfg.seed)
    return ArithmeticTask(cfg.max_operand, cfg.num_terms, cfg.heldout_fraction, cfg.num_facts, cfg.seed)
