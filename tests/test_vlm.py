"""Vision-language students: a tiny Qwen3.5 VLM built from a config, real PIL images, on the CPU."""

import random
from pathlib import Path

import pytest
import torch
from numerics import assert_matches_float64
from PIL import Image
from zppo_fast.kernels import fused_linear_policy_loss, linear_logprobs

from zppo_fast import prompts
from zppo_fast.config import ModelConfig
from zppo_fast.data import chat_prompt_ids, tokenizer_corpus
from zppo_fast.datasets import Record
from zppo_fast.engine import PUSH_CHECK_TOLERANCE, SamplingParams, TransformersEngine, check_push_took_effect
from zppo_fast.model import ModelLoadError, build_tiny_model, save_model
from zppo_fast.task import ArithmeticTask
from zppo_fast.tokenizer import build_tokenizer
from zppo_fast.vlm import (
    VISION_TOKENS,
    VLMPolicy,
    build_tiny_vlm,
    image_micro_batch,
    is_vlm,
    load_vlm,
    record_prompt,
    shared_image_micro_batch,
    vision_token_ids,
    vlm_hidden,
    vlm_prompt,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tokenizer = build_tokenizer(tokenizer_corpus(ArithmeticTask(max_operand=50), size=300), vocab_size=300)
    model, processor = build_tiny_vlm(tokenizer, seed=0)
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for name, color, size in [("red", (220, 30, 30), (60, 45)), ("blue", (20, 40, 230), (60, 45)),
                              ("wide", (10, 200, 60), (90, 30))]:
        im = Image.new("RGB", size, color)
        im.paste((255, 255, 255), (5, 5, 25, 20))  # some structure, so patches differ
        paths[name] = str(folder / f"{name}.png")
        im.save(paths[name])
    return tokenizer, model, processor, paths, folder


def placeholders(processor, ids):
    return sum(t == processor.image_token_id for t in ids)


def logprobs_with_images(model, prompt, response):
    """log p(response[t] | prompt, response[:t]) through vlm_hidden and lm_head, unpadded: (T,)."""
    mb = image_micro_batch([prompt], [response], pad_id=0)
    with torch.no_grad():
        h = vlm_hidden(model, mb.input_ids, mb.attention_mask, mb.pixel_values, mb.image_grid_thw, mb.hidden_index)
    return (h @ model.get_output_embeddings().weight.T).log_softmax(-1).gather(-1, mb.targets[:, None])[:, 0]


def test_tiny_vlm_and_prompt(world):
    tokenizer, model, processor, paths, _ = world
    assert is_vlm(model) and not is_vlm(build_tiny_model(ModelConfig(hidden_size=32, num_layers=4), tokenizer))
    assert sum(p.numel() for p in model.parameters()) < 200_000
    assert len(processor.tokenizer) == len(tokenizer) + 4  # the caller's tokenizer is left as it was
    p = vlm_prompt(processor, "What is 2 + 3?", [paths["red"], paths["wide"]])
    grid = p.images.image_grid_thw
    assert grid.shape == (2, 3) and p.images.pixel_values.shape[0] == int(grid.prod(-1).sum())
    assert placeholders(processor, p.input_ids) == int(grid.prod(-1).sum()) // 4 > 0
    # Image tokens are marked for the 3-D rotary positions as the processor itself marks them.
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                                         add_generation_prompt=True, tokenize=False)
    out = processor(text=[text], images=[[Image.open(paths["red"])]], return_tensors="pt")
    assert torch.equal(out["mm_token_type_ids"].int(), (out["input_ids"] == model.config.image_token_id).int())
    # A text prompt renders as the text template does: same ids as data.chat_prompt_ids.
    assert vlm_prompt(processor, "What is 2 + 3?").input_ids == chat_prompt_ids(tokenizer, "What is 2 + 3?")


