"""Students and teachers: a tiny Qwen3.5 built from a config, or any Hugging Face checkpoint folder.

Both paths return a transformers causal LM and its fast tokenizer, so the rest of the trainer
never knows which it has. The trainer runs the decoder (`model.model`) to get hidden states and
applies the lm_head weight inside the fused loss, so no [tokens, vocab] logits are materialized.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from zppo_fast.config import ModelConfig

# The reference (non-CUDA) Gated DeltaNet path is the right one on a CPU; one warning per kernel
# on every run would only be noise.
transformers.logging.set_verbosity_error()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model path that does not hold a loadable model; the message names the path and the cause."""


def build_tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """A Qwen3.5-architecture causal LM of a few hundred thousand to a few million parameters.

    Layers follow Qwen3.5's pattern of three Gated-DeltaNet (linear attention) layers per full
    attention layer, with the partial rotary embedding of the real config.
    """
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    h = cfg.hidden_size
    pattern = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]
    config = Qwen3_5TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=h,
        intermediate_size=3 * h,
        num_hidden_layers=cfg.num_layers,
        layer_types=[pattern[i % 4] for i in range(cfg.num_layers)],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=h // 4,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=h // 4,
        linear_value_head_dim=h // 4,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        dtype=cfg.dtype,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3_5ForCausalLM(config)
    return model.to(DTYPES[cfg.dtype])


def load_model(path: str | Path, dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local Hugging Face folder (never from the network)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"model path {path} has no config.json: not a Hugging Face model folder")
    try:
        json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config_file} is not valid JSON: {e}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
    except Exception as e:  # transformers raises many types; the user needs the path and the cause
        raise ModelLoadError(f"cannot load model from {path}: {type(e).__name__}: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """Write a folder that `load_model` and transformers' from_pretrained both read (safetensors)."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
