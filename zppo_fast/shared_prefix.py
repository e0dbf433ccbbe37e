"""Shared-prefix layout: each group's prompt computed once, followed by its G responses.

    row = [prompt_0 | response_0,0 | ... | response_0,G-1 | prompt_1 | response_1,0 | ...]

A group's samples share their prompt exactly, so the training forward (and the old-log-prob pass)
computes it once instead of G times. Each position belongs to a *segment* (a prompt or one
response) and has an *owner*: the segment whose keys it may read besides its own (a response's
prompt; a prompt's owner is itself). One predicate says who attends to whom,

    allowed(q, k) = k <= q  and  (segment[k] == segment[q]  or  segment[k] == owner[q])

so a response reads its whole prompt and itself causally, never another response. Position ids
continue from the prompt's end for every response (each response sits where it would sit after
its prompt alone).

How each layer kind gets it (`zppo_fast.packing.MicroBatch.model_kwargs` passes transformers a
mask per layer type):
* Full attention: the predicate as dense bool masks for SDPA (the CPU path: `shared_full_attention`
  runs the layer group by group, each with its own `dense_mask`, as no group reads another), or as
  one FlexAttention block mask over the row (`block_mask`, the CUDA path, where the student runs
  flex_attention and skips the masked blocks itself; the same predicate, so the two layouts share
  every piece of layout code).
* Gated DeltaNet: `shared_linear_attention` runs the mixer twice: on the prompts (left-padded, so
  the final recurrent state is exact: zero inputs keep a zero state at zero), then on the responses
  (right-padded) with their prompt's final recurrent state and convolution tail as the initial
  state. Both go in through transformers' own forward, by a cache object that hands them over, so
  the mixer's arithmetic is transformers' (and its fla kernels' on GPUs). Gradients flow back into
  the prompt through those states, summed over the G responses by the gather.

Only response positions predict targets: the prompt's last position predicts every response's
first token (`zppo_fast.packing.pack_shared`).

Image prompts (VLM students) are shared the same way, in micro-batches of their own: the vision
tower encodes each prompt's images once, and each prompt's 3-D rotary positions are computed for
the prompt alone (`zppo_fast.vlm.vlm_shared_hidden`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SharedLayout:
    """Where prompts and responses lie in one shared-prefix row of T positions.

    segment, owner: (T,) int64, as in the module docstring.
    prompts: [(start, length)] per prompt; responses: [(start, length, prompt index)] per
    non-empty response, in row order.
    """

    segment: torch.Tensor
    owner: torch.Tensor
    prompts: list[tuple[int, int]]
    responses: list[tuple[int, int, int]]

    def to(self, device: torch.device) -> SharedLayout:
        return SharedLayout(self.segment.to(device, non_blocking=True), self.owner.to(device, non_blocking=True),
                            self.prompts, self.responses)


def build_layout(prompt_lengths: list[int], response_lengths: list[list[int]]) -> SharedLayout:
    """The layout of groups laid out in order: prompt k (length prompt_lengths[k]) then its
    responses (response_lengths[k]). Empty responses take no positions."""
    segment, owner, prompts, responses = [], [], [], []
    start = seg = 0
    for k, (p, lengths) in enumerate(zip(prompt_lengths, response_lengths)):
        prompt_seg = seg
        prompts.append((start, p))
        segment += [seg] * p
        owner += [seg] * p
        start, seg = start + p, seg + 1
        for n in lengths:
            if n:
                responses.append((start, n, k))
                segment += [seg] * n
                owner += [prompt_seg] * n
                start, seg = start + n, seg + 1
    return SharedLayout(torch.tensor(segment), torch.tensor(owner), prompts, responses)


def allowed(layout: SharedLayout, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The attention predicate on query / key positions (broadcasting index tensors)."""
    seg = layout.segment
    return (k <= q) & ((seg[k] == seg[q]) | (seg[k] == layout.owner[q]))


def group_spans(layout: SharedLayout) -> list[tuple[int, int]]:
    """(start, end) of each group's positions: its prompt and its responses, which no other group reads."""
    starts = [s for s, _ in layout.prompts] + [layout.segment.numel()]
    return list(zip(starts[:-1], starts[1:]))


def dense_mask(layout: SharedLayout, start: int = 0, end: int | None = None) -> torch.Tensor:
    """(1, 1, L, L) bool mask of positions [start, end) (default: the whole row), True where allowed."""
    pos = torch.arange(start, layout.segment.numel() if end is None else end, device=layout.segment.device)
    return allowed(layout, pos[:, None], pos[None, :])[None, None]


