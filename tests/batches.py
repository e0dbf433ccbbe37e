"""Random rollout batches for tests of the update: every loss term exercised, any vocabulary."""

import random

from zppo_fast.batch import Rollout, RolloutBatch


def random_batch(vocab: int, n_groups: int = 6, group_size: int = 4, seed: int = 0) -> RolloutBatch:
    """Prompts of 3-9 and responses of 1-7 random tokens, rewards 0/1 at random, `n_groups` groups."""
    rng = random.Random(seed)
    return RolloutBatch([
        Rollout([rng.randrange(vocab) for _ in range(rng.randint(3, 9))],
                [rng.randrange(vocab) for _ in range(rng.randint(1, 7))], float(rng.random() < 0.5), g)
        for g in range(n_groups) for _ in range(group_size)
    ])
