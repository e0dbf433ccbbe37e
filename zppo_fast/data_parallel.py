"""Data-parallel rollouts: each rank generates its share of the prompts, every rank gets them all.

    engine = DataParallelEngine(TransformersEngine(...), dist)
    groups = engine.generate(prompts, params)    # same result list on every rank, in prompt order

Wrapping the engine, not the trainer, gives every caller (student rollouts, teacher rollouts,
compression, evaluation) the same split. Each rank holds the whole step afterwards, so
advantages, the optimizer step's token count and replay-buffer decisions are computed from
identical data on every rank and need no further communication.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from zppo_fast.distributed import Distributed
from zppo_fast.engine import MEMORY_TAGS, RolloutEngine, Sample, SamplingParams


class DataParallelEngine:
    """`engine` is this rank's engine, or None on a rank that owns none (a teacher spanning several
    GPUs); `owners` are the ranks that own one, which split every call's prompts between them."""

    def __init__(self, engine: RolloutEngine | None, dist: Distributed, owners: list[int] | None = None):
        self.engine, self.dist = engine, dist
        self.owners = list(range(dist.world_size)) if owners is None else owners
        if (engine is not None) != (dist.rank in self.owners):
            raise ValueError(f"rank {dist.rank}: engine given = {engine is not None}, but owners = {self.owners}")

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 images: Sequence[Sequence[Any]] | None = None) -> list[list[Sample]]:
        """`params.n` samples per prompt, the same list on every rank, in prompt order.

        Owner k of K samples prompts [k * P // K, (k + 1) * P // K) with its own seed (owner 0
        keeps `params.seed`, so one rank reproduces a plain engine); every rank must call this
        with the same prompts. `images[i]` (VLM students) goes with prompts[i], as in `RolloutEngine`.
        """
        if self.dist.world_size == 1:
            return self.engine.generate(prompts, params, **({} if images is None else {"images": images}))
        local = []
        if self.engine is not None:
            k, n = self.owners.index(self.dist.rank), len(self.owners)
            lo, hi = k * len(prompts) // n, (k + 1) * len(prompts) // n
            if hi > lo:
                local = self.engine.generate(prompts[lo:hi], replace(params, seed=params.seed + 1_000_003 * k),
                                             **({} if images is None else {"images": images[lo:hi]}))
        return [group for part in self.dist.all_gather(local) for group in part]

    def update_weights(self, buckets, names=None) -> None:
        """Every rank must call this (the buckets gather sharded weights); owners load them."""
        if self.engine is not None:
            self.engine.update_weights(buckets, names)
        else:
            for _ in buckets:
                pass

    def release_memory(self, tags: Sequence[str] = MEMORY_TAGS) -> None:
        if self.engine is not None:
            self.engine.release_memory(tags)

    def resume_memory(self, tags: Sequence[str] = MEMORY_TAGS) -> None:
        if self.engine is not None:
            self.engine.resume_memory(tags)

    def pop_timings(self) -> dict[str, float]:
        return self.engine.pop_timings() if self.engine is not None else {}
