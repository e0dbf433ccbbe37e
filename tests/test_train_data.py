"""The trainer on the user's data files: text and image questions, bad rows, held-out evaluation."""

import json
from dataclasses import replace

import pytest
import torch
from PIL import Image

from zppo_fast.config import ConfigError
from zppo_fast.data import tokenizer_corpus
from zppo_fast.datasets import DatasetError
from zppo_fast.file_task import FileTask
from zppo_fast.graders import Verdict, register_grader
from zppo_fast.sft import cache_path
from zppo_fast.task import ArithmeticTask
from zppo_fast.tokenizer import build_tokenizer
from zppo_fast.train import Trainer
from zppo_fast.vlm import ImageMicroBatch, VLMPolicy, build_tiny_vlm

FAST = ["--rl.batch_size", "4", "--rl.group_size", "4", "--rl.num_minibatches", "2", "--run.checkpoint_every", "100"]


GRADED = []  # every item the recording grader was given


@register_grader("test_recording")
class RecordingGrader:
    """Scores a response 1 when its text has even length (a mix of rewards, so the update has
    non-zero advantages) and records every item in GRADED."""

    def grade_batch(self, items):
        GRADED.extend(items)
        return [Verdict(float(len(it.response) % 2 == 0), "correct", "") for it in items]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def arithmetic_rows(n, offset=0):
    """Rows of the tiny student's own task (operands up to 2), so it earns some reward."""
    task = ArithmeticTask(max_operand=2)
    return [{"id": f"q{offset + i}", "question": p.question, "answer": p.answer}
            for i, p in enumerate(task.problem(q) for q in task.train_ids()[offset : offset + n])]


BAD_ROWS = ['{"id": "b1", "question": "What is 1 + 1?"}',  # missing answer
            '{"id": "b2", "question": "What is 1 + 1?", "answer": ""}',  # empty answer
            '{"id": "b3", "question": "What is 1 + 1?", "answer": 2.0}',  # float answer
            'not json at all',
            '{"id": "q0", "question": "a duplicate id", "answer": "1"}']


def metrics_lines(trainer):
    return [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trains_two_steps_on_text_files_skipping_bad_rows(tiny_config, tmp_path):
    good = arithmetic_rows(10)
    long_row = {"id": "long", "question": "Count the apples: " + "apple " * 5000, "answer": "5000"}
    train_a = write_jsonl(tmp_path / "a.jsonl", good[:6] + BAD_ROWS + [long_row])
    train_b = write_jsonl(tmp_path / "b.jsonl", good[6:])
    GRADED.clear()
    trainer = Trainer(tiny_config("--run.steps", "2", "--data.train", f"{train_a},{train_b}",
                                  "--data.grader", "test_recording", *FAST), progress=False)
    task = trainer.task
    assert isinstance(task, FileTask) and len(task) == 10
    # Ids are positions in the kept order: file a's good rows, then file b's.
    assert [task.record(i).id for i in range(10)] == [r["id"] for r in good]
    assert task.problem(7).question == good[7]["question"] and task.problem(7).answer == good[7]["answer"]
    history = trainer.fit()
    assert len(history) == 2 and all(h["loss/trained_tokens"] > 0 for h in history)
    start = metrics_lines(trainer)[0]
    assert start["step"] == 0 and start["data/bad_rows"] == len(BAD_ROWS) and start["data/too_long"] == 1
    assert start["data/kept"] == 10 and start["data/rows"] == 10 + len(BAD_ROWS) + 1
    # The configured grader scored every rollout, against the files' gold answers.
    golds = {r["answer"] for r in good}
    assert len(GRADED) >= 2 * 4 * 4 and {it.gold for it in GRADED} <= golds
    assert {it.question for it in GRADED} <= {r["question"] for r in good}
    # The step's reward is the recording grader's verdicts (length parity) on its first 4 x 4 plain rollouts.
    assert history[0]["reward/mean"] == sum(len(it.response) % 2 == 0 for it in GRADED[:16]) / 16


def test_bad_rows_stop_the_run_at_startup_when_not_skipped(tiny_config, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(4) + BAD_ROWS[:1])
    with pytest.raises(DatasetError, match=r"train\.jsonl, line 5: missing field 'answer'"):
        Trainer(tiny_config("--data.train", str(train), "--data.skip_bad_rows", "false"), progress=False)


def test_missing_or_empty_data_files_fail_before_any_step(tiny_config, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", arithmetic_rows(8))  # rl.batch_size 8: enough for a step
    (tmp_path / "empty.jsonl").write_text("")
    bad_only = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS[:3])
    cases = [(["--data.train", str(tmp_path / "missing.jsonl")], DatasetError, r"data file .*missing\.jsonl does not exist"),
             (["--data.train", f"{good},{tmp_path / 'empty.jsonl'}"], DatasetError,
              r"empty\.jsonl has no usable rows: it is empty"),
             (["--data.train", str(bad_only)], DatasetError,
              r"bad\.jsonl has no usable rows: .*kept 0 of 3 rows.*missing_field=1"),
             (["--data.train", str(good), "--data.heldout", str(tmp_path / "gone.jsonl")], DatasetError,
              r"gone\.jsonl does not exist"),
             (["--data.train", str(write_jsonl(tmp_path / "train.csv", ["id,question,answer"]))], DatasetError,
              r"train\.csv: unknown data format '\.csv'"),
             # a row's own grader is read by data.grader = "auto" only: never ignored silently
             (["--data.train", str(write_jsonl(tmp_path / "named.jsonl", [arithmetic_rows(1)[0] | {"grader": "judge"}]))],
              ConfigError, r"named\.jsonl, line 1: the row names its grader \('judge'\) but data.grader = 'boxed'")]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message):
            Trainer(tiny_config(*overrides), progress=False)
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match=r"config key 'data.grader' must be one of auto, boxed, choice, .*got 'boxd'"):
        Trainer(tiny_config("--data.train", str(good), "--data.grader", "boxd"), progress=False)
    image = tmp_path / "dot.png"
    Image.new("RGB", (40, 40), (200, 10, 10)).save(image)
    with_image = write_jsonl(tmp_path / "img.jsonl", [{"id": "i", "question": "What?", "answer": "1",
                                                       "images": ["dot.png"]}])
    with pytest.raises(ConfigError, match=r"img\.jsonl, line 1: a row with images, but the student is a text model"):
        Trainer(tiny_config("--data.train", str(with_image), "--rl.batch_size", "1"), progress=False)


