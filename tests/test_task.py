import re

import pytest

from zppo_fast.reward import grade
from zppo_fast.task import ArithmeticTask


def test_problems_are_deterministic_and_correct():
    task = ArithmeticTask(max_operand=30, num_terms=3, seed=3)
    again = ArithmeticTask(max_operand=30, num_terms=3, seed=3)
    for qid in range(0, len(task), 97):
        p = task.problem(qid)
        assert p == again.problem(qid)
        numbers = [int(n) for n in re.findall(r"\d+", p.question)]
        signs = [1] + [1 if w == "gets" else -1 for w in re.findall(r"(gets|loses)", p.question)]
        assert sum(s * n for s, n in zip(signs, numbers)) == int(p.answer) >= 0
        assert grade(p.solution, p.answer) == 1.0


def test_heldout_split_is_disjoint_by_fact():
    task = ArithmeticTask(heldout_fraction=0.2)
    train, heldout = set(task.train_ids()), set(task.heldout_ids())
    assert train.isdisjoint(heldout) and len(train) + len(heldout) == len(task)
    assert 0.1 < len(heldout) / len(task) < 0.3
    fact = lambda q: task.problem(q).solution
    assert {fact(q) for q in list(train)[:3000]}.isdisjoint({fact(q) for q in heldout})


def test_bad_settings_and_ids():
    with pytest.raises(ValueError, match="max_operand=0"):
        ArithmeticTask(max_operand=0)
    with pytest.raises(KeyError, match="outside"):
        ArithmeticTask().problem(-1)
