"""A rollout engine in a child process of its own, behind the `RolloutEngine` interface.

    engine = EngineProcess(partial(build_transformers_engine, folder, "student"), "student engine",
                           gpus=[local_rank], log_path=run_dir / "logs/student.log")
    engine.generate(prompts, params)          # runs in the child; the samples come back pickled
    engine.update_weights(buckets, names)     # tensors travel through shared memory (or CUDA IPC)
    engine.shutdown()                         # ends the child's process group, nothing else

Why a process: an inference engine in the trainer's process shares its environment, logging and
signal handlers. SGLang, for one, resets the root logger, sets NCCL/CUDA variables for the whole
process, publishes one engine configuration per process (a second engine overwrites the first),
installs a SIGQUIT handler that kills the caller's whole process tree when a scheduler fails, and
its schedulers inherit torchrun's TORCHELASTIC_USE_AGENT_STORE, under which their own
`init_process_group` opens its TCP store as a client only and waits for a server that never
starts. Here every engine lives in a child started with `subprocess.Popen`:

- its own environment (`engine_environment`): torchrun's variables removed, CUDA_VISIBLE_DEVICES
  set to the engine's GPUs, nothing of the trainer's environment changed;
- its own session and process group (`start_new_session`), so `shutdown` can end the engine and
  everything it started (SGLang's schedulers) with one `killpg`, and never touches the trainer's
  other children (the other engine, the grader's worker);
- its own log file (stdout and stderr of the child and of everything it starts);
- a socket pair as the only channel; every wait on it polls, and checks between polls whether the
  child is still alive, so a dead engine becomes `EngineDiedError` (with the tail of its log) in
  the trainer instead of a hang. The child is killed when the trainer dies (PR_SET_PDEATHSIG).

Weights travel by a transport: `SharedMemoryTransport` writes CPU copies into a file in /dev/shm
that both processes map; SGLang's engine uses CUDA IPC handles made in the trainer instead
(`zppo_fast.sglang_engine.CudaIpcTransport`). A push streams: the child's engine draws buckets from
an iterator that asks the trainer for the next one, so each side holds about one bucket at a time
and the engine keeps its own checks (names before the first bucket, shapes before loading).
"""

from __future__ import annotations

import builtins
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from zppo_fast.engine import MEMORY_TAGS, Bucket, EngineDiedError, Sample, SamplingParams, Timings

# Variables torchrun sets in each worker. An engine's processes must not see them: torch reads
# TORCHELASTIC_USE_AGENT_STORE in every init_process_group (SGLang's schedulers call it with their
# own tcp:// rendezvous) and the rest describe the trainer's world, not the engine's.
TORCHRUN_VARIABLES = frozenset({
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
})
TORCHRUN_PREFIXES = ("TORCHELASTIC_",)

POLL_S = 1.0  # how often a wait on the child checks that it is alive


