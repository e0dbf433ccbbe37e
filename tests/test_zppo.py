"""ZPPO's step: reformulations from a teacher, the algo switch end to end, no teacher token in the loss."""

import random

import pytest
import torch
from batches import hidden_grad

from zppo_fast import prompts
from zppo_fast.batch import Rollout, RolloutBatch
from zppo_fast.config import ZPPOConfig
from zppo_fast.data import chat_prompt_ids
from zppo_fast.engine import Sample, SamplingParams
from zppo_fast.model import ModelLoadError
from zppo_fast.reward import NO_ANSWER
from zppo_fast.task import Problem
from zppo_fast.train import Trainer
from zppo_fast.zppo import ALGOS, Reformulator


class ScriptedTeacher:
    """A rollout engine whose answers are fixed per prompt text, to check the step's bookkeeping."""

    def __init__(self, tokenizer, answers: dict[str, list[str]]):
        self.tokenizer, self.answers, self.calls = tokenizer, answers, []

    def generate(self, prompt_ids, params: SamplingParams):
        out = []
        for ids in prompt_ids:
            text = self.tokenizer.decode(ids)
            self.calls.append(text)
            if "Compress the response below" in text:
                body = text.split("<response>\n")[1].split("\n</response>")[0]
                # It reasons first (stripped by parse_summary) and shows the candidate's own tags as
                # parentheses, so that what reaches the prompt is its summary, not its reasoning.
                out.append([Sample([1], f"<think>compressing</think> noise <summary>S[{shown(body)}]</summary>",
                                   "stop", [0.0])])
            else:
                key = next(k for k in self.answers if k in text)
                out.append([Sample([1], a, "stop", [0.0]) for a in self.answers[key][: params.n]])
        return out


@pytest.fixture(scope="module")
def tokenizer():
    from zppo_fast.data import tokenizer_corpus
    from zppo_fast.task import ArithmeticTask
    from zppo_fast.tokenizer import build_tokenizer

    return build_tokenizer(tokenizer_corpus(ArithmeticTask(), size=300), vocab_size=400)


def shown(text: str) -> str:
    """A candidate as ScriptedTeacher's summaries show it."""
    return text.replace("<think>", "(").replace("</think>", ")")


def test_reformulations_follow_algorithm_1(tokenizer):
    problems = [Problem(i, f"Q{i} what is it?", str(i), "") for i in range(4)]
    right, wrong = (lambda i: f"<think>ok</think> \\boxed{{{i}}}"), (lambda i: f"<think>no</think> \\boxed{{{i + 10}}}")
    teacher = ScriptedTeacher(tokenizer, {
        "Q0 ": [right(0), wrong(0), wrong(0), wrong(0)],  # teacher right once: BCQ-eligible
        "Q1 ": [wrong(1)] * 4,  # teacher never right: NCQ only
        "Q2 ": [right(2)] * 4,
        "Q3 ": [right(3)] * 4,
    })
    texts = [[wrong(0), "", "no box at all"], [wrong(1), wrong(1), right(1)], [right(2)] * 3, [right(3), wrong(3), right(3)]]
    rewards = [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0] * 3, [1.0, 0.0, 1.0]]
    cfg = ZPPOConfig(teacher_group_size=4, compression="teacher")
    reform = Reformulator(teacher, tokenizer, cfg, kinds=("bcq", "ncq"), seed=0)
    out, m = reform(problems, texts, rewards, cap=3, step=1)
    # Hard: Q0 (0/3) and Q1 (1/3); Q3 (2/3) and Q2 are not. Ascending accuracy: Q0 BCQ, Q0 NCQ, Q1 NCQ.
    assert [(r.question, r.kind) for r in out] == [(0, "bcq"), (0, "ncq"), (1, "ncq")]
    assert m["zppo/hard_frac"] == 0.5 and m["zppo/bcq_eligible"] == 1
    assert m["zppo/teacher_acc_on_hard"] == pytest.approx(1 / 8)
    # Teacher rollouts were drawn for the hard questions only.
    assert sum("Compress" not in c for c in teacher.calls) == 2
    bcq = out[0].text
    assert bcq.count("<candidate>\n") == 2 and f"S[{shown(right(0))}]" in bcq and "compressing" not in bcq
    assert any(f"S[{shown(w)}]" in bcq for w in (wrong(0), "", "no box at all"))
    ncq = out[1].text
    assert ncq.count("<candidate>\n") == 3  # every wrong rollout, the empty and unboxed ones included
    assert "\\boxed{10}" in ncq and NO_ANSWER not in ncq
    assert out[2].text.count("<candidate>\n") == 2 and out[2].candidate_answers == {"11"}


