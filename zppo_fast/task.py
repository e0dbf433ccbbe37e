"""The embedded synthetic task: arithmetic word problems with a verifiable \\boxed{} answer.

A question id fully determines its problem, so the replay buffer stores ids only and any rank can
rebuild the text. Ids index the product space (fact, wording): a *fact* is an expression such as
`17 - 5`; the held-out split takes whole facts (by a hash), so no held-out fact is ever trained on
under another wording.

Difficulty knobs: `max_operand` (operands in [0, max_operand]) and `num_terms` (2 or more operands
joined by + and -, every partial result kept non-negative).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

NAMES = ("Ann", "Bob", "Cai", "Dee", "Eli", "Fay")
ITEMS = ("pens", "cards", "shells", "coins")


@dataclass(frozen=True)
class Problem:
    """One question as the trainer sees it; the replay buffer keeps only `id`."""

    id: int
    question: str  # what the student is asked, before the closing instruction
    answer: str
    solution: str = ""  # a worked solution in the closing instruction's format ("" when unknown: data files)
    images: tuple[str | bytes, ...] = ()  # paths or encoded bytes (zppo_fast.datasets.Record.images)
    choices: tuple[str, ...] = ()  # multiple choice: the options, already lettered in `question`
    grader: str | None = None  # a data file row's own grader (its grader column), read by the "auto" grader
    family: str = ""  # the testbed's "easy" | "hard" (zppo_fast/testbed.py); "" elsewhere


class ArithmeticTask:
    """Deterministic generator of problems by id; `train_ids()` / `heldout_ids()` split by fact."""

    def __init__(
        self, max_operand: int = 20, num_terms: int = 2, heldout_fraction: float = 0.1, num_facts: int = 2048, seed: int = 0
    ):
        if max_operand < 1 or num_terms < 2 or num_facts < 1 or not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(
                f"bad task settings: max_operand={max_operand} (>= 1), num_terms={num_terms} (>= 2), "
                f"heldout_fraction={heldout_fraction} (in [0, 1)), num_facts={num_facts} (>= 1)"
            )
        self.max_operand, self.num_terms, self.seed = max_operand, num_terms, seed
        self.heldout_fraction = heldout_fraction
        self._wordings = len(NAMES) * len(ITEMS)
        # Facts are seeded draws, one per fact index (repeats are harmless: a fact's split is a
        # function of its content, so a repeat lands in the same split).
        self.num_facts = num_facts
        self._facts = [self._make_fact(i) for i in range(self.num_facts)]
        self._train_ids = self.train_ids()

    def _make_fact(self, index: int) -> tuple[tuple[str, int], ...]:
        rng = random.Random(f"{self.seed}:{self.max_operand}:{self.num_terms}:{index}")
        value = rng.randint(0, self.max_operand)
        terms: list[tuple[str, int]] = [("", value)]
        for _ in range(self.num_terms - 1):
            op = rng.choice("+-")
            b = rng.randint(0, self.max_operand if op == "+" else min(value, self.max_operand))
            value = value + b if op == "+" else value - b
            terms.append((op, b))
        return tuple(terms)

    def _is_heldout(self, fact: tuple[tuple[str, int], ...]) -> bool:
        digest = hashlib.sha256(repr(fact).encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2**64 < self.heldout_fraction

    def train_ids(self) -> list[int]:
        return [i for i in range(len(self)) if not self._is_heldout(self._facts[i // self._wordings])]

    def heldout_ids(self) -> list[int]:
        return [i for i in range(len(self)) if self._is_heldout(self._facts[i // self._wordings])]

    def __len__(self) -> int:
        return self.num_facts * self._wordings

    shared_warmup = True  # the student's and the teacher's warm-ups see the same data (zppo_fast/sft.py)

    def heldout_sets(self, size: int, seed: int = 0) -> dict[str, list[int]]:
        """The trainer's held-out evaluation: `size` seeded held-out ids (a sample, not a prefix, as
        consecutive ids are one fact in its wordings), sorted."""
        ids = self.heldout_ids()
        return {"heldout": sorted(random.Random(seed).sample(ids, min(size, len(ids))))}

    def problem(self, qid: int) -> Problem:
        if not 0 <= qid < len(self):
            raise KeyError(f"question id {qid} is outside the task's range [0, {len(self)})")
        fact = self._facts[qid // self._wordings]
        name = NAMES[qid % self._wordings // len(ITEMS)]
        item = ITEMS[qid % len(ITEMS)]
        start = fact[0][1]
        steps = ", ".join(f"gets {b} more" if op == "+" else f"loses {b}" for op, b in fact[1:])
        question = f"{name} has {start} {item}, {steps}. How many {item} does {name} have now?"
        expr = f"{start}" + "".join(f"{op}{b}" for op, b in fact[1:])
        answer = str(eval(expr))
        return Problem(qid, question, answer, f"<think>{expr}={answer}</think>\n\\boxed{{{answer}}}")

    def tokenizer_texts(self, size: int = 4000, seed: int = 0) -> list[str]:
        """Questions and worked solutions of `size` seeded ids, for the in-process tokenizer's corpus."""
        ids = random.Random(seed).sample(range(len(self)), min(size, len(self)))
        return [t for i in ids for t in (self.problem(i).question, self.problem(i).solution)]

    def warmup_example(self, role: str, rng: random.Random, reading_share: float = 0.0) -> tuple[int, str, str]:
        """One supervised example `(question id, question, worked solution)`: the same data for the
        student and the teacher (whose longer warm-up continues the student's); `reading_share` is the
        testbed's (zppo_fast/testbed.py) and has no meaning here."""
        p = self.problem(rng.choice(self._train_ids))
        return p.id, p.question, p.solution
