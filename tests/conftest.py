"""Shared fixtures: a tiny warm-started student built once per test session.

The student is the embedded default's recipe at toy size (hidden 64, operands up to 2): a short
supervised warm-up teaches it the answer format, so RL tests see non-trivial rewards.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_OVERRIDES = [
    "--model.hidden_size", "64",
    "--task.max_operand", "2",
    "--sft.steps", "60",
    "--sft.batch_size", "32",
    "--rollout.max_new_tokens", "16",
    "--rl.batch_size", "8",
    "--rl.lr", "1e-3",
    "--run.eval_every", "0",
]


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory):
    """Path of a Hugging Face folder with the warmed-up tiny student and its tokenizer."""
    from zppo_fast.config import load_config
    from zppo_fast.sft import warm_start

    cfg = load_config(None, TINY_OVERRIDES + ["--sft.cache_dir", str(tmp_path_factory.mktemp("sft"))])
    _, _, path = warm_start(cfg.model, cfg.task, cfg.sft, progress=False)
    return str(path)


@pytest.fixture
def tiny_config(tiny_student, tmp_path):
    """A factory of configs that train the tiny student in `tmp_path`, with extra overrides."""
    from zppo_fast.config import load_config

    def make(*overrides: str):
        return load_config(None, TINY_OVERRIDES + ["--model.path", tiny_student, "--run.out_dir",
                                                   str(tmp_path / "run"), "--run.tensorboard", "false", *overrides])

    return make
