"""Per-step metrics: metrics.jsonl in the run folder, TensorBoard when installed, Weights & Biases
when asked for (`run.wandb`), a console line.

W&B runs offline unless the environment says otherwise (WANDB_MODE=online): it writes
RUN_DIR/wandb/offline-run-*/ and never opens a connection; `wandb sync RUN_DIR/wandb/offline-run-*`
uploads it later. Each record is logged with its `step` as the charts' x axis. A resumed run
continues the same W&B run (its id is kept in RUN_DIR/wandb/run_id); steps logged after the
checkpoint before the interruption stay in W&B's history beside their replays (metrics.jsonl drops them).
"""

from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path

import torch


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLogger:
    """Appends one JSON object per step; a resumed run truncates lines past its checkpoint."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None, *,
                 wandb: bool = False, wandb_project: str = "zppo_fast", config: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is an optional extra
                pass
        self.wandb = start_wandb(Path(run_dir), wandb_project, config, resume_step is not None) if wandb else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: (None if isinstance(v, float) and math.isnan(v) else v)
                                   for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
            # finish() returns before W&B's writer process has flushed the run's file; teardown waits for it,
            # so the offline folder is complete (ready for `wandb sync`) when close() returns.
            import_wandb().teardown()


def import_wandb():
    """The wandb module, or ImportError saying how to get it (`run.wandb = true` asked for it)."""
    try:
        import wandb
    except ImportError:
        raise ImportError("run.wandb = true needs the wandb package: pip install wandb (or, in a checkout, "
                          "pip install -e '.[wandb]'); metrics.jsonl and TensorBoard need nothing extra") from None
    return wandb


def start_wandb(run_dir: Path, project: str, config: dict | None, resume: bool):
    """A W&B run writing under RUN_DIR/wandb, offline unless WANDB_MODE says otherwise; on resume the
    run whose id RUN_DIR/wandb/run_id holds."""
    # Set in the environment, not only passed to init(): W&B's process-wide settings (its usage
    # telemetry among them, which otherwise contacts the W&B server) read the mode from there.
    os.environ.setdefault("WANDB_MODE", "offline")
    wandb = import_wandb()
    id_file = run_dir / "wandb" / "run_id"
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
    settings = None
    if run_id:
        # W&B names a run's folder by its start second and id, so a resume within the same second
        # would write into (and truncate) the earlier segment's log: each segment gets a part number.
        parts = len(list(id_file.parent.glob(f"*-{run_id}*")))
        settings = wandb.Settings(x_sync_dir_suffix=f"part{parts + 1}")
    run = wandb.init(project=project, name=run_dir.name, dir=str(run_dir), config=config, id=run_id,
                     resume="allow" if run_id else None, settings=settings)
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run.id + "\n")
    run.define_metric("step")
    run.define_metric("*", step_metric="step")  # the trainer's step, not W&B's call counter, is the x axis
    return run
