"""The paper's teacher-guided baselines, minus the trainer: Hint, Prefix and off-policy distillation data.

Each baseline is a different way to let a frozen teacher help on the hard questions (r̄_x < zppo.hard_threshold, 0.5):

    Hint    the teacher turns one of its correct rollouts into an answer-free hint (Fig. 19);
            the student answers  x || <hint>...</hint>  as its own group.
    Prefix  the first 40% of a teacher-correct rollout's tokens are forced at the start of the
            student's answer; the student continues it as its own group; the forced tokens are
            masked out of the loss (`prefix_target_mask`; the trainer gets the same mask by
            appending the prefix to the rollout's prompt ids, so it is context, never a target).
    Distill every step, G_T teacher rollouts per question; the graded-correct ones become
            (prompt ids, response ids) the student is trained on with the token-level JSD
            (`zppo_fast.kernels.fused_linear_jsd`); teacher and student share one tokenizer.

The trainer runs them as `rl.algo` grpo_replay_hint, grpo_replay_prefix and off_distill[_replay]
(zppo_fast/train.py; the table in zppo_fast/zppo.py). On-policy distillation (on_distill[_replay])
needs no data step here: the student's own rollouts are scored by the teacher inside the loss.

`HintPrefixBuilder` mirrors `zppo_fast.zppo.Reformulator`'s call (problems, student texts,
rewards, cap, step) -> (instances, metrics) and its teacher seeds, but selects as the paper
defines the baselines: X_aug is the `cap` hard questions of lowest accuracy (ties by batch index,
as in `zppo_fast.selection`), chosen BEFORE the teacher runs; the teacher is asked only for those,
and a question of X_aug whose teacher rollouts are all wrong is skipped (counted in
`<kind>/skipped_teacher_wrong`), its slot not refilled from further down the list. (ZPPO instead
fills its cap from what the teacher gets back; with NCQ on, its pre-cap questions are also known
before the teacher runs, and only they are asked: `zppo_fast.selection.teacher_questions`.)

Choices the paper leaves open, made here:

* One teacher-correct rollout per question, drawn uniformly (seeded by `seed` and `step`).
* Hint output: the text without its reasoning (`prompts.strip_thinking`: after the last
  `</think>`, before an unclosed `<think>`), then
  inside the last complete `<hint>...</hint>` pair if there is one (else after a lone opening
  `<hint>`), stripped; leftover `<hint>` / `</hint>` tags are removed so the student's
  `<hint>` block cannot be broken. Sampled greedily by default, as the compression is.
* Leaking hints are DROPPED, never repaired, and the slot is not refilled (the cap is an
  upper bound); drops are counted in `hint/dropped_leak` and `hint/dropped_empty`. A hint leaks
  (`hint_leak`) when it
    - contains `\\boxed` at all (even unbalanced), or
    - contains a number that the verifier grades equal to the gold answer (`grade` on
      `\\boxed{number}`; numbers are maximal runs such as 7, -7, 7.0, 1,000, 3/4, so "17" or
      "3.7" do not match a gold 7, while "7.0" and "7." do), or
    - contains the gold answer's text (or its normalized form) as a standalone token: not
      glued to a letter, digit or underscore on a side where the answer itself starts/ends
      with one (case-sensitive; so a gold "x+1" is found in "(x+1)"; a one-letter gold such as
      "B" drops every hint using "B" as a word -- deliberately conservative).
  Not detected: answers spelled out in words ("seven") or implied by a computation.
* Prefix length: floor(prefix_fraction * len(response)) tokens of the teacher's response
  re-tokenized with the STUDENT's tokenizer (text, special tokens removed, so no EOS). A
  question whose prefix would be empty is skipped (`prefix/dropped_empty`).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from zppo_fast import prompts
from zppo_fast.data import chat_prompt_ids, instruction_prompt_ids
from zppo_fast.engine import RolloutEngine, SamplingParams
from zppo_fast.reward import grade, normalize_answer
from zppo_fast.selection import HARD_THRESHOLD, hardest
from zppo_fast.task import Problem
from zppo_fast.zppo import GradeFn, boxed_grade, teacher_rollouts

KINDS = ("hint", "prefix")

# A maximal number: optional sign, digits with optional thousands groups, decimals, a /fraction.
# Not preceded by a word char or a '.', not followed by a word char or a '.digit', so the "7"
# inside "17", "x7", "3.7" or "7.5" is never a match on its own.
_NUMBER_RE = re.compile(r"(?<![\w.])[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?(?!\w|\.\d)", re.ASCII)
_HINT_TAG_RE = re.compile(r"</?hint>")


@dataclass(frozen=True)
class GuidanceSettings:
    """Teacher sampling for Hint / Prefix / distillation. Names shared with `ZPPOConfig` mean the same."""

    teacher_group_size: int = 4  # G_T fresh teacher rollouts per hard question, every visit
    teacher_temperature: float = 1.0
    teacher_top_p: float = 1.0
    teacher_max_new_tokens: int = 24
    hint_temperature: float = 0.0  # unspecified by the paper; greedy, like the compressions
    hint_max_new_tokens: int = 512
    prefix_fraction: float = 0.4  # Prefix: share of the teacher's response forced on the student
    hard_threshold: float = HARD_THRESHOLD  # hard: plain-rollout accuracy below this

    @classmethod
    def from_config(cls, cfg) -> GuidanceSettings:
        """The settings of the same names in a `zppo_fast.config.ZPPOConfig`."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


