"""Per-token generalized Jensen-Shannon divergence between a frozen teacher's and the student's
lm_head distributions, without ever holding [N, V] logits of either model.

Convention (the GKD one, Agarwal et al. 2024; P = teacher, Q = student, both tempered):

    P = softmax(teacher_hidden @ teacher_weight.T / temperature)      [N, V]
    Q = softmax(student_hidden @ student_weight.T / temperature)      [N, V]
    M = beta * P + (1 - beta) * Q
    JSD_beta(P || Q) = beta * KL(P || M) + (1 - beta) * KL(Q || M)     0 < beta < 1
    JSD_0 = KL(P || Q)   (forward KL: mass-covering, = SFT on the teacher's soft labels)
    JSD_1 = KL(Q || P)   (reverse KL: mode-seeking)
    loss  = sum over masked tokens of JSD_beta / normalizer          (default: the mask's sum)

The endpoints are the *rescaled* limits: the unscaled JSD_beta tends to 0 at both ends, while
JSD_beta / beta -> KL(P || Q) as beta -> 0 and JSD_beta / (1 - beta) -> KL(Q || P) as beta -> 1
(tests check both limits). beta = 0.5 is the symmetric, bounded (<= log 2) Jensen-Shannon.

Gradient (to the student only; teacher tensors are constants). With s = log Q, t = log P,
m = log M and z the student's tempered logits, d JSD / d z_j = g_j - Q_j * sum_k g_k where
g_j = d JSD / d s_j, which simplifies to one expression per case:

    0 < beta < 1:  (1 - beta) * Q_j * (s_j - m_j - KL(Q || M))
    beta = 0:      Q_j - P_j
    beta = 1:      Q_j * (s_j - t_j - KL(Q || P))

each divided by the temperature. So the backward needs, per token, the two log normalisers (two
fp32 parts each, below) and one scalar (KL(Q || M) or KL(Q || P)): 20 bytes saved per token,
never a [N, V] tensor.

How (chunked PyTorch; used on CPU and, for now, on CUDA too -- there is no Triton kernel for
this op yet, so on a GPU it runs cuBLAS GEMMs plus PyTorch element-wise ops per tile): rows
outside the mask are zeroed first (their garbage, NaN included, can never reach a result or a
gradient) and weigh nothing; every row is computed, so selecting the masked rows costs no host
sync (a caller that knows its rows on the host, as the trainer does, passes only those). GEMMs
read bf16 operands and write fp32 results like ``linear_logprobs`` (tensor cores; the weights
are never re-cast per tile; where the device lacks such GEMMs, one fp32 copy per call). Rows are
taken in blocks of ``chunk_rows`` and the vocabulary in slices of ``chunk_vocab``; one
[chunk_rows, chunk_vocab] fp32 tile per model is live at a time.

    pass 1  per vocab slice: both models' logits tile (fp32 result), online log-sum-exp kept as
            a running max (from -inf) and a running sum of exp(z - max), giving each row's
            log normaliser in two parts (max, log sum) -- never rounded into one number of the
            logits' size, which would cost near-certain tokens their log-prob's precision
    pass 2  per vocab slice: recompute the tiles, log-probs = (tile - max) - log sum, accumulate the
            per-token JSD, KL(P || Q), KL(Q || P) and KL(Q || M) in fp32
    backward per vocab slice: recompute the tiles, form d JSD / d z in place (cast to bf16 on
            CUDA for bf16 inputs, as linear_logprobs does), then dX[rows] += dZ @ W_slice and
            dW[slice] += dZ^T @ X (fp32 accumulators; dW in the weight's dtype with
            ``dw_accum="weight"``)

When the whole vocabulary fits in one slice, pass 2 reuses pass 1's tiles (one GEMM per model
in the forward instead of two). Peak extra memory: a few tiles (``TILE_ELEMS`` fp32 elements
each) plus dW [V, H] (fp32, or the weight's dtype with ``dw_accum="weight"``), independent of N
(plus the zeroed copies of the [N, H] hidden states).
"""

from __future__ import annotations

import math

import torch

from .linear_logprobs import _dz_dtype, addmm_, check_dw_accum, dw_buffer, gemm_operand, mm_f32
from .policy_loss import Normalizer, _prep_mask, _prep_normalizer