def test_a_data_set_too_small_for_a_step_fails_before_any_model_is_built(tiny_config, tmp_path, monkeypatch):
    """10 questions cannot give 16 distinct new ones, nor 8 + 3 replayed (rho_replay 0.375)."""
    import zppo_fast.train as train_module

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the data set's size was checked")

    monkeypatch.setattr(train_module, "model_from_config", no_model)
    monkeypatch.setattr(train_module, "build_transformers_engine", no_model)
    train = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(10))
    with pytest.raises(ConfigError, match=r"train\.jsonl: rows 10, kept 10, too_long 0, bad_rows 0\) has 10 usable "
                                          r"questions, but a step needs rl\.batch_size 16 \+ 4 replayed .* = 20"):
        Trainer(tiny_config("--data.train", str(train), "--rl.batch_size", "16", "--rl.algo", "grpo_replay"),
                progress=False)
    with pytest.raises(ConfigError, match=r"has 10 usable questions, but a step needs rl\.batch_size 8 \+ 3 replayed"):
        Trainer(tiny_config("--data.train", str(train), "--rl.algo", "grpo_replay", "--zppo.rho_replay", "0.375"),
                progress=False)
    with pytest.raises(ConfigError, match=r"the arithmetic task's training split \(\[task\]\) has \d+ usable "
                                          r"questions, but a step needs rl\.batch_size 100000 = 100000 distinct"):
        Trainer(tiny_config("--rl.batch_size", "100000"), progress=False)


def test_replay_run_crosses_epochs_of_a_small_data_set(tiny_config, tmp_path):
    """10 questions, 8 new + 2 replayed per step (the most that fit): the second step's batch
    straddles the epoch boundary, and every step's questions are distinct (the replay update
    refuses duplicate ids)."""
    train = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(10))
    trainer = Trainer(tiny_config("--run.steps", "3", "--data.train", str(train), "--rl.algo", "grpo_replay",
                                  "--data.grader", "test_recording", *FAST[2:], "--rl.batch_size", "8"),
                      progress=False)
    history = trainer.fit()
    assert len(history) == 3 and trainer.stream.epoch >= 1