def test_rollout_with_images_matches_the_training_forward(world):
    """Engine samples (left-padded, KV-cached, images through generate) carry the log-probs of the
    right-padded training forward with the same images; a text prompt rides in the same batch."""
    _, model, processor, paths, _ = world
    engine = TransformersEngine(model, processor.tokenizer, processor=processor)
    image_prompt = vlm_prompt(processor, "What is 12 + 7?", [paths["red"]])
    text_prompt = vlm_prompt(processor, "What is 3 + 4?")
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=3)
    out = engine.generate([image_prompt.input_ids, text_prompt.input_ids], params, images=[[paths["red"]], []])
    assert [len(g) for g in out] == [2, 2]
    assert out == engine.generate([image_prompt.input_ids, text_prompt.input_ids], params,
                                  images=[[paths["red"]], []])  # seeded
    for prompt, group in zip([image_prompt, text_prompt], out):
        for s in group:
            assert 1 <= len(s.token_ids) <= 8 and len(s.logprobs) == len(s.token_ids)
            ref = logprobs_with_images(model, prompt, s.token_ids)
            torch.testing.assert_close(torch.tensor(s.logprobs), ref, rtol=1e-4, atol=1e-4)


def test_engine_prefills_each_image_prompt_once(world, monkeypatch):
    """Prefill once with images: the vision tower encodes each prompt's images once for its n
    samples, and the samples equal (same seed) those of every copy prefilling itself, image and
    text prompts in one batch; so do a text-only call's after it (its positions are its own, not
    the image batch's)."""
    _, model, processor, paths, _ = world
    prompts_ = [vlm_prompt(processor, "What is 12 + 7?", [paths["red"]]), vlm_prompt(processor, "What is 3 + 4?"),
                vlm_prompt(processor, "What is 9 + 9?", [paths["wide"], paths["blue"]])]
    images = [[paths["red"]], [], [paths["wide"], paths["blue"]]]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=4)
    seen, tower = [], model.model.get_image_features

    def spy(pixel_values, image_grid_thw=None, **kwargs):  # generate looks the argument names up
        seen.append(len(pixel_values))
        return tower(pixel_values, image_grid_thw, **kwargs)

    monkeypatch.setattr(model.model, "get_image_features", spy)
    runs = {}
    for once in (True, False):
        engine = TransformersEngine(model, processor.tokenizer, processor=processor, prefill_once=once)
        seen.clear()
        runs[once] = (engine.generate([p.input_ids for p in prompts_], params, images=images),
                      engine.generate([p.input_ids for p in prompts_[1:2]] * 2, params))
        patches = sum(p.images.pixel_values.shape[0] for p in prompts_ if p.images is not None)
        assert sum(seen) == (patches if once else params.n * patches)
    for a, b in zip(*(runs[once][0] + runs[once][1] for once in (True, False))):
        assert [s.token_ids for s in a] == [s.token_ids for s in b]
        for s, t in zip(a, b):
            torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(t.logprobs), rtol=0, atol=1e-5)


def full_logprobs(model, prompt, response, temperature):
    """(T, V) float64 log-softmax at `temperature` of the model's own logits (its lm_head hooks included)
    at the positions predicting `response`, with the prompt's images."""
    mb = image_micro_batch([prompt], [response], pad_id=0)
    vision = {} if mb.pixel_values is None else {
        "pixel_values": mb.pixel_values, "image_grid_thw": mb.image_grid_thw,
        "mm_token_type_ids": (mb.input_ids == model.config.image_token_id).int()}
    with torch.no_grad():
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, **vision).logits[0]
    return (logits[len(prompt.input_ids) - 1 : -1].double() / temperature).log_softmax(-1)