# fp32 elements of one [rows, vocab] logits tile (about six such tiles are live in pass 2 /
# backward). CPU: 2 MiB tiles keep the peak small; CUDA: 256 MiB tiles, big enough GEMMs.
TILE_ELEMS_CPU = 1 << 19
TILE_ELEMS_CUDA = 1 << 26
# Vocabulary slice width when the caller does not choose one.
VOCAB_CHUNK_CPU = 8192
VOCAB_CHUNK_CUDA = 32768

DISTILL_STAT_NAMES = ("jsd", "forward_kl", "reverse_kl", "tokens")


# ----------------------------------------------------------------------------- reference
def generalized_jsd_reference(student_logprobs, teacher_logprobs, beta):
    """Per-token JSD_beta(P_teacher || Q_student) from float64 log-probs [N, V] -> [N].

    Written straight from the definition in the module docstring (M built with logaddexp so
    log-probs of -1e4 do not underflow to log 0).
    """
    s, t = student_logprobs, teacher_logprobs
    q, p = s.exp(), t.exp()
    if beta == 0:
        return (p * (t - s)).sum(-1)
    if beta == 1:
        return (q * (s - t)).sum(-1)
    m = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))
    return beta * (p * (t - m)).sum(-1) + (1 - beta) * (q * (s - m)).sum(-1)


def fused_linear_jsd_reference(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    loss_mask,
    *,
    beta=0.5,
    temperature=1.0,
    normalizer=None,
    dtype=torch.float64,
):
    """Reference that materialises both [N, V] logits, computed in ``dtype`` (float64 unless a
    test measures fp32's own rounding). Returns (loss, stats) like ``fused_linear_jsd``;
    differentiable w.r.t. the student's hidden and weight only."""
    xs = student_hidden.reshape(-1, student_hidden.shape[-1]).to(dtype)
    xt = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach().to(dtype)
    s = torch.log_softmax(xs @ student_weight.to(dtype).T / temperature, dim=-1)
    t = torch.log_softmax(xt @ teacher_weight.detach().to(dtype).T / temperature, dim=-1)
    mask = loss_mask.reshape(-1).bool()
    zero = torch.zeros((), dtype=dtype)
    per_tok = torch.where(mask, generalized_jsd_reference(s, t, beta), zero)
    norm = _prep_normalizer(normalizer, mask).to(dtype)
    with torch.no_grad():
        stats = {
            "jsd": per_tok.detach().sum(),
            "forward_kl": torch.where(mask, generalized_jsd_reference(s, t, 0.0), zero).sum(),
            "reverse_kl": torch.where(mask, generalized_jsd_reference(s, t, 1.0), zero).sum(),
            "tokens": mask.sum().double(),
        }
    return per_tok.sum() / norm, stats


