"""The rollout-engine contract, on every engine: weight pushes, name and shape checks, memory calls.

The transformers engine runs in this process and in a child process of its own
(zppo_fast/engine_process.py: the architecture SGLang engines always have, with pushes through
shared memory); the SGLang engine runs where sglang imports and a GPU is present, and is skipped
otherwise. Each engine starts from weights unlike the "trainer" model's, so a log-prob match after
a push shows the push took effect.
"""

import importlib.util
from functools import partial

import pytest
import torch
from batches import tiny_engine_world

from zppo_fast.config import ModelConfig
from zppo_fast.engine import MEMORY_TAGS, SamplingParams, TransformersEngine, build_transformers_engine
from zppo_fast.engine_process import EngineProcess
from zppo_fast.model import build_tiny_model, save_model
from zppo_fast.weight_sync import iter_weight_buckets, weight_shapes

HAS_SGLANG_GPU = torch.cuda.is_available() and importlib.util.find_spec("sglang") is not None

# Sampling log-probs against the trainer's own forward: fp32 on CPU agrees to rounding; SGLang
# computes in bf16 with its own kernels.
TOLERANCE = {"transformers": 1e-4, "transformers-child": 1e-4, "sglang": 5e-2}
PUSH_DTYPE = {"transformers": None, "transformers-child": None, "sglang": torch.bfloat16}


@pytest.fixture(scope="module")
def world():
    return tiny_engine_world()


@pytest.fixture(scope="module")
def vlm_world(world):
    """SGLang serves Qwen3.5 as the image-text-to-text model only: its tiny version."""
    from zppo_fast.vlm import build_tiny_vlm

    tokenizer, _, prompts = world
    model, processor = build_tiny_vlm(tokenizer, seed=1)
    return tokenizer, model, prompts, processor


@pytest.fixture(scope="module")
def child_engine(world, tmp_path_factory):
    """One transformers engine in its own process for the module (a start costs a process)."""
    tokenizer, trainer, _ = world
    folder = tmp_path_factory.mktemp("child") / "student"
    save_model(trainer, tokenizer, folder)  # config and tokenizer: the student's weights come by push
    eng = EngineProcess(partial(build_transformers_engine, str(folder), "student"), "transformers child engine",
                        log_path=folder.parent / "engine.log")
    yield eng
    eng.shutdown()


@pytest.fixture(params=["transformers", "transformers-child", pytest.param("sglang", marks=pytest.mark.skipif(
    not HAS_SGLANG_GPU, reason="the SGLang engine needs sglang and a CUDA GPU"))])
def engine(request, world, tmp_path):
    """(kind, engine, the trainer's model, prompts)."""
    tokenizer, trainer, prompts = world
    if request.param == "transformers":
        # The engine's own module, initialised differently from the trainer's.
        eng = TransformersEngine(build_tiny_model(ModelConfig(hidden_size=32, num_layers=4), tokenizer, seed=2),
                                 tokenizer)
        yield request.param, eng, trainer, prompts
        return
    if request.param == "transformers-child":
        eng = request.getfixturevalue("child_engine")
        push(eng, perturbed(trainer, seed=3), None)  # whatever an earlier test pushed: not the trainer's weights
        yield request.param, eng, trainer, prompts
        return
    from zppo_fast.sglang_engine import SGLangEngineConfig, start_sglang_engine, teacher_placement

    tokenizer, trainer, prompts, processor = request.getfixturevalue("vlm_world")
    save_model(trainer, tokenizer, tmp_path / "student")  # config only: the student loads dummy weights
    processor.save_pretrained(tmp_path / "student")
    placement = teacher_placement("colocated", 0, 1, torch.cuda.device_count()).student
    eng = start_sglang_engine(SGLangEngineConfig(str(tmp_path / "student"), placement, mem_fraction_static=0.2,
                                                 log_path=str(tmp_path / "sglang.log")), weight_shapes(trainer))
    yield request.param, eng, trainer.cuda(), prompts
    eng.shutdown()
    trainer.cpu()


def trainer_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion[t] | prompt, completion[:t]) under `model` at temperature 1: (T,)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + completion], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float().cpu()
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def push(eng, model, dtype, bucket_bytes: int = 4096):
    eng.update_weights(iter_weight_buckets(model, bucket_bytes, dtype=dtype))


def max_gap(eng, model, prompts, seed: int) -> tuple[float, list]:
    """Largest |engine sampling log-prob - model log-prob| over sampled tokens, and the samples."""
    groups = eng.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=seed))
    gap = 0.0
    for prompt, group in zip(prompts, groups):
        for s in group:
            ref = trainer_logprobs(model, prompt, s.token_ids)
            gap = max(gap, (torch.tensor(s.logprobs) - ref).abs().max().item())
    return gap, groups


def perturbed(model, seed: int):
    """A copy of `model` with every weight moved by noise of half its own scale."""
    out = type(model)(model.config).to(next(model.parameters()).device)
    out.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * (0.5 * p.float().std().nan_to_num(0.0) + 1e-3))
    return out


