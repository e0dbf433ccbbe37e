"""Data-parallel rollouts: each rank generates its share of the prompts, every rank gets them all.

    engine = DataParallelEngine(TransformersEngine(...), dist)
    groups = engine.generate(prompts, params)    # same result list on every rank, in prompt order

Wrapping the engine, not the trainer, gives every caller (student rollouts, teacher rollouts,
compression, evaluation) the same split. Each rank holds the whole step afterwards, so
advantages, the optimizer step's token count and replay-buffer decisions are computed from
identical data on every rank and need no further communication.
"""

from __future__ import annotations

from dataclasses import replace

from zppo_fast.distributed import Distributed
from zppo_fast.engine import RolloutEngine, Sample, SamplingParams


class DataParallelEngine:
    def __init__(self, engine: RolloutEngine, dist: Distributed):
        self.engine, self.dist = engine, dist

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        """`params.n` samples per prompt; rank r samples prompts `dist.shard(len(prompts))`.

        Ranks draw with different seeds (rank 0 keeps `params.seed`, so one rank reproduces a
        plain engine); every rank calls this with the same prompts.
        """
        if self.dist.world_size == 1:
            return self.engine.generate(prompts, params)
        share = self.dist.shard(len(prompts))
        local = self.engine.generate([prompts[i] for i in share], replace(params, seed=params.seed + 1_000_003 * self.dist.rank)) \
            if len(share) else []
        return [group for part in self.dist.all_gather(local) for group in part]

    def update_weights(self, buckets) -> None:
        self.engine.update_weights(buckets)

    def release_memory(self) -> None:
        self.engine.release_memory()

    def resume_memory(self) -> None:
        self.engine.resume_memory()