# ----------------------------------------------------------------------------- tiling
def choose_tiles(
    n_rows: int, vocab: int, device: torch.device, chunk_rows: int | None = None, chunk_vocab: int | None = None
) -> tuple[int, int]:
    """(rows, vocab columns) of one logits tile: rows * cols <= TILE_ELEMS unless overridden."""
    cols = chunk_vocab if chunk_vocab is not None else (VOCAB_CHUNK_CUDA if device.type == "cuda" else VOCAB_CHUNK_CPU)
    cols = max(1, min(int(cols), vocab))
    if chunk_rows is None:
        budget = TILE_ELEMS_CUDA if device.type == "cuda" else TILE_ELEMS_CPU
        chunk_rows = max(1, budget // cols)
    return max(1, min(int(chunk_rows), max(n_rows, 1))), cols


def _tile_logits(x: torch.Tensor, w_slice: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """[c, H] x [v, H]^T -> tempered fp32 logits [c, v]; operands from ``gemm_operand`` (fp32
    accumulation and result)."""
    z = mm_f32(x, w_slice.t())
    return z.mul_(inv_temp) if inv_temp != 1.0 else z


def _row_block_forward(xs, ws, xt, wt, inv_temp, beta, cols):
    """One block of rows: (norm_s, norm_t [c, 2] log normalisers as (max, log sum); jsd, fkl,
    rkl, kl_qm [c]), fp32. Operands from ``gemm_operand``.

    kl_qm is the backward's per-token scalar: KL(Q || M) for 0 < beta < 1, KL(Q || P) for 1.
    """
    c, V = xs.shape[0], ws.shape[0]
    spans = [(v0, min(v0 + cols, V)) for v0 in range(0, V, cols)]
    # pass 1: online log-sum-exp of both models (module docstring)
    run_max = [torch.full((c,), float("-inf"), device=xs.device) for _ in range(2)]
    run_sum = [torch.zeros(c, device=xs.device) for _ in range(2)]
    cached = None
    for v0, v1 in spans:
        tiles = (_tile_logits(xs, ws[v0:v1], inv_temp), _tile_logits(xt, wt[v0:v1], inv_temp))
        for k, z in enumerate(tiles):
            new_max = torch.maximum(run_max[k], z.amax(dim=1))
            run_sum[k] = run_sum[k] * torch.exp(run_max[k] - new_max) + torch.exp(z - new_max[:, None]).sum(dim=1)
            run_max[k] = new_max
        if len(spans) == 1:
            cached = tiles
    norm_s, norm_t = (torch.stack([m, torch.log(l)], dim=1) for m, l in zip(run_max, run_sum))
    fkl, rkl, kl_pm, kl_qm = (torch.zeros(c, device=xs.device) for _ in range(4))
    for v0, v1 in spans:  # pass 2: the divergences, from the finished log-sum-exps
        zs, zt = (
            cached
            if cached is not None
            else (_tile_logits(xs, ws[v0:v1], inv_temp), _tile_logits(xt, wt[v0:v1], inv_temp))
        )
        s, t = _log_probs(zs, norm_s), _log_probs(zt, norm_t)  # log Q, log P (in place)
        q, p = s.exp(), t.exp()
        diff = t - s
        fkl += torch.linalg.vecdot(p, diff)
        rkl -= torch.linalg.vecdot(q, diff)
        if 0.0 < beta < 1.0:
            m = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))
            kl_pm += torch.linalg.vecdot(p, t - m)
            kl_qm += torch.linalg.vecdot(q, s.sub(m))
        del zs, zt, s, t, q, p, diff
    if beta == 0.0:
        jsd = fkl
    elif beta == 1.0:
        jsd, kl_qm = rkl, rkl
    else:
        jsd = beta * kl_pm + (1.0 - beta) * kl_qm
    return norm_s, norm_t, jsd, fkl, rkl, kl_qm


