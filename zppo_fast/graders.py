r"""Graders: a response and a gold answer in, a score in {0, 1} and a verdict out, in batches.

Registered by name, chosen per data set (`get_grader(name, ...)`):

``boxed``        the trainer's verifier, `zppo_fast.reward.grade`: last ``\boxed{}`` vs gold under
                 the paper's rule grader (mathruler's ``grade_answer``).
``choice``       multiple-choice letters, see `ChoiceGrader`.
``math_verify``  Hugging Face's math-verify (optional: ``pip install math-verify``), imported
                 when the grader is built, with a clear message when missing.
``MODULE:FN``    the user's reward function (``my_rewards:exact_match``, ``path/to/file.py:fn``),
                 called per item or batched: the protocol is in `zppo_fast.user_grader`.
``auto``         the paper's routing, per row: rules where the gold answer parses as math or the row
                 is multiple choice, the judge otherwise; a row's own ``grader`` column decides
                 first. See `AutoGrader`.
``judge``        an LLM judge: the paper's judge prompt (Fig. 9) through a teacher
                 `RolloutEngine`, one batched `generate` call per `grade_batch`, temperature 0,
                 512 new tokens; only a strict JSON ``{"verdict": "correct"|"wrong"}`` counts
                 (`prompts.parse_judge_verdict`); anything else scores 0 with verdict "malformed".

Every grader has ``grade_batch(items) -> list[Verdict]`` so an expensive one (the judge) sees a
whole batch at once; the cheap ones simply loop. Graders never raise on model output.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from transformers import PreTrainedTokenizerBase

from zppo_fast.config import ConfigError
from zppo_fast.data import instruction_prompt_ids
from zppo_fast.datasets import CHOICE_LETTERS
from zppo_fast.engine import RolloutEngine, SamplingParams
from zppo_fast.prompts import build_judge_prompt, parse_judge_verdict
from zppo_fast.reward import extract_boxed, final_answer, grade, normalize_answer

__all__ = [
    "GRADERS",
    "ChoiceGrader",
    "GradeItem",
    "Grader",
    "AutoGrader",
    "JudgeGrader",
    "Verdict",
    "get_grader",
    "register_grader",
    "route",
]


@dataclass(frozen=True)
class GradeItem:
    """One response to grade. `options` is the lettered choices text (None for free-form)."""

    question: str
    response: str
    gold: str
    choices: tuple[str, ...] = ()
    options: str | None = None
    grader: str | None = None  # the row's own grader (its data file's grader column), read by AutoGrader


@dataclass(frozen=True)
class Verdict:
    """score: 1.0 or 0.0. verdict: "correct" | "wrong" | "malformed" (judge output unparsable) |
    "error" (the grader raised on this response: score 0.0, counted by `CountingGrader`).
    extracted: the answer the grader read from the response (judge: its raw output; error: the
    exception)."""

    score: float
    verdict: str
    extracted: str
    grader: str = ""  # set by AutoGrader: the grader this item was routed to


class Grader(Protocol):
    name: str

    def grade_batch(self, items: Sequence[GradeItem]) -> list[Verdict]: ...


GRADERS: dict[str, Callable[..., Grader]] = {}


def register_grader(name: str):
    """Class decorator: make `get_grader(name, **kwargs)` build this grader."""

    def wrap(cls):
        cls.name = name
        GRADERS[name] = cls
        return cls

    return wrap


def get_grader(name: str, **kwargs) -> Grader:
    """Build the grader registered as `name`; kwargs go to its constructor (judge: engine, tokenizer).
    "MODULE:FUNCTION" wraps the user's reward function (zppo_fast/user_grader.py)."""
    if ":" in name:
        from zppo_fast.user_grader import FunctionGrader  # it builds on this module's GradeItem and Verdict

        return FunctionGrader(name)
    if name not in GRADERS:
        raise ValueError(f"unknown grader {name!r}; registered: {', '.join(sorted(GRADERS))}")
    return GRADERS[name](**kwargs)


def error_verdict(error: Exception) -> Verdict:
    """A response the grader raised on: scored 0.0, as a wrong one, but marked so it is counted."""
    return Verdict(0.0, "error", f"{type(error).__name__}: {error}")