def test_ncq_lists_the_wrong_answers_as_written(tokenizer):
    problems = [Problem(0, "Q0 what is it?", "3", "")]
    teacher = ScriptedTeacher(tokenizer, {"Q0 ": ["\\boxed{4}"] * 2})
    texts = [["a \\boxed{\\frac{1}{2} \\text{ cm}}", "b \\boxed{ \\dfrac{1}{2}\\text{cm} }", "c \\boxed{Paris}"]]
    reform = Reformulator(teacher, tokenizer, ZPPOConfig(teacher_group_size=2, compression="none"), kinds=("ncq",))
    [ncq], _ = reform(problems, texts, [[0.0] * 3], cap=1, step=1)
    # as the student wrote them (not "1/2cm", "paris"); the second is the first after normalization
    assert "all WRONG: \\boxed{\\frac{1}{2} \\text{ cm}}, \\boxed{Paris}. Below" in ncq.text


def test_the_teacher_is_asked_only_about_questions_pre_cap_keeps(tokenizer):
    problems = [Problem(i, f"Q{i} what is it?", str(i), "") for i in range(4)]
    teacher = ScriptedTeacher(tokenizer, {f"Q{i} ": [f"\\boxed{{{i}}}"] * 2 for i in range(4)})
    rewards = [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]  # hard: 1, 3 (0/3), 0 (1/3)
    texts = [["\\boxed{9}"] * 3] * 4
    cfg = ZPPOConfig(teacher_group_size=2, compression="none")
    out, m = Reformulator(teacher, tokenizer, cfg, kinds=("bcq", "ncq"))(problems, texts, rewards, cap=2, step=1)
    assert [(r.question, r.kind) for r in out] == [(1, "bcq"), (1, "ncq")]
    assert [c.split(" what")[0][-2:] for c in teacher.calls] == ["Q1", "Q3"] and m["zppo/teacher_questions"] == 2
    teacher.calls.clear()  # BCQ alone: every hard question is asked, eligibility decides what is kept
    out, m = Reformulator(teacher, tokenizer, cfg, kinds=("bcq",))(problems, texts, rewards, cap=2, step=1)
    assert sorted(c.split(" what")[0][-2:] for c in teacher.calls) == ["Q0", "Q1", "Q3"]
    assert [(r.question, r.kind) for r in out] == [(1, "bcq"), (3, "bcq")]


def test_bcq_needs_a_correct_teacher_rollout_and_cap_zero(tokenizer):
    problems = [Problem(0, "Q0 x?", "3", "")]
    teacher = ScriptedTeacher(tokenizer, {"Q0 ": ["\\boxed{4}"] * 4})
    reform = Reformulator(teacher, tokenizer, ZPPOConfig(compression="none"), kinds=("bcq",), seed=0)
    out, m = reform(problems, [["\\boxed{5}"] * 2], [[0.0, 0.0]], cap=4, step=1)
    assert out == [] and m["zppo/bcq_eligible"] == 0
    both = Reformulator(teacher, tokenizer, ZPPOConfig(compression="none"), kinds=("bcq", "ncq"), seed=0)
    assert both(problems, [["\\boxed{5}"] * 2], [[0.0, 0.0]], cap=0, step=1)[0] == []


def test_bad_compression_setting(tokenizer):
    with pytest.raises(ValueError, match="zppo.compression"):
        Reformulator(None, tokenizer, ZPPOConfig(compression="gzip"), kinds=("bcq",))


