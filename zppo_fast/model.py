"""Students and teachers: a tiny Qwen3.5 built from a config, or any Hugging Face checkpoint folder.

Both paths return a transformers causal LM and its fast tokenizer, so the rest of the trainer
never knows which it has. The trained student is wrapped in `Policy`, whose forward runs the
decoder on a packed micro-batch and returns hidden states; the lm_head weight goes into the fused
loss, so no [tokens, vocab] logits are materialized. `model_from_config(meta=True)` builds a
model whose parameters live on the meta device, for FSDP2 to shard before memory is allocated.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from zppo_fast.config import ModelConfig
from zppo_fast.packing import MicroBatch, segment_mixers

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
    path = _model_folder(path)
    return from_folder(AutoModelForCausalLM, path, "model", dtype=DTYPES[dtype]), load_tokenizer(path)


def from_folder(auto_class, path: Path, what: str, **kwargs) -> Any:
    """`auto_class.from_pretrained(path, **kwargs)` on a local folder (model, tokenizer or
    processor), its failures as ModelLoadError naming `what` and the path."""
    try:
        return auto_class.from_pretrained(path, local_files_only=True, **kwargs)
    except Exception as e:  # transformers raises many types; the user needs the path and the cause
        raise ModelLoadError(f"cannot load {what} from {path}: {type(e).__name__}: {e}") from e


def _model_folder(path: str | Path) -> Path:
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
    return path


def declared_dtype(path: str | Path) -> str | None:
    """The dtype a model folder's config.json declares ("dtype", or transformers 4's "torch_dtype"; at
    the top level, else in its text_config): the precision it is published in, e.g. bfloat16 for
    Qwen3.5. None when it declares none of `DTYPES`."""
    config = json.loads((_model_folder(path) / "config.json").read_text())
    for part in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if part.get(key) in DTYPES:
                return part[key]
    return None


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    tokenizer = from_folder(AutoTokenizer, _model_folder(path), "the tokenizer")
    if len(tokenizer) < 2:  # some tokenizer classes build an empty one when the files are missing
        raise ModelLoadError(f"the tokenizer in {path} has {len(tokenizer)} token(s): no tokenizer files there")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """Write a folder that `load_model` and transformers' from_pretrained both read (safetensors)."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder's safetensors files (one file or an indexed set)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"model path {path} has no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(f))
        except Exception as e:  # safetensors raises its own error type on a truncated or foreign file
            raise ModelLoadError(f"cannot read {f}: {e}") from e
    return state


@contextlib.contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device but buffers for real.

    Rotary `inv_freq` and similar buffers are computed in `__init__` and are not in the
    checkpoint, so they must be built for real; parameters are filled from the checkpoint later.
    """
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def attention_kernel(setting: str, device: torch.device, share_prefix: bool = False) -> str:
    """The transformers `attn_implementation` for `parallel.attention` on `device`; with the
    shared-prefix layout on CUDA, FlexAttention (its mask is a block mask, see zppo_fast/shared_prefix.py)."""
    if setting != "auto":
        return setting
    if device.type == "cuda" and share_prefix:
        return "flex_attention"
    return "flash_attention_2" if device.type == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"


def model_from_config(path: str | Path, dtype: str = "float32", *, meta: bool = False,
                      device: torch.device | str = "cpu", attention: str | None = None) -> PreTrainedModel:
    """The causal LM described by `path`/config.json with freshly initialized weights, or with
    its parameters on the meta device (no memory) for FSDP2 to shard and fill. A config with a
    vision tower builds the image-text-to-text model (`zppo_fast.vlm`), not its text half.
    `attention`: a transformers attn_implementation (None: transformers' default)."""
    path = _model_folder(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises many types; the user needs the path and the cause
        raise ModelLoadError(f"cannot read the model config in {path}: {type(e).__name__}: {e}") from e
    from transformers import AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    with _parameters_on_meta() if meta else torch.device(device):
        return auto.from_config(config, dtype=DTYPES[dtype], **({"attn_implementation": attention} if attention else {}))


# Attention kernels that take the shared-prefix layout's mask: a dense bool mask (SDPA) or a block mask (flex).
SHARED_PREFIX_ATTENTION = ("sdpa", "flex_attention")


class Policy(nn.Module):
    """The trained student as the trainer sees it: a micro-batch in, hidden states out.

    It is FSDP2's root module, so its forward gathers the embedding, final norm and lm_head,
    and the lm_head weight stays gathered for the fused loss that follows (the root does not
    reshard after forward; the backward reduces its gradient with the rest of the root's).
    """

    def __init__(self, lm: PreTrainedModel):
        super().__init__()
        self.lm = lm
        segment_mixers(lm)

    def forward(self, mb: MicroBatch) -> torch.Tensor:
        """(N, H) hidden states of the positions that predict `mb.targets`."""
        h = self.lm.get_decoder()(**mb.model_kwargs(self.attention(mb))).last_hidden_state  # (B, T, H)
        return h.reshape(-1, h.shape[-1])[mb.hidden_index]

    def attention(self, mb: MicroBatch) -> str:
        """The model's attention kernel, which must take `mb`'s layout."""
        kernel = self.lm.config._attn_implementation
        if mb.shared is not None and kernel not in SHARED_PREFIX_ATTENTION:
            raise ValueError(f"a shared-prefix micro-batch needs attention {' or '.join(SHARED_PREFIX_ATTENTION)} "
                             f"(its mask is not causal), the model runs {kernel!r}: set parallel.attention")
        return kernel

    @property
    def lm_head(self) -> torch.Tensor:
        return self.lm.get_output_embeddings().weight  # (V, H)
