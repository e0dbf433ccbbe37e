"""Started by tests/test_distributed.py under torchrun: one rank of a small distributed job.

    torchrun --nproc_per_node N tests/dist_worker.py update OUT CACHE RUN_DIR [--section.key VALUE ...]

    torchrun --nproc_per_node N tests/dist_worker.py engine_env OUT

`engine_env`: each rank starts an engine in a child process (zppo_fast/engine_process.py) and rank 0
writes its own environment and its engine's to OUT (JSON).

`update`: the tiny trainer takes two optimizer steps on a fixed random rollout batch (the same on
every rank and at every world size, each group's rows sharing their prompt, as sampled rows do;
extra arguments are config overrides, e.g. the shared-prefix layout), with plain SGD in place of
AdamW; rank 0 saves the full gradient of each step (summed over ranks and clipped, as the optimizer
sees it), the full weights afterwards and the metrics to OUT, and the results of data-parallel
generate calls through a scripted engine to OUT.json.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch
from batches import random_batch
from conftest import TINY_OVERRIDES

from zppo_fast.config import load_config
from zppo_fast.data_parallel import DataParallelEngine
from zppo_fast.distributed import destroy_distributed
from zppo_fast.engine import Sample, SamplingParams
from zppo_fast.train import Trainer
from zppo_fast.weight_sync import iter_weight_buckets


class EchoEngine:
    """Answers each prompt with its own tokens, the engine's rank and the seed it was given."""

    def __init__(self, rank: int):
        self.rank = rank

    def generate(self, prompts, params):
        return [[Sample(p, f"rank{self.rank} seed{params.seed}", "stop", [0.0] * len(p)) for _ in range(params.n)]
                for p in prompts]


def update(out: str, cache: str, run_dir: str, *overrides: str) -> None:
    cfg = load_config(None, TINY_OVERRIDES + ["--sft.cache_dir", cache, "--run.out_dir", run_dir,
                                              "--run.overwrite", "true", "--rl.num_minibatches", "2",
                                              "--parallel.max_tokens_per_microbatch", "64", *overrides])
    trainer = Trainer(cfg, progress=False)
    dist = trainer.dist
    # Plain SGD moves each weight by lr times its gradient, so what the rank count changes in the
    # weights is what it changes in the gradient; AdamW divides a gradient by its own size, and turns
    # rounding noise in a near-zero entry into an lr-sized move.
    trainer.optimizer = torch.optim.SGD(trainer.policy.parameters(), lr=cfg.rl.lr)
    grads = []

    def record(optimizer, args, kwargs):  # every rank: full_tensor() gathers the shards
        grads.append({n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                      for n, p in trainer.policy.named_parameters() if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(record)
    batch = random_batch(len(trainer.tokenizer), n_groups=8, group_size=4, seed=1)
    for r in batch.rollouts:
        r.prompt_ids = batch.rollouts[4 * r.group].prompt_ids
    adv = torch.randn(len(batch), generator=torch.Generator().manual_seed(2))
    old, _ = trainer.logprobs(batch)
    old = {i: o + 0.2 for i, o in old.items()}  # ratios away from 1
    metrics = trainer.update(batch, old, adv)
    weights = {n: t.clone() for bucket in iter_weight_buckets(trainer.policy.lm) for n, t in bucket}

    prompts = [[i, i + 1] for i in range(5)]
    params = SamplingParams(n=2, seed=7)
    everyone = DataParallelEngine(EchoEngine(dist.rank), dist).generate(prompts, params)
    owner = dist.world_size - 1  # only the last rank owns an engine
    one = DataParallelEngine(EchoEngine(dist.rank) if dist.rank == owner else None, dist, [owner]).generate(prompts, params)
    if dist.is_main:
        torch.save({"weights": weights, "grads": grads, "metrics": metrics, "longest": max(map(len, batch.rollouts))},
                   out)
        as_json = lambda groups: [[(s.token_ids, s.text) for s in g] for g in groups]
        with open(out + ".json", "w") as f:
            json.dump({"everyone": as_json(everyone), "one_owner": as_json(one)}, f)
    dist.barrier()


def engine_env(out: str) -> None:
    from engine_factories import ProcessProbe

    from zppo_fast.distributed import init_distributed
    from zppo_fast.engine_process import EngineProcess

    dist = init_distributed()
    engine = EngineProcess(ProcessProbe, f"probe engine (rank {dist.rank})")
    try:
        child = engine.call("environ")
    finally:
        engine.shutdown()
    if dist.is_main:
        with open(out, "w") as f:
            json.dump({"rank": dict(os.environ), "engine": child}, f)
    dist.barrier()


if __name__ == "__main__":
    try:
        {"update": update, "engine_env": engine_env}[sys.argv[1]](*sys.argv[2:])  # its trainer is gone when it returns
    finally:
        destroy_distributed()
