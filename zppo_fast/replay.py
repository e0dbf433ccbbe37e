"""Prompt replay buffer (ZPPO step 11): the hard questions the student has not yet solved.

Plain-rollout accuracy alone decides, once per step, in the paper's order:
  1. a question in the buffer with accuracy >= threshold (0.5) graduates (is removed);
  2. one in the buffer still below it stays where it is (visits + 1, last accuracy updated);
  3. a question not in the buffer below it is admitted at the tail, in the order given;
  4. the oldest entries are evicted until at most `capacity` remain (so graduations free
     room first, and a step that admits more than the capacity evicts its own oldest).
Replayed questions are drawn uniformly without removal (`sample`).

The store is the lock-free C++ ring in csrc/replay_ring.hpp (module zppo_fast._replay) and
the exit history is its C++ log (csrc/exit_log.hpp), appended by the same call that applies a
step; this class checks arguments and saves/restores everything (the counter-based
sampler's state included) as plain ints and numpy arrays.

Threads: every method may be called from any thread, and sees the buffer before or after any
`update()` running in another thread, never part of one. A lock per buffer serializes the ring's
step-owner calls (`update`, `in`, `len`, `ids`, `history`, the state), so concurrent `update()`
calls apply one after the other. `sample` takes no lock: the ring's gate (csrc/replay_ring.hpp,
AccessGate) refuses a sample that would overlap an owner call -- the sample then waits for the lock
and runs after that call -- and an owner call that would overlap a sample, which is retried until
the sample has ended. So samplers never wait for one another, only for an update. Threads that
must admit concurrently without waiting use the raw ring's lock-free `zppo_fast._replay.Ring.admit`.

`visits` counts the steps that evaluated an entry after the one that admitted it, the
graduating step included.
"""

from __future__ import annotations

import numbers
import threading
import time
from typing import NamedTuple

import numpy as np

from zppo_fast import _replay

STATE_FORMAT = "zppo_fast.replay/1"
# The ring's refusal of an owner call that met a sample in flight (csrc/replay_ring.hpp, AccessGate).
_MET_A_SAMPLER = "overlapped admit/sample"

# One row per exit from the buffer, in exit order (the graduation-dynamics figures read this):
# qid, step_admitted, acc_admitted, exit_step, graduated (False: evicted), visits, last_acc.
# The raw ring's admit()/step() hand exits over as rows of _replay.EXIT_DTYPE (padded like a
# C++ struct); the history is the same fields packed. The buffer's own history lives in a
# C++ _replay.ExitLog (compact rows in never-moved chunks) and becomes this dtype on demand.
HISTORY_DTYPE = np.dtype([(name, _replay.EXIT_DTYPE.fields[name][0]) for name in _replay.EXIT_DTYPE.names])
_LIVE_FIELDS = {
    "qid": np.int64,
    "step_admitted": np.int64,
    "acc_admitted": np.float64,
    "last_acc": np.float64,
    "visits": np.int64,
}


class ReplayUpdate(NamedTuple):
    """What one `update` did: (a,), (g,), (e,) int64 ids."""

    admitted: np.ndarray  # in the order given (includes any evicted again in the same step)
    graduated: np.ndarray  # in the order given
    evicted: np.ndarray  # oldest first