def _log_probs(z: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Tempered logits [c, v] -> log-probs in place: (z - max) - log sum, log_softmax's order."""
    return z.sub_(norm[:, :1]).sub_(norm[:, 1:])


def _grad_tile(zs, zt, norm_s, norm_t, kl_qm, scale, beta):
    """d (sum_i scale_i * JSD_i) / d z for one tile ([c, v], in zs's and zt's storage).

    ``scale`` ([c, 1] per row) already includes the 1/temperature of d z / d hidden-logits.
    """
    s, t = _log_probs(zs, norm_s), _log_probs(zt, norm_t)  # log Q, log P
    if beta == 0.0:
        dz = s.exp_().sub_(t.exp_())  # Q - P
    elif beta == 1.0:
        q = s.exp()
        dz = s.sub_(t).sub_(kl_qm[:, None]).mul_(q)  # Q (s - t - KL(Q || P))
    else:
        q = s.exp()
        m = torch.logaddexp(t.add_(math.log(beta)), s + math.log1p(-beta))
        dz = s.sub_(m).sub_(kl_qm[:, None]).mul_(q).mul_(1.0 - beta)  # (1-b) Q (s - m - KL(Q || M))
    return dz.mul_(scale)


# ----------------------------------------------------------------------------- autograd
class FusedLinearJSDFunction(torch.autograd.Function):
    """Rows outside ``mask`` [N] are zero vectors (the caller zeroes them) and weigh nothing.
    Saves the inputs and 5 fp32 numbers per token."""

    @staticmethod
    def forward(ctx, xs, ws, xt, wt, mask, normalizer, beta, temperature, chunk_rows, chunk_vocab, dw_accum):
        n = xs.shape[0]
        rows, cols = choose_tiles(n, ws.shape[0], xs.device, chunk_rows, chunk_vocab)
        inv_temp = 1.0 / temperature
        ws_op, wt_op = gemm_operand(ws), gemm_operand(wt)  # once per call, never per tile
        norm_s, norm_t = (torch.empty(n, 2, device=xs.device) for _ in range(2))
        kl_qm = torch.empty(n, device=xs.device)
        sums = torch.zeros(3, device=xs.device)  # jsd, forward kl, reverse kl
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            xs_c, xt_c = gemm_operand(xs[r0:r1]), gemm_operand(xt[r0:r1])
            ls, lt, jsd, fkl, rkl, kq = _row_block_forward(xs_c, ws_op, xt_c, wt_op, inv_temp, beta, cols)
            norm_s[r0:r1], norm_t[r0:r1], kl_qm[r0:r1] = ls, lt, kq
            m = mask[r0:r1]
            sums += torch.stack([torch.where(m, t, 0.0).sum() for t in (jsd, fkl, rkl)])
        ctx.save_for_backward(xs, ws, xt, wt, mask, norm_s, norm_t, kl_qm, normalizer)
        ctx.cfg = (beta, inv_temp, rows, cols, dw_accum)
        ctx.mark_non_differentiable(sums)
        return sums[0] / normalizer, sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        xs, ws, xt, wt, mask, norm_s, norm_t, kl_qm, normalizer = ctx.saved_tensors
        beta, inv_temp, rows, cols, dw_accum = ctx.cfg
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, V = xs.shape[0], ws.shape[0]
        dx = torch.zeros(xs.shape, dtype=torch.float32, device=xs.device) if need_dx else None
        dw = dw_buffer(ws, dw_accum) if need_dw else None
        ws_op, wt_op = gemm_operand(ws), gemm_operand(wt)
        dz_dtype = _dz_dtype(xs)
        # every masked token has the same weight; the others none (their rows are zero vectors,
        # so their tiles are finite and 0 * tile is exactly 0)
        row_scale = torch.where(mask, grad_loss.float() * inv_temp / normalizer, 0.0)
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            xs_c, xt_c = gemm_operand(xs[r0:r1]), gemm_operand(xt[r0:r1])
            for v0 in range(0, V, cols):
                v1 = min(v0 + cols, V)
                zs, zt = _tile_logits(xs_c, ws_op[v0:v1], inv_temp), _tile_logits(xt_c, wt_op[v0:v1], inv_temp)
                dz = _grad_tile(zs, zt, norm_s[r0:r1], norm_t[r0:r1], kl_qm[r0:r1], row_scale[r0:r1, None], beta)
                del zt
                dz = dz.to(dz_dtype)
                if need_dx:
                    addmm_(dx[r0:r1], dz, ws_op[v0:v1])
                if need_dw:
                    addmm_(dw[v0:v1], dz.t(), xs_c)
                del dz, zs
        return (
            None if dx is None else dx.to(xs.dtype),
            None if dw is None else dw.to(ws.dtype),
        ) + (None,) * 9


# ----------------------------------------------------------------------------- validation
def _check_args(student_hidden, student_weight, teacher_hidden, teacher_weight, loss_mask, beta, temperature):
    named = {
        "student_hidden": student_hidden,
        "student_weight": student_weight,
        "teacher_hidden": teacher_hidden,
        "teacher_weight": teacher_weight,
    }
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.device != student_hidden.device:
            raise ValueError(f"{name} is on {t.device} but student_hidden is on {student_hidden.device}")
    if not isinstance(loss_mask, torch.Tensor):
        raise TypeError("loss_mask must be a torch.Tensor")
    if loss_mask.device != student_hidden.device:
        raise ValueError(f"loss_mask is on {loss_mask.device} but student_hidden is on {student_hidden.device}")
    for who, hidden, weight in (
        ("student", student_hidden, student_weight),
        ("teacher", teacher_hidden, teacher_weight),
    ):
        if weight.dim() != 2:
            raise ValueError(f"{who}_weight must be [V, H], got shape {tuple(weight.shape)}")
        if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"{who}_hidden has H={hidden.shape[-1] if hidden.dim() else None} but "
                f"{who}_weight has H={weight.shape[1]}"
            )
        if hidden.dtype != weight.dtype:
            raise TypeError(f"{who}_hidden is {hidden.dtype} but {who}_weight is {weight.dtype}; cast one of them")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"teacher_weight has V={teacher_weight.shape[0]} but student_weight has V={student_weight.shape[0]}: "
            "the JSD needs one shared vocabulary (same tokenizer for teacher and student)"
        )
    n = student_hidden.numel() // student_hidden.shape[-1] if student_hidden.shape[-1] else 0
    n_t = teacher_hidden.numel() // teacher_hidden.shape[-1] if teacher_hidden.shape[-1] else 0
    if n_t != n:
        raise ValueError(f"teacher_hidden has {n_t} rows but student_hidden has {n}")
    if loss_mask.numel() != n:
        raise ValueError(f"loss_mask has {loss_mask.numel()} tokens but student_hidden has {n} rows")
    if isinstance(beta, torch.Tensor):
        beta = float(beta)
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):  # NaN fails too
        raise ValueError(f"beta must be a number in [0, 1], got {beta}")
    if isinstance(temperature, torch.Tensor):
        temperature = float(temperature)
    if not (isinstance(temperature, (int, float)) and 0.0 < temperature < math.inf):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return float(beta), float(temperature)