def test_engine_never_samples_vision_tokens(world):
    """A VLM biased towards its vision special tokens (most of the mass at every step) never samples
    them, greedy or not, with or without images; its log-probs stay the trainer's over the full
    vocabulary (the vision tokens' mass in the normalizer), so the push check still passes."""
    _, model, processor, paths, _ = world
    forbidden = vision_token_ids(model.config.to_dict(), "tiny VLM")
    assert forbidden == sorted(processor.tokenizer.convert_tokens_to_ids(VISION_TOKENS))
    bias = torch.zeros(model.config.text_config.vocab_size)
    bias[forbidden] = 6.0  # each vision token then outweighs all 300 others together
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias)
    try:
        engine = TransformersEngine(model, processor.tokenizer, processor=processor)
        prompts_ = [vlm_prompt(processor, "What is 12 + 7?", [paths["red"]]), vlm_prompt(processor, "What is 3 + 4?")]
        images = [[paths["red"]], []]
        mass = []
        for params in (SamplingParams(n=3, temperature=0.8, max_new_tokens=8, seed=1),
                       SamplingParams(temperature=0.0, max_new_tokens=4)):
            out = engine.generate([p.input_ids for p in prompts_], params, images=images)
            for prompt, group in zip(prompts_, out):
                for s in group:
                    assert not set(s.token_ids) & set(forbidden), s.token_ids
                    full = full_logprobs(model, prompt, s.token_ids, params.temperature or 1.0)  # (T, V)
                    ref = full.gather(-1, torch.tensor(s.token_ids)[:, None])[:, 0]
                    torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.float64), ref, rtol=1e-4, atol=1e-4)
                    mass.append(full[:, forbidden].exp().sum(-1))
        assert torch.cat(mass).min() > 0.5  # without the mask most draws, and every argmax, would be one
        text = prompts_[1]
        score = lambda prompt, completion: full_logprobs(model, text, completion, 1.0).gather(
            -1, torch.tensor(completion)[:, None])[:, 0]
        assert check_push_took_effect(engine, text.input_ids, score, SamplingParams(max_new_tokens=8, seed=4),
                                      PUSH_CHECK_TOLERANCE[torch.float32], "tiny VLM engine") <= 1e-4
    finally:
        hook.remove()


def test_images_change_log_probs(world):
    _, model, processor, paths, _ = world
    red, blue = (vlm_prompt(processor, "What color?", [paths[c]]) for c in ("red", "blue"))
    assert red.input_ids == blue.input_ids  # same size: same placeholders, only the pixels differ
    response = processor.tokenizer.encode("<think>7</think> \\boxed{7}")
    gap = (logprobs_with_images(model, red, response) - logprobs_with_images(model, blue, response)).abs().max()
    assert gap > 1e-4


