"""The transformers engine's sampler (zppo_fast.sampling) against hand-computed distributions and
float64 references."""

import math

import torch

from zppo_fast.engine import SamplingParams
from zppo_fast.sampling import draw, next_tokens, processed


def test_draw_inverts_the_cumulative_distribution():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.5, 0.25, 0.0]] * 6, dtype=torch.float64)
    uniform = torch.tensor([0.0, 0.2499, 0.2501, 0.7499, 0.7501, 1.0 - 2.0 ** -53], dtype=torch.float64)
    tokens = draw(probs.log(), uniform)
    assert tokens.tolist() == [1, 1, 3, 3, 4, 4]  # the zero-probability tokens, last one included, never


def test_draws_follow_the_distribution():
    """Frequencies of 200,000 draws within 5 standard errors of each token's probability."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 7, generator=gen, dtype=torch.float64) * 2
    p = logits.softmax(-1)[0]
    draws = 200_000
    tokens = torch.cat([draw(logits.log_softmax(-1).expand(1000, -1), torch.rand(1000, generator=gen,
                                                                                 dtype=torch.float64))
                        for _ in range(draws // 1000)])
    freq = torch.bincount(tokens, minlength=7).double() / draws
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / draws).sqrt() + 1e-12).all(), (freq, p)


def test_top_p_keeps_the_smallest_set_above_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logp, _ = processed(probs.log(), SamplingParams(top_p=0.75))
    torch.testing.assert_close(logp.exp(), torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    # The likeliest token stays however small top_p is.
    logp, _ = processed(probs.log(), SamplingParams(top_p=1e-6))
    assert logp.exp().tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_top_k_keeps_ties_and_temperature_scales_first():
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    logp, _ = processed(logits, SamplingParams(top_k=1, temperature=0.5))
    torch.testing.assert_close(logp.exp(), torch.tensor([[0.0, 0.5, 0.5, 0.0]]))
    logp, _ = processed(logits, SamplingParams(top_k=3, temperature=0.5))
    ref = (logits.double()[:, :3] / 0.5).log_softmax(-1).float()
    torch.testing.assert_close(logp[:, :3], ref)
    assert logp[0, 3] == -math.inf


def test_suppressed_tokens_are_never_drawn_and_their_mass_is_put_back():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 11, generator=gen)
    suppress = torch.tensor([0, 4, 10])
    params = SamplingParams(temperature=0.8)
    tokens, logp = next_tokens(logits, params, gen, suppress=suppress)
    assert not torch.isin(tokens, suppress).any()
    ref = (logits.double() / 0.8).log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logp.double(), ref, rtol=0, atol=1e-5)


def test_greedy_takes_the_argmax_and_draws_no_random_number():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 9, generator=gen)
    state = gen.get_state()
    tokens, logp = next_tokens(logits, SamplingParams(temperature=0.0, top_k=2, top_p=0.1), gen)
    assert tokens.equal(logits.argmax(-1)) and gen.get_state().equal(state)
    torch.testing.assert_close(logp, logits.log_softmax(-1).max(-1).values)
