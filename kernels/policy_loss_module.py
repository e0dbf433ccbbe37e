"""``FusedLinearPolicyLoss``: the lm_head + GRPO-family loss as an ``nn.Module`` with the
constructor names, ``forward`` arguments, loss types and returned metrics of Liger-Kernel's
``LigerFusedLinearGRPOLoss`` (liger_kernel/chunked_loss/grpo_loss.py, 0.8.x), so swapping it in is
one line. What it adds: ``dual_clip`` (the dual clip of Ye et al., 2020; off by default as Liger
has none), per-token advantages [B, T], and the memory of ``linear_logprobs`` (no [B, T, V]
tensor, no per-call copy of the weight's gradient: Liger keeps a [V, H] gradient buffer per
sequence chunk as well as the accumulator).

Per token (t in the completion mask m, A the advantage, r = exp(clamp(logp - old, -20, 20))):
    per_token = clipped surrogate of ``policy_loss`` (clip-higher, dual clip = min(dual_clip, delta))
                * vllm_is_ratio  +  beta * k3(ref, logp),   k3 = exp(ref - logp) - (ref - logp) - 1
    loss_type  loss                                                  (B sequences)
    "grpo"     sum_b (sum_t m per_token / max(sum_t m, 1)) / B       sequence mean of token means
    "bnpo"     sum m per_token / max(sum m, 1)                       local token mean
    "dr_grpo"  sum m per_token / (B * max_completion_length)
    "dapo"     sum m per_token / max(N / world_size, 1), N = num_items_in_batch when given, else
               sum m all-reduced over the process group (as Liger, one all_reduce per call)
Liger's ``delta`` (INTELLECT-2's upper clip of the ratio) equals the dual clip on negative
advantages when delta >= 1 + epsilon_high, the only setting accepted here. Liger applies no
clamp to the log-ratio; ours clamps it to +-20 as ``policy_loss`` does (verl), which matters only
for ratios beyond e^20.

Returns ``(loss, metrics)``: loss 0-dim fp32; metrics a tuple of 0-dim fp32 means over the mask,
Liger's: ``(kl,)`` when beta != 0, then ``clip_ratio`` (tokens whose clip binds: A < 0 and
r < 1 - epsilon_low, or A > 0 and r > 1 + epsilon_high).
"""

from __future__ import annotations

import torch
from torch import nn

from .linear_logprobs import linear_logprobs
from .policy_loss import _check_clip_args, _token_terms_torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