def test_heldout_files_are_evaluated_every_n_steps(tiny_config, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(8))
    easy = write_jsonl(tmp_path / "easy.jsonl", arithmetic_rows(3, offset=20))
    letters = write_jsonl(tmp_path / "letters.jsonl", [
        {"id": "c1", "question": "Which is 1 + 1?", "choices": ["2", "3"], "answer": "A"},
        {"id": "c2", "question": "Which is 2 - 2?", "choices": ["1", "0"], "answer": "B"}])
    trainer = Trainer(tiny_config("--run.steps", "2", "--run.eval_every", "2", "--run.eval_samples", "2",
                                  "--data.train", str(train), "--data.heldout", f"{easy},{letters}",
                                  "--data.heldout_grader", "choice", *FAST), progress=False)
    history = trainer.fit()
    lines = metrics_lines(trainer)
    evaluated = [x["step"] for x in lines if "eval/easy_acc" in x]
    assert evaluated == [0, 2] and "eval/easy_acc" not in history[0]
    assert all(0.0 <= x["eval/letters_acc"] <= 1.0 for x in lines if "eval/letters_acc" in x)
    for step in (0, 2):
        folder = trainer.run_dir / "eval" / f"step_{step}"
        summary = json.loads((folder / "eval.json").read_text())
        assert summary["step"] == step and summary["decoding"]["samples"] == 2
        assert summary["decoding"]["temperature"] == 0.6 and summary["decoding"]["top_k"] == 20
        assert {n: d["questions"] for n, d in summary["datasets"].items()} == {"easy": 3, "letters": 2}
        assert summary["datasets"]["letters"]["grader"] == "choice"
        responses = [json.loads(x) for x in (folder / "responses.jsonl").read_text().splitlines()]
        assert len(responses) == (3 + 2) * 2
        acc = sum(r["score"] for r in responses if r["dataset"] == "easy") / 6
        assert [x["eval/easy_acc"] for x in lines if x["step"] == step] == [pytest.approx(acc)]
    assert not (trainer.run_dir / "eval" / "step_1").exists()


@pytest.fixture
def tiny_vlm_folder(tmp_path):
    """A tiny Qwen3.5 VLM and its processor saved as a model folder, and a JSONL of image questions."""
    tokenizer = build_tokenizer(tokenizer_corpus(ArithmeticTask(max_operand=50), size=300), vocab_size=300)
    model, processor = build_tiny_vlm(tokenizer, seed=0)
    folder = tmp_path / "vlm"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    rows = []
    for i, (color, size) in enumerate([((220, 30, 30), (60, 45)), ((20, 40, 230), (40, 40)),
                                       ((10, 200, 60), (90, 30)), ((240, 240, 20), (50, 50))]):
        im = Image.new("RGB", size, color)
        im.paste((255, 255, 255), (5, 5, 20, 20))
        im.save(tmp_path / f"im{i}.png")
        rows.append({"id": f"v{i}", "question": f"How many white squares, plus {i}?", "answer": str(i + 1),
                     "images": [f"im{i}.png"]})
    rows.append({"id": "t", "question": "What is 1 + 1?", "answer": "2"})  # a text row rides along
    return folder, write_jsonl(tmp_path / "images.jsonl", rows)


@pytest.mark.parametrize("share_prefix", ["false", "true"])
def test_vlm_student_trains_two_steps_with_images(tiny_config, tiny_vlm_folder, tmp_path, share_prefix):
    folder, data = tiny_vlm_folder
    base = tiny_config()
    teacher = cache_path(base.model, base.task, replace(base.sft, steps=base.zppo.teacher_sft_steps), "teacher")
    trainer = Trainer(tiny_config("--run.steps", "2", "--model.path", str(folder), "--data.train", str(data),
                                  "--data.grader", "test_recording", "--rl.algo", "zppo",
                                  "--zppo.teacher_path", str(teacher), "--rl.weight_decay", "0",
                                  "--rollout.max_new_tokens", "8", "--parallel.share_prefix", share_prefix, *FAST),
                      progress=False)
    assert isinstance(trainer.policy, VLMPolicy) and trainer.processor is not None
    image_token = trainer.processor.image_token_id

    calls, forwards = [], []
    generate = trainer.engine.generate
    trainer.engine.generate = lambda prompts, params, images=None: calls.append((prompts, images)) or generate(
        prompts, params, images=images)
    forward = trainer.policy.forward
    trainer.policy.forward = lambda mb: forwards.append(mb) or forward(mb)
    vision = lambda: trainer.policy.lm.model.visual.blocks[0].attn.qkv.weight.full_tensor().detach().clone()
    before = vision()
    history = trainer.fit()

    assert len(history) == 2 and all(h["loss/trained_tokens"] > 0 for h in history)
    # Plain rollouts: every image question's prompt holds placeholders and its images go along.
    for prompts, images in calls:
        assert images is not None and len(images) == len(prompts)
        for ids, ims in zip(prompts, images):
            assert (image_token in ids) == bool(ims)
    # Guided prompts (BCQ / NCQ: the random student is wrong on every question) keep the images.
    guided = [c for c in calls if any("<candidate>" in trainer.tokenizer.decode(p) for p in c[0])]
    assert guided and any(ims for _, images in guided for ims in images)
    assert sum(h.get("zppo/ncq_built", 0) + h.get("zppo/bcq_built", 0) for h in history) >= 1
    # The training forward ran image micro-batches through the vision tower: right-padded, or with
    # each group's prompt and images once.
    image_mbs = [mb for mb in forwards if isinstance(mb, ImageMicroBatch) and mb.pixel_values is not None]
    assert image_mbs and all(mb.cu_seqlens is None for mb in image_mbs)
    assert all((mb.shared is not None) == (share_prefix == "true") for mb in image_mbs)
    # With no weight decay only a gradient moves a weight: the vision tower learned, and the push
    # carried it into the engine's copy.
    after = vision()
    assert not torch.equal(before, after)
    torch.testing.assert_close(trainer.engine.engine.model.model.visual.blocks[0].attn.qkv.weight, after)


