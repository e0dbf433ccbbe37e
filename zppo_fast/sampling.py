"""One decoding step's token choice: the next-token logits of the live rows in, a token and its
log-probability out (the transformers engine's sampler; SGLang samples inside its own engine).

The logits go through, in this order (SGLang's and transformers' order):
1. the presence penalty off the raw logit of every token the row's completion already holds;
2. the suppressed tokens (a VLM's vision special tokens) to -inf, recording the log of the mass the
   other tokens keep at the temperature, so the reported log-prob can put it back in the normalizer;
3. temperature, top-k (ties with the k-th logit kept), top-p (the smallest set of the likeliest
   tokens holding more than top_p, at least the likeliest one).

The draw inverts the cumulative distribution with one uniform number per row from the caller's
`torch.Generator`. `torch.multinomial` draws one exponential variate per vocabulary entry (on a CPU
that was 15% of a rollout at a 617-token vocabulary), and a generator of the call's own keeps the
engine off the process's global random state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from zppo_fast.engine import SamplingParams

# The inverse-CDF target is scaled below the total by this much, so that rounding can never carry it
# past the last token with probability (a mass of 2**-40 at the top is left out, far below the
# float64 resolution of any token's probability that matters).
_BELOW_TOTAL = 1.0 - 2.0 ** -40


def processed(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None = None,
              suppress: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The log-probabilities the next token is drawn from under `p`'s temperature (0: greedy, no
    temperature, top-k or top-p), top_k, top_p and presence_penalty, and the suppressed mass's correction.

    logits (B, V) float32; seen (B, V) bool, the tokens each row's completion holds (with a
    presence penalty); suppress (S,) long ids. Returns logp (B, V) with -inf on the excluded tokens,
    and kept (B,): log of the probability the unsuppressed tokens hold at the temperature before the
    mask (None without suppression); logp + kept at a drawn token is its log-prob under the whole
    vocabulary's tempered softmax (exactly the trainer's without top-k / top-p).
    """
    if p.presence_penalty and seen is not None:
        logits = logits - p.presence_penalty * seen.to(logits.dtype)
    temperature = p.temperature or 1.0  # greedy: the argmax of the plain logits
    scores = logits / temperature if temperature != 1.0 else logits
    kept = None
    if suppress is not None and suppress.numel():
        masked = scores.index_fill(1, suppress, float("-inf"))
        kept = masked.logsumexp(-1) - scores.logsumexp(-1)
        scores = masked
    if p.temperature and p.top_k and p.top_k < scores.shape[-1]:
        kth = scores.topk(p.top_k, -1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.temperature and p.top_p < 1.0:
        ascending, order = scores.sort(-1)
        below = ascending.softmax(-1).cumsum(-1) <= 1.0 - p.top_p  # the least likely tokens, top_p excluded
        below[:, -1] = False  # the likeliest token always stays
        scores = scores.masked_fill(below.scatter(1, order, below), float("-inf"))
    return scores.log_softmax(-1), kept


def draw(logp: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws: row b's token is the first whose cumulative probability exceeds
    uniform[b] times the row's total. logp (B, V); uniform (B,) in [0, 1) -> (B,) long. A token of
    probability 0 (logp -inf) is never drawn."""
    cdf = logp.double().exp().cumsum(-1)
    target = uniform.double()[:, None] * (cdf[:, -1:] * _BELOW_TOTAL)
    return torch.searchsorted(cdf, target, right=True)[:, 0]


def next_tokens(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None,
                seen: torch.Tensor | None = None, suppress: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One step: tokens (B,) long and their log-probs (B,) float32 (the processed distribution's,
    with the suppressed mass back in the normalizer). logits (B, V); greedy (temperature 0) draws
    nothing from `generator`, sampling one uniform number per row."""
    logp, kept = processed(logits.float(), p, seen, suppress)
    if p.temperature:
        tokens = draw(logp, torch.rand(logp.shape[0], generator=generator, device=logp.device, dtype=torch.float64))
    else:
        tokens = logp.argmax(-1)
    chosen = logp.gather(1, tokens[:, None])[:, 0]
    return tokens, chosen if kept is None else chosen + kept
