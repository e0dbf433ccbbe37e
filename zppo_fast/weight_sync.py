"""Weights from the training model to a rollout engine, in bounded-size buckets.

The trainer's model may be plain or sharded with FSDP2 (`fully_shard` per decoder layer and at the
root, so its parameters are DTensors). A rollout engine needs full tensors under the Hugging Face
names of the unwrapped causal LM. `iter_weight_buckets` walks the parameters once, gathers each
DTensor (`full_tensor()`, an all-gather over the mesh), and groups the full tensors into buckets of
at most `bucket_bytes`, one dtype per bucket, so an engine can receive each bucket as one flat
buffer (`flatten_bucket`) and the peak extra memory stays near one bucket per dtype instead of a
second copy of the model.

Every rank of the mesh must iterate the generator to the end, in step: each DTensor gather is a
collective, and the parameter order (module registration order) is the same on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

DEFAULT_BUCKET_BYTES = 512 << 20

# Parameters an engine keeps in fp32 whatever its compute dtype, by the last segment of their
# name: SGLang's Qwen3.5 Gated-DeltaNet creates A_log as float32 (srt/models/qwen3_5.py), so a push
# cast to bf16 would round it before SGLang widens it back. `iter_weight_buckets` never casts these.
FULL_PRECISION = ("A_log",)

# Wrappers that insert a path segment into parameter names without changing the model:
# torch.compile (`_orig_mod`) and activation checkpointing (`_checkpoint_wrapped_module`).
# FSDP2's fully_shard wraps nothing, so it adds no segment.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.")


def hf_name(name: str) -> str:
    """The Hugging Face parameter name of `name`, with wrapper path segments removed."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def _storage_key(p: torch.Tensor) -> tuple:
    """What two tied parameters share: the local shard's storage for a DTensor, else the tensor's."""
    local = p.to_local() if isinstance(p, DTensor) else p
    if local.device.type == "meta" or local.numel() == 0:
        return ("object", id(p))  # no memory to share: only the same Parameter object is a tie
    return (local.device, local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape))


def named_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, parameter) once per distinct parameter, in registration order.

    Tied weights (e.g. `lm_head.weight` tied to `model.embed_tokens.weight`) appear once, under the
    first name that reaches them: `named_parameters` drops repeated Parameter objects, and the
    storage check drops distinct Parameter objects that view the same memory (ties made by
    assigning `.data`). A receiver that ties the same weights gets the alias through its source.
    """
    seen: set[tuple] = set()
    for name, p in model.named_parameters():
        key = _storage_key(p)
        if key in seen:
            continue
        seen.add(key)
        yield hf_name(name), p


def weight_names(model: nn.Module) -> list[str]:
    """The names `iter_weight_buckets(model)` yields, in order, without gathering anything."""
    return [name for name, _ in named_weights(model)]


def weight_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """{name: full shape} of what `iter_weight_buckets(model)` yields (a DTensor's shape is the
    global one), without gathering anything; works on a meta-device model."""
    return {name: p.shape for name, p in named_weights(model)}


def iter_weight_buckets(
    model: nn.Module, bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: torch.dtype | None = None,
    keep: tuple[str, ...] = FULL_PRECISION,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield the model's full weights as buckets: lists of (HF name, full tensor).

    model: a causal LM (`transformers.PreTrainedModel`), plain or with FSDP2 applied; its
        parameters may be DTensors sharded on any mesh.
    bucket_bytes: upper bound on the sum of `t.numel() * t.element_size()` over a bucket. A tensor
        larger than the bound is yielded alone in a bucket of its own.
    dtype: cast every tensor to this dtype first (e.g. fp32 training weights to a bf16 engine),
        except those whose name's last segment is in `keep`, which stay in their own dtype (fp32
        A_log goes in an fp32 bucket); None keeps each parameter's dtype.

    Each bucket holds one dtype only. A tensor has the parameter's full (unsharded) shape, e.g.
    `model.embed_tokens.weight` (V, H), on the parameter's device: for a DTensor, the mesh's
    device; for a plain parameter, a detached view of the live parameter itself (no copy). A
    receiver must therefore copy what it keeps before the trainer's next optimizer step, and
    never write into a yielded tensor.

    Buckets are yielded as they fill, so at most one open bucket per dtype is held; the remaining
    partial buckets come last, in the order their dtypes first appeared. The generator runs
    collectives for DTensors: every rank must consume it completely and in the same order.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    open_buckets: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    open_bytes: dict[torch.dtype, int] = {}
    for name, p in named_weights(model):
        full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        if dtype is not None and name.rsplit(".", 1)[-1] not in keep:
            full = full.to(dtype)
        size = full.numel() * full.element_size()
        if size > bucket_bytes:
            yield [(name, full)]
            continue
        if open_bytes.get(full.dtype, 0) + size > bucket_bytes:
            yield open_buckets.pop(full.dtype)
            open_bytes.pop(full.dtype)
        open_buckets.setdefault(full.dtype, []).append((name, full))
        open_bytes[full.dtype] = open_bytes.get(full.dtype, 0) + size
    yield from open_buckets.values()


@dataclass(frozen=True)
class FlatEntry:
    """Where one tensor lives in a flat bucket: `flat[start_idx:end_idx].view(shape)`.

    The field names are those SGLang's `FlattenedTensorMetadata` carries, so an engine can convert
    one into the other field by field.
    """

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


def flatten_bucket(bucket: Iterable[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, list[FlatEntry]]:
    """Concatenate one single-dtype bucket into a 1-D tensor (one copy) and its index.

    Returns (flat, entries): flat has shape (sum of numels,), the bucket's dtype and device;
    entries[i] locates the i-th tensor. Raises ValueError for an empty or mixed-dtype bucket:
    a flat buffer has one dtype, which is why `iter_weight_buckets` groups per dtype.
    """
    bucket = list(bucket)
    if not bucket:
        raise ValueError("cannot flatten an empty bucket")
    dtypes = {t.dtype for _, t in bucket}
    if len(dtypes) != 1:
        raise ValueError(f"a flat bucket holds one dtype, got {sorted(map(str, dtypes))}")
    entries, start = [], 0
    for name, t in bucket:
        entries.append(FlatEntry(name, t.shape, t.dtype, start, start + t.numel(), t.numel()))
        start += t.numel()
    flat = torch.cat([t.reshape(-1) for _, t in bucket])  # (N,)
    return flat, entries


def unflatten_bucket(flat: torch.Tensor, entries: Iterable[FlatEntry]) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) list `flatten_bucket` was given; each tensor is a view into `flat`."""
    return [(e.name, flat[e.start_idx : e.end_idx].view(e.shape)) for e in entries]