@dataclass
class GuidedInstance:
    """One Hint or Prefix prompt for the student (its G_S rollouts form their own group)."""

    question: int  # index of the question in the step's batch
    kind: str  # "hint" | "prefix"
    text: str  # the user turn without the closing instruction (hint: x || <hint>..</hint>; prefix: x)
    prompt_ids: list[int]  # chat-formatted student prompt ids, closing instruction included
    prefix_ids: list[int] = field(default_factory=list)  # forced start of the answer (prefix only)


@dataclass
class DistillExample:
    """One graded-correct teacher rollout, in the shared tokenizer, for the JSD loss."""

    question: int  # index of the question in the step's batch
    prompt_ids: list[int]  # chat-formatted prompt ids, closing instruction included
    response_ids: list[int]  # the teacher's sampled tokens (EOS included when it stopped)


# --- Hint ------------------------------------------------------------------------------------


def parse_hint(teacher_output: str) -> str:
    """The hint inside the teacher's output (module docstring: rules); never raises."""
    text = prompts.strip_thinking(teacher_output)
    close = text.rfind("</hint>")
    open_ = text.rfind("<hint>", 0, close) if close != -1 else -1
    if open_ != -1:
        text = text[open_ + len("<hint>") : close]
    elif "<hint>" in text:
        text = text[text.rfind("<hint>") + len("<hint>") :]
    return _HINT_TAG_RE.sub("", text).strip()


def _standalone(needle: str, hay: str) -> bool:
    """`needle` occurs in `hay` not glued to a word char on a side where `needle` has one."""
    before = r"(?<![\w.])" if re.match(r"\w", needle, re.ASCII) else ""
    after = r"(?!\w|\.\d)" if re.search(r"\w$", needle, re.ASCII) else ""
    return re.search(before + re.escape(needle) + after, hay, re.ASCII) is not None


def hint_leak(hint: str, gold: str) -> str | None:
    """Why `hint` gives away `gold`: "boxed", "answer", or None when it does not (rules above)."""
    if "\\boxed" in hint:
        return "boxed"
    if any(grade(f"\\boxed{{{m.group()}}}", gold) == 1.0 for m in _NUMBER_RE.finditer(hint)):
        return "answer"
    forms = {gold.strip(), normalize_answer(gold)} - {""}
    if any(_standalone(f, hint) for f in forms):
        return "answer"
    return None


# --- Prefix ----------------------------------------------------------------------------------


