"""Held-out evaluation: pass@1 of a model on a list of questions through a rollout engine."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from zppo_fast.data import chat_prompt_ids
from zppo_fast.engine import RolloutEngine, SamplingParams
from zppo_fast.reward import grade
from zppo_fast.task import Problem


def accuracy(
    engine: RolloutEngine, tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem], params: SamplingParams
) -> float:
    """Mean reward over `params.n` samples of each problem (greedy when temperature is 0)."""
    samples = engine.generate([chat_prompt_ids(tokenizer, p.question) for p in problems], params)
    rewards = [grade(s.text, p.answer) for p, group in zip(problems, samples) for s in group]
    return sum(rewards) / max(len(rewards), 1)
