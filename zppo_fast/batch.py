"""The rollout batch: one step's sequences with rewards and groups, split for the policy update.

Each rollout is a prompt followed by the student's completion. Groups (the rollouts of one
prompt: plain, BCQ or NCQ) share a baseline. The update splits the batch into `I` mini-batches
of whole groups (one optimizer step each), each mini-batch across the ranks balanced by tokens,
and each rank's share into micro-batches of at most `max_tokens` positions (one forward and
backward each, packed into one row by default). Every rank holds the whole batch, so every rank
can compute every rank's split, and all ranks run the same number of micro-batches (filler
micro-batches with no loss tokens make up the difference: FSDP2's collectives must pair up).

Rollouts of image questions (a VLM student) carry their prompt's encoded images. They are never
packed (Qwen3.5's 3-D image positions are per sequence, see zppo_fast/vlm.py): a rank's image rows
form right-padded `ImageMicroBatch`es of their own, its text rows the configured layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zppo_fast.packing import MicroBatch, pack
from zppo_fast.vlm import EncodedImages, VLMPrompt, image_micro_batch


@dataclass
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]
    reward: float
    group: int  # rollouts with the same group id share a baseline
    images: EncodedImages | None = None  # the prompt's images (shared by its group), whose placeholders it holds

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class RolloutBatch:
    rollouts: list[Rollout] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rollouts)

    @property
    def rewards(self) -> torch.Tensor:  # (R,)
        return torch.tensor([r.reward for r in self.rollouts], dtype=torch.float32)

    @property
    def group_ids(self) -> torch.Tensor:  # (R,)
        return torch.tensor([r.group for r in self.rollouts], dtype=torch.int64)

    def response_tokens(self, rows: list[int] | None = None) -> int:
        rows = range(len(self)) if rows is None else rows
        return sum(len(self.rollouts[i].response_ids) for i in rows)

    def minibatches(self, n: int) -> list[list[int]]:
        """Split the rows into `n` mini-batches of whole groups, as even in groups as possible."""
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(self.rollouts):
            groups.setdefault(r.group, []).append(i)
        ordered = list(groups.values())
        n = max(1, min(n, len(ordered)))
        bounds = [round(k * len(ordered) / n) for k in range(n + 1)]
        return [[i for g in ordered[bounds[k] : bounds[k + 1]] for i in g] for k in range(n)]

    def split_ranks(self, rows: list[int], world_size: int) -> list[list[int]]:
        """`rows` dealt to ranks balanced by sequence length: longest first, to the lightest rank.

        Deterministic (ties go to the lower rank). Each rank's rows stay longest first, so its
        micro-batches hold sequences of similar lengths: less padding wherever sequences are
        padded (the padded layout, and the Gated-DeltaNet mixers of the packed one).
        """
        load, shares = [0] * world_size, [[] for _ in range(world_size)]
        for i in sorted(rows, key=lambda i: (-len(self.rollouts[i]), i)):
            r = min(range(world_size), key=lambda r: (load[r], r))
            load[r] += len(self.rollouts[i])
            shares[r].append(i)
        return shares

    def token_chunks(self, rows: list[int], max_tokens: int, packed: bool = True) -> list[list[int]]:
        """Consecutive `rows` grouped so each forward computes at most `max_tokens` positions
        (the sum of lengths when packed, rows x longest when padded); a longer sequence runs alone."""
        chunks: list[list[int]] = []
        for i in rows:
            chunk = (chunks[-1] if chunks else []) + [i]
            lengths = [len(self.rollouts[j]) for j in chunk]
            cost = sum(lengths) if packed else len(chunk) * max(lengths)
            if chunks and cost <= max_tokens:
                chunks[-1] = chunk
            else:
                chunks.append([i])
        return chunks

    def microbatches(self, rows: list[int], rank: int, world_size: int, max_tokens: int, *, packed: bool = True,
                     pad_id: int = 0) -> list[MicroBatch]:
        """This rank's micro-batches of `rows`, padded with fillers to the most any rank has: text
        rows in the `packed` layout, then image rows right-padded with their images."""

        def chunks(share: list[int]) -> tuple[list[list[int]], list[list[int]]]:
            text = [i for i in share if self.rollouts[i].images is None]
            image = [i for i in share if self.rollouts[i].images is not None]
            return self.token_chunks(text, max_tokens, packed), self.token_chunks(image, max_tokens, packed=False)

        shares = self.split_ranks(rows, world_size)
        counts = [sum(map(len, chunks(s))) for s in shares]
        text, image = chunks(shares[rank])
        r = self.rollouts
        out = [pack([r[i].prompt_ids + r[i].response_ids for i in chunk], [len(r[i].prompt_ids) for i in chunk], chunk,
                    packed=packed, pad_id=pad_id) for chunk in text]
        out += [image_micro_batch([VLMPrompt(r[i].prompt_ids, r[i].images) for i in chunk],
                                  [r[i].response_ids for i in chunk], pad_id, chunk) for chunk in image]
        filler = pack([[pad_id, pad_id]], [1], [], packed=packed, pad_id=pad_id, loss=False)
        return out + [filler] * (max(counts) - len(out))
