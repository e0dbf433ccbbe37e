"""Rollout engines: prompts (token ids) in, n sampled completions each out.

Every engine — transformers here, SGLang on GPUs (`zppo_fast.sglang_engine`) — implements
`RolloutEngine`: `generate` returns per prompt a list of `Sample`s with the sampled token ids, their
text, why generation stopped and the log-probability of each sampled token under the sampling
distribution (after temperature, top-k and top-p). The trainer recomputes old log-probs itself; sampling
log-probs are kept for metrics and for engines whose numerics should be checked against the
trainer's.

Vision-language engines never sample the vision special tokens (`zppo_fast.vlm.vision_token_ids`:
an `<|image_pad|>` in a response has no image behind it and the training forward fails on it).
The transformers engine masks them (`zppo_fast.sampling`) and still reports each token's log-prob with
their probability in the normalizer, as the trainer computes it over the full vocabulary: the
push check stays exact however much mass the model puts on them. SGLang (`logit_bias`) reports
the masked distribution's, higher by -log(1 - P(vision tokens)) per token, ~0 for a trained VLM.

An engine holds its own copy of the weights. After each optimizer step the trainer pushes its
weights with `update_weights` (buckets from `zppo_fast.weight_sync.iter_weight_buckets`). Engines
that share GPUs with training free their memory with `release_memory` before the update and take it
back with `resume_memory` (tags `WEIGHTS`, `KV_CACHE`) in the order `sglang_engine.step_order` gives.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from zppo_fast.qwen35_decode import Qwen35Decoder, unsupported
from zppo_fast.sampling import next_tokens

if TYPE_CHECKING:  # transformers and the model code load where an engine is built, not where one is used
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from zppo_fast.vlm import EncodedImages

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
    # Subtracted from the raw logit of every token the completion already holds, before temperature,
    # top-k and top-p (OpenAI / SGLang / vLLM semantics; prompt tokens are not counted). 0: off.
    presence_penalty: float = 0.0


@dataclass
class Sample:
    token_ids: list[int]  # the completion only, EOS included when generated
    text: str  # decoded completion, special tokens removed
    finish_reason: str  # "stop" (EOS) | "length" (max_new_tokens reached)
    logprobs: list[float]  # one per token in token_ids (see the module docstring for VLM engines)


Bucket = list[tuple[str, torch.Tensor]]  # (HF parameter name, full tensor), see weight_sync


class EngineDiedError(RuntimeError):
    """An engine process is gone or failed a call; the message names the engine and its log."""


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


# The largest mean |engine log-prob - trainer log-prob| over a fixed prompt's sampled tokens that
# `check_push_took_effect` accepts, by the lower of the two sides' compute precisions. float32:
# both sides agree to rounding (~1e-6 on the tiny models); 1e-3 leaves room for other kernels and
# summation orders and is still orders of magnitude below any weight error. bfloat16 keeps 8
# significant bits: each rounding moves a logit by ~2^-9 of its size, and over a deep model logits
# of size 10-20 drift by ~0.1, so a correct bf16 push agrees to a few hundredths to ~0.1 nats on
# average; 0.25 accepts that. A stale or wrong push (random dummy weights, the previous step's
# weights of a model that moved) is off by nats, far above either bound.
PUSH_CHECK_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25}


def check_push_took_effect(engine: RolloutEngine, prompt: list[int], score: Any, params: SamplingParams,
                           tolerance: float, name: str) -> float:
    """Sample from `engine` on one fixed prompt and compare its sampling log-probs with the
    trainer's; raise RuntimeError when they disagree by more than `tolerance` (mean |difference|).

    score(prompt, completion) -> (T,) the trainer's log-probs of the completion's tokens at the same
    temperature (no top-p / top-k in `params`: the engine's log-probs are then of the full
    distribution too). This is what catches a push that reported success but did not take effect
    (an engine whose loader skipped names it does not know, a dummy-loaded student sampling from
    random weights). Returns the mean difference.
    """
    (sample,) = engine.generate([prompt], params)[0]
    if not sample.token_ids:
        raise RuntimeError(f"{name}: the engine returned an empty completion for the push check")
    ref = score(prompt, sample.token_ids).float().cpu()
    gap = (torch.tensor(sample.logprobs) - ref).abs().mean().item()
    if not gap <= tolerance:  # also catches NaN
        raise RuntimeError(
            f"{name}: after the weight push the engine's sampling log-probs differ from the trainer's by "
            f"{gap:.4g} nats per token on average (tolerance {tolerance:g}) over {len(ref)} sampled tokens: the "
            f"engine is not sampling from the pushed weights (a loader that skipped names, a wrong dtype, or "
            f"a push that did not arrive)")
    return gap


def build_transformers_engine(folder: str, role: str, dtype: str = "float32", device: str = "cpu",
                              batch_size: int = 256, processor_path: str | None = None,
                              image_pixels: tuple[int | None, int | None] = (None, None),
                              announce: bool = True) -> TransformersEngine:
    """The transformers engine of `role`, in this process or an engine child (a picklable factory).

    student: the architecture of `folder` with arbitrary weights, which every push overwrites.
    teacher: the weights of `folder`, frozen. A vision-language model also gets its processor,
    from `processor_path` (the student's HF folder, which a checkpoint folder may lack) or `folder`,
    with `image_pixels` (min, max) as its bounds (`zppo_fast.vlm.set_image_pixels`). `announce`:
    print which decoding path the engine runs, and why (stderr).
    """
    from zppo_fast.model import load_model, load_tokenizer, model_from_config
    from zppo_fast.vlm import is_vlm, load_processor, load_vlm

    if role == "student":
        model = model_from_config(folder, dtype, device=device)
    else:
        model = model_from_config(folder, dtype, meta=True)
        model = (load_vlm if is_vlm(model) else load_model)(folder, dtype)[0]
        model = model.to(device).eval().requires_grad_(False)
    processor = load_processor(processor_path or folder, image_pixels) if is_vlm(model) else None
    engine = TransformersEngine(model, load_tokenizer(folder), batch_size, processor=processor)
    if announce:
        print(f"zppo_fast: {role} engine: decoding through {engine.decoding}", file=sys.stderr)
    return engine


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
    """Batched sampling with the model's cache and left padding; stops at EOS.

    Prompts are generated `batch_size` samples at a time (whole prompts); a generator seeded per
    call makes the samples a function of (weights, prompts, params) only, and leaves the process's
    random state alone. `model` is the engine's own module: the trainer passes a separate copy and
    pushes its weights into it with `update_weights`. The decoding loop is ours, not
    `model.generate`: a row that has its EOS leaves the batch, and tokens are drawn by
    `zppo_fast.sampling` (one uniform number per row and step).

    Each prompt is computed once for its n samples (`prefill_once`, on by default): the prompts of
    a batch run through the model once, and the cache (full-attention keys / values, Gated-DeltaNet
    recurrent and convolution states) and the next-token logits are expanded to the n copies. The
    samples are the same as without it (same random draws, same order) up to the rounding of a
    differently shaped prefill. Without it (and for n = 1) every copy prefills its prompt itself.

    After the prefill, Qwen3.5 text models decode through `zppo_fast.qwen35_decode` (`lean_decode`,
    on by default), which computes the same step without transformers' per-call machinery, about
    twice as fast per step on a CPU at these sizes; other models, and `lean_decode=False`, decode through the
    model's forward. `decoding` says which path runs and why.

    Vision-language models (`zppo_fast.vlm`) also take a `processor`; `generate(..., images=)` then
    feeds each prompt's images through its image processor. The prompt ids must already hold the
    expanded image placeholders, as `zppo_fast.vlm.vlm_prompt` builds them. The vision tower encodes
    each prompt's images once per prefilled row. Their vision special tokens are never sampled
    (the module docstring).
    """

    name = "transformers engine"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 256,
                 processor: Any | None = None, prefill_once: bool = True, lean_decode: bool = True):
        self.model, self.tokenizer, self.batch_size, self.processor = model, tokenizer, batch_size, processor
        self.prefill_once = prefill_once
        self.timings = Timings()
        from zppo_fast.vlm import is_vlm, vision_token_ids

        self.vlm = is_vlm(model)
        # Token ids a response must not hold: a VLM's image / video placeholders and their delimiters.
        self.forbidden = vision_token_ids(model.config.to_dict(), self.name) if self.vlm else []
        why_not = "lean_decode is off" if not lean_decode else unsupported(model)
        self.lean = why_not is None
        self.decoding = ("zppo_fast's Qwen3.5 decode step (zppo_fast/qwen35_decode.py)" if self.lean
                         else f"the model's forward ({why_not})")

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
        from zppo_fast.vlm import check_image_engine, encode_images

        if (params.temperature < 0 or not 0 < params.top_p <= 1 or params.n < 1 or params.max_new_tokens < 1
                or (params.top_k is not None and params.top_k < 0)):
            raise ValueError(f"invalid sampling parameters: {params}")
        encoded = None
        if images is not None:
            check_image_engine(self.model, self.processor, len(prompts), len(images))
            # Each prompt's images are processed once, then shared by its n copies.
            encoded = [encode_images(self.processor, imgs, prompt, where=f"prompt {i}")
                       for i, (prompt, imgs) in enumerate(zip(prompts, images))]
        device = next(self.model.parameters()).device
        generator = torch.Generator(device).manual_seed(params.seed)
        was_training = self.model.training
        self.model.eval()
        out: list[Sample] = []
        # Whole prompts per batch (their n copies together), so a prompt's cache is expanded in place.
        step = max(1, self.batch_size // params.n)
        try:
            for start in range(0, len(prompts), step):
                chunk = slice(start, start + step)
                state = self._prefill(prompts[chunk], params.n, device, None if encoded is None else encoded[chunk],
                                      params.max_new_tokens)
                out += [Sample(ids, self.tokenizer.decode(ids, skip_special_tokens=True),
                               "stop" if ids[-1] == self.tokenizer.eos_token_id else "length", logps)
                        for ids, logps in self._decode(state, params, generator)]
        finally:
            self.model.train(was_training)
        return [out[i : i + params.n] for i in range(0, len(out), params.n)]

    def _prefill(self, prompts: list[list[int]], n: int, device: torch.device,
                 images: Sequence[EncodedImages | None] | None = None, room: int = 1) -> DecodeState:
        """The decode state of `prompts`, each repeated for its `n` samples (consecutive rows), with
        `room` for that many new tokens. With `prefill_once` (and n > 1) each prompt runs through the
        model once and its cache is expanded to its n copies; without, every copy runs.
        `images[i]`: prompts[i]'s encoded images (a VLM's prompts), through the vision tower once per
        prompt computed."""
        from zppo_fast.vlm import vision_inputs

        once = self.prefill_once and n > 1
        copies = torch.arange(len(prompts)).repeat_interleave(n)
        rows = copies[:: n] if once else copies
        ids, mask = left_padded([prompts[i] for i in rows.tolist()], self.tokenizer.pad_token_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # the pads' positions are masked out
        vision, deltas = {}, None
        if self.vlm:
            # A VLM's rotary positions are (text, time, row, column), the last three laid out around
            # the images; a generated token's are its text position plus the prompt's offset (`deltas`).
            vision = vision_inputs(self.model, ids, [images[i] for i in rows.tolist()] if images else [], device)
            grid = vision.get("image_grid_thw")
            rope, deltas = self.model.model.get_rope_index(
                ids, (ids == self.model.config.image_token_id).int(), attention_mask=mask,
                image_grid_thw=None if grid is None else grid.cpu())
            positions = torch.cat([positions[None], rope])
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                         use_cache=True, logits_to_keep=1, **vision)
        lean = Qwen35Decoder(self.model, out.cache, mask.to(device), room) if self.lean else None
        # the lean step copied what it needs: transformers' cache is let go rather than held twice
        state = DecodeState(out.logits[:, -1], None if lean else out.cache, mask.to(device), mask.sum(-1).to(device),
                            None if deltas is None else deltas[:, 0].to(device), lean)
        if once:
            state.keep(copies.to(device))
        return state

    def _decode(self, state: DecodeState, params: SamplingParams,
                generator: torch.Generator) -> list[tuple[list[int], list[float]]]:
        """Sample until every row has its EOS or max_new_tokens: (token ids, log-probs) per row.
        A row that ends leaves the batch (and the cache) at the next step, so the model runs on the
        live rows only."""
        eos, rows = self.tokenizer.eos_token_id, state.logits.shape[0]
        device = state.logits.device
        tokens: list[list[int]] = [[] for _ in range(rows)]
        logps: list[list[float]] = [[] for _ in range(rows)]
        live = list(range(rows))  # the row each batch entry samples for
        suppress = torch.tensor(self.forbidden, dtype=torch.long, device=device) if self.forbidden else None
        seen = torch.zeros_like(state.logits, dtype=torch.bool) if params.presence_penalty else None
        for t in range(params.max_new_tokens):
            new, logp = next_tokens(state.logits, params, generator, seen, suppress)
            for row, token, lp in zip(live, new.tolist(), logp.tolist()):
                tokens[row].append(token)
                logps[row].append(lp)
            if seen is not None:
                seen.scatter_(1, new[:, None], True)
            going = [i for i, row in enumerate(live) if tokens[row][-1] != eos]
            if not going or t + 1 == params.max_new_tokens:
                break
            if len(going) < len(live):
                index = torch.tensor(going, device=device)
                state.keep(index)
                new, live = new[index], [live[i] for i in going]
                seen = None if seen is None else seen[index]
            state.advance(self.model, new)
        return list(zip(tokens, logps))


@dataclass
class DecodeState:
    """What the next decoding step of a batch needs. logits (B, V): the next token's; mask (B, W):
    1 on the columns the cache holds a token for (prompts are left-padded); position (B,): the next
    token's text position; deltas (B,): a VLM's rotary offset of each row (None for text models)."""

    logits: torch.Tensor
    cache: Any
    mask: torch.Tensor
    position: torch.Tensor
    deltas: torch.Tensor | None
    lean: Qwen35Decoder | None = None  # set: the steps run through it (`cache` is None, `mask` unused)

    def keep(self, index: torch.Tensor) -> None:
        """Keep (and repeat) the rows `index` (B',), in that order."""
        if self.lean is not None:
            self.lean.keep(index)
        else:
            self.cache.reorder_cache(index)
            self.mask = self.mask[index]
        self.logits, self.position = self.logits[index], self.position[index]
        self.deltas = None if self.deltas is None else self.deltas[index]

    def advance(self, model: PreTrainedModel, tokens: torch.Tensor) -> None:
        """Feed tokens (B,) through `model`, one step past the cache."""
        if self.lean is not None:
            self.logits, self.position = self.lean.step(tokens, self.position), self.position + 1
            return
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        position = self.position[:, None]
        if self.deltas is not None:  # (text, time, row, column): every generated token at text + offset
            rope = (position + self.deltas[:, None])[None].expand(3, -1, -1)
            position = torch.cat([position[None], rope])
        out = model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=position, cache=self.cache,
                    use_cache=True)
        self.logits, self.cache, self.position = out.logits[:, -1], out.cache, self.position + 1


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, W) ids and 0/1 mask of `prompts` left-padded: every prompt ends at the same column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask
