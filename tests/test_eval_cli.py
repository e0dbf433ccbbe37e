"""Evaluation: the pass@1 metric on data whose accuracy is known, and the CLI end to end."""

import json
import re

import pytest
from tiny_judge import tiny_judge

from zppo_fast.config import ModelConfig, RunConfig
from zppo_fast.data import chat_prompt_ids
from zppo_fast.datasets import Columns, DatasetError
from zppo_fast.engine import Sample, SamplingParams
from zppo_fast.eval import EvalSet, accuracy, eval_sampling_params, evaluate_files, format_table, main
from zppo_fast.model import build_tiny_model, save_model
from zppo_fast.task import Problem
from zppo_fast.tokenizer import build_tokenizer

QUESTION_RE = re.compile(r"Question (\d+): what is (\d+)\+(\d+)\?")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["Question 12: what is 3+4? A. B. 0123456789 \\boxed{7}"] * 20, vocab_size=300)


class HalfRightEngine:
    """A scripted student behind the RolloutEngine interface.

    It reads the question from the prompt's token ids, computes the sum, and answers sample j of
    question i correctly iff `rule(i, j)`; a wrong answer is the sum plus one. Records its calls.
    """

    def __init__(self, tokenizer, rule):
        self.tokenizer, self.rule, self.calls = tokenizer, rule, []

    def generate(self, prompts, params):
        self.calls.append((len(prompts), params))
        out = []
        for ids in prompts:
            i, a, b = map(int, QUESTION_RE.search(self.tokenizer.decode(ids)).groups())
            answers = [a + b if self.rule(i, j) else a + b + 1 for j in range(params.n)]
            out.append([Sample([0], f"<think>adding</think> \\boxed{{{x}}}", "stop", [0.0]) for x in answers])
        return out


def write_sum_file(path, n, choices=False):
    with open(path, "w") as f:
        for i in range(n):
            a, b = i % 7, i % 5
            row = {"id": f"q{i}", "question": f"Question {i}: what is {a}+{b}?", "answer": str(a + b)}
            if choices:  # the right sum is A or B by parity; the gold is its letter
                options = [str(a + b), str(a + b + 1)] if i % 2 == 0 else [str(a + b + 1), str(a + b)]
                row |= {"choices": options, "answer": "A" if i % 2 == 0 else "B"}
            f.write(json.dumps(row) + "\n")


