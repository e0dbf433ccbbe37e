"""Token-level clipped policy-gradient loss (PPO/DAPO clip-higher + dual-clip), no KL term.

For trainers that already hold per-token log-probs. One fused element-wise Triton kernel
computes, per token, the loss, the gradient coefficient d loss / d logp and the clip flags,
and reduces them per block; the backward is one element-wise kernel scaling the saved
coefficient. CPU (or no Triton): the same math in PyTorch.

Math (per token t with mask m_t; all in fp32; A = advantage):
    log_r = clamp(logp - old_logp, -20, 20)   # as verl: keeps exp() finite; grad 0 outside
    r     = exp(log_r)
    clip_high = A > 0 and r > 1 + eps_high    # upper clip binds: gradient zeroed
    clip_low  = A < 0 and r < 1 - eps_low     # lower clip binds: gradient zeroed
    dual      = A < 0 and r > dual_clip       # dual clip binds: gradient zeroed
    loss_t = -A*(1+eps_high) if clip_high else -A*(1-eps_low) if clip_low
             else -A*dual_clip if dual else -A*r
which equals the usual  where(A<0, min(-A*c, max(-A*r, -A*clip(r))), max(-A*r, -A*clip(r))).
    loss = sum_t m_t * loss_t / normalizer,   normalizer default = max(sum_t m_t, 1)
Gradient flows to logprobs only: d loss / d logp_t = m_t * (-A*r if no flag else 0) / normalizer.

Masked tokens are selected out with ``where`` (not multiplied), so padding may hold any
value, NaN included. A NaN in an unmasked token's logprob / old_logprob / advantage makes
the loss NaN (never a silent number).
"""

from __future__ import annotations

import math

import torch

from ._triton_utils import HAVE_TRITON, kernel, resolve_backend, tl

LOG_RATIO_CLAMP = 20.0
# approx_kl's k3 = exp(d) - 1 - d: in fp32, exp(d) - 1 - d loses every digit once d**2 / 2 falls
# below ulp(1) / 2 (|d| < 3e-4) and most of them up to |d| ~ 1e-2, so below this |d| it is the
# Taylor series d**2/2 + d**3/6 + ... + d**8/40320 (truncation < 1e-10 relative, no cancellation).
K3_SERIES_BELOW = 0.5
_K3_COEFS = tuple(1.0 / math.factorial(k) for k in range(2, 9))
STAT_NAMES = ("clip_low", "clip_high", "dual_clip", "ratio", "approx_kl", "tokens")
# Column order of the per-block partial sums written by the Triton kernel.
_N_PARTIALS = 7  # loss + the six stats

Normalizer = float | int | torch.Tensor | None


# ----------------------------------------------------------------------------- reference
def policy_loss_reference(
    logprobs,
    old_logprobs,
    advantages,
    loss_mask,
    *,
    eps_low=0.2,
    eps_high=0.28,
    dual_clip=10.0,
    normalizer=None,
    dtype=torch.float64,
):
    """Readable reference (verl's formulation) computed in ``dtype`` (float64 unless a test
    measures fp32's own rounding). Returns (loss, stats) like policy_loss.

    Differentiable w.r.t. ``logprobs`` through plain autograd. Shapes: all [N].
    """
    lp = logprobs.to(dtype).reshape(-1)
    old = old_logprobs.to(dtype).reshape(-1)
    adv = advantages.to(dtype).reshape(-1)
    mask = loss_mask.reshape(-1).bool()
    log_r = torch.clamp(lp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_r)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    clip1 = torch.maximum(pg1, pg2)
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        per_tok = torch.where(adv < 0, torch.minimum(pg3, clip1), clip1)
    else:
        per_tok = clip1
    per_tok = torch.where(mask, per_tok, torch.zeros_like(per_tok))
    if normalizer is None:
        normalizer = mask.sum().clamp(min=1).to(dtype)
    loss = per_tok.sum() / normalizer
    with torch.no_grad():
        m = mask.double()
        r = ratio.detach()
        stats = {
            "clip_low": ((adv < 0) & (r < 1 - eps_low)).double().mul(m).sum(),
            "clip_high": ((adv > 0) & (r > 1 + eps_high)).double().mul(m).sum(),
            "dual_clip": (
                ((adv < 0) & (r > dual_clip)).double().mul(m).sum()
                if dual_clip is not None
                else torch.zeros((), dtype=torch.float64)
            ),
            "ratio": torch.where(mask, r, 0.0).sum(),
            "approx_kl": torch.where(mask, torch.expm1(log_r.detach()) - log_r.detach(), 0.0).sum(),
            "tokens": m.sum(),
        }
    return loss, stats


