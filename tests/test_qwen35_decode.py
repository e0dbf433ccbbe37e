"""The lean Qwen3.5 decoding step against the model's own forward, on tiny random models of odd shapes."""

import copy

import pytest
import torch
from batches import tiny_engine_world
from numerics import EPS32, close

from zppo_fast.engine import SamplingParams, TransformersEngine, left_padded
from zppo_fast.qwen35_decode import Qwen35Decoder, unsupported

# (layer types, hidden, heads / kv heads / head dim, linear k heads / v heads / k dim / v dim, rotary fraction)
SHAPES = [
    (["linear_attention", "linear_attention", "linear_attention", "full_attention"], 32, (4, 2, 8), (2, 4, 8, 8), 0.25),
    (["full_attention", "linear_attention", "full_attention"], 24, (3, 1, 10), (3, 3, 6, 10), 0.5),
    (["linear_attention", "linear_attention", "full_attention"], 20, (2, 2, 6), (1, 3, 12, 4), 1.0),
    (["full_attention"], 36, (6, 3, 6), (2, 2, 4, 4), 1.0),
]


def tiny_qwen(layers, hidden, attn, linear, rotary, seed, vocab=97):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    heads, kv_heads, head_dim = attn
    k_heads, v_heads, k_dim, v_dim = linear
    config = Qwen3_5TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 3, num_hidden_layers=len(layers),
        layer_types=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        linear_num_key_heads=k_heads, linear_num_value_heads=v_heads, linear_key_head_dim=k_dim,
        linear_value_head_dim=v_dim, max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": rotary},
    )
    torch.manual_seed(seed)
    model = Qwen3_5ForCausalLM(config).eval()
    with torch.no_grad():  # fresh weights are mostly zero-centred norms and small gates: spread them out
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def reference_steps(model, ids, mask, tokens_per_step, keep_at):
    """The model's own forward, cached: logits after the prompt's last token and after each step's
    tokens; at step `keep_at[0]` the rows `keep_at[1]` are kept (reordered, repeated)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, position, logits = out.cache, mask.sum(-1), [out.logits[:, -1]]
    for t, tokens in enumerate(tokens_per_step):
        if t == keep_at[0]:
            cache.reorder_cache(keep_at[1])
            mask, position = mask[keep_at[1]], position[keep_at[1]]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position[:, None], cache=cache,
                    use_cache=True)
        cache, position = out.cache, position + 1
        logits.append(out.logits[:, -1])
    return logits


@pytest.mark.parametrize("stack", [True, False], ids=["stacked", "separate"])
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_steps_match_the_models_forward_with_rows_kept_and_repeated(shape, stack):
    layers, hidden, attn, linear, rotary = SHAPES[shape]
    model = tiny_qwen(layers, hidden, attn, linear, rotary, seed=shape)
    gen = torch.Generator().manual_seed(10 + shape)
    lengths = [1, 7, 23, 40, 3]  # left padding of 0 to 39 columns
    prompts = [torch.randint(2, 97, (n,), generator=gen).tolist() for n in lengths]
    ids, mask = left_padded(prompts, pad=0)
    keep = torch.tensor([4, 0, 0, 2])  # row 4 first, row 0 twice, rows 1 and 3 gone
    steps = [torch.randint(2, 97, (len(prompts) if t < 5 else len(keep),), generator=gen) for t in range(12)]
    with torch.no_grad():
        want = reference_steps(model.double(), ids, mask, steps, (5, keep))
        fp32 = reference_steps(model.float(), ids, mask, steps, (5, keep))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    lean, position = Qwen35Decoder(model, out.cache, mask, room=len(steps), stack=stack), mask.sum(-1)
    got = [out.logits[:, -1]]
    for t, tokens in enumerate(steps):
        if t == 5:
            lean.keep(keep)
            position = position[keep]
        got.append(lean.step(tokens, position))
        position = position + 1
    for t, (g, w, f) in enumerate(zip(got, want, fp32)):
        close(g, w, f"logits after step {t}", {"rtol": 0.0, "atol": 64 * EPS32}, fp32=f)


def test_the_engine_samples_the_same_with_and_without_the_lean_step():
    tokenizer, model, prompts = tiny_engine_world()
    prompts[1] = prompts[1] + prompts[1][:5]
    lean = TransformersEngine(model, tokenizer, batch_size=6)
    plain = TransformersEngine(copy.deepcopy(model), tokenizer, batch_size=6, lean_decode=False)
    assert "qwen35_decode" in lean.decoding and plain.decoding == "the model's forward (lean_decode is off)"
    params = SamplingParams(n=3, max_new_tokens=16, seed=4)
    a, b = lean.generate(prompts, params), plain.generate(prompts, params)
    for ga, gb in zip(a, b):
        for sa, sb in zip(ga, gb):
            assert sa.token_ids == sb.token_ids
            torch.testing.assert_close(torch.tensor(sa.logprobs), torch.tensor(sb.logprobs), rtol=0, atol=1e-5)


def test_other_models_decode_through_their_forward_and_say_why():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert unsupported(llama) == "LlamaForCausalLM is not a Qwen3.5 text model"
    qwen = tiny_qwen(["linear_attention", "full_attention"], 16, (2, 1, 8), (1, 2, 8, 8), 1.0, seed=0)
    assert unsupported(qwen) is None
    qwen.model.rotary_emb.rope_type = "yarn"
    assert "rotary embedding 'yarn'" in unsupported(qwen)
    with pytest.raises(ValueError, match="Qwen35Decoder: rotary embedding 'yarn'"):
        Qwen35Decoder(qwen, None, torch.ones(1, 1), room=1)
    tokenizer, model, _ = tiny_engine_world()
    model.model.rotary_emb.rope_type = "yarn"
    assert TransformersEngine(model, tokenizer).decoding.startswith("the model's forward (rotary embedding 'yarn'")


def test_no_step_past_the_room_it_was_given():
    model = tiny_qwen(["linear_attention", "full_attention"], 16, (2, 1, 8), (1, 2, 8, 8), 1.0, seed=1)
    ids, mask = left_padded([[3, 4, 5]], pad=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    lean = Qwen35Decoder(model, out.cache, mask, room=2)
    lean.step(torch.tensor([6]), torch.tensor([3]))
    lean.step(torch.tensor([7]), torch.tensor([4]))
    with pytest.raises(RuntimeError, match="no room left after 5 columns"):
        lean.step(torch.tensor([8]), torch.tensor([5]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: bench/gpu_check.sh runs it")
def test_cuda_bfloat16_steps_match_the_models_forward():
    layers, hidden, attn, linear, rotary = SHAPES[0]
    model = tiny_qwen(layers, hidden, attn, linear, rotary, seed=7).cuda()
    if unsupported(model):  # flash-linear-attention installed: the engine keeps the model's forward there
        pytest.skip(unsupported(model))
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 97, (n,), generator=gen).tolist() for n in (5, 30, 12)]
    ids, mask = (t.cuda() for t in left_padded(prompts, pad=0))
    steps = [torch.randint(2, 97, (3,), generator=gen).cuda() for _ in range(8)]
    keep = torch.tensor([2, 0, 1], device="cuda")
    with torch.no_grad():
        want = reference_steps(model.double(), ids, mask, steps, (4, keep))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        model = model.bfloat16()
        bf16 = reference_steps(model, ids, mask, steps, (4, keep))
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    lean, position = Qwen35Decoder(model, out.cache, mask, room=len(steps)), mask.sum(-1)
    for t, tokens in enumerate(steps):
        if t == 4:
            lean.keep(keep)
            position = position[keep]
        got = lean.step(tokens, position)
        position = position + 1
        err = (got.double() - want[t + 1]).abs().max().item()
        err_model = (bf16[t + 1].double() - want[t + 1]).abs().max().item()
        assert err <= 2 * err_model + 1e-3, f"step {t}: lean bf16 error {err:.3g}, the model's own {err_model:.3g}"