def test_pass_at_1_on_generated_data_with_known_accuracy(tmp_path, tokenizer):
    write_sum_file(tmp_path / "sums.jsonl", 10)
    write_sum_file(tmp_path / "mc.jsonl", 6, choices=True)
    # Sample j of question i is right iff i + j is even: exactly half of each question's samples.
    # On the multiple-choice file the engine answers with a choice's text, which the choice grader
    # maps to its letter (the wrong sum is the other choice).
    engine = HalfRightEngine(tokenizer, lambda i, j: (i + j) % 2 == 0)
    params = eval_sampling_params(samples=1, max_new_tokens=8)
    results = evaluate_files(engine, tokenizer, [EvalSet(str(tmp_path / "sums.jsonl")),
                                                 EvalSet(str(tmp_path / "mc.jsonl"), grader="choice")],
                             params, samples=4, out_dir=tmp_path / "out", progress=False, batch_questions=4)
    assert [(r.name, r.grader, r.questions, r.samples) for r in results] == [("sums", "boxed", 10, 4),
                                                                               ("mc", "choice", 6, 4)]
    assert [r.accuracy for r in results] == [0.5, 0.5]
    # Every engine call got K = 4 and the paper's decoding; questions went 4 at a time.
    assert [n for n, _ in engine.calls] == [4, 4, 2, 4, 2]
    assert {(p.n, p.temperature, p.top_p, p.presence_penalty) for _, p in engine.calls} == {(4, 0.6, 0.95, 1.5)}

    lines = [json.loads(x) for x in (tmp_path / "out" / "responses.jsonl").read_text().splitlines()]
    assert len(lines) == (10 + 6) * 4
    assert {(x["dataset"], x["id"], x["sample"]) for x in lines} == (
        {("sums", f"q{i}", j) for i in range(10) for j in range(4)} | {("mc", f"q{i}", j) for i in range(6) for j in range(4)})
    assert all(x["score"] == float((int(x["id"][1:]) + x["sample"]) % 2 == 0) for x in lines)
    assert all(x["verdict"] == ("correct" if x["score"] else "wrong") for x in lines)
    summary = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert summary["datasets"]["sums"]["accuracy"] == 0.5 and summary["datasets"]["mc"]["questions"] == 6
    assert summary["decoding"] == {"samples": 4, "temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                   "presence_penalty": 1.5, "max_new_tokens": 8, "seed": 0}
    assert {name: d["grader"] for name, d in summary["datasets"].items()} == {"sums": "boxed", "mc": "choice"}


def test_pass_at_1_averages_per_question_fractions(tmp_path, tokenizer):
    write_sum_file(tmp_path / "sums.jsonl", 8)
    # Only sample 0 is ever right, and only on questions 0..3: pass@1 = (4 * 1/4) / 8 = 0.125.
    engine = HalfRightEngine(tokenizer, lambda i, j: j == 0 and i < 4)
    [r] = evaluate_files(engine, tokenizer, [str(tmp_path / "sums.jsonl")], SamplingParams(), samples=4,
                         progress=False)
    assert r.accuracy == 0.125
    # The trainer's quick metric agrees on the same questions as Problems (greedy params, n = 2).
    problems = [Problem(i, f"Question {i}: what is {i % 7}+{i % 5}?", str(i % 7 + i % 5), "") for i in range(8)]
    assert accuracy(engine, tokenizer, problems, SamplingParams(n=2)) == 4 / 16


def test_bad_and_too_long_rows_are_counted_not_evaluated(tmp_path, tokenizer):
    path = tmp_path / "mixed.jsonl"
    write_sum_file(path, 4)
    with open(path, "a") as f:
        f.write(json.dumps({"id": "empty", "question": "Question 9: what is 1+1?", "answer": ""}) + "\n")
        f.write(json.dumps({"id": "long", "question": "Question 8: what is 1+1? " + "9 " * 400, "answer": "2"}) + "\n")
    engine = HalfRightEngine(tokenizer, lambda i, j: True)
    limit = len(chat_prompt_ids(tokenizer, "Question 3: what is 3+3?")) + 10  # the short rows fit, "long" does not
    [r] = evaluate_files(engine, tokenizer, [str(path)], SamplingParams(), samples=1, skip_bad_rows=True,
                         max_prompt_tokens=limit, progress=False)
    assert (r.questions, r.accuracy, r.bad_rows, r.too_long) == (4, 1.0, 1, 1)
    table = format_table([r])
    assert table.splitlines()[0].split() == ["dataset", "grader", "questions", "samples", "pass@1", "malformed",
                                             "too_long", "bad_rows"]
    assert table.splitlines()[2].split() == ["mixed", "boxed", "4", "1", "1.0000", "0", "1", "1"]


def test_eval_decoding_is_the_papers():
    params = eval_sampling_params(samples=3)
    assert (params.n, params.temperature, params.top_p, params.top_k, params.max_new_tokens) == (3, 0.6, 0.95, 20, 12288)
    assert params.presence_penalty == 1.5 == RunConfig().eval_presence_penalty
    assert eval_sampling_params(top_k=0).top_k is None


def test_cli_end_to_end_on_a_saved_tiny_model(tmp_path, tokenizer, capsys):
    model = build_tiny_model(ModelConfig(hidden_size=32, num_layers=4), tokenizer, seed=0)
    save_model(model, tokenizer, tmp_path / "student")
    judge, judge_tok = tiny_judge(steps=15)
    save_model(judge, judge_tok, tmp_path / "judge")
    write_sum_file(tmp_path / "a.jsonl", 3)
    write_sum_file(tmp_path / "b.jsonl", 2, choices=True)

    main(["--model", str(tmp_path / "student"), "--data", str(tmp_path / "a.jsonl"), "--data", str(tmp_path / "b.jsonl"),
          "--grader", "boxed", "--grader", "judge", "--judge-model", str(tmp_path / "judge"),
          "--judge-max-new-tokens", "12", "--samples", "2", "--max-new-tokens", "6", "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    summary = json.loads((tmp_path / "out" / "eval.json").read_text())
    lines = [json.loads(x) for x in (tmp_path / "out" / "responses.jsonl").read_text().splitlines()]
    assert len(lines) == (3 + 2) * 2
    assert summary["model"] == str(tmp_path / "student") and summary["decoding"]["samples"] == 2
    for name, grader, questions in [("a", "boxed", 3), ("b", "judge", 2)]:
        got = summary["datasets"][name]
        scores = [x["score"] for x in lines if x["dataset"] == name]
        assert (got["grader"], got["questions"], got["samples"]) == (grader, questions, 2)
        assert got["accuracy"] == pytest.approx(sum(scores) / len(scores))  # the JSON agrees with the log
        assert re.search(rf"^{name}\s+{grader}\s+{questions}\s+2\s+{got['accuracy']:.4f}", out.out, re.MULTILINE)
    # The trained judge says "correct" to everything: its data set scores 1 with well-formed verdicts.
    assert summary["datasets"]["b"]["accuracy"] == 1.0 and summary["datasets"]["b"]["malformed"] == 0
    assert all(x["extracted"] == '{"verdict": "correct"}' for x in lines if x["dataset"] == "b")
    assert "eval a" in out.err  # the progress bar


def test_cli_rejects_mismatched_graders(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(tmp_path), "--data", "a.jsonl", "--data", "b.jsonl", "--data", "c.jsonl",
              "--grader", "boxed", "--grader", "choice"])
    assert exit_.value.code == 2 and "--grader given 2 times for 3 --data files" in capsys.readouterr().err


MY_REWARDS = '''
import re

def boxed_sum(response, gold):
    """1 for the right boxed sum; 0.25 for a box one off (the engine's wrong answers), else 0."""
    got = re.findall(r"\\\\boxed\\{(\\d+)\\}", response)
    return 1.0 if got and got[-1] == gold else 0.25 if got and abs(int(got[-1]) - int(gold)) == 1 else 0.0
'''


def hub_layout(path, n):
    """The sums file as a hub data set lays it out: "query" and "target" columns, no id."""
    write_sum_file(path, n)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({"query": r["question"], "target": r["answer"], "split": "test"}) + "\n"
                            for r in rows))


