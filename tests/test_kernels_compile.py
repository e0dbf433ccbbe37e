"""Every Triton kernel compiles for Hopper (sm_90) down to a cubin - no GPU needed.

The interpreter runs our kernels' logic on CPU, but says nothing about whether the compiler
accepts them (constexpr branches, scalar atomics, while loops, cache modifiers...). Triton
ships ptxas, so the full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) runs here and turns
what would be a first-run failure on the GPU machine into a CPU test failure.
"""

import importlib
import os
import sys

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

if isinstance(tl.sum, InterpretedFunction):
    # Triton was imported under TRITON_INTERPRET=1 (tests/conftest.py sets it on a machine without
    # CUDA, for the interpreter tests), which swaps the tl.* builtins the compiler needs: run this
    # file again in a child process where the interpreter is off.
    def test_compile_in_clean_process():
        import subprocess

        # "0", not unset: tests/conftest.py would set a missing TRITON_INTERPRET to 1 again.
        env = dict(os.environ, TRITON_INTERPRET="0")
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
            env=env,
            check=False,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


INTERPRETED = isinstance(tl.sum, InterpretedFunction)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

PL = importlib.import_module("zppo_fast.kernels.policy_loss")
LL = importlib.import_module("zppo_fast.kernels.linear_logprobs")
AD = importlib.import_module("zppo_fast.kernels.advantages")
TARGET = GPUTarget("cuda", 90, 32)


def _compile(fn, signature, constexprs, num_warps=8, **options):
    src = ASTSource(fn=JITFunction(fn), signature=signature, constexprs=constexprs)
    try:
        k = triton.compile(src, target=TARGET, options={"num_warps": num_warps, **options})
    except FileNotFoundError as e:  # no ptxas in this triton build
        pytest.skip(f"CUDA toolchain missing: {e}")
    assert "cubin" in k.asm and len(k.asm["cubin"]) > 0
    return k


@pytest.mark.skipif(INTERPRETED, reason="run by test_compile_in_clean_process")
@pytest.mark.parametrize("write_coef", [True, False])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_policy_loss_kernels(write_coef, dtype):
    _compile(
        PL._policy_loss_fwd_kernel,
        {
            "LOGP": f"*{dtype}",
            "OLD": f"*{dtype}",
            "ADV": "*fp32",
            "MASK": "*u8",
            "COEF": "*fp32",
            "PARTIALS": "*fp32",
            "n_tokens": "i32",
            "eps_low": "fp32",
            "eps_high": "fp32",
            "dual_clip": "fp32",
            "WRITE_COEF": "constexpr",
            "BLOCK": "constexpr",
        },
        {"WRITE_COEF": write_coef, "BLOCK": PL._BLOCK},
    )
    _compile(
        PL._policy_loss_bwd_kernel,
        {"COEF": "*fp32", "SCALE": "*fp32", "DLOGP": f"*{dtype}", "n_tokens": "i32", "BLOCK": "constexpr"},
        {"BLOCK": PL._BLOCK},
    )


@pytest.mark.skipif(INTERPRETED, reason="run by test_compile_in_clean_process")
@pytest.mark.parametrize("flag", [True, False])
@pytest.mark.parametrize("block_m,block_v", [(1, 4096), (1, 64), (4, 1)])
def test_lse_kernels(flag, block_m, block_v):
    _compile(
        LL._lse_fwd_kernel,
        {
            "Z": "*fp32",
            "TGT": "*i64",
            "LOG_NORM": "*fp32",
            "LOGP": "*fp32",
            "ENT": "*fp32",
            "n_rows": "i32",
            "V": "i32",
            "stride_z": "i64",
            "inv_temp": "fp32",
            "HAS_ENT": "constexpr",
            "BLOCK_M": "constexpr",
            "BLOCK_V": "constexpr",
        },
        {"HAS_ENT": flag, "BLOCK_M": block_m, "BLOCK_V": block_v},
    )
    for dz in ("bf16", "fp32"):
        _compile(
            LL._lse_bwd_kernel,
            {
                "Z": "*fp32",
                "DZ": f"*{dz}",
                "TGT": "*i64",
                "LOG_NORM": "*fp32",
                "G": "*fp32",
                "GE": "*fp32",
                "ENT": "*fp32",
                "n_rows": "i32",
                "V": "i32",
                "stride_z": "i64",
                "stride_dz": "i64",
                "inv_temp": "fp32",
                "HAS_ENT_GRAD": "constexpr",
                "BLOCK_M": "constexpr",
                "BLOCK_V": "constexpr",
            },
            {"HAS_ENT_GRAD": flag, "BLOCK_M": block_m, "BLOCK_V": block_v},
        )


@pytest.mark.skipif(INTERPRETED, reason="run by test_compile_in_clean_process")
@pytest.mark.parametrize("mode", range(len(AD.MODES)))
def test_advantages_kernel(mode):
    k = _compile(
        AD._advantages_kernel,
        {
            "R": "*fp32",
            "GID": "*i64",
            "OUT": "*fp32",
            "KEYS": "*i64",
            "STATS": "*fp32",
            "SLOT": "*i32",
            "PART": "*fp32",
            "BAR": "*i64",
            "n": "i32",
            "table_size": "i32",
            "n_programs": "i32",
            "eps": "fp32",
            "empty_key": "i64",
            "MODE": "constexpr",
            "PHASE": "constexpr",
            "BLOCK": "constexpr",
            "P_POW2": "constexpr",
        },
        {"MODE": mode, "PHASE": -1, "BLOCK": 512, "P_POW2": 256},
        num_warps=4,
        launch_cooperative_grid=True,  # the launcher's option: this Triton must know it by that name
    )
    assert k.metadata.launch_cooperative_grid
    ptx = k.asm["ptx"]
    # the grid barrier's arrival is a single-thread, acquire-release, GPU-scope atomic
    assert "atom.global.gpu.acq_rel.add.u64" in ptx
