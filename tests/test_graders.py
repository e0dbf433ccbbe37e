"""Graders: the registry, the choice-letter table, math-verify, and the LLM judge (real and scripted)."""

import sys

import pytest
from tiny_judge import VERDICT_CORRECT, tiny_judge

from zppo_fast.data import instruction_prompt_ids
from zppo_fast.engine import Sample, SamplingParams, TransformersEngine
from zppo_fast.graders import GRADERS, GradeItem, JudgeGrader, get_grader
from zppo_fast.prompts import build_judge_prompt


def test_registry_names_and_unknown_grader():
    assert {"auto", "boxed", "choice", "math_verify", "judge"} <= set(GRADERS)
    with pytest.raises(ValueError, match=r"unknown grader 'exact'; registered: auto, boxed, choice, judge, math_verify"):
        get_grader("exact")
    with pytest.raises(ValueError, match="the 'judge' grader needs a judge engine and its tokenizer"):
        get_grader("judge")


def test_boxed_grader_is_the_training_verifier():
    items = [GradeItem("q", "so \\boxed{\\frac12}", "1/2"), GradeItem("q", "\\boxed{3}", "4"),
             GradeItem("q", "no box: 4", "4")]
    verdicts = get_grader("boxed").grade_batch(items)
    assert [(v.score, v.verdict) for v in verdicts] == [(1.0, "correct"), (0.0, "wrong"), (0.0, "wrong")]
    assert verdicts[1].extracted == "3" and verdicts[2].extracted == "[no answer]"


CHOICES = ("12 apples", "7", "Paris", "none of these")
# (response, gold, choices, expected score)
CHOICE_TABLE = [
    ("\\boxed{B}", "B", CHOICES, 1.0),
    ("\\boxed{b}", "B", CHOICES, 1.0),
    ("\\boxed{(B)}", "B", CHOICES, 1.0),
    ("\\boxed{B.}", "B", CHOICES, 1.0),
    ("\\boxed{\\text{B}}", "B", CHOICES, 1.0),
    ("\\boxed{B) 7}", "B", CHOICES, 1.0),
    ("\\boxed{B) 12 apples}", "B", CHOICES, 0.0),  # the letter and its text disagree
    ("\\boxed{Paris}", "C", CHOICES, 1.0),  # a choice's text stands for its letter
    ("\\boxed{7}", "B", CHOICES, 1.0),
    ("\\boxed{A}", "12 apples", CHOICES, 1.0),  # gold written as the choice text
    ("\\boxed{A}", "B", CHOICES, 0.0),
    ("\\boxed{E}", "E", CHOICES, 0.0),  # beyond the four choices: no such letter
    ("\\boxed{E}", "E", (), 1.0),  # without choices any letter is allowed
    ("\\boxed{AB}", "A", CHOICES, 0.0),
    ("The answer is B", "B", CHOICES, 0.0),  # no box
    ("\\boxed{A} ... wait, \\boxed{B}", "B", CHOICES, 1.0),  # the last box decides
    ("\\boxed{London}", "C", CHOICES, 0.0),
    ("\\boxed{B}", "", CHOICES, 0.0),  # an empty gold matches nothing
]


@pytest.mark.parametrize("response,gold,choices,score", CHOICE_TABLE)
def test_choice_grader_table(response, gold, choices, score):
    [v] = get_grader("choice").grade_batch([GradeItem("q", response, gold, choices)])
    assert v.score == score and v.verdict == ("correct" if score else "wrong")


def test_math_verify_grader():
    pytest.importorskip("math_verify")
    items = [GradeItem("q", "thus \\boxed{\\frac{1}{2}}", "0.5"), GradeItem("q", "\\boxed{x^2+2x+1}", "(x+1)^2"),
             GradeItem("q", "\\boxed{3}", "4"), GradeItem("q", "no math here", "4")]
    assert [v.score for v in get_grader("math_verify").grade_batch(items)] == [1.0, 1.0, 0.0, 0.0]


def test_math_verify_missing_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(ImportError, match="the 'math_verify' grader needs the math-verify package: pip install"):
        get_grader("math_verify")


