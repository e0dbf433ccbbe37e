"""The miniature reproduction: GRPO, GRPO-dagger (replay), ZPPO and the paper's teacher-guided
baselines (Hint, Prefix, off- and on-policy distillation) on the synthetic task, on a CPU.

    python bench/miniature.py [--steps N] [--seeds K] [--algos grpo,grpo_replay,zppo,...] [--out DIR]
                              [--quick] [--section.key VALUE ...]

Every algo trains the same student (the early snapshot of one supervised warm-up) with the same
config, seed(s) and number of rollout steps; only `rl.algo` differs. The frozen teacher of the
ZPPO and baseline runs is the end of that same warm-up (so it shares the student's tokenizer, as
distillation needs). The warm-up is done once, up front, into
`--sft.cache_dir` (keyed by its settings), so every run loads identical weights. `--section.key
VALUE` overrides go to every run (they win over the miniature's own settings below).

Budget: the same number of rollout steps for every algo. ZPPO spends more than GRPO within a step
(replayed questions, teacher rollouts on hard questions, student rollouts on BCQ/NCQ prompts);
the table reports the student and teacher token totals (`perf/student_tokens`, every
`*/teacher_tokens`: sampled by the teacher) and the tokens the loss trained on
(`loss/trained_tokens`: for off-policy distillation the teacher's correct rollouts; for on-policy
distillation the student's own, each also scored by the teacher's forward) so the difference is visible.

Reported per algo (mean over seeds, +- the std across seeds when K > 1):
  held-out accuracy before (step 0) / after (last step): the trainer's greedy eval
    (`eval/heldout_acc`, `run.eval_every`, `run.eval_size`);
  graduated at 0%: of the questions admitted to the replay buffer with accuracy 0, the share that
    graduated before the run ended (report.json, bucket "0/G"); "-" for algos without a buffer;
  BCQ / NCQ / Hint / Prefix accuracy: the student's accuracy on its guided prompts, mean over the
    steps that built any (`zppo/bcq_acc`, `zppo/ncq_acc`, `hint/acc`, `prefix/acc`; a Prefix
    rollout is graded on prefix + continuation).

Writes under --out (default runs/miniature): one run folder per (algo, seed), miniature.json (all
numbers, the command, the settings), miniature.md (the table) and miniature.png (held-out accuracy
vs step per algo). The table is printed as markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from zppo_fast.config import ConfigError, load_config

# The miniature's scale is the embedded default (zppo_fast/config.py, configs/tiny_cpu.toml):
# hidden-64 Qwen3.5, single-digit operands, the student a 250-step snapshot of the 300-step
# teacher warm-up, raw candidates (compression "none": a 64-wide teacher cannot follow the summary
# prompt), 20 rollout steps of 16 questions x 8, greedy held-out eval on 128 questions every 5.
MINIATURE = [
    "--run.checkpoint_every", "1000",  # the trainer still saves (and writes replay telemetry) at the end
    "--run.tensorboard", "false",
]
# --quick: a smoke run of the whole pipeline: about 2 minutes of RL for the three algos, plus a 40-step
# warm-up the first time (measured 376 s in all, cold cache, on 2 cores at load average 5).
QUICK = [
    "--model.hidden_size", "32",
    "--sft.steps", "20",
    "--zppo.teacher_sft_steps", "40",
    "--rl.batch_size", "4",
    "--run.steps", "3",
    "--run.eval_every", "3",
    "--run.eval_size", "48",
]
ALGOS = ("grpo", "grpo_replay", "zppo", "grpo_replay_hint", "grpo_replay_prefix", "off_distill", "off_distill_replay",
         "on_distill", "on_distill_replay")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python bench/miniature.py", allow_abbrev=False,
        description="GRPO vs GRPO+replay vs ZPPO vs the teacher-guided baselines on the synthetic task, "
                    "same student/teacher/seeds/steps.",
        epilog="Any other --section.key VALUE is a config override applied to every run.")
    parser.add_argument("--steps", type=int, default=None, help="rollout steps per run (default: the config's run.steps; 3 with --quick)")
    parser.add_argument("--seeds", type=int, default=1, help="run seeds 0..K-1 for every algo (default 1)")
    parser.add_argument("--algos", default=",".join(ALGOS), help="comma-separated rl.algo values")
    parser.add_argument("--out", default="runs/miniature", help="output folder (default runs/miniature)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (~2 min of RL; its own small warm-up the first time)")
    args, rest = parser.parse_known_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    return args, rest


def fmt(values: list[float | None], spec: str = ".3f") -> str:
    """Mean (+- std across seeds) of the values present, or "-"."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    mean = statistics.fmean(vals)
    if len(vals) > 1:
        return f"{format(mean, spec)} ± {format(statistics.stdev(vals), spec.lstrip('+'))}"
    return format(mean, spec)


