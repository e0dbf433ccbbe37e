"""SGLang rollout engines colocated with FSDP training on the same GPUs, each in a process of its own.

Each training rank owns a student engine (re-synced with the trained weights every step) and,
depending on the placement, a frozen teacher engine. Each engine is SGLang's offline
`sglang.Engine` inside an `EngineProcess` child (`zppo_fast.engine_process`): its own environment
(torchrun's variables removed, CUDA_VISIBLE_DEVICES set to its GPUs), its own log file, signal
handlers and process group; SGLang's scheduler processes are that child's children. The trainer
talks to it through `start_sglang_engine`, which returns a `RolloutEngine`. Engines and training
time-share the GPU memory: an engine releases its weights and KV cache while the trainer runs and
takes them back afterwards (SGLang's memory saver keeps the virtual addresses, so CUDA graphs stay
valid).

The order of one step (`step_order`) is the one verl and slime use: generate → release →
train → resume the student's weights → push the weights → flush the cache → resume the KV cache,
so the weights are written before the KV cache is allocated again and peak memory stays at
max(training, weights + KV cache) rather than their sum. The teacher is resumed only in steps that
need teacher rollouts, compression or judging.

Every push is checked: each `update_weights_from_tensor` returns (success, message) and
`flush_cache` a status with `success`, both asserted (`check_sglang_result`); SGLang's loader only
logs a warning for a name it does not know, so the trainer also compares the engine's sampling
log-probs with its own on a fixed prompt after the first push (`engine.check_push_took_effect`).
Reading tensors back with `get_weights_by_name` is no check for Qwen3.5: SGLang implements it for
a few models only (llama, granite, opt, exaone4 in 0.5.19) and answers None for the others.
Tensors keep their dtype in the push (fp32 buckets for fp32 parameters such as Gated-DeltaNet's
A_log, which SGLang's Qwen3.5 also keeps in fp32), as `weight_sync.iter_weight_buckets` groups them.

Seeds: SGLang uses a request's `sampling_seed` only with deterministic inference on
(`enable_deterministic_inference`; `SamplingBatchInfo` builds the seed tensor only then, and the
sampler then draws with `multinomial_with_seed`); otherwise sampling follows the GPU's global
generator and rollouts are not reproducible. `rollout.reproducible = true` turns deterministic
inference on (batch-invariant kernels, slower); the engine log states which mode runs.

Images (VLM students): SGLang decodes and re-tokenizes a prompt whose images are raw (paths, PIL
images), which can change its ids. The engine instead sends each prompt's images already run
through the model's processor (`{"format": "processor_output", pixel_values, image_grid_thw}`) with
the prompt ids: SGLang then keeps the ids as given (`load_mm_data`'s fast path for preprocessed
data). Each answer's `prompt_tokens` is compared with the prompt's length, and a GPU test compares
the ids themselves. A VLM engine never samples the vision special tokens: each request carries a
`logit_bias` pushing them out (`request_sampling`). That parameter was read in SGLang's source at
sgl-project/sglang commits 00c17caf and 009db01a (`SamplingParams.logit_bias: Dict[str, float]`,
token ids as strings; `SamplingBatchInfo` builds a (batch, vocab) bias from them and
`apply_logits_bias` adds it to the logits the sampler and its log-probs read), not in the 0.5.19
wheel, and has not run on a GPU here yet.

Every SGLang call here was checked against SGLang's source: `python/sglang/srt/entrypoints/engine.py`
at sgl-project/sglang commit 001067ff and in the 0.5.19 wheel (`Engine(**server_args)`,
`generate(input_ids=, sampling_params=, image_data=, return_logprob=)`,
`release_memory_occupation(tags)`, `resume_memory_occupation(tags)`,
`update_weights_from_tensor(named_tensors, load_format, flush_cache)` -> (success, message),
`flush_cache()` -> FlushCacheReqOutput(success, message), `get_all_child_pids()`, `shutdown()`),
`srt/weight_sync/tensor_bucket.py` (`FlattenedTensorMetadata`), `srt/constants.py` (the "weights" /
"kv_cache" tags), `srt/models/registry.py` (`ModelRegistry.get_supported_archs()`), and SGLang's
test `test/srt/rl/test_update_weights_from_tensor.py` for the flattened-bucket payload. Qwen3.5's
classes (`Qwen3_5ForConditionalGeneration`, `Qwen3_5MoeForConditionalGeneration`) are registered
from SGLang 0.5.9 on (0.5.8 has no qwen3_5 module); the text-only `Qwen3_5ForCausalLM` is defined
but not registered (up to 0.5.19 at least), so a text-only Qwen3.5 folder cannot be served and is
refused at start (`check_architectures`). The `sglang` extra of setup.py pins the 0.5 line from 0.5.19,
the release these calls were checked against (it pins sglang-kernel 0.4.6.post1 and torch 2.13, as
this project does).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch

from zppo_fast.engine import (
    KV_CACHE,
    MEMORY_TAGS,
    WEIGHTS,
    Bucket,
    EngineDiedError,
    Sample,
    SamplingParams,
    check_push,
    check_weight_names,
)
from zppo_fast.engine_process import EngineProcess, reserve_port
from zppo_fast.weight_sync import DEFAULT_BUCKET_BYTES, flatten_bucket

SGLANG_CHECKED = "0.5.19 (sgl-project/sglang commit 001067ff)"
INSTALL_HINT = 'pip install -e ".[sglang]" (in a checkout of zppo_fast)'
log = logging.getLogger(__name__)


def import_sglang():
    """The `sglang` module, or ImportError saying how to install it."""
    try:
        import sglang
    except ImportError as e:
        raise ImportError(f"the SGLang rollout engine needs the sglang package ({INSTALL_HINT}; checked "
                          f"against sglang {SGLANG_CHECKED}): {e}") from e
    return sglang


# --------------------------------------------------------------------------------------------
# Placement: which GPUs each engine of a node uses (pure, testable without a GPU).


@dataclass(frozen=True)
class EnginePlacement:
    """Where one SGLang engine runs: GPUs base_gpu_id .. base_gpu_id + tp_size - 1 of the node.

    Its process sees exactly these GPUs (CUDA_VISIBLE_DEVICES), as cuda:0 .. cuda:tp_size - 1.
    Its TCP ports are not part of the placement: `start_sglang_engine` reserves free ones.
    """

    role: str  # "student" | "teacher"
    base_gpu_id: int
    tp_size: int

    @property
    def gpus(self) -> list[int]:
        return list(range(self.base_gpu_id, self.base_gpu_id + self.tp_size))


class Placement(NamedTuple):
    student: EnginePlacement
    teacher: EnginePlacement | None  # None: this rank owns no teacher engine


def teacher_placement(mode: str, local_rank: int, local_world_size: int, gpus_per_node: int,
                      teacher_tp_size: int = 1) -> Placement:
    """The engines a training rank owns, given where the teacher goes.

    Every rank owns a student engine with tp_size 1 on its own GPU (`local_rank`), since its
    weights come from that rank's trainer. The teacher:
    - "colocated": on the training GPUs too. With teacher_tp_size t, ranks whose local_rank is a
      multiple of t own a teacher engine spanning GPUs local_rank .. local_rank + t - 1; the others
      own none and send their teacher requests to the owner.
    - "dedicated": on the GPUs training does not use, local_world_size .. gpus_per_node - 1 (the
      paper's 6 + 2 per node); local ranks 0 .. k - 1 own the k = (gpus_per_node - local_world_size)
      / t teacher engines.
    """
    if not 0 <= local_rank < local_world_size <= gpus_per_node:
        raise ValueError(f"need 0 <= local_rank < local_world_size <= gpus_per_node, got {local_rank}, "
                         f"{local_world_size}, {gpus_per_node}")
    if teacher_tp_size < 1:
        raise ValueError(f"teacher_tp_size must be >= 1, got {teacher_tp_size}")
    student = EnginePlacement("student", local_rank, 1)
    if mode == "colocated":
        if local_world_size % teacher_tp_size:
            raise ValueError(f"colocated teacher: teacher_tp_size {teacher_tp_size} must divide the "
                             f"{local_world_size} training GPUs of a node")
        owns = local_rank % teacher_tp_size == 0
        teacher_gpu = local_rank
    elif mode == "dedicated":
        spare = gpus_per_node - local_world_size
        if spare < teacher_tp_size or spare % teacher_tp_size:
            raise ValueError(f"dedicated teacher: the {spare} GPUs left by {local_world_size} training ranks "
                             f"on a {gpus_per_node}-GPU node must be a positive multiple of teacher_tp_size "
                             f"{teacher_tp_size}")
        owns = local_rank < spare // teacher_tp_size
        teacher_gpu = local_world_size + local_rank * teacher_tp_size
    else:
        raise ValueError(f"teacher_placement must be 'colocated' or 'dedicated', got {mode!r}")
    teacher = EnginePlacement("teacher", teacher_gpu, teacher_tp_size) if owns else None
    return Placement(student, teacher)


def mem_fraction_static(static_bytes: int, free_bytes_at_start: int) -> float:
    """SGLang's `mem_fraction_static` that gives an engine `static_bytes` of weights + KV cache.

    SGLang measures the GPU memory free when the engine starts (before it loads weights) and
    sizes its KV pool as free_after_loading - free_at_start * (1 - fraction): weights + KV cache
    come to fraction * free_at_start. So the fraction is of the memory free at start, not of the
    card: an engine started after another engine (or after the trainer) allocated memory gets a
    smaller share for the same fraction. Start engines before the trainer allocates, and size the
    student and teacher fractions against the free memory each one sees.
    """
    if not 0 < static_bytes < free_bytes_at_start:
        raise ValueError(f"the engine's {static_bytes} bytes must be positive and below the "
                         f"{free_bytes_at_start} bytes free at its start")
    return static_bytes / free_bytes_at_start


# --------------------------------------------------------------------------------------------
# The step order (pure): which engine does what, in which order.


class Action(NamedTuple):
    engine: str  # "student" | "teacher" | "trainer"
    op: str  # "generate" | "release" | "resume" | "push" | "flush_cache" | "train"
    tags: tuple[str, ...] = ()


def step_order(needs_teacher: bool) -> list[Action]:
    """One training step's engine actions, in order.

    Both engines start a step with everything resident for the student and everything released
    for the teacher. `push` sends the weights without flushing; `flush_cache` follows once, since
    the prefix cache holds KV computed by the old weights.
    """
    order = [Action("student", "generate")]
    if needs_teacher:
        order += [Action("teacher", "resume", (WEIGHTS, KV_CACHE)),
                  Action("teacher", "generate"),  # teacher rollouts, compression, judging
                  Action("teacher", "release", (KV_CACHE, WEIGHTS)),
                  Action("student", "generate")]  # rollouts on the reformulated (BCQ/NCQ) prompts
    order += [Action("student", "release", (KV_CACHE, WEIGHTS)),
              Action("trainer", "train"),
              Action("student", "resume", (WEIGHTS,)),
              Action("student", "push"),
              Action("student", "flush_cache"),
              Action("student", "resume", (KV_CACHE,))]
    return order


# --------------------------------------------------------------------------------------------
# The engine's configuration and the checks around it (pure, testable without a GPU).


@dataclass
class SGLangEngineConfig:
    model_path: str  # a Hugging Face folder: the student's (weights not read) or the teacher's
    placement: EnginePlacement
    mem_fraction_static: float = 0.35  # of the memory free at the engine's start: see mem_fraction_static()
    dtype: str = "bfloat16"
    bucket_bytes: int = DEFAULT_BUCKET_BYTES  # size of one flattened bucket of a weight push
    log_path: str | None = None  # the engine process's log (SGLang's processes too); None: the trainer's stderr
    random_seed: int = 0
    # SGLang's deterministic inference: the only mode in which it uses each request's sampling_seed,
    # so the only one in which rollouts are reproducible (batch-invariant kernels, slower).
    deterministic: bool = False
    processor_path: str | None = None  # a VLM's processor folder when model_path lacks it (a checkpoint)
    # (min, max) pixels per image for that processor (zppo_fast.vlm.set_image_pixels); SGLang gets the
    # processor's output, so these are the bounds its images have
    image_pixels: tuple[int | None, int | None] = (None, None)
    port: int | None = None  # None: reserved by start_sglang_engine
    nccl_port: int | None = None
    extra_args: dict[str, Any] = field(default_factory=dict)  # more sglang ServerArgs fields


def engine_args(cfg: SGLangEngineConfig) -> dict[str, Any]:
    """The keyword arguments of `sglang.Engine` (SGLang's ServerArgs fields) for this engine, as
    its process sees the world: its GPUs are cuda:0 .. tp_size - 1."""
    student = cfg.placement.role == "student"
    return {
        "model_path": cfg.model_path,
        # Token ids in and out: the trainer owns the tokenizer, so SGLang loads none.
        "skip_tokenizer_init": True,
        # The student's weights arrive by push before its first generate: reading them from disk
        # would be wasted time. The teacher's are read once and never pushed.
        "load_format": "dummy" if student else "auto",
        # Memory saver: release/resume free and re-map the physical memory behind fixed virtual
        # addresses, which is what lets training reuse it between rollouts.
        "enable_memory_saver": True,
        # The teacher's weights are never pushed, so releasing them must keep a host copy that
        # resume restores; the student's are overwritten by every push, so a backup is wasted.
        "enable_weights_cpu_backup": not student,
        "mem_fraction_static": cfg.mem_fraction_static,
        "tp_size": cfg.placement.tp_size,
        "base_gpu_id": 0,  # CUDA_VISIBLE_DEVICES of the engine's process names its GPUs
        "port": cfg.port,
        "nccl_port": cfg.nccl_port,
        "dtype": cfg.dtype,
        "random_seed": cfg.random_seed,
        "enable_deterministic_inference": cfg.deterministic,
        "log_level": "error",
        **cfg.extra_args,
    }


def model_architectures(folder: str | Path) -> list[str]:
    """config.json's "architectures" of a Hugging Face folder; ValueError naming the file if absent."""
    path = Path(folder) / "config.json"
    try:
        archs = json.loads(path.read_text()).get("architectures")
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the model's architectures: {e}") from e
    if not archs:
        raise ValueError(f'{path}: no "architectures" list: SGLang picks its model class from it')
    return list(archs)


def check_architectures(folder: str | Path, supported: Collection[str], version: str) -> None:
    """Raise ValueError unless one of `folder`'s architectures is among SGLang's `supported` ones."""
    archs = model_architectures(folder)
    if any(a in supported for a in archs):
        return
    qwen = sorted(a for a in supported if a.startswith("Qwen3_5"))
    hint = (" SGLang registers Qwen3.5 only as the image-text-to-text model (" + ", ".join(qwen) + "): its "
            "text-only Qwen3_5ForCausalLM class is not registered; serve the full Qwen3.5 folder (with its "
            "vision tower) or use rollout.engine = transformers." if any(a.startswith("Qwen3_5") for a in archs)
            else "")
    raise ValueError(f"{Path(folder) / 'config.json'}: architectures {archs} are not served by the installed "
                     f"SGLang {version} ({len(supported)} registered architectures).{hint}")


def check_sglang_result(op: str, result: Any, engine: str) -> None:
    """Raise RuntimeError unless an SGLang control call reports success: `(success, message)` from
    update_weights_from_tensor, an object with `.success` / `.message` from flush_cache."""
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], bool):
        ok, message = result
    elif hasattr(result, "success"):
        ok, message = result.success, getattr(result, "message", "")
    else:
        raise RuntimeError(f"{engine}: {op} returned {result!r}, not a success status")
    if not ok:
        raise RuntimeError(f"{engine}: {op} failed: {message or '(no message)'}")