# ----------------------------------------------------------------------------- torch path
def _k3_torch(log_r: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """k3 = exp(log_r) - 1 - log_r, accurate in fp32 for tiny log-ratios (K3_SERIES_BELOW)."""
    c = _K3_COEFS
    d = log_r
    series = d * d * (c[0] + d * (c[1] + d * (c[2] + d * (c[3] + d * (c[4] + d * (c[5] + d * c[6]))))))
    return torch.where(d.abs() < K3_SERIES_BELOW, series, (r - 1.0) - d)


def _token_terms_torch(logp, old, adv, mask, eps_low, eps_high, dual_clip):
    """Per-token (loss_t, coef_t, flags, ratio, log_r) in fp32, masked tokens zeroed. Shapes [N]."""
    logp = logp.float()
    old = old.float()
    adv = adv.float()
    log_r = torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    # clamp() has zero gradient outside the range: fold that into the coefficient.
    inside = (logp - old).abs() <= LOG_RATIO_CLAMP
    r = torch.exp(log_r)
    clip_high = (adv > 0) & (r > 1.0 + eps_high)
    clip_low = (adv < 0) & (r < 1.0 - eps_low)
    dual = (adv < 0) & (r > dual_clip)
    unclipped = -adv * r
    loss_t = torch.where(
        clip_high,
        -adv * (1.0 + eps_high),
        torch.where(clip_low, -adv * (1.0 - eps_low), torch.where(dual, -adv * dual_clip, unclipped)),
    )
    coef = torch.where(clip_high | clip_low | dual | ~inside, torch.zeros_like(unclipped), unclipped)
    zero = torch.zeros_like(loss_t)
    loss_t = torch.where(mask, loss_t, zero)
    coef = torch.where(mask, coef, zero)
    return (
        loss_t,
        coef,
        (clip_low & mask, clip_high & mask, dual & mask),
        torch.where(mask, r, zero),
        torch.where(mask, log_r, zero),
    )


def _policy_terms_torch(logp, old, adv, mask, eps_low, eps_high, dual_clip):
    """Returns (loss_sum [], coef [N] fp32, stats dict of fp32 sums)."""
    loss_t, coef, (cl, ch, dc), r, log_r = _token_terms_torch(logp, old, adv, mask, eps_low, eps_high, dual_clip)
    stats = {
        "clip_low": cl.sum(dtype=torch.float32),
        "clip_high": ch.sum(dtype=torch.float32),
        "dual_clip": dc.sum(dtype=torch.float32),
        "ratio": r.sum(),
        "approx_kl": torch.where(mask, _k3_torch(log_r, r), torch.zeros_like(r)).sum(),
        "tokens": mask.sum(dtype=torch.float32),
    }
    return loss_t.sum(), coef, stats


# ----------------------------------------------------------------------------- triton path
if HAVE_TRITON:
    # k3's series coefficients 1/k!, k = 2..8, as constexpr globals (a kernel may read no others)
    C2, C3, C4, C5, C6, C7, C8 = (tl.constexpr(c) for c in _K3_COEFS)
    K3_BELOW = tl.constexpr(K3_SERIES_BELOW)

    def _policy_loss_fwd_kernel(
        # pointers
        LOGP,
        OLD,
        ADV,
        MASK,
        COEF,
        PARTIALS,
        # shapes
        n_tokens,
        # scalars
        eps_low,
        eps_high,
        dual_clip,
        # meta
        WRITE_COEF: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One program = BLOCK tokens. Writes coef [N] and 7 partial sums for this block."""
        pid = tl.program_id(0).to(tl.int64)  # int64: N can exceed 2**31 / BLOCK products
        offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        inb = offs < n_tokens
        m = tl.load(MASK + offs, mask=inb, other=0) != 0
        logp = tl.load(LOGP + offs, mask=inb, other=0.0).to(tl.float32)
        old = tl.load(OLD + offs, mask=inb, other=0.0).to(tl.float32)
        adv = tl.load(ADV + offs, mask=inb, other=0.0).to(tl.float32)
        d = logp - old
        # propagate_nan: plain min/max would turn a NaN log-ratio into +-20 silently.
        log_r = tl.clamp(d, -20.0, 20.0, propagate_nan=tl.PropagateNan.ALL)
        inside = tl.abs(d) <= 20.0
        r = tl.exp(log_r)
        clip_high = (adv > 0) & (r > 1.0 + eps_high)
        clip_low = (adv < 0) & (r < 1.0 - eps_low)
        dual = (adv < 0) & (r > dual_clip)  # dual_clip = +inf when disabled
        unclipped = -adv * r
        loss_t = tl.where(
            clip_high,
            -adv * (1.0 + eps_high),
            tl.where(clip_low, -adv * (1.0 - eps_low), tl.where(dual, -adv * dual_clip, unclipped)),
        )
        # where() rather than multiply by the mask: padding may hold NaN/inf.
        loss_t = tl.where(m, loss_t, 0.0)
        if WRITE_COEF:
            coef = tl.where(clip_high | clip_low | dual | (~inside), 0.0, unclipped)
            coef = tl.where(m, coef, 0.0)
            tl.store(COEF + offs, coef, mask=inb)
        one = tl.full([BLOCK], 1.0, tl.float32)
        base = PARTIALS + pid * 7
        tl.store(base + 0, tl.sum(loss_t, axis=0))
        tl.store(base + 1, tl.sum(tl.where(clip_low & m, one, 0.0), axis=0))
        tl.store(base + 2, tl.sum(tl.where(clip_high & m, one, 0.0), axis=0))
        tl.store(base + 3, tl.sum(tl.where(dual & m, one, 0.0), axis=0))
        tl.store(base + 4, tl.sum(tl.where(m, r, 0.0), axis=0))
        # k3 = exp(log_r) - 1 - log_r: the Taylor series for small |log_r| (see _k3_torch)
        poly = C6 + log_r * (C7 + log_r * C8)
        series = log_r * log_r * (C2 + log_r * (C3 + log_r * (C4 + log_r * (C5 + log_r * poly))))
        k3 = tl.where(tl.abs(log_r) < K3_BELOW, series, (r - 1.0) - log_r)
        tl.store(base + 5, tl.sum(tl.where(m, k3, 0.0), axis=0))
        tl.store(base + 6, tl.sum(tl.where(m, one, 0.0), axis=0))

    def _policy_loss_bwd_kernel(
        # pointers
        COEF,
        SCALE,
        DLOGP,
        # shapes
        n_tokens,
        # meta
        BLOCK: tl.constexpr,
    ):
        """dlogp = coef * (grad_out / normalizer); SCALE is a 1-element device tensor (no host sync)."""
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        inb = offs < n_tokens
        scale = tl.load(SCALE)
        coef = tl.load(COEF + offs, mask=inb, other=0.0)
        tl.store(DLOGP + offs, (coef * scale).to(DLOGP.dtype.element_ty), mask=inb)


_BLOCK = 1024


def _policy_terms_triton(logp, old, adv, mask, eps_low, eps_high, dual_clip, write_coef):
    n = logp.numel()
    n_blocks = max(triton_cdiv(n, _BLOCK), 1)
    partials = torch.empty((n_blocks, _N_PARTIALS), dtype=torch.float32, device=logp.device)
    coef = torch.empty(n, dtype=torch.float32, device=logp.device) if write_coef else partials
    mask_u8 = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    kernel(_policy_loss_fwd_kernel, logp.device)[(n_blocks,)](
        logp,
        old,
        adv,
        mask_u8,
        coef,
        partials,
        n,
        float(eps_low),
        float(eps_high),
        float(dual_clip if dual_clip is not None else float("inf")),
        WRITE_COEF=write_coef,
        BLOCK=_BLOCK,
    )
    sums = partials.sum(0)  # fixed-order reduction: deterministic, unlike atomics
    stats = {name: sums[i + 1] for i, name in enumerate(STAT_NAMES)}
    return sums[0], (coef if write_coef else None), stats


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ----------------------------------------------------------------------------- autograd
class PolicyLossFunction(torch.autograd.Function):
    """loss = sum_t m_t loss_t / normalizer. Saves only coef [N] fp32 (d loss_t / d logp_t)."""

    @staticmethod
    def forward(ctx, logp, old, adv, mask, normalizer, eps_low, eps_high, dual_clip, backend):
        need_grad = ctx.needs_input_grad[0]
        if backend == "triton":
            loss_sum, coef, stats = _policy_terms_triton(logp, old, adv, mask, eps_low, eps_high, dual_clip, need_grad)
        else:
            loss_sum, coef, stats = _policy_terms_torch(
                logp, old, adv, mask, eps_low, eps_high, dual_clip if dual_clip is not None else float("inf")
            )
        loss = loss_sum / normalizer
        ctx.backend = backend
        ctx.logp_dtype = logp.dtype
        ctx.save_for_backward(coef if need_grad else None, normalizer)
        ctx.mark_non_differentiable(*stats.values())
        return (loss, *[stats[k] for k in STAT_NAMES])

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        coef, normalizer = ctx.saved_tensors
        if coef is None:
            return (None,) * 9
        scale = (grad_loss.float() / normalizer).reshape(1)
        if ctx.backend == "triton":
            dlogp = torch.empty(coef.shape, dtype=ctx.logp_dtype, device=coef.device)
            n = coef.numel()
            kernel(_policy_loss_bwd_kernel, coef.device)[(max(triton_cdiv(n, _BLOCK), 1),)](
                coef, scale, dlogp, n, BLOCK=_BLOCK
            )
        else:
            dlogp = (coef * scale).to(ctx.logp_dtype)
        return dlogp, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------- validation
def _check_token_inputs(names_tensors, n_expected=None):
    """Same numel and device for every per-token tensor; returns flattened [N] views."""
    first_name, first = names_tensors[0]
    out = []
    for name, t in names_tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
        if t.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {first_name} has shape {tuple(first.shape)}")
        out.append(t.reshape(-1))
    if n_expected is not None and out[0].numel() != n_expected:
        raise ValueError(f"{first_name} has {out[0].numel()} tokens, expected {n_expected}")
    return out


def _prep_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    if loss_mask.dtype == torch.bool:
        return loss_mask.contiguous()
    if loss_mask.is_floating_point() or loss_mask.dtype in (
        torch.int8,
        torch.uint8,
        torch.int16,
        torch.int32,
        torch.int64,
    ):
        return (loss_mask != 0).contiguous()
    raise TypeError(f"loss_mask must be bool or a 0/1 number tensor, got {loss_mask.dtype}")


def _prep_normalizer(normalizer: Normalizer, mask: torch.Tensor) -> torch.Tensor:
    """0-dim fp32 tensor on mask's device; default max(mask.sum(), 1). No host sync."""
    if normalizer is None:
        return mask.sum(dtype=torch.float32).clamp(min=1.0)
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a scalar, got shape {tuple(normalizer.shape)}")
        return normalizer.detach().to(device=mask.device, dtype=torch.float32).reshape(())
    normalizer = float(normalizer)
    if not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    # full(): a fill kernel with the value as its argument; torch.tensor(x, device=cuda) would be
    # a blocking copy from pageable host memory on every call
    return torch.full((), normalizer, dtype=torch.float32, device=mask.device)


def _check_clip_args(eps_low, eps_high, dual_clip):
    if not (0.0 <= eps_low < 1.0):
        raise ValueError(f"eps_low must be in [0, 1), got {eps_low}")
    if not eps_high >= 0.0:
        raise ValueError(f"eps_high must be >= 0, got {eps_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")


# ----------------------------------------------------------------------------- public op
def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = 10.0,
    normalizer: Normalizer = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level clipped surrogate with clip-higher and dual-clip (see module docstring).

    Args:
        logprobs: [N] (any shape; flattened) current-policy log-probs; receives the gradient.
        old_logprobs, advantages: same shape, no gradient. loss_mask: same shape, bool or 0/1.
        normalizer: float or 0-dim tensor, e.g. the token count of the whole optimizer step so
            micro-batches give identical summed gradients. Default max(loss_mask.sum(), 1).
        dual_clip: None disables the dual clip.
        backend: "auto" (Triton on CUDA, PyTorch on CPU), "torch", or "triton" (on CPU: interpreter).
    Returns:
        loss: 0-dim fp32. stats: detached 0-dim fp32 SUMS over masked tokens (add them over
        micro-batches, divide by the global token count):
          clip_low  - tokens with A<0 and ratio < 1-eps_low  (gradient zeroed by the lower clip)
          clip_high - tokens with A>0 and ratio > 1+eps_high (gradient zeroed by the upper clip)
          dual_clip - tokens with A<0 and ratio > dual_clip  (gradient zeroed by the dual clip)
          ratio     - sum of ratios r = exp(clamp(logp-old, -20, 20))
          approx_kl - sum of k3 = (r - 1) - log r, an unbiased, non-negative estimate of
                      KL(old || new) for tokens sampled from the old policy
          tokens    - number of masked (valid) tokens
    """
    _check_clip_args(eps_low, eps_high, dual_clip)
    if not logprobs.is_floating_point():
        raise TypeError(f"logprobs must be a floating tensor, got {logprobs.dtype}")
    lp, old, adv, mask = _check_token_inputs(
        [("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages), ("loss_mask", loss_mask)]
    )
    mask = _prep_mask(mask)
    norm = _prep_normalizer(normalizer, mask)
    backend = resolve_backend(backend, lp.device)
    outs = PolicyLossFunction.apply(
        lp.contiguous(),
        old.detach().contiguous(),
        adv.detach().contiguous(),
        mask,
        norm,
        float(eps_low),
        float(eps_high),
        None if dual_clip is None else float(dual_clip),
        backend,
    )
    loss, stat_values = outs[0], outs[1:]
    return loss, {k: v.detach() for k, v in zip(STAT_NAMES, stat_values)}
