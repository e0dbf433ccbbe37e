"""SGLang rollout engines colocated with FSDP training on the same GPUs.

Each training rank runs SGLang's offline `sglang.Engine` in its own process (the engine spawns its
scheduler processes on the GPUs its placement names): one student engine, re-synced with the
trained weights every step, and a frozen teacher engine. Engines and training time-share the GPU
memory: an engine releases its weights and KV cache while the trainer runs and takes them back
afterwards (SGLang's memory saver keeps the virtual addresses, so CUDA graphs stay valid).

The order of one step (`step_order`) is the one verl and slime use: generate → release →
train → resume the student's weights → push the weights → flush the cache → resume the KV cache,
so the weights are written before the KV cache is allocated again and peak memory stays at
max(training, weights + KV cache) rather than their sum. The teacher is resumed only in steps that
need teacher rollouts, compression or judging.

Every SGLang call here was checked against SGLang's source at sgl-project/sglang commit 001067ff
(`python/sglang/srt/entrypoints/engine.py`: `Engine(**server_args)`, `generate(input_ids=,
sampling_params=, image_data=, return_logprob=)`, `release_memory_occupation(tags)`,
`resume_memory_occupation(tags)`, `update_weights_from_tensor(named_tensors, load_format,
flush_cache)`, `flush_cache()`, `shutdown()`; `srt/weight_sync/tensor_bucket.py`:
`FlattenedTensorMetadata`; `srt/constants.py`: the "weights" / "kv_cache" tags), the 0.5.19
release line (it pins sglang-kernel 0.4.6.post1 and torch 2.13, as this project does), and
against SGLang's test `test/srt/rl/test_update_weights_from_tensor.py` for the flattened-bucket
payload. The `sglang` extra of setup.py names the same floor.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedTokenizerBase

from zppo_fast.engine import (
    KV_CACHE,
    MEMORY_TAGS,
    WEIGHTS,
    Bucket,
    Sample,
    SamplingParams,
    Timings,
    check_push,
    check_weight_names,
)
from zppo_fast.weight_sync import DEFAULT_BUCKET_BYTES, flatten_bucket

SGLANG_CHECKED = "0.5.19 (sgl-project/sglang commit 001067ff)"
INSTALL_HINT = "pip install zppo-fast[sglang]"

# Each engine on a node gets a block of PORT_STRIDE TCP ports: `port` at its start and
# `nccl_port` (SGLang's torch.distributed rendezvous) in its middle. SGLang's other channels
# between its processes are IPC files, so these two are the only TCP ports an engine binds.
PORT_STRIDE = 10
DEFAULT_BASE_PORT = 30000


def import_sglang():
    """The `sglang` module, or ImportError saying how to install it."""
    try:
        import sglang
    except ImportError as e:
        raise ImportError(f"the SGLang rollout engine needs the sglang package ({INSTALL_HINT}; checked "
                          f"against sglang {SGLANG_CHECKED}): {e}") from e
    return sglang


# --------------------------------------------------------------------------------------------
# Placement: which GPUs and ports each engine of a node uses (pure, testable without a GPU).


@dataclass(frozen=True)
class EnginePlacement:
    """Where one SGLang engine runs: GPUs base_gpu_id .. base_gpu_id + tp_size - 1 of the node."""

    role: str  # "student" | "teacher"
    base_gpu_id: int
    tp_size: int
    port: int
    nccl_port: int


class Placement(NamedTuple):
    student: EnginePlacement
    teacher: EnginePlacement | None  # None: this rank owns no teacher engine


def teacher_placement(mode: str, local_rank: int, local_world_size: int, gpus_per_node: int,
                      teacher_tp_size: int = 1, base_port: int = DEFAULT_BASE_PORT) -> Placement:
    """The engines a training rank owns, given where the teacher goes.

    Every rank owns a student engine with tp_size 1 on its own GPU (`local_rank`), since its
    weights come from that rank's trainer. The teacher:
    - "colocated": on the training GPUs too. With teacher_tp_size t, ranks whose local_rank is a
      multiple of t own a teacher engine spanning GPUs local_rank .. local_rank + t - 1; the others
      own none and send their teacher requests to the owner.
    - "dedicated": on the GPUs training does not use, local_world_size .. gpus_per_node - 1 (the
      paper's 6 + 2 per node); local ranks 0 .. k - 1 own the k = (gpus_per_node - local_world_size)
      / t teacher engines.
    Ports are distinct for every engine of the node: slot 2 * local_rank for the student, slot
    2 * local_rank + 1 for the teacher, PORT_STRIDE ports per slot from base_port.
    """
    if not 0 <= local_rank < local_world_size <= gpus_per_node:
        raise ValueError(f"need 0 <= local_rank < local_world_size <= gpus_per_node, got {local_rank}, "
                         f"{local_world_size}, {gpus_per_node}")
    if teacher_tp_size < 1:
        raise ValueError(f"teacher_tp_size must be >= 1, got {teacher_tp_size}")
    last_port = base_port + 2 * local_world_size * PORT_STRIDE
    if base_port < 1024 or last_port > 65535:
        raise ValueError(f"ports {base_port}..{last_port} needed by {local_world_size} ranks fall outside 1024..65535")

    def ports(slot: int) -> tuple[int, int]:
        port = base_port + slot * PORT_STRIDE
        return port, port + PORT_STRIDE // 2

    student = EnginePlacement("student", local_rank, 1, *ports(2 * local_rank))
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
    teacher = EnginePlacement("teacher", teacher_gpu, teacher_tp_size, *ports(2 * local_rank + 1)) if owns else None
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
# The engine.


@dataclass
class SGLangEngineConfig:
    model_path: str  # a Hugging Face folder: the student's (weights not read) or the teacher's
    placement: EnginePlacement
    mem_fraction_static: float = 0.35  # of the memory free at the engine's start: see mem_fraction_static()
    dtype: str = "bfloat16"
    bucket_bytes: int = DEFAULT_BUCKET_BYTES  # size of one flattened bucket of a weight push
    log_path: str | None = None  # where the engine's scheduler processes write; None: this process's stderr
    random_seed: int = 0
    extra_args: dict[str, Any] = field(default_factory=dict)  # more sglang ServerArgs fields


def engine_args(cfg: SGLangEngineConfig) -> dict[str, Any]:
    """The keyword arguments of `sglang.Engine` (SGLang's ServerArgs fields) for this engine."""
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
        "base_gpu_id": cfg.placement.base_gpu_id,
        "port": cfg.placement.port,
        "nccl_port": cfg.placement.nccl_port,
        "dtype": cfg.dtype,
        "random_seed": cfg.random_seed,
        "log_level": "error",
        **cfg.extra_args,
    }


class EngineDiedError(RuntimeError):
    """An engine process is gone or failed a call; the message names the engine and its log."""


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


@contextmanager
def _stdio_to(path: str | None) -> Iterator[None]:
    """Point fds 1 and 2 at `path` while SGLang spawns its processes, which inherit them."""
    if path is None:
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab") as log:
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


class SGLangEngine:
    """A `RolloutEngine` backed by an in-process `sglang.Engine` on the GPUs of its placement.

    expected: the HF parameter names and full shapes a push may carry (`weight_sync.weight_shapes`
        of the trainer's model); a bucket with any other name or shape fails before it is sent.
    Calls are serialized by a lock: a release or push requested while a generate is in flight on
    another thread waits for it to finish. Sampling log-probs are those SGLang reports: of the
    temperature-scaled distribution (SGLANG_RETURN_ORIGINAL_LOGPROB unset); with top_p < 1 they are
    not renormalized over the nucleus.
    """

    def __init__(self, cfg: SGLangEngineConfig, tokenizer: PreTrainedTokenizerBase,
                 expected: Mapping[str, torch.Size]):
        sglang = import_sglang()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.expected = dict(expected)
        p = cfg.placement
        self.name = f"SGLang {p.role} engine (GPUs {p.base_gpu_id}..{p.base_gpu_id + p.tp_size - 1}, port {p.port})"
        self.timings = Timings()
        self._lock = threading.Lock()
        self._released: set[str] = set()
        # A dummy-loaded student samples from random weights until its first complete push.
        self._weights_valid = p.role != "student"
        with _stdio_to(cfg.log_path):
            self._engine = sglang.Engine(**engine_args(cfg))
        self._child_pids = list(self._engine.get_all_child_pids())  # schedulers and detokenizer

    # -- liveness --------------------------------------------------------------------------

    def _log_hint(self) -> str:
        return f"its log: {self.cfg.log_path}" if self.cfg.log_path else "its log is this process's stderr"

    def _call(self, op: str, fn, *args, **kwargs):
        """Run one SGLang call, turning a failure into an error that names the engine and its log.

        The engine's processes are checked first: a request sent to a dead scheduler would wait
        for an answer that never comes.
        """
        dead = dead_pids(self._child_pids)
        if dead:
            raise EngineDiedError(f"{self.name}: process(es) {dead} exited before {op}; {self._log_hint()}")
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            died = " (an engine process died)" if dead_pids(self._child_pids) else ""
            raise EngineDiedError(f"{self.name}: {op} failed{died}: {type(e).__name__}: {e}; "
                                  f"{self._log_hint()}") from e

    # -- RolloutEngine ------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 images: Sequence[Any] | None = None) -> list[list[Sample]]:
        """n samples per prompt, grouped per prompt; `images[i]` (any form SGLang's `image_data`
        accepts: a path, PIL image, or a list of them) goes with prompts[i] for a VLM student."""
        if (params.temperature < 0 or not 0 < params.top_p <= 1 or params.n < 1 or params.max_new_tokens < 1
                or (params.top_k is not None and params.top_k < 0)):
            raise ValueError(f"invalid sampling parameters: {params}")
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        with self._lock, self.timings.measure("generate"):
            if self._released:
                raise RuntimeError(f"{self.name}: generate with {sorted(self._released)} released; resume first")
            if not self._weights_valid:
                raise RuntimeError(f"{self.name}: no complete weight push yet; its weights are random")
            # Each prompt is repeated n times as its own request rather than sent with SGLang's `n`:
            # the grouping is then ours to define, and the radix cache still computes the shared
            # prompt's KV once. Each request gets its own seed, derived from params.seed.
            flat = [p for p in prompts for _ in range(params.n)]
            eos = self.tokenizer.eos_token_id
            # SGLang's "no top-k" is -1 (it refuses 0).
            sampling = [{"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k or -1,
                         "max_new_tokens": params.max_new_tokens, "stop_token_ids": [eos],
                         "sampling_seed": params.seed * 1_000_003 + i} for i in range(len(flat))]
            kwargs = {}
            if images is not None:
                kwargs["image_data"] = [im for im in images for _ in range(params.n)]
            outs = self._call("generate", self._engine.generate, input_ids=flat, sampling_params=sampling,
                              return_logprob=True, **kwargs)
        samples = []
        for out in outs:
            ids, reason, logprobs = parse_output(out, self.name)
            samples.append(Sample(ids, self.tokenizer.decode(ids, skip_special_tokens=True), reason, logprobs))
        return [samples[i : i + params.n] for i in range(0, len(samples), params.n)]

    def release_memory(self, tags: Sequence[str] = MEMORY_TAGS) -> None:
        """Free the GPU memory of `tags` (KV cache first, then weights: the verl/slime order)."""
        tags = self._check_tags(tags)
        with self._lock, self.timings.measure("release"):
            todo = [t for t in (KV_CACHE, WEIGHTS) if t in tags and t not in self._released]
            if todo:
                self._call("release_memory_occupation", self._engine.release_memory_occupation, tags=todo)
                self._released.update(todo)

    def resume_memory(self, tags: Sequence[str] = MEMORY_TAGS) -> None:
        """Map the memory of `tags` back (weights before KV cache). The student's resumed weights
        hold garbage until the next push; the teacher's come back from their host copy."""
        tags = self._check_tags(tags)
        with self._lock, self.timings.measure("resume"):
            todo = [t for t in (WEIGHTS, KV_CACHE) if t in tags and t in self._released]
            if todo:
                self._call("resume_memory_occupation", self._engine.resume_memory_occupation, tags=todo)
                self._released.difference_update(todo)
                if WEIGHTS in todo and self.cfg.placement.role == "student":
                    self._weights_valid = False

    def update_weights(self, buckets: Iterable[Bucket], names: Collection[str] | None = None) -> None:
        """Push full tensors by HF name: one flattened bucket per `update_weights_from_tensor` call.

        Each bucket (one dtype, GPU tensors) is concatenated into one flat tensor that the engine
        maps by CUDA IPC and loads; `torch.cuda.ipc_collect()` after each bucket drops the IPC
        handles the engine has finished with, so the pushed copies do not pile up. The cache is
        flushed once at the end. With `names`, every name is checked before the first bucket is
        drawn; without, each bucket is checked before it is sent, and a bad name met after some
        buckets went out leaves the student unusable until a complete push (generate refuses).
        """
        if WEIGHTS in self._released:
            raise RuntimeError(f"{self.name}: push with the weights released; resume {WEIGHTS!r} first")
        if names is not None:
            check_weight_names(names, self.expected, self.name)
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

        try:  # CUDA IPC handles that name the device by UUID, so TP ranks map the right GPU
            from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
        except ImportError:  # the module's older home
            from sglang.srt.patch_torch import monkey_patch_torch_reductions
        monkey_patch_torch_reductions()
        with self._lock, self.timings.measure("push"), _expandable_segments_off():
            self._weights_valid = False
            for bucket in buckets:
                check_push(((n, t.shape) for n, t in bucket), self.expected, self.name)
                flat, entries = flatten_bucket(bucket)
                payload = {"flattened_tensor": flat,
                           "metadata": [FlattenedTensorMetadata(e.name, e.shape, e.dtype, e.start_idx, e.end_idx,
                                                                e.numel) for e in entries]}
                # One serialized copy per TP rank: each rank releases its own IPC reference.
                serialized = [MultiprocessingSerializer.serialize(payload, output_str=True)
                              for _ in range(self.cfg.placement.tp_size)]
                self._call("update_weights_from_tensor", self._engine.update_weights_from_tensor,
                           named_tensors=serialized, load_format="flattened_bucket", flush_cache=False)
                del flat, payload, serialized
                torch.cuda.ipc_collect()
            self._call("flush_cache", self._engine.flush_cache)
            self._weights_valid = True

    def pop_timings(self) -> dict[str, float]:
        return self.timings.pop()

    def shutdown(self) -> None:
        self._engine.shutdown()

    def _check_tags(self, tags: Sequence[str]) -> set[str]:
        unknown = set(tags) - set(MEMORY_TAGS)
        if unknown:
            raise ValueError(f"unknown memory tags {sorted(unknown)}; known: {list(MEMORY_TAGS)}")
        return set(tags)
