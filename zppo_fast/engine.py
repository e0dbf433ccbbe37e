"""Rollout engines: prompts (token ids) in, n sampled completions each out.

Every engine — transformers here, SGLang on GPUs (`zppo_fast.sglang_engine`) — implements
`RolloutEngine`: `generate` returns per prompt a list of `Sample`s with the sampled token ids, their
text, why generation stopped and the log-probability of each sampled token under the sampling
distribution (after temperature, top-k and top-p). The trainer recomputes old log-probs itself; sampling
log-probs are kept for metrics and for engines whose numerics should be checked against the
trainer's.

An engine holds its own copy of the weights. After each optimizer step the trainer pushes its
weights with `update_weights` (buckets from `zppo_fast.weight_sync.iter_weight_buckets`). Engines
that share GPUs with training free their memory with `release_memory` before the update and take it
back with `resume_memory` (tags `WEIGHTS`, `KV_CACHE`) in the order `sglang_engine.step_order` gives.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from zppo_fast.vlm import check_image_engine, encode_images, vision_inputs

# Memory kinds an engine can release and resume separately; the strings are SGLang's tags.
WEIGHTS, KV_CACHE = "weights", "kv_cache"
MEMORY_TAGS = (WEIGHTS, KV_CACHE)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int | None = None  # keep the k most likely tokens; None or 0 means no top-k
    max_new_tokens: int = 24
    seed: int = 0


@dataclass
class Sample:
    token_ids: list[int]  # the completion only, EOS included when generated
    text: str  # decoded completion, special tokens removed
    finish_reason: str  # "stop" (EOS) | "length" (max_new_tokens reached)
    logprobs: list[float]  # one per token in token_ids


Bucket = list[tuple[str, torch.Tensor]]  # (HF parameter name, full tensor), see weight_sync


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 images: Sequence[Sequence[Any]] | None = None) -> list[list[Sample]]:
        """n samples per prompt, grouped per prompt. `images` (VLM students only): per prompt its
        list of images, whose expanded placeholders the prompt ids already hold (`zppo_fast.vlm`)."""
        ...

    def update_weights(self, buckets: Iterable[Bucket], names: Collection[str] | None = None) -> None:
        """Load pushed weights by name. `names`, when given, are all the push's names: they are
        checked before the first bucket is drawn, so an unknown name fails before any collective
        or copy. Names the push leaves out keep their current values."""
        ...

    def release_memory(self, tags: Sequence[str] = MEMORY_TAGS) -> None: ...

    def resume_memory(self, tags: Sequence[str] = MEMORY_TAGS) -> None: ...

    def pop_timings(self) -> dict[str, float]:
        """Seconds spent in generate / release / resume / push since the last call."""
        ...


def check_weight_names(names: Iterable[str], known: Collection[str], engine: str) -> None:
    """Raise ValueError listing every name in `names` that `known` lacks (nothing is loaded then)."""
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"{engine}: {len(unknown)} pushed weight name(s) unknown to the engine, nothing was "
                         f"loaded: {unknown}")


def check_push(items: Iterable[tuple[str, torch.Size]], shapes: Mapping[str, torch.Size], engine: str) -> None:
    """Check (name, shape) pairs against the engine's: unknown names first (all listed), then shape
    mismatches (each named). Raises ValueError; callers check before loading anything."""
    items = list(items)
    check_weight_names((n for n, _ in items), shapes, engine)
    bad = [f"{n}: pushed {tuple(s)}, engine has {tuple(shapes[n])}" for n, s in items if tuple(s) != tuple(shapes[n])]
    if bad:
        raise ValueError(f"{engine}: shape mismatch, nothing was loaded: {'; '.join(bad)}")


class Timings:
    """Seconds accumulated per phase ("generate", "release", "resume", "push") until `pop`."""

    def __init__(self):
        self._seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def measure(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[phase] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out = {f"{phase}_s": s for phase, s in self._seconds.items()}
        self._seconds.clear()
        return out


class TransformersEngine:
    """Batched `model.generate` with KV cache and left padding; stops at EOS.

    Sequences are generated `batch_size` at a time; a seeded generator makes the samples a
    function of (weights, prompts, params) only. `model` is the engine's own module: the trainer
    passes a separate copy and pushes its weights into it with `update_weights`.

    Vision-language models (`zppo_fast.vlm`) also take a `processor`; `generate(..., images=)` then
    feeds each prompt's images through its image processor. The prompt ids must already hold the
    expanded image placeholders, as `zppo_fast.vlm.vlm_prompt` builds them.
    """

    name = "transformers engine"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 256,
                 processor: Any | None = None):
        self.model, self.tokenizer, self.batch_size, self.processor = model, tokenizer, batch_size, processor
        self.timings = Timings()

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 images: Sequence[Sequence[Any]] | None = None) -> list[list[Sample]]:
        """n samples per prompt, grouped per prompt. `images[i]` is the list of images (PIL images,
        paths or encoded bytes) of prompts[i], possibly empty; it needs a VLM and its processor."""
        with self.timings.measure("generate"):
            return self._generate(prompts, params, images)

    @torch.no_grad()
    def update_weights(self, buckets: Iterable[Bucket], names: Collection[str] | None = None) -> None:
        """Copy pushed tensors into the engine's model by HF parameter name (dtype cast on copy).

        Every name and shape of the push is checked before anything is copied, so a bad push leaves
        the model as it was; to do so the whole push is drawn first (this engine serves models
        that fit in host memory twice). Tied aliases (`lm_head.weight` when tied) are accepted and
        land in the shared tensor. Parameters the push leaves out keep their values.
        """
        with self.timings.measure("push"):
            params = dict(self.model.named_parameters(remove_duplicate=False))
            if names is not None:
                check_weight_names(names, params, self.name)
            pushed = [item for bucket in buckets for item in bucket]
            check_push(((n, t.shape) for n, t in pushed), {n: p.shape for n, p in params.items()}, self.name)
            for n, t in pushed:
                params[n].copy_(t)

    def release_memory(self, tags: Sequence[str] = MEMORY_TAGS) -> None:
        """A no-op: the CPU engine's model stays in host memory, which training does not need back."""
        with self.timings.measure("release"):
            pass

    def resume_memory(self, tags: Sequence[str] = MEMORY_TAGS) -> None:
        """A no-op, as `release_memory` frees nothing."""
        with self.timings.measure("resume"):
            pass

    def pop_timings(self) -> dict[str, float]:
        return self.timings.pop()

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], params: SamplingParams,
                  images: Sequence[Sequence[Any]] | None) -> list[list[Sample]]:
        if (params.temperature < 0 or not 0 < params.top_p <= 1 or params.n < 1 or params.max_new_tokens < 1
                or (params.top_k is not None and params.top_k < 0)):
            raise ValueError(f"invalid sampling parameters: {params}")
        flat = [p for p in prompts for _ in range(params.n)]
        flat_images = None
        if images is not None:
            check_image_engine(self.model, self.processor, len(prompts), len(images))
            # Each prompt's images are processed once, then shared by its n copies.
            encoded = [encode_images(self.processor, imgs, prompt, where=f"prompt {i}")
                       for i, (prompt, imgs) in enumerate(zip(prompts, images))]
            flat_images = [e for e in encoded for _ in range(params.n)]
        device = next(self.model.parameters()).device
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        greedy = params.temperature == 0
        out: list[Sample] = []
        was_training = self.model.training
        self.model.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(params.seed)
            for start in range(0, len(flat), self.batch_size):
                chunk = flat[start : start + self.batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, p in enumerate(chunk):  # left padding: every prompt ends at the same column
                    ids[i, width - len(p) :] = torch.tensor(p)
                    mask[i, width - len(p) :] = 1
                vision = {}
                if flat_images is not None:
                    vision = vision_inputs(self.model, ids, flat_images[start : start + self.batch_size], device)
                gen = self.model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    **vision,
                    do_sample=not greedy,
                    temperature=None if greedy else params.temperature,
                    top_p=None if greedy else params.top_p,
                    # An explicit None: left out, transformers would apply its default top-k of 50.
                    top_k=None if greedy or not params.top_k else params.top_k,
                    max_new_tokens=params.max_new_tokens,
                    pad_token_id=pad,
                    eos_token_id=eos,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
                new = gen.sequences[:, width:]  # (B, T)
                # scores[t] are the processed logits the sampler drew token t from: (B, V) each,
                # reduced one step at a time so no (B, T, V) tensor is built.
                token_logp = torch.stack(
                    [sc.float().log_softmax(-1).gather(-1, new[:, t : t + 1]).squeeze(-1)
                     for t, sc in enumerate(gen.scores)], 1).cpu()  # (B, T)
                new = new.cpu()
                for row, row_logp in zip(new.tolist(), token_logp.tolist()):
                    n = row.index(eos) + 1 if eos in row else len(row)
                    out.append(
                        Sample(
                            token_ids=row[:n],
                            text=self.tokenizer.decode(row[:n], skip_special_tokens=True),
                            finish_reason="stop" if eos in row[:n] else "length",
                            logprobs=row_logp[:n],
                        )
                    )
        self.model.train(was_training)
        return [out[i : i + params.n] for i in range(0, len(out), params.n)]
