"""What the kernel test files share: where each backend can run, and the interpreter re-run.

tests/conftest.py has already set TRITON_INTERPRET=1 on a machine without CUDA (before triton is
first imported), so `interpreter_active()` here is what the test modules see.
"""

import os
import subprocess
import sys

import pytest
import torch
from zppo_fast.kernels._triton_utils import interpreter_active

HAS_CUDA = torch.cuda.is_available()
INTERP = pytest.mark.skipif(not interpreter_active(), reason="needs TRITON_INTERPRET=1 before triton import")
CUDA = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")

# (device, backend) pairs: the CPU PyTorch path, Triton on CPU through the interpreter, and on
# CUDA the compiled Triton kernel (skipped cleanly without a GPU).
BACKENDS = [
    pytest.param("cpu", "torch", id="cpu-torch"),
    pytest.param("cpu", "triton", id="cpu-triton-interp", marks=INTERP),
    pytest.param("cuda", "triton", id="cuda-triton", marks=CUDA),
]
CUDA_TORCH = pytest.param("cuda", "torch", id="cuda-torch", marks=CUDA)

# True when triton was imported (by something else) before TRITON_INTERPRET=1 could be set on a
# CPU-only machine: the interpreter cases then skip in this process and run in a child instead.
NEEDS_INTERPRETER_CHILD = not HAS_CUDA and not interpreter_active()


def run_interpreter_cases_in_child(test_file: str) -> None:
    """Run `test_file`'s interpreter cases (`-k interp`) in a child process with TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", "interp"]
    out = subprocess.run(cmd, env=env, check=False, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
