"""Lazy Triton access and backend dispatch shared by every op in this package.

Why lazy: this package must import (and its PyTorch paths must work) on machines where
``import triton`` fails, and Triton decides at *decoration* time whether a kernel is
compiled or interpreted (TRITON_INTERPRET). We therefore keep kernels as plain Python
functions and wrap them on first launch: ``JITFunction`` for CUDA tensors,
``InterpretedFunction`` under TRITON_INTERPRET=1 (the only way Triton runs on a CPU).
Note the interpreter also needs Triton's own ``tl.*`` helpers interpreted, which Triton
decides when it is first imported: set TRITON_INTERPRET=1 before importing triton.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

try:  # pragma: no cover - exercised implicitly
    import triton
    import triton.language as tl

    HAVE_TRITON = True
    _TRITON_ERROR: BaseException | None = None
except Exception as _e:  # noqa: BLE001 - ImportError, or a broken install raising anything else
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAVE_TRITON = False
    _TRITON_ERROR = _e

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA (when Triton imports), else 'torch'.

    'triton' on a CPU tensor runs the kernels in Triton's interpreter (slow; tests only).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if (device.type == "cuda" and HAVE_TRITON) else "torch"
    if backend == "triton":
        if not HAVE_TRITON:
            raise RuntimeError(f"backend='triton' requested but triton failed to import: {_TRITON_ERROR!r}")
        if device.type != "cuda" and not interpreter_active():
            raise RuntimeError(
                "backend='triton' on a CPU tensor needs Triton's interpreter: set "
                "TRITON_INTERPRET=1 before triton is first imported"
            )
    return backend


def describe_backend(backend: str, device: torch.device | str) -> tuple[str, str]:
    """(the backend `resolve_backend` picks, why) for `device`, for a run's log and config.json.
    Raises like `resolve_backend` where the asked-for backend cannot run."""
    device = torch.device(device)
    resolved = resolve_backend(backend, device)
    if backend == "torch":
        why = "asked for"
    elif backend == "triton":
        why = ("asked for, on CUDA" if device.type == "cuda"
               else "asked for, in Triton's CPU interpreter (TRITON_INTERPRET=1)")
    elif device.type != "cuda":
        why = f"auto: a {device.type} device (the Triton kernels run on CUDA GPUs)"
    elif HAVE_TRITON:
        why = f"auto: a CUDA device and Triton {getattr(triton, '__version__', '?')}"
    else:
        why = f"auto: a CUDA device but Triton does not import ({_TRITON_ERROR!r})"
    return resolved, why


def concrete_device(device: torch.device | str) -> torch.device:
    """``device`` with its index ("cuda" -> "cuda:<current>"): per-device caches get one key per GPU."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def interpreter_active() -> bool:
    """True when Triton was imported with TRITON_INTERPRET=1 (its own tl.* helpers are then
    interpreted, which is what lets our kernels run on CPU tensors)."""
    if not HAVE_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


@functools.cache
def _wrap(fn: Callable, interpreted: bool):
    if interpreted:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)


def kernel(fn: Callable, device: torch.device):
    """The launchable Triton kernel for ``fn`` on ``device`` (compiled on CUDA, else interpreted)."""
    return _wrap(fn, device.type != "cuda" or interpreter_active())
