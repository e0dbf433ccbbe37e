"""lm_head + token-level clipped policy loss, fused so no [N, V] tensor ever exists.

    loss = policy_loss(linear_logprobs(hidden, weight, target_ids, temperature),
                       old_logprobs, advantages, loss_mask, ...)

Forward: per chunk of rows, GEMM to fp32 logits, then one streaming pass (online log-sum-exp,
running max from -inf, fp32) giving logp, the log normaliser and entropy; then the element-wise policy-loss
kernel over the N log-probs gives the loss, the stats and coef = d loss / d logp.
Saved for backward: hidden, weight, targets, log_norm [N, 2], coef [N] (a few bytes per token).
Backward: per chunk, recompute the logits, fold coef * grad / normalizer into the softmax
gradient in place, then dX = dZ @ W and dW += dZ^T @ X in fp32. Gradients flow to hidden and
weight only. Masked rows contribute exactly zero gradient (their coef is 0); their target ids
are don't-cares (e.g. -100 padding is accepted).
"""

from __future__ import annotations

import torch

from ._triton_utils import resolve_backend
from .linear_logprobs import (
    check_dw_accum,
    check_lm_head_args,
    check_targets,
    linear_logprobs_reference,
    lm_head_backward,
    lm_head_forward,
)
from .policy_loss import (
    STAT_NAMES,
    Normalizer,
    _check_clip_args,
    _policy_terms_torch,
    _policy_terms_triton,
    _prep_mask,
    _prep_normalizer,
    policy_loss_reference,
)

FUSED_STAT_NAMES = STAT_NAMES + ("entropy",)


def fused_linear_policy_loss_reference(
    hidden,
    weight,
    target_ids,
    old_logprobs,
    advantages,
    loss_mask,
    *,
    temperature=1.0,
    dtype=torch.float64,
    **clip,
):
    """Reference in ``dtype`` (float64 by default): materialised logits + policy_loss_reference,
    which takes ``clip`` (eps_low, eps_high, dual_clip, normalizer). Returns (loss, stats)."""
    mask = loss_mask.reshape(-1).bool()
    tgt = torch.where(mask, target_ids.reshape(-1).long(), 0)
    logp, ent = linear_logprobs_reference(
        hidden.reshape(-1, hidden.shape[-1]), weight, tgt, temperature=temperature, return_entropy=True, dtype=dtype
    )
    old = logp.detach() if old_logprobs is None else old_logprobs
    loss, stats = policy_loss_reference(logp, old, advantages, loss_mask, dtype=dtype, **clip)
    stats["entropy"] = torch.where(mask, ent.detach(), 0.0).sum()
    return loss, stats


class FusedLinearPolicyLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        tgt,
        old,
        adv,
        mask,
        normalizer,
        eps_low,
        eps_high,
        dual_clip,
        temperature,
        backend,
        chunk_rows,
        dw_accum,
    ):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        logp, log_norm, ent = lm_head_forward(hidden, weight, tgt, temperature, True, backend, chunk_rows)
        if old is None:  # on-policy: the old log-probs are these (ratio exactly 1; no gradient through them)
            old = logp
        if backend == "triton":
            loss_sum, coef, stats = _policy_terms_triton(logp, old, adv, mask, eps_low, eps_high, dual_clip, need_grad)
        else:
            loss_sum, coef, stats = _policy_terms_torch(
                logp, old, adv, mask, eps_low, eps_high, dual_clip if dual_clip is not None else float("inf")
            )
        stats["entropy"] = torch.where(mask, ent, torch.zeros_like(ent)).sum()
        loss = loss_sum / normalizer
        ctx.save_for_backward(hidden, weight, tgt, log_norm, coef if need_grad else None, normalizer)
        ctx.cfg = (temperature, backend, chunk_rows, dw_accum)
        values = [stats[k] for k in FUSED_STAT_NAMES]
        ctx.mark_non_differentiable(*values)
        return (loss, *values)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        hidden, weight, tgt, log_norm, coef, normalizer = ctx.saved_tensors
        temperature, backend, chunk_rows, dw_accum = ctx.cfg
        if coef is None:
            return (None,) * 14
        g = coef * (grad_loss.float() / normalizer)  # dL/dlogp [N] fp32, one tiny element-wise op
        dx, dw, _ = lm_head_backward(
            hidden,
            weight,
            tgt,
            temperature,
            log_norm,
            g,
            None,
            None,
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            backend,
            chunk_rows,
            dw_accum=dw_accum,
        )
        return (dx, dw) + (None,) * 12


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = 10.0,
    temperature: float = 1.0,
    normalizer: Normalizer = None,
    backend: str = "auto",
    chunk_rows: int | None = None,
    dw_accum: str = "fp32",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss on log_softmax(hidden @ weight.T / temperature)[target], memory bounded.

    Args:
        hidden [N, H] (or [..., H]); weight [V, H] (lm_head, same dtype/device); target_ids [N] int
        (must be in [0, V) where loss_mask is set); old_logprobs, advantages, loss_mask [N].
        old_logprobs None: on-policy, the old log-probs are this forward's own (detached: every
        ratio is exactly 1, the gradient is A * d logp), which saves the pass that would compute
        them under the same weights.
        eps_low, eps_high, dual_clip, normalizer: as in ``policy_loss``.
        dw_accum: "fp32" or "weight", as in ``linear_logprobs``.
    Returns:
        loss (0-dim fp32, gradients to hidden and weight), stats: the ``policy_loss`` sums plus
        "entropy" = sum over masked tokens of the tempered distribution's entropy.
    """
    _check_clip_args(eps_low, eps_high, dual_clip)
    check_dw_accum(dw_accum)
    h2, tgt = check_lm_head_args(
        hidden,
        weight,
        target_ids,
        temperature,
        extra=[*([("old_logprobs", old_logprobs)] if old_logprobs is not None else []),
               ("advantages", advantages), ("loss_mask", loss_mask)],
    )
    mask = _prep_mask(loss_mask.reshape(-1))
    tgt = check_targets(tgt, weight.shape[0], valid=mask)
    norm = _prep_normalizer(normalizer, mask)
    backend = resolve_backend(backend, h2.device)
    outs = FusedLinearPolicyLossFunction.apply(
        h2.contiguous(),
        weight.contiguous(),
        tgt.contiguous(),
        None if old_logprobs is None else old_logprobs.detach().reshape(-1).contiguous(),
        advantages.detach().reshape(-1).contiguous(),
        mask,
        norm,
        float(eps_low),
        float(eps_high),
        None if dual_clip is None else float(dual_clip),
        float(temperature),
        backend,
        chunk_rows,
        dw_accum,
    )
    return outs[0], {k: v.detach() for k, v in zip(FUSED_STAT_NAMES, outs[1:])}
