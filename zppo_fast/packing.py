"""Padding-free training forward: a micro-batch's sequences packed into one row.

    mb = pack(sequences, prompt_lengths)         # input_ids (1, T), position ids restart per sequence
    hidden = policy(mb)                          # (T', H) -> hidden.view(-1, H)[mb.hidden_index]

Attention must not cross sequence boundaries. How each layer kind gets that:
* Full attention: transformers finds the boundaries in the restarting position ids and builds a
  block-diagonal causal mask (SDPA / eager); with flash-attn installed the `cu_seq_lens_*`
  arguments we pass select its varlen kernel. Either way no padding is computed.
* Gated DeltaNet (Qwen3.5's linear-attention layers): transformers' PyTorch path (the CPU, and
  GPUs without flash-linear-attention) cannot keep packed sequences apart — told the boundaries
  (`cu_seq_lens_*`) it refuses, and given only restarting position ids its causal conv and its
  recurrence run across them, leaking one sequence's state into the next. So
  `segment_mixers` makes each such mixer unpack its row into right-padded sequences,
  run them as a batch with the padding mask, and re-pack the output. Projections, MLPs and full
  attention stay packed; only these mixers compute on padding (reported by `linear_padding`).
  We do this even when the fla kernels are installed: their varlen support is not reached
  through transformers' call (it passes no `seq_idx` to the conv), so correctness comes first.

`pack(..., packed=False)` lays the same sequences out right-padded (B, T) instead: the reference
the packed path is tested against, and the layout for models that cannot be packed.

`pack_shared(groups)` lays groups out with each prompt once, followed by its responses
(`parallel.share_prefix`; zppo_fast/shared_prefix.py says how each layer kind keeps responses apart).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from zppo_fast.shared_prefix import (SharedLayout, block_mask, build_layout, shared_full_attention,
                                     shared_linear_attention)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (1, T) packed, or (B, T) right-padded
    position_ids: torch.Tensor  # same shape; 0 at the start of every sequence
    attention_mask: torch.Tensor | None  # (B, T) in the padded layout, None when packed
    cu_seqlens: torch.Tensor | None  # (B + 1,) int32 sequence boundaries when packed
    hidden_index: torch.Tensor  # (N,) flat positions whose hidden state predicts a response token
    targets: torch.Tensor  # (N,) those response tokens
    loss_mask: torch.Tensor  # (N,) bool; False only in a rank's filler micro-batch
    response_lengths: list[int]  # per sequence: its share of the N targets, in order
    rows: list[int]  # indices of the sequences in the rollout batch
    shared: SharedLayout | None = None  # the shared-prefix layout (`pack_shared`), else None

    def to(self, device: torch.device) -> MicroBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return MicroBatch(move(self.input_ids), move(self.position_ids), move(self.attention_mask),
                          move(self.cu_seqlens), move(self.hidden_index), move(self.targets), move(self.loss_mask),
                          self.response_lengths, self.rows, None if self.shared is None else self.shared.to(device))

    def model_kwargs(self, attention: str = "sdpa") -> dict:
        """Keyword arguments for a transformers decoder forward whose attention kernel is `attention`
        (the shared-prefix layout's mask depends on it)."""
        kw = {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False}
        if self.shared is not None:
            # One mask per layer type: a block mask for FlexAttention; otherwise the layout itself,
            # which the wrapped mixers of both kinds (`segment_mixers`) turn into their own masks.
            full = block_mask(self.shared) if attention == "flex_attention" else self.shared
            kw["attention_mask"] = {"full_attention": full, "linear_attention": self.shared}
        elif self.cu_seqlens is not None:
            longest = int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())
            kw.update(cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens,
                      max_length_q=longest, max_length_k=longest)
        else:
            kw["attention_mask"] = self.attention_mask
        return kw

    @property
    def tokens(self) -> int:
        """Positions the model computes (real tokens when packed, padding included otherwise)."""
        return self.input_ids.numel()


def pack(sequences: list[list[int]], prompt_lengths: list[int], rows: list[int] | None = None, *,
         packed: bool = True, pad_id: int = 0, loss: bool = True) -> MicroBatch:
    """Lay out `sequences` (prompt + response token ids) for one forward.

    Position t of a sequence predicts its token t + 1, so a sequence with prompt length p and
    total length n contributes targets at its positions p-1 .. n-2. `loss=False` builds a filler
    micro-batch whose targets are all masked out (ranks run equal numbers of forwards).
    """
    if len(sequences) != len(prompt_lengths) or not sequences:
        raise ValueError(f"pack: {len(sequences)} sequences, {len(prompt_lengths)} prompt lengths")
    lengths = [len(s) for s in sequences]
    for i, (n, p) in enumerate(zip(lengths, prompt_lengths)):
        if not 1 <= p <= n:
            raise ValueError(f"pack: sequence {i} has length {n} and prompt length {p}")
    width = sum(lengths) if packed else max(lengths)
    starts = [sum(lengths[:i]) if packed else i * width for i in range(len(sequences))]
    hidden_index = torch.cat([torch.arange(s + p - 1, s + n - 1) for s, p, n in zip(starts, prompt_lengths, lengths)])
    flat = [t for s in sequences for t in s]
    if packed:
        input_ids = torch.tensor(flat, dtype=torch.long).view(1, -1)
        position_ids = torch.cat([torch.arange(n) for n in lengths]).view(1, -1)
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        attention_mask = None
    else:
        input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for b, s in enumerate(sequences):
            input_ids[b, : len(s)] = torch.tensor(s)
            attention_mask[b, : len(s)] = 1
        position_ids = torch.arange(width).expand(len(sequences), -1).clone()
        cu = None
    targets = input_ids.view(-1)[hidden_index + 1]
    loss_mask = torch.full_like(targets, loss, dtype=torch.bool)
    return MicroBatch(input_ids, position_ids, attention_mask, cu, hidden_index, targets, loss_mask,
                      [n - p for n, p in zip(lengths, prompt_lengths)], list(rows or []))


