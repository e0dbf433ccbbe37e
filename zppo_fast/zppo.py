"""ZPPO's teacher-in-the-prompt step: hard questions -> teacher rollouts -> compressed candidates
-> BCQ / NCQ prompts (Algorithm 1, steps 3-5 of arXiv 2606.18216).

The teacher only ever writes text that ends up inside the student's prompt. Its rollouts are
graded, its compressions are parsed, and both are re-tokenized with the *student's* tokenizer as
part of a prompt; the student's loss mask covers the student's own completion only, so no
teacher token carries gradient.

The `algo` switch picks the paper's Table 3 rows and its baselines (Tables 1-4), all run by the
same step in zppo_fast/train.py:

    algo                 replay   teacher's part                                   loss
    grpo                   -      -                                                policy
    grpo_replay            +      -                                  (GRPO-dagger) policy
    grpo_both              -      BCQ + NCQ prompts                                policy
    grpo_replay_bcq        +      BCQ prompts                                      policy
    grpo_replay_ncq        +      NCQ prompts                                      policy
    zppo                   +      BCQ + NCQ prompts                                policy
    grpo_replay_hint       +      answer-free hint in the prompt (Hint)            policy
    grpo_replay_prefix     +      40% of its correct rollout forced (Prefix)       policy
    off_distill            -      its graded-correct rollouts are the batch        jsd
    off_distill_replay     +      its graded-correct rollouts are the batch        jsd
    on_distill             -      scores every token of the student's rollouts     jsd
    on_distill_replay      +      scores every token of the student's rollouts     jsd

"policy" is the clipped surrogate on advantages (I optimizer steps per rollout step); "jsd" is
the per-token generalized JSD to the teacher's distribution (`zppo.distill_beta`), one optimizer
step per rollout step (stated for the paper's off-policy baseline; on-policy distillation takes the
same single step, as we found nothing saying otherwise). BCQ/NCQ prompts come from `Reformulator` (below), Hint/Prefix prompts
from `zppo_fast.baselines.HintPrefixBuilder`, distillation data from
`zppo_fast.baselines.distillation_data`. With a buffer, every algo replays and admits/graduates
by its plain rollouts alike.

Choices the paper leaves open (documented here, tested in tests/test_zppo.py):
* `compression = "none"` inserts the raw candidate text (the CPU demo's tiny teacher cannot follow
  the summary instruction; its rollouts are one line anyway). The default is the paper's prompt.
* A wrong rollout without a \\boxed{} answer stays an NCQ candidate but is left out of the listed
  wrong answers (`zppo_fast.prompts.build_ncq`); its answer is the verifier's NO_ANSWER marker.
* Empty or whitespace-only candidate texts are inserted as they are (an empty candidate block):
  the student still sees that such a rollout was wrong.

The teacher's rollouts of a question (`teacher_rollouts`, shared by `Reformulator`,
`zppo_fast.baselines.HintPrefixBuilder` and `zppo_fast.baselines.distillation_data`) are graded by
the trainer's grader (`data.grader`, through `grader_scores`; the boxed grader by default), so a
multiple-choice teacher answer counts when its letter is right. A vision-language teacher (one given
its processor) sees the question's images, as the student does; a text teacher sees the question's
text only, with today's exact prompt ids. The compression (and hint-writing) prompts stay text-only:
they ask the teacher to summarize a candidate's *text*, which is all they read; the images come back
in the student's BCQ / NCQ prompt, which is built on the question and keeps them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from zppo_fast import prompts
from zppo_fast.config import ZPPOConfig
from zppo_fast.data import chat_prompt_ids, instruction_prompt_ids
from zppo_fast.engine import RolloutEngine, Sample, SamplingParams
from zppo_fast.file_task import grade_item
from zppo_fast.graders import Grader
from zppo_fast.reward import boxed_answer, final_answer, grade
from zppo_fast.selection import aug_cap, replay_count, select_reformulations, teacher_questions  # noqa: F401 (public here)
from zppo_fast.task import Problem
from zppo_fast.vlm import VLMPrompt, vlm_prompt

# Scores in {0, 1} of texts[k] as an answer to problems[k], one batched call.
GradeFn = Callable[[Sequence[Problem], Sequence[str]], list[float]]


def boxed_grade(problems: Sequence[Problem], texts: Sequence[str]) -> list[float]:
    """The default GradeFn: the last \\boxed{} answer against the gold answer."""
    return [grade(t, p.answer) for p, t in zip(problems, texts)]


def grader_scores(grader: Grader) -> GradeFn:
    """The GradeFn of a `zppo_fast.graders` grader (the trainer's `data.grader`): each text graded as
    the student's rollouts are, with the problem's choices (`file_task.grade_item`)."""
    def scores(problems: Sequence[Problem], texts: Sequence[str]) -> list[float]:
        return [v.score for v in grader.grade_batch([grade_item(p, t) for p, t in zip(problems, texts)])]
    return scores


def teacher_rollouts(teacher: RolloutEngine, tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem],
                     params: SamplingParams, processor: Any = None, grade_fn: GradeFn = boxed_grade,
                     ) -> tuple[list[VLMPrompt], list[list[Sample]], list[list[bool]]]:
    """`params.n` teacher rollouts of each problem's question, graded: its prompts [Q], samples
    [Q][n] and correctness [Q][n]. With `processor` (a vision-language teacher) each prompt is built
    by `vlm_prompt`, the question's images in front of its text, and the images go to the engine;
    without one the prompt is the text chat prompt (`chat_prompt_ids`), no images."""
    if not problems:
        return [], [], []
    if processor is None:
        prompts_ = [VLMPrompt(chat_prompt_ids(tokenizer, p.question), None) for p in problems]
        groups = teacher.generate([q.input_ids for q in prompts_], params)
    else:
        prompts_ = [vlm_prompt(processor, p.question, p.images) for p in problems]
        groups = teacher.generate([q.input_ids for q in prompts_], params, images=[p.images for p in problems])
    flat = [(p, s.text) for p, group in zip(problems, groups) for s in group]
    scores = iter(grade_fn([p for p, _ in flat], [t for _, t in flat]))
    return prompts_, groups, [[next(scores) == 1.0 for _ in group] for group in groups]


@dataclass(frozen=True)
class Algo:
    replay: bool
    kinds: tuple[str, ...] = ()  # guided prompts built: ("bcq", "ncq") subset | ("hint",) | ("prefix",)
    loss: str = "policy"  # policy | off_distill | on_distill

    @property
    def distill(self) -> bool:
        return self.loss != "policy"

    @property
    def teacher(self) -> bool:
        return bool(self.kinds) or self.distill


ALGOS = {
    "grpo": Algo(False),
    "grpo_replay": Algo(True),
    "grpo_both": Algo(False, ("bcq", "ncq")),
    "grpo_replay_bcq": Algo(True, ("bcq",)),
    "grpo_replay_ncq": Algo(True, ("ncq",)),
    "zppo": Algo(True, ("bcq", "ncq")),
    "grpo_replay_hint": Algo(True, ("hint",)),
    "grpo_replay_prefix": Algo(True, ("prefix",)),
    "off_distill": Algo(False, loss="off_distill"),
    "off_distill_replay": Algo(True, loss="off_distill"),
    "on_distill": Algo(False, loss="on_distill"),
    "on_distill_replay": Algo(True, loss="on_distill"),
}


@dataclass
class Reformulation:
    question: int  # index of the question in the step's batch
    kind: str  # "bcq" | "ncq"
    text: str  # the reformulated prompt, without the closing instruction
    candidate_answers: set[str] = field(default_factory=set)  # to measure copying


class Reformulator:
    """Builds one step's BCQ/NCQ prompts from the student's plain rollouts and a frozen teacher."""

    def __init__(self, teacher: RolloutEngine, teacher_tokenizer: PreTrainedTokenizerBase, cfg: ZPPOConfig,
                 kinds: tuple[str, ...], seed: int = 0, processor: Any = None, grade_fn: GradeFn = boxed_grade):
        """`processor`: the teacher's, when it is a vision-language model (it then sees the question's
        images); `grade_fn`: how its rollouts are graded (the trainer's grader; boxed by default)."""
        if cfg.compression not in ("teacher", "none"):
            raise ValueError(f"zppo.compression must be 'teacher' or 'none', got {cfg.compression!r}")
        self.teacher, self.tokenizer, self.cfg, self.kinds, self.seed = teacher, teacher_tokenizer, cfg, kinds, seed
        self.processor, self.grade_fn = processor, grade_fn

    def __call__(self, problems: list[Problem], student_texts: list[list[str]], student_rewards: list[list[float]],
                 cap: int, step: int) -> tuple[list[Reformulation], dict[str, float]]:
        """problems [Q]; student_texts / student_rewards [Q][G_S]; returns the ordered instances."""
        cfg, rng = self.cfg, random.Random(f"{self.seed}:{step}")
        accuracy = [sum(r) / len(r) for r in student_rewards]
        hard = [i for i, a in enumerate(accuracy) if a < cfg.hard_threshold]
        metrics = {"zppo/hard_frac": len(hard) / max(len(problems), 1), "zppo/teacher_tokens": 0.0}

        # Fresh teacher rollouts, graded by the same verifier, for the hard questions whose candidates
        # can be used: with NCQ on, the ones pre-cap keeps (selection.teacher_questions).
        asked = teacher_questions(accuracy, cap, self.kinds, cfg.hard_threshold)
        metrics["zppo/teacher_questions"] = float(len(asked))
        teacher_correct: dict[int, list[str]] = {i: [] for i in asked}
        if asked:
            params = SamplingParams(n=cfg.teacher_group_size, temperature=cfg.teacher_temperature,
                                    top_p=cfg.teacher_top_p, max_new_tokens=cfg.teacher_max_new_tokens,
                                    seed=self.seed * 1_000_003 + step)
            _, groups, right = teacher_rollouts(self.teacher, self.tokenizer, [problems[i] for i in asked], params,
                                                self.processor, self.grade_fn)
            n_right = 0
            for i, group, ok in zip(asked, groups, right):
                for s, r in zip(group, ok):
                    metrics["zppo/teacher_tokens"] += len(s.token_ids)
                    if r:
                        teacher_correct[i].append(s.text)
                        n_right += 1
            metrics["zppo/teacher_acc_on_hard"] = n_right / (len(asked) * cfg.teacher_group_size)  # over those asked

        wrong = [[t for t, r in zip(texts, rewards) if r < 1.0] for texts, rewards in zip(student_texts, student_rewards)]
        eligible = [bool(teacher_correct.get(i)) and bool(wrong[i]) for i in range(len(problems))]
        metrics["zppo/bcq_eligible"] = float(sum(eligible))
        chosen = select_reformulations(accuracy, eligible, cap, kinds=self.kinds, hard_threshold=cfg.hard_threshold)

        # Candidates: BCQ one teacher-correct + one student-wrong (uniform); NCQ every wrong rollout.
        plans = []
        for i, kind in chosen:
            if kind == "bcq":
                plans.append((i, kind, [rng.choice(teacher_correct[i]), rng.choice(wrong[i])]))
            else:
                plans.append((i, kind, list(wrong[i])))
        raw = sorted({t for _, _, texts in plans for t in texts})
        summaries = dict(zip(raw, self.compress(raw, metrics, step)))

        out = []
        for i, kind, texts in plans:
            question, cands = problems[i].question, [summaries[t] for t in texts]
            if kind == "bcq":
                text = prompts.build_bcq(question, cands[0], cands[1], rng)
            else:
                text = prompts.build_ncq(question, cands, [boxed_answer(t) for t in texts])
            out.append(Reformulation(i, kind, text, {final_answer(t) for t in texts}))
        metrics["zppo/bcq_built"] = float(sum(r.kind == "bcq" for r in out))
        metrics["zppo/ncq_built"] = float(sum(r.kind == "ncq" for r in out))
        return out, metrics

    def compress(self, texts: list[str], metrics: dict[str, float], step: int) -> list[str]:
        """The teacher's summary of each candidate under the paper's compression prompt."""
        if self.cfg.compression == "none" or not texts:
            return [t.strip() for t in texts]
        params = SamplingParams(n=1, temperature=self.cfg.compression_temperature, top_p=1.0,
                                max_new_tokens=self.cfg.compression_max_tokens, seed=self.seed * 7_919 + step)
        ids = [instruction_prompt_ids(self.tokenizer, prompts.build_compression_prompt(t)) for t in texts]
        outs = self.teacher.generate(ids, params)
        metrics["zppo/teacher_tokens"] += sum(len(g[0].token_ids) for g in outs)
        return [prompts.parse_summary(g[0].text) for g in outs]