def test_training_step_reaches_the_vision_tower(world):
    """hidden (vlm_hidden through VLMPolicy) -> fused policy loss -> backward: gradients in the
    vision tower, the decoder and lm_head; hidden @ lm_head equals the model's own logits."""
    _, model, processor, paths, _ = world
    prompts_ = [vlm_prompt(processor, "What is 2 + 3?", [paths["red"]]),
                vlm_prompt(processor, "What is 9 + 9?", [paths["wide"], paths["blue"]])]
    responses = [processor.tokenizer.encode("\\boxed{5}"), processor.tokenizer.encode("<think>18</think> \\boxed{18}")]
    mb = image_micro_batch(prompts_, responses, pad_id=processor.tokenizer.pad_token_id).to(torch.device("cpu"))
    assert mb.pixel_values.shape[0] == sum(p.images.pixel_values.shape[0] for p in prompts_)
    assert mb.image_grid_thw.shape == (3, 3)
    assert mb.attention_mask is not None and mb.cu_seqlens is None and mb.input_ids.shape[0] == 2
    policy = VLMPolicy(model)
    model.zero_grad()
    hidden = policy(mb)  # (N, H)
    assert hidden.shape == (sum(len(r) for r in responses), model.config.text_config.hidden_size)
    with torch.no_grad():
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, pixel_values=mb.pixel_values,
                       image_grid_thw=mb.image_grid_thw,
                       mm_token_type_ids=(mb.input_ids == processor.image_token_id).int()).logits
    torch.testing.assert_close(hidden.detach() @ policy.lm_head.T, logits.reshape(-1, logits.shape[-1])[mb.hidden_index],
                               rtol=1e-4, atol=1e-4)
    old = linear_logprobs(hidden.detach(), policy.lm_head.detach(), mb.targets)
    advantages = torch.tensor([1.0] * len(responses[0]) + [-1.0] * len(responses[1]))
    loss, _ = fused_linear_policy_loss(hidden, policy.lm_head, mb.targets, old, advantages, mb.loss_mask)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in ("model.visual.patch_embed.proj.weight", "model.visual.blocks.0.attn.qkv.weight",
                 "model.visual.merger.linear_fc2.weight", "model.language_model.layers.0.linear_attn.in_proj_qkv.weight",
                 "lm_head.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    model.zero_grad()


def shared_groups(processor, paths, seed):
    """Image groups (one and two images, G = 1, 2, 3) and a text group, random responses of 1..12 tokens."""
    rng = random.Random(seed)
    response = lambda: [rng.randrange(3, 250) for _ in range(rng.randint(1, 12))]
    prompts_ = [vlm_prompt(processor, "What is 2 + 3?", [paths["red"]]),
                vlm_prompt(processor, "What is 1 + 1?"),
                vlm_prompt(processor, "What is 9 + 9?", [paths["wide"], paths["blue"]])]
    return [(p, [response() for _ in range(g)]) for p, g in zip(prompts_, (2, 1, 3))]


@pytest.mark.parametrize("seed", [0, 1])
def test_shared_prefix_image_groups_equal_each_sequence_alone(world, seed):
    """Image groups in the shared-prefix layout (each prompt and its images once): log-probs and
    gradients within fp32 tolerance of float64 weights running every sequence alone (padded layout)."""
    tokenizer, _, processor, paths, _ = world
    groups = shared_groups(processor, paths, seed)
    # Fresh models: the fixture's has been wrapped by VLMPolicy, whose wrapped forwards a deep copy would share.
    shared, reference = VLMPolicy(build_tiny_vlm(tokenizer, seed=0)[0]), VLMPolicy(build_tiny_vlm(tokenizer, seed=0)[0].double())
    mb = shared_image_micro_batch(groups)
    assert mb.input_ids.shape[0] == 1 and mb.image_counts == [1, 0, 2]
    got = linear_logprobs(shared(mb), shared.lm_head, mb.targets)
    want = []
    for p, rs in groups:
        for r in rs:
            one = image_micro_batch([p], [r], pad_id=0)
            one.pixel_values = None if one.pixel_values is None else one.pixel_values.double()
            h = reference(one)
            want.append((h @ reference.lm_head.T).log_softmax(-1).gather(-1, one.targets[:, None])[:, 0])
    want = torch.cat(want)
    assert_matches_float64(got, want, shared, reference, seed)


def test_shared_prefix_encodes_each_groups_images_once(world, monkeypatch):
    """The vision tower sees each group's patches once, however many responses the group has; the
    trainer's micro-batches put image groups in that layout."""
    _, model, processor, paths, _ = world
    groups = shared_groups(processor, paths, 2)
    seen = []
    tower = model.model.get_image_features
    monkeypatch.setattr(model.model, "get_image_features", lambda px, grid, **kw: seen.append(len(px)) or tower(px, grid, **kw))
    from zppo_fast.batch import Rollout, RolloutBatch

    batch = RolloutBatch([Rollout(p.input_ids, r, 0.0, g, p.images) for g, (p, rs) in enumerate(groups) for r in rs])
    mbs = batch.microbatches(list(range(len(batch))), 0, 1, 4096, share_prefix=True)
    with torch.no_grad():
        for mb in mbs:
            VLMPolicy(model)(mb)
    assert sum(seen) == sum(p.images.pixel_values.shape[0] for p, _ in groups if p.images is not None)
    assert all(mb.shared is not None for mb in mbs)


def test_text_only_micro_batch_still_packs(world):
    """A VLM student's text-only sequences go through Policy's packed path, as a text student's."""
    _, model, processor, _, _ = world
    from zppo_fast.packing import pack

    seqs = [vlm_prompt(processor, "What is 1 + 1?").input_ids + [5, 6], vlm_prompt(processor, "2 + 2?").input_ids + [7]]
    lens = [len(s) - r for s, r in zip(seqs, (2, 1))]
    policy = VLMPolicy(model)
    with torch.no_grad():
        packed = policy(pack(seqs, lens))
        padded = policy(pack(seqs, lens, packed=False))
    torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-5)


def test_bcq_and_ncq_prompts_keep_the_images(world):
    _, model, processor, paths, _ = world
    image_bytes = Path(paths["blue"]).read_bytes()
    record = Record(id="q1", question="How many white squares?", answer="1", images=(paths["red"], image_bytes),
                    source="train.jsonl, line 3")
    plain = record_prompt(processor, record)
    bcq = record_prompt(processor, record, prompts.build_bcq(record.question, "one \\boxed{1}", "two \\boxed{2}",
                                                            random.Random(0)))
    ncq = record_prompt(processor, record, prompts.build_ncq(record.question, ["two \\boxed{2}"], ["2"]))
    for p in (bcq, ncq):
        assert len(p.input_ids) > len(plain.input_ids)
        assert placeholders(processor, p.input_ids) == placeholders(processor, plain.input_ids) > 0
        assert torch.equal(p.images.pixel_values, plain.images.pixel_values)
        assert torch.equal(p.images.image_grid_thw, plain.images.image_grid_thw)
    assert "<candidate>" in processor.tokenizer.decode(bcq.input_ids)
    engine = TransformersEngine(model, processor.tokenizer, processor=processor)
    (group,) = engine.generate([bcq.input_ids], SamplingParams(max_new_tokens=4), images=[record.images])
    torch.testing.assert_close(torch.tensor(group[0].logprobs), logprobs_with_images(model, bcq, group[0].token_ids),
                               rtol=1e-4, atol=1e-4)