class PromptReplayBuffer:
    """FIFO buffer of at most `capacity` hard question ids with the paper's replay rules."""

    def __init__(self, capacity: int = 10_000, seed: int = 0, threshold: float = 0.5):
        if not _is_int(capacity):
            raise TypeError(f"capacity must be an integer, got {capacity!r}")
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        if not _is_int(seed):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        if not isinstance(threshold, numbers.Real) or not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
        self.capacity = int(capacity)
        self.threshold = float(threshold)
        self._ring = _replay.Ring(self.capacity, int(seed) % 2**64)
        self._log = _replay.ExitLog()
        self._lock = threading.Lock()  # the ring's owner calls and the log, see the module docstring

    def update(self, question_ids, accuracies, step: int) -> ReplayUpdate:
        """Apply one step's plain-rollout accuracies: (n,) distinct int ids, (n,) floats in [0, 1].

        Raises (buffer unchanged) on mismatched lengths, non-integer or duplicate ids,
        NaN or out-of-range accuracies, or a non-integer step.
        """
        ids = _as_ids(question_ids, "question_ids")
        accs = _as_accuracies(accuracies)
        if len(ids) != len(accs):
            raise ValueError(f"question_ids has {len(ids)} entries but accuracies has {len(accs)}")
        if not (type(step) is int or _is_int(step)):
            raise TypeError(f"step must be an integer, got {step!r}")
        # One C++ call: checks accuracies (NaN, range) and duplicate ids before changing
        # anything, applies the step, appends the exits to the log.
        with self._lock:
            out = self._owner(self._ring.update, ids, accs, int(step), self.threshold, self._log)
        if type(out) is int:
            raise ValueError(f"accuracies[{out}] = {accs[out]} (question id {ids[out]}) is not in [0, 1]")
        return ReplayUpdate._make(out)

    def __contains__(self, qid) -> bool:
        if not _is_int(qid):
            return False
        if not -(2**63) <= int(qid) < 2**63:
            return False
        with self._lock:
            return self._owner(self._ring.contains, int(qid))

    def ids(self) -> np.ndarray:
        """(n,) int64 live ids, oldest first."""
        with self._lock:
            return self._owner(self._ring.records)["qid"]

    def history(self) -> np.ndarray:
        """(x,) structured array of HISTORY_DTYPE: one row per graduation or eviction, in order."""
        with self._lock:
            columns = self._log.columns()
        history = np.empty(len(columns["qid"]), HISTORY_DTYPE)
        for name in HISTORY_DTYPE.names:
            history[name] = columns[name]
        return history

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: plain ints/floats/strings and numpy arrays.

        Compacts the ring first (no change to its contents), so this buffer and one loaded
        from the result draw the same samples from here on."""
        with self._lock:
            self._owner(self._ring.compact_holes)
            return {
                "format": STATE_FORMAT,
                "capacity": self.capacity,
                "threshold": self.threshold,
                "live": dict(self._owner(self._ring.records)),
                "history": dict(self._log.columns()),
                "sampler": dict(zip(("key", "calls"), self._owner(self._ring.sampler_state))),
            }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()` (numpy arrays, or lists after a JSON round trip).

        Raises ValueError/TypeError naming the bad entry, leaving the buffer unchanged, if the
        state is for another capacity or threshold or is malformed.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        for key in ("format", "capacity", "threshold", "live", "history", "sampler"):
            if key not in state:
                raise ValueError(f"state is missing {key!r}")
        if state["format"] != STATE_FORMAT:
            raise ValueError(f"state format is {state['format']!r}, expected {STATE_FORMAT!r}")
        if state["capacity"] != self.capacity:
            raise ValueError(f"state is for capacity {state['capacity']!r}, this buffer has capacity {self.capacity}")
        if state["threshold"] != self.threshold:
            raise ValueError(
                f"state is for threshold {state['threshold']!r}, this buffer has threshold {self.threshold}"
            )
        live = _record_arrays(state["live"], _LIVE_FIELDS, "live")
        history_fields = {name: HISTORY_DTYPE[name].type for name in HISTORY_DTYPE.names}
        hist = _record_arrays(state["history"], history_fields, "history")
        log = _replay.ExitLog.from_columns(*(hist[name] for name in HISTORY_DTYPE.names))
        sampler = state["sampler"]
        if not (
            isinstance(sampler, dict)
            and sampler.keys() == {"key", "calls"}
            and all(_is_int(v) and 0 <= v < 2**64 for v in sampler.values())
        ):
            raise ValueError(f"state['sampler'] must be {{'key': uint64, 'calls': uint64}}, got {sampler!r}")
        # The ring checks count and duplicate ids before touching anything.
        with self._lock:
            self._owner(
                self._ring.load,
                live["qid"],
                live["step_admitted"],
                live["acc_admitted"],
                live["last_acc"],
                live["visits"],
                int(sampler["key"]),
                int(sampler["calls"]),
            )
            self._log = log

    def sample(self, k: int) -> np.ndarray:
        """(min(k, len),) distinct live ids drawn uniformly; they stay in the buffer."""
        if not _is_int(k) or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k!r}")
        try:
            return self._ring.sample(k)  # no lock: the ring refuses to start it during an owner call
        except RuntimeError:
            with self._lock:  # that call holds the lock: wait for it to end, then sample
                return self._ring.sample(k)

    def _owner(self, call, *args):
        """The ring's owner call `call(*args)`, under the lock (the caller holds it): the ring
        refuses it while a lock-free sample() is in flight, so it is retried until that ended."""
        while True:
            try:
                return call(*args)
            except RuntimeError as e:
                if _MET_A_SAMPLER not in str(e):
                    raise
            time.sleep(0)  # hand the GIL to the sampler

    def __len__(self) -> int:
        self._lock.acquire()
        try:
            return len(self._ring)
        finally:
            self._lock.release()

    def __repr__(self) -> str:
        return f"PromptReplayBuffer(len={len(self)}, capacity={self.capacity}, threshold={self.threshold})"


def _is_int(x) -> bool:
    # `type(x) is int` first: the ABC check costs about as much as a whole sample(96).
    return type(x) is int or (isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_)))


_INT64, _FLOAT64 = np.dtype(np.int64), np.dtype(np.float64)


def _as_ids(values, name: str) -> np.ndarray:
    """(n,) int64 from any integer sequence; anything else is a TypeError/ValueError naming `name`."""
    if type(values) is np.ndarray and values.dtype is _INT64 and values.ndim == 1:
        return values  # the common case (the ring copies it if it is strided)
    try:
        arr = np.asarray(values)
    except (OverflowError, ValueError) as err:
        raise ValueError(f"{name} must be a 1-D sequence of int64 ids: {err}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} has id {arr.max()} outside the int64 range")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _as_accuracies(values) -> np.ndarray:
    """(n,) float64 from any real sequence (range and NaN are the ring's check)."""
    if type(values) is np.ndarray and values.dtype is _FLOAT64 and values.ndim == 1:
        return values  # the common case
    accs = np.asarray(values)
    if accs.ndim != 1:
        raise ValueError(f"accuracies must be 1-D, got shape {accs.shape}")
    if accs.dtype != np.float64:
        if accs.size and accs.dtype.kind not in "fiu":
            raise TypeError(f"accuracies must hold numbers, got dtype {accs.dtype}")
        accs = accs.astype(np.float64)
    return accs


def _record_arrays(table, fields: dict, where: str) -> dict:
    """Checks a dict of equal-length 1-D arrays from a state dict; returns them converted."""
    if not isinstance(table, dict):
        raise TypeError(f"state[{where!r}] must be a dict of arrays, got {type(table).__name__}")
    out, length = {}, None
    for name, dtype in fields.items():
        if name not in table:
            raise ValueError(f"state[{where!r}] is missing {name!r}")
        arr = np.asarray(table[name])
        if arr.ndim != 1:
            raise ValueError(f"state[{where!r}][{name!r}] must be 1-D, got shape {arr.shape}")
        if arr.size and (
            (np.dtype(dtype).kind in "ib" and arr.dtype.kind != np.dtype(dtype).kind)
            or (np.dtype(dtype).kind == "f" and arr.dtype.kind not in "fiu")
        ):
            raise ValueError(f"state[{where!r}][{name!r}] has dtype {arr.dtype}, expected {np.dtype(dtype)}")
        arr = np.ascontiguousarray(arr, dtype=dtype)
        if np.dtype(dtype).kind == "f" and arr.size and not np.all((arr >= 0.0) & (arr <= 1.0)):
            raise ValueError(f"state[{where!r}][{name!r}] has accuracies outside [0, 1] (or NaN)")
        if name == "visits" and arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
            raise ValueError(f"state[{where!r}]['visits'] has values outside [0, 2**31)")
        if length is not None and len(arr) != length:
            raise ValueError(f"state[{where!r}] arrays have different lengths ({name!r}: {len(arr)} vs {length})")
        length = len(arr)
        out[name] = arr
    return out