class CountingGrader:
    """A grader whose "error" verdicts are counted (the trainer's reward/grader_errors) and the
    first of them reported through `log` with the item it was given."""

    def __init__(self, grader: Grader, log: Callable[[str], None]):
        self.grader, self.log = grader, log
        self.name = getattr(grader, "name", type(grader).__name__)
        self.errors, self.seen_one = 0, False

    def grade_batch(self, items: Sequence[GradeItem]) -> list[Verdict]:
        verdicts = self.grader.grade_batch(items)
        for item, v in zip(items, verdicts):
            if v.verdict != "error":
                continue
            self.errors += 1
            if not self.seen_one:
                self.seen_one = True
                self.log(f"zppo_fast: grader {self.name} raised {v.extracted} -- scored 0.0 and counted in "
                         f"reward/grader_errors (only this first one is shown)\n  question: {item.question!r}\n"
                         f"  response: {item.response!r}\n  gold: {item.gold!r}")
        return verdicts

    def pop_errors(self) -> int:
        """The errors counted since the last call."""
        errors, self.errors = self.errors, 0
        return errors


def _verdict(ok: bool, extracted: str) -> Verdict:
    return Verdict(1.0 if ok else 0.0, "correct" if ok else "wrong", extracted)


@register_grader("boxed")
class BoxedGrader:
    """The training verifier (`reward.grade`); `extracted` is the normalized last box."""

    def grade_batch(self, items: Sequence[GradeItem]) -> list[Verdict]:
        return [_verdict(grade(it.response, it.gold) == 1.0, final_answer(it.response)) for it in items]


# A letter, optionally in parentheses, optionally followed by ".", ")" or ":" and the choice's text:
# "B", "(B)", "B.", "B) 12 apples", "\text{B}" (after normalization).
_LETTER_RE = re.compile(r"\(?([a-z])\)?(?:[.):](.*))?", re.DOTALL)


@register_grader("choice")
class ChoiceGrader:
    r"""Multiple choice: the letter in the response's last ``\boxed{}`` must be the gold letter.

    The box may hold the letter alone or decorated ("B", "(B)", "B.", "B) text", "\text{B}";
    case-insensitive) or, when the row has choices, exactly one choice's text (compared after
    `reward.normalize_answer`), which stands for its letter. A letter beyond the row's choices,
    no box, or text matching no (or several) choices is wrong. The gold may be a letter or a
    choice's text, read the same way.
    """

    def grade_batch(self, items: Sequence[GradeItem]) -> list[Verdict]:
        out = []
        for it in items:
            gold = self.letter(it.gold, it.choices)
            box = extract_boxed(it.response)
            got = self.letter(box, it.choices) if box is not None else None
            out.append(_verdict(gold is not None and got == gold, got or ""))
        return out

    @staticmethod
    def letter(text: str | None, choices: Sequence[str] = ()) -> str | None:
        """The choice letter `text` names ("A".."Z"), or None."""
        if not isinstance(text, str):
            return None
        norm = normalize_answer(text)
        if choices:  # a choice's own text stands for its letter (checked first: "a" may be a choice)
            hits = [i for i, c in enumerate(choices) if normalize_answer(c) == norm]
            if len(hits) == 1:
                return CHOICE_LETTERS[hits[0]]
        m = _LETTER_RE.fullmatch(norm)
        if not m:
            return None
        letter = m.group(1).upper()
        index = CHOICE_LETTERS.index(letter)
        if choices and index >= len(choices):
            return None
        if choices and m.group(2) and normalize_answer(m.group(2)) not in ("", normalize_answer(choices[index])):
            return None  # "B) 7" where choice B is 12: the letter and its text disagree
        return letter


@register_grader("math_verify")
class MathVerifyGrader:
    r"""Hugging Face math-verify: parses LaTeX/expressions in the response (it prefers the last
    ``\boxed{}``) and the gold, and checks symbolic equivalence. Needs ``pip install math-verify``."""

    def __init__(self):
        try:
            import math_verify
        except ImportError:
            raise ImportError("the 'math_verify' grader needs the math-verify package: pip install math-verify; "
                              "the 'boxed' grader needs nothing extra") from None
        self._mv = math_verify

    def grade_batch(self, items: Sequence[GradeItem]) -> list[Verdict]:
        out = []
        for it in items:
            try:
                # The gold is wrapped in a box so a bare "1/2" parses as the expression it is.
                gold, got = self._mv.parse(f"\\boxed{{{it.gold}}}"), self._mv.parse(it.response)
                ok = bool(gold) and bool(got) and bool(self._mv.verify(gold, got))
                extracted = str(got[-1]) if got else ""
            except Exception as e:  # noqa: BLE001 - its parser and sympy can raise on odd input: 0.0, counted
                out.append(error_verdict(e))
                continue
            out.append(_verdict(ok, extracted))
        return out


