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

Triton: one kernel launch. A persistent kernel with one program per SM walks the rollouts in a
grid-stride loop through five phases separated by grid barriers on a never-reset counter:
(0) clear a hash table, (1) map group ids to slots by open addressing with atomic
compare-and-swap and accumulate per-group sum / count / min / max with atomics (no sort or
unique), (2) A' and per-program sums over S, (3) two-pass variance over S, (4) write A.
Not safe to run concurrently on two CUDA streams (they would share the barrier counter).

A grid barrier needs every program resident at once, which a normal launch does not promise
(an MPS client capped below the SM count, another kernel holding SMs): it would spin forever.
So the one launch is cooperative (``launch_cooperative_grid=True``): the driver either makes
all programs co-resident or refuses the launch. Whether it accepts is probed once per device
on a tiny batch; where it refuses, or with ZPPO_ADVANTAGES_PHASED=1, the same phases run as
five barrier-free launches ("phased"), which is also what Triton's interpreter runs. The
choice is reported once through logging.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from ._triton_utils import HAVE_TRITON, _wrap, concrete_device, interpreter_active, kernel, resolve_backend, tl

MODES = ("batch_wo_zero", "batch_w_zero", "none", "group")
_MODE_ID = {m: i for i, m in enumerate(MODES)}
_EMPTY = -(2**63)  # hash-table sentinel: int64 min is the one group id we cannot accept
LAUNCHES = ("cooperative", "phased")
_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- reference
def advantages_reference(rewards, group_ids, *, mode="batch_wo_zero", eps=1e-6):
    """Plain-Python float64 reference (loops over groups). Returns float32 [R]."""
    r = [float(x) for x in rewards.reshape(-1).tolist()]
    g = [int(x) for x in group_ids.reshape(-1).tolist()]
    members: dict[int, list] = {}
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
def normalize_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    mode: str = "batch_wo_zero",
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """Advantages [R] float32 from rewards [R] (float) and group_ids [R] (int64). See module doc.

    backend: "auto" (Triton on CUDA, PyTorch elsewhere), "torch", "triton" (CPU: interpreter).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(rewards, torch.Tensor) or not rewards.is_floating_point():
        raise TypeError(f"rewards must be a floating tensor, got {getattr(rewards, 'dtype', type(rewards).__name__)}")
    if not isinstance(group_ids, torch.Tensor) or group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise TypeError(
            f"group_ids must be an integer tensor, got {getattr(group_ids, 'dtype', type(group_ids).__name__)}"
        )
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


# ----------------------------------------------------------------------------- triton path
if HAVE_TRITON:

    def _advantages_kernel(
        # pointers: inputs, output
        R,
        GID,
        OUT,
        # pointers: scratch (uninitialised: phase 0 initialises it, so no memset launch is needed)
        KEYS,
        STATS,
        SLOT,
        PART,
        BAR,
        # shapes
        n,
        table_size,
        n_programs,
        # scalars
        eps,
        empty_key,
        # meta
        MODE: tl.constexpr,
        PHASE: tl.constexpr,
        BLOCK: tl.constexpr,
        P_POW2: tl.constexpr,
    ):
        """Persistent kernel: ``n_programs`` programs (one per SM, all resident) walk the rollouts
        in a grid-stride loop; the five phases are separated by grid barriers on the BAR counter.

        PHASE = -1: all phases in this one launch (GPU). PHASE = k >= 0: only phase k and no
        barrier - used to test the multi-program logic in Triton's interpreter, which runs
        programs one after another and would spin forever in a grid barrier.
        STATS rows: 0 sum r, 1 count, 2 min r, 3 max r, 4 sum (r - mean)^2.
        PART [n_programs, 4]: per-program sum A' over S, |S|, sum (A' - mu)^2 over S.
        Values written by other programs (atomics, PART) are read with cache_modifier=".cg" (L2),
        so a stale L1 line can never be seen.
        """
        pid = tl.program_id(0).to(tl.int64)
        lanes = tl.arange(0, BLOCK).to(tl.int64)
        tmask_all = table_size - 1
        stride = n_programs * BLOCK
        # ---- phase 0: empty hash table (each program a strided share)
        if PHASE < 0 or PHASE == 0:
            for t0 in range(pid * BLOCK, table_size, stride):
                offs = t0 + lanes
                tm = offs < table_size
                tl.store(KEYS + offs, tl.full([BLOCK], 0, tl.int64) + empty_key, mask=tm)
                tl.store(STATS + offs, tl.zeros([BLOCK], tl.float32), mask=tm)
                tl.store(STATS + table_size + offs, tl.zeros([BLOCK], tl.float32), mask=tm)
                tl.store(STATS + 2 * table_size + offs, tl.full([BLOCK], float("inf"), tl.float32), mask=tm)
                tl.store(STATS + 3 * table_size + offs, tl.full([BLOCK], float("-inf"), tl.float32), mask=tm)
                tl.store(STATS + 4 * table_size + offs, tl.zeros([BLOCK], tl.float32), mask=tm)
            # a private dummy key per lane, for lanes that are done probing (atomic_cas has no mask)
            tl.store(KEYS + table_size + pid * BLOCK + lanes, tl.full([BLOCK], 0, tl.int64) + empty_key)
        if PHASE < 0:
            _grid_barrier(BAR, n_programs)
        # ---- phase 1: group id -> slot (open addressing, linear probing), per-slot sums
        if PHASE < 0 or PHASE == 1:
            empty = tl.full([BLOCK], 0, tl.int64) + empty_key
            dummy = KEYS + table_size + pid * BLOCK + lanes
            for i0 in range(pid * BLOCK, n, stride):
                offs = i0 + lanes
                inb = offs < n
                gid = tl.load(GID + offs, mask=inb, other=0)
                r = tl.load(R + offs, mask=inb, other=0.0).to(tl.float32)
                h = gid * -7046029254386353131  # Fibonacci hashing (wraps mod 2**64 on purpose)
                slot = (h ^ (h >> 29)) & tmask_all
                pending = inb
                n_pending = tl.sum(pending.to(tl.int32), axis=0)
                while n_pending > 0:
                    ptr = tl.where(pending, KEYS + slot, dummy)
                    prev = tl.atomic_cas(ptr, empty, tl.where(pending, gid, empty))
                    hit = pending & ((prev == empty) | (prev == gid))
                    pending = pending & (~hit)
                    slot = tl.where(pending, (slot + 1) & tmask_all, slot)
                    n_pending = tl.sum(pending.to(tl.int32), axis=0)
                tl.store(SLOT + offs, slot.to(tl.int32), mask=inb)
                tl.atomic_add(STATS + slot, r, mask=inb)
                tl.atomic_add(STATS + table_size + slot, tl.full([BLOCK], 1.0, tl.float32), mask=inb)
                tl.atomic_min(STATS + 2 * table_size + slot, r, mask=inb)
                tl.atomic_max(STATS + 3 * table_size + slot, r, mask=inb)
        if PHASE < 0:
            _grid_barrier(BAR, n_programs)
        # ---- phase 2: A' per rollout, per-group squared deviations, per-program sums over S
        if PHASE < 0 or PHASE == 2:
            acc1 = tl.zeros([BLOCK], tl.float32)
            acc_n = tl.zeros([BLOCK], tl.float32)
            for i0 in range(pid * BLOCK, n, stride):
                offs = i0 + lanes
                inb = offs < n
                slot = tl.load(SLOT + offs, mask=inb, other=0).to(tl.int64)
                r = tl.load(R + offs, mask=inb, other=0.0).to(tl.float32)
                s1 = tl.load(STATS + slot, mask=inb, other=0.0, cache_modifier=".cg")
                cnt = tl.load(STATS + table_size + slot, mask=inb, other=1.0, cache_modifier=".cg")
                mn = tl.load(STATS + 2 * table_size + slot, mask=inb, other=0.0, cache_modifier=".cg")
                mx = tl.load(STATS + 3 * table_size + slot, mask=inb, other=0.0, cache_modifier=".cg")
                dev = r - s1 / cnt
                trivial = mn == mx
                a1 = tl.where(trivial, 0.0, dev)
                if MODE == 3:
                    tl.atomic_add(STATS + 4 * table_size + slot, dev * dev, mask=inb)
                if MODE == 0:
                    in_s = inb & (~trivial)
                else:
                    in_s = inb
                acc1 += tl.where(in_s, a1, 0.0)
                acc_n += tl.where(in_s, 1.0, 0.0)
                tl.store(OUT + offs, a1, mask=inb)
            tl.store(PART + pid * 4 + 0, tl.sum(acc1, axis=0))
            tl.store(PART + pid * 4 + 1, tl.sum(acc_n, axis=0))
        if PHASE < 0:
            _grid_barrier(BAR, n_programs)
        # ---- phase 3 (batch modes): two-pass variance over S (more accurate than E[x^2] - mu^2)
        if MODE <= 1:
            if PHASE < 0 or PHASE == 3:
                pp = tl.arange(0, P_POW2)
                pm = pp < n_programs
                n_s = tl.maximum(tl.sum(tl.load(PART + pp * 4 + 1, mask=pm, other=0.0, cache_modifier=".cg"), 0), 1.0)
                mu = tl.sum(tl.load(PART + pp * 4 + 0, mask=pm, other=0.0, cache_modifier=".cg"), 0) / n_s
                acc2 = tl.zeros([BLOCK], tl.float32)
                for i0 in range(pid * BLOCK, n, stride):
                    offs = i0 + lanes
                    inb = offs < n
                    a1 = tl.load(OUT + offs, mask=inb, other=0.0)
                    if MODE == 0:
                        slot = tl.load(SLOT + offs, mask=inb, other=0).to(tl.int64)
                        mn = tl.load(STATS + 2 * table_size + slot, mask=inb, other=0.0, cache_modifier=".cg")
                        mx = tl.load(STATS + 3 * table_size + slot, mask=inb, other=0.0, cache_modifier=".cg")
                        in_s = inb & (mn != mx)
                    else:
                        in_s = inb
                    d = a1 - mu
                    acc2 += tl.where(in_s, d * d, 0.0)
                tl.store(PART + pid * 4 + 2, tl.sum(acc2, axis=0))
            if PHASE < 0:
                _grid_barrier(BAR, n_programs)
        # ---- phase 4: final advantages
        if MODE != 2:  # noqa: SIM102 - constexpr branches, kept separate for the Triton frontend
            if PHASE < 0 or PHASE == 4:
                pp = tl.arange(0, P_POW2)
                pm = pp < n_programs
                n_s = tl.maximum(tl.sum(tl.load(PART + pp * 4 + 1, mask=pm, other=0.0, cache_modifier=".cg"), 0), 1.0)
                mu = tl.sum(tl.load(PART + pp * 4 + 0, mask=pm, other=0.0, cache_modifier=".cg"), 0) / n_s
                var = tl.sum(tl.load(PART + pp * 4 + 2, mask=pm, other=0.0, cache_modifier=".cg"), 0) / n_s
                sigma = tl.sqrt(var)
                for i0 in range(pid * BLOCK, n, stride):
                    offs = i0 + lanes
                    inb = offs < n
                    a1 = tl.load(OUT + offs, mask=inb, other=0.0)
                    slot = tl.load(SLOT + offs, mask=inb, other=0).to(tl.int64)
                    mn = tl.load(STATS + 2 * table_size + slot, mask=inb, other=0.0, cache_modifier=".cg")
                    mx = tl.load(STATS + 3 * table_size + slot, mask=inb, other=0.0, cache_modifier=".cg")
                    trivial = mn == mx
                    if MODE == 3:
                        sq = tl.load(STATS + 4 * table_size + slot, mask=inb, other=0.0, cache_modifier=".cg")
                        cnt = tl.load(STATS + table_size + slot, mask=inb, other=1.0, cache_modifier=".cg")
                        a = a1 / (tl.sqrt(sq / cnt) + eps)
                    else:
                        a = (a1 - mu) / (sigma + eps)
                    tl.store(OUT + offs, tl.where(trivial, 0.0, a), mask=inb)

    def _grid_barrier_impl(BAR, n_programs):
        """Grid-wide barrier on a monotonically increasing int64 counter (never reset, so no
        memset launch): each program's arrival ticket says which generation it is in, and it
        waits until all ``n_programs`` arrivals of that generation are in. Needs all programs
        resident at once (a cooperative launch of at most one program per SM) and ``n_programs`` equal
        for every launch that shares BAR (the launcher caches one counter per device x size)."""
        tl.debug_barrier()  # this program's stores are done before it arrives
        ticket = tl.atomic_add(BAR, 1, sem="acq_rel")  # scalar atomic: one thread per program
        target = (ticket // n_programs + 1) * n_programs
        seen = tl.atomic_add(BAR, 0, sem="acquire")
        while seen < target:
            seen = tl.atomic_add(BAR, 0, sem="acquire")
        tl.debug_barrier()

    # Wrapped like our kernels (not with @triton.jit at import): Triton decides compiled vs
    # interpreted when *it* is imported, and the helper must match the tl.* builtins it calls.
    _grid_barrier = _wrap(_grid_barrier_impl, interpreter_active())


_BARRIERS: dict[tuple, torch.Tensor] = {}


def _barrier_counter(device: torch.device, n_programs: int) -> torch.Tensor:
    """One never-reset int64 counter per (device, program count), zeroed once at creation."""
    key = (str(device), n_programs)
    if key not in _BARRIERS:
        _BARRIERS[key] = torch.zeros(1, dtype=torch.int64, device=device)
    return _BARRIERS[key]


_LAUNCH: dict[str, str] = {}  # per device: "cooperative" or "phased", probed once


def advantages_launch(device: torch.device) -> str:
    """How the Triton kernel runs on ``device``: "cooperative" (one launch, grid barriers) or
    "phased" (five launches). Probed once per CUDA device with a cooperative launch of the largest
    grid used (one program per SM) on a 2-rollout batch, and reported once. OutOfMemoryError
    propagates and records nothing."""
    device = concrete_device(device)
    key = str(device)
    if key in _LAUNCH:
        return _LAUNCH[key]
    if device.type != "cuda" or interpreter_active():
        return "phased"  # the interpreter runs programs one after another: no grid barrier
    if os.environ.get("ZPPO_ADVANTAGES_PHASED") == "1":
        launch, why = "phased", "ZPPO_ADVANTAGES_PHASED=1"
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        r = torch.tensor([0.0, 1.0], device=device)
        g = torch.zeros(2, dtype=torch.int64, device=device)
        try:
            _run_kernel(r, g, "none", 0.0, sms, "cooperative")
            launch, why = "cooperative", f"the driver accepted a cooperative launch of {sms} programs"
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # e.g. CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE: nothing ran
            launch, why = "phased", f"a cooperative launch of {sms} programs was refused: {str(e)[:160]}"
    _LAUNCH[key] = launch
    _log.log(
        logging.INFO if launch == "cooperative" else logging.WARNING,
        "zppo_fast.kernels normalize_advantages on %s: %s launch (%s)",
        key,
        launch,
        why,
    )
    return launch


def _advantages_triton(r, g, mode, eps, n_programs=None, launch=None):
    """The persistent kernel: one program per SM on CUDA (up to what the batch needs), one
    cooperative launch or five phased ones (``advantages_launch``). Scratch ~ 28 bytes x 2R
    (hash table at most half full)."""
    n = r.numel()
    on_gpu = r.device.type == "cuda" and not interpreter_active()
    if n_programs is None:
        if on_gpu:
            sms = torch.cuda.get_device_properties(r.device).multi_processor_count
            n_programs = max(1, min(sms, triton_cdiv(n, _block(on_gpu))))
        else:
            n_programs = 1
    if launch not in (None, *LAUNCHES):
        raise ValueError(f"launch must be one of {LAUNCHES}, got {launch!r}")
    return _run_kernel(r, g, mode, eps, n_programs, launch or advantages_launch(r.device))


def _block(on_gpu: bool) -> int:
    return 512 if on_gpu else 1024


def _run_kernel(r, g, mode, eps, n_programs, launch):
    n = r.numel()
    on_gpu = r.device.type == "cuda" and not interpreter_active()
    block = _block(on_gpu)
    table = max(_next_pow2(2 * n), block)
    keys = torch.empty(table + n_programs * block, dtype=torch.int64, device=r.device)
    stats = torch.empty((5, table), dtype=torch.float32, device=r.device)
    slot = torch.empty(n, dtype=torch.int32, device=r.device)
    part = torch.empty((n_programs, 4), dtype=torch.float32, device=r.device)
    out = torch.empty(n, dtype=torch.float32, device=r.device)
    bar = _barrier_counter(r.device, n_programs)
    extra = {"num_warps": 4} if on_gpu else {}
    if launch == "cooperative":
        # Triton 3.x launch option: CU_LAUNCH_ATTRIBUTE_COOPERATIVE (the interpreter ignores it)
        extra["launch_cooperative_grid"] = True
    launch_fn = kernel(_advantages_kernel, r.device)[(n_programs,)]
    for phase in range(5) if launch == "phased" else [-1]:
        launch_fn(
            r,
            g,
            out,
            keys,
            stats,
            slot,
            part,
            bar,
            n,
            table,
            n_programs,
            float(eps),
            _EMPTY,
            MODE=_MODE_ID[mode],
            PHASE=phase,
            BLOCK=block,
            P_POW2=_next_pow2(n_programs),
            **extra,
        )
    return out


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())