def mean_present(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def warm_up(cfg) -> None:
    """One warm-up into the cache: its early snapshot is the student, its end the teacher."""
    from zppo_fast.sft import warm_start

    if cfg.model.path is not None and cfg.zppo.teacher_path is not None:
        return
    t0 = time.perf_counter()
    if cfg.zppo.teacher_path is None:
        warm_start(cfg.model, cfg.task, replace(cfg.sft, steps=cfg.zppo.teacher_sft_steps), seed=cfg.run.seed,
                   progress=False, snapshots=(cfg.sft.steps,))
    if cfg.model.path is None:
        warm_start(cfg.model, cfg.task, cfg.sft, seed=cfg.run.seed, progress=False)
    print(f"[miniature] warm-up ready in {cfg.sft.cache_dir} ({time.perf_counter() - t0:.0f} s)", flush=True)


def summarize_run(run_dir: Path, wall_s: float) -> dict:
    """The numbers of one finished run, from its metrics.jsonl and report.json."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    by_step = {rec["step"]: rec for rec in lines}  # last line of a step wins
    steps = [by_step[s] for s in sorted(by_step)]
    curve = [(rec["step"], rec["eval/heldout_acc"]) for rec in steps if rec.get("eval/heldout_acc") is not None]
    train = [rec for rec in steps if rec["step"] > 0]

    def total(key: str) -> float | None:
        vals = [rec[key] for rec in train if rec.get(key) is not None]
        return float(sum(vals)) if vals else None

    out = {
        "run_dir": str(run_dir),
        "wall_s": wall_s,
        "heldout_curve": curve,
        "heldout_before": curve[0][1] if curve and curve[0][0] == 0 else None,
        "heldout_after": curve[-1][1] if curve and curve[-1][0] > 0 else None,
        "train_reward_first": mean_present(train[:5], "reward/mean"),
        "train_reward_last": mean_present(train[-5:], "reward/mean"),
        "bcq_acc": mean_present(train, "zppo/bcq_acc"),
        "ncq_acc": mean_present(train, "zppo/ncq_acc"),
        "hint_acc": mean_present(train, "hint/acc"),
        "prefix_acc": mean_present(train, "prefix/acc"),
        "hint_dropped_leak": total("hint/dropped_leak"),
        "distill_teacher_acc": mean_present(train, "distill/teacher_acc"),
        "trained_tokens": total("loss/trained_tokens"),
        "bcq_built": total("zppo/bcq_built"),
        "ncq_built": total("zppo/ncq_built"),
        "hard_frac": mean_present(train, "zppo/hard_frac"),
        "teacher_acc_on_hard": mean_present(train, "zppo/teacher_acc_on_hard"),
        "student_tokens": total("perf/student_tokens"),
        # sampled by the teacher: zppo/, hint/, prefix/ or distill/teacher_tokens, whichever the algo logs
        "teacher_tokens": sum((v for k in {k for rec in train for k in rec if k.endswith("/teacher_tokens")}
                               if (v := total(k)) is not None), start=0.0) or None,
        "grad0_admitted": None,
        "grad0_graduated": None,
        "grad0_share": None,
    }
    report_path = run_dir / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        zero = (report.get("per_bucket") or {}).get((report.get("buckets") or ["0/8"])[0], {})
        adm, grad = zero.get("admitted"), zero.get("graduated")
        out.update(grad0_admitted=adm, grad0_graduated=grad, grad0_share=grad / adm if adm else None)
        out["replay_total"] = {k: (report.get("total") or {}).get(k) for k in ("admitted", "graduated", "evicted", "live")}
    return out


def table(results: dict[str, list[dict]], cfg, steps: int, seeds: int) -> str:
    head = ["algo", "held-out before", "held-out after", "Δ", "graduated at 0% (grad/admitted)",
            "BCQ acc", "NCQ acc", "Hint / Prefix acc", "student tokens", "teacher tokens", "trained tokens",
            "wall s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for algo, runs in results.items():
        def col(key):
            return [r.get(key) for r in runs]

        delta = [a - b if a is not None and b is not None else None
                 for a, b in zip(col("heldout_after"), col("heldout_before"))]
        adm = [r["grad0_admitted"] for r in runs if r.get("grad0_admitted") is not None]
        grad = [r["grad0_graduated"] for r in runs if r.get("grad0_graduated") is not None]
        share = fmt(col("grad0_share"), ".0%") if adm else "-"
        grad0 = f"{share} ({sum(grad)}/{sum(adm)})" if adm else "-"
        guided = col("hint_acc") if any(v is not None for v in col("hint_acc")) else col("prefix_acc")
        rows.append("| " + " | ".join([
            algo, fmt(col("heldout_before")), fmt(col("heldout_after")), fmt(delta, "+.3f"), grad0,
            fmt(col("bcq_acc")), fmt(col("ncq_acc")), fmt(guided),
            fmt(col("student_tokens"), ",.0f"), fmt(col("teacher_tokens"), ",.0f"), fmt(col("trained_tokens"), ",.0f"),
            fmt(col("wall_s"), ".0f"),
        ]) + " |")
    note = (f"Same warm-up student, teacher, config and seed(s) {list(range(seeds))} for every algo; budget = "
            f"{steps} rollout steps of B_new={cfg.rl.batch_size} new questions x G_S={cfg.rl.group_size} each. "
            f"ZPPO also replays questions, samples the teacher on hard questions and the student on BCQ/NCQ "
            f"prompts, so its token totals (summed over steps; mean over seeds) are higher; Hint/Prefix add "
            f"student rollouts on their guided prompts; off-policy distillation trains on the teacher's correct "
            f"rollouts of every question (trained tokens), on-policy on the student's own, each token also scored "
            f"by a teacher forward. Held-out: greedy "
            f"accuracy on {cfg.run.eval_size} held-out questions. Graduated at 0%: share of the questions admitted "
            f"to the replay buffer at accuracy 0 that graduated by the end (counts summed over seeds).")
    return "\n".join(rows) + "\n\n" + note


def plot(results: dict[str, list[dict]], path: Path) -> None:
    from matplotlib.figure import Figure  # Agg canvas, no global pyplot backend

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", "-"), ("x", "--")]
    for i, (algo, runs) in enumerate(results.items()):
        curves = [dict(r["heldout_curve"]) for r in runs]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        mean = [statistics.fmean(c[s] for c in curves) for s in steps]
        marker, ls = styles[i % len(styles)]  # distinct styles: identical curves stay visible
        (line,) = ax.plot(steps, mean, marker=marker, ls=ls, ms=9 - 2 * (i % 3), label=algo)
        if len(curves) > 1:
            for c in curves:
                ax.plot(sorted(c), [c[s] for s in sorted(c)], color=line.get_color(), alpha=0.25, lw=0.8)
    ax.set_ylim(-0.02, 1.02)
    ax.set(xlabel="rollout step", ylabel="held-out accuracy (greedy)", title="Miniature reproduction (CPU)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.savefig(path, format="png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parse_args(argv)
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    settings = MINIATURE + (QUICK if args.quick else []) + (["--run.steps", str(args.steps)] if args.steps else [])
    settings += overrides
    for forced in ("--rl.algo", "--run.seed", "--run.out_dir"):
        if any(o == forced or o.startswith(forced + "=") for o in overrides):
            print(f"[miniature] note: {forced} is set per run by this script; your value is ignored", file=sys.stderr)
    try:
        base = load_config(None, settings)
        from zppo_fast.zppo import ALGOS as KNOWN

        bad = [a for a in algos if a not in KNOWN]
        if bad:
            raise ConfigError(f"unknown algo(s) {', '.join(bad)}; choose from {', '.join(KNOWN)}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import torch

    from zppo_fast.train import Trainer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    warm_up(base)
    results: dict[str, list[dict]] = {a: [] for a in algos}
    for seed in range(args.seeds):
        for algo in algos:
            run_dir = out / f"{algo}-seed{seed}"
            cfg = load_config(None, settings + ["--rl.algo", algo, "--run.seed", str(seed),
                                                "--run.out_dir", str(run_dir), "--run.overwrite", "true"])
            print(f"[miniature] {algo} seed {seed}: {cfg.run.steps} steps -> {run_dir}", flush=True)
            t0 = time.perf_counter()
            Trainer(cfg, progress=False).fit()
            wall = time.perf_counter() - t0
            res = summarize_run(run_dir, wall)
            results[algo].append(res)
            print(f"[miniature] {algo} seed {seed}: held-out {res['heldout_before']} -> {res['heldout_after']} "
                  f"in {wall:.0f} s", flush=True)
    total_wall = time.perf_counter() - t_start

    md = table(results, base, base.run.steps, args.seeds)
    (out / "miniature.md").write_text(md + "\n")
    plot(results, out / "miniature.png")
    (out / "miniature.json").write_text(json.dumps({
        "command": " ".join(["python", "bench/miniature.py", *argv]),
        "settings": settings, "algos": algos, "seeds": list(range(args.seeds)), "steps": base.run.steps,
        "wall_s": total_wall, "torch": torch.__version__, "python": platform.python_version(),
        "config": base.to_dict(), "results": results, "table": md,
    }, indent=1) + "\n")
    print()
    print(md)
    print(f"\n[miniature] total wall time {total_wall:.0f} s; wrote {out / 'miniature.md'}, "
          f"{out / 'miniature.json'}, {out / 'miniature.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
