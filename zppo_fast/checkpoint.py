"""Checkpoints: RUN_DIR/checkpoints/step_N holds the model as a transformers folder (safetensors,
config, tokenizer) plus `trainer_state.pt` (optimizer, RNG states, data position, step, replay
buffer). A checkpoint is written under a temporary name and renamed when complete, so a crash
never leaves a half checkpoint that looks whole; `latest` only ever sees complete ones.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from zppo_fast.model import load_model, save_model

STATE_FILE = "trainer_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt; the message names the path."""


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, state: dict, keep_last: int = 2) -> Path:
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, tokenizer, tmp)
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(complete_checkpoints(run_dir))[:-keep_last]:
        shutil.rmtree(root / f"step_{old}", ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[int]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.glob("step_*")
                  if p.name[5:].isdigit() and (p / STATE_FILE).is_file())


def load_checkpoint(run_dir: Path, dtype: str = "float32"):
    """(model, tokenizer, state) of the latest complete checkpoint of `run_dir`."""
    steps = complete_checkpoints(run_dir)
    if not steps:
        raise CheckpointError(f"no complete checkpoint under {Path(run_dir) / 'checkpoints'}")
    path = Path(run_dir) / "checkpoints" / f"step_{steps[-1]}"
    try:
        state = torch.load(path / STATE_FILE, weights_only=False)
        model, tokenizer = load_model(path, dtype)
    except Exception as e:  # torch.load and from_pretrained raise many types on a damaged file
        raise CheckpointError(f"checkpoint {path} is corrupt: {e}") from e
    if not isinstance(state, dict) or not {"step", "optimizer", "rng"} <= state.keys():
        raise CheckpointError(f"checkpoint {path / STATE_FILE} is missing trainer state keys")
    return model, tokenizer, state
