"""The embedded default's ZPPO and GRPO rollout steps side by side: seconds per step and per trained student token.

Both run `zppo_fast.train.Trainer` on the embedded default (the config's defaults: the testbed,
the tiny Qwen3.5 student and teacher after their cached supervised warm-ups, 16 questions x 8
samples, 4 mini-batches), `--rl.algo zppo` against `--rl.algo grpo`, each
in a process of its own (bench/alternate.py), steps alternated; after `--warmup` untimed steps each,
medians of `--steps` steps. ZPPO trains more student tokens per step by design (replayed questions,
BCQ / NCQ groups with long prompts), so the cost is given both per step and per trained student
token (the response tokens of every rollout the update trains on: `perf/student_tokens`), with the
ratios ZPPO / GRPO. The phases are the trainer's own `time/*` metrics (teacher: the teacher's
rollouts and compressions; other: advantages, replay, weight push).

The warm-ups are read from (or first trained into) the config's `sft.cache_dir`, as a demo run would.

    python bench/bench_zppo_vs_grpo.py [--steps 5] [--warmup 1] [--record] [-- --section.key VALUE ...]
    python bench/bench_zppo_vs_grpo.py --profile  # + one profiled step of each: the top ops by self CPU time
    python bench/bench_zppo_vs_grpo.py --quick    # smoke test: a toy config, 1 warm-up + 1 step
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
from pathlib import Path

from alternate import StepWorker, alternate, median, print_profiles, trainer_worker
from results import cpu_name, git_commit
from results import record_section

ALGOS = ("grpo", "zppo")
PHASES = ("rollout", "teacher", "old_logprobs", "update")
# --quick: the tests' toy recipe (tests/conftest.py) at smaller sizes, its warm-ups in a temporary cache
QUICK = ["--model.hidden_size", "32", "--task.kind", "arithmetic", "--task.max_operand", "2", "--task.num_facts", "64", "--sft.steps", "10", "--zppo.teacher_sft_steps", "20",
         "--zppo.teacher_max_new_tokens", "8", "--rollout.max_new_tokens", "8", "--rl.batch_size", "4",
         "--rl.group_size", "4", "--zppo.teacher_group_size", "2"]


def warm_up(overrides: list[str]) -> None:
    """Train the cached student and teacher warm-ups now, as the trainer would, so that neither worker's
    first step pays for them."""
    import torch

    from zppo_fast.config import load_config
    from zppo_fast.sft import prepare_warm_starts

    cfg = load_config(None, overrides)
    torch.set_num_threads(cfg.run.cpu_threads)  # as `python -m zppo_fast.sft` does: torch's default is every core
    prepare_warm_starts(cfg, progress=False)


def per_token(rows: list[dict]) -> float:
    """Median over steps of seconds per trained student token."""
    return statistics.median(r["step"] / max(r["tokens"], 1) for r in rows)


def table(timed: dict[str, list[dict]]) -> str:
    lines = ["| algo | step (s), median | student tokens, median | ms per student token | rollout | teacher | "
             "old log-probs | update | other |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for algo in ALGOS:
        rows = timed[algo]
        step = median(rows, "step")
        phases = [median(rows, k) for k in PHASES]
        other = statistics.median(r["step"] - sum(r.get(k, 0.0) for k in PHASES) for r in rows)  # per step, then median
        lines.append(f"| {algo} | {step:.3f} | {median(rows, 'tokens'):.0f} | {1e3 * per_token(rows):.3f} | "
                     + " | ".join(f"{p:.3f}" for p in phases) + f" | {other:.3f} |")
    g, z = timed["grpo"], timed["zppo"]
    lines.append("")
    lines.append(f"ZPPO / GRPO: {median(z, 'step') / median(g, 'step'):.2f}x per step, "
                 f"{per_token(z) / per_token(g):.2f}x per trained student token "
                 f"({median(z, 'tokens') / max(median(g, 'tokens'), 1):.2f}x the tokens).")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per algo (medians over these)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per algo first")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed steps, one profiled step of each algo; print their top ops")
    ap.add_argument("--profile-out", help="also write the profile tables to this file")
    ap.add_argument("--quick", action="store_true", help="smoke test: a toy config, 1 warm-up + 1 step")
    ap.add_argument("--record", action="store_true", help="write the table to bench/RESULTS.md")
    ap.add_argument("overrides", nargs="*", help="config overrides for both algos, after --")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_zppo_vs_grpo_") as tmp:
        base = list(args.overrides)
        if args.quick:
            args.steps, args.warmup = 1, 1
            base = QUICK + ["--sft.cache_dir", str(Path(tmp) / "sft")] + base
        base += ["--run.tensorboard", "false", "--run.eval_every", "0", "--run.overwrite", "true"]
        warm_up(base)
        workers = [StepWorker(algo, trainer_worker, base + ["--rl.algo", algo, "--run.out_dir", str(Path(tmp) / algo)])
                   for algo in ALGOS]
        try:
            timed = alternate(workers, args.warmup, args.steps)
            profiles = {w.name: w.step(profile=True)["profile"] for w in workers} if args.profile else {}
        finally:
            for w in workers:
                w.close()

    from zppo_fast.config import load_config

    cfg = load_config(None, base)
    command = "python bench/bench_zppo_vs_grpo.py " + " ".join(sys.argv[1:])
    header = (
        f"Device: {cpu_name()} ({os.cpu_count()} cores), CPU only, {cfg.run.cpu_threads} intra-op thread(s) each. "
        f"Date: {datetime.date.today().isoformat()}. Commit: {git_commit()}.\n"
        f"Command: `{command.strip()}`. Student hidden {cfg.model.hidden_size}, {cfg.model.num_layers} layers; "
        f"{cfg.rl.batch_size} questions x {cfg.rl.group_size} samples, at most {cfg.rollout.max_new_tokens} new "
        f"tokens, {cfg.rl.num_minibatches} mini-batches. Each algo in its own process, steps alternated; medians of "
        f"{args.steps} steps after {args.warmup} warm-up step(s). Phases in seconds (the trainer's time/* metrics).\n")
    text = header + "\n" + table(timed)
    print(text)
    print_profiles(profiles, args.profile_out)
    if args.record:
        record_section("Embedded default: ZPPO against GRPO per step and per trained token (CPU)", text)


if __name__ == "__main__":
    main()
