"""The user's reward function as a grader (`data.grader = "module:fn"`): both protocols, and errors
that name the function."""

import re
import sys

import pytest

from zppo_fast.config import ConfigError
from zppo_fast.graders import CountingGrader, GradeItem, get_grader
from zppo_fast.user_grader import GraderFunctionError

REWARDS = '''
import numpy as np
import torch

CALLS = []

def exact(response, gold):
    CALLS.append((response, gold))
    return response.strip() == gold

def by_length(responses, golds):
    CALLS.append((list(responses), list(golds)))
    return np.array([min(len(r), 4) / 4 for r in responses], dtype=np.float32)
by_length.batched = True

def as_tensor(responses, golds):
    return torch.tensor([float(r == g) for r, g in zip(responses, golds)])
as_tensor.batched = True

def echo(response, gold):
    return eval(response)  # the response is the Python expression of the score to return

def short(responses, golds):
    return [1.0] * (len(responses) - 1)
short.batched = True

def explodes(response, gold):
    return {"ok": 1.0}[response]

def explodes_batched(responses, golds):
    return {}[responses[0]]
explodes_batched.batched = True

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def rewards(tmp_path, monkeypatch):
    """A reward module on disk, importable by file path and (with tmp_path on sys.path) by name."""
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "my_rewards.py"
    for name in ("my_rewards", "zppo_user_grader_my_rewards"):
        sys.modules.pop(name, None)


def items(*pairs):
    return [GradeItem("question?", response, gold) for response, gold in pairs]


def test_per_item_function_by_module_or_file(rewards):
    for spec in ("my_rewards:exact", f"{rewards}:exact"):
        grader = get_grader(spec)
        assert grader.name == spec and not grader.batched
        verdicts = grader.grade_batch(items(("12", "12"), (" 12 ", "12"), ("13", "12")))
        assert [(v.score, v.verdict) for v in verdicts] == [(1.0, "correct"), (1.0, "correct"), (0.0, "wrong")]
        assert all(type(v.score) is float for v in verdicts)
        assert sys.modules[grader.fn.__module__].CALLS[-3:] == [("12", "12"), (" 12 ", "12"), ("13", "12")]
    # A file is executed once per process, like an import: every grader built from it shares the module.
    assert get_grader(f"{rewards}:exact").fn is get_grader(f"{rewards}:exact").fn
    assert len(sys.modules["zppo_user_grader_my_rewards"].CALLS) == 3


def test_batched_function_gets_one_call_per_batch(rewards):
    grader = get_grader("my_rewards:by_length")
    module = sys.modules["my_rewards"]
    assert grader.batched
    verdicts = grader.grade_batch(items(("a", "1"), ("abcd", "2"), ("abcdefg", "3"), ("ab", "4")))
    assert [v.score for v in verdicts] == [0.25, 1.0, 1.0, 0.5]
    assert [v.verdict for v in verdicts] == ["partial", "correct", "correct", "partial"]
    assert module.CALLS == [(["a", "abcd", "abcdefg", "ab"], ["1", "2", "3", "4"])]
    assert grader.grade_batch([]) == [] and len(module.CALLS) == 1  # nothing to grade: no call
    tensor = get_grader("my_rewards:as_tensor").grade_batch(items(("7", "7"), ("8", "7")))
    assert [v.score for v in tensor] == [1.0, 0.0]


@pytest.mark.parametrize("response,shown", [("'yes'", "'yes' (str) for item 1"), ("None", "None (NoneType) for item 1"),
                                            ("float('nan')", "nan (float) for item 1"), ("2.0", "2.0 (float)"),
                                            ("-1", "-1 (int)"), ("[1.0]", "[1.0] (list)")])
def test_a_score_that_is_not_a_number_in_0_1_names_the_function(rewards, response, shown):
    grader = get_grader("my_rewards:echo")
    with pytest.raises(GraderFunctionError, match=rf"grader my_rewards:echo returned {re.escape(shown)}"):
        grader.grade_batch(items(("1", "g"), (response, "gold 7")))
    # Numbers of every kind are scores: bools, ints, numpy and torch scalars.
    fine = items(("True", "g"), ("0", "g"), ("np.float64(0.5)", "g"), ("torch.tensor(1.0)", "g"))
    assert [v.score for v in grader.grade_batch(fine)] == [1.0, 0.0, 0.5, 1.0]


def test_batched_result_of_the_wrong_length_or_an_exception_names_the_function(rewards):
    with pytest.raises(GraderFunctionError, match=r"grader my_rewards:short \(batched\) returned 2 scores for 3 items"):
        get_grader("my_rewards:short").grade_batch(items(("a", "1"), ("b", "2"), ("c", "3")))
    with pytest.raises(GraderFunctionError,
                       match=r"grader my_rewards:explodes_batched raised on the batch: KeyError: 'a'") as e:
        get_grader("my_rewards:explodes_batched").grade_batch(items(("a", "1")))
    assert isinstance(e.value.__cause__, KeyError)  # the user's traceback is kept


def test_a_per_item_function_raising_on_a_response_scores_it_0_and_is_counted(rewards):
    """An exception on one model output is that output's 0.0 ("error"), not the end of the run;
    CountingGrader (the trainer's) counts them and shows the first with its input."""
    logged = []
    grader = CountingGrader(get_grader("my_rewards:explodes"), log=logged.append)
    verdicts = grader.grade_batch(items(("a", "1"), ("ok", "1"), ("b", "2")))
    assert [(v.score, v.verdict) for v in verdicts] == [(0.0, "error"), (1.0, "correct"), (0.0, "error")]
    assert verdicts[0].extracted == "KeyError: 'a'"
    grader.grade_batch(items(("c", "3")))
    assert grader.pop_errors() == 3 and grader.pop_errors() == 0
    (line,) = logged  # the first one only
    assert "grader my_rewards:explodes raised KeyError: 'a'" in line and "reward/grader_errors" in line
    assert "question: 'question?'" in line and "response: 'a'" in line and "gold: '1'" in line


def test_a_function_that_cannot_be_imported_is_named(rewards, tmp_path):
    cases = [("no_such_module:fn", r"grader 'no_such_module:fn': cannot import 'no_such_module': ModuleNotFoundError"),
             ("my_rewards:exakt", r"grader 'my_rewards:exakt': 'my_rewards' has no 'exakt'; its functions: .*exact"),
             ("my_rewards:NOT_A_FUNCTION", r"'NOT_A_FUNCTION' is a int, not a function"),
             (f"{tmp_path / 'gone.py'}:fn", r"grader file .*gone\.py does not exist"),
             ("my_rewards:", r"a reward function is named MODULE:FUNCTION")]
    for spec, message in cases:
        with pytest.raises(ConfigError, match=message):
            get_grader(spec)
    (tmp_path / "broken.py").write_text("import not_installed_anywhere\n")
    with pytest.raises(ConfigError, match=r"grader '.*broken\.py:fn': cannot import .*No module named 'not_installed"):
        get_grader(f"{tmp_path / 'broken.py'}:fn")

