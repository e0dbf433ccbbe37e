"""Seconds per rollout step at several `run.cpu_threads` values, for choosing the CPU default.

Two settings: "demo", the embedded default (`python -m zppo_fast.train` with no options: ZPPO on
the testbed, its cached warm-ups in `sft.cache_dir`), and "trl", the model and
prompts of bench/bench_vs_trl.py (hidden 128, character tokenizer, ~240-token prompts, GRPO, one
optimizer step per rollout step). For each setting one worker per thread count (bench/alternate.py),
steps alternated, medians of `--steps` after `--warmup`; the ratio is to the first thread count.
Run it on an otherwise idle machine: other processes on the cores penalize more threads most.

    python bench/bench_threads.py [--threads 1,2,4] [--settings demo,trl] [--steps 5] [--warmup 1] [--record]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from pathlib import Path

from alternate import StepWorker, alternate, median, trainer_worker
from bench_vs_trl import write_setting
from results import cpu_name, git_commit, record_section
from bench_zppo_vs_grpo import QUICK, warm_up


def settings(tmp: Path, names: list[str], quick: bool) -> dict[str, list[str]]:
    """Config overrides per setting (no run.cpu_threads, no run.out_dir)."""
    out = {}
    common = ["--run.tensorboard", "false", "--run.eval_every", "0", "--run.overwrite", "true"]
    for name in names:
        if name == "demo":
            out[name] = (QUICK + ["--sft.cache_dir", str(tmp / "sft")] if quick else []) + common
            warm_up(out[name])
        elif name == "trl":
            (tmp / "trl").mkdir()
            out[name] = write_setting(tmp / "trl", *((32, 2, 2, 4) if quick else (128, 8, 8, 24)))[1]
        else:
            raise SystemExit(f"unknown setting {name!r}: demo or trl")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default=f"1,2,{os.cpu_count()}", help="comma-separated thread counts")
    ap.add_argument("--settings", default="demo,trl")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke test: toy sizes, 1 warm-up + 1 step")
    ap.add_argument("--record", action="store_true", help="write the table to bench/RESULTS.md")
    args = ap.parse_args()
    threads = list(dict.fromkeys(int(t) for t in args.threads.split(",")))
    if args.quick:
        args.steps, args.warmup = 1, 1
    lines = [f"Device: {cpu_name()} ({os.cpu_count()} cores), CPU only. Date: {datetime.date.today().isoformat()}. "
             f"Commit: {git_commit()}. Load average at start: {os.getloadavg()[0]:.2f}.",
             f"Command: `python bench/bench_threads.py {' '.join(sys.argv[1:])}`. Medians of {args.steps} steps after "
             f"{args.warmup} warm-up step(s), thread counts alternated step by step.", "",
             f"| setting | threads | step (s), median | range | ratio to {threads[0]} thread(s) |",
             "|---|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
        for name, overrides in settings(Path(tmp), args.settings.split(","), args.quick).items():
            workers = [StepWorker(f"{name}, {t} thread(s)", trainer_worker, overrides + [
                "--run.cpu_threads", str(t), "--run.out_dir", str(Path(tmp) / f"{name}_{t}")]) for t in threads]
            try:
                timed = alternate(workers, args.warmup, args.steps)
            finally:
                for w in workers:
                    w.close()
            base = median(timed[workers[0].name], "step")
            for t, w in zip(threads, workers):
                rows = timed[w.name]
                lines.append(f"| {name} | {t} | {median(rows, 'step'):.3f} | {min(r['step'] for r in rows):.2f}-"
                             f"{max(r['step'] for r in rows):.2f} | {median(rows, 'step') / base:.2f} |")
                print(lines[-1], flush=True)
    if args.record:
        record_section("CPU threads per run (run.cpu_threads)", "\n".join(lines))


if __name__ == "__main__":
    main()
