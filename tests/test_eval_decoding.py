"""The paper's evaluation decoding beyond temperature / top-p / top-k: the presence penalty (1.5)
and the image pixel bounds (256*32^2 .. 1280*32^2)."""

import pytest
import torch
from batches import tiny_engine_world
from PIL import Image

from zppo_fast.config import DataConfig
from zppo_fast.data import tokenizer_corpus
from zppo_fast.engine import SamplingParams, TransformersEngine
from zppo_fast.sampling import processed
from zppo_fast.task import ArithmeticTask
from zppo_fast.tokenizer import build_tokenizer
from zppo_fast.vlm import build_tiny_vlm, encode_images, set_image_pixels


def test_presence_penalty_hand_computed():
    logits = torch.tensor([[0.5, 1.0, -2.0, 3.0, 0.0, 2.5, 1.25, -0.75]] * 2)
    generated = [[3, 5, 3], [0, 0, 0]]  # row 1 holds 0 three times: penalized once, not three times
    seen = torch.zeros(2, 8, dtype=torch.bool)
    for row, ids in enumerate(generated):
        seen[row, ids] = True
    params = SamplingParams(presence_penalty=1.5)
    logp, _ = processed(logits, params, seen)
    expected = torch.tensor([[0.5, 1.0, -2.0, 1.5, 0.0, 1.0, 1.25, -0.75],
                             [-1.0, 1.0, -2.0, 3.0, 0.0, 2.5, 1.25, -0.75]]).log_softmax(-1)
    torch.testing.assert_close(logp, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(processed(logits, params, torch.zeros_like(seen))[0], logits.log_softmax(-1),
                               rtol=0, atol=1e-6)  # nothing generated yet


@pytest.fixture(scope="module")
def engine():
    tokenizer, model, prompts = tiny_engine_world()
    prompts[1] = prompts[1] + prompts[1][:5]  # different lengths: the penalty must skip the left padding
    return TransformersEngine(model, tokenizer, batch_size=5), prompts


def test_engine_penalizes_raw_logits_before_temperature(engine):
    """The engine's log-probs are of softmax((logits - 1.5 * seen) / T), seen = generated so far."""
    eng, prompts = engine
    temperature, penalty = 0.7, 1.5
    params = SamplingParams(n=2, temperature=temperature, max_new_tokens=10, seed=3, presence_penalty=penalty)
    out = eng.generate(prompts, params)
    for prompt, group in zip(prompts, out):
        for s in group:
            with torch.no_grad():
                logits = eng.model(input_ids=torch.tensor([prompt + s.token_ids])).logits[0, len(prompt) - 1 : -1]
            logits = logits.double()
            for t in range(len(s.token_ids)):
                logits[t, sorted(set(s.token_ids[:t]))] -= penalty
            ref = (logits / temperature).log_softmax(-1).gather(-1, torch.tensor(s.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.float64), ref, rtol=0, atol=1e-4)
    plain = eng.generate(prompts, SamplingParams(n=2, temperature=temperature, max_new_tokens=10, seed=3))
    assert [s.logprobs for g in plain for s in g] != [s.logprobs for g in out for s in g]


def test_image_pixel_bounds_reach_the_processor(tmp_path):
    tokenizer = build_tokenizer(tokenizer_corpus(ArithmeticTask(max_operand=5), size=100), vocab_size=300)
    _, processor = build_tiny_vlm(tokenizer)
    image = Image.new("RGB", (60, 45), (200, 30, 30))
    patch = processor.image_processor.patch_size

    def pixels() -> int:
        return int(encode_images(processor, [image]).image_grid_thw[0, 1:].prod()) * patch * patch

    assert pixels() < 256 * 32 * 32  # the tiny processor's own bounds keep a small image small
    lo, hi = DataConfig().image_min_pixels, DataConfig().image_max_pixels
    assert (lo, hi) == (256 * 32**2, 1280 * 32**2)
    set_image_pixels(processor, lo, hi)
    assert lo <= pixels() <= hi  # scaled up to the paper's floor
    set_image_pixels(processor, None, 300 * 32 * 32)  # None keeps the other bound
    assert processor.image_processor.size.shortest_edge == lo and lo <= pixels() <= 300 * 32 * 32
    with pytest.raises(ValueError, match="0 < min <= max"):
        set_image_pixels(processor, hi, lo)