def pack_shared(groups: list[tuple[list[int], list[list[int]]]], rows: list[int] | None = None) -> MicroBatch:
    """Lay out `groups` [(prompt ids, [response ids, ...])] with each prompt once, then its responses.

    The prompt's last position predicts every response's first token; position t of a response
    its token t + 1. Targets are in group-then-response order (`rows` must list the sequences so),
    as `pack` gives them for the same sequences one after another.
    """
    if not groups or any(not p for p, _ in groups):
        raise ValueError(f"pack_shared: every group needs a non-empty prompt, got prompt lengths "
                         f"{[len(p) for p, _ in groups]}")
    layout = build_layout([len(p) for p, _ in groups], [[len(r) for r in rs] for p, rs in groups])
    ids, positions, hidden_index, targets, start = [], [], [], [], 0
    for prompt, responses in groups:
        p = len(prompt)
        ids += prompt
        positions += range(p)
        last = start + p - 1  # the prompt's last position
        start += p
        for r in responses:
            ids += r
            positions += range(p, p + len(r))
            hidden_index += [last, *range(start, start + len(r) - 1)][: len(r)]
            targets += r
            start += len(r)
    targets_t = torch.tensor(targets, dtype=torch.long)
    return MicroBatch(torch.tensor(ids, dtype=torch.long).view(1, -1), torch.tensor(positions).view(1, -1), None,
                      None, torch.tensor(hidden_index, dtype=torch.long), targets_t,
                      torch.ones_like(targets_t, dtype=torch.bool), [len(r) for _, rs in groups for r in rs],
                      list(rows or []), layout)


def _segmented(forward):
    """Wrap a linear-attention mixer's forward so a packed row runs as padded separate sequences."""

    @functools.wraps(forward)
    def run(hidden_states: torch.Tensor, *args, **kwargs):
        if isinstance(kwargs.get("attention_mask"), SharedLayout):
            return shared_linear_attention(forward, hidden_states, kwargs.pop("attention_mask"), *args, **kwargs)
        cu = kwargs.pop("cu_seq_lens_q", None)
        for k in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
            kwargs.pop(k, None)
        if cu is None or kwargs.get("cache") is not None:
            return forward(hidden_states, *args, **kwargs)
        lengths = (cu[1:] - cu[:-1]).tolist()
        x = hidden_states[0]  # (T, H)
        padded = nn.utils.rnn.pad_sequence(list(x.split(lengths)), batch_first=True)  # (B, L, H)
        mask = torch.arange(padded.shape[1], device=x.device) < torch.tensor(lengths, device=x.device)[:, None]
        kwargs["attention_mask"] = mask.long()
        out = forward(padded, *args, **kwargs)  # (B, L, H)
        return out[mask].unsqueeze(0)  # (1, T, H)

    return run


def _grouped(forward):
    """Wrap a full-attention layer's forward so a shared-prefix row runs group by group."""

    @functools.wraps(forward)
    def run(hidden_states: torch.Tensor, position_embeddings, attention_mask, *args, **kwargs):
        if isinstance(attention_mask, SharedLayout):
            return shared_full_attention(forward, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        return forward(hidden_states, position_embeddings, attention_mask, *args, **kwargs)

    return run


def segment_mixers(model: nn.Module) -> int:
    """Make every Gated-DeltaNet mixer of `model` packing-safe, and every full-attention layer run a
    shared-prefix row group by group; returns how many modules were wrapped.

    The module tree and parameter names are unchanged (only the instances' forward is wrapped),
    so checkpoints, FSDP2 and weight sync see the model as transformers built it.
    """
    n = 0
    for name, module in model.named_modules():
        wrap = _segmented if name.endswith("linear_attn") else _grouped if name.endswith("self_attn") else None
        if wrap is not None and not getattr(module, "_zppo_segmented", False):
            module.forward = wrap(module.forward)
            module._zppo_segmented = True
            n += 1
    return n


def linear_padding(mb: MicroBatch) -> float:
    """Fraction of the Gated-DeltaNet mixers' positions that are padding for this micro-batch."""
    if mb.shared is not None:  # prompts and responses run as two padded batches
        real = mb.input_ids.numel()
        spans = [[n for _, n in mb.shared.prompts], [n for _, n, _ in mb.shared.responses]]
        return 1.0 - real / sum(max(s) * len(s) for s in spans if s)
    if mb.cu_seqlens is None:
        return 1.0 - float(mb.attention_mask.sum()) / mb.attention_mask.numel()
    lengths = (mb.cu_seqlens[1:] - mb.cu_seqlens[:-1]).tolist()
    return 1.0 - sum(lengths) / (max(lengths) * len(lengths))
