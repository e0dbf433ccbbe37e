"""The teacher's rollouts: a vision-language teacher sees the question's images; every teacher
rollout is graded by the trainer's grader (multiple-choice letters, not only \\boxed{} equality)."""

import json

import pytest
import torch
from PIL import Image

from zppo_fast.baselines import GuidanceSettings, HintPrefixBuilder, distillation_data
from zppo_fast.config import ConfigError, ZPPOConfig
from zppo_fast.data import chat_prompt_ids, tokenizer_corpus
from zppo_fast.engine import Sample
from zppo_fast.graders import get_grader
from zppo_fast.task import ArithmeticTask, Problem
from zppo_fast.tokenizer import build_tokenizer
from zppo_fast.train import Trainer
from zppo_fast.vlm import build_tiny_vlm
from zppo_fast.zppo import Reformulator, grader_scores

FAST = ["--rl.batch_size", "4", "--rl.group_size", "2", "--rl.num_minibatches", "1", "--run.checkpoint_every", "100",
        "--rollout.max_new_tokens", "6", "--zppo.teacher_max_new_tokens", "6", "--zppo.teacher_group_size", "2"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class ScriptedTeacher:
    """Answers every prompt with `answer`; records each call's prompt ids and images."""

    def __init__(self, answer: str):
        self.answer, self.calls = answer, []

    def generate(self, prompts, params, **kw):
        self.calls.append((prompts, kw))
        return [[Sample([1, 2], self.answer, "stop", [0.0, 0.0]) for _ in range(params.n)] for _ in prompts]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(tokenizer_corpus(ArithmeticTask(max_operand=50), size=300), vocab_size=300)


# Multiple choice: the right option's text is "12" at the gold letter; the scripted teacher boxes it.
MC = [Problem(i, f"Which is twelve? ({i})", gold, choices=choices)
      for i, (gold, choices) in enumerate([("B", ("7", "12")), ("A", ("12", "3")), ("C", ("1", "2", "12"))])]


@pytest.mark.parametrize("grader, eligible", [("boxed", 0), ("choice", 3)])
def test_teacher_rollouts_are_graded_by_the_given_grader(tokenizer, grader, eligible):
    grade_fn = grader_scores(get_grader(grader))
    wrong = [[r"\boxed{A}" if p.answer != "A" else r"\boxed{B}"] for p in MC]
    zero = [[0.0] for _ in MC]

    teacher = ScriptedTeacher(r"So the answer is \boxed{12}.")
    reform = Reformulator(teacher, tokenizer, ZPPOConfig(compression="none"), ("bcq",), grade_fn=grade_fn)
    out, m = reform(MC, wrong, zero, cap=8, step=0)
    assert m["zppo/bcq_eligible"] == eligible and m["zppo/teacher_acc_on_hard"] == eligible / 3
    assert sum(r.kind == "bcq" for r in out) == eligible
    # A text teacher's prompts are exactly today's chat prompts, and no images go along.
    prompts, kw = teacher.calls[0]
    assert prompts == [chat_prompt_ids(tokenizer, p.question) for p in MC] and kw == {}

    builder = HintPrefixBuilder("prefix", ScriptedTeacher(r"So the answer is \boxed{12}."), tokenizer, tokenizer,
                                grade_fn=grade_fn)
    _, m = builder(MC, wrong, zero, cap=8, step=0)
    assert m["prefix/eligible"] == eligible

    examples, m = distillation_data(ScriptedTeacher(r"\boxed{12}"), tokenizer, MC, GuidanceSettings(), 0,
                                    grade_fn=grade_fn)
    assert m["distill/questions_covered"] == eligible and len(examples) == eligible * GuidanceSettings().teacher_group_size


def test_default_grading_is_boxed(tokenizer):
    problems = [Problem(0, "What is 1 + 1?", "2")]
    out, m = Reformulator(ScriptedTeacher(r"\boxed{2}"), tokenizer, ZPPOConfig(compression="none"), ("bcq",))(
        problems, [[r"\boxed{3}"]], [[0.0]], cap=4, step=0)
    assert m["zppo/bcq_eligible"] == 1 and [r.kind for r in out] == ["bcq"]


def test_trainer_grades_teacher_rollouts_with_data_grader(tiny_config, tmp_path):
    """data.grader = choice: a teacher boxing the right option's text is teacher-correct, so BCQ is built."""
    rows = [{"id": f"c{p.id}", "question": p.question, "answer": p.answer, "choices": list(p.choices)} for p in MC]
    rows.append({"id": "c3", "question": "Which is twelve? (3)", "answer": "B", "choices": ["5", "12"]})
    rows.append({"id": "c4", "question": "Which is twelve? (4)", "answer": "A", "choices": ["12", "9"]})  # 4 + 1 replayed
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    trainer = Trainer(tiny_config("--run.steps", "1", "--data.train", str(data), "--data.grader", "choice",
                                  "--rl.algo", "grpo_replay_bcq", *FAST), progress=False)
    teacher = ScriptedTeacher(r"The answer is \boxed{12}.")
    trainer.teacher_engine.generate = teacher.generate
    m = trainer.step()
    assert teacher.calls and m["zppo/hard_frac"] > 0
    assert m["zppo/teacher_acc_on_hard"] == 1.0 and m["zppo/bcq_eligible"] >= 1 and m["zppo/bcq_built"] >= 1


@pytest.fixture
def vlm_data(tmp_path, tokenizer):
    """A tiny Qwen3.5 VLM folder (student and teacher) and a JSONL of image questions plus a text row."""
    model, processor = build_tiny_vlm(tokenizer, seed=0)
    folder = tmp_path / "vlm"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    rows = []
    for i, color in enumerate([(220, 30, 30), (20, 40, 230), (10, 200, 60)]):
        Image.new("RGB", (48, 40), color).save(tmp_path / f"im{i}.png")
        rows.append({"id": f"v{i}", "question": f"What colour, plus {i}?", "answer": str(i + 1), "images": [f"im{i}.png"]})
    rows.append({"id": "t", "question": "What is 1 + 1?", "answer": "2"})
    rows.append({"id": "t2", "question": "What is 2 + 2?", "answer": "4"})  # rl.batch_size 4 + 1 replayed
    return folder, write_jsonl(tmp_path / "images.jsonl", rows)


def test_vlm_teacher_sees_the_question_images(tiny_config, vlm_data):
    folder, data = vlm_data
    trainer = Trainer(tiny_config("--run.steps", "1", "--model.path", str(folder), "--zppo.teacher_path", str(folder),
                                  "--data.train", str(data), "--data.grader", "boxed", "--rl.algo", "zppo",
                                  "--zppo.compression", "teacher", "--zppo.compression_max_tokens", "4", *FAST),
                      progress=False)
    processor, engine_processor = trainer.teacher_processor, trainer.teacher_engine.engine.processor
    # The engine loads its own copy (it may live in a process of its own): the same processor, not the same object.
    assert processor is not None and engine_processor is not None
    assert engine_processor.image_token_id == processor.image_token_id
    assert engine_processor.image_processor.to_dict() == processor.image_processor.to_dict()
    image_token = processor.image_token_id

    calls = []
    generate = trainer.teacher_engine.generate
    trainer.teacher_engine.generate = lambda prompts, params, images=None: calls.append((prompts, images)) or generate(
        prompts, params, images=images)
    m = trainer.step()

    assert m["zppo/hard_frac"] > 0  # the random student is wrong: every question is hard
    rollouts = [(p, ims) for p, ims in calls if ims is not None]
    assert rollouts, "the teacher's rollouts carried no images"
    seen = 0
    for prompts, images in rollouts:
        assert len(images) == len(prompts)
        for ids, ims in zip(prompts, images):
            assert (image_token in ids) == bool(ims)  # placeholders exactly where the question has images
            seen += bool(ims)
    assert seen >= 1
    # The compression prompts read the candidates' text only.
    compress = [p for p, ims in calls if ims is None]
    assert compress and all(image_token not in ids for p in compress for ids in p)


class AnsweringTeacher:
    """The teacher's engine made right: each rollout boxes its question's gold answer (the questions
    are told apart by their decoded text); records the images each call carried."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        self.tokenizer, self.answers, self.images = tokenizer, answers, []

    def generate(self, prompts, params, images=None):
        self.images.append(images)
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            answer = rf"\boxed{{{next(a for q, a in self.answers.items() if q in text)}}}"
            tokens = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            out.append([Sample(tokens, answer, "stop", [0.0] * len(tokens))] * params.n)
        return out


@pytest.mark.parametrize("algo", ["off_distill", "on_distill"])
def test_distillation_with_a_vlm_student(tiny_config, vlm_data, tokenizer, tmp_path, algo):
    """A tiny Qwen3.5 VLM student distilled from another (a VLM teacher of other weights): one step
    trains on image rows, and the teacher's scoring forward reads those rows with their images (an
    ImageMicroBatch with pixels)."""
    from zppo_fast.vlm import ImageMicroBatch

    folder, data = vlm_data
    teacher_dir = tmp_path / "teacher"
    for part in build_tiny_vlm(tokenizer, seed=1):
        part.save_pretrained(teacher_dir)
    trainer = Trainer(tiny_config("--run.steps", "1", "--model.path", str(folder),
                                  "--zppo.teacher_path", str(teacher_dir),
                                  "--data.train", str(data), "--data.grader", "boxed", "--rl.algo", algo, *FAST),
                      progress=False)
    answers = {r.question: r.answer for r in trainer.task.records}
    teacher = AnsweringTeacher(trainer.tokenizer, answers)
    trainer.teacher_engine.generate = teacher.generate
    scored = []
    forward = trainer.teacher_lm.forward
    trainer.teacher_lm.forward = lambda mb: scored.append(mb) or forward(mb)
    before = [p.detach().full_tensor().clone() for p in trainer.policy.parameters()]
    m = trainer.step()

    assert m["loss/jsd"] > 0 and m["loss/trained_tokens"] > 0
    if algo == "off_distill":
        assert m["distill/teacher_acc"] == 1.0
        assert any(ims is not None and any(ims) for ims in teacher.images)  # its rollouts saw the images
    image_mbs = [mb for mb in scored if isinstance(mb, ImageMicroBatch) and mb.pixel_values is not None]
    assert image_mbs and all(trainer.processor.image_token_id in mb.input_ids for mb in image_mbs)
    after = [p.detach().full_tensor() for p in trainer.policy.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_vlm_student_distillation_needs_a_vlm_teacher(tiny_config, tiny_cache, vlm_data):
    """Without zppo.teacher_path the refusal comes before the (text) warm-up teacher is trained; a text
    teacher folder given is named."""
    from pathlib import Path

    folder, data = vlm_data
    run = ["--run.steps", "1", "--model.path", str(folder), "--data.train", str(data), "--rl.algo", "on_distill", *FAST]
    with pytest.raises(ConfigError, match="vision-language teacher.*set zppo.teacher_path"):
        Trainer(tiny_config(*run, "--sft.cache_dir", str(Path(tiny_cache) / "never")), progress=False)
    assert not (Path(tiny_cache) / "never").exists()  # no warm-up was trained
    text_teacher = next(p.parent for p in Path(tiny_cache).glob("*/config.json"))
    with pytest.raises(ConfigError, match=f"vision-language teacher.*{text_teacher} has no vision tower"):
        Trainer(tiny_config(*run, "--zppo.teacher_path", str(text_teacher)), progress=False)