def test_non_image_file_is_named(world):
    _, model, processor, paths, folder = world
    fake = folder / "notes.png"
    fake.write_text("not an image at all")
    with pytest.raises(ValueError, match=r"image file '.*notes\.png' is not a readable image"):
        vlm_prompt(processor, "What is 1 + 1?", [str(fake)])
    record = Record(id="q7", question="What?", answer="1", images=(str(fake),), source="train.jsonl, line 9")
    with pytest.raises(ValueError, match=r"record 'q7' \(train.jsonl, line 9\): image file '.*notes\.png'"):
        record_prompt(processor, record)
    with pytest.raises(ValueError, match=r"image file '.*missing\.png' is not a readable image"):
        vlm_prompt(processor, "What?", [str(folder / "missing.png")])
    engine = TransformersEngine(model, processor.tokenizer, processor=processor)
    ids = vlm_prompt(processor, "What?", [paths["red"]]).input_ids
    with pytest.raises(ValueError, match=r"prompt 0: image file '.*notes\.png' is not a readable image"):
        engine.generate([ids], SamplingParams(), images=[[str(fake)]])


def test_image_rollout_errors(world):
    tokenizer, model, processor, paths, _ = world
    ids = vlm_prompt(processor, "What?", [paths["red"]]).input_ids
    with pytest.raises(ValueError, match="no processor"):
        TransformersEngine(model, processor.tokenizer).generate([ids], SamplingParams(), images=[[paths["red"]]])
    text_model = build_tiny_model(ModelConfig(hidden_size=32, num_layers=4), tokenizer)
    with pytest.raises(ValueError, match="no vision tower"):
        TransformersEngine(text_model, tokenizer, processor=processor).generate([ids], SamplingParams(),
                                                                                 images=[[paths["red"]]])
    engine = TransformersEngine(model, processor.tokenizer, processor=processor)
    with pytest.raises(ValueError, match="1 image lists for 2 prompts"):
        engine.generate([ids, ids], SamplingParams(), images=[[paths["red"]]])
    with pytest.raises(ValueError, match=r"prompt 0: the prompt has 2 image placeholder tokens but its 1 image\(s\) fill 3"):
        engine.generate([ids], SamplingParams(), images=[[paths["wide"]]])  # built for another image size
    from zppo_fast.packing import pack

    mb = image_micro_batch([vlm_prompt(processor, "What?", [paths["red"]])], [[5]], pad_id=0)
    packed = pack([mb.input_ids[0].tolist()], [mb.input_ids.shape[1] - 1])
    mb.cu_seqlens, mb.attention_mask = packed.cu_seqlens, None
    with pytest.raises(ValueError, match="packed micro-batch with images"):
        VLMPolicy(model)(mb)


def test_load_vlm_round_trip_and_text_folder(world, tmp_path):
    tokenizer, model, processor, paths, _ = world
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    loaded, loaded_processor = load_vlm(tmp_path / "vlm")
    prompt = vlm_prompt(loaded_processor, "What is 2 + 3?", [paths["red"]])
    assert prompt.input_ids == vlm_prompt(processor, "What is 2 + 3?", [paths["red"]]).input_ids
    response = processor.tokenizer.encode("\\boxed{5}")
    torch.testing.assert_close(logprobs_with_images(loaded, prompt, response),
                               logprobs_with_images(model, prompt, response))
    save_model(build_tiny_model(ModelConfig(hidden_size=32, num_layers=4), tokenizer), tokenizer, tmp_path / "text")
    with pytest.raises(ModelLoadError, match=r"text has no image processor"):
        load_vlm(tmp_path / "text")
    with pytest.raises(ModelLoadError, match="is not a directory"):
        load_vlm(tmp_path / "nowhere")
