"""Parallelism, applied from outside the model: FSDP2 per decoder layer and at the root.

    policy = Policy(model_from_config(path, meta=True))      # parameters on the meta device
    parallelize(policy, dist.mesh, cfg.parallel, device)     # shard, then allocate only the shards
    load_full_state(policy, read_state_dict(path) if dist.is_main else None)   # rank 0 reads, all get theirs

Each decoder layer is its own FSDP2 unit (gathered for its forward and backward, resharded
after), the root unit holds the embedding, final norm and lm_head. On the GPU parameters compute
in bf16 and gradients reduce in fp32; the sharded master weights and AdamW states stay fp32.
Gradients are summed, not averaged, over ranks: each rank's loss is already divided by the token
count of the whole optimizer step, so the sum is that step's gradient at any world size.

Vision-language students (zppo_fast/vlm.py): `get_decoder()` is the text decoder
(`model.language_model` of Qwen3_5ForConditionalGeneration), so its layers are the per-layer units
as for a text model; the vision tower (`model.visual`: patch embedding, blocks, merger) stays in the
root unit, on purpose. A micro-batch without images skips the tower, so on one rank the tower runs
and on another it does not: a unit of its own would all-gather on the first rank only (a hang).
In the root it is gathered with the root on every forward, and `set_reduce_scatter_unused_params`
makes a rank that did not use it reduce zeros, so every rank's reduce-scatter holds the same
tensors. The cost: the tower's full weights (and gradients) are held on every rank while the root
is gathered, through the forward and backward of each micro-batch, like the embedding and lm_head.
"""

from __future__ import annotations

import functools

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from zppo_fast.config import ParallelConfig
from zppo_fast.model import DTYPES, Policy


def parallelize(policy: Policy, mesh: DeviceMesh, cfg: ParallelConfig, device: torch.device) -> Policy:
    """Shard `policy` in place over `mesh` and allocate its shards on `device`."""
    param_dtype = cfg.param_dtype if cfg.param_dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=torch.float32)
    for layer in policy.lm.get_decoder().layers:
        if cfg.activation_checkpointing:
            # Wrapping the instance's forward (not the module) keeps parameter names unchanged;
            # FSDP2 gathers the layer again before its backward, where the recompute runs.
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
        if cfg.compile:
            layer.compile()
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(policy, mesh=mesh, mp_policy=mp)
    if getattr(policy.lm.config, "vision_config", None) is not None:
        policy.set_reduce_scatter_unused_params(True)  # image-less micro-batches leave the tower unused
    for module in policy.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    buffers = {name: b.clone() for name, b in policy.named_buffers()}
    policy.to_empty(device=device)
    with torch.no_grad():
        for name, b in policy.named_buffers():
            b.copy_(buffers[name])
    return policy


def load_full_state(policy: Policy, state: dict[str, torch.Tensor] | None) -> None:
    """Fill the sharded `policy.lm` from a full state dict that only rank 0 needs to hold.

    Rank 0 passes the checkpoint's tensors (transformers names), the other ranks None; each rank
    keeps its own shards of what rank 0 broadcasts.
    """
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    if state is not None:
        expected = set(policy.lm.state_dict())
        missing = sorted(expected - state.keys())
        unknown = sorted(state.keys() - expected)
        tied = {k for k in missing if k.endswith("lm_head.weight")} if policy.lm.config.tie_word_embeddings else set()
        if set(missing) - tied or unknown:
            raise ValueError(f"state dict does not match the model: missing {missing[:5]}, unknown {unknown[:5]}")
        for k in tied:
            state[k] = state[k.replace("lm_head", "model.embed_tokens")]
    set_model_state_dict(policy.lm, state or {}, options=options)