def block_mask(layout: SharedLayout):
    """The same predicate as a FlexAttention BlockMask (CUDA; `attn_implementation="flex_attention"`)."""
    from torch.nn.attention.flex_attention import create_block_mask

    t = layout.segment.numel()
    return create_block_mask(lambda b, h, q, k: allowed(layout, q, k), None, None, t, t,
                             device=layout.segment.device)


class _StateHandover:
    """Stands in for transformers' cache in one Gated-DeltaNet forward: hands it initial states
    (`conv`: (B, C, K-1) pre-convolution tail, `recurrent`: (B, heads, dk, dv)) and keeps the
    final ones, as tensors in the autograd graph (the real cache copies into buffers in place)."""

    def __init__(self, conv: torch.Tensor | None = None, recurrent: torch.Tensor | None = None):
        self.conv, self.recurrent = conv, recurrent
        self.final_conv = self.final_recurrent = None

    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        return self.conv

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        return self.recurrent

    def is_recording_past(self, layer_idx: int) -> bool:
        return True  # never the single-token path, which updates the conv state in place

    def get_recurrent_states_to_keep(self, layer_idx: int) -> int:
        return 0  # transformers >= 5.25 asks how many per-token states to keep (for rollbacks): none

    def update_conv_state(self, x: torch.Tensor, layer_idx: int, conv_kernel_size: int | None = None, **kwargs):
        """x: (B, C, L) this call's pre-convolution features; returns them behind the given tail."""
        full = x if self.conv is None else torch.cat([self.conv.to(x.dtype), x], dim=-1)
        keep = conv_kernel_size - 1
        self.final_conv = F.pad(full, (keep, 0))[..., full.shape[-1]:] if keep else full[..., :0]
        return full

    def update_recurrent_state(self, state: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs):
        self.final_recurrent = state
        return state


def _gather(x: torch.Tensor, spans: list[tuple[int, int]], left: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spans of the row x (T, H) as a padded batch (B, L, H), its 0/1 mask (B, L) and the row
    positions of its real entries (in mask order). `left`: pad on the left (prompts)."""
    width = max(n for _, n in spans)
    col = torch.arange(width, device=x.device)
    starts = torch.tensor([s for s, _ in spans], device=x.device)[:, None]
    lengths = torch.tensor([n for _, n in spans], device=x.device)[:, None]
    offset = col - (width - lengths) if left else col.expand(len(spans), -1)
    mask = (offset >= 0) & (offset < lengths)
    index = torch.where(mask, starts + offset, x.shape[0])  # the extra zero row below for padding
    padded = torch.cat([x, x.new_zeros(1, x.shape[1])])[index]
    return padded, mask, index[mask]


def shared_full_attention(forward, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                          layout: SharedLayout, **kwargs) -> tuple[torch.Tensor, None]:
    """One full-attention layer (`forward`, transformers') over a shared-prefix row (1, T, H), group by
    group with each group's dense mask: SDPA on the CPU computes every entry of a dense mask, so one
    (T, T) mask over a row of many groups would cost T^2 where the groups need the sum of their squares."""
    cos, sin = position_embeddings  # (1, T, rotary dim) each
    kwargs.pop("position_ids", None)  # already in the rotary embeddings; a whole row's would not fit a group
    out = [forward(hidden_states[:, a:b], (cos[:, a:b], sin[:, a:b]), dense_mask(layout, a, b), **kwargs)[0]
           for a, b in group_spans(layout)]
    return torch.cat(out, dim=1), None


def shared_linear_attention(forward, hidden_states: torch.Tensor, layout: SharedLayout, **kwargs) -> torch.Tensor:
    """One Gated-DeltaNet mixer (`forward`, transformers') over a shared-prefix row (1, T, H)."""
    if kwargs.pop("cache", None) is not None:
        raise ValueError("shared_linear_attention: a shared-prefix row is a training forward, without a cache")
    x = hidden_states[0]
    prompts, p_mask, p_pos = _gather(x, layout.prompts, left=True)
    state = _StateHandover()
    p_out = forward(prompts, cache=state, attention_mask=p_mask.long(), **kwargs)  # (P, Lp, H)
    outputs, positions = [p_out[p_mask]], [p_pos]
    if layout.responses:
        owner = torch.tensor([k for _, _, k in layout.responses], device=x.device)
        responses, r_mask, r_pos = _gather(x, [(s, n) for s, n, _ in layout.responses], left=False)
        given = _StateHandover(state.final_conv[owner], state.final_recurrent[owner])
        r_out = forward(responses, cache=given, attention_mask=r_mask.long(), **kwargs)  # (R, Lr, H)
        outputs.append(r_out[r_mask])
        positions.append(r_pos)
    values = torch.cat(outputs)
    return values.new_zeros(x.shape[0], values.shape[1]).index_copy(0, torch.cat(positions), values)[None]
