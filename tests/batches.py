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


def tiny_engine_world():
    """(tokenizer, a tiny random Qwen3.5, 3 chat prompts) for the engine tests: a 400-token BPE of
    the arithmetic task with operands up to 50, hidden 32, 4 layers, seed 1."""
    from zppo_fast.config import ModelConfig
    from zppo_fast.data import chat_prompt_ids, tokenizer_corpus
    from zppo_fast.model import build_tiny_model
    from zppo_fast.task import ArithmeticTask
    from zppo_fast.tokenizer import build_tokenizer

    task = ArithmeticTask(max_operand=50)
    tokenizer = build_tokenizer(tokenizer_corpus(task, size=500), vocab_size=400)
    model = build_tiny_model(ModelConfig(hidden_size=32, num_layers=4), tokenizer, seed=1)
    return tokenizer, model, [chat_prompt_ids(tokenizer, task.problem(q).question) for q in (3, 1000, 20000)]
