"""Packed micro-batches: one row per forward, no attention or recurrence across sequences."""

import random

import pytest
import torch
from zppo_fast.kernels import linear_logprobs

from zppo_fast.config import ModelConfig
from zppo_fast.model import Policy, build_tiny_model
from zppo_fast.packing import linear_padding, pack


class Vocab:
    """The two ids and the size a tiny model needs from a tokenizer."""

    eos_token_id, pad_token_id = 1, 0

    def __len__(self):
        return 97


def sequences(seed: int, lengths=(5, 70, 2, 130, 9, 64)):
    """Random token sequences whose prompts cover 1 token up to all but one, including chunk-edge lengths."""
    rng = random.Random(seed)
    seqs = [[rng.randrange(2, 97) for _ in range(n)] for n in lengths]
    return seqs, [rng.randint(1, n - 1) if n > 1 else 1 for n in lengths]


def logprobs(policy: Policy, mb) -> torch.Tensor:
    return linear_logprobs(policy(mb), policy.lm_head, mb.targets)


@pytest.mark.parametrize("seed", [0, 1])
def test_packed_and_padded_forwards_give_the_same_logprobs(seed):
    torch.manual_seed(seed)
    policy = Policy(build_tiny_model(ModelConfig(num_layers=4), Vocab(), seed=seed))
    seqs, prompts = sequences(seed)
    packed, padded = pack(seqs, prompts, packed=True), pack(seqs, prompts, packed=False)
    assert packed.input_ids.shape == (1, sum(map(len, seqs))) and packed.attention_mask is None
    assert packed.targets.tolist() == padded.targets.tolist()
    torch.testing.assert_close(logprobs(policy, packed), logprobs(policy, padded), rtol=0, atol=2e-5)
    # Each sequence alone gives the same numbers: nothing leaks between neighbours.
    alone = torch.cat([logprobs(policy, pack([s], [p], packed=True)) for s, p in zip(seqs, prompts)])
    torch.testing.assert_close(logprobs(policy, packed), alone, rtol=0, atol=2e-5)


def test_without_segmented_linear_attention_packing_is_refused_or_leaks():
    """The hazard the Gated-DeltaNet wrapper exists for: transformers' PyTorch path cannot keep
    packed sequences apart. Told the boundaries it refuses; given only restarting position ids it
    runs the recurrence across them, so the packed forward differs from the padded one."""
    torch.manual_seed(0)
    model = build_tiny_model(ModelConfig(num_layers=4), Vocab())
    seqs, prompts = sequences(0)
    decoder = model.get_decoder()
    packed, padded = pack(seqs, prompts, packed=True), pack(seqs, prompts, packed=False)

    def hidden(mb, **drop):
        kw = {k: v for k, v in mb.model_kwargs().items() if k not in drop}
        h = decoder(**kw).last_hidden_state
        return h.reshape(-1, h.shape[-1])[mb.hidden_index]

    with pytest.raises(ValueError, match="packed sequences"):
        hidden(packed)
    boundaries = dict.fromkeys(("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"))
    assert (hidden(packed, **boundaries) - hidden(padded)).abs().max() > 1e-2
    Policy(model)  # wraps the same modules in place
    torch.testing.assert_close(hidden(packed), hidden(padded), rtol=0, atol=2e-5)


def test_layout_bookkeeping_and_bad_input():
    seqs, prompts = [[5, 6, 7], [8, 9]], [1, 1]
    mb = pack(seqs, prompts, rows=[3, 4])
    assert mb.hidden_index.tolist() == [0, 1, 3] and mb.targets.tolist() == [6, 7, 9]
    assert mb.position_ids.tolist() == [[0, 1, 2, 0, 1]] and mb.cu_seqlens.tolist() == [0, 3, 5]
    assert mb.response_lengths == [2, 1] and mb.rows == [3, 4] and mb.loss_mask.all()
    assert linear_padding(mb) == pytest.approx(1 - 5 / 6)
    filler = pack([[0, 0]], [1], loss=False)
    assert filler.targets.numel() == 1 and not filler.loss_mask.any()
    with pytest.raises(ValueError, match="sequence 1 has length 2 and prompt length 3"):
        pack([[1, 2], [3, 4]], [1, 3])
    with pytest.raises(ValueError, match="2 sequences, 1 prompt lengths"):
        pack([[1, 2], [3, 4]], [1])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packing_is_exact_with_each_cpu_attention_kernel(tmp_path, attention):
    from zppo_fast.model import attention_kernel, model_from_config

    build_tiny_model(ModelConfig(num_layers=4), Vocab()).save_pretrained(tmp_path)
    lm = model_from_config(tmp_path, attention=attention)
    assert lm.config._attn_implementation == attention
    policy = Policy(lm)
    seqs, prompts = sequences(2)
    torch.testing.assert_close(logprobs(policy, pack(seqs, prompts, packed=True)),
                               logprobs(policy, pack(seqs, prompts, packed=False)), rtol=0, atol=2e-5)
    assert attention_kernel("auto", torch.device("cpu")) == "sdpa"
    assert attention_kernel("eager", torch.device("cuda")) == "eager"
