"""The rollout batch: one step's sequences with rewards and groups, split for the policy update.

Each rollout is a prompt followed by the student's completion. Groups (the rollouts of one
prompt: plain, BCQ or NCQ) share a baseline. The update splits the batch into `I` mini-batches
of whole groups (one optimizer step each) and each mini-batch into micro-batches of at most
`micro_batch_size` sequences (one forward/backward each), right-padded to their own length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]
    reward: float
    group: int  # rollouts with the same group id share a baseline


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (B, T) right-padded
    target_mask: torch.Tensor  # (B, T-1) True where position t predicts a response token t+1
    rows: list[int]  # indices of these rollouts in the rollout batch


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

    def microbatches(self, rows: list[int], size: int, pad_id: int) -> list[MicroBatch]:
        out = []
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            seqs = [self.rollouts[i].prompt_ids + self.rollouts[i].response_ids for i in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width - 1), dtype=torch.bool)
            for b, i in enumerate(chunk):
                n_prompt, n = len(self.rollouts[i].prompt_ids), len(seqs[b])
                ids[b, :n] = torch.tensor(seqs[b])
                mask[b, n_prompt - 1 : n - 1] = True  # only the student's own tokens are trained
            out.append(MicroBatch(ids, mask, chunk))
        return out
