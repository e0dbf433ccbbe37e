"""The rollout-engine contract, on the transformers engine with a tiny random Qwen3.5."""

import pytest
import torch
from batches import tiny_engine_world

from zppo_fast.engine import SamplingParams, TransformersEngine


@pytest.fixture(scope="module")
def engine():
    tokenizer, model, prompts = tiny_engine_world()
    prompts[1] = prompts[1] + prompts[1][:5]  # prompts of different lengths exercise left padding
    return TransformersEngine(model, tokenizer, batch_size=5), prompts


def test_shapes_finish_reasons_and_text(engine):
    eng, prompts = engine
    out = eng.generate(prompts, SamplingParams(n=4, max_new_tokens=12, seed=0))
    assert len(out) == 3 and all(len(group) == 4 for group in out)
    eos = eng.tokenizer.eos_token_id
    for s in (s for group in out for s in group):
        assert 1 <= len(s.token_ids) <= 12 and len(s.logprobs) == len(s.token_ids)
        assert eos not in s.token_ids[:-1]
        assert s.finish_reason == ("stop" if s.token_ids[-1] == eos else "length")
        assert s.finish_reason == "stop" or len(s.token_ids) == 12
        assert s.text == eng.tokenizer.decode(s.token_ids, skip_special_tokens=True)
        assert all(lp <= 0 for lp in s.logprobs)


def test_seeded(engine):
    eng, prompts = engine
    ids = lambda seed: [s.token_ids for g in eng.generate(prompts, SamplingParams(n=3, seed=seed)) for s in g]
    assert ids(7) == ids(7)
    assert ids(7) != ids(8)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_match_a_full_forward(engine, temperature):
    """Log-probs reported by the engine (left-padded, KV-cached) equal an unpadded recomputation."""
    eng, prompts = engine
    out = eng.generate(prompts, SamplingParams(n=2, temperature=temperature, max_new_tokens=10, seed=3))
    for prompt, group in zip(prompts, out):
        for s in group:
            ids = torch.tensor([prompt + s.token_ids])
            with torch.no_grad():
                logits = eng.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature
            ref = logits.log_softmax(-1).gather(-1, torch.tensor(s.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(s.logprobs), ref, rtol=1e-4, atol=1e-4)


def test_greedy_is_argmax(engine):
    eng, prompts = engine
    (s,) = eng.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=6))[0]
    ids = list(prompts[0])
    for _ in range(len(s.token_ids)):
        with torch.no_grad():
            ids.append(int(eng.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert s.token_ids == ids[len(prompts[0]) :]


def test_bad_params(engine):
    eng, prompts = engine
    with pytest.raises(ValueError, match="invalid sampling parameters"):
        eng.generate(prompts, SamplingParams(top_p=0.0))


def test_top_k_1_is_greedy(engine):
    """top_k=1 leaves one candidate per step, so sampling at any temperature is the greedy path."""
    eng, prompts = engine
    greedy = eng.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8))
    sampled = eng.generate(prompts, SamplingParams(n=3, temperature=1.5, top_k=1, max_new_tokens=8, seed=5))
    for (g,), group in zip(greedy, sampled):
        for s in group:
            assert s.token_ids == g.token_ids
            assert s.logprobs == [0.0] * len(s.token_ids)  # the only candidate has probability 1


def test_top_k_keeps_sampled_tokens_among_the_k_likeliest(engine):
    eng, prompts = engine
    k = 3
    out = eng.generate(prompts, SamplingParams(n=2, temperature=2.0, top_k=k, max_new_tokens=8, seed=1))
    for prompt, group in zip(prompts, out):
        for s in group:
            with torch.no_grad():
                logits = eng.model(input_ids=torch.tensor([prompt + s.token_ids])).logits[0, len(prompt) - 1 : -1]
            top = logits.topk(k, -1).indices  # (T, k)
            assert all(t in row for t, row in zip(s.token_ids, top.tolist()))
    # Without top-k, the same temperature leaves the top 3 somewhere in these samples.
    plain = eng.generate(prompts, SamplingParams(n=2, temperature=2.0, max_new_tokens=8, seed=1))
    outside = 0
    for prompt, group in zip(prompts, plain):
        for s in group:
            with torch.no_grad():
                logits = eng.model(input_ids=torch.tensor([prompt + s.token_ids])).logits[0, len(prompt) - 1 : -1]
            top = logits.topk(k, -1).indices
            outside += sum(t not in row for t, row in zip(s.token_ids, top.tolist()))
    assert outside > 0


def test_negative_top_k_is_refused(engine):
    eng, prompts = engine
    with pytest.raises(ValueError, match="invalid sampling parameters"):
        eng.generate(prompts, SamplingParams(top_k=-1))


def test_prefill_once_gives_the_same_samples_and_the_trainers_logprobs(engine):
    """Each prompt computed once for its n samples: the prefill runs one row per prompt, the samples
    equal those of prefilling every copy (same seed), and their sampling log-probs equal the
    trainer's in its shared-prefix layout (each prompt once there too)."""
    from zppo_fast.kernels import linear_logprobs
    from zppo_fast.model import Policy
    from zppo_fast.packing import pack_shared

    eng, prompts = engine
    params = SamplingParams(n=4, max_new_tokens=12, seed=5)
    rows = []
    hook = eng.model.get_input_embeddings().register_forward_hook(lambda m, i, o: rows.append(i[0].shape))
    try:
        out = TransformersEngine(eng.model, eng.tokenizer, batch_size=8).generate(prompts, params)
        first = rows[0]
        each = TransformersEngine(eng.model, eng.tokenizer, batch_size=8, prefill_once=False).generate(prompts, params)
    finally:
        hook.remove()
    assert first == (2, max(map(len, prompts[:2])))  # 8 // 4 prompts per batch, each once
    assert [[s.token_ids for s in g] for g in out] == [[s.token_ids for s in g] for g in each]
    for g, h in zip(out, each):
        for s, t in zip(g, h):
            torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(t.logprobs), rtol=0, atol=1e-5)
    policy = Policy(eng.model)
    mb = pack_shared([(p, [s.token_ids for s in g]) for p, g in zip(prompts, out)])
    with torch.no_grad():
        trainer = linear_logprobs(policy(mb), policy.lm_head, mb.targets)
    torch.testing.assert_close(torch.tensor([lp for g in out for s in g for lp in s.logprobs]), trainer,
                               rtol=1e-4, atol=1e-4)