def forced_prefix(response_ids: Sequence[int], fraction: float) -> list[int]:
    """The first floor(fraction * len(response_ids)) tokens: the Prefix baseline's forced start."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"prefix fraction must be in (0, 1), got {fraction}")
    return list(response_ids[: math.floor(fraction * len(response_ids))])


def prefix_target_mask(record, n_forced: int) -> torch.Tensor:
    """Loss mask of one Prefix rollout, aligned like `batch.MicroBatch.target_mask` ((T-1,) bool).

    `record` has `prompt_ids` and `response_ids` (a `batch.Rollout` does), the response starting
    with the `n_forced` forced tokens; T = len(prompt) + len(response). Position t predicts token
    t + 1; it is True only where t + 1 is one of the student's own (continuation) tokens, so the
    forced prefix and the prompt carry no gradient.
    """
    n_prompt, n_resp = len(record.prompt_ids), len(record.response_ids)
    if not 0 <= n_forced <= n_resp:
        raise ValueError(f"n_forced must be in [0, {n_resp}] (the response length), got {n_forced}")
    if n_prompt < 1:
        raise ValueError("the record has an empty prompt: its first response token has no predicting position")
    mask = torch.zeros(n_prompt + n_resp - 1, dtype=torch.bool)
    mask[n_prompt + n_forced - 1 :] = True
    return mask


# --- The builder -----------------------------------------------------------------------------


class HintPrefixBuilder:
    """Builds one step's Hint or Prefix prompts from the student's plain rollouts and a frozen teacher."""

    def __init__(
        self,
        kind: str,
        teacher: RolloutEngine,
        teacher_tokenizer: PreTrainedTokenizerBase,
        student_tokenizer: PreTrainedTokenizerBase,
        settings: GuidanceSettings = GuidanceSettings(),
        seed: int = 0,
        processor: Any = None,
        grade_fn: GradeFn = boxed_grade,
    ):
        """`processor`: the teacher's, when it is a vision-language model (its rollouts then see the
        question's images; the hint-writing prompt reads a rollout's text and stays text-only);
        `grade_fn`: how its rollouts are graded (the trainer's grader; boxed by default)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        forced_prefix([], settings.prefix_fraction)  # validates the fraction up front
        self.kind, self.teacher, self.settings, self.seed = kind, teacher, settings, seed
        self.teacher_tokenizer, self.student_tokenizer = teacher_tokenizer, student_tokenizer
        self.processor, self.grade_fn = processor, grade_fn

    def __call__(
        self,
        problems: list[Problem],
        student_texts: list[list[str]],
        student_rewards: list[list[float]],
        cap: int,
        step: int,
    ) -> tuple[list[GuidedInstance], dict[str, float]]:
        """problems [Q]; student_texts / student_rewards [Q][G_S]; returns the ordered instances."""
        k, cfg, rng = self.kind, self.settings, random.Random(f"{self.seed}:{step}")
        accuracy = [sum(r) / len(r) for r in student_rewards]
        hard = [i for i, a in enumerate(accuracy) if a < cfg.hard_threshold]
        metrics = {f"{k}/hard_frac": len(hard) / max(len(problems), 1), f"{k}/teacher_tokens": 0.0}

        # X_aug: the `cap` hardest questions (ties stay in batch order, as pre-cap), and
        # fresh teacher rollouts for those only (same seeds as zppo.Reformulator).
        aug = hardest(accuracy, cap, cfg.hard_threshold)
        correct: dict[int, list[str]] = {i: [] for i in aug}
        if aug:
            params = SamplingParams(
                n=cfg.teacher_group_size,
                temperature=cfg.teacher_temperature,
                top_p=cfg.teacher_top_p,
                max_new_tokens=cfg.teacher_max_new_tokens,
                seed=self.seed * 1_000_003 + step,
            )
            _, groups, right = teacher_rollouts(self.teacher, self.teacher_tokenizer, [problems[i] for i in aug],
                                                params, self.processor, self.grade_fn)
            for i, group, ok in zip(aug, groups, right):
                metrics[f"{k}/teacher_tokens"] += sum(len(s.token_ids) for s in group)
                correct[i] = [s.text for s, r in zip(group, ok) if r]
            # over the questions asked (X_aug), which are the hard ones the cap admits
            metrics[f"{k}/teacher_acc_on_hard"] = sum(map(len, correct.values())) / (len(aug) * params.n)

        picked = {i: rng.choice(correct[i]) for i in aug if correct[i]}  # all-wrong teacher: skipped
        metrics[f"{k}/eligible"] = float(len(picked))
        metrics[f"{k}/skipped_teacher_wrong"] = float(len(aug) - len(picked))
        out = self._hints(problems, picked, metrics, step) if k == "hint" else self._prefixes(problems, picked, metrics)
        metrics[f"{k}/built"] = float(len(out))
        return out, metrics

    def _hints(self, problems, picked: dict[int, str], metrics, step) -> list[GuidedInstance]:
        metrics["hint/dropped_leak"] = metrics["hint/dropped_empty"] = 0.0
        if not picked:
            return []
        cfg = self.settings
        params = SamplingParams(
            n=1,
            temperature=cfg.hint_temperature,
            top_p=1.0,
            max_new_tokens=cfg.hint_max_new_tokens,
            seed=self.seed * 7_919 + step,
        )
        requests = [
            instruction_prompt_ids(self.teacher_tokenizer, prompts.build_hint_prompt(t))
            for t in picked.values()
        ]
        outs = self.teacher.generate(requests, params)
        instances = []
        for i, group in zip(picked, outs):
            metrics["hint/teacher_tokens"] += len(group[0].token_ids)
            hint = parse_hint(group[0].text)
            if not hint:
                metrics["hint/dropped_empty"] += 1
                continue
            if hint_leak(hint, problems[i].answer) is not None:
                metrics["hint/dropped_leak"] += 1
                continue
            text = prompts.with_hint(problems[i].question, hint)
            instances.append(GuidedInstance(i, "hint", text, chat_prompt_ids(self.student_tokenizer, text)))
        return instances

    def _prefixes(self, problems, picked: dict[int, str], metrics) -> list[GuidedInstance]:
        metrics["prefix/dropped_empty"] = metrics["prefix/forced_tokens"] = 0.0
        instances = []
        for i, response in picked.items():
            ids = self.student_tokenizer(response.strip(), add_special_tokens=False)["input_ids"]
            prefix = forced_prefix(ids, self.settings.prefix_fraction)
            if not prefix:
                metrics["prefix/dropped_empty"] += 1
                continue
            metrics["prefix/forced_tokens"] += len(prefix)
            question = problems[i].question
            instances.append(
                GuidedInstance(i, "prefix", question, chat_prompt_ids(self.student_tokenizer, question), prefix)
            )
        return instances


# --- Off-policy distillation data ------------------------------------------------------------


def check_shared_vocab(student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise unless both tokenizers map the same strings to the same ids (the JSD compares the
    two models' distributions id by id, so they must share one vocabulary)."""
    s, t = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s != t:
        diff = sorted(set(s.items()) ^ set(t.items()))[:3]
        raise ValueError(
            f"distillation needs one shared vocabulary, but the student's ({len(s)} entries) and the "
            f"teacher's ({len(t)}) tokenizers differ, e.g. {diff}"
        )


def distillation_data(
    teacher: RolloutEngine,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    settings: GuidanceSettings,
    step: int,
    seed: int = 0,
    grade_fn: GradeFn = boxed_grade,
    processor: Any = None,
) -> tuple[list[DistillExample], dict[str, float]]:
    """Off-policy distillation's data step: G_T fresh teacher rollouts per question, graded by
    `grade_fn` (the trainer's grader; boxed by default); the correct ones (in question order, then
    sample order) as examples. `tokenizer` is the shared one. `processor`: the teacher's, when it
    is a vision-language model; its rollouts then see the question's images (`teacher_rollouts`),
    and the trainer pairs each response with the student's own prompt of the question, images
    included, which the teacher's scoring forward reads too."""
    params = SamplingParams(
        n=settings.teacher_group_size,
        temperature=settings.teacher_temperature,
        top_p=settings.teacher_top_p,
        max_new_tokens=settings.teacher_max_new_tokens,
        seed=seed * 1_000_003 + step,
    )
    prompts_, groups, right = teacher_rollouts(teacher, tokenizer, problems, params, processor, grade_fn)
    examples, tokens = [], 0
    for i, (q, group, ok) in enumerate(zip(prompts_, groups, right)):
        tokens += sum(len(s.token_ids) for s in group)
        examples += [DistillExample(i, q.input_ids, list(s.token_ids)) for s, r in zip(group, ok) if r]
    n = max(len(problems) * params.n, 1)
    metrics = {
        "distill/teacher_acc": len(examples) / n,
        "distill/examples": float(len(examples)),
        "distill/questions_covered": float(len({e.question for e in examples})),
        "distill/teacher_tokens": float(tokens),
    }
    return examples, metrics