def test_no_teacher_token_is_trained(tiny_config):
    """The loss reads the student's completion only: whatever the teacher wrote into the prompt,
    the final hidden states at prompt positions get exactly zero gradient, and changing the
    teacher's text changes neither the trained tokens nor their count."""
    trainer = Trainer(tiny_config("--run.steps", "1"), progress=False)
    tok = trainer.tokenizer
    response = tok("<think>1+1=2</think>\n\\boxed{2}", add_special_tokens=False)["input_ids"]
    targets = []
    for teacher_text in ("<think>1+1=2</think> \\boxed{2}", "<think>7-5=3</think> \\boxed{3} extra words"):
        text = prompts.build_bcq("Ann has 1 pens, gets 1 more. How many?", teacher_text, "\\boxed{5}", random.Random(0))
        prompt = chat_prompt_ids(tok, text)
        batch = RolloutBatch([Rollout(prompt, response, 1.0, 0), Rollout(prompt, response[:-2], 0.0, 0)])
        old, _ = trainer.logprobs(batch)
        (mb,) = trainer.microbatches(batch, [0, 1])  # one packed row: prompt, response, prompt, response[:-2]
        grad = hidden_grad(trainer, batch, old, torch.tensor([1.0, -1.0]))  # (T,) over the packed row
        for start in (0, len(prompt) + len(response)):
            assert (grad[start : start + len(prompt) - 1] == 0).all()
        assert (grad[len(prompt) - 1 : len(prompt) - 1 + len(response)] > 0).all()
        targets.append(mb.targets.tolist())
    assert targets[0] == targets[1] == response + response[:-2]


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_every_algo_runs_two_steps(tiny_config, algo):
    trainer = Trainer(tiny_config("--rl.algo", algo, "--run.steps", "2", "--run.checkpoint_every", "1"), progress=False)
    history = trainer.fit()
    assert len(history) == 2
    uses = ALGOS[algo]
    assert ("replay/size" in history[-1]) == uses.replay
    # Each guide reports under its own prefix: Reformulator zppo/, HintPrefixBuilder hint/ or prefix/.
    guide = {("bcq", "ncq"): "zppo", ("bcq",): "zppo", ("ncq",): "zppo", ("hint",): "hint", ("prefix",): "prefix"}
    assert {k for k in history[-1] if k.endswith("/hard_frac")} == ({f"{guide[uses.kinds]}/hard_frac"} if uses.kinds else set())
    # The loss: the clipped surrogate, or the JSD to the teacher (one optimizer step, no old log-probs).
    for h in history:
        assert ("loss/approx_kl" in h) == (not uses.distill) and ("time/old_logprobs" in h) == (not uses.distill)
        assert ("loss/jsd" in h) == uses.distill and ("distill/teacher_acc" in h) == (uses.loss == "off_distill")
        assert h.get("loss/trained_tokens", 0) > 0
        if uses.loss == "on_distill":  # the student's own rollouts are what it trains on
            assert h["loss/trained_tokens"] == h["perf/student_tokens"]
    if uses.replay:
        assert (trainer.run_dir / "report.json").is_file() and (trainer.run_dir / "graduation.png").is_file()
        resumed = Trainer(tiny_config("--rl.algo", algo, "--run.steps", "2"), resume=trainer.run_dir, progress=False)
        assert list(resumed.buffer.ids()) == list(trainer.buffer.ids())


def test_teacher_path_that_does_not_load(tiny_config, tmp_path):
    with pytest.raises(ModelLoadError, match="nowhere"):
        Trainer(tiny_config("--rl.algo", "zppo", "--zppo.teacher_path", str(tmp_path / "nowhere")), progress=False)


def test_teacher_with_its_own_tokenizer(tokenizer):
    """A real teacher whose tokenizer differs from the student's: it reads text re-tokenized with its
    own vocabulary and writes text, which the student's tokenizer then encodes (ids are never shared)."""
    from zppo_fast.config import ModelConfig
    from zppo_fast.data import tokenizer_corpus
    from zppo_fast.engine import TransformersEngine
    from zppo_fast.model import build_tiny_model
    from zppo_fast.task import ArithmeticTask
    from zppo_fast.tokenizer import build_tokenizer

    teacher_tok = build_tokenizer(tokenizer_corpus(ArithmeticTask(max_operand=3), size=100, seed=5), vocab_size=300)
    assert teacher_tok.get_vocab() != tokenizer.get_vocab()
    teacher = TransformersEngine(build_tiny_model(ModelConfig(hidden_size=32), teacher_tok, seed=2), teacher_tok)
    cfg = ZPPOConfig(compression="teacher", compression_max_tokens=8, teacher_max_new_tokens=8)
    problems = [Problem(0, "Ann has 3 pens, loses 1. How many pens does Ann have now?", "2", "")]
    out, m = Reformulator(teacher, teacher_tok, cfg, kinds=("bcq", "ncq"), seed=0)(
        problems, [["\\boxed{5}", "   ", "<think>3-1=4</think>"]], [[0.0, 0.0, 0.0]], cap=2, step=1)
    assert [r.kind for r in out][-1] == "ncq" and m["zppo/teacher_tokens"] > 0
    ids = chat_prompt_ids(tokenizer, out[-1].text)
    assert max(ids) < len(tokenizer) and "The following answers are all WRONG: \\boxed{5}." in tokenizer.decode(ids)
