"""ZPPO's effect, measured: GRPO, GRPO with replay, ZPPO and the paper's Table-3 ablations on the CPU
testbed, several seeds each, with 95% intervals and ZPPO's paired difference from GRPO with replay.

    python bench/effect.py [--algos grpo,grpo_replay,zppo,grpo_both,grpo_replay_bcq,grpo_replay_ncq]
                           [--seeds 5] [--ablation-seeds 3] [--steps N] [--jobs 2] [--out runs/effect]
                           [--quick] [--record] [--section.key VALUE ...]

Every (algo, seed) is one `python -m zppo_fast.train` process (`--jobs` at a time, one intra-op
thread each) into OUT/ALGO/seedK, its output in OUT/ALGO/seedK.log. Every run starts from the same
student and teacher: the warm-ups are pinned to `--sft.seed 0` (not the run's seed) and trained
once, up front, by `zppo_fast.sft.prepare_warm_starts`, so parallel runs never race to write them.
Runs differ only in `rl.algo` and `run.seed` (the question order, the rollouts' samples); the budget
is the same number of rollout steps for every algo. The main algos (grpo, grpo_replay, zppo) get
`--seeds` seeds, every other algo `--ablation-seeds`; seed K of one algo and seed K of another start
alike (same student, same seed), which is what the paired difference pairs. A run that finished (a
`done` file in its folder, written after it exited 0 with its last step logged, recording its
command) is reused when the study is rerun with the same settings, so an interrupted study loses
only its runs in flight. `--section.key VALUE` overrides go to every run.

Measured per run (from RUN_DIR/metrics.jsonl and, for algos with a replay buffer, RUN_DIR/report.json):
  hard / easy acc, start and final: greedy held-out accuracy on each testbed family at step 0 (before
    RL: the same warm-up student for every algo) and at the last step (`eval/hard_acc`, `eval/easy_acc`);
    gain = final - start. The curves (accuracy at every evaluation) go into the figure.
  hard / easy se: the standard error the trainer reports with each final accuracy (`eval/*_se`): the
    noise of one run's number, which the table's note bounds.
  0-of-G graduated: of the questions admitted to the replay buffer at accuracy 0 of G, the share that
    graduated by the end (report.json, bucket "0/G"; the paper's Fig. 4: 28% ZPPO vs 4% GRPO with
    replay, 2B student). "-" for algos without a buffer or without such admissions.
  0-of-G graduated / visited: the same over those of them replayed at least once. A short run replays
    few of its admissions (rho_replay x batch a step against about half the batch admitted), so the
    share above mixes what a visit teaches with how many questions were visited at all.
  graduated / exits: graduations as a share of all buffer exits, graduated + evicted (the paper's
    Fig. 5: 26.6% vs 14.3%).
  BCQ / NCQ acc: the student's accuracy on its rollouts of BCQ / NCQ prompts, mean over the steps that
    built any (`zppo/bcq_acc`, `zppo/ncq_acc`; the paper: 69% BCQ at 0.8B, about 1% NCQ).
  BCQ / NCQ acc, steps 1-5: the same over the first five steps: can the warm-up student use candidates?
  hard plain acc, steps 1-5 / last 5 steps: the student's accuracy on its plain rollouts of the hard
    training questions it drew (`reward/hard_mean`), early and late: does guided learning reach plain prompts?
  replayed plain acc: its accuracy on the replayed questions, asked plainly (`reward/replayed_mean`).
  admitted to buffer: questions admitted over the run (report.json), the buffer's churn with the exits.
  student / teacher tokens: response tokens sampled over the run, by the student (`perf/student_tokens`)
    and by the teacher (every `*/teacher_tokens` key).
  s / step: the median over steps of a step's seconds (the sum of its `time/*` phases; the
    evaluations are not in it).

Reported per algo: the mean over seeds and its 95% t-interval (mean +- t(0.975, n-1) * sd / sqrt(n));
and the paired difference zppo - grpo_replay, seed by seed, of the final hard and easy accuracy, the
hard gain and the two 0-of-G graduation shares, with its 95% t-interval; and a paragraph on each link
of the mechanism (can the student use candidates, does guided learning reach plain prompts, how far
the buffer turns over). Writes OUT/effect.json (every number, the command, the
settings, the commit, the date), OUT/effect.md (the table), OUT/effect_curves.png (held-out accuracy
per family vs step, mean and 95% band per algo) and OUT/effect_graduation.png (per buffer algo: the
share of 0-of-G admissions graduated and the graduation share of exits, with 95% error bars: the
paper's Figs. 4-5 as bars), and prints the table. `--record` copies both figures to bench/ and
rewrites the "ZPPO's effect" section of bench/RESULTS.md from these numbers alone.

`--quick`: a smoke test of the whole pipeline: grpo_replay and zppo, one seed, two steps, tiny
sizes, warm-ups in a temporary cache, into runs/effect_quick unless --out is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from results import cpu_name, git_commit, record_section  # noqa: E402
from scipy.stats import t as student_t  # noqa: E402

from zppo_fast.config import AlgoName, ConfigError, load_config  # noqa: E402
from zppo_fast.report import ReportError, read_jsonl, write_report  # noqa: E402

MAIN_ALGOS = ("grpo", "grpo_replay", "zppo")
ABLATIONS = ("grpo_both", "grpo_replay_bcq", "grpo_replay_ncq")  # the paper's Table 3
PAIR = ("zppo", "grpo_replay")  # the paired difference: first minus second, seed by seed
FAMILIES = ("hard", "easy")
SECTION = "ZPPO's effect"
LEVEL = 0.95

# Every run: one intra-op thread (the runs share the cores, `--jobs` at a time), no TensorBoard, the
# warm-ups pinned to one seed so every run starts from the same student and teacher, and a single
# checkpoint at the end (the trainer always saves the last step; it writes the replay telemetry then).
# The student and teacher are 96 wide, not the embedded default's 64: the premise is a student that can
# use candidates, and at 64 the detour warm-up's student scored 0.11 on hard BCQ prompts against 0.08
# plain (1 in 8 samples), at 96 0.22 against 0.08 (scratch probes on 96 held-out hard questions x 8,
# then effect.py's own premise line). Chosen for the premise alone: a 2-seed probe of grpo_replay and
# zppo at 96 ran first and ordered neither (paired hard difference +0.007; per seed +0.033, -0.019).
STUDY = ["--run.cpu_threads", "1", "--run.tensorboard", "false", "--sft.seed", "0",
         "--run.checkpoint_every", "1000000", "--run.keep_last", "1", "--model.hidden_size", "96"]
# The study's budget and measurement: 30 rollout steps; held-out accuracy every 10 on 640 questions per
# family (one standard error under 2 points for any accuracy), which --quick and overrides replace.
BUDGET = ["--run.steps", "30", "--run.eval_every", "10", "--run.eval_size", "640"]
# --quick: tiny sizes so the two runs, their warm-ups included, take a couple of minutes on 2 cores.
QUICK = ["--model.hidden_size", "32", "--sft.steps", "20", "--zppo.teacher_sft_steps", "40",
         "--rl.batch_size", "4", "--run.steps", "2", "--run.eval_every", "2", "--run.eval_size", "16"]
QUICK_ALGOS = ("grpo_replay", "zppo")
# Set per run by this script; the user's value would be ignored, so it is refused.
PER_RUN = ("--rl.algo", "--run.seed", "--run.out_dir", "--run.overwrite")

# (key, table header, format) of every per-run quantity, in table order.
QUANTITIES = (
    ("hard_start", "hard acc start", ".3f"),
    ("hard_final", "hard acc final", ".3f"),
    ("hard_gain", "hard gain", "+.3f"),
    ("easy_start", "easy acc start", ".3f"),
    ("easy_final", "easy acc final", ".3f"),
    ("easy_gain", "easy gain", "+.3f"),
    ("grad0_share", "0-of-G graduated", ".1%"),
    # of the 0-of-G admissions replayed at least once: a 30-step run visits about a third of them
    ("grad0_visited_share", "0-of-G graduated / visited", ".1%"),
    ("grad_exit_share", "graduated / exits", ".1%"),
    ("bcq_acc", "BCQ acc", ".3f"),
    ("ncq_acc", "NCQ acc", ".3f"),
    # Where the mechanism could break: can the student use candidates from the start, does its plain
    # accuracy on the hard training questions move, and how do the replayed questions fare asked plainly.
    ("bcq_first", "BCQ acc, steps 1-5", ".3f"),
    ("ncq_first", "NCQ acc, steps 1-5", ".3f"),
    ("hard_plain_first", "hard plain acc, steps 1-5", ".3f"),
    ("hard_plain_last", "hard plain acc, last 5 steps", ".3f"),
    ("replayed_acc", "replayed plain acc", ".3f"),
    ("admitted", "admitted to buffer", ",.0f"),
    ("student_tokens", "student tokens", ",.0f"),
    ("teacher_tokens", "teacher tokens", ",.0f"),
    ("step_s", "s / step", ".2f"),
)
# (key, name, format) of the quantities paired seed by seed: accuracy, and the paper's signature, graduation
PAIRED = (("hard_final", "hard acc final", "+.3f"), ("easy_final", "easy acc final", "+.3f"),
          ("hard_gain", "hard gain", "+.3f"), ("grad0_share", "0-of-G graduated", "+.1%"),
          ("grad0_visited_share", "0-of-G graduated / visited", "+.1%"))


class StudyError(RuntimeError):
    """A run that failed or left incomplete output; the message names its folder and log."""


# --- statistics -------------------------------------------------------------------------------


def t_interval(values: typing.Iterable[float | None], level: float = LEVEL) -> dict:
    """Mean and two-sided t-interval of the values present (None skipped).

    Returns {"n", "mean", "low", "high", "half"}: mean +- half, half = t(1 - (1 - level) / 2, n - 1)
    * sd / sqrt(n) with the sample sd; half/low/high are None when n < 2, everything but n when n = 0.
    """
    vals = [float(v) for v in values if v is not None]
    n = len(vals)
    if n == 0:
        return {"n": 0, "mean": None, "low": None, "high": None, "half": None}
    mean = statistics.fmean(vals)
    if n < 2:
        return {"n": 1, "mean": mean, "low": None, "high": None, "half": None}
    half = float(student_t.ppf(1 - (1 - level) / 2, n - 1)) * statistics.stdev(vals) / math.sqrt(n)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half, "half": half}


def paired_difference(a: dict[int, float | None], b: dict[int, float | None], level: float = LEVEL) -> dict:
    """a[seed] - b[seed] over the seeds where both are present, with its t-interval (t_interval's keys)
    plus "seeds" and "diffs" (in seed order)."""
    seeds = sorted(s for s in a.keys() & b.keys() if a[s] is not None and b[s] is not None)
    diffs = [a[s] - b[s] for s in seeds]
    return {"seeds": seeds, "diffs": diffs, **t_interval(diffs, level)}


# --- one run's numbers ------------------------------------------------------------------------


def read_metrics(path: Path) -> dict[int, dict]:
    """metrics.jsonl as {step: record}; a step logged twice (a resumed run) keeps its last line."""
    try:  # the report's reader: a bad line or a record without an int "step" is named by file and line
        records = read_jsonl(path, {"step": int})
    except ReportError as e:
        raise StudyError(str(e)) from None
    return {rec["step"]: rec for rec in records}


def step_seconds(rec: dict) -> float:
    """A step's seconds: the sum of its `time/*` phases (the trainer logs no step total)."""
    return sum(v for k, v in rec.items() if k.startswith("time/"))


def summarize_run(run_dir: Path, last_step: int, algo_replay: bool) -> dict:
    """The numbers of one finished run (the module docstring says what each means).

    Args:
        run_dir: the run folder (metrics.jsonl; report.json when `algo_replay`).
        last_step: the run's configured number of steps: its final evaluation must be there.
        algo_replay: whether the algo has a replay buffer (then report.json must exist).
    """
    metrics_path = run_dir / "metrics.jsonl"
    by_step = read_metrics(metrics_path)
    out: dict = {"run_dir": str(run_dir)}
    for fam in FAMILIES:
        key = f"eval/{fam}_acc"
        curve = [(s, by_step[s][key]) for s in sorted(by_step) if by_step[s].get(key) is not None]
        ends = dict(curve)
        for step, name in ((0, "start"), (last_step, "final")):
            if step not in ends:
                raise StudyError(f"{metrics_path}: no '{key}' at step {step} (the study needs the evaluation "
                                 f"before training and at the last step, run.eval_every > 0)")
            out[f"{fam}_{name}"] = ends[step]
        out[f"{fam}_gain"] = out[f"{fam}_final"] - out[f"{fam}_start"]
        out[f"{fam}_final_se"] = by_step[last_step].get(f"eval/{fam}_se")
        out[f"{fam}_curve"] = curve

    train = [by_step[s] for s in sorted(by_step) if s > 0]

    def mean_of(key: str, steps: list[dict] = train) -> float | None:
        vals = [rec[key] for rec in steps if rec.get(key) is not None]
        return statistics.fmean(vals) if vals else None

    teacher_keys = sorted({k for rec in train for k in rec if k.endswith("/teacher_tokens")})
    out.update(
        bcq_acc=mean_of("zppo/bcq_acc"),
        ncq_acc=mean_of("zppo/ncq_acc"),
        bcq_first=mean_of("zppo/bcq_acc", train[:5]),
        ncq_first=mean_of("zppo/ncq_acc", train[:5]),
        hard_plain_first=mean_of("reward/hard_mean", train[:5]),
        hard_plain_last=mean_of("reward/hard_mean", train[-5:]),
        replayed_acc=mean_of("reward/replayed_mean"),
        admitted=None,
        student_tokens=float(sum(rec.get("perf/student_tokens", 0) for rec in train)),
        teacher_tokens=float(sum(rec.get(k, 0) for rec in train for k in teacher_keys)) if teacher_keys else None,
        step_s=statistics.median(step_seconds(rec) for rec in train) if train else None,
        grad0_admitted=None, grad0_graduated=None, grad0_share=None, grad0_visited=None, grad0_visited_share=None,
        grad_exit_share=None,
    )
    if algo_replay:
        report_path = run_dir / "report.json"
        if not report_path.is_file():
            raise StudyError(f"{report_path}: missing (the trainer writes it at the end of a run with a replay buffer)")
        report = json.loads(report_path.read_text())
        if "visited" not in report["total"]:  # written before zppo_fast.report counted visits: read the run again
            report = write_report(run_dir)
        zero = report["buckets"][0]  # "0/G": admitted at accuracy 0 of G
        bucket, total = report["per_bucket"][zero], report["total"]
        out.update(grad0_admitted=bucket["admitted"], grad0_graduated=bucket["graduated"],
                   grad0_share=bucket["graduated"] / bucket["admitted"] if bucket["admitted"] else None,
                   grad0_visited=bucket["visited"], grad0_visited_share=bucket["graduated_per_visited"],
                   grad_exit_share=total["graduated_share"], exits=total["graduated"] + total["evicted"],
                   admitted=total["admitted"])
    return out


# --- the premise, before any RL ----------------------------------------------------------------


def premise(cfg, student_dir: Path, teacher_dir: Path, questions: int = 256, samples: int = 8) -> dict:
    """The testbed's premise, measured on the warm-ups before any RL, on the first `questions` held-out
    hard questions at the rollout settings (`samples` each): the student's plain accuracy and the share
    of questions it gets 0 of `samples`; the teacher's accuracy; the student's accuracy on the BCQ prompt
    the trainer would build (a teacher-correct and a student-wrong sample, raw, in a seeded order) for
    the questions that have both; and the student's easy-family accuracy."""
    import random

    from zppo_fast.data import chat_prompt_ids
    from zppo_fast.engine import SamplingParams, TransformersEngine
    from zppo_fast.model import load_model
    from zppo_fast.prompts import build_bcq
    from zppo_fast.reward import grade
    from zppo_fast.testbed import embedded_task

    task = embedded_task(cfg.task)
    params = SamplingParams(n=samples, temperature=cfg.rollout.temperature, max_new_tokens=cfg.rollout.max_new_tokens,
                            seed=cfg.sft.seed)
    engines = {role: TransformersEngine(*load_model(path, cfg.model.dtype)) for role, path in
               (("student", student_dir), ("teacher", teacher_dir))}
    tokenizer = engines["student"].tokenizer

    def sample(role: str, texts: list[str]) -> list[list[str]]:
        return [[s.text for s in group] for group in
                engines[role].generate([chat_prompt_ids(tokenizer, t) for t in texts], params)]

    def scores(groups: list[list[str]], problems) -> list[list[float]]:
        return [[grade(text, p.answer) for text in group] for group, p in zip(groups, problems)]

    hard = [task.problem(q) for q in task.heldout_ids("hard")[:questions]]
    easy = [task.problem(q) for q in task.heldout_ids("easy")[:questions]]
    student, teacher = sample("student", [p.question for p in hard]), sample("teacher", [p.question for p in hard])
    s_scores, t_scores = scores(student, hard), scores(teacher, hard)
    rng = random.Random(cfg.sft.seed)
    guided = [(build_bcq(p.question, t[ts.index(1.0)], s[ss.index(0.0)], rng), p)
              for p, s, t, ss, ts in zip(hard, student, teacher, s_scores, t_scores) if 1.0 in ts and 0.0 in ss]
    b_scores = scores(sample("student", [text for text, _ in guided]), [p for _, p in guided])

    def mean(rows: list[list[float]]) -> float | None:
        flat = [x for row in rows for x in row]
        return sum(flat) / len(flat) if flat else None

    return {"questions": len(hard), "samples": samples,
            "student_hard_acc": mean(s_scores), "student_hard_zero_share": sum(max(r) == 0 for r in s_scores) / len(hard),
            "teacher_hard_acc": mean(t_scores), "bcq_questions": len(guided), "student_bcq_hard_acc": mean(b_scores),
            "student_easy_acc": mean(scores(sample("student", [p.question for p in easy]), easy))}


def fmt_value(x: float | None) -> str:
    """ "0.123", "-" for None (no sample to average, e.g. no question had both BCQ candidates)."""
    return "-" if x is None else f"{x:.3f}"


def premise_text(p: dict) -> str:
    f = fmt_value
    return (f"The premise, before RL ({p['questions']} held-out hard questions x {p['samples']} samples at the rollout "
            f"temperature): the student's plain accuracy {f(p['student_hard_acc'])}, 0 of {p['samples']} on "
            f"{p['student_hard_zero_share']:.0%} of them; the teacher's accuracy {f(p['teacher_hard_acc'])}; the student "
            f"on BCQ prompts (a teacher-correct and a student-wrong candidate, {p['bcq_questions']} questions) "
            f"{f(p['student_bcq_hard_acc'])}; the student on {p['questions']} easy held-out questions "
            f"{f(p['student_easy_acc'])}.")


# --- running ----------------------------------------------------------------------------------


class Run(typing.NamedTuple):
    algo: str
    seed: int
    run_dir: Path
    log: Path
    argv: list[str]  # the trainer's overrides


def finished(run: Run, last_step: int) -> bool:
    """Whether `run` completed earlier with the same command (its `done` file) and its last step logged."""
    done, metrics = run.run_dir / "done", run.run_dir / "metrics.jsonl"
    if not (done.is_file() and metrics.is_file()):
        return False
    return json.loads(done.read_text())["argv"] == run.argv and last_step in read_metrics(metrics)


def log_tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def run_all(runs: list[Run], jobs: int, last_step: int, on_done: typing.Callable[[Run, float], None]) -> None:
    """Run the trainer for every run, `jobs` at a time; `on_done(run, wall_s)` after each success.
    A failure stops the others (they are not reused: no `done` file) and raises StudyError."""
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    pending, running = list(runs), {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                run = pending.pop(0)
                run.log.parent.mkdir(parents=True, exist_ok=True)
                with run.log.open("w") as log:  # the child holds its own copy of the descriptor
                    proc = subprocess.Popen([sys.executable, "-m", "zppo_fast.train", *run.argv], cwd=ROOT, env=env,
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                running[proc] = (run, time.perf_counter())
            time.sleep(0.5)
            for proc in [p for p in running if p.poll() is not None]:
                run, t0 = running.pop(proc)
                wall = time.perf_counter() - t0
                metrics = run.run_dir / "metrics.jsonl"
                if proc.returncode != 0 or not metrics.is_file() or last_step not in read_metrics(metrics):
                    why = (f"exited {proc.returncode}" if proc.returncode
                           else f"exited 0 without step {last_step} in {metrics}")
                    print(f"[effect] {run.algo} seed {run.seed} {why}; the end of {run.log}:\n{log_tail(run.log)}",
                          file=sys.stderr, flush=True)
                    raise StudyError(f"run {run.run_dir} {why}; its log: {run.log}")
                (run.run_dir / "done").write_text(json.dumps({"argv": run.argv, "wall_s": wall}) + "\n")
                on_done(run, wall)
    finally:
        for proc in running:  # a failure or Ctrl-C: the runs still going are our children; stop them
            proc.terminate()
        for proc in running:
            proc.wait()


# --- reporting --------------------------------------------------------------------------------


def fmt_interval(ci: dict, spec: str) -> str:
    """ "mean [low, high]", "mean" for one value, "-" for none."""
    if ci["mean"] is None:
        return "-"
    if ci["half"] is None:
        return format(ci["mean"], spec)
    return f"{format(ci['mean'], spec)} [{format(ci['low'], spec)}, {format(ci['high'], spec)}]"


def aggregate(results: dict[str, dict[int, dict]]) -> dict[str, dict[str, dict]]:
    """{algo: {quantity: t_interval over its seeds}}."""
    return {algo: {key: t_interval(r[key] for r in runs.values()) for key, _, _ in QUANTITIES}
            for algo, runs in results.items()}


def paired(results: dict[str, dict[int, dict]]) -> dict[str, dict] | None:
    """{quantity: paired_difference} of PAIR over the seeds both ran; None when either algo is absent."""
    a, b = PAIR
    if a not in results or b not in results:
        return None
    return {key: paired_difference({s: r[key] for s, r in results[a].items()},
                                   {s: r[key] for s, r in results[b].items()}) for key, _, _ in PAIRED}


def verdict(diffs: dict[str, dict] | None) -> str:
    """The one sentence --record writes on whether zppo beat grpo_replay on the hard family."""
    a, b = PAIR
    if diffs is None:
        return f"No paired comparison: the study did not run both {a} and {b}."
    d = diffs["hard_final"]
    if d["half"] is None:
        return (f"{a} - {b} on the hard family's final accuracy: {d['mean']:+.3f} over {d['n']} paired seed(s), "
                f"too few for an interval, so this run does not say whether {a} beat {b}."
                if d["n"] else f"No seed ran both {a} and {b}.")
    ci = f"{d['mean']:+.3f}, 95% interval [{d['low']:+.3f}, {d['high']:+.3f}] over {d['n']} paired seeds"
    if d["low"] > 0:
        return f"{a} beat {b} on the hard family: the paired difference in final accuracy is {ci}, which excludes 0."
    if d["high"] < 0:
        return (f"{a} did worse than {b} on the hard family: the paired difference in final accuracy is {ci}, "
                f"which excludes 0.")
    return (f"{a} did not beat {b} on the hard family: the paired difference in final accuracy is {ci}, "
            f"which includes 0.")


def mechanism(results: dict[str, dict[int, dict]], stats: dict[str, dict[str, dict]], check: dict, steps: int,
              group_size: int) -> str:
    """The paragraph --record writes on each link of ZPPO's mechanism, in numbers: can the student use
    candidates, does what it learns on guided prompts reach plain ones, how far the buffer turns over.
    Sentences whose algo the study did not run are left out."""
    a, b = PAIR

    def v(algo: str, key: str, spec: str = ".3f") -> str:
        return fmt_interval(stats[algo][key], spec) if algo in stats else "-"

    def visited(algo: str) -> str:  # share of the 0-of-G admissions replayed at least once
        return fmt_interval(t_interval(r["grad0_visited"] / r["grad0_admitted"] for r in results[algo].values()
                                       if r["grad0_admitted"]), ".0%")

    parts = [f"Can the student use candidates? Before RL it solves {fmt_value(check['student_bcq_hard_acc'])} of "
             f"hard questions on BCQ prompts against {fmt_value(check['student_hard_acc'])} plainly"]
    if a in stats:
        parts[0] += (f"; in {a}'s first 5 steps its BCQ rollouts score {v(a, 'bcq_first')} and its NCQ rollouts "
                     f"{v(a, 'ncq_first')} (the paper: 69% BCQ at 0.8B, about 1% NCQ)")
    if a in stats and b in stats:
        parts.append(f"Does learning on guided prompts reach plain ones? The replayed questions, asked plainly: "
                     f"{a} {v(a, 'replayed_acc')}, {b} {v(b, 'replayed_acc')}; plain accuracy on the hard training "
                     f"questions over the last 5 steps: {a} {v(a, 'hard_plain_last')}, {b} {v(b, 'hard_plain_last')}")
        parts.append(f"How far does the buffer turn over? In {steps} steps {a} admits {v(a, 'admitted', ',.0f')} "
                     f"questions, replays {visited(a)} of those admitted at 0 of {group_size} at least once and "
                     f"graduates {v(a, 'grad0_visited_share', '.1%')} of the ones it replays ({b}: "
                     f"{v(b, 'admitted', ',.0f')}, {visited(b)}, {v(b, 'grad0_visited_share', '.1%')}); graduations "
                     f"are {v(a, 'grad_exit_share', '.0%')} of {a}'s exits")
    return ". ".join(parts) + "."


def table(results: dict[str, dict[int, dict]], stats: dict[str, dict[str, dict]]) -> str:
    head = ["algo", "seeds", *(h for _, h, _ in QUANTITIES)]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for algo, per in stats.items():
        rows.append("| " + " | ".join([algo, str(len(results[algo])),
                                       *(fmt_interval(per[key], spec) for key, _, spec in QUANTITIES)]) + " |")
    return "\n".join(rows)


def paired_lines(diffs: dict[str, dict] | None) -> str:
    if diffs is None:
        return ""
    a, b = PAIR
    return "\n".join(f"- {a} - {b}, {name}: {fmt_interval(diffs[key], spec)} (seeds {diffs[key]['seeds']}; per seed "
                     f"{', '.join(format(x, spec) for x in diffs[key]['diffs'])})" for key, name, spec in PAIRED)


def note(results: dict[str, dict[int, dict]], cfg) -> str:
    ses = {fam: [r[f"{fam}_final_se"] for runs in results.values() for r in runs.values()
                 if r[f"{fam}_final_se"] is not None] for fam in FAMILIES}
    se = ", ".join(f"{fam} {max(v):.3f}" for fam, v in ses.items() if v) or "not logged"
    return (f"Mean over seeds [95% t-interval]. Every algo starts from the same warm-up student and teacher and "
            f"runs {cfg.run.steps} rollout steps of {cfg.rl.batch_size} new questions x {cfg.rl.group_size}; "
            f"paired differences match seed K of one algo with seed K of the other. Accuracy: greedy, held out, "
            f"at step 0 (start) and step {cfg.run.steps} (final); the largest standard error of one run's final "
            f"accuracy: {se}. 0-of-G graduated: share of the questions admitted to the replay buffer at accuracy 0 of "
            f"{cfg.rl.group_size} that graduated by the end; / visited: of those replayed at least once; graduated / exits: graduations over graduations + "
            f"evictions. Tokens: sampled over the run. s / step: median over steps, evaluations excluded.")


def band(ax, runs: dict[int, dict], key: str, label: str, style: tuple[str, str]) -> None:
    """Mean curve over seeds at the steps every seed evaluated, with its 95% t-band (2+ seeds)."""
    curves = [dict(r[key]) for r in runs.values()]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    cis = [t_interval(c[s] for c in curves) for s in steps]
    marker, ls = style
    (line,) = ax.plot(steps, [c["mean"] for c in cis], marker=marker, ls=ls, label=f"{label} (n={len(curves)})")
    if len(curves) > 1:
        ax.fill_between(steps, [c["low"] for c in cis], [c["high"] for c in cis], color=line.get_color(), alpha=0.2)


def plot_curves(results: dict[str, dict[int, dict]], path: Path) -> None:
    from matplotlib.figure import Figure  # the Agg canvas, no global pyplot backend

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    # distinct markers and line styles: identical curves stay visible
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", "-"), ("x", "--")]
    for ax, fam in zip(fig.subplots(1, 2), FAMILIES):
        for i, (algo, runs) in enumerate(results.items()):
            band(ax, runs, f"{fam}_curve", algo, styles[i % len(styles)])
        ax.set(xlabel="rollout step", ylabel="held-out accuracy (greedy)", ylim=(-0.02, 1.02),
               title=f"{fam} family: mean and 95% band over seeds")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.savefig(path, format="png", dpi=120)


def plot_graduation(stats: dict[str, dict[str, dict]], path: Path, group_size: int) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    panels = (("grad0_share", f"admitted at 0 of {group_size}: share graduated"),
              ("grad_exit_share", "buffer exits: share graduated"))
    for ax, (key, title) in zip(fig.subplots(1, 2), panels):
        algos = [a for a, per in stats.items() if per[key]["mean"] is not None]
        cis = [stats[a][key] for a in algos]
        x = range(len(algos))
        # one seed has no interval: no error bar (drawn as zero length)
        err = [[c["mean"] - c["low"] if c["half"] is not None else 0.0 for c in cis],
               [c["high"] - c["mean"] if c["half"] is not None else 0.0 for c in cis]]
        ax.bar(x, [c["mean"] for c in cis], yerr=err, capsize=4, color="tab:green")
        for xi, c in zip(x, cis):
            ax.text(xi, 1.02, f"n={c['n']}", ha="center", fontsize=8)
        ax.set(xticks=list(x), xticklabels=algos, ylim=(0, 1.1), ylabel="share (mean, 95% interval over seeds)",
               title=title)
        ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, format="png", dpi=120)


def record(study: dict, out: Path) -> None:
    """Copy the figures to bench/ and rewrite the RESULTS.md section from the study's numbers."""
    for name in ("effect_curves.png", "effect_graduation.png"):
        shutil.copyfile(out / name, ROOT / "bench" / name)
    lines = [
        f"Device: {study['device']}, CPU only, {study['jobs']} run(s) at a time, one "
        f"intra-op thread each. Date: {study['date']}. Commit: {study['commit']}. torch {study['torch']}. "
        f"Wall time: {study['wall_s']:.0f} s"
        + (f" ({study['reused']} of the runs reused from an earlier invocation; every run's own time summed, "
           f"divided by the runs at a time: {study['runs_wall_s'] / study['jobs']:.0f} s)." if study['reused'] else "."),
        f"Command: `{study['command']}`",
        "",
        study["premise_text"],
        "",
        study["table"],
        "",
        study["note"],
        "",
        "![held-out accuracy per family vs step](effect_curves.png)",
        "",
        "![graduation of 0-of-G admissions and graduation share of exits](effect_graduation.png)",
    ]
    if study["paired_text"]:
        lines += ["", "Paired differences (same seed, same held-out questions; mean [95% t-interval]):", "",
                  study["paired_text"]]
    lines += ["", study["verdict"], "", study["mechanism_text"]]
    record_section(SECTION, "\n".join(lines))


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python bench/effect.py", allow_abbrev=False,
        description="ZPPO's effect on the CPU testbed: several seeds per algo, 95% intervals, paired differences.",
        epilog="Any other --section.key VALUE is a config override applied to every run.")
    parser.add_argument("--algos", default=None,
                        help=f"comma-separated rl.algo values (default {','.join(MAIN_ALGOS + ABLATIONS)}; "
                             f"{','.join(QUICK_ALGOS)} with --quick)")
    parser.add_argument("--seeds", type=int, default=5, help=f"seeds 0..K-1 of {', '.join(MAIN_ALGOS)} (default 5)")
    parser.add_argument("--ablation-seeds", type=int, default=3, help="seeds 0..K-1 of every other algo (default 3)")
    parser.add_argument("--steps", type=int, default=None,
                        help="rollout steps per run (default: the config's run.steps)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--out", default=None,
                        help="output folder (default runs/effect; runs/effect_quick with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: grpo_replay and zppo, one seed, 2 steps, tiny sizes")
    parser.add_argument("--record", action="store_true",
                        help="copy the figures to bench/ and rewrite the \"ZPPO's effect\" section of bench/RESULTS.md")
    args, rest = parser.parse_known_args(argv)
    for name in ("seeds", "ablation_seeds", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.quick and args.record:
        parser.error("--record writes bench/RESULTS.md; a --quick run is a smoke test, not a result")
    for forced in PER_RUN:
        if any(o == forced or o.startswith(forced + "=") for o in rest):
            parser.error(f"{forced} is set per run by this script")
    return args, rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parse_args(argv)
    algos = [a.strip() for a in (args.algos or ",".join(QUICK_ALGOS if args.quick else MAIN_ALGOS + ABLATIONS))
             .split(",") if a.strip()]
    known = typing.get_args(AlgoName)
    bad = [a for a in algos if a not in known]
    if bad:
        print(f"error: unknown algo(s) {', '.join(bad)}; choose from {', '.join(known)}", file=sys.stderr)
        return 2
    out = Path(args.out or ("runs/effect_quick" if args.quick else "runs/effect")).resolve()
    settings = STUDY + BUDGET + (QUICK if args.quick else []) + (["--run.steps", str(args.steps)] if args.steps else [])
    tmp = None
    if args.quick and not any(o.startswith("--sft.cache_dir") for o in overrides):
        tmp = tempfile.TemporaryDirectory(prefix="effect_quick_")  # the tiny warm-ups are of no later use
        settings += ["--sft.cache_dir", str(Path(tmp.name) / "sft")]
    settings += overrides

    def seeds(algo: str) -> range:
        return range(1 if args.quick else args.seeds if algo in MAIN_ALGOS else args.ablation_seeds)

    runs = []
    try:
        base = load_config(None, settings)
        if base.run.eval_every < 1:
            raise ConfigError("run.eval_every must be > 0: the study compares held-out accuracy")
        for algo in algos:
            for seed in seeds(algo):
                run_dir = out / algo / f"seed{seed}"
                argv_run = settings + ["--rl.algo", algo, "--run.seed", str(seed), "--run.out_dir", str(run_dir),
                                       "--run.overwrite", "true"]
                load_config(None, argv_run)  # a bad override fails here, before any run starts
                runs.append(Run(algo, seed, run_dir, out / algo / f"seed{seed}.log", argv_run))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The study folder is ours (a marker), kept across invocations so finished runs are reused; a
    # non-empty folder of the user's is refused, untouched.
    from zppo_fast import ownership

    if ownership.kind_of(out) != "study":
        try:
            ownership.check_claim(out, "study")
        except ownership.NotOursError as e:
            print(f"error: --out {out}: {e}", file=sys.stderr)
            return 2
        ownership.mark(out, "study")

    import torch

    from zppo_fast.sft import prepare_warm_starts
    from zppo_fast.zppo import ALGOS

    last = base.run.steps
    t_start = time.perf_counter()
    student_dir, teacher_dir = prepare_warm_starts(base)  # before any run: parallel runs only read the cache
    print(f"[effect] warm-ups ready in {base.sft.cache_dir} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    torch.set_num_threads(base.run.cpu_threads)
    check = premise(base, student_dir, teacher_dir, questions=16 if args.quick else 256)
    print(f"[effect] {premise_text(check)}", flush=True)

    results: dict[str, dict[int, dict]] = {a: {} for a in algos}
    todo = [r for r in runs if not finished(r, last)]
    for r in runs:
        if r not in todo:
            results[r.algo][r.seed] = summarize_run(r.run_dir, last, ALGOS[r.algo].replay)
    print(f"[effect] {len(runs)} runs ({len(runs) - len(todo)} reused from {out}), {args.jobs} at a time, "
          f"{last} steps each", flush=True)
    t_runs = time.perf_counter()

    def on_done(run: Run, wall: float) -> None:
        res = results[run.algo][run.seed] = summarize_run(run.run_dir, last, ALGOS[run.algo].replay)
        done = sum(len(v) for v in results.values()) - (len(runs) - len(todo))
        elapsed = time.perf_counter() - t_runs
        eta = elapsed / done * (len(todo) - done)
        print(f"[effect] {done}/{len(todo)} {run.algo} seed {run.seed}: hard {res['hard_start']:.3f} -> "
              f"{res['hard_final']:.3f}, easy {res['easy_start']:.3f} -> {res['easy_final']:.3f} in {wall:.0f} s; "
              f"elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min", flush=True)

    try:
        run_all(todo, args.jobs, last, on_done)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if tmp is not None:
            tmp.cleanup()
    wall = time.perf_counter() - t_start

    stats, diffs = aggregate(results), paired(results)
    md, text = table(results, stats), note(results, base)
    study = {
        "command": " ".join(["python", "bench/effect.py", *argv]), "settings": settings, "algos": algos,
        "seeds": {a: sorted(results[a]) for a in algos}, "steps": last, "jobs": args.jobs,
        "commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"{cpu_name()} ({os.cpu_count()} cores)", "torch": torch.__version__,
        "python": platform.python_version(), "wall_s": wall, "config": base.to_dict(),
        "runs": {a: {str(s): r for s, r in sorted(results[a].items())} for a in algos},
        "stats": stats, "paired": diffs, "paired_text": paired_lines(diffs), "verdict": verdict(diffs),
        "table": md, "note": text, "premise": check, "premise_text": premise_text(check),
        "mechanism_text": mechanism(results, stats, check, last, base.rl.group_size),
        "runs_wall_s": sum(json.loads((r.run_dir / "done").read_text())["wall_s"] for r in runs),
        "reused": len(runs) - len(todo),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "effect.json").write_text(json.dumps(study, indent=1) + "\n")
    (out / "effect.md").write_text("\n\n".join(filter(None, [study["premise_text"], md, text, study["paired_text"],
                                                           study["verdict"], study["mechanism_text"]])) + "\n")
    plot_curves(results, out / "effect_curves.png")
    plot_graduation(stats, out / "effect_graduation.png", base.rl.group_size)
    print()
    print(md)
    print()
    print(text)
    if study["paired_text"]:
        print("\n" + study["paired_text"])
    print("\n" + study["verdict"])
    print("\n" + study["mechanism_text"])
    print(f"\n[effect] total wall time {wall:.0f} s; wrote {out / 'effect.json'}, {out / 'effect.md'}, "
          f"{out / 'effect_curves.png'}, {out / 'effect_graduation.png'}")
    if args.record:
        record(study, out)
        print(f"[effect] recorded the section \"{SECTION}\" in bench/RESULTS.md and the figures in bench/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