# The logit bias that keeps a token from ever being sampled: finite, so it survives any serialization of
# the request, and far below any logit (exp of it is 0 in every float format).
FORBIDDEN_BIAS = -1e9


def request_sampling(params: SamplingParams, eos: int, forbidden: Sequence[int], count: int) -> list[dict[str, Any]]:
    """SGLang sampling params of `count` requests (the n copies of each prompt, in order): request i
    draws with sampling_seed params.seed * 1_000_003 + i. `forbidden` (a VLM's vision special tokens,
    `zppo_fast.vlm.vision_token_ids`) get `FORBIDDEN_BIAS` through SGLang's `logit_bias` (token id
    as a string -> bias, added to the logits before temperature and sampling), so they are never
    sampled; the log-probs SGLang reports are then of that masked distribution (see engine.py).
    """
    # SGLang's "no top-k" is -1 (it refuses 0).
    base = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k or -1,
            "max_new_tokens": params.max_new_tokens, "stop_token_ids": [eos], "presence_penalty": params.presence_penalty}
    if forbidden:
        base["logit_bias"] = {str(t): FORBIDDEN_BIAS for t in forbidden}
    return [{**base, "sampling_seed": params.seed * 1_000_003 + i} for i in range(count)]


def parse_output(out: dict, engine: str) -> tuple[list[int], str, list[float]]:
    """(token ids, finish reason, per-token log-probs) of one `sglang.Engine.generate` output.

    `meta_info.output_token_logprobs` holds one (logprob, token id, text or None) per generated
    token, EOS included, so it gives both the ids and their log-probs.
    """
    meta = out["meta_info"]
    reason = (meta.get("finish_reason") or {}).get("type")
    if reason not in ("stop", "length"):
        raise EngineDiedError(f"{engine}: a request ended with finish_reason {meta.get('finish_reason')!r}")
    entries = meta["output_token_logprobs"]
    return [int(e[1]) for e in entries], reason, [float(e[0]) for e in entries]


