"""Per-rollout advantages from scalar rewards and group ids (GRPO / REINFORCE++ "Norm w/o Zero").

Definitions (R rollouts, group g(i) = rollouts sharing group_ids[i]; groups of any size, ids
of any int64 value in any order):
    trivial(g) = all rewards of g are equal (e.g. all-correct / all-wrong)
    A'_i = 0                      if trivial(g(i))   (exactly; mathematically r - mean = 0)
           r_i - mean_{g(i)}(r)   otherwise
    mode "none":          A = A'
    mode "group":         A = A' / (std_{g(i)}(r) + eps)                     (GRPO, Eq. 1)
    mode "batch_wo_zero": A = (A' - mu_S) / (sigma_S + eps) on rollouts of non-trivial groups,
                          0 on trivial groups; S = rollouts of non-trivial groups; all 0 if S empty
    mode "batch_w_zero":  the same with S = all rollouts (trivial groups still get exactly 0)
All std are *population* std (divide by the count, not count-1); eps is added to the std,
outside the square root. Output float32 [R].

Triton: one kernel launch, one program (all phases need the whole batch, and a single
program makes every phase boundary a cheap CTA barrier instead of a grid sync). Group ids are
mapped to slots by an open-addressing hash table built with atomic compare-and-swap in a
scratch buffer, so no sort / unique is needed.
"""
from __future__ import annotations

import math
from typing import Dict

import torch

from ._triton_utils import HAVE_TRITON, kernel, resolve_backend, tl

MODES = ("batch_wo_zero", "batch_w_zero", "none", "group")
_MODE_ID = {m: i for i, m in enumerate(MODES)}
_EMPTY = -(2 ** 63)  # hash-table sentinel: int64 min is the one group id we cannot accept


# ----------------------------------------------------------------------------- reference
def advantages_reference(rewards, group_ids, *, mode="batch_wo_zero", eps=1e-6):
    """Plain-Python float64 reference (loops over groups). Returns float32 [R]."""
    r = [float(x) for x in rewards.reshape(-1).tolist()]
    g = [int(x) for x in group_ids.reshape(-1).tolist()]
    members: Dict[int, list] = {}
    for i, gid in enumerate(g):
        members.setdefault(gid, []).append(i)
    a1 = [0.0] * len(r)
    trivial = [False] * len(r)
    gstd = [0.0] * len(r)
    for idx in members.values():
        vals = [r[i] for i in idx]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
        triv = all(v == vals[0] for v in vals)
        for i in idx:
            trivial[i] = triv
            a1[i] = 0.0 if triv else r[i] - mean
            gstd[i] = std
    if mode == "none":
        out = a1
    elif mode == "group":
        out = [a1[i] / (gstd[i] + eps) for i in range(len(r))]
    elif mode in ("batch_wo_zero", "batch_w_zero"):
        s = [i for i in range(len(r)) if (mode == "batch_w_zero" or not trivial[i])]
        if not s:
            out = [0.0] * len(r)
        else:
            mu = sum(a1[i] for i in s) / len(s)
            sigma = math.sqrt(sum((a1[i] - mu) ** 2 for i in s) / len(s))
            out = [0.0 if trivial[i] else (a1[i] - mu) / (sigma + eps) for i in range(len(r))]
    else:
        raise ValueError(mode)
    return torch.tensor(out, dtype=torch.float64).to(torch.float32)


# ----------------------------------------------------------------------------- torch path
def _advantages_torch(rewards, group_ids, mode, eps):
    """Eager composition (unique + scatter); float64 internally. Returns float32 [R]."""
    r = rewards.double()
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = uniq.numel()
    cnt = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, inv, torch.ones_like(r))
    s1 = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, inv, r)
    mean = s1 / cnt
    mn = torch.full((n_groups,), math.inf, dtype=torch.float64, device=r.device).scatter_reduce_(0, inv, r, "amin")
    mx = torch.full((n_groups,), -math.inf, dtype=torch.float64, device=r.device).scatter_reduce_(0, inv, r, "amax")
    trivial = (mn == mx)[inv]
    zero = torch.zeros_like(r)
    a1 = torch.where(trivial, zero, r - mean[inv])
    if mode == "none":
        out = a1
    elif mode == "group":
        sq = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, inv, (r - mean[inv]) ** 2)
        out = a1 / (torch.sqrt(sq / cnt)[inv] + eps)
    else:
        in_s = ~trivial if mode == "batch_wo_zero" else torch.ones_like(trivial)
        n_s = in_s.sum().double()
        mu = torch.where(in_s, a1, zero).sum() / n_s.clamp(min=1)
        var = torch.where(in_s, (a1 - mu) ** 2, zero).sum() / n_s.clamp(min=1)
        out = torch.where(trivial, zero, (a1 - mu) / (torch.sqrt(var) + eps))
    return out.float()


# ----------------------------------------------------------------------------- public op
def normalize_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, mode: str = "batch_wo_zero",
                         eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """Advantages [R] float32 from rewards [R] (float) and group_ids [R] (int64). See module doc.

    backend: "auto" (Triton on CUDA, PyTorch elsewhere), "torch", "triton" (CPU: interpreter).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(rewards, torch.Tensor) or not rewards.is_floating_point():
        raise TypeError(f"rewards must be a floating tensor, got "
                        f"{getattr(rewards, 'dtype', type(rewards).__name__)}")
    if not isinstance(group_ids, torch.Tensor) or group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be an integer tensor, got "
                        f"{getattr(group_ids, 'dtype', type(group_ids).__name__)}")
    if rewards.shape != group_ids.shape:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)} but group_ids has shape {tuple(group_ids.shape)}")
    if rewards.device != group_ids.device:
        raise ValueError(f"rewards is on {rewards.device} but group_ids is on {group_ids.device}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    shape = rewards.shape
    r = rewards.reshape(-1)
    g = group_ids.reshape(-1).to(torch.int64)
    if r.numel() == 0:
        return torch.zeros(shape, dtype=torch.float32, device=r.device)
    backend = resolve_backend(backend, r.device)
    if backend == "triton":
        out = _advantages_triton(r.contiguous(), g.contiguous(), mode, float(eps))
    else:
        out = _advantages_torch(r, g, mode, float(eps))
    return out.reshape(shape)


def _advantages_triton(r, g, mode, eps):  # replaced below when Triton is present
    raise RuntimeError("triton unavailable")
