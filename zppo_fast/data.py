"""Questions in, prompts out: the training question stream and the chat-formatted prompt ids.

`QuestionStream` walks the task's training ids in a seeded shuffled order, epoch after epoch, in
batches of distinct ids; its position is saved in checkpoints so a resumed run sees the same questions.
"""

from __future__ import annotations

import random

from transformers import PreTrainedTokenizerBase

from zppo_fast import prompts
from zppo_fast.task import ArithmeticTask
from zppo_fast.testbed import TestbedTask


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, user_text: str) -> list[int]:
    """Token ids of one user turn with the closing instruction, ending in an open assistant turn:
    every prompt the policy answers (plain, BCQ, NCQ, hint; training and evaluation)."""
    return _user_turn_ids(tokenizer, prompts.with_closing(user_text))


def instruction_prompt_ids(tokenizer: PreTrainedTokenizerBase, user_text: str) -> list[int]:
    """Token ids of one of the teacher's side prompts (compression, hint, judge), ending in an
    open assistant turn: no closing instruction, and thinking disabled.

    These are instructions, not problems: a thinking template (Qwen3.5's) renders them with
    `enable_thinking=False` (its empty think block already in the prompt). Templates without the
    switch never read the variable, so they render exactly as before.
    """
    return _user_turn_ids(tokenizer, user_text, enable_thinking=False)


def _user_turn_ids(tokenizer: PreTrainedTokenizerBase, content: str, **template_vars) -> list[int]:
    messages = [{"role": "user", "content": content}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **template_vars)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def tokenizer_corpus(task: ArithmeticTask | TestbedTask, size: int = 4000, seed: int = 0) -> list[str]:
    """Text the in-process BPE is trained on: questions and solutions of the task (`size` of them,
    `task.tokenizer_texts`) and every prompt template."""
    corpus = task.tokenizer_texts(size, seed)
    templates = [prompts.CLOSING_INSTRUCTION, prompts.COMPRESSION_TEMPLATE, prompts.BCQ_INSTRUCTION,
                 prompts.NCQ_HEADER, "<candidate>\n</candidate>\n<summary>\n</summary>\n<response>\n</response>",
                 "user\nassistant\nsystem\n"]
    # Repeating the templates makes BPE merge them into few tokens, keeping BCQ/NCQ prompts short.
    return corpus + templates * 50


class QuestionStream:
    """Yields batches of distinct training question ids, walking a seeded shuffle epoch after epoch.

    A batch that crosses an epoch boundary takes the rest of the old epoch, then the first ids of
    the new epoch's order that are not already in the batch; the ids it skips stay where they are
    and come in later batches of that epoch, so every epoch still yields every id exactly once.
    The position is (epoch, index, ahead): `index` is the first position of the epoch's order not
    yet taken and `ahead` the positions after it already taken (only the few skipped over at a
    boundary), all saved in checkpoints so a resumed run sees the same questions.
    """

    def __init__(self, ids: list[int], seed: int = 0):
        if not ids:
            raise ValueError("the training split is empty: check task.heldout_fraction")
        if len(set(ids)) != len(ids):
            raise ValueError(f"the training ids are not distinct ({len(ids)} ids, {len(set(ids))} distinct)")
        self.ids, self.seed = list(ids), seed
        self.epoch, self.index, self.ahead = 0, 0, set()
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(self.ids)
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, n: int) -> list[int]:
        """(n,) distinct ids; n must not exceed the number of ids."""
        if n > len(self.ids):
            raise ValueError(f"a batch of {n} distinct questions needs at least {n} training questions, "
                             f"the data set has {len(self.ids)}")
        batch: list[int] = []
        chosen: set[int] = set()
        while len(batch) < n:
            if self.index == len(self._order):
                self.epoch, self.index, self.ahead = self.epoch + 1, 0, set()
                self._order = self._shuffle(self.epoch)
            j = self.index
            while len(batch) < n and j < len(self._order):
                q = self._order[j]
                if j not in self.ahead and q not in chosen:  # an id already in the batch waits for a later one
                    batch.append(q)
                    chosen.add(q)
                    self.ahead.add(j)
                j += 1
            while self.index in self.ahead:
                self.ahead.remove(self.index)
                self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "ahead": sorted(self.ahead)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.ahead = {int(j) for j in state.get("ahead", ())}  # absent in checkpoints before issue 14
        self._order = self._shuffle(self.epoch)