def dead_pids(pids: Iterable[int]) -> list[int]:
    """The processes among `pids` that have exited (gone, or zombies not yet reaped); Linux /proc."""
    dead = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]  # the field after "(comm)"
        except FileNotFoundError:
            state = "X"
        if state in ("Z", "X"):
            dead.append(pid)
    return dead


# --------------------------------------------------------------------------------------------
# The push's transport: CUDA IPC handles made in the trainer, opened by SGLang's schedulers.


@contextmanager
def _expandable_segments_off() -> Iterator[None]:
    """Allocate with plain cudaMalloc segments while a push runs.

    Tensors sent to the engine travel by CUDA IPC, and memory from PyTorch's expandable segments
    (virtual-memory mapped) cannot be exported that way; the setting is restored afterwards.
    """
    on = "expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if on:
        torch.cuda.memory._set_allocator_settings("expandable_segments:False")
    try:
        yield
    finally:
        if on:
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")


@dataclass
class IpcBucket:
    """One flattened bucket as the engine's process receives it: what it holds, and one serialized
    payload (the flat tensor's CUDA IPC handle + SGLang's FlattenedTensorMetadata) per TP rank."""

    items: list[tuple[str, tuple[int, ...]]]
    payloads: list[str]


class IpcBucketReader:
    def decode(self, message: tuple) -> IpcBucket:
        return IpcBucket(*message)


