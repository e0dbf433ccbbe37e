"""The shared-prefix layout: each group's prompt once, then its responses (zppo_fast/shared_prefix.py).

Exactness against every sequence computed alone, on the tiny hybrid model (Gated DeltaNet and full
attention): per-token log-probs and gradients within fp32 tolerance; no response reads another.
"""

import random

import pytest
import torch
from numerics import assert_matches_float64, reorder_tol
from test_train import full_grads

from zppo_fast.batch import Rollout, RolloutBatch
from zppo_fast.config import ModelConfig
from zppo_fast.kernels import linear_logprobs, linear_logprobs_reference
from zppo_fast.model import Policy, build_tiny_model
from zppo_fast.packing import pack, pack_shared
from zppo_fast.shared_prefix import allowed, build_layout
from zppo_fast.train import Trainer

EOS = 1


class Vocab:
    eos_token_id, pad_token_id = EOS, 0

    def __len__(self):
        return 97


def random_groups(seed: int) -> list[tuple[list[int], list[list[int]]]]:
    """Groups of G = 1, 2, 8 and a guided group (a long prompt, as BCQ / NCQ prompts are): prompts of
    1..300 tokens, responses of 1..100 ending in EOS at different places, or cut off without it."""
    rng = random.Random(seed)
    token = lambda: rng.randrange(2, 97)

    def response():
        n = rng.randint(1, 100)
        return [token() for _ in range(n - 1)] + [EOS if rng.random() < 0.7 else token()]

    prompts = [rng.randint(1, 300), 1, rng.randint(2, 80), 300]
    return [([token() for _ in range(p)], [response() for _ in range(g)]) for p, g in zip(prompts, (8, 1, 2, 2))]


def policy(dtype=torch.float32) -> Policy:
    model = build_tiny_model(ModelConfig(hidden_size=64, num_layers=4), Vocab(), seed=3).to(dtype)
    model.config._attn_implementation = "sdpa"
    return Policy(model)


def logprobs(policy: Policy, mb) -> torch.Tensor:
    return linear_logprobs(policy(mb), policy.lm_head, mb.targets)


def alone(policy: Policy, groups) -> torch.Tensor:
    """Every sequence computed alone (float64 log-softmax), in the shared layout's target order."""
    mbs = [pack([p + r], [len(p)]) for p, rs in groups for r in rs]
    return torch.cat([linear_logprobs_reference(policy(mb), policy.lm_head, mb.targets) for mb in mbs])


def test_layout_positions_targets_and_mask():
    groups = [([5, 6, 7], [[8, 9], [10], []]), ([11], [[12, 13, 14]])]
    mb = pack_shared(groups, rows=[0, 1, 2, 3])
    assert mb.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 3]]  # responses continue the prompt
    assert mb.hidden_index.tolist() == [2, 3, 2, 6, 7, 8]  # the prompt's last position predicts each first token
    assert mb.targets.tolist() == [8, 9, 10, 12, 13, 14] and mb.response_lengths == [2, 1, 0, 3]
    seqs = [p + r for p, rs in groups for r in rs]
    assert mb.targets.tolist() == pack(seqs, [len(p) for p, rs in groups for _ in rs]).targets.tolist()
    layout = build_layout([3, 1], [[2, 1, 0], [3]])
    pos = torch.arange(10)
    ok = allowed(layout, pos[:, None], pos[None, :]).int()
    assert ok[4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]  # 2nd token of response 0: prompt + itself
    assert ok[5].tolist() == [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]  # response 1: prompt + itself, not response 0
    assert ok[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]  # prompts are causal
    assert ok[9].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]  # the second group sees nothing of the first


@pytest.mark.parametrize("seed", [0, 1])
def test_logprobs_and_gradients_equal_each_sequence_alone(seed):
    """fp32 shared layout against float64 weights run per sequence (the Gated-DeltaNet kernel works
    in fp32 either way): log-probs within fp32 tolerance, gradients of a weighted sum too."""
    groups = random_groups(seed)
    shared, reference = policy(), policy(torch.float64)
    mb = pack_shared(groups)
    got, want = logprobs(shared, mb), alone(reference, groups)
    assert mb.input_ids.numel() < sum(len(p) + len(r) for p, rs in groups for r in rs)
    assert_matches_float64(got, want, shared, reference, seed)


def test_no_response_reads_another():
    """Change one response (its tokens, then its length): every other response's log-probs stay."""
    (prompt, responses), = random_groups(2)[:1]  # G = 8
    model = policy()
    base = logprobs(model, pack_shared([(prompt, responses)])).split([len(r) for r in responses])
    for changed in ([t % 90 + 3 for t in responses[3]], [5] * (len(responses[3]) % 50 + 7)):
        edited = [changed if j == 3 else r for j, r in enumerate(responses)]
        now = logprobs(model, pack_shared([(prompt, edited)])).split([len(r) for r in edited])
        for j in range(8):
            if j != 3:
                torch.testing.assert_close(now[j], base[j], rtol=0, atol=1e-6)
        if len(changed) == len(responses[3]):
            assert (now[3] - base[3]).abs().max() > 1e-2  # the edit itself is seen


