"""`python -m zppo_fast.export RUN_DIR/checkpoints/step_N OUT_DIR`: a checkpoint as a transformers folder.

Reads the sharded model of a checkpoint (any world size wrote it) into one full model on the
CPU and writes safetensors, config and tokenizer, loadable with `from_pretrained` (and by
`--model.path`, the eval CLI, or a serving engine). The optimizer state is not read.

The weights are written in the dtype the checkpoint's config.json declares -- the model the run
started from (bfloat16 for Qwen3.5), not the float32 masters it trained -- or float32 when it
declares none; `--dtype` chooses another.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from zppo_fast.checkpoint import STATE_FILE, CheckpointError
from zppo_fast.cli import Parser
from zppo_fast.model import ModelLoadError, Policy, declared_dtype, load_tokenizer, model_from_config, save_model


def export(checkpoint: str | Path, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Write `checkpoint`'s model to `out_dir` in `dtype` (None: the dtype its config.json declares)."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not (checkpoint / STATE_FILE).is_file() or not (checkpoint / "dcp").is_dir():
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint folder (expected {STATE_FILE} and dcp/)")
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
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(policy.lm, load_tokenizer(checkpoint), tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = Parser("zppo_fast.export", __doc__)
    parser.add_argument("checkpoint", help="RUN_DIR/checkpoints/step_N")
    parser.add_argument("out_dir", help="folder to write (replaced if it exists)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: the dtype the checkpoint's config.json declares (the source model's)")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out_dir, args.dtype)
    except (CheckpointError, ModelLoadError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"exported {args.checkpoint} to {path}")


if __name__ == "__main__":
    main()