class CudaIpcTransport:
    """The trainer's side of a push into an SGLang engine (see `EngineProcess`'s transports).

    Each bucket (one dtype, GPU tensors) is concatenated into one flat tensor and serialized with
    SGLang's own serializer, once per TP rank (each rank releases its own IPC reference). The flat
    tensor is kept until the engine asks for the next bucket (it has loaded this one), then
    `torch.cuda.ipc_collect()` drops the handles the engine is done with, so copies do not pile up.
    SGLang's reduction patch names a tensor's device by UUID: the engine's process numbers its GPUs
    from 0, the trainer's does not. These are the only parts of SGLang the trainer imports; importing
    the package applies its transformers compatibility patches and cache-folder defaults there too.
    """

    def __init__(self, tp_size: int):
        self.tp_size = tp_size
        self._inflight: torch.Tensor | None = None

    @contextmanager
    def push_context(self) -> Iterator[None]:
        try:  # CUDA IPC handles that name the device by UUID, so TP ranks map the right GPU
            from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
        except ImportError:  # the module's older home
            from sglang.srt.patch_torch import monkey_patch_torch_reductions
        monkey_patch_torch_reductions()
        with _expandable_segments_off():
            yield

    def encode(self, bucket: Bucket) -> tuple:
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

        flat, entries = flatten_bucket(bucket)
        payload = {"flattened_tensor": flat,
                   "metadata": [FlattenedTensorMetadata(e.name, e.shape, e.dtype, e.start_idx, e.end_idx, e.numel)
                                for e in entries]}
        serialized = [MultiprocessingSerializer.serialize(payload, output_str=True) for _ in range(self.tp_size)]
        self._inflight = flat
        return [(e.name, tuple(e.shape)) for e in entries], serialized

    def release(self) -> None:
        if self._inflight is not None:
            self._inflight = None
            torch.cuda.ipc_collect()

    def child(self) -> IpcBucketReader:
        return IpcBucketReader()

    def close(self) -> None:
        self._inflight = None


