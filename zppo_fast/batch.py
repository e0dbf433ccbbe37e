"""The rollout batch: one step's sequences with rewards and groups, split for the policy update.

Each rollout is a prompt followed by the student's completion. Groups (the rollouts of one
prompt: plain, BCQ or NCQ) share a baseline. The update splits the batch into `I` mini-batches
of whole groups (one optimizer step each), each kind of group (plain new, replayed, BCQ, NCQ,
Hint, Prefix) spread evenly over them (`RolloutBatch.minibatches`), each mini-batch across the
ranks balanced by tokens,
and each rank's share into micro-batches of at most `max_tokens` positions (one forward and
backward each, packed into one row by default; with `share_prefix` a group's rows go together,
their prompt laid out once). Every rank holds the whole batch, so every rank
can compute every rank's split, and all ranks run the same number of micro-batches (filler
micro-batches with no loss tokens make up the difference: FSDP2's collectives must pair up).

Rollouts of image questions (a VLM student) carry their prompt's encoded images. They are never
packed (Qwen3.5's 3-D image positions are per sequence, see zppo_fast/vlm.py): a rank's image rows
form `ImageMicroBatch`es of their own, right-padded, or with `share_prefix` in the shared-prefix
layout with each prompt's images encoded once; its text rows the configured layout.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from zppo_fast.packing import MicroBatch, pack, pack_shared
from zppo_fast.vlm import EncodedImages, VLMPrompt, image_micro_batch, shared_image_micro_batch


@dataclass
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]
    reward: float
    group: int  # rollouts with the same group id share a baseline
    images: EncodedImages | None = None  # the prompt's images (shared by its group), whose placeholders it holds
    kind: str = "new"  # the group's kind: new | replayed (plain prompts) | bcq | ncq | hint | prefix

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

    def minibatches(self, n: int, seed: str | int = 0) -> list[list[int]]:
        """The rows split into `n` mini-batches of whole groups, each kind of group spread evenly.

        Kinds are taken in a fixed order (that of `Rollout.kind`'s first appearance in the batch);
        each kind's groups are shuffled by `random.Random(f"{seed}:{kind}")` and dealt round-robin,
        one counter running across all kinds. So every mini-batch holds its share of each kind
        (counts differ by at most one, per kind and in total), which groups go to which optimizer
        step is random but a pure function of the batch and `seed` (the trainer passes
        "run.seed:step", restored on resume), and the old-log-prob pass and the update, which both
        call this, see the same split. Without it the guided groups, which come last in the batch,
        would all land in the last mini-batch, `I - 1` optimizer steps off-policy. Rows inside a
        mini-batch are in batch order. `n` is capped at the number of groups.
        """
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(self.rollouts):
            groups.setdefault(r.group, []).append(i)
        by_kind: dict[str, list[int]] = {}
        for g, rows in groups.items():
            by_kind.setdefault(self.rollouts[rows[0]].kind, []).append(g)
        n = max(1, min(n, len(groups)))
        parts: list[list[int]] = [[] for _ in range(n)]
        dealt = 0
        for kind, ids in by_kind.items():
            random.Random(f"{seed}:{kind}").shuffle(ids)
            for g in ids:
                parts[dealt % n] += groups[g]
                dealt += 1
        return [sorted(p) for p in parts]

    def split_ranks(self, rows: list[int], world_size: int) -> list[list[int]]:
        """`rows` dealt to ranks balanced by sequence length: longest first, to the lightest rank.

        Deterministic (ties go to the lower rank). Each rank's rows stay longest first, so its
        micro-batches hold sequences of similar lengths: less padding wherever sequences are
        padded (the padded layout, and the Gated-DeltaNet mixers of the packed one).
        """
        return [[i for u in share for i in u] for share in self._deal([[i] for i in rows], world_size)]

    def _deal(self, units: list[list[int]], world_size: int) -> list[list[list[int]]]:
        """Units (rows that go together) dealt to ranks by `_cost`, as `split_ranks` deals rows."""
        load, shares = [0] * world_size, [[] for _ in range(world_size)]
        for u in sorted(units, key=lambda u: (-self._cost(u), u[0])):
            r = min(range(world_size), key=lambda r: (load[r], r))
            load[r] += self._cost(u)
            shares[r].append(u)
        return shares

    def _cost(self, unit: list[int]) -> int:
        """Positions a unit takes in a packed row: its prompt once when it is a shared-prefix unit
        (`prefix_units`), every sequence whole for a single row."""
        r = self.rollouts
        return len(r[unit[0]].prompt_ids) + sum(len(r[i].response_ids) for i in unit) if len(unit) > 1 else len(
            r[unit[0]])

    def prefix_units(self, rows: list[int], max_tokens: int) -> list[list[int]]:
        """`rows` as units of rows sharing their prompt exactly (same group, same prompt ids), in
        first-appearance order, each at most `max_tokens` positions with its prompt once (a unit
        too long is split; its parts each carry the prompt; a single row may exceed the cap)."""
        units: dict[tuple, list[list[int]]] = {}
        for i in rows:
            r = self.rollouts[i]
            parts = units.setdefault((r.group, tuple(r.prompt_ids)), [[]])
            if parts[-1] and self._cost(parts[-1] + [i]) > max_tokens:
                parts.append([])
            parts[-1].append(i)
        return [u for parts in units.values() for u in parts]

    def token_chunks(self, rows: list[int], max_tokens: int, packed: bool = True) -> list[list[int]]:
        """Consecutive `rows` grouped so each forward computes at most `max_tokens` positions
        (the sum of lengths when packed, rows x longest when padded); a longer sequence runs alone."""
        return [[i for u in c for i in u] for c in self._chunks([[i] for i in rows], max_tokens, packed)]

    def _chunks(self, units: list[list[int]], max_tokens: int, packed: bool) -> list[list[list[int]]]:
        """Consecutive units grouped as `token_chunks` groups rows."""
        chunks: list[list[list[int]]] = []
        for u in units:
            chunk = (chunks[-1] if chunks else []) + [u]
            if packed:
                cost = sum(map(self._cost, chunk))
            else:
                cost = len(chunk) * max(len(self.rollouts[j]) for c in chunk for j in c)
            if chunks and cost <= max_tokens:
                chunks[-1] = chunk
            else:
                chunks.append([u])
        return chunks

    def microbatches(self, rows: list[int], rank: int, world_size: int, max_tokens: int, *, packed: bool = True,
                     share_prefix: bool = False, pad_id: int = 0) -> list[MicroBatch]:
        """This rank's micro-batches of `rows`, padded with fillers to the most any rank has: text
        rows in the `packed` layout (or, `share_prefix`, the shared-prefix one: each prompt once, its
        responses after it, zppo_fast/shared_prefix.py), then image rows with their images: right-padded
        (encoded per rollout), or with `share_prefix` shared as text rows are (encoded once per group)."""
        r = self.rollouts
        text, image = [i for i in rows if r[i].images is None], [i for i in rows if r[i].images is not None]
        units = (self.prefix_units(text, max_tokens) + self.prefix_units(image, max_tokens) if share_prefix
                 else [[i] for i in text + image])

        def chunks(share: list[list[int]]) -> tuple[list[list[list[int]]], list[list[list[int]]]]:
            text = [u for u in share if r[u[0]].images is None]
            image = [u for u in share if r[u[0]].images is not None]
            return (self._chunks(text, max_tokens, packed or share_prefix),
                    self._chunks(image, max_tokens, packed=share_prefix))

        shares = self._deal(units, world_size)
        counts = [sum(map(len, chunks(s))) for s in shares]
        text, image = chunks(shares[rank])
        out = []
        for chunk in text:
            flat = [i for u in chunk for i in u]
            if share_prefix:
                out.append(pack_shared([(r[u[0]].prompt_ids, [r[i].response_ids for i in u]) for u in chunk], flat))
            else:
                out.append(pack([r[i].prompt_ids + r[i].response_ids for i in flat],
                                [len(r[i].prompt_ids) for i in flat], flat, packed=packed, pad_id=pad_id))
        for chunk in image:
            flat = [i for u in chunk for i in u]
            if share_prefix:
                out.append(shared_image_micro_batch([(VLMPrompt(r[u[0]].prompt_ids, r[u[0]].images),
                                                      [r[i].response_ids for i in u]) for u in chunk], flat))
            else:
                out.append(image_micro_batch([VLMPrompt(r[i].prompt_ids, r[i].images) for i in flat],
                                             [r[i].response_ids for i in flat], pad_id, flat))
        filler = pack([[pad_id, pad_id]], [1], [], packed=packed or share_prefix, pad_id=pad_id, loss=False)
        return out + [filler] * (max(counts) - len(out))
