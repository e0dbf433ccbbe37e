"""ZPPO prompt texts and the functions that fill them in.

Every template of the paper (arXiv 2606.18216, Figs. 8, 9, 16-19; copied in
`/work/shared/zppo_templates.md`) is held exactly once below as a module constant; tests pin
each one word for word. Placeholders are written `{{ name }}` (the judge template's own
notation, used for all of them) and filled in one pass by `_render`, so text that is
substituted in -- a question that happens to contain `{{ options }}`, a `\\boxed{}` -- is never
re-read as a placeholder.

Where the student sees what:

    plain  : with_closing(question)
    BCQ    : with_closing(build_bcq(question, compressed_correct, compressed_wrong, rng))
    NCQ    : with_closing(build_ncq(question, compressed_wrong_traces, wrong_answers))
    hint   : with_closing(with_hint(question, hint))

`build_bcq` / `build_ncq` / `with_hint` return the prompt WITHOUT the closing instruction; the
caller applies `with_closing` exactly once, so every prompt (plain, BCQ, NCQ; training and
evaluation) ends with the same instruction.

Choices the paper leaves open, made here:

* Separator. The question, the reformulation block and the closing instruction are joined
  by one blank line ("\\n\\n"); trailing whitespace of the part before a separator is dropped
  so there is never more than one blank line. Inside BCQ/NCQ the instruction line is followed
  directly by the `<candidate>` blocks (single newlines), as the paper prints it.
* Candidate texts are inserted stripped, each as `<candidate>\\n{text}\\n</candidate>`.
* Compression output: `parse_summary` keeps the text inside the last complete
  `<summary>...</summary>` pair (the tags are dropped), after any `<think>...</think>` block
  (`strip_thinking`). If the output has no complete pair --
  typically the 512-token cap cut it off -- it keeps the text after the last opening
  `<summary>` tag; with no tag at all, the whole output. Always stripped; never raises.
* NCQ answers. Each is shown as the student wrote it inside its last \\boxed{} (stripped);
  answers equal after `zppo_fast.reward.normalize_answer` are listed once, in the form first
  seen, in first-seen order, joined by ", ". A wrong rollout with no final answer -- `None`,
  an empty string, or the verifier's marker `NO_ANSWER` -- is LEFT OUT of the answer list (telling
  the student "\\boxed{[no answer]} is WRONG" would teach nothing), but its trace still
  appears as a candidate. If no rollout has an answer, the header drops the answers clause
  and reads only "Below are the incorrect reasoning processes in <candidate> </candidate>
  tags."
* Judge. The paper's figure heads the options section "## Answer Options (rendered only
  when non-empty)"; the parenthesis describes the rendering, so `build_judge_prompt` drops
  the whole section (heading and value line) when there are no options and renders the
  heading as "## Answer Options" otherwise. `JUDGE_TEMPLATE` itself stays as printed.
  `parse_judge_verdict` accepts only a strict JSON object `{"verdict": "correct"|"wrong"}`
  (surrounding whitespace allowed, a `<think>` block before it dropped); anything else --
  prose, code fences, extra keys -- is None, which the caller scores 0.
* Hint. The paper prints "... intermediate idea. <response> y_T(+) </response>" with
  approximate line breaks; we lay `<response>` out on its own lines as in the compression
  template. The student's prompt is the question, a blank line, then `<hint>{hint}</hint>`.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence

# The verifier owns the marker and the normalizer NCQ deduplicates by.
from zppo_fast.reward import NO_ANSWER, normalize_answer

# --- Templates (verbatim from the paper) ----------------------------------------------------

# Fig. 8: appended to every prompt the student sees.
CLOSING_INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide "
    "the final answer. The reasoning process MUST BE enclosed within <think> </think> tags. "
    "The final answer MUST BE put in \\boxed{}."
)

# Fig. 16: the teacher rewrites one candidate; its output is capped at 512 tokens.
COMPRESSION_TEMPLATE = (
    "Compress the response below into a summary (in 5 lines max). Rules:\n"
    "• Response is in <response>...</response> tags\n"
    "• Summary should be in <summary>...</summary> tags and should be in 5 lines max\n"
    "• Keep ONLY the essential reasoning steps and the final answer\n"
    "• Remove ALL exploratory text, self-corrections, retries, and filler\n"
    "• Do NOT re-derive or add new information\n"
    "• End with the final answer in \\boxed{} format\n"
    "<response>\n"
    "{{ response }}\n"
    "</response>"
)

# Fig. 17: follows the question after a blank line, then the two candidate blocks.
BCQ_INSTRUCTION = (
    "Here are two candidate responses in <candidate> </candidate> tags to the question above. "
    "One is correct and another is wrong. Use these as references to help you solve the problem."
)

# Fig. 18: follows the question after a blank line, then one block per wrong rollout. Held as
# its two sentences too, because the first is dropped when no rollout has an answer.
NCQ_ANSWERS_SENTENCE = "The following answers are all WRONG: {{ answers }}."
NCQ_CANDIDATES_SENTENCE = (
    "Below are the incorrect reasoning processes in <candidate> </candidate> tags."
)
NCQ_HEADER = NCQ_ANSWERS_SENTENCE + " " + NCQ_CANDIDATES_SENTENCE

# Fig. 9: the teacher as judge of free-form answers (temperature 0, 512 new tokens).
JUDGE_TEMPLATE = (
    "You are an expert judge evaluating whether a model's response is correct according to "
    "the ground truth.\n"
    "## Your Role (READ FIRST)\n"
    "You are a COMPARATOR, not a solver. Your ONLY job is to decide how well the model's "
    "response matches the provided GROUND TRUTH.\n"
    "• Do NOT attempt to solve the problem yourself.\n"
    "• Do NOT infer or derive what the \"real\" answer should be.\n"
    "• Do NOT second-guess the ground truth, even if it seems wrong.\n"
    "• The \"Model Response\" section below MAY be either (a) the model's full trajectory "
    "including any <think>...</think> reasoning and a concluding \\boxed{...} answer, OR (b) a "
    "short EXTRACTED snippet that was already pulled out as the candidate final answer (e.g. a "
    "bare letter like B, a number like 42, an expression like x = 5/3). Treat both forms "
    "uniformly: the snippet (when given) IS the model's committed final answer, and a full "
    "trajectory's final answer is the content inside the last \\boxed{...} or the concluding "
    "sentence AFTER any </think> tag.\n"
    "• If the final answer is missing due to answer format error, truncation, or other "
    "reasons, look inside thinking or reasoning.\n"
    "• You should OUTPUT JSON with the format {\"verdict\": \"correct\" or \"wrong\"} based on "
    "the model's response and the ground truth.\n"
    "## Question\n"
    "{{ question }}\n"
    "## Answer Options (rendered only when non-empty)\n"
    "{{ options }}\n"
    "## Model Response\n"
    "{{ model_response }}\n"
    "## Ground Truth Answer\n"
    "{{ ground_truth }}\n"
    "Output ONLY a valid JSON object with exactly this format (no prose, no code fences, no "
    "trailing commentary): {\"verdict\": \"correct\" or \"wrong\"}"
)

# Fig. 19: Hint baseline; the teacher turns one correct rollout into an answer-free hint.
HINT_TEMPLATE = (
    "Read the solved response below and write a concise hint that helps solve the original "
    "question. Do NOT reveal the final answer, do NOT include any \\boxed{} expression, and do "
    "NOT copy the full solution. Keep only high-level guidance or the key intermediate idea.\n"
    "<response>\n"
    "{{ response }}\n"
    "</response>"
)

# Every fixed text, e.g. for a tokenizer's training corpus.
TEMPLATES: Mapping[str, str] = {
    "closing": CLOSING_INSTRUCTION,
    "compression": COMPRESSION_TEMPLATE,
    "bcq": BCQ_INSTRUCTION,
    "ncq": NCQ_HEADER,
    "judge": JUDGE_TEMPLATE,
    "hint": HINT_TEMPLATE,
}

_PLACEHOLDER = re.compile(r"\{\{ (\w+) \}\}")
_JUDGE_OPTIONS_SECTION = "## Answer Options (rendered only when non-empty)\n{{ options }}\n"


def _render(template: str, **fields: str) -> str:
    """Fill every `{{ name }}` of `template` in one pass (substituted text is not rescanned)."""
    return _PLACEHOLDER.sub(lambda m: fields[m.group(1)], template)


def _candidates(texts: Sequence[str]) -> str:
    """Identical, anonymous `<candidate>` blocks, one per text, in the given order."""
    return "\n".join(f"<candidate>\n{t.strip()}\n</candidate>" for t in texts)


# --- Student prompts ------------------------------------------------------------------------


def with_closing(prompt_text: str) -> str:
    """The prompt, a blank line, then the closing instruction (Fig. 8).

    Apply exactly once to every prompt the student sees: plain, BCQ, NCQ, hint; training and
    evaluation alike.
    """
    return f"{prompt_text.rstrip()}\n\n{CLOSING_INSTRUCTION}"


def build_bcq(question: str, correct: str, wrong: str, rng: random.Random) -> str:
    """Binary-choice question (Fig. 17), without the closing instruction.

    `correct` is a compressed teacher-correct trace, `wrong` a compressed student-wrong one.
    `rng` decides their order; the two blocks are otherwise identical, so nothing but their
    content says which is which.
    """
    pair = [correct, wrong]
    rng.shuffle(pair)
    return f"{question.rstrip()}\n\n{BCQ_INSTRUCTION}\n{_candidates(pair)}"


def build_ncq(
    question: str, wrong_traces: Sequence[str], wrong_answers: Sequence[str | None]
) -> str:
    """Negative-choice question (Fig. 18), without the closing instruction.

    `wrong_traces[i]` is the compressed i-th wrong student rollout and `wrong_answers[i]` its
    final answer as written (`zppo_fast.reward.boxed_answer`; `None`, "" or `NO_ANSWER` when it
    has none; see the module docstring for how those are shown).
    Every trace becomes one candidate block, in the given order.
    """
    if len(wrong_traces) != len(wrong_answers):
        raise ValueError(
            f"build_ncq: {len(wrong_traces)} traces but {len(wrong_answers)} answers"
        )
    if not wrong_traces:
        raise ValueError("build_ncq: an NCQ needs at least one wrong rollout")
    answers: dict[str, str] = {}  # normalized -> as first written
    for answer in wrong_answers:
        answer = (answer or "").strip()
        if answer and answer != NO_ANSWER:
            answers.setdefault(normalize_answer(answer), answer)
    if answers:
        boxed = ", ".join(f"\\boxed{{{a}}}" for a in answers.values())
        header = _render(NCQ_HEADER, answers=boxed)
    else:
        header = NCQ_CANDIDATES_SENTENCE
    return f"{question.rstrip()}\n\n{header}\n{_candidates(wrong_traces)}"


def with_hint(question: str, hint: str) -> str:
    """Hint baseline's student prompt: the question, a blank line, `<hint>{hint}</hint>`.

    Without the closing instruction (apply `with_closing`).
    """
    return f"{question.rstrip()}\n\n<hint>{hint.strip()}</hint>"


# --- Teacher prompts and their outputs ------------------------------------------------------


def strip_thinking(teacher_output: str) -> str:
    """The teacher's output without its reasoning: everything up to the last `</think>` dropped
    (a complete block, or one whose `<think>` the chat template put in the prompt), then an
    unclosed `<think>` and all after it (reasoning cut off by the token cap). Never raises."""
    text = teacher_output.rsplit("</think>", 1)[-1]
    return text.split("<think>", 1)[0]


def build_compression_prompt(response: str) -> str:
    """Teacher prompt that compresses one candidate trace into a <= 5-line summary (Fig. 16)."""
    return _render(COMPRESSION_TEMPLATE, response=response.strip())


def parse_summary(teacher_output: str) -> str:
    """The compressed candidate inside the teacher's output, stripped; never raises.

    Reasoning is dropped first (`strip_thinking`); then the text inside the last complete
    `<summary>...</summary>` pair; else (output cut off) the text after the last opening
    `<summary>`; else the whole output.
    """
    teacher_output = strip_thinking(teacher_output)
    close = teacher_output.rfind("</summary>")
    if close != -1:
        # The opening tag nearest before the last closing one forms the last complete pair.
        open_ = teacher_output.rfind("<summary>", 0, close)
        if open_ != -1:
            return teacher_output[open_ + len("<summary>") : close].strip()
    open_ = teacher_output.rfind("<summary>")
    if open_ != -1:
        return teacher_output[open_ + len("<summary>") :].strip()
    return teacher_output.strip()


def build_hint_prompt(correct_response: str) -> str:
    """Teacher prompt that turns one correct rollout into an answer-free hint (Fig. 19)."""
    return _render(HINT_TEMPLATE, response=correct_response.strip())


def build_judge_prompt(
    question: str, options: str | None, model_response: str, ground_truth: str
) -> str:
    """LLM-judge prompt (Fig. 9); the options section is left out when `options` is empty."""
    if options and options.strip():
        template = JUDGE_TEMPLATE.replace(
            _JUDGE_OPTIONS_SECTION, "## Answer Options\n{{ options }}\n"
        )
        options = options.strip()
    else:
        template = JUDGE_TEMPLATE.replace(_JUDGE_OPTIONS_SECTION, "")
        options = ""
    return _render(
        template,
        question=question.strip(),
        options=options,
        model_response=model_response.strip(),
        ground_truth=ground_truth.strip(),
    )


def parse_judge_verdict(text: str) -> bool | None:
    """True for `{"verdict": "correct"}`, False for `{"verdict": "wrong"}`, None otherwise.

    Strict, as the paper scores it: the whole output after its reasoning (`strip_thinking`), up
    to surrounding whitespace, must be exactly that one-key JSON object.
    """
    try:
        obj = json.loads(strip_thinking(text))
    except (json.JSONDecodeError, TypeError):
        return None
    if not isinstance(obj, dict) or obj.keys() != {"verdict"}:
        return None
    verdict = obj["verdict"]
    if verdict == "correct":
        return True
    if verdict == "wrong":
        return False
    return None
