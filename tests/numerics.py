"""Comparing a kernel's output with a float64 reference, and two float32 results that differ only in
the order of their sums."""

import math

import torch

EPS32 = torch.finfo(torch.float32).eps

# How many times fp32 arithmetic's own error a kernel may show on ill-conditioned inputs.
FP32_SLACK = 4.0


def close(actual, expected, what, tol, scale=1.0, fp32=None):
    """``actual`` within ``tol["rtol"]`` and ``tol["atol"] * max(|expected|, scale)`` of the float64
    ``expected``; or, given ``fp32`` (the same reference evaluated in float32) that is itself
    further off, with a largest error at most FP32_SLACK times fp32's. On ill-conditioned inputs
    (logits of 45 at temperature 0.3, importance ratios of 250) no fp32 kernel beats fp32
    arithmetic, while a kernel that loses precision of its own still fails."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    scale = max(expected.abs().max().item(), scale) if expected.numel() else scale
    try:
        torch.testing.assert_close(
            actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=lambda m: f"{what}: {m}"
        )
    except AssertionError:
        if fp32 is None or not expected.numel():
            raise
        err = (actual - expected).abs().max().item()
        err32 = (fp32.detach().cpu().double() - expected).abs().max().item()
        if not err <= FP32_SLACK * err32:
            raise AssertionError(
                f"{what}: largest error {err:.3g} is over the tolerance and over {FP32_SLACK:g}x the "
                f"error of the fp32 reference ({err32:.3g})"
            ) from None


def reorder_tol(terms: int, scale: float) -> float:
    """How far apart two float32 sums of the same `terms` numbers of magnitude up to `scale` may be
    when they are added in different orders (another packing, another rank count, another CPU's
    GEMM blocking): each order's rounding error grows like a random walk, eps32 * sqrt(terms) *
    scale; 16 covers the tail of that walk and the few float32 operations each term went through
    before the sum. A real fault (a term lost or counted twice, a wrong normalizer) is off by a
    whole term or a factor, far beyond it.

    For a gradient of a sequence model, an entry sums over the step's loss tokens, and each token's
    term sums over the positions before it (attention, the linear-attention recurrence): terms =
    loss tokens * the longest sequence; the tensor's largest entry stands for the size of its terms."""
    return 16 * EPS32 * math.sqrt(terms) * scale


def assert_matches_float64(got, want, model, reference, seed: int) -> None:
    """fp32 per-token log-probs `got` (from `model`) within fp32 tolerance of the float64 `want`
    (from `reference`, the same weights in float64), and the gradients of one random weighted sum
    of each within fp32 tolerance of each other, parameter by parameter (in the same order)."""
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)
    weights = torch.randn(len(want), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (got.double() * weights).sum().backward()
    (want * weights).sum().backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        scale = b.grad.abs().max().item()
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=0, atol=2e-4 * max(scale, 1.0), msg=name)
