"""The "auto" grader: mathruler's rules where the gold answer parses as math (or the row is multiple
choice), the LLM judge for the rest, a row's own grader column first; the judge batched, and
called only for the rows that need it."""

import json

import pytest
from test_graders import ScriptedJudge
from tiny_judge import judge_tokenizer

from zppo_fast.config import ConfigError
from zppo_fast.datasets import DatasetError, DatasetFile
from zppo_fast.engine import Sample
from zppo_fast.eval import EvalSet, eval_sampling_params, evaluate_files
from zppo_fast.file_task import FileTask, grade_item
from zppo_fast.graders import GradeItem, get_grader, route


@pytest.mark.parametrize(
    "gold, choices, expected",
    [
        ("42", (), "boxed"), ("1,000", (), "boxed"), ("\\frac{1}{2}", (), "boxed"), ("x^2+1", (), "boxed"),
        ("(1, 2]", (), "boxed"), ("2\\sqrt{3}", (), "boxed"), ("\\pi r^2", (), "boxed"), ("50\\%", (), "boxed"),
        ("30^\\circ", (), "boxed"), ("66 \\text{ cm}", (), "boxed"), ("5 hours", (), "boxed"),
        ("a", (), "boxed"),  # one letter: a variable, or a letter answer the rules compare exactly
        ("Paris", (), "judge"), ("yes", (), "judge"), ("2 apples", (), "judge"), ("the mitochondria", (), "judge"),
        ("B", ("7", "12"), "choice"), ("Paris", ("Rome", "Paris"), "choice"),
    ],
)
def test_route(gold, choices, expected):
    assert route(gold, choices) == expected


ROWS = [
    {"id": "num", "question": "What is 6 times 7?", "answer": "42"},
    {"id": "free", "question": "Capital of France?", "answer": "Paris"},
    {"id": "mc", "question": "Pick the prime.", "answer": "B", "choices": ["4", "7"]},
    {"id": "named", "question": "Named: what is 2+2?", "answer": "4", "grader": "judge"},  # the row's own say
    {"id": "frac", "question": "Half of one?", "answer": "\\frac{1}{2}"},
]
RESPONSES = {"num": "\\boxed{42}", "free": "It is \\boxed{Paris}", "mc": "\\boxed{B}", "named": "\\boxed{5}",
             "frac": "\\boxed{0.5}"}


def write_rows(path, rows=ROWS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def judge_questions(judge, tok):
    """The row ids each judge call saw, per call."""
    return [[next(r["id"] for r in ROWS if r["question"] in tok.decode(p)) for p in prompts]
            for prompts, _ in judge.calls]


def test_mixed_file_in_training(tmp_path):
    """The trainer's path: FileTask problems, grade_item, one grade_batch per step."""
    task = FileTask([write_rows(tmp_path / "mixed.jsonl")])
    assert [p.grader for p in map(task.problem, task.train_ids())] == [None, None, None, "judge", None]
    tok = judge_tokenizer()
    judge = ScriptedJudge(['{"verdict": "correct"}', '{"verdict": "wrong"}'])
    grader = get_grader("auto", engine=judge, tokenizer=tok)
    items = [grade_item(task.problem(q), RESPONSES[task.record(q).id]) for q in task.train_ids()]
    assert grader.needs_judge(items) and not grader.needs_judge([items[0], items[2], items[4]])
    verdicts = grader.grade_batch(items)
    # numeric and fraction rows by the rules, the choice row by letters, the rest by ONE judge call
    assert [v.grader for v in verdicts] == ["boxed", "judge", "choice", "judge", "boxed"]
    assert judge_questions(judge, tok) == [["free", "named"]]
    assert [v.score for v in verdicts] == [1.0, 1.0, 1.0, 0.0, 1.0]
    # a batch without free-form rows never calls the judge
    grader.grade_batch([items[0], items[2], items[4]])
    assert len(judge.calls) == 1


def test_mixed_file_in_evaluation(tmp_path):
    class Student:
        def generate(self, prompts, params):
            ids = [next(r["id"] for r in ROWS if r["question"] in tok.decode(p)) for p in prompts]
            return [[Sample([0], RESPONSES[i], "stop", [0.0])] * params.n for i in ids]

    tok = judge_tokenizer()
    judge = ScriptedJudge(['{"verdict": "correct"}', '{"verdict": "wrong"}'] * 2)
    [result] = evaluate_files(Student(), tok, [EvalSet(str(write_rows(tmp_path / "mixed.jsonl")), "auto")],
                              eval_sampling_params(samples=2, max_new_tokens=8), out_dir=tmp_path / "out",
                              judge_engine=judge, judge_tokenizer=tok, progress=False)
    assert result.graded_by == {"boxed": 4, "judge": 4, "choice": 2}
    assert judge_questions(judge, tok) == [["free", "free", "named", "named"]]  # one batched call
    summary = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert summary["datasets"]["mixed"]["grader"] == "auto"
    assert summary["datasets"]["mixed"]["graded_by"] == {"boxed": 4, "judge": 4, "choice": 2}
    lines = [json.loads(x) for x in (tmp_path / "out" / "responses.jsonl").read_text().splitlines()]
    assert {x["id"]: x["grader"] for x in lines} == {"num": "boxed", "free": "judge", "mc": "choice",
                                                     "named": "judge", "frac": "boxed"}


def test_free_form_row_without_a_judge_is_an_error():
    grader = get_grader("auto")
    assert grader.grade_batch([GradeItem("q", "\\boxed{42}", "42")])[0].score == 1.0  # rules need no judge
    with pytest.raises(ConfigError, match="'Paris' of question 'Capital of France\\?' needs the LLM judge"):
        grader.grade_batch([GradeItem("Capital of France?", "\\boxed{Paris}", "Paris")])


def test_row_grader_column_needs_auto(tmp_path):
    path = write_rows(tmp_path / "mixed.jsonl")
    with pytest.raises(ConfigError, match=r"mixed.jsonl, line 4: the row names its grader \('judge'\) but the data "
                                          r"set is graded by 'boxed'"):
        evaluate_files(None, judge_tokenizer(), [EvalSet(str(path), "boxed")], eval_sampling_params(), progress=False)


def test_bad_row_grader(tmp_path):
    path = write_rows(tmp_path / "bad.jsonl", [{"id": "x", "question": "q", "answer": "1", "grader": "auto"}])
    with pytest.raises(DatasetError, match="field 'grader' must be one of boxed, choice, math_verify, judge"):
        list(DatasetFile(path, skip_bad_rows=False))