def test_column_mapping_and_a_user_reward_function(tmp_path, tokenizer):
    hub_layout(tmp_path / "hub.jsonl", 6)
    (tmp_path / "my_rewards.py").write_text(MY_REWARDS)
    engine = HalfRightEngine(tokenizer, lambda i, j: (i + j) % 2 == 0)
    columns = Columns(id=None, question="query", answer="target")
    dataset = EvalSet(str(tmp_path / "hub.jsonl"), f"{tmp_path / 'my_rewards.py'}:boxed_sum")
    [r] = evaluate_files(engine, tokenizer, [dataset], eval_sampling_params(max_new_tokens=8), samples=2,
                         out_dir=tmp_path / "out", progress=False, columns=columns)
    # Half the samples right (1), half one off (0.25): pass@1 = 0.625, graded against the 'target' column.
    assert (r.questions, r.accuracy) == (6, 0.625)
    lines = [json.loads(x) for x in (tmp_path / "out" / "responses.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines[:4]] == ["line 1", "line 1", "line 2", "line 2"]
    assert {(x["score"], x["verdict"]) for x in lines} == {(1.0, "correct"), (0.25, "partial")}
    with pytest.raises(DatasetError, match=r"hub\.jsonl, line 1: missing field 'question' \(the question column"):
        evaluate_files(engine, tokenizer, [str(tmp_path / "hub.jsonl")], SamplingParams(), progress=False,
                       columns=Columns(id=None, answer="target"))


def test_cli_column_flags_and_reward_function(tmp_path, tokenizer, capsys):
    save_model(build_tiny_model(ModelConfig(hidden_size=32, num_layers=4), tokenizer, seed=0), tokenizer,
               tmp_path / "student")
    hub_layout(tmp_path / "hub.jsonl", 3)
    (tmp_path / "my_rewards.py").write_text(MY_REWARDS)
    args = ["--model", str(tmp_path / "student"), "--data", str(tmp_path / "hub.jsonl"), "--question-key", "query",
            "--answer-key", "target", "--id-key", "none", "--max-new-tokens", "4", "--no-progress",
            "--out", str(tmp_path / "out")]
    [result] = main([*args, "--grader", f"{tmp_path / 'my_rewards.py'}:boxed_sum"])
    assert result.questions == 3 and result.grader.endswith("my_rewards.py:boxed_sum")
    lines = [json.loads(x) for x in (tmp_path / "out" / "responses.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == ["line 1", "line 2", "line 3"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--grader", f"{tmp_path / 'my_rewards.py'}:boxed_summ"])
    assert exit_.value.code == 2
    assert re.search(r"error: grader '.*my_rewards\.py:boxed_summ': .* has no 'boxed_summ'", capsys.readouterr().err)