def test_push_makes_engine_logprobs_match_the_trainer(engine):
    kind, eng, trainer, prompts = engine
    tol, dtype = TOLERANCE[kind], PUSH_DTYPE[kind]
    if kind != "sglang":  # before the push the engine is a different model (SGLang refuses to sample then)
        gap, _ = max_gap(eng, trainer, prompts, seed=0)
        assert gap > 10 * tol
    push(eng, trainer, dtype)
    gap, _ = max_gap(eng, trainer, prompts, seed=0)
    assert gap < tol

    # A second push with changed weights: the engine now follows the new weights, not the old.
    trainer2 = perturbed(trainer, seed=5)
    push(eng, trainer2, dtype)
    gap2, groups = max_gap(eng, trainer2, prompts, seed=1)
    assert gap2 < tol
    stale = max((torch.tensor(s.logprobs) - trainer_logprobs(trainer, p, s.token_ids)).abs().max().item()
                for p, g in zip(prompts, groups) for s in g)
    assert stale > 10 * tol


def greedy(eng, prompts):
    return [(s.token_ids, s.logprobs) for g in eng.generate(prompts, SamplingParams(temperature=0.0)) for s in g]


def test_unknown_names_rejected_before_anything_is_loaded(engine):
    kind, eng, trainer, prompts = engine
    push(eng, trainer, PUSH_DTYPE[kind])
    before = greedy(eng, prompts)
    changed = perturbed(trainer, seed=9)
    dtype = PUSH_DTYPE[kind] or torch.float32
    device = next(trainer.parameters()).device
    bucket = [(n, t.to(dtype)) for n, t in changed.named_parameters()][:3]
    bucket += [("model.layers.0.not_a_weight", torch.zeros(3, dtype=dtype, device=device)),
               ("lm_head.bias", torch.zeros(3, dtype=dtype, device=device))]
    with pytest.raises(ValueError, match=r"2 pushed weight name\(s\) unknown.*lm_head\.bias.*not_a_weight"):
        eng.update_weights([bucket])
    with pytest.raises(ValueError, match="not_a_weight"):  # checked before the first bucket is drawn
        eng.update_weights(iter(()), names=["model.layers.0.not_a_weight"])
    if kind != "transformers":
        # An engine in its own process refused the push: its host still draws every bucket, as the
        # other ranks do (each draw gathers sharded weights, a collective).
        drawn = []

        def counted():
            for b in iter_weight_buckets(trainer, 4096, dtype=PUSH_DTYPE[kind]):
                drawn.append(b)
                yield b

        with pytest.raises(ValueError, match="not_a_weight"):
            eng.update_weights(counted(), names=["model.layers.0.not_a_weight"])
        assert len(drawn) == len(list(iter_weight_buckets(trainer, 4096, dtype=PUSH_DTYPE[kind])))
    if kind == "sglang":
        push(eng, trainer, PUSH_DTYPE[kind])  # a refused bucket marks the SGLang student stale until a complete push
    assert greedy(eng, prompts) == before


def test_shape_mismatch_names_the_tensor(engine):
    kind, eng, trainer, prompts = engine
    push(eng, trainer, PUSH_DTYPE[kind])
    before = greedy(eng, prompts)
    dtype = PUSH_DTYPE[kind] or torch.float32
    device = next(trainer.parameters()).device
    shapes = weight_shapes(trainer)
    norm = next(n for n, s in shapes.items() if n.endswith("norm.weight") and len(s) == 1)
    embed = next(n for n in shapes if n.endswith("embed_tokens.weight"))
    good = (norm, torch.zeros(shapes[norm], dtype=dtype, device=device))
    bad = (embed, torch.zeros(7, 5, dtype=dtype, device=device))
    with pytest.raises(ValueError, match=rf"shape mismatch.*{embed.replace('.', '[.]')}: pushed \(7, 5\)"):
        eng.update_weights([[good, bad]])
    if kind == "sglang":
        push(eng, trainer, PUSH_DTYPE[kind])
    assert greedy(eng, prompts) == before


def test_release_resume_push_cycle_and_timings(engine):
    """The step order's memory calls, then a push: the engine samples from the pushed weights."""
    kind, eng, trainer, prompts = engine
    push(eng, trainer, PUSH_DTYPE[kind])
    eng.pop_timings()
    eng.generate(prompts, SamplingParams(max_new_tokens=4))
    eng.release_memory(MEMORY_TAGS)
    eng.resume_memory(("weights",))
    push(eng, trainer, PUSH_DTYPE[kind])
    eng.resume_memory(("kv_cache",))
    gap, _ = max_gap(eng, trainer, prompts, seed=2)
    assert gap < TOLERANCE[kind]
    timings = eng.pop_timings()
    assert set(timings) == {"generate_s", "release_s", "resume_s", "push_s"}
    assert all(v >= 0 for v in timings.values()) and timings["push_s"] > 0
    assert eng.pop_timings() == {}


def test_push_check_fails_loudly_when_the_engine_has_other_weights(engine):
    """`check_push_took_effect`, the trainer's check after its first push, on every engine: it
    passes after a real push and raises when the engine samples from other weights than the
    trainer's (as a loader that skipped every name, or a dummy-loaded engine, would)."""
    from zppo_fast.engine import PUSH_CHECK_TOLERANCE, check_push_took_effect

    kind, eng, trainer, prompts = engine
    tol = PUSH_CHECK_TOLERANCE[PUSH_DTYPE[kind] or torch.float32]
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=4)
    score = partial(trainer_logprobs, trainer)
    push(eng, trainer, PUSH_DTYPE[kind])
    assert check_push_took_effect(eng, prompts[0], score, params, tol, "engine") <= tol
    push(eng, perturbed(trainer, seed=6), PUSH_DTYPE[kind])
    with pytest.raises(RuntimeError, match=r"engine: after the weight push .* not sampling from the pushed weights"):
        check_push_took_effect(eng, prompts[0], score, params, tol, "engine")