@register_grader("judge")
class JudgeGrader:
    """The paper's LLM judge through a teacher engine (Fig. 9; temperature 0, 512 new tokens).

    `engine` and `tokenizer` are the judge model's (usually the teacher's). The judge prompt is one
    user turn in the judge's chat template, without the student's closing instruction and with
    thinking disabled (`data.instruction_prompt_ids`); a <think> block in its output is dropped
    before the verdict is read (`prompts.parse_judge_verdict`).
    """

    def __init__(self, engine: RolloutEngine | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 max_new_tokens: int = 512, batch_size: int | None = None):
        if engine is None or tokenizer is None:
            raise ValueError("the 'judge' grader needs a judge engine and its tokenizer (the teacher's); "
                             "from the eval CLI pass --judge-model PATH")
        self.engine, self.tokenizer = engine, tokenizer
        self.params = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
        self.batch_size = batch_size  # None: the whole batch in one generate call

    def grade_batch(self, items: Sequence[GradeItem]) -> list[Verdict]:
        prompts = [
            instruction_prompt_ids(self.tokenizer, build_judge_prompt(it.question, it.options, it.response, it.gold))
            for it in items
        ]
        step = self.batch_size or max(len(prompts), 1)
        outputs = [group[0].text for s in range(0, len(prompts), step)
                   for group in self.engine.generate(prompts[s : s + step], self.params)]
        verdicts = []
        for text in outputs:
            parsed = parse_judge_verdict(text)
            if parsed is None:
                verdicts.append(Verdict(0.0, "malformed", text))
            else:
                verdicts.append(_verdict(parsed, text))
        return verdicts


# Words the rule grader reads in a math answer (mathruler drops these units and reads the scales),
# so a gold answer holding them is still math: "66 cm", "5 hours", "30 degrees", "2 million".
_RULE_WORDS_RE = re.compile(
    r"(?:degree|centimeter|cm|meter|mile|second|minute|hour|day|week|month|year|foot|feet|inch|yard)(?:es)?s?"
    r"|percent|million|billion|trillion"
)


def route(gold: str, choices: Sequence[str] = ()) -> str:
    r"""The grader the paper's routing gives a row without its own: "choice" for a multiple-choice
    row, "boxed" (mathruler's rules) when the gold answer parses as math, "judge" otherwise.

    Parses as math: after `normalize_answer` (lowercase, `\text{}` unwrapped, no spaces) and with
    LaTeX commands (``\frac``, ``\sqrt``, ``\pi`` ...) and the units the rule grader reads removed,
    no two letters stand together -- numbers, fractions, expressions in one-letter variables,
    tuples, intervals. Words ("Paris", "yes", "2 apples", "mitochondria") go to the judge.
    """
    if choices:
        return "choice"
    s = re.sub(r"\\[a-z]+", "", normalize_answer(gold))
    s = _RULE_WORDS_RE.sub("", s)
    return "judge" if re.search(r"[a-z]{2,}", s) else "boxed"


@register_grader("auto")
class AutoGrader:
    """Rules first, the LLM judge only where rules cannot decide (the paper's grading).

    Each item goes to its row's own grader (`GradeItem.grader`, a data file's grader column) or, if
    the row names none, to `route(gold, choices)`. One `grade_batch` calls each grader once with
    all of its items, so the judge sees the batch's free-form rows in one batched call and never
    sees the others. `engine` / `tokenizer`: the judge's (None: a row that needs the judge is an
    error naming it). Every verdict records the grader that gave it (`Verdict.grader`).
    """

    def __init__(self, engine: RolloutEngine | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 max_new_tokens: int = 512, batch_size: int | None = None):
        self._judge = {"engine": engine, "tokenizer": tokenizer, "max_new_tokens": max_new_tokens,
                       "batch_size": batch_size}
        self._graders: dict[str, Grader] = {}

    @staticmethod
    def route(item: GradeItem) -> str:
        return item.grader or route(item.gold, item.choices)

    def needs_judge(self, items: Sequence[GradeItem]) -> bool:
        return any(self.route(it) == "judge" for it in items)

    def _grader(self, name: str, example: GradeItem) -> Grader:
        if name not in self._graders:
            if name == "judge" and self._judge["engine"] is None:
                raise ConfigError(f"the gold answer {example.gold!r} of question {example.question[:80]!r} needs the "
                                 "LLM judge (free-form, or the row's grader column says so), and no judge engine was "
                                 "given: the trainer's judge is the teacher; from the eval CLI pass --judge-model PATH")
            self._graders[name] = get_grader(name, **(self._judge if name == "judge" else {}))
        return self._graders[name]

    def grade_batch(self, items: Sequence[GradeItem]) -> list[Verdict]:
        routes = [self.route(it) for it in items]
        out: list[Verdict | None] = [None] * len(items)
        for name in dict.fromkeys(routes):  # each grader once, in first-seen order
            idx = [i for i, r in enumerate(routes) if r == name]
            verdicts = self._grader(name, items[idx[0]]).grade_batch([items[i] for i in idx])
            for i, v in zip(idx, verdicts):
                out[i] = dataclasses.replace(v, grader=name)
        return out