def test_full_attention_runs_group_by_group(monkeypatch):
    """On the SDPA path each group's attention covers that group's positions only, never the whole row."""
    groups = random_groups(0)
    mb = pack_shared(groups)
    lengths = [len(p) + sum(map(len, rs)) for p, rs in groups]
    sdpa, seen = torch.nn.functional.scaled_dot_product_attention, []

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((k.shape[-2], attn_mask.shape[-2:]))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    policy()(mb)
    assert seen == [(n, (n, n)) for n in lengths]  # one full-attention layer, one call per group


def test_microbatches_keep_a_prompt_with_its_responses():
    """Rows sharing a prompt go to one micro-batch with the prompt once, split only past the cap;
    every rank runs as many micro-batches; targets follow the micro-batch's rows."""
    rng = random.Random(0)
    rollouts = []
    for g in range(5):
        prompt = [rng.randrange(2, 97) for _ in range(rng.randint(5, 40))]
        rollouts += [Rollout(prompt, [rng.randrange(2, 97) for _ in range(rng.randint(1, 9))], 0.0, g)
                     for _ in range(4)]
    batch = RolloutBatch(rollouts)
    rows = list(range(len(batch)))
    per_rank = [batch.microbatches(rows, r, 2, 60, share_prefix=True) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    seen = sorted(i for mbs in per_rank for mb in mbs for i in mb.rows)
    assert seen == rows
    for mbs in per_rank:
        for mb in mbs:
            if not mb.rows:
                continue
            assert mb.input_ids.numel() <= 60 or len({rollouts[i].group for i in mb.rows}) == 1
            assert mb.targets.tolist() == [t for i in mb.rows for t in rollouts[i].response_ids]
            prompts = {tuple(rollouts[i].prompt_ids) for i in mb.rows}
            assert len(mb.shared.prompts) >= len(prompts)


@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_optimizer_step_gradient_equals_the_unshared_layout(tiny_config, checkpointing):
    """The trainer's gradient for one optimizer step (clipped loss, ratios away from 1), shared
    layout against every sequence whole in the packed one, with activation checkpointing off / on."""
    from batches import random_batch

    trainer = Trainer(tiny_config("--run.steps", "1", "--parallel.activation_checkpointing", checkpointing,
                                  "--parallel.share_prefix", "true"), progress=False)
    batch = random_batch(len(trainer.tokenizer), n_groups=4, group_size=4, seed=3)
    for r in batch.rollouts:  # one prompt per group, as the engine samples them
        r.prompt_ids = batch.rollouts[4 * r.group].prompt_ids
    rows = list(range(len(batch)))
    old, _ = trainer.logprobs(batch)
    old = {i: o + 0.3 * torch.randn_like(o) for i, o in old.items()}
    adv = torch.randn(len(batch))
    grads = []
    for share in (False, True):
        trainer.cfg.parallel.share_prefix = share
        mbs = trainer.microbatches(batch, rows)
        assert all((mb.shared is not None) == share for mb in mbs)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.backward_minibatch(batch, rows, old, adv)
        grads.append(full_grads(trainer))
    assert grads[0].abs().sum() > 0
    # fp32 sums in another order, and the Gated-DeltaNet's fp32 chunks starting elsewhere (a response's
    # at the response, from the prompt's state): the whole gradient's largest entry is the size of the
    # terms, as the decay parameters' small gradients are differences of large ones (tests/numerics.py).
    tol = reorder_tol(batch.response_tokens() * max(map(len, batch.rollouts)), grads[0].abs().max().item())
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: bench/gpu_check.sh runs it")
def test_cuda_flex_attention_layout_equals_each_sequence_alone():
    """The CUDA layout (FlexAttention block mask from the same predicate; the Gated-DeltaNet mixers
    through whichever kernels transformers picks there): fp32 log-probs and gradients against the
    float64 CPU reference of every sequence alone."""
    groups = random_groups(0)
    shared = policy().cuda()
    shared.lm.config._attn_implementation = "flex_attention"
    reference = policy(torch.float64)
    got = logprobs(shared, pack_shared(groups).to(torch.device("cuda"))).cpu()
    want = alone(reference, groups)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-3)  # GPU kernels may use TF32 / other orders
    weights = torch.randn(len(want), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (got.double() * weights).sum().backward()
    (want * weights).sum().backward()
    for (name, a), b in zip(shared.named_parameters(), reference.parameters()):
        scale = b.grad.abs().max().item()
        torch.testing.assert_close(a.grad.cpu().double(), b.grad, rtol=0, atol=2e-3 * max(scale, 1.0), msg=name)
