"""Random rollout batches for tests of the update: every loss term exercised, any vocabulary."""

import random

import torch

from zppo_fast.batch import Rollout, RolloutBatch


def random_batch(vocab: int, n_groups: int = 6, group_size: int = 4, seed: int = 0) -> RolloutBatch:
    """Prompts of 3-9 and responses of 1-7 random tokens, rewards 0/1 at random, `n_groups` groups."""
    rng = random.Random(seed)
    return RolloutBatch([
        Rollout([rng.randrange(vocab) for _ in range(rng.randint(3, 9))],
                [rng.randrange(vocab) for _ in range(rng.randint(1, 7))], float(rng.random() < 0.5), g)
        for g in range(n_groups) for _ in range(group_size)
    ])


def hidden_grad(trainer, batch: RolloutBatch, old, advantages) -> torch.Tensor:
    """|dL/dh| summed over features at every position of the decoder's output, for one backward
    of the trainer's loss on all of `batch`: (B * T,) over the micro-batch's flat layout."""
    captured = {}

    def keep(module, inputs, output):
        output.last_hidden_state.retain_grad()
        captured["h"] = output.last_hidden_state

    handle = trainer.policy.lm.get_decoder().register_forward_hook(keep)
    trainer.optimizer.zero_grad()
    try:
        trainer.backward_minibatch(batch, list(range(len(batch))), old, advantages)
    finally:
        handle.remove()
    return captured["h"].grad.abs().sum(-1).view(-1)