class FusedLinearPolicyLoss(nn.Module):
    """Drop-in for ``LigerFusedLinearGRPOLoss`` (same keyword names, meanings and defaults).

    ``compiled`` and ``chunk_size`` are accepted so Liger's call sites need no edit, and change
    nothing: no torch.compile is needed inside (compile the caller if you like: the module traces
    with ``fullgraph=True``), and rows are chunked by a memory budget (``chunk_rows`` overrides it),
    not per sequence. Loss types and importance-sampling levels Liger has and this module does not
    (cispo, sapo, vespo, luspo; "sequence") raise ValueError.
    """

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: int | None = None,
        importance_sampling_level: str = "token",
        temperature: float = 1.0,
        delta: float | None = None,
        use_bias_correction_kl: bool = False,
        *,
        dual_clip: float | None = None,
        backend: str = "auto",
        chunk_rows: int | None = None,
    ):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if loss_type == "dr_grpo" and not (max_completion_length and max_completion_length > 0):
            raise ValueError(f"loss_type 'dr_grpo' needs max_completion_length > 0, got {max_completion_length}")
        if importance_sampling_level != "token":
            raise ValueError(f"importance_sampling_level must be 'token', got {importance_sampling_level!r}")
        if delta is not None and not delta >= 1.0 + epsilon_high:
            raise ValueError(
                f"delta must be >= 1 + epsilon_high = {1.0 + epsilon_high} (or None), got {delta}: a smaller "
                "delta would clip positive advantages below the upper clip, which this module does not implement"
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        caps = [c for c in (dual_clip, delta) if c is not None]
        self.dual = min(caps) if caps else None
        _check_clip_args(epsilon_low, epsilon_high, self.dual)
        self.beta = float(beta)
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.chunk_size = chunk_size
        self.epsilon_low = float(epsilon_low)
        self.epsilon_high = float(epsilon_high)
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.temperature = float(temperature)
        self.delta = delta
        self.use_bias_correction_kl = use_bias_correction_kl
        self.dual_clip = dual_clip
        self.backend = backend
        self.chunk_rows = chunk_rows

    def forward(
        self,
        _input: torch.Tensor,
        lin_weight: torch.Tensor,
        selected_token_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        advantages: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_per_token_logps: torch.Tensor | None = None,
        old_per_token_logps: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        vllm_is_ratio: torch.Tensor | None = None,
        num_items_in_batch: int | float | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """_input [B, T, H] (hidden states at the completion positions), lin_weight [V, H],
        selected_token_ids / attention_mask (the completion mask) [B, T], advantages [B] or
        [B, T], bias [V]; ref_per_token_logps / old_per_token_logps [B, T] (old None: on-policy,
        ratio 1); ref_input [B, T, H] + ref_weight [V, H] (+ ref_bias): the reference log-probs are
        computed here, streamed, when ref_per_token_logps is not given; vllm_is_ratio [B], [B, 1]
        or [B, T]; num_items_in_batch: the "dapo" token count over every process and micro-batch."""
        if _input.dim() != 3 or selected_token_ids.shape != _input.shape[:2]:
            raise ValueError(
                f"_input must be [B, T, H] and selected_token_ids [B, T], got {tuple(_input.shape)} and "
                f"{tuple(selected_token_ids.shape)}"
            )
        B, T = selected_token_ids.shape
        if attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask must be [B={B}, T={T}], got {tuple(attention_mask.shape)}")
        mask = attention_mask != 0
        # rows outside the mask are skipped (log-prob 0, no gradient), whatever id they hold
        ids = selected_token_ids.masked_fill(~mask, -100)
        lp_kw = {"temperature": self.temperature, "backend": self.backend, "chunk_rows": self.chunk_rows}
        logp = linear_logprobs(_input, lin_weight, ids, bias=bias, **lp_kw).view(B, T)

        old = logp.detach() if old_per_token_logps is None else old_per_token_logps.float()
        if advantages.shape not in ((B,), (B, T)):
            raise ValueError(f"advantages must be [B={B}] or [B, T]=[{B}, {T}], got {tuple(advantages.shape)}")
        adv = advantages.float()
        adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv
        per_token, _, (clip_low, clip_high, _), _, _ = _token_terms_torch(
            logp, old, adv, mask, self.epsilon_low, self.epsilon_high, self.dual if self.dual else float("inf")
        )
        if vllm_is_ratio is not None:
            ratio = vllm_is_ratio.float()
            per_token = per_token * (ratio[:, None] if ratio.dim() == 1 else ratio)

        metrics = []
        n_valid = mask.sum(dtype=torch.float32).clamp(min=1.0)
        if self.beta != 0.0:
            ref = self._ref_logprobs(logp, ids, ref_per_token_logps, ref_input, ref_weight, ref_bias, lp_kw)
            d = ref - logp
            kl = torch.where(mask, torch.exp(d) - d - 1.0, torch.zeros_like(d))
            if self.use_bias_correction_kl:  # DeepSeek-V3.2: weight the KL by the importance ratio
                kl = kl * torch.exp(logp - old)
            per_token = per_token + self.beta * kl
            metrics.append(kl.detach().sum() / n_valid)
        metrics.append((clip_low | clip_high).sum(dtype=torch.float32) / n_valid)
        return self._aggregate(per_token, mask, num_items_in_batch), tuple(metrics)

    def _ref_logprobs(self, logp, ids, ref_logps, ref_input, ref_weight, ref_bias, lp_kw):
        """[B, T] fp32 reference log-probs: given, computed from ref_input / ref_weight, or (no
        reference model) the current ones detached, which makes the KL term zero."""
        if ref_logps is not None:
            return ref_logps.float()
        if ref_input is not None and self.use_ref_model:
            if ref_weight is None:
                raise ValueError("ref_input was given without ref_weight (the reference model's lm_head weight)")
            with torch.no_grad():
                return linear_logprobs(ref_input, ref_weight, ids, bias=ref_bias, **lp_kw).view(logp.shape)
        if self.use_ref_model:
            raise ValueError("beta != 0 and use_ref_model=True need ref_per_token_logps or ref_input + ref_weight")
        return logp.detach()

    def _aggregate(self, per_token, mask, num_items_in_batch):
        B = per_token.shape[0]
        if self.loss_type == "grpo":
            seq = per_token.sum(-1) / mask.sum(-1, dtype=torch.float32).clamp(min=1.0)
            return seq.sum() / B
        total = per_token.sum()
        if self.loss_type == "bnpo":
            return total / mask.sum(dtype=torch.float32).clamp(min=1.0)
        if self.loss_type == "dr_grpo":
            return total / (B * self.max_completion_length)
        return total / dapo_normalizer(mask, num_items_in_batch)


def dapo_normalizer(mask: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Liger's / TRL's "dapo" normalizer for one process: the global token count divided by the
    world size (DDP averages the gradients over processes, which restores the global mean).
    num_items_in_batch, when given, is that global count; otherwise the mask's sum is
    all-reduced over the default process group."""
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if num_items_in_batch is not None:
        n = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=mask.device).reshape(())
    else:
        n = mask.sum(dtype=torch.float32)
        if world > 1:
            dist.all_reduce(n)
    return (n / world).clamp(min=1.0)