# --------------------------------------------------------------------------------------------
# The engine: `SGLangEngine` runs in the engine's process; the trainer starts it with
# `start_sglang_engine`.


def start_sglang_engine(cfg: SGLangEngineConfig, expected: Mapping[str, torch.Size],
                        timeout_s: float | None = None) -> EngineProcess:
    """Start one SGLang engine in a process of its own and return it as a `RolloutEngine`.

    Its TCP ports are reserved here (`reserve_port`) unless `cfg` names them. Fails (ValueError from
    the engine's start, naming config.json) when the installed SGLang does not serve the folder's
    architecture. `expected`: the HF names and full shapes a push may carry (`weight_sync.weight_shapes`
    of the trainer's model; empty for a teacher, which is never pushed).
    """
    cfg = replace(cfg, port=cfg.port or reserve_port(), nccl_port=cfg.nccl_port or reserve_port())
    p = cfg.placement
    name = f"SGLang {p.role} engine (GPUs {p.base_gpu_id}..{p.base_gpu_id + p.tp_size - 1})"
    return EngineProcess(partial(SGLangEngine, cfg, dict(expected)), name, gpus=p.gpus, log_path=cfg.log_path,
                         transport=CudaIpcTransport(p.tp_size), timeout_s=timeout_s)


class SGLangEngine:
    """A `RolloutEngine` backed by `sglang.Engine`; built inside its `EngineProcess` child.

    expected: the HF parameter names and full shapes a push may carry; a bucket with any other
        name or shape fails before it is loaded.
    Sampling log-probs are those SGLang reports: of the temperature-scaled distribution
    (SGLANG_RETURN_ORIGINAL_LOGPROB unset); with top_p < 1 they are not renormalized over the nucleus;
    a VLM's are of the distribution without its vision tokens (`request_sampling`).
    """

    def __init__(self, cfg: SGLangEngineConfig, expected: Mapping[str, torch.Size]):
        from zppo_fast.model import load_tokenizer
        from zppo_fast.vlm import load_processor, vision_token_ids

        sglang = import_sglang()
        self.cfg, self.expected = cfg, dict(expected)
        p = cfg.placement
        self.name = f"SGLang {p.role} engine (GPUs {p.base_gpu_id}..{p.base_gpu_id + p.tp_size - 1})"
        self._released: set[str] = set()
        # A dummy-loaded student samples from random weights until its first complete push.
        self._weights_valid = p.role != "student"
        self.tokenizer = load_tokenizer(cfg.model_path)
        config_path = Path(cfg.model_path) / "config.json"
        config = json.loads(config_path.read_text())
        vlm = "vision_config" in config
        self.processor = load_processor(cfg.processor_path or cfg.model_path, cfg.image_pixels) if vlm else None
        # Token ids a response must not hold: a VLM's image / video placeholders and their delimiters.
        self.forbidden = vision_token_ids(config, str(config_path)) if vlm else []
        try:
            from sglang.srt.models.registry import ModelRegistry
        except ImportError as e:
            log.warning("cannot read SGLang's model registry (%s): the architecture of %s is not checked "
                        "before the engine starts", e, cfg.model_path)
        else:
            check_architectures(cfg.model_path, set(ModelRegistry.get_supported_archs()), sglang.__version__)
        log.warning("%s: rollouts are %s", self.name,
                    "reproducible: deterministic inference is on, each request's sampling_seed is used"
                    if cfg.deterministic else "not reproducible: deterministic inference is off, so SGLang "
                    "ignores sampling_seed (rollout.reproducible = true turns it on)")
        self._engine = sglang.Engine(**engine_args(cfg))
        self._child_pids = list(self._engine.get_all_child_pids())  # schedulers and detokenizer

    def _call(self, op: str, fn, *args, **kwargs):
        """Run one SGLang call, turning a failure into an error that names the engine.

        The scheduler processes are checked first: a request sent to a dead scheduler would wait
        for an answer that never comes.
        """
        dead = dead_pids(self._child_pids)
        if dead:
            raise EngineDiedError(f"{self.name}: SGLang process(es) {dead} exited before {op}")
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            died = " (an SGLang process died)" if dead_pids(self._child_pids) else ""
            raise EngineDiedError(f"{self.name}: {op} failed{died}: {type(e).__name__}: {e}") from e

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 images: Sequence[Sequence[Any]] | None = None) -> list[list[Sample]]:
        """n samples per prompt, grouped per prompt; `images[i]` (a VLM student's) is prompts[i]'s
        list of images, whose expanded placeholders the prompt ids hold (`zppo_fast.vlm.vlm_prompt`)."""
        if (params.temperature < 0 or not 0 < params.top_p <= 1 or params.n < 1 or params.max_new_tokens < 1
                or (params.top_k is not None and params.top_k < 0)):
            raise ValueError(f"invalid sampling parameters: {params}")
        if self._released:
            raise RuntimeError(f"{self.name}: generate with {sorted(self._released)} released; resume first")
        if not self._weights_valid:
            raise RuntimeError(f"{self.name}: no complete weight push yet; its weights are random")
        kwargs, image_data = {}, self._image_data(prompts, images) if images is not None else None
        if image_data is not None:
            kwargs["image_data"] = [d for d in image_data for _ in range(params.n)]
        # Each prompt is computed once: a prefill-only request per prompt (max_new_tokens 0) puts it
        # in SGLang's radix cache first, so its n sampling requests find it there (copies arriving in
        # one batch would otherwise each prefill it). This is what SGLang does itself for a request
        # with `n` (TokenizerManager._handle_batch_request); we send the n requests ourselves because
        # each needs its own sampling_seed (with `n` every copy shares one: identical samples under
        # deterministic inference), derived from params.seed, and the grouping is then ours.
        if params.n > 1:
            self._call("generate (prefill)", self._engine.generate, input_ids=prompts,
                       sampling_params={"max_new_tokens": 0},
                       **({} if image_data is None else {"image_data": image_data}))
        flat = [p for p in prompts for _ in range(params.n)]
        eos = self.tokenizer.eos_token_id
        sampling = request_sampling(params, eos, self.forbidden, len(flat))
        outs = self._call("generate", self._engine.generate, input_ids=flat, sampling_params=sampling,
                          return_logprob=True, **kwargs)
        samples = []
        for i, (prompt, out) in enumerate(zip(flat, outs)):
            seen = out["meta_info"].get("prompt_tokens")
            if seen != len(prompt):
                raise RuntimeError(f"{self.name}: request {i} was sampled from {seen} prompt tokens, but the "
                                   f"trainer sent {len(prompt)}: SGLang changed the prompt ids")
            ids, reason, logprobs = parse_output(out, self.name)
            samples.append(Sample(ids, self.tokenizer.decode(ids, skip_special_tokens=True), reason, logprobs))
        return [samples[i : i + params.n] for i in range(0, len(samples), params.n)]

    def prompt_ids(self, prompts: list[list[int]], images: Sequence[Sequence[Any]] | None = None) -> list[list[int]]:
        """The ids SGLang runs each prompt as (from its prompt log-probs): for tests that check it
        samples from exactly the trainer's ids."""
        kwargs = {} if images is None else {"image_data": self._image_data(prompts, images)}
        outs = self._call("generate", self._engine.generate, input_ids=prompts, return_logprob=True,
                          logprob_start_len=0, sampling_params={"max_new_tokens": 1, "temperature": 0.0}, **kwargs)
        return [[int(e[1]) for e in out["meta_info"]["input_token_logprobs"]] for out in outs]

    def release_memory(self, tags: Sequence[str] = MEMORY_TAGS) -> None:
        """Free the GPU memory of `tags` (KV cache first, then weights: the verl/slime order)."""
        tags = self._check_tags(tags)
        todo = [t for t in (KV_CACHE, WEIGHTS) if t in tags and t not in self._released]
        if todo:
            self._call("release_memory_occupation", self._engine.release_memory_occupation, tags=todo)
            self._released.update(todo)

    def resume_memory(self, tags: Sequence[str] = MEMORY_TAGS) -> None:
        """Map the memory of `tags` back (weights before KV cache). The student's resumed weights
        hold garbage until the next push; the teacher's come back from their host copy."""
        tags = self._check_tags(tags)
        todo = [t for t in (WEIGHTS, KV_CACHE) if t in tags and t in self._released]
        if todo:
            self._call("resume_memory_occupation", self._engine.resume_memory_occupation, tags=todo)
            self._released.difference_update(todo)
            if WEIGHTS in todo and self.cfg.placement.role == "student":
                self._weights_valid = False

    def update_weights(self, buckets: Iterable[IpcBucket], names: Collection[str] | None = None) -> None:
        """Load pushed buckets (from `CudaIpcTransport`): one `update_weights_from_tensor` call each,
        its (success, message) asserted, then one `flush_cache`, asserted too.

        With `names`, every name is checked before the first bucket is drawn; each bucket's names
        and shapes are checked before it is loaded. A failure after some buckets were loaded leaves
        the student unusable until a complete push (generate refuses).
        """
        if WEIGHTS in self._released:
            raise RuntimeError(f"{self.name}: push with the weights released; resume {WEIGHTS!r} first")
        if names is not None:
            check_weight_names(names, self.expected, self.name)
        self._weights_valid = False
        for bucket in buckets:
            check_push(((n, torch.Size(s)) for n, s in bucket.items), self.expected, self.name)
            result = self._call("update_weights_from_tensor", self._engine.update_weights_from_tensor,
                                named_tensors=bucket.payloads, load_format="flattened_bucket", flush_cache=False)
            check_sglang_result("update_weights_from_tensor", result, self.name)
        check_sglang_result("flush_cache", self._call("flush_cache", self._engine.flush_cache), self.name)
        self._weights_valid = True

    def shutdown(self) -> None:
        self._engine.shutdown()

    def _image_data(self, prompts: list[list[int]], images: Sequence[Sequence[Any]]) -> list[list[dict] | None]:
        """Per prompt, its images as the processor's output, the form in which SGLang keeps the
        prompt's ids as given (raw images make it decode and re-tokenize them); None: no images."""
        from zppo_fast.vlm import encode_images

        if self.processor is None:
            raise ValueError(f"{self.name}: images given, but {self.cfg.model_path} has no vision tower")
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts (give [] for a prompt "
                             "without images)")
        data = []
        for i, (prompt, imgs) in enumerate(zip(prompts, images)):
            enc = encode_images(self.processor, imgs, prompt, where=f"prompt {i}")
            data.append(None if enc is None else [{"format": "processor_output", "pixel_values": enc.pixel_values,
                                                   "image_grid_thw": enc.image_grid_thw}])
        return data

    def _check_tags(self, tags: Sequence[str]) -> set[str]:
        unknown = set(tags) - set(MEMORY_TAGS)
        if unknown:
            raise ValueError(f"unknown memory tags {sorted(unknown)}; known: {list(MEMORY_TAGS)}")
        return set(tags)
