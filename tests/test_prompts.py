"""ZPPO prompt texts: pinned word for word, and the BCQ/NCQ/judge builders."""

import random
import re

import pytest

from zppo_fast import prompts
from zppo_fast.prompts import (
    NO_ANSWER,
    build_bcq,
    build_compression_prompt,
    build_hint_prompt,
    build_judge_prompt,
    build_ncq,
    parse_judge_verdict,
    parse_summary,
    with_closing,
    with_hint,
)

# Literal copies of /work/shared/zppo_templates.md (placeholders written `{{ name }}`).
CLOSING = (
    r"You FIRST think about the reasoning process as an internal monologue and then provide the "
    r"final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The "
    r"final answer MUST BE put in \boxed{}."
)
COMPRESSION = r"""Compress the response below into a summary (in 5 lines max). Rules:
• Response is in <response>...</response> tags
• Summary should be in <summary>...</summary> tags and should be in 5 lines max
• Keep ONLY the essential reasoning steps and the final answer
• Remove ALL exploratory text, self-corrections, retries, and filler
• Do NOT re-derive or add new information
• End with the final answer in \boxed{} format
<response>
{{ response }}
</response>"""
BCQ = (
    "Here are two candidate responses in <candidate> </candidate> tags to the question above. "
    "One is correct and another is wrong. Use these as references to help you solve the problem."
)
NCQ = (
    "The following answers are all WRONG: {{ answers }}. Below are the incorrect reasoning "
    "processes in <candidate> </candidate> tags."
)
JUDGE = r"""You are an expert judge evaluating whether a model's response is correct according to the ground truth.
## Your Role (READ FIRST)
You are a COMPARATOR, not a solver. Your ONLY job is to decide how well the model's response matches the provided GROUND TRUTH.
• Do NOT attempt to solve the problem yourself.
• Do NOT infer or derive what the "real" answer should be.
• Do NOT second-guess the ground truth, even if it seems wrong.
• The "Model Response" section below MAY be either (a) the model's full trajectory including any <think>...</think> reasoning and a concluding \boxed{...} answer, OR (b) a short EXTRACTED snippet that was already pulled out as the candidate final answer (e.g. a bare letter like B, a number like 42, an expression like x = 5/3). Treat both forms uniformly: the snippet (when given) IS the model's committed final answer, and a full trajectory's final answer is the content inside the last \boxed{...} or the concluding sentence AFTER any </think> tag.
• If the final answer is missing due to answer format error, truncation, or other reasons, look inside thinking or reasoning.
• You should OUTPUT JSON with the format {"verdict": "correct" or "wrong"} based on the model's response and the ground truth.
## Question
{{ question }}
## Answer Options (rendered only when non-empty)
{{ options }}
## Model Response
{{ model_response }}
## Ground Truth Answer
{{ ground_truth }}
Output ONLY a valid JSON object with exactly this format (no prose, no code fences, no trailing commentary): {"verdict": "correct" or "wrong"}"""
HINT = r"""Read the solved response below and write a concise hint that helps solve the original question. Do NOT reveal the final answer, do NOT include any \boxed{} expression, and do NOT copy the full solution. Keep only high-level guidance or the key intermediate idea.
<response>
{{ response }}
</response>"""

Q = "What is 12 + 30?"
RIGHT = "12 + 30 = 42.\n\\boxed{42}"
BAD = "12 + 30 = 52.\n\\boxed{52}"
CANDIDATE = re.compile(r"<candidate>\n(.*?)\n</candidate>", re.DOTALL)


def test_templates_are_verbatim():
    assert prompts.CLOSING_INSTRUCTION == CLOSING
    assert prompts.COMPRESSION_TEMPLATE == COMPRESSION
    assert prompts.BCQ_INSTRUCTION == BCQ
    assert prompts.NCQ_HEADER == NCQ
    assert prompts.JUDGE_TEMPLATE == JUDGE
    assert prompts.HINT_TEMPLATE == HINT
    assert NO_ANSWER == "[no answer]"


def test_with_closing_one_blank_line():
    assert with_closing(Q) == Q + "\n\n" + CLOSING
    assert with_closing(Q + "  \n") == Q + "\n\n" + CLOSING


def test_bcq_exact_text():
    text = build_bcq(Q, RIGHT, BAD, random.Random(0))
    first, second = CANDIDATE.findall(text)
    assert {first, second} == {RIGHT, BAD}
    assert text == (
        f"{Q}\n\n{BCQ}\n<candidate>\n{first}\n</candidate>\n<candidate>\n{second}\n</candidate>"
    )


def test_bcq_order_is_shuffled_by_rng():
    orders = {tuple(CANDIDATE.findall(build_bcq(Q, RIGHT, BAD, random.Random(s))))
              for s in range(32)}
    assert orders == {(RIGHT, BAD), (BAD, RIGHT)}
    # Same seed, same prompt.
    assert build_bcq(Q, RIGHT, BAD, random.Random(7)) == build_bcq(Q, RIGHT, BAD, random.Random(7))


