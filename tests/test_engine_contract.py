"""The rollout-engine contract, on every engine: weight pushes, name and shape checks, memory calls.

The transformers engine always runs; the SGLang engine runs where sglang imports and a GPU is
present, and is skipped otherwise. Each engine starts from weights unlike the "trainer" model's, so
a log-prob match after a push shows the push took effect.
"""

import importlib.util

import pytest
import torch
from batches import tiny_engine_world

from zppo_fast.config import ModelConfig
from zppo_fast.engine import MEMORY_TAGS, SamplingParams, TransformersEngine
from zppo_fast.model import build_tiny_model, save_model
from zppo_fast.weight_sync import iter_weight_buckets, weight_shapes

HAS_SGLANG_GPU = torch.cuda.is_available() and importlib.util.find_spec("sglang") is not None

# Sampling log-probs against the trainer's own forward: fp32 on CPU agrees to rounding; SGLang
# computes in bf16 with its own kernels.
TOLERANCE = {"transformers": 1e-4, "sglang": 5e-2}


@pytest.fixture(scope="module")
def world():
    return tiny_engine_world()


@pytest.fixture(params=["transformers", pytest.param("sglang", marks=pytest.mark.skipif(
    not HAS_SGLANG_GPU, reason="the SGLang engine needs sglang and a CUDA GPU"))])
def engine(request, world, tmp_path):
    tokenizer, trainer, _ = world
    if request.param == "transformers":
        # The engine's own module, initialised differently from the trainer's.
        eng = TransformersEngine(build_tiny_model(ModelConfig(hidden_size=32, num_layers=4), tokenizer, seed=2),
                                 tokenizer)
        yield request.param, eng
        return
    from zppo_fast.sglang_engine import SGLangEngine, SGLangEngineConfig, teacher_placement

    save_model(trainer, tokenizer, tmp_path / "student")  # config only: the student loads dummy weights
    placement = teacher_placement("colocated", 0, 1, torch.cuda.device_count()).student
    eng = SGLangEngine(SGLangEngineConfig(str(tmp_path / "student"), placement, mem_fraction_static=0.2,
                                          log_path=str(tmp_path / "sglang.log")),
                       tokenizer, weight_shapes(trainer))
    yield request.param, eng
    eng.shutdown()


def trainer_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion[t] | prompt, completion[:t]) under `model` at temperature 1: (T,)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def push(eng, model, bucket_bytes: int = 4096):
    eng.update_weights(iter_weight_buckets(model, bucket_bytes, dtype=engine_dtype(eng)))


def engine_dtype(eng):
    return torch.bfloat16 if type(eng).__name__ == "SGLangEngine" else None


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
    out = type(model)(model.config)
    out.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.5 * p.float().std().nan_to_num(0.0) + 1e-3))
    return out


def test_push_makes_engine_logprobs_match_the_trainer(engine, world):
    kind, eng = engine
    _, trainer, prompts = world
    tol = TOLERANCE[kind]
    if kind == "transformers":  # before any push the engine is a different model
        gap, _ = max_gap(eng, trainer, prompts, seed=0)
        assert gap > 10 * tol
    push(eng, trainer)
    gap, _ = max_gap(eng, trainer, prompts, seed=0)
    assert gap < tol

    # A second push with changed weights: the engine now follows the new weights, not the old.
    trainer2 = perturbed(trainer, seed=5)
    push(eng, trainer2)
    gap2, groups = max_gap(eng, trainer2, prompts, seed=1)
    assert gap2 < tol
    stale = max((torch.tensor(s.logprobs) - trainer_logprobs(trainer, p, s.token_ids)).abs().max().item()
                for p, g in zip(prompts, groups) for s in g)
    assert stale > 10 * tol


def greedy(eng, prompts):
    return [(s.token_ids, s.logprobs) for g in eng.generate(prompts, SamplingParams(temperature=0.0)) for s in g]


def test_unknown_names_rejected_before_anything_is_loaded(engine, world):
    _, eng = engine
    _, trainer, prompts = world
    push(eng, trainer)
    before = greedy(eng, prompts)
    changed = perturbed(trainer, seed=9)
    dtype = engine_dtype(eng) or torch.float32
    bucket = [(n, t.to(dtype)) for n, t in changed.named_parameters()][:3]
    bucket += [("model.layers.0.not_a_weight", torch.zeros(3, dtype=dtype)),
               ("lm_head.bias", torch.zeros(3, dtype=dtype))]
    with pytest.raises(ValueError, match=r"2 pushed weight name\(s\) unknown.*lm_head\.bias.*not_a_weight"):
        eng.update_weights([bucket])
    with pytest.raises(ValueError, match="not_a_weight"):  # checked before the first bucket is drawn
        eng.update_weights(iter(()), names=["model.layers.0.not_a_weight"])
    if type(eng).__name__ == "SGLangEngine":
        push(eng, trainer)  # a refused bucket marks the SGLang student stale until a complete push
    assert greedy(eng, prompts) == before


def test_shape_mismatch_names_the_tensor(engine, world):
    _, eng = engine
    _, trainer, prompts = world
    push(eng, trainer)
    before = greedy(eng, prompts)
    dtype = engine_dtype(eng) or torch.float32
    good = ("model.norm.weight", torch.zeros(trainer.model.norm.weight.shape, dtype=dtype))
    bad = ("model.embed_tokens.weight", torch.zeros(7, 5, dtype=dtype))
    with pytest.raises(ValueError, match=r"shape mismatch.*model\.embed_tokens\.weight: pushed \(7, 5\)"):
        eng.update_weights([[good, bad]])
    if type(eng).__name__ == "SGLangEngine":
        push(eng, trainer)
    assert greedy(eng, prompts) == before


def test_release_resume_push_cycle_and_timings(engine, world):
    """The step order's memory calls, then a push: the engine samples from the pushed weights."""
    kind, eng = engine
    _, trainer, prompts = world
    push(eng, trainer)
    eng.pop_timings()
    eng.generate(prompts, SamplingParams(max_new_tokens=4))
    eng.release_memory(MEMORY_TAGS)
    eng.resume_memory(("weights",))
    push(eng, trainer)
    eng.resume_memory(("kv_cache",))
    gap, _ = max_gap(eng, trainer, prompts, seed=2)
    assert gap < TOLERANCE[kind]
    timings = eng.pop_timings()
    assert set(timings) == {"generate_s", "release_s", "resume_s", "push_s"}
    assert all(v >= 0 for v in timings.values()) and timings["push_s"] > 0
    assert eng.pop_timings() == {}
