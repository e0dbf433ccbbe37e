"""`python -m zppo_fast.export RUN_DIR/checkpoints/step_N OUT_DIR`: a checkpoint as a transformers folder.

Reads the sharded model of a checkpoint (any world size wrote it) into one full model on the
CPU and writes safetensors, config and tokenizer, loadable with `from_pretrained` (and by
`--model.path`, the eval CLI, or a serving engine). The optimizer state is not read.

The weights are written in the dtype the checkpoint's config.json declares -- the model the run
started from (bfloat16 for Qwen3.5), not the float32 masters it trained -- or float32 when it
declares none; `--dtype` chooses another.

OUT_DIR is written under a temporary name beside it and moved into place when complete. An
existing OUT_DIR is replaced only when it is a previous export (or empty); a folder zppo_fast did
not make is never replaced or deleted (zppo_fast/ownership.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from zppo_fast import ownership
from zppo_fast.checkpoint import STATE_FILE, CheckpointError
from zppo_fast.cli import Parser
from zppo_fast.config import ConfigError
from zppo_fast.model import ModelLoadError, Policy, declared_dtype, load_tokenizer, model_from_config, save_model


def export(checkpoint: str | Path, out_dir: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write `checkpoint`'s model to `out_dir` in `dtype` (None: the dtype its config.json declares).

    The folder is written under a fresh temporary name beside `out_dir` (the same file system)
    and moved into place when complete. An existing `out_dir` is replaced only when it is empty
    or a previous export (it holds the ownership marker, zppo_fast/ownership.py); another folder
    zppo_fast made (a run folder, say) only with `overwrite`; anything else is refused, untouched,
    before the checkpoint is read."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not (checkpoint / STATE_FILE).is_file() or not (checkpoint / "dcp").is_dir():
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint folder (expected {STATE_FILE} and dcp/)")
    ownership.check_claim(out_dir, "export", overwrite=overwrite)
    if dtype is None:
        dtype = declared_dtype(checkpoint)
        print(f"writing {dtype} weights, as {checkpoint / 'config.json'} declares" if dtype else
              f"writing float32 weights: {checkpoint / 'config.json'} declares no dtype (--dtype chooses one)")
        dtype = dtype or "float32"
    policy = Policy(model_from_config(checkpoint, dtype))
    state = {"model": policy.state_dict()}
    try:
        dcp.load(state, checkpoint_id=checkpoint / "dcp")
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException; the path is what matters
        raise CheckpointError(f"cannot read the model shards in {checkpoint / 'dcp'}: {e}") from e
    policy.load_state_dict(state["model"])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = ownership.mark(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent), "export")
    try:
        save_model(policy.lm, load_tokenizer(checkpoint), tmp)
        ownership.check_claim(out_dir, "export", overwrite=overwrite)  # again: the write took a while
        ownership.replace(tmp, out_dir)
    finally:
        ownership.remove(tmp)  # left only when something failed
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = Parser("zppo_fast.export", __doc__)
    parser.add_argument("checkpoint", help="RUN_DIR/checkpoints/step_N")
    parser.add_argument("out_dir", help="folder to write: new, empty, or a previous export (replaced); "
                                        "any folder zppo_fast did not make is refused")
    parser.add_argument("--overwrite", action="store_true",
                        help="also replace another folder zppo_fast made (a run folder, say); never the user's own")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: the dtype the checkpoint's config.json declares (the source model's)")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out_dir, args.dtype, args.overwrite)
    except (CheckpointError, ModelLoadError, ConfigError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"exported {args.checkpoint} to {path}")


if __name__ == "__main__":
    main()