class ScriptedJudge:
    """A RolloutEngine whose completions are given in advance; it records every call."""

    def __init__(self, outputs):
        self.outputs, self.calls = list(outputs), []

    def generate(self, prompts, params):
        self.calls.append((prompts, params))
        done, self.outputs = self.outputs[: len(prompts)], self.outputs[len(prompts) :]
        return [[Sample([1], text, "stop", [0.0])] for text in done]


# (judge output, score, verdict): only the exact one-key JSON object counts.
VERDICT_TABLE = [
    ('{"verdict": "correct"}', 1.0, "correct"),
    ('  {"verdict":"correct"}\n', 1.0, "correct"),
    ('{"verdict": "wrong"}', 0.0, "wrong"),
    ('{"verdict": "Correct"}', 0.0, "malformed"),
    ('{"verdict": "correct", "reason": "same"}', 0.0, "malformed"),
    ('```json\n{"verdict": "correct"}\n```', 0.0, "malformed"),
    ('The answer matches. {"verdict": "correct"}', 0.0, "malformed"),
    ('{"verdict": true}', 0.0, "malformed"),
    ("{'verdict': 'correct'}", 0.0, "malformed"),
    ('["correct"]', 0.0, "malformed"),
    ('{"verdict": "correct"', 0.0, "malformed"),  # cut off by the token cap
    ("", 0.0, "malformed"),
    ("correct", 0.0, "malformed"),
]


def test_judge_scores_a_table_of_verdicts_in_one_batched_call():
    from tiny_judge import judge_tokenizer

    tok = judge_tokenizer()
    engine = ScriptedJudge([out for out, _, _ in VERDICT_TABLE])
    items = [GradeItem(f"Question {i}?", f"\\boxed{{{i}}}", str(i), ("a", "b") if i % 2 else (),
                       "A. a\nB. b" if i % 2 else None) for i in range(len(VERDICT_TABLE))]
    verdicts = JudgeGrader(engine, tok).grade_batch(items)
    assert [(v.score, v.verdict) for v in verdicts] == [(s, v) for _, s, v in VERDICT_TABLE]
    assert [v.extracted for v in verdicts] == [out for out, _, _ in VERDICT_TABLE]  # raw output kept for the log
    [(prompts, params)] = engine.calls  # the whole batch in one generate call
    assert params == SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=512)
    assert prompts[1] == instruction_prompt_ids(tok, build_judge_prompt("Question 1?", "A. a\nB. b", "\\boxed{1}",
                                                                         "1"))
    assert prompts[0] == instruction_prompt_ids(tok, build_judge_prompt("Question 0?", None, "\\boxed{0}", "0"))


def test_judge_batch_size_splits_the_engine_calls():
    from tiny_judge import judge_tokenizer

    engine = ScriptedJudge(['{"verdict": "correct"}'] * 5)
    items = [GradeItem("q", "r", "g")] * 5
    assert [v.score for v in JudgeGrader(engine, judge_tokenizer(), batch_size=2).grade_batch(items)] == [1.0] * 5
    assert [len(p) for p, _ in engine.calls] == [2, 2, 1]


def test_judge_through_a_real_transformers_model():
    items = [GradeItem("What is 1+1?", "<think>1+1=2</think> \\boxed{2}", "2"),
             GradeItem("Pick one.", "\\boxed{A}", "B", ("x", "y"), "A. x\nB. y")]
    model, tok = tiny_judge(steps=15)
    engine = TransformersEngine(model, tok)
    verdicts = JudgeGrader(engine, tok, max_new_tokens=16).grade_batch(items)
    # The trained judge writes a well-formed verdict, parsed into a score.
    assert [(v.score, v.verdict, v.extracted) for v in verdicts] == [(1.0, "correct", VERDICT_CORRECT)] * 2

    untrained, tok = tiny_judge(steps=0)
    verdicts = JudgeGrader(TransformersEngine(untrained, tok), tok, max_new_tokens=16).grade_batch(items)
    # Noise from an untrained model is never a verdict: 0, and the raw text is kept.
    assert [(v.score, v.verdict) for v in verdicts] == [(0.0, "malformed")] * 2
    assert all(v.extracted for v in verdicts)