REWARDS = '''
import json, os, re

LOG = os.path.join(os.path.dirname(__file__), "calls.jsonl")

def _log(kind, responses, golds, scores):
    with open(LOG, "a") as f:
        f.write(json.dumps({"kind": kind, "responses": responses, "golds": golds, "scores": scores}) + "\\n")

def partial(responses, golds):
    """1 for the right boxed answer, 0.5 for any other box, 0 without one."""
    scores = []
    for r, g in zip(responses, golds):
        boxed = re.findall(r"\\\\boxed\\{([^}]*)\\}", r)
        scores.append(1.0 if boxed and boxed[-1].strip() == g else 0.5 if boxed else 0.0)
    _log("batched", responses, golds, scores)
    return scores
partial.batched = True

def has_digit(response, gold):
    score = float(any(c.isdigit() for c in response))
    _log("item", [response], [gold], [score])
    return score
'''


def test_trains_on_a_hugging_face_layout_with_a_user_reward_function(tiny_config, tmp_path):
    """A `datasets` folder with its own column names and no id column trains through `data.*_key`,
    rewarded by the user's batched function; held-out rows in the same layout are graded per item."""
    datasets = pytest.importorskip("datasets")
    rows = arithmetic_rows(8)
    datasets.Dataset.from_dict({"problem": [r["question"] for r in rows], "solution": [r["answer"] for r in rows],
                                "source": ["tiny"] * 8}).save_to_disk(str(hub := tmp_path / "hub_set"))
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"problem": r["question"], "solution": r["answer"]}
                                                       for r in arithmetic_rows(3, offset=20)])
    (tmp_path / "rewards.py").write_text(REWARDS)
    keys = ["--data.question_key", "problem", "--data.answer_key", "solution", "--data.id_key", "none"]
    rewards = tmp_path / "rewards.py"
    trainer = Trainer(tiny_config("--run.steps", "1", "--run.eval_every", "1", "--data.train", str(hub),
                                  "--data.heldout", str(heldout), "--data.grader", f"{rewards}:partial",
                                  "--data.heldout_grader", f"{rewards}:has_digit", *keys, *FAST), progress=False)
    assert [trainer.task.record(i).id for i in range(8)] == [f"row {i}" for i in range(8)]
    (metrics,) = trainer.fit()
    calls = [json.loads(x) for x in (tmp_path / "calls.jsonl").read_text().splitlines()]
    batched = [c for c in calls if c["kind"] == "batched"]
    # One call for the step's 4 x 4 plain rollouts, against the 'solution' column's answers; the
    # step's rewards are the function's scores, fractions included.
    assert len(batched) == 1 and len(batched[0]["scores"]) == 16
    assert set(batched[0]["golds"]) <= {r["answer"] for r in rows}
    assert metrics["reward/mean"] == pytest.approx(sum(batched[0]["scores"]) / 16)
    assert metrics["loss/trained_tokens"] > 0
    # Held-out: per-item calls (3 questions, one sample each, at steps 0 and 1), logged with row ids.
    items = [c for c in calls if c["kind"] == "item"]
    assert len(items) == 2 * 3
    log = trainer.run_dir / "eval" / "step_1" / "responses.jsonl"
    responses = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["id"] for r in responses] == ["line 1", "line 2", "line 3"]
    assert [r["score"] for r in responses] == [c["scores"][0] for c in items[3:]]
    assert metrics["eval/heldout_acc"] == pytest.approx(sum(r["score"] for r in responses) / 3)


def test_a_reward_function_that_cannot_be_imported_stops_the_run_at_startup(tiny_config, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(4))
    (tmp_path / "rewards.py").write_text(REWARDS)
    for spec, message in [(f"{tmp_path / 'rewards.py'}:partal",
                           r"rewards\.py' has no 'partal'; its functions: has_digit, partial"),
                          ("not_a_module_here:fn", r"cannot import 'not_a_module_here': ModuleNotFoundError")]:
        with pytest.raises(ConfigError, match=message):
            Trainer(tiny_config("--data.train", str(train), "--data.grader", spec), progress=False)
