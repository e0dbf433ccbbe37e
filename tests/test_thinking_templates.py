"""The teacher's side prompts (compression, hint, judge) under a chat template that thinks by default.

Two in-process templates in Qwen3's manner: one with the `enable_thinking` switch (off: the empty
think block is in the prompt), one that always opens `<think>` (no switch to turn off). The
teacher is scripted as a thinking model is: after an open `<think>` in its prompt it reasons,
closes the block, then answers; after the empty block it answers at once. Either way no
summary, hint or verdict may carry `<think>` text.
"""

import pytest

from zppo_fast import prompts
from zppo_fast.baselines import GuidanceSettings, HintPrefixBuilder, parse_hint
from zppo_fast.config import ZPPOConfig
from zppo_fast.data import chat_prompt_ids, instruction_prompt_ids, tokenizer_corpus
from zppo_fast.engine import Sample
from zppo_fast.graders import GradeItem, JudgeGrader
from zppo_fast.task import ArithmeticTask, Problem
from zppo_fast.tokenizer import build_tokenizer
from zppo_fast.zppo import Reformulator

_TURNS = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
SWITCH = (_TURNS + "{% if add_generation_prompt %}<|im_start|>assistant\n"
          "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
          "{% else %}<think>\n{% endif %}{% endif %}")
ALWAYS = _TURNS + "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
OFF = "<think>\n\n</think>\n\n"
REASONING = "Let me think. Is it \\boxed{99}? No.\n</think>\n\n"


class ThinkingTeacher:
    """Answers each prompt by its kind; reasons first whenever its prompt ends in an open <think>."""

    def __init__(self, tokenizer):
        self.tokenizer, self.prompts = tokenizer, []

    def answer(self, text: str) -> str:
        if "Compress the response below" in text:
            return "<summary>the sum is 7</summary>"
        if "Read the solved response below" in text:
            return "<hint>add the tens first</hint>"
        if "## Ground Truth Answer" in text:
            return '{"verdict": "correct"}'
        return "\\boxed{7}"  # a rollout of the question: always right

    def generate(self, prompt_ids, params, images=None):
        out = []
        for ids in prompt_ids:
            text = self.tokenizer.decode(ids)
            self.prompts.append(text)
            thinks = not text.endswith(OFF)
            out.append([Sample([1] * 3, (REASONING if thinks else "") + self.answer(text), "stop", [0.0] * 3)
                        for _ in range(params.n)])
        return out


@pytest.fixture(scope="module")
def base_tokenizer():
    return build_tokenizer(tokenizer_corpus(ArithmeticTask(), size=300), vocab_size=400)


@pytest.fixture(params=["switch", "always"])
def tokenizer(request, base_tokenizer):
    tok = base_tokenizer
    old = tok.chat_template
    tok.chat_template = SWITCH if request.param == "switch" else ALWAYS
    yield tok
    tok.chat_template = old


def _side_prompts(teacher):
    return [p for p in teacher.prompts if "Compress" in p or "Read the solved" in p or "## Ground Truth" in p]


def test_instruction_prompts_turn_thinking_off(base_tokenizer):
    tok, old = base_tokenizer, base_tokenizer.chat_template
    tok.chat_template = SWITCH
    try:
        assert tok.decode(instruction_prompt_ids(tok, "Summarize.")).endswith("assistant\n" + OFF)
        assert tok.decode(chat_prompt_ids(tok, "What is 3+4?")).endswith("assistant\n<think>\n")  # problems think
    finally:
        tok.chat_template = old


def test_summaries_hints_and_verdicts_carry_no_thinking(tokenizer):
    switch = tokenizer.chat_template == SWITCH
    problems = [Problem(0, "Q0 what is 3+4?", "7", "")]
    texts, rewards = [["\\boxed{5}", "\\boxed{6}"]], [[0.0, 0.0]]

    teacher = ThinkingTeacher(tokenizer)
    reform = Reformulator(teacher, tokenizer, ZPPOConfig(teacher_group_size=2, compression="teacher"), ("bcq", "ncq"))
    out, _ = reform(problems, texts, rewards, cap=2, step=1)
    assert [r.kind for r in out] == ["bcq", "ncq"]
    summaries = reform.compress(["\\boxed{5}", "\\boxed{6}"], {"zppo/teacher_tokens": 0.0}, step=1)
    assert summaries == ["the sum is 7"] * 2
    for r in out:  # the student's prompts hold the summaries, never the teacher's reasoning
        assert "think>" not in r.text and "Let me think" not in r.text and "the sum is 7" in r.text

    teacher = ThinkingTeacher(tokenizer)
    settings = GuidanceSettings(teacher_group_size=1)
    hints, _ = HintPrefixBuilder("hint", teacher, tokenizer, tokenizer, settings)(problems, texts, rewards, 1, 1)
    assert [h.text for h in hints] == [prompts.with_hint(problems[0].question, "add the tens first")]

    teacher = ThinkingTeacher(tokenizer)
    [verdict] = JudgeGrader(teacher, tokenizer).grade_batch([GradeItem("Q0?", "\\boxed{7}", "7")])
    assert (verdict.score, verdict.verdict) == (1.0, "correct")
    # With the switch every side prompt was rendered with thinking off; without it they could not be.
    assert all(p.endswith(OFF) == switch for p in _side_prompts(teacher))


@pytest.mark.parametrize(
    "output, clean",
    [
        ("reasoning </think>\n\nanswer", "\n\nanswer"),  # the template opened the block
        ("<think>r</think>answer", "answer"),
        ("<think>a</think> x <think>b</think> answer", " answer"),
        ("answer <think>cut off by the cap", "answer "),
        ("<think>only reasoning, cut off", ""),
        ("no reasoning", "no reasoning"),
    ],
)
def test_strip_thinking(output, clean):
    assert prompts.strip_thinking(output) == clean


def test_parsers_drop_thinking():
    assert prompts.parse_summary("<think>use <summary>draft</summary></think><summary>S</summary>") == "S"
    assert prompts.parse_summary("<think>never finished <summary>draft</summary>") == ""
    assert parse_hint("<think><hint>draft</hint></think> <hint>H</hint>") == "H"
    assert prompts.parse_judge_verdict('<think>{"verdict": "wrong"}</think>\n{"verdict": "correct"}') is True
    assert prompts.parse_judge_verdict('<think>hmm, {"verdict": "correct"}') is None  # cut off: no verdict
