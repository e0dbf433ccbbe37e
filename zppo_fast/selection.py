"""Which hard questions get reformulated this step: ZPPO's cap and priority (Algorithm 1, 3-5).

A pure function of per-question numbers, so the trainer, the tests and any ablation share it:

1. Hard = mean plain-rollout accuracy r̄_x < `hard_threshold` (`zppo.hard_threshold`, the paper's
   0.5; exactly the threshold is not hard).
2. Pre-cap: keep the `cap` hard questions with the lowest r̄_x.
3. Each kept question yields a BCQ instance if it is BCQ-eligible (>= 1 teacher-correct and
   >= 1 student-wrong rollout) and an NCQ instance (every hard question has a wrong rollout).
4. Post-cap: walk the kept questions in ascending r̄_x, appending each one's BCQ instance and
   then its NCQ instance, and stop before the count would exceed `cap` -- so when one slot is
   left for a question with both, its BCQ is kept and its NCQ dropped.

Choices the paper leaves open, made here:

* Ties in r̄_x are broken by the question's index in the batch (lower first): a stable sort,
  so the result is deterministic (a batch listing new questions before replayed ones
  therefore favours new questions on ties).
* `kinds` restricts the instance types for the single-type ablations (GRPO†+BCQ with
  `("bcq",)`, GRPO†+NCQ with `("ncq",)`). The cap still counts instances. Pre-cap keeps the
  `cap` lowest-accuracy hard questions that can yield at least one instance of an enabled
  kind, so a BCQ-only run does not spend slots on questions without a teacher-correct
  rollout. With NCQ enabled every hard question qualifies, which is exactly steps 2-4 above.
* The teacher is asked only about the hard questions whose rollouts can be used
  (`teacher_questions`): with NCQ enabled, the `cap` kept ones. Algorithm 1 asks about every hard
  question; the instances built are the same, and the teacher's work drops from every hard question
  to at most `cap` of them.
* Rounding of the fractions: `round(rho * B_new)` in the paper; Python's `round` rounds
  halves to even (round(2.5) == 2), so `replay_count` / `aug_cap` round halves UP instead:
  floor(rho * B_new + 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

HARD_THRESHOLD = 0.5  # the paper's; runs read zppo.hard_threshold
KINDS = ("bcq", "ncq")


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def replay_count(b_new: int, rho_replay: float) -> int:
    """Replayed questions per step: floor(rho_replay * b_new + 0.5), halves rounded up."""
    if b_new < 0 or rho_replay < 0:
        raise ValueError(f"replay_count: need b_new, rho_replay >= 0, got {b_new}, {rho_replay}")
    return _round_half_up(rho_replay * b_new)


def aug_cap(b_new: int, rho_aug: float) -> int:
    """Reformulated (BCQ + NCQ) instances allowed per step: floor(rho_aug * b_new + 0.5)."""
    if b_new < 0 or rho_aug < 0:
        raise ValueError(f"aug_cap: need b_new >= 0 and rho_aug >= 0, got {b_new}, {rho_aug}")
    return _round_half_up(rho_aug * b_new)


def select_reformulations(
    accuracies: Sequence[float],
    bcq_eligible: Sequence[bool],
    cap: int,
    kinds: Sequence[str] = KINDS,
    hard_threshold: float = HARD_THRESHOLD,
) -> list[tuple[int, str]]:
    """The reformulated instances to build this step, in priority order.

    Args:
        accuracies: r̄_x per question of the step's batch (new and replayed), indexed as the
            batch is.
        bcq_eligible: per question, whether it has >= 1 teacher-correct and >= 1
            student-wrong rollout.
        cap: the most instances allowed (`aug_cap(B_new, rho_aug)`).
        kinds: the enabled instance types, a non-empty subset of ("bcq", "ncq"); their order
            does not matter (a question's BCQ always comes before its NCQ).
        hard_threshold: a question is hard when its accuracy is below this.

    Returns:
        `(batch index, "bcq" | "ncq")` pairs, ascending in accuracy (ties by index), a
        question's BCQ before its NCQ, at most `cap` of them.
    """
    if len(accuracies) != len(bcq_eligible):
        raise ValueError(
            f"select_reformulations: {len(accuracies)} accuracies but "
            f"{len(bcq_eligible)} eligibility flags"
        )
    if cap < 0:
        raise ValueError(f"select_reformulations: cap must be >= 0, got {cap}")
    enabled = set(kinds)
    if not enabled or not enabled <= set(KINDS):
        raise ValueError(
            f"select_reformulations: kinds must be a non-empty subset of {KINDS}, got {kinds!r}"
        )

    def instances(i: int) -> list[str]:
        return [k for k in KINDS if k in enabled and (k == "ncq" or bcq_eligible[i])]

    # Post-cap: BCQ then NCQ per question, stopping at the cap.
    selected: list[tuple[int, str]] = []
    for i in hardest(accuracies, cap, hard_threshold, lambda i: bool(instances(i))):
        for kind in instances(i):
            if len(selected) == cap:
                return selected
            selected.append((i, kind))
    return selected


def teacher_questions(accuracies: Sequence[float], cap: int, kinds: Sequence[str] = KINDS,
                      hard_threshold: float = HARD_THRESHOLD) -> list[int]:
    """The hard questions whose teacher rollouts can reach an instance `select_reformulations` builds,
    ascending in r̄_x (ties by index).

    Algorithm 1 draws teacher rollouts for every hard question. With NCQ enabled, though, every hard
    question yields an instance whatever its teacher rollouts hold, so pre-cap is settled before the
    teacher runs: only the `cap` questions it keeps can have a BCQ built, and the rollouts of the
    others would be discarded unread. Drawing them for the kept ones alone builds the same
    instances, from candidates of the same distribution. BCQ alone: eligibility decides pre-cap,
    so every hard question needs its rollouts.
    """
    return hardest(accuracies, cap if "ncq" in kinds else len(accuracies), hard_threshold)


def hardest(accuracies: Sequence[float], cap: int, hard_threshold: float = HARD_THRESHOLD,
            yields: Callable[[int], bool] = lambda i: True) -> list[int]:
    """The `cap` lowest-accuracy hard questions (for which `yields(i)`), ascending: pre-cap, and the
    baselines' X_aug. sorted() is stable and indices ascend, so equal accuracies stay in index order."""
    hard = [i for i, acc in enumerate(accuracies) if acc < hard_threshold and yields(i)]
    return sorted(hard, key=lambda i: accuracies[i])[:cap]
