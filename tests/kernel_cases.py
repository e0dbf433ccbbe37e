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


def fp32_out_gemms(monkeypatch, exact=True):
    """Give this CPU the CUDA-only bf16 x bf16 -> fp32 GEMM overloads (torch.mm / torch.addmm with
    out_dtype), computed in fp32 (``exact``) or wrongly rounded to bf16 first, so the probe and the
    paths it selects on a GPU run here (upcasting with .to(), so tests can watch the ops' .float())."""
    mm, addmm = torch.mm, torch.addmm

    def fake_mm(a, b, *, out_dtype=None):
        if out_dtype is None:
            return mm(a, b)
        return mm(a.to(torch.float32), b.to(torch.float32)) if exact else mm(a, b).to(torch.float32)

    def fake_addmm(c, a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return addmm(c, a, b, out=out) if out is not None else addmm(c, a, b)
        r = c + (mm(a.to(torch.float32), b.to(torch.float32)) if exact else mm(a, b).to(torch.float32))
        return out.copy_(r) if out is not None else r

    monkeypatch.setattr(torch, "mm", fake_mm)
    monkeypatch.setattr(torch, "addmm", fake_addmm)