def engine_environment(gpus: Sequence[int] | None = None, extra: Mapping[str, str] | None = None,
                       base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment an engine child starts with: `base` (default: this process's) without
    torchrun's variables, CUDA_VISIBLE_DEVICES naming `gpus` (node-local indices, mapped through
    this process's own CUDA_VISIBLE_DEVICES when it has one), then `extra`."""
    base = os.environ if base is None else base
    env = {k: v for k, v in base.items() if k not in TORCHRUN_VARIABLES and not k.startswith(TORCHRUN_PREFIXES)}
    if gpus is not None:
        visible = base.get("CUDA_VISIBLE_DEVICES")
        physical = [v.strip() for v in visible.split(",")] if visible else None
        if physical is not None and max(gpus, default=-1) >= len(physical):
            raise ValueError(f"GPUs {list(gpus)} requested, but CUDA_VISIBLE_DEVICES={visible!r} shows "
                             f"{len(physical)} device(s)")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(physical[g] if physical else str(g) for g in gpus)
    env.update(extra or {})
    return env


def reserve_port(host: str = "127.0.0.1") -> int:
    """A free TCP port that stays reserved until an engine binds it.

    The port is bound, connected to once and closed from the accepting side, which leaves it in
    TIME_WAIT for the kernel's TIME_WAIT period (60 s on Linux): `bind(port 0)` elsewhere does not
    hand it out during that time, while a listener that sets SO_REUSEADDR (torch's TCPStore, so
    SGLang's rendezvous on `nccl_port`) can bind it at once. Engines start well within that time.
    """
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((host, 0))
        server.listen(1)
        address = server.getsockname()
        with socket.socket() as client:
            client.connect(address)
            accepted, _ = server.accept()
            accepted.close()  # the accepting side closes first: the TIME_WAIT is on `address`
    return address[1]


# --------------------------------------------------------------------------------------------
# Transports: how a bucket of (name, tensor) gets from the trainer to the engine's process.


class SharedMemoryTransport:
    """Buckets copied into one file in /dev/shm that the trainer and the child both map.

    The trainer writes each tensor at a 64-byte aligned offset; the child reads views of the same
    pages and copies them out (`decode`), since the buffer is rewritten by the next bucket. The
    file grows to the largest bucket and is removed by `close`.
    """

    ALIGN = 64

    def __init__(self):
        self.path: str | None = None
        self.size = 0
        self._buffer: torch.Tensor | None = None

    def push_context(self):
        return nullcontext()

    def encode(self, bucket: Bucket) -> tuple:
        entries, offset = [], 0
        for name, t in bucket:
            entries.append((name, tuple(t.shape), str(t.dtype).removeprefix("torch."), offset))
            offset += -(-t.numel() * t.element_size() // self.ALIGN) * self.ALIGN
        if offset > self.size:
            self._grow(offset)
        for (name, shape, _, start), (_, t) in zip(entries, bucket):
            nbytes = t.numel() * t.element_size()
            self._buffer[start : start + nbytes].view(t.dtype).view(t.shape).copy_(t)
        return self.path, self.size, entries

    def release(self) -> None:
        """Nothing to free: the next bucket reuses the buffer once the child asked for it."""

    def child(self) -> SharedMemoryReader:
        return SharedMemoryReader()

    def close(self) -> None:
        if self.path is not None:
            Path(self.path).unlink(missing_ok=True)
            self.path, self.size, self._buffer = None, 0, None

    def _grow(self, nbytes: int) -> None:
        # The child may still map the old file: unlinking it keeps that mapping valid.
        self.close()
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, self.path = tempfile.mkstemp(prefix="zppo_engine_push_", dir=folder)
        try:
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
        self.size = nbytes
        self._buffer = torch.from_file(self.path, shared=True, size=nbytes, dtype=torch.uint8)


class SharedMemoryReader:
    """The child's side of `SharedMemoryTransport`: a bucket of tensors copied out of the file."""

    def __init__(self):
        self._maps: dict[str, torch.Tensor] = {}

    def decode(self, message: tuple) -> Bucket:
        path, size, entries = message
        if path not in self._maps:
            self._maps = {path: torch.from_file(path, shared=True, size=size, dtype=torch.uint8)}
        buffer = self._maps[path]
        out = []
        for name, shape, dtype, start in entries:
            dtype = getattr(torch, dtype)
            numel = 1
            for s in shape:
                numel *= s
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            out.append((name, buffer[start : start + nbytes].view(dtype).view(shape).clone()))
        return out


# --------------------------------------------------------------------------------------------
# The trainer's side.


class EngineProcess:
    """A `RolloutEngine` whose engine is `factory()` in a child process (see the module docstring).

    factory: a picklable callable (a top-level function or a functools.partial of one) that builds
        the engine in the child; the child gets this process's sys.path to import it.
    gpus: node-local GPU indices the child sees (as cuda:0, cuda:1, ...); None leaves
        CUDA_VISIBLE_DEVICES as it is.
    log_path: the file the child's stdout and stderr go to (appended); None: the trainer's.
    timeout_s: the longest any one call may take (None: as long as the child lives); a start
        waits up to start_timeout_s.
    The child is killed when the thread that started it ends (PR_SET_PDEATHSIG follows the
    creating thread, not the process): start engines from the main thread, as the trainer does.
    Timings ("generate", "release", "resume", "push") are the trainer's wall time of each call.
    """

    def __init__(self, factory: Callable[[], Any], name: str, *, gpus: Sequence[int] | None = None,
                 log_path: str | Path | None = None, env: Mapping[str, str] | None = None,
                 transport: Any = None, start_timeout_s: float = 1800.0, timeout_s: float | None = None):
        self.name, self.log_path, self.timeout_s = name, None if log_path is None else str(log_path), timeout_s
        self.transport = SharedMemoryTransport() if transport is None else transport
        self.timings = Timings()
        # One call at a time on the channel: a release asked for while another thread's generate
        # runs waits for it, as it would with the engine in this process.
        self._lock = threading.RLock()
        self._dead: str | None = None
        parent, child = socket.socketpair()
        log = None
        if self.log_path is not None:
            Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
            log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "zppo_fast.engine_process", str(child.fileno()), str(os.getpid())],
                pass_fds=(child.fileno(),), env=engine_environment(gpus, env), start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT if log else None)
        finally:
            child.close()
            if log is not None:
                log.close()
        self.pid = self.process.pid  # also its process group: start_new_session made it a group leader
        self._conn = Connection(parent.detach())
        # Ends the engine's process group if the trainer exits (or drops this object) without shutdown.
        self._finalizer = weakref.finalize(self, _end_group, self.pid, self.process, self._conn, self.transport)
        try:
            self._send(list(sys.path))
            self._send((factory, self.transport.child()))
            self._result(self._receive("start", start_timeout_s), "start")
        except BaseException:
            self.shutdown()
            raise

    # -- RolloutEngine ----------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 images: Sequence[Sequence[Any]] | None = None) -> list[list[Sample]]:
        with self.timings.measure("generate"):
            return self.call("generate", prompts, params, **({} if images is None else {"images": images}))

    def release_memory(self, tags: Sequence[str] = MEMORY_TAGS) -> None:
        with self.timings.measure("release"):
            self.call("release_memory", tuple(tags))

    def resume_memory(self, tags: Sequence[str] = MEMORY_TAGS) -> None:
        with self.timings.measure("resume"):
            self.call("resume_memory", tuple(tags))

    def update_weights(self, buckets: Iterable[Bucket], names: Collection[str] | None = None) -> None:
        """Stream the push: the child's engine asks for each bucket as it draws it. On a failure
        (the engine refused a bucket, or died) the rest of the buckets are still drawn, as every
        other rank draws them: gathering sharded weights is a collective, and a rank that stopped
        early would leave the others waiting."""
        pending = iter(buckets)
        with self._lock, self.timings.measure("push"), self.transport.push_context():
            try:
                self._send(("push", None if names is None else list(names)))
                while True:
                    try:
                        message = self._receive("update_weights", self.timeout_s)
                    finally:
                        self.transport.release()  # the child is done with the previous bucket (or gone)
                    if message[0] != "next":
                        return self._result(message, "update_weights")
                    bucket = next(pending, None)
                    self._send(("end",) if bucket is None else ("bucket", self.transport.encode(bucket)))
            except Exception:
                for _ in pending:
                    pass
                raise

    def pop_timings(self) -> dict[str, float]:
        return self.timings.pop()

    def call(self, method: str, *args, **kwargs) -> Any:
        """Run `engine.method(*args, **kwargs)` in the child and return its (pickled) result."""
        if method.startswith("_"):
            raise ValueError(f"{self.name}: {method!r} is private")
        with self._lock:
            self._send(("call", method, args, kwargs))
            return self._result(self._receive(method, self.timeout_s), method)

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Shut the engine down, then end its process group: the child and all it started."""
        with self._lock:
            if self._dead is None and self.process.poll() is None:
                try:
                    self._send(("shutdown",))
                    self._receive("shutdown", timeout_s)
                except (EngineDiedError, OSError):
                    pass
            self._dead = self._dead or "it was shut down"
            self._finalizer()

    # -- the channel ----------------------------------------------------------------------

    def _send(self, message: Any) -> None:
        if self._dead is not None:
            raise EngineDiedError(f"{self.name}: not running ({self._dead}); {self._log_hint()}")
        try:
            self._conn.send(message)
        except OSError as e:
            raise self._died("a send", e) from e

    def _receive(self, op: str, timeout_s: float | None) -> tuple:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                if self._conn.poll(POLL_S):
                    return self._conn.recv()
            except (EOFError, OSError) as e:
                raise self._died(op, e) from e
            if self.process.poll() is not None:
                raise self._died(op)
            if deadline is not None and time.monotonic() > deadline:
                self._dead = f"{op} took longer than {timeout_s:.0f} s"
                self._finalizer()
                raise EngineDiedError(f"{self.name}: {op} took longer than {timeout_s:.0f} s; the engine was "
                                      f"stopped; {self._log_hint()}")

    def _result(self, message: tuple, op: str) -> Any:
        if message[0] == "ok":
            return message[1]
        if message[0] != "error":
            raise EngineDiedError(f"{self.name}: unexpected reply {message[0]!r} to {op}")
        _, kind, text = message
        # The engine's own errors keep their type (a bad push is a ValueError in either process).
        exc = EngineDiedError if kind == "EngineDiedError" else getattr(builtins, kind, None)
        if not (isinstance(exc, type) and issubclass(exc, Exception)):
            exc, text = RuntimeError, f"{kind}: {text}"
        raise exc(f"{text} [{self.name}, {op}; traceback in {self._log_hint()}]")

    def _died(self, op: str, cause: BaseException | None = None) -> EngineDiedError:
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        how = ("is not answering" if code is None else
               f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}")
        self._dead = f"its process {self.pid} {how}"
        self._finalizer()
        return EngineDiedError(f"{self.name}: its process {self.pid} {how} during {op}"
                               f"{f' ({type(cause).__name__})' if cause else ''}; {self._log_hint()}{self._log_tail()}")

    def _log_hint(self) -> str:
        return f"its log: {self.log_path}" if self.log_path else "its log is the trainer's stderr"

    def _log_tail(self, nbytes: int = 2000) -> str:
        if self.log_path is None or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(self.log_path) - nbytes))
            return "\nlast lines of the log:\n" + f.read().decode(errors="replace")


def _end_group(pgid: int, process: subprocess.Popen, conn: Connection, transport: Any) -> None:
    """SIGKILL the engine's process group (the child and everything it started), then reap."""
    conn.close()
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    transport.close()


# --------------------------------------------------------------------------------------------
# The child's side: python -m zppo_fast.engine_process FD PARENT_PID


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the trainer dies; exit now if it already has."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the closed channel still ends the serve loop
    if os.getppid() != parent_pid:
        os._exit(1)


def serve(conn: Connection) -> None:
    """Build the engine, then answer calls until shutdown or until the trainer goes away."""
    log = logging.getLogger("zppo_fast.engine_process")
    sys.path[:] = conn.recv()
    factory, reader = conn.recv()
    try:
        engine = factory()
    except Exception as e:
        log.exception("engine start failed")
        conn.send(("error", type(e).__name__, str(e)))
        return
    log.info("engine ready: %s (pid %d)", getattr(engine, "name", type(engine).__name__), os.getpid())
    conn.send(("ok", None))

    def pulled() -> Iterator[Bucket]:
        while True:
            conn.send(("next",))
            message = conn.recv()
            if message[0] == "end":
                return
            yield reader.decode(message[1])

    while True:
        try:
            message = conn.recv()
        except EOFError:  # the trainer is gone
            message = ("shutdown",)
        try:
            if message[0] == "shutdown":
                if hasattr(engine, "shutdown"):
                    engine.shutdown()
                conn.send(("ok", None))
                return
            if message[0] == "push":
                result = engine.update_weights(pulled(), message[1])
            else:
                _, method, args, kwargs = message
                result = getattr(engine, method)(*args, **kwargs)
            conn.send(("ok", result))
        except (BrokenPipeError, ConnectionResetError):
            return
        except Exception as e:
            log.error("%s failed:\n%s", message[0] if message[0] != "call" else message[1], traceback.format_exc())
            conn.send(("error", type(e).__name__, str(e)))


def main(argv: Sequence[str]) -> None:
    fd, parent_pid = int(argv[0]), int(argv[1])
    _die_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    conn = Connection(fd)
    try:
        serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    main(sys.argv[1:])