def test_bcq_exactly_one_of_each_and_no_label_leak():
    for seed in range(8):
        text = build_bcq(Q, RIGHT, BAD, random.Random(seed))
        blocks = CANDIDATE.findall(text)
        assert sorted(blocks) == sorted([RIGHT, BAD])
        # The words "correct"/"wrong" occur only in the instruction, never around a candidate.
        outside_instruction = text.replace(BCQ, "")
        assert not re.search(r"correct|wrong", outside_instruction, re.IGNORECASE)
        # The two blocks are framed identically: no attribute, index or label.
        assert text.count("<candidate>\n") == 2 and text.count("\n</candidate>") == 2


def test_ncq_exact_text_and_dedup_in_first_seen_order():
    traces = ["t1 \\boxed{7}", "t2 \\boxed{5}", "t3 \\boxed{7}", "t4 \\boxed{x+1}"]
    text = build_ncq(Q, traces, ["7", "5", " 7 ", "x+1"])
    header = ("The following answers are all WRONG: \\boxed{7}, \\boxed{5}, \\boxed{x+1}. "
              "Below are the incorrect reasoning processes in <candidate> </candidate> tags.")
    blocks = "\n".join(f"<candidate>\n{t}\n</candidate>" for t in traces)
    assert text == f"{Q}\n\n{header}\n{blocks}"


def test_ncq_answers_shown_as_written_dedup_after_normalization():
    # the boxed text as the student wrote it, not the normalized form (lowercase, no spaces)
    answers = ["\\frac{1}{2} \\text{ cm}", "Paris", "\\dfrac{1}{2}\\text{ cm}", "paris", "x = 1,000", "1000"]
    text = build_ncq(Q, ["t"] * len(answers), answers)
    assert ("all WRONG: \\boxed{\\frac{1}{2} \\text{ cm}}, \\boxed{Paris}, \\boxed{x = 1,000}. Below"
            in text)


def test_ncq_no_answer_rollouts_listed_only_as_candidates():
    traces = ["ran out of tokens", "t2 \\boxed{5}", "t3 no box"]
    text = build_ncq(Q, traces, [NO_ANSWER, "5", None])
    assert "all WRONG: \\boxed{5}. Below" in text
    assert NO_ANSWER not in text
    assert CANDIDATE.findall(text) == traces


def test_ncq_without_any_answer_drops_the_answers_clause():
    text = build_ncq(Q, ["a", "b"], [NO_ANSWER, ""])
    assert text == (
        f"{Q}\n\nBelow are the incorrect reasoning processes in <candidate> </candidate> tags.\n"
        "<candidate>\na\n</candidate>\n<candidate>\nb\n</candidate>"
    )


def test_ncq_rejects_bad_input():
    with pytest.raises(ValueError):
        build_ncq(Q, ["a"], ["1", "2"])
    with pytest.raises(ValueError):
        build_ncq(Q, [], [])


def test_compression_prompt():
    assert build_compression_prompt("  step 1\nstep 2 \\boxed{3}\n") == COMPRESSION.replace(
        "{{ response }}", "step 1\nstep 2 \\boxed{3}"
    )
    # Text that looks like a placeholder is inserted, not expanded.
    assert "{{ response }}" in build_compression_prompt("{{ response }}")


@pytest.mark.parametrize(
    "output, summary",
    [
        ("<summary>\n a \\boxed{1}\n</summary>", "a \\boxed{1}"),
        ("think <summary>draft</summary> then <summary> final </summary> bye", "final"),
        ("<summary>a</summary> <summary>cut off by the cap", "a"),  # complete beats cut off
        ("thinking... <summary>cut off by the cap", "cut off by the cap"),
        ("<summary>old <summary>new</summary>", "new"),
        ("no tags at all  ", "no tags at all"),
        ("</summary> stray close", "</summary> stray close"),
        ("", ""),
    ],
)
def test_parse_summary(output, summary):
    assert parse_summary(output) == summary


def test_hint_prompts():
    hint_prompt = build_hint_prompt(" solved \\boxed{4} ")
    assert hint_prompt == HINT.replace("{{ response }}", "solved \\boxed{4}")
    assert with_hint(Q, " think of tens ") == f"{Q}\n\n<hint>think of tens</hint>"


def test_judge_prompt_with_and_without_options():
    with_opts = build_judge_prompt("Pick one.", "A. 1\nB. 2", "<think>..</think> \\boxed{B}", "B")
    assert with_opts == JUDGE.replace(
        "## Answer Options (rendered only when non-empty)", "## Answer Options"
    ).replace("{{ question }}", "Pick one.").replace("{{ options }}", "A. 1\nB. 2").replace(
        "{{ model_response }}", "<think>..</think> \\boxed{B}").replace("{{ ground_truth }}", "B")
    for empty in (None, "", "  "):
        without = build_judge_prompt("{{ options }}?", empty, "42", "42")
        assert "Answer Options" not in without
        assert ("## Question\n{{ options }}?\n## Model Response\n42\n"
                "## Ground Truth Answer\n42\n") in without


@pytest.mark.parametrize(
    "text, verdict",
    [
        ('{"verdict": "correct"}', True),
        ('  {"verdict":"wrong"}\n', False),
        ('{"verdict": "Correct"}', None),
        ('{"verdict": "correct", "why": "x"}', None),
        ('```json\n{"verdict": "correct"}\n```', None),
        ('The answer is {"verdict": "correct"}', None),
        ('{"verdict": true}', None),
        ('["correct"]', None),
        ("", None),
    ],
)
def test_parse_judge_verdict(text, verdict):
    assert parse_judge_verdict(text) is verdict
