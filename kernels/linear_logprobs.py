"""Per-token log-probs (and entropy) of an lm_head without ever holding the [N, V] logits.

    logits = hidden @ weight.T / temperature       hidden [N, H], weight [V, H]
    logp_i = logits[i, target_i] - logsumexp(logits[i])
    H_i    = -sum_j p_ij log p_ij                   (entropy, optional)

How: rows are processed in chunks of ``chunk`` rows, chosen so that chunk * V stays under a
fixed element budget (so peak extra memory is independent of N). Per chunk, the GEMM is left to
cuBLAS / MKL (fp32 output; bf16 operands on the tensor cores where ``gemm_modes`` found the
out_dtype GEMMs, probed once per device), and everything after it is one streaming pass over the chunk's
logits (Triton on CUDA: online log-sum-exp with the running max initialised to -inf, fp32
accumulation). The backward recomputes the chunk's logits, turns them into
d loss / d logits = (g_logp * (onehot - p) + g_ent * dH/dz) / temperature with the saved
log normaliser (in place; on CUDA with bf16 inputs into a bf16 chunk so the next GEMMs use tensor
cores), then does dX = dZ @ W and dW += dZ^T @ X (dW accumulated in fp32, or with
``dw_accum="weight"`` in the weight's dtype).

The log normaliser is saved in two parts per row, ``log_norm [N, 2]`` = (max of the tempered
logits, log sum exp(z - max)), and log p = (z - max) - log_sum, the order log_softmax uses: the
single number max + log_sum, rounded at the logits' magnitude, would cost a near-certain token's
log p (and its 1 - p in the gradient) most of its precision at low temperature.

The same chunk machinery serves ``fused_linear_policy_loss`` (its backward is this backward
with g_logp = d loss / d logp folded in).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ._triton_utils import HAVE_TRITON, concrete_device, interpreter_active, kernel, resolve_backend, tl

# Element budget of one [chunk, V] fp32 buffer. CPU: 64 MiB (256 rows at V = 65,536: bigger
# GEMMs ran ~25% faster than 64 rows); CUDA: 1 GiB (GEMMs big enough for the tensor cores).
CHUNK_ELEMS_CPU = 1 << 24
CHUNK_ELEMS_CUDA = 1 << 28

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- reference
def linear_logprobs_reference(
    hidden, weight, target_ids, *, temperature=1.0, return_entropy=False, dtype=torch.float64
):
    """Reference that materialises the logits, computed in ``dtype`` (float64 to check kernels;
    tests also run it in float32 to see what fp32 arithmetic alone loses on ill-conditioned
    inputs). Differentiable w.r.t. hidden and weight."""
    logits = hidden.to(dtype) @ weight.to(dtype).T / temperature
    logsm = torch.log_softmax(logits, dim=-1)
    logp = logsm.gather(-1, target_ids.long().reshape(-1, 1)).squeeze(-1)
    if not return_entropy:
        return logp
    ent = -(logsm.exp() * logsm).sum(-1)
    return logp, ent


# ----------------------------------------------------------------------------- helpers
def choose_chunk_rows(n_rows: int, vocab: int, device: torch.device, chunk_rows: int | None = None) -> int:
    """Rows per chunk: chunk * V <= budget (at least 1 row, at most N)."""
    if chunk_rows is not None:
        return max(1, min(int(chunk_rows), max(n_rows, 1)))
    budget = CHUNK_ELEMS_CUDA if device.type == "cuda" else CHUNK_ELEMS_CPU
    rows = max(1, budget // max(vocab, 1))
    if rows >= 64:
        rows -= rows % 64  # GEMM-friendly multiple
    return max(1, min(rows, max(n_rows, 1)))


# ----------------------------------------------------------------------------- GEMMs with fp32 results
@dataclass(frozen=True)
class GemmModes:
    """How one device multiplies low-precision (bf16 / fp16) operands into fp32 results.

    logits: "out_dtype"  torch.mm(a, b, out_dtype=float32): tensor cores, fp32 accumulation and output
            "upcast"     fp32 GEMM on fp32 copies of the operands (the weight's copy made once per call)
    dw:     "inplace"    torch.addmm(acc, a, b, out_dtype=float32, out=acc): fp32 C read and written in place
            "temp"       the same GEMM into a temporary the size of acc, copied back
            "upcast"     acc.addmm_(a.float(), b.float())
    reason: why (the probe's findings), for the one-time report.
    """

    logits: str
    dw: str
    reason: str


_GEMM_MODES: dict[str, GemmModes] = {}
_PROBE_ERRORS = (RuntimeError, TypeError)  # unsupported overload / backend; OutOfMemoryError is re-raised first


def gemm_modes(device: torch.device | str) -> GemmModes:
    """The GEMM forms ``device`` supports, probed once per device on tiny bf16 tensors (whose exact
    fp32 results a bf16-rounded output cannot match) and reported once through logging. An
    OutOfMemoryError during the probe propagates and nothing is recorded, so the next call probes
    again: memory pressure never switches a mode."""
    device = concrete_device(device)
    key = str(device)
    modes = _GEMM_MODES.get(key)
    if modes is None:
        modes = _probe_gemm_modes(device)
        _GEMM_MODES[key] = modes
        fast = modes.logits == "out_dtype" and modes.dw == "inplace"
        level = logging.INFO if fast or device.type != "cuda" else logging.WARNING
        _log.log(
            level,
            "zppo_fast.kernels on %s: low-precision lm_head GEMMs: logits %s, dW %s (%s)",
            key,
            modes.logits,
            modes.dw,
            modes.reason,
        )
    return modes


def _probe_operands(device):
    """Small operands exact in bf16 whose products (multiples of 1/128 below 16) are exact in fp32
    while about half of them need more than bf16's 8 significant bits, so a result rounded to
    bf16 anywhere fails the probe's exact comparison."""
    k = torch.arange(8 * 16, dtype=torch.float32)
    a = (((k % 13) - 6) * 0.375 + 0.125).reshape(8, 16)
    b = (((k % 11) - 5) * 0.3125).reshape(16, 8)
    c = (k[:64] * 0.125 + 100.0).reshape(8, 8)
    return a.to(device, torch.bfloat16), b.to(device, torch.bfloat16), c.to(device)


def _probe_gemm_modes(device: torch.device) -> GemmModes:
    a, b, c = _probe_operands(device)
    product = (a.double() @ b.double()).float()
    reasons = []
    logits = "upcast"
    try:
        z = torch.mm(a, b, out_dtype=torch.float32)
        if z.dtype == torch.float32 and torch.equal(z, product):
            logits = "out_dtype"
        else:
            reasons.append(f"torch.mm(out_dtype=float32) returned {z.dtype} without the exact fp32 product")
    except torch.OutOfMemoryError:
        raise
    except _PROBE_ERRORS as e:
        reasons.append(f"torch.mm(out_dtype=float32): {type(e).__name__}: {_first_line(e)}")
    expected = c + product
    dw = "upcast"
    for mode in ("inplace", "temp"):
        try:
            acc = c.clone()
            if mode == "inplace":
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            else:
                acc.copy_(torch.addmm(acc, a, b, out_dtype=torch.float32))
            if torch.equal(acc, expected):
                dw = mode
                break
            reasons.append(f"addmm(out_dtype=float32) {mode}: not the exact fp32 sum")
        except torch.OutOfMemoryError:
            raise
        except _PROBE_ERRORS as e:
            reasons.append(f"addmm(out_dtype=float32) {mode}: {type(e).__name__}: {_first_line(e)}")
    return GemmModes(logits, dw, "; ".join(reasons) or "bf16 operands, fp32 results on the tensor cores")


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:160]


def gemm_operand(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the fp32-result GEMMs read it: itself when fp32 or when the device multiplies
    low-precision operands into fp32 results, else an fp32 copy (make it once per call for a weight)."""
    if t.dtype == torch.float32 or gemm_modes(t.device).logits == "out_dtype":
        return t
    return t.float()


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [m, k] @ b [k, n] -> [m, n] fp32 with fp32 accumulation, operands from ``gemm_operand``."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.dtype != b.dtype or gemm_modes(a.device).logits != "out_dtype":
        return a.float() @ b.float()  # one side was upcast (CPU, or a device without out_dtype GEMMs)
    return torch.mm(a, b, out_dtype=torch.float32)


def addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b. An fp32 ``acc`` accumulates in fp32 whatever the operands' dtype (the probed
    dW form); a low-precision ``acc`` (``dw_accum="weight"``) adds each product rounded once."""
    if acc.dtype != torch.float32:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
        return
    if a.dtype == torch.float32 or b.dtype == torch.float32:
        acc.addmm_(a.float(), b.float())
        return
    mode = gemm_modes(acc.device).dw
    if mode == "inplace":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif mode == "temp":
        acc.copy_(torch.addmm(acc, a, b, out_dtype=torch.float32))
    else:
        acc.addmm_(a.float(), b.float())


DW_ACCUM = ("fp32", "weight")


def dw_buffer(weight: torch.Tensor, dw_accum: str) -> torch.Tensor:
    """The zeroed dW accumulator: fp32 (``dw_accum="fp32"``) or the weight's own dtype ("weight")."""
    dtype = torch.float32 if dw_accum == "fp32" else weight.dtype
    return torch.zeros(weight.shape, dtype=dtype, device=weight.device)


def check_dw_accum(dw_accum: str) -> str:
    if dw_accum not in DW_ACCUM:
        raise ValueError(f"dw_accum must be one of {DW_ACCUM}, got {dw_accum!r}")
    return dw_accum


# ----------------------------------------------------------------------------- epilogues (torch)
def _fwd_epilogue_torch(z, tgt, inv_temp, want_ent):
    """z [c, V] fp32 raw logits (consumed) -> (log_norm [c, 2], logp [c], ent [c] or None), fp32."""
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    row_max = z.amax(dim=-1)
    shifted = z.sub_(row_max[:, None])
    log_sum = shifted.exp().sum(dim=-1).log_()
    logp = shifted.gather(1, tgt.reshape(-1, 1)).squeeze(1) - log_sum
    ent = None
    if want_ent:
        logsm = shifted.sub_(log_sum[:, None])  # H = -sum p log p (stable for |logits| ~ 1e4)
        ent = -torch.linalg.vecdot(logsm.exp(), logsm)
    return torch.stack([row_max, log_sum], dim=1), logp, ent


def _bwd_epilogue_torch(z, tgt, inv_temp, log_norm, g, g_ent, ent, out_dtype):
    """z [c, V] fp32 raw logits -> d/dlogits [c, V] (in place)."""
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    shifted = z.sub_(log_norm[:, :1])  # z - max
    if g_ent is not None:
        # dH/dz_j = -p_j (log p_j + H)
        logsm = shifted.sub_(log_norm[:, 1:])
        coef_ent = (logsm + ent[:, None]).mul_(g_ent[:, None])
        dz = logsm.exp_().mul_(-(g[:, None] + coef_ent))
        dz.scatter_add_(1, tgt.reshape(-1, 1), g.reshape(-1, 1))
        return (dz.mul_(inv_temp) if inv_temp != 1.0 else dz).to(out_dtype)
    # p = exp(z - max) * exp(-log_sum): the per-row factor (with g and 1/T folded in) saves
    # two passes over the chunk
    dz = shifted.exp_().mul_((g * log_norm[:, 1].neg().exp()).mul_(-inv_temp)[:, None])
    dz.scatter_add_(1, tgt.reshape(-1, 1), (g * inv_temp).reshape(-1, 1))
    return dz.to(out_dtype)


# ----------------------------------------------------------------------------- epilogues (triton)
if HAVE_TRITON:

    def _lse_fwd_kernel(
        # pointers
        Z,
        TGT,
        LOG_NORM,
        LOGP,
        ENT,
        # shapes
        n_rows,
        V,
        # strides
        stride_z,
        # scalars
        inv_temp,
        # meta
        HAS_ENT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """BLOCK_M rows per program; stream V in BLOCK_V tiles with an online log-sum-exp."""
        pid = tl.program_id(0).to(tl.int64)  # rows on grid axis 0: no 65,535 limit
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        rmask = rows < n_rows
        row_ptr = Z + rows[:, None] * stride_z  # int64: chunk * V can exceed 2**31
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max
        s = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp(z - m)
        u = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp(z - m) * (z - m), for entropy
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            valid = rmask[:, None] & (cols < V)[None, :]
            z = tl.load(row_ptr + cols[None, :], mask=valid, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(z, axis=1))
            # rows past the end stay at -inf; use 0 as their shift so no (-inf) - (-inf) = NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            p = tl.exp(z - m_safe[:, None])
            if HAS_ENT:
                # rescale u from shift m to shift m_new: u' = alpha * (u + s * (m - m_new))
                shift = tl.where(m == float("-inf"), 0.0, m - m_safe)
                u = alpha * (u + s * shift) + tl.sum(tl.where(valid, p * (z - m_safe[:, None]), 0.0), axis=1)
            s = s * alpha + tl.sum(p, axis=1)
            m = m_new
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        log_sum = tl.log(s)
        tgt = tl.load(TGT + rows, mask=rmask, other=0).to(tl.int64)
        zt = tl.load(Z + rows * stride_z + tgt, mask=rmask, other=0.0).to(tl.float32) * inv_temp
        tl.store(LOG_NORM + 2 * rows, m_safe, mask=rmask)
        tl.store(LOG_NORM + 2 * rows + 1, log_sum, mask=rmask)
        tl.store(LOGP + rows, (zt - m_safe) - log_sum, mask=rmask)
        if HAS_ENT:
            tl.store(ENT + rows, tl.log(s) - u / s, mask=rmask)

    def _lse_bwd_kernel(
        # pointers
        Z,
        DZ,
        TGT,
        LOG_NORM,
        G,
        GE,
        ENT,
        # shapes
        n_rows,
        V,
        # strides
        stride_z,
        stride_dz,
        # scalars
        inv_temp,
        # meta
        HAS_ENT_GRAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """dZ = (g (onehot - p) - g_ent p (log p + H)) / T on one [BLOCK_M, BLOCK_V] tile.

        Z and DZ may alias (in-place): each element is read, then written, by one program.
        """
        pid_m = tl.program_id(0).to(tl.int64)
        pid_v = tl.program_id(1).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        rmask = rows < n_rows
        valid = rmask[:, None] & (cols < V)[None, :]
        z = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=valid, other=0.0).to(tl.float32)
        row_max = tl.load(LOG_NORM + 2 * rows, mask=rmask, other=0.0)
        log_sum = tl.load(LOG_NORM + 2 * rows + 1, mask=rmask, other=0.0)
        g = tl.load(G + rows, mask=rmask, other=0.0)
        tgt = tl.load(TGT + rows, mask=rmask, other=0).to(tl.int64)
        logsm = (z * inv_temp - row_max[:, None]) - log_sum[:, None]
        p = tl.exp(logsm)
        dz = tl.where(cols[None, :] == tgt[:, None], g[:, None], 0.0) - p * g[:, None]
        if HAS_ENT_GRAD:
            ge = tl.load(GE + rows, mask=rmask, other=0.0)
            ent = tl.load(ENT + rows, mask=rmask, other=0.0)
            dz -= p * (logsm + ent[:, None]) * ge[:, None]
        dz = dz * inv_temp
        tl.store(DZ + rows[:, None] * stride_dz + cols[None, :], dz.to(DZ.dtype.element_ty), mask=valid)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _tile(rows: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_V): one row x up-to-4096 columns per program on CUDA (long V rows);
    bigger tiles under the interpreter, where numpy vectorises a tile and programs run serially."""
    budget = 4096 if device.type == "cuda" else 1 << 16
    block_v = min(_next_pow2(vocab), budget)
    block_m = 1 if device.type == "cuda" else max(1, min(_next_pow2(rows), budget // block_v))
    return block_m, block_v


def _launch_opts(device: torch.device, block_m: int, block_v: int) -> dict:
    """8 warps for the 4096-wide tiles on the GPU (16 fp32 per thread per live tensor)."""
    if device.type != "cuda" or interpreter_active():
        return {}
    return {"num_warps": 8 if block_m * block_v >= 2048 else 4}


def _fwd_epilogue_triton(z, tgt, inv_temp, want_ent):
    c, V = z.shape
    log_norm = torch.empty((c, 2), dtype=torch.float32, device=z.device)
    logp = torch.empty(c, dtype=torch.float32, device=z.device)
    ent = torch.empty_like(logp) if want_ent else logp
    block_m, block_v = _tile(c, V, z.device)
    kernel(_lse_fwd_kernel, z.device)[(triton_cdiv(c, block_m),)](
        z,
        tgt,
        log_norm,
        logp,
        ent,
        c,
        V,
        z.stride(0),
        float(inv_temp),
        HAS_ENT=want_ent,
        BLOCK_M=block_m,
        BLOCK_V=block_v,
        **_launch_opts(z.device, block_m, block_v),
    )
    return log_norm, logp, (ent if want_ent else None)


def _bwd_epilogue_triton(z, tgt, inv_temp, log_norm, g, g_ent, ent, out_dtype):
    c, V = z.shape
    dz = z if out_dtype == torch.float32 else torch.empty((c, V), dtype=out_dtype, device=z.device)
    block_m, block_v = _tile(c, V, z.device)
    has_ent = g_ent is not None
    kernel(_lse_bwd_kernel, z.device)[(triton_cdiv(c, block_m), triton_cdiv(V, block_v))](
        z,
        dz,
        tgt,
        log_norm,
        g,
        g_ent if has_ent else g,
        ent if has_ent else g,
        c,
        V,
        z.stride(0),
        dz.stride(0),
        float(inv_temp),
        HAS_ENT_GRAD=has_ent,
        BLOCK_M=block_m,
        BLOCK_V=block_v,
        **_launch_opts(z.device, block_m, block_v),
    )
    return dz


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ----------------------------------------------------------------------------- chunk drivers
def _gemm_weights(hidden, weight, bias):
    """(the weight as the GEMMs read it, ``gemm_operand``; fp32 bias or None). An fp32 lm_head with
    bf16 hidden states (autocast) is cast to their dtype once per call where the device has the
    bf16 -> fp32 GEMMs, as autocast's own linear would (elsewhere it stays fp32); its gradient
    still accumulates in fp32."""
    w = weight
    if weight.dtype != hidden.dtype and gemm_modes(hidden.device).logits == "out_dtype":
        w = weight.to(hidden.dtype)
    return gemm_operand(w), (None if bias is None else bias.float())


def lm_head_forward(hidden, weight, tgt, temperature, want_ent, backend, chunk_rows=None, bias=None):
    """Chunked forward. hidden [N, H], weight [V, H], tgt [N] int64 in [0, V), bias [V] or None.

    Returns (logp [N], log_norm [N, 2], ent [N] or None), fp32 (log_norm: module docstring).
    Peak extra memory ~ chunk * V * 4 bytes.
    """
    n, _ = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    log_norm = torch.empty((n, 2), dtype=torch.float32, device=dev)
    ent = torch.empty(n, dtype=torch.float32, device=dev) if want_ent else None
    w_op, bias_f32 = _gemm_weights(hidden, weight, bias)
    epi = _fwd_epilogue_triton if backend == "triton" else _fwd_epilogue_torch
    chunk = choose_chunk_rows(n, V, dev, chunk_rows)
    inv_temp = 1.0 / temperature
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        z = mm_f32(gemm_operand(hidden[s:e]), w_op.t())
        if bias_f32 is not None:
            z.add_(bias_f32)
        ln_c, lp_c, ent_c = epi(z, tgt[s:e], inv_temp, want_ent)
        log_norm[s:e] = ln_c
        logp[s:e] = lp_c
        if want_ent:
            ent[s:e] = ent_c
        del z
    return logp, log_norm, ent


def _dz_dtype(hidden: torch.Tensor) -> torch.dtype:
    """dtype of the d loss / d logits chunk fed to the dX / dW GEMMs. CUDA: the input dtype, so
    bf16 inputs run both GEMMs on tensor cores (dW still accumulates in fp32). CPU: fp32."""
    return hidden.dtype if hidden.is_cuda else torch.float32


def lm_head_backward(
    hidden,
    weight,
    tgt,
    temperature,
    log_norm,
    g,
    g_ent,
    ent,
    need_dx,
    need_dw,
    backend,
    chunk_rows=None,
    bias=None,
    need_db=False,
    dw_accum="fp32",
):
    """Chunked backward: recompute logits per chunk, fold g (= dL/dlogp [N] fp32) and optional
    g_ent (= dL/dentropy [N]) into d logits, then dX = dZ @ W, dW += dZ^T @ X and, with a bias,
    db += sum of dZ's rows (fp32 accumulators; dW in the weight's dtype with
    ``dw_accum="weight"``, kernels/README.md: memory). Returns (dx, dw, db), None where not needed."""
    n, _ = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    dx = torch.empty_like(hidden) if need_dx else None
    dw = dw_buffer(weight, dw_accum) if need_dw else None
    db = torch.zeros(V, dtype=torch.float32, device=dev) if need_db else None
    w_dtype = weight.dtype
    w_op, bias_f32 = _gemm_weights(hidden, weight, bias)
    dz_dtype = _dz_dtype(hidden)
    epi = _bwd_epilogue_triton if backend == "triton" else _bwd_epilogue_torch
    chunk = choose_chunk_rows(n, V, dev, chunk_rows)
    inv_temp = 1.0 / temperature
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        h_c = gemm_operand(hidden[s:e])
        z = mm_f32(h_c, w_op.t())
        if bias_f32 is not None:
            z.add_(bias_f32)
        dz = epi(
            z,
            tgt[s:e],
            inv_temp,
            log_norm[s:e],
            g[s:e],
            None if g_ent is None else g_ent[s:e],
            None if ent is None else ent[s:e],
            dz_dtype,
        )
        del z
        if need_dx:
            dx[s:e] = mm_f32(dz, w_op).to(hidden.dtype)
        if need_dw:
            addmm_(dw, dz.t(), h_c)
        if db is not None:
            db.add_(dz.sum(0, dtype=torch.float32))
        del dz
    return dx, (dw.to(w_dtype) if need_dw else None), (db.to(bias.dtype) if db is not None else None)


# ----------------------------------------------------------------------------- validation
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def check_lm_head_args(hidden, weight, target_ids, temperature, extra=()):
    """Shared argument checks; returns (hidden2d, target1d int64). ``extra``: [(name, tensor)] per-token."""
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating tensor, got {getattr(hidden, 'dtype', type(hidden).__name__)}")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating tensor, got {getattr(weight, 'dtype', type(weight).__name__)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden has H={hidden.shape[-1]} but weight has H={weight.shape[1]}")
    # the one mix accepted: an fp32 lm_head with bf16/fp16 hidden states (autocast, fp32 master weights)
    if hidden.dtype != weight.dtype and not (weight.dtype == torch.float32 and hidden.dtype in _LOW_PRECISION):
        raise TypeError(f"hidden is {hidden.dtype} but weight is {weight.dtype}; cast one of them")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if not isinstance(target_ids, torch.Tensor) or target_ids.is_floating_point() or target_ids.dtype == torch.bool:
        raise TypeError(
            f"target_ids must be an integer tensor, got {getattr(target_ids, 'dtype', type(target_ids).__name__)}"
        )
    if target_ids.device != hidden.device:
        raise ValueError(f"target_ids is on {target_ids.device} but hidden is on {hidden.device}")
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if target_ids.numel() != h2.shape[0]:
        raise ValueError(f"target_ids has {target_ids.numel()} tokens but hidden has {h2.shape[0]} rows")
    for name, t in extra:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
        if t.numel() != h2.shape[0]:
            raise ValueError(f"{name} has {t.numel()} tokens but hidden has {h2.shape[0]} rows")
    if isinstance(temperature, torch.Tensor):
        temperature = float(temperature)
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    return h2, target_ids.reshape(-1).long()


def check_targets(tgt: torch.Tensor, vocab: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Check that every (valid) target is in [0, V); returns tgt clamped into range, so the kernels
    never index outside the logits (entries that are not ``valid`` - padding - are don't-cares and
    may hold e.g. -100).

    CPU: a ValueError naming the first bad index. CUDA: a device-side assert, so the loss path
    never waits for the GPU; a bad target stops the process at the next synchronisation with
    "device-side assert triggered" (CUDA_LAUNCH_BLOCKING=1 points at this check)."""
    if not tgt.numel():
        return tgt
    bad = (tgt < 0) | (tgt >= vocab)
    if valid is not None:
        bad = bad & valid
    if tgt.is_cuda:
        torch._assert_async(~bad.any(), f"zppo_fast.kernels: a target id is outside [0, V={vocab})")
    elif bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"target_ids[{i}] = {int(tgt[i])} is outside [0, V={vocab})")
    return tgt.clamp(0, vocab - 1)


# ----------------------------------------------------------------------------- custom ops + autograd
# torch.library ops, so torch.compile(fullgraph=True) sees one opaque node per pass (the chunk
# loop, the Triton launches and the target check stay outside the graph) and
# AOTAutograd calls the registered backward. Autocast is off inside: the logits are fp32 by design.
# Namespaced by this package's import name, so a vendored copy (kernels/ under another name) and
# zppo_fast.kernels can live in one process without registering the same op twice.
_OP_NS = __name__.rpartition(".")[0].replace(".", "_") or "zppo_kernels"


def _valid_targets(target_ids: torch.Tensor, vocab: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid rows [N] bool, targets clamped into [0, V)); raises on a valid target out of range."""
    valid = target_ids != ignore_index
    return valid, check_targets(target_ids, vocab, valid=valid)


@torch.library.custom_op(f"{_OP_NS}::linear_logprobs", mutates_args=())
def _linear_logprobs_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target_ids: torch.Tensor,
    ignore_index: int,
    temperature: float,
    want_ent: bool,
    backend: str,
    chunk_rows: int | None,
    dw_accum: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (logp [N], log_norm [N, 2], entropy [N] or [0]), fp32; rows whose target is
    ignore_index hold 0. ``dw_accum`` is for the backward (it reaches it through the context)."""
    with torch.autocast(hidden.device.type, enabled=False):
        valid, tgt = _valid_targets(target_ids, weight.shape[0], ignore_index)
        logp, log_norm, ent = lm_head_forward(hidden, weight, tgt, temperature, want_ent, backend, chunk_rows, bias)
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ent = torch.where(valid, ent, zero) if want_ent else logp.new_empty(0)
        return torch.where(valid, logp, zero), log_norm, ent


@_linear_logprobs_op.register_fake
def _(hidden, weight, bias, target_ids, ignore_index, temperature, want_ent, backend, chunk_rows, dw_accum):
    n = hidden.shape[0]
    f32 = {"dtype": torch.float32, "device": hidden.device}
    return hidden.new_empty(n, **f32), hidden.new_empty((n, 2), **f32), hidden.new_empty(n if want_ent else 0, **f32)


@torch.library.custom_op(f"{_OP_NS}::linear_logprobs_backward", mutates_args=())
def _linear_logprobs_backward_op(
    g_logp: torch.Tensor,
    g_ent: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target_ids: torch.Tensor,
    log_norm: torch.Tensor,
    ent: torch.Tensor,
    ignore_index: int,
    temperature: float,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    backend: str,
    chunk_rows: int | None,
    dw_accum: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (d hidden, d weight, d bias), each empty when not needed."""
    with torch.autocast(hidden.device.type, enabled=False):
        valid, tgt = _valid_targets(target_ids, weight.shape[0], ignore_index)
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        g = torch.where(valid, g_logp.float(), zero).contiguous()
        ge = None if g_ent is None else torch.where(valid, g_ent.float(), zero).contiguous()
        dx, dw, db = lm_head_backward(
            hidden,
            weight,
            tgt,
            temperature,
            log_norm,
            g,
            ge,
            ent if ge is not None else None,
            need_dx,
            need_dw,
            backend,
            chunk_rows,
            bias,
            need_db,
            dw_accum=dw_accum,
        )
    # a fresh empty tensor per missing gradient: a custom op's outputs may not alias each other
    return tuple(hidden.new_empty(0) if t is None else t for t in (dx, dw, db))


@_linear_logprobs_backward_op.register_fake
def _(g_logp, g_ent, hidden, weight, bias, target_ids, log_norm, ent, ignore_index, temperature, need_dx, need_dw,
      need_db, backend, chunk_rows, dw_accum):  # fmt: skip
    return (
        torch.empty_like(hidden) if need_dx else hidden.new_empty(0),
        torch.empty_like(weight) if need_dw else hidden.new_empty(0),
        torch.empty_like(bias) if need_db else hidden.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, target_ids, ignore_index, temperature, want_ent, backend, chunk_rows, dw_accum = inputs
    _, log_norm, ent = output
    ctx.save_for_backward(hidden, weight, bias, target_ids, log_norm, ent)
    ctx.cfg = (ignore_index, temperature, backend, chunk_rows, dw_accum)


def _backward(ctx, g_logp, g_log_norm, g_ent):
    hidden, weight, bias, target_ids, log_norm, ent = ctx.saved_tensors
    ignore_index, temperature, backend, chunk_rows, dw_accum = ctx.cfg
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    if g_logp is None:
        g_logp = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    dx, dw, db = _linear_logprobs_backward_op(
        g_logp,
        g_ent if ent.numel() else None,
        hidden,
        weight,
        bias,
        target_ids,
        log_norm,
        ent,
        ignore_index,
        temperature,
        need_dx,
        need_dw,
        need_db and bias is not None,
        backend,
        chunk_rows,
        dw_accum,
    )
    grads = (dx if need_dx else None), (dw if need_dw else None), (db if need_db else None)
    return grads + (None,) * 7


_linear_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
    chunk_rows: int | None = None,
    dw_accum: str = "fp32",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(hidden @ weight.T + bias) / temperature)[target] without materialising [N, V].

    Args:
        hidden: [N, H] (or [..., H], flattened) float; weight: [V, H], the same dtype and device,
            or fp32 with bf16/fp16 hidden states (autocast's mix: the GEMMs run in the hidden
            states' dtype on CUDA, in fp32 on the CPU; d weight accumulates in fp32).
        target_ids: [N] integers in [0, V), or ``ignore_index`` for rows to skip (log-prob and
            entropy 0, no gradient). bias: [V] or None (the lm_head's bias; receives a gradient).
        return_entropy: also return the per-token entropy of the tempered distribution.
        backend: "auto" | "torch" | "triton"; chunk_rows: override the rows per chunk.
        dw_accum: "fp32" (default) accumulates d weight in fp32; "weight" in the weight's dtype
            (half the accumulator's memory for bf16, one rounding per chunk; kernels/README.md).
    Returns:
        logp [N] fp32 (and entropy [N] fp32), differentiable w.r.t. hidden, weight and bias.
    """
    check_dw_accum(dw_accum)
    h2, tgt = check_lm_head_args(hidden, weight, target_ids, temperature)
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.device != weight.device):
        raise ValueError(
            f"bias must be [V={weight.shape[0]}] on {weight.device}, got {tuple(bias.shape)} on {bias.device}"
        )
    backend = resolve_backend(backend, h2.device)
    logp, _, ent = _linear_logprobs_op(
        h2.contiguous(),
        weight.contiguous(),
        bias,
        tgt.contiguous(),
        int(ignore_index),
        float(temperature),
        bool(return_entropy),
        backend,
        chunk_rows,
        dw_accum,
    )
    return (logp, ent) if return_entropy else logp