# ----------------------------------------------------------------------------- public op
def fused_linear_jsd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    normalizer: Normalizer = None,
    chunk_rows: int | None = None,
    chunk_vocab: int | None = None,
    dw_accum: str = "fp32",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Generalized JSD between teacher and student lm_head distributions, memory bounded.

    Args:
        student_hidden [N, H] (or [..., H]); student_weight [V, H] (its lm_head), same dtype.
        teacher_hidden [N, Ht] (or [..., Ht]); teacher_weight [V, Ht], same dtype as each other
            (may differ from the student's). Treated as constants: they never get a gradient.
        loss_mask [N] bool or 0/1: the tokens that count (response tokens); other rows are
            zeroed before any GEMM (exactly zero gradient, NaN there cannot leak) but still
            computed: pass only the rows you need when you know them on the host.
        beta in [0, 1]: 0 = KL(teacher || student), 1 = KL(student || teacher), in between the
            mixture JSD (module docstring). temperature > 0 divides both models' logits.
        normalizer: the loss's denominator (default max(mask sum, 1)); pass the global token
            count so micro-batched gradients equal the full batch's.
        chunk_rows / chunk_vocab: override the tile (rows x vocab slice) sizes.
        dw_accum: "fp32" or "weight", as in ``linear_logprobs``.
    Returns:
        loss (0-dim fp32, gradients to student_hidden and student_weight), stats: detached 0-dim
        fp32 sums over masked tokens: "jsd" (loss * normalizer), "forward_kl" (KL(P||Q)),
        "reverse_kl" (KL(Q||P)), "tokens". A NaN in a masked row makes the loss NaN.
    """
    beta, temperature = _check_args(
        student_hidden, student_weight, teacher_hidden, teacher_weight, loss_mask, beta, temperature
    )
    check_dw_accum(dw_accum)
    mask = _prep_mask(loss_mask.reshape(-1))
    norm = _prep_normalizer(normalizer, mask)
    # rows outside the mask become zero vectors (no host sync, unlike selecting them with
    # nonzero()); autograd gives their hidden states exactly zero gradient
    keep = mask[:, None]
    xs = torch.where(keep, student_hidden.reshape(-1, student_hidden.shape[-1]), 0.0)
    xt = torch.where(keep, teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]), 0.0)
    loss, sums = FusedLinearJSDFunction.apply(
        xs.contiguous(),
        student_weight.contiguous(),
        xt.contiguous(),
        teacher_weight.detach().contiguous(),
        mask,
        norm,
        beta,
        temperature,
        chunk_rows,
        chunk_vocab,
        dw_accum,
    )
    stats = dict(zip(DISTILL_STAT_NAMES[:3], sums.detach().unbind()))
    stats["tokens"] = mask.sum(dtype=torch.float32)
    return loss, stats
