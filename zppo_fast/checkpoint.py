"""Checkpoints: RUN_DIR/checkpoints/step_N, written by all ranks, resumable at any world size.

    step_N/
      dcp/                 torch.distributed.checkpoint: each rank writes its shards of the model
                           and AdamW state; loading reshards to the reader's world size
      config.json, tokenizer files    the model's architecture, so the checkpoint is self-describing
      trainer_state.pt     step, data position, replay buffer, RNG (rank 0 writes it)

A checkpoint is written under step_N.tmp and renamed by rank 0 after every rank has finished,
so a crash (even kill -9 of one rank) never leaves a half checkpoint that looks whole: only
folders named step_<digits> holding trainer_state.pt count. `python -m zppo_fast.export` turns
one into a transformers folder. Each step_N holds the ownership marker (zppo_fast/ownership.py):
only marked folders are ever pruned (`run.keep_last`) or replaced.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from zppo_fast import ownership

STATE_FILE = "trainer_state.pt"
# Keys of config.json that do not describe the architecture (they may differ between a
# checkpoint and the model it came from without making them incompatible).
_VOLATILE_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "_name_or_path", "architectures", "use_cache"}


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or incompatible; the message names the path."""


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(run_dir: Path) -> list[int]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.glob("step_*")
                  if p.name[5:].isdigit() and (p / STATE_FILE).is_file())


def latest_checkpoint(run_dir: Path) -> Path:
    steps = complete_checkpoints(run_dir)
    if not steps:
        raise CheckpointError(f"no complete checkpoint under {Path(run_dir) / 'checkpoints'}")
    return Path(run_dir) / "checkpoints" / f"step_{steps[-1]}"


def save_checkpoint(run_dir: Path, step: int, policy, optimizer, tokenizer, state: dict, dist,
                    keep_last: int = 2, config_dtype: str | None = None) -> Path:
    """Write step `step` collectively (every rank calls this); returns the final folder.

    config_dtype: the dtype config.json declares, the source model's (`model.declared_dtype`), which
    `zppo_fast.export` writes by default; None keeps the training weights' (e.g. float32 masters)."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    if dist.is_main:
        ownership.claim(tmp, "checkpoint")  # a leftover of a crashed save is emptied; a folder of the user's refused
    dist.barrier()
    model_state, optim_state = get_state_dict(policy, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp / "dcp")
    if dist.is_main:
        policy.lm.config.save_pretrained(tmp)
        if config_dtype is not None:
            config_file = tmp / "config.json"
            config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "dtype": config_dtype},
                                              indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(tmp)
        torch.save({**state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
        ownership.replace(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            prune(root / f"step_{old}")
    dist.barrier()
    return final


def prune(folder: Path) -> None:
    """Delete an old checkpoint, if zppo_fast wrote it (it holds the ownership marker; checkpoints
    from before the marker existed are kept, with a warning, rather than guessed at)."""
    if ownership.kind_of(folder) == "checkpoint":
        ownership.remove(folder)
    else:
        warnings.warn(f"not deleting old checkpoint {folder}: it has no {ownership.MARKER} marker (written by an "
                      "older zppo_fast, or not by zppo_fast); delete it yourself if it is not needed", stacklevel=2)


def read_trainer_state(path: Path) -> dict:
    try:
        state = torch.load(path / STATE_FILE, weights_only=False)
    except Exception as e:  # torch.load raises many types on a damaged file
        raise CheckpointError(f"checkpoint {path / STATE_FILE} is corrupt: {e}") from e
    if not isinstance(state, dict) or not {"step", "rng", "data"} <= state.keys():
        raise CheckpointError(f"checkpoint {path / STATE_FILE} is missing trainer state keys")
    return state


def check_architecture(path: Path, source: Path) -> None:
    """Refuse a checkpoint whose model config differs from the model the run is configured with."""
    def arch(folder: Path) -> dict:
        try:
            cfg = json.loads((folder / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read {folder / 'config.json'}: {e}") from e
        return {k: v for k, v in cfg.items() if k not in _VOLATILE_CONFIG_KEYS}

    mine, theirs = arch(source), arch(path)
    diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if diff:
        shown = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs model {mine.get(k)!r}" for k in diff[:4])
        raise CheckpointError(f"checkpoint {path} is from a different model config ({shown})")


def load_sharded(path: Path, policy, optimizer) -> None:
    """Load model and optimizer shards of `path` into the (already sharded) policy and optimizer."""
    model_state, optim_state = get_state_dict(policy, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        dcp.load(state, checkpoint_id=path / "dcp")
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException, raised for any rank's failure
        raise CheckpointError(f"checkpoint {path / 'dcp'} cannot be loaded (corrupt or incomplete shard?): "
                              f"{str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}") from e
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
