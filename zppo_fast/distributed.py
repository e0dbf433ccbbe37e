"""The process group and the few collectives the trainer needs, from torchrun's environment.

    dist = init_distributed("auto")      # NCCL on CUDA, gloo on the CPU; world size 1 without torchrun

Every run has a process group, even a single `python -m zppo_fast.train` (world size 1 over an
in-memory store), so the trainer has one code path: FSDP2, checkpoints and data-parallel rollouts
behave the same at one rank as at 64. Everything the trainer decides (questions, advantages,
replay-buffer admissions) is computed from data every rank holds in full, so the only
collectives are the gathers and sums below, FSDP2's own, and DCP's.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def cpu_threads(requested: int, processes: int | None = None) -> int:
    """Intra-op threads for one of `processes` processes sharing this machine's cores (default: the
    ranks torchrun starts on it): `requested`, but no more than its share of the cores it may run on,
    since threads beyond the cores wait on each other (OpenMP hand-offs) instead of working."""
    processes = processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(requested, cores // max(processes, 1)))


@dataclass
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        torch_dist.barrier()

    def all_gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (pickled; for token lists and small records)."""
        out = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj, src: int = 0):
        box = [obj]
        torch_dist.broadcast_object_list(box, src=src)
        return box[0]

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Sum of each key over ranks; every rank must pass the same keys."""
        if self.world_size == 1 or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        torch_dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def max(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return float(t.item())

    def shard(self, n: int) -> range:
        """This rank's contiguous share of n items; shares differ in size by at most one."""
        return range(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> Distributed:
    """Join (or create) the default process group and build a 1-D data-parallel device mesh.

    Under torchrun the environment gives RANK, WORLD_SIZE and LOCAL_RANK; without it this process
    is a world of one. `device` is "auto" (CUDA when present), "cuda" or "cpu".
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise ValueError(f"run.device must be auto, cuda or cpu, got {device!r}")
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not torch_dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        kwargs = {"timeout": timedelta(seconds=timeout_s)}
        if "MASTER_ADDR" not in os.environ:  # not under torchrun: a world of one needs no rendezvous
            if world_size != 1:
                raise RuntimeError(f"WORLD_SIZE={world_size} without MASTER_ADDR: start multi-rank runs with torchrun")
            kwargs.update(store=torch_dist.HashStore(), rank=0, world_size=1)
        torch_dist.init_process_group(backend, **kwargs)
    mesh = init_device_mesh(dev.type, (world_size,), mesh_dim_names=("dp",))
    return Distributed(rank, world_size, local_rank, dev, mesh)


def destroy_distributed() -> None:
    """Destroys the process group. Call it after dropping the model and mesh: a gloo work item
    that outlives the group until interpreter shutdown frees its tensors there and aborts the
    process (pytorch/pytorch#190489; seen here as SIGABRT after a successful FSDP2 run)."""
    if torch_dist.is_initialized():
        gc.collect()  # module graphs hold reference cycles: free them while Python still runs
        torch_dist.destroy_process_group()
