"""Trainers in processes of their own, stepped in turn by one driver, so that they share the
machine's state (other load, clock, thermal) step by step rather than run by run.

    worker = StepWorker("grpo", trainer_worker, overrides)  # spawns trainer_worker(conn, overrides)
    timings = worker.step()                                     # one training step there, its timings back
    timings = worker.step(profile=True)                         # the same under torch.profiler: + "profile"
    worker.close()

A process each, so that neither trainer inherits the other's process-wide settings (thread pool,
flush-denormal mode, allocator caches). A worker answers each "step" / "profile" command with a dict
of floats (seconds, token counts); `serve` is that loop for a trainer whose steps the worker calls
itself (`trainer_worker`: zppo_fast's `Trainer`); a trainer that owns its loop (TRL) answers from a
callback instead (bench/bench_vs_trl.py).
"""

from __future__ import annotations

import multiprocessing
import statistics
import traceback
from collections.abc import Callable

PROFILE_ROWS = 30  # ops listed in a profile table


class WorkerError(RuntimeError):
    """A worker died or raised; the message names it and carries its traceback."""


class StepWorker:
    def __init__(self, name: str, target: Callable, *args):
        self.name = name
        ctx = multiprocessing.get_context("spawn")  # no forked copy of the driver's torch state
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_guarded, args=(target, child, *args), name=name, daemon=True)
        self.process.start()
        child.close()

    def step(self, profile: bool = False) -> dict:
        self.conn.send("profile" if profile else "step")
        return self._reply()

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send("stop")
                self._reply()  # the worker's "stopped": it has finished cleanly
            except (BrokenPipeError, WorkerError):
                pass
        self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.kill()

    def _reply(self):
        try:
            reply = self.conn.recv()
        except EOFError:
            self.process.join(timeout=10)
            raise WorkerError(f"{self.name} worker died (exit code {self.process.exitcode})") from None
        if isinstance(reply, tuple) and reply[0] == "error":
            raise WorkerError(f"{self.name} worker raised:\n{reply[1]}")
        return reply


def _guarded(target: Callable, conn, *args) -> None:
    try:
        target(conn, *args)
    except Exception:
        conn.send(("error", traceback.format_exc()))
        raise


def serve(conn, step: Callable[[], dict]) -> None:
    """Answer "step" / "profile" with `step()`'s dict until "stop"."""
    while True:
        command = conn.recv()
        if command == "stop":
            conn.send("stopped")
            return
        conn.send(profiled(step) if command == "profile" else step())


def trainer_worker(conn, overrides: list[str]) -> None:
    """zppo_fast's `Trainer` on `load_config(None, overrides)`, one `Trainer.step` per command.
    Each answer: "step" (its seconds, measured here), "tokens" (the student tokens it trained on) and
    the step's own `time/*` metrics without the prefix (rollout, old_logprobs, update, ...)."""
    import time

    from zppo_fast.config import load_config
    from zppo_fast.train import Trainer

    trainer = Trainer(load_config(None, overrides), progress=False)

    def step() -> dict:
        t0 = time.perf_counter()
        m = trainer.step()
        return {"step": time.perf_counter() - t0, "tokens": m["perf/student_tokens"],
                **{k.removeprefix("time/"): v for k, v in m.items() if k.startswith("time/")}}

    serve(conn, step)


def profiled(step: Callable[[], dict]) -> dict:
    """`step()` under torch.profiler (CPU activities): its dict plus "profile", the table of the
    ops with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = step()
    return {**out, "profile": top_ops(prof)}


def top_ops(prof) -> str:
    """A finished torch.profiler run's table of the `PROFILE_ROWS` ops with the most self CPU time."""
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=PROFILE_ROWS)


def print_profiles(profiles: dict[str, str], path: str | None = None) -> None:
    """Print each worker's profile table (`StepWorker.step(profile=True)["profile"]`); also write them to `path`."""
    for name, table in profiles.items():
        print(f"\nprofile of one {name} step (top ops by self CPU time):\n{table}")
    if path:
        with open(path, "w") as f:
            f.write("".join(f"## {name}\n\n{table}\n\n" for name, table in profiles.items()))


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r.get(key, 0.0) for r in rows)


def alternate(workers: list[StepWorker], warmup: int, steps: int) -> dict[str, list[dict]]:
    """`warmup` untimed then `steps` timed steps of every worker, in turn; the order flips every step
    (A B, B A, ...) so neither always runs right after the other. Returns the timed steps' dicts."""
    timed: dict[str, list[dict]] = {w.name: [] for w in workers}
    for i in range(warmup + steps):
        for w in workers if i % 2 == 0 else workers[::-1]:
            out = w.step()
            if i >= warmup:
                timed[w.name].append(out)
    return timed
