"""zppo_fast's clipped surrogate (one fused element-wise Triton kernel forward and one backward on
CUDA) as a verl policy loss.

`compute_policy_loss_zppo` has the signature of verl's policy losses
(verl/trainer/ppo/core_algos.py, `compute_policy_loss_vanilla`, checked at verl commit b178a3cd):
`(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
rollout_is_weights=None) -> (pg_loss, pg_metrics)`, with the same math as "vanilla": log-ratio
clamped to +-20, clip range (clip_ratio_low, clip_ratio_high), dual clip clip_ratio_c on negative
advantages, per-token rollout importance weights, and verl's `agg_loss` modes over
`config.global_batch_info` (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor):
    "token-mean"               sum m * loss / batch_num_tokens * dp_size
    "seq-mean-token-sum"       sum_b (sum_t m * loss) / global_batch_size * dp_size
    "seq-mean-token-mean"      sum_b (sum_t m * loss / len_b) / global_batch_size * dp_size
    "seq-mean-token-sum-norm"  sum m * loss / loss_scale_factor (default: the padded length T)
(without global_batch_info: batch_num_tokens = this micro-batch's tokens, global_batch_size = its
non-empty sequences, dp_size = 1). Per-sequence and rollout weights are positive per-token
factors of a loss linear in the advantage, so they are folded into the advantages and the one
kernel computes every mode. Metrics: verl's "actor/pg_clipfrac", "actor/ppo_kl" and
"actor/pg_clipfrac_lower", except that tokens with a rollout weight of exactly 0 are not counted
in the clip fractions.

With verl importable, importing this file registers the loss as "zppo": set
`actor_rollout_ref.actor.policy_loss.loss_mode=zppo`. Without verl, call it directly.
"""

from __future__ import annotations

from typing import Any

import torch

from zppo_fast.kernels import policy_loss

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def compute_policy_loss_zppo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """All tensors [B, T]; config: verl's actor config (clip_ratio, clip_ratio_low,
    clip_ratio_high, clip_ratio_c, global_batch_info), an object or a dict."""
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {loss_agg_mode!r}")
    if config is None:
        raise ValueError("config (verl's actor config: clip_ratio, clip_ratio_low/high, clip_ratio_c) is required")

    def get(key, default=None):
        value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
        return default if value is None else value

    eps = get("clip_ratio", 0.2)
    info = get("global_batch_info", {}) or {}
    mask = response_mask != 0
    maskf = mask.float()
    dp_size = info.get("dp_size") or 1
    weight = torch.ones_like(maskf) if rollout_is_weights is None else rollout_is_weights.float()
    if loss_agg_mode == "token-mean":
        n = info.get("batch_num_tokens")
        normalizer = (maskf.sum() if n is None else torch.as_tensor(float(n))) / dp_size
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        normalizer = info.get("loss_scale_factor") or get("loss_scale_factor") or mask.shape[-1]
    else:
        if loss_agg_mode == "seq-mean-token-mean":
            weight = weight / maskf.sum(-1, keepdim=True).clamp(min=1.0)
        n = info.get("global_batch_size")
        normalizer = ((maskf.sum(-1) > 0).sum().float() if n is None else torch.as_tensor(float(n))) / dp_size
    loss, stats = policy_loss(
        log_prob,
        old_log_prob,
        advantages.float() * weight,
        mask,
        eps_low=get("clip_ratio_low", eps),
        eps_high=get("clip_ratio_high", eps),
        dual_clip=get("clip_ratio_c", 3.0),
        normalizer=normalizer,
    )
    tokens = stats["tokens"].clamp(min=1.0)
    log_ratio = (log_prob.detach().float() - old_log_prob.float()).clamp(-20.0, 20.0)
    metrics = {
        "actor/pg_clipfrac": ((stats["clip_low"] + stats["clip_high"]) / tokens).item(),
        "actor/ppo_kl": (-torch.where(mask, log_ratio, 0.0).sum() / tokens).item(),
        "actor/pg_clipfrac_lower": (stats["dual_clip"] / tokens).item(),
    }
    return loss, metrics


try:  # verl's registry, when verl is installed
    from verl.trainer.ppo.core_algos import register_policy_loss
except ImportError:
    register_policy_loss = None
if register_policy_loss is not None:
    register_policy_loss("zppo")(compute_policy_loss_zppo)
