"""Shared fixtures: the tiny student and teacher, warmed up once per test session.

They follow the arithmetic task's recipe at toy size (hidden 64, operands up to 2): one supervised
warm-up whose early snapshot is the student and whose end is the stronger teacher. (The testbed, the
embedded default, has tests of its own: tests/test_testbed.py.)
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

if not torch.cuda.is_available():
    # Triton on a CPU runs in its interpreter; the variable must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite's models and tensors are small: one intra-op thread avoids OpenMP hand-offs that
# cost more than the work, and leaves the second core to the C++ tests' threads.
torch.set_num_threads(1)

TINY_OVERRIDES = [
    "--task.kind", "arithmetic",
    "--task.heldout_fraction", "0.1",  # the arithmetic task's split the tests were written against
    "--model.hidden_size", "64",
    "--task.max_operand", "2",
    "--sft.steps", "60",
    "--sft.batch_size", "32",
    "--zppo.teacher_sft_steps", "120",
    "--zppo.teacher_max_new_tokens", "24",
    "--zppo.compression", "none",
    "--rollout.max_new_tokens", "24",
    # the tiny VLM's processor keeps its own (small) image bounds: the paper's would make CPU tests slow
    "--data.image_min_pixels", "none",
    "--data.image_max_pixels", "none",
    "--rl.batch_size", "8",
    "--rl.lr", "1e-3",
    "--rl.algo", "grpo",
    "--run.eval_every", "0",
    "--run.tensorboard", "false",
    "--run.cpu_threads", "1",  # as above (the suite runs 2-rank tests and C++ threads beside it)
    "--parallel.packing", "true",  # the GPU layout; the CPU default (padded) is tested beside it
    "--parallel.share_prefix", "false",  # likewise; tests/test_shared_prefix.py turns it on
]


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """An SFT cache folder holding the tiny student (60 steps) and teacher (120 steps)."""
    from zppo_fast.config import load_config
    from zppo_fast.sft import prepare_warm_starts

    cache = str(tmp_path_factory.mktemp("sft"))
    prepare_warm_starts(load_config(None, TINY_OVERRIDES + ["--sft.cache_dir", cache]), progress=False)
    return cache


@pytest.fixture
def tiny_config(tiny_cache, tmp_path):
    """A factory of configs that train the tiny student in `tmp_path`, with extra overrides."""
    from zppo_fast.config import load_config

    def make(*overrides: str):
        return load_config(None, TINY_OVERRIDES + ["--sft.cache_dir", tiny_cache, "--run.out_dir",
                                                   str(tmp_path / "run"), *overrides])

    return make


@pytest.fixture(autouse=True)
def _subnormals_back():
    """The trainer flushes denormals process-wide (a speed setting for training); tests after it,
    hypothesis's float strategies among them, need IEEE subnormals back."""
    yield
    torch.set_flush_denormal(False)
