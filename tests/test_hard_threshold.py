"""`zppo.hard_threshold` decides "hard" everywhere: BCQ/NCQ selection, the Hint/Prefix baselines and
the replay buffer's admission, so a non-default value moves all three alike."""

import pytest
from test_baselines import ScriptedTeacher, right

from zppo_fast.baselines import GuidanceSettings, HintPrefixBuilder
from zppo_fast.config import ZPPOConfig
from zppo_fast.data import tokenizer_corpus
from zppo_fast.replay import PromptReplayBuffer
from zppo_fast.selection import select_reformulations
from zppo_fast.task import ArithmeticTask, Problem
from zppo_fast.tokenizer import build_tokenizer
from zppo_fast.zppo import Reformulator

# Plain-rollout rewards of four questions: accuracies 0, 1/3, 2/3, 1.
REWARDS = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
ACCURACY = [sum(r) / 3 for r in REWARDS]
# threshold -> the hard questions (accuracy strictly below it)
HARD = {0.5: [0, 1], 0.7: [0, 1, 2], 0.3: [0]}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(tokenizer_corpus(ArithmeticTask(), size=300), vocab_size=400)


def _problems():
    return [Problem(i, f"Q{i} how many?", str(i), "") for i in range(4)]


def _teacher(tokenizer):
    return ScriptedTeacher(tokenizer, rollouts={f"Q{i} ": [right(i)] for i in range(4)})  # always right


def _texts():
    return [[right(i) if r else "\\boxed{99}" for r in rewards] for i, rewards in enumerate(REWARDS)]


@pytest.mark.parametrize("threshold", sorted(HARD))
def test_selection(threshold):
    chosen = select_reformulations(ACCURACY, [True] * 4, cap=100, kinds=("ncq",), hard_threshold=threshold)
    assert [i for i, _ in chosen] == HARD[threshold]


@pytest.mark.parametrize("threshold", sorted(HARD))
def test_reformulator(tokenizer, threshold):
    cfg = ZPPOConfig(teacher_group_size=1, compression="none", hard_threshold=threshold)
    teacher = _teacher(tokenizer)
    out, m = Reformulator(teacher, tokenizer, cfg, kinds=("bcq", "ncq"))(_problems(), _texts(), REWARDS, 100, 1)
    assert sorted({r.question for r in out}) == HARD[threshold]
    assert m["zppo/hard_frac"] == len(HARD[threshold]) / 4
    assert len(teacher.calls) == len(HARD[threshold])  # the teacher is asked about hard questions only


@pytest.mark.parametrize("threshold", sorted(HARD))
def test_baselines(tokenizer, threshold):
    settings = GuidanceSettings.from_config(ZPPOConfig(teacher_group_size=1, hard_threshold=threshold))
    assert settings.hard_threshold == threshold
    builder = HintPrefixBuilder("prefix", _teacher(tokenizer), tokenizer, tokenizer, settings)
    out, m = builder(_problems(), _texts(), REWARDS, 100, 1)
    assert sorted(g.question for g in out) == HARD[threshold]
    assert m["prefix/hard_frac"] == len(HARD[threshold]) / 4


@pytest.mark.parametrize("threshold", sorted(HARD))
def test_buffer_admission(threshold):
    # the trainer builds its buffer with threshold=cfg.zppo.hard_threshold (zppo_fast/train.py)
    buffer = PromptReplayBuffer(capacity=10, threshold=ZPPOConfig(hard_threshold=threshold).hard_threshold)
    buffer.update(list(range(4)), ACCURACY, step=1)
    assert sorted(buffer.ids().tolist()) == HARD[threshold]
