"""Graduation telemetry of the replay buffer (the paper's Figs. 4-5).

    python -m zppo_fast.report RUN_DIR

A hard question (plain accuracy r̄_x < 0.5) enters the replay buffer and leaves it either by
*graduating* (a later visit scores r̄_x >= 0.5) or by FIFO *eviction* at capacity. This module
asks, per accuracy at admission -- the buckets 0, 1/G, 2/G, ... below 1/2 for group size G
(0, 1/8, 2/8, 3/8 for G = 8) -- how many admitted questions graduated, over training steps,
and what share of the exits were graduations rather than evictions.

Files read from RUN_DIR (the trainer writes them):

* `replay_history.jsonl` -- required; one JSON object per line, appended at each exit:
  `{"id": int, "step_admitted": int, "acc_admitted": float, "exit_step": int,
    "exit": "graduated" | "evicted", "visits": int}`.
  `id` is the question id; a question admitted again after an exit gets a new record.
  `visits` is the trainer's count of the entry's visits while it was in the buffer.
* `replay_live.jsonl` -- optional; the entries still in the buffer, rewritten whole (not
  appended) at checkpoints and at the end of the run: `{"id", "step_admitted",
  "acc_admitted", "visits"}` as above. Without it, questions still in the buffer are not
  counted as admitted, and the report says how many admissions it could not attribute.
* `metrics.jsonl` -- optional; one JSON object per step with at least `"step"`,
  `"replay/admitted"` and `"replay/graduated"`: the numbers admitted and graduated AT that
  step (not running totals). If a step appears twice (a resumed run), the last line wins.
  Used for the last step of the run and as a cross-check of the totals.
* `config.json` -- optional; `rl.group_size` (nested `{"rl": {"group_size": 8}}` or a flat
  `"rl.group_size"` key). Without it G is inferred from the admission accuracies: 8 if they
  all fit G = 8, else the smallest G they all fit.

Written to RUN_DIR: `report.json` (the dict `summarize` returns, plus the metrics totals) and
`graduation.png` (left: cumulative graduated / cumulative admitted per bucket vs step; right:
share of exits that graduated vs were evicted, per bucket). A small table goes to stdout.

`summarize(history_records, group_size)` is the pure core, shared by this CLI and the trainer
at the end of a run. A missing RUN_DIR or history file, a line that is not valid JSON, or a
record with missing/ill-typed fields fails with `ReportError` naming the file and line.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from zppo_fast.cli import Parser

HISTORY_FILE = "replay_history.jsonl"
LIVE_FILE = "replay_live.jsonl"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
REPORT_FILE = "report.json"
PLOT_FILE = "graduation.png"
DEFAULT_GROUP_SIZE = 8

_LIVE_FIELDS = {"id": int, "step_admitted": int, "acc_admitted": float, "visits": int}
_HISTORY_FIELDS = {**_LIVE_FIELDS, "exit_step": int, "exit": str}
_METRICS_FIELDS = {"step": int, "replay/admitted": int, "replay/graduated": int}
_EXITS = ("graduated", "evicted")


class ReportError(Exception):
    """Unusable input; the message names the file (and line) at fault."""


# --- Pure core ------------------------------------------------------------------------------


def bucket_labels(group_size: int) -> list[str]:
    """"k/G" for every k with k/G < 1/2: the accuracies a hard question can have."""
    return [f"{k}/{group_size}" for k in range((group_size + 1) // 2)]


def _bucket(acc: float, group_size: int, where: str) -> int:
    """k such that acc == k/G, for a hard accuracy; ValueError (naming `where`) otherwise."""
    k = round(acc * group_size)
    if abs(acc * group_size - k) > 1e-6 or not 0 <= 2 * k < group_size:
        raise ValueError(
            f"{where}: acc_admitted {acc!r} is not k/{group_size} below 1/2 "
            f"(wrong group size?)"
        )
    return k


def infer_group_size(accuracies: Iterable[float]) -> int:
    """The group size the admission accuracies imply: 8 if they fit it, else the smallest fit.

    All-zero accuracies fit any G, hence the default first. ValueError if none up to 1024 fits.
    """
    fractions = [Fraction(a).limit_denominator(1024) for a in accuracies]
    if any(f < 0 or f >= Fraction(1, 2) for f in fractions):
        raise ValueError("cannot infer the group size: an acc_admitted is outside [0, 1/2)")
    # Fits G iff G is a multiple of every accuracy's reduced denominator.
    lcm = math.lcm(*(f.denominator for f in fractions)) if fractions else 1
    if DEFAULT_GROUP_SIZE % lcm == 0:
        return DEFAULT_GROUP_SIZE
    if lcm > 1024:
        raise ValueError("cannot infer the group size from acc_admitted; set rl.group_size")
    return lcm


def _flatten(lists: list[list[int]]) -> list[int]:
    return [x for inner in lists for x in inner]


def summarize(
    history_records: Sequence[Mapping[str, Any]],
    group_size: int,
    *,
    live_records: Sequence[Mapping[str, Any]] = (),
    last_step: int | None = None,
) -> dict[str, Any]:
    """Graduation statistics per accuracy-at-admission bucket.

    Args:
        history_records: one mapping per buffer exit (format in the module docstring).
        group_size: G; buckets are k/G for k/G < 1/2.
        live_records: the entries still in the buffer; they count as admitted, not exited.
        last_step: the run's last step, if later than every admission and exit.

    Returns a JSON-ready dict:
        group_size, buckets (labels), steps (first admission .. last step),
        per_bucket[label] and total, each with admitted, graduated, evicted, live counts;
        graduated_share / evicted_share (of exits; None without exits);
        mean_visits_to_graduate, mean_steps_to_graduate (None without graduations);
        visited (admissions visited at least once) and graduated_per_visited (None without
        visits): a short run replays few of its admissions, so graduated / admitted mixes how
        well a visit teaches with how many questions were visited at all;
        and per step: cumulative_admitted, cumulative_graduated, cumulative_graduation_rate
        (graduated / admitted so far; None before the first admission).
    """
    labels = bucket_labels(group_size)
    n = len(labels)
    admit_steps: list[list[int]] = [[] for _ in range(n)]
    grad_steps: list[list[int]] = [[] for _ in range(n)]
    grad_visits: list[list[int]] = [[] for _ in range(n)]
    grad_waits: list[list[int]] = [[] for _ in range(n)]
    evicted = [0] * n
    live = [0] * n
    visited = [0] * n
    for source, records in (("history", history_records), ("live", live_records)):
        for j, rec in enumerate(records):
            k = _bucket(rec["acc_admitted"], group_size, f"{source} record {j} (id {rec['id']})")
            admit_steps[k].append(rec["step_admitted"])
            visited[k] += rec["visits"] > 0
            if source == "live":
                live[k] += 1
            elif rec["exit"] == "graduated":
                grad_steps[k].append(rec["exit_step"])
                grad_visits[k].append(rec["visits"])
                grad_waits[k].append(rec["exit_step"] - rec["step_admitted"])
            else:
                evicted[k] += 1

    all_admits = _flatten(admit_steps)
    end_candidates = all_admits + [r["exit_step"] for r in history_records]
    if last_step is not None:
        end_candidates.append(last_step)
    steps = (
        np.arange(min(all_admits), max(end_candidates) + 1) if all_admits else np.arange(0)
    )

    def stats(admits: list[int], grads: list[int], visits: list[int], waits: list[int],
              n_evicted: int, n_live: int, n_visited: int) -> dict[str, Any]:
        exits = len(grads) + n_evicted
        cum_admitted = np.searchsorted(np.sort(admits), steps, side="right")
        cum_graduated = np.searchsorted(np.sort(grads), steps, side="right")
        return {
            "admitted": len(admits),
            "graduated": len(grads),
            "evicted": n_evicted,
            "live": n_live,
            "visited": n_visited,
            "graduated_per_visited": len(grads) / n_visited if n_visited else None,
            "graduated_share": len(grads) / exits if exits else None,
            "evicted_share": n_evicted / exits if exits else None,
            "mean_visits_to_graduate": float(np.mean(visits)) if visits else None,
            "mean_steps_to_graduate": float(np.mean(waits)) if waits else None,
            "cumulative_admitted": cum_admitted.tolist(),
            "cumulative_graduated": cum_graduated.tolist(),
            "cumulative_graduation_rate": [
                g / a if a else None for g, a in zip(cum_graduated.tolist(), cum_admitted.tolist())
            ],
        }

    per_bucket = {
        labels[k]: stats(admit_steps[k], grad_steps[k], grad_visits[k], grad_waits[k],
                         evicted[k], live[k], visited[k])
        for k in range(n)
    }
    total = stats(_flatten(admit_steps), _flatten(grad_steps), _flatten(grad_visits),
                  _flatten(grad_waits), sum(evicted), sum(live), sum(visited))
    return {
        "group_size": group_size,
        "buckets": labels,
        "steps": steps.tolist(),
        "per_bucket": per_bucket,
        "total": total,
    }


def format_table(summary: Mapping[str, Any]) -> str:
    """The per-bucket counts and shares as a fixed-width text table."""
    head = f"{'acc@admit':>9} {'admitted':>8} {'graduated':>9} {'evicted':>7} {'live':>6} " \
           f"{'grad/adm':>8} {'visited':>7} {'grad/vis':>8} {'grad share':>10} {'visits to grad':>14}"
    rows = [head, "-" * len(head)]

    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    named = [*summary["per_bucket"].items(), ("all", summary["total"])]
    for label, s in named:
        rate = s["graduated"] / s["admitted"] if s["admitted"] else None
        rows.append(
            f"{label:>9} {s['admitted']:>8} {s['graduated']:>9} {s['evicted']:>7} {s['live']:>6} "
            f"{fmt(rate, '.1%'):>8} {s['visited']:>7} {fmt(s['graduated_per_visited'], '.1%'):>8} "
            f"{fmt(s['graduated_share'], '.1%'):>10} "
            f"{fmt(s['mean_visits_to_graduate'], '.2f'):>14}"
        )
    return "\n".join(rows)


def plot(summary: Mapping[str, Any], path: str | Path) -> None:
    """Write the two-panel figure (Figs. 4-5 of the paper) as a PNG."""
    # The object-oriented API renders with Agg without touching pyplot's global backend,
    # so the trainer can call this in-process whatever backend it has.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    labels = summary["buckets"]
    for label in labels:
        rate = summary["per_bucket"][label]["cumulative_graduation_rate"]
        y = [np.nan if r is None else r for r in rate]
        left.plot(summary["steps"], y, label=f"acc {label}")
    left.set(xlabel="step", ylabel="cumulative graduated / admitted", ylim=(0, 1.02),
             title="Graduation by accuracy at admission")
    left.legend(loc="best")
    left.grid(alpha=0.3)

    grad = [summary["per_bucket"][b]["graduated_share"] or 0.0 for b in labels]
    evic = [summary["per_bucket"][b]["evicted_share"] or 0.0 for b in labels]
    x = np.arange(len(labels))
    right.bar(x, grad, label="graduated", color="tab:green")
    right.bar(x, evic, bottom=grad, label="evicted", color="tab:red")
    for xi, b in zip(x, labels):
        s = summary["per_bucket"][b]
        right.text(xi, 1.02, f"n={s['graduated'] + s['evicted']}", ha="center", fontsize=8)
    right.set(xticks=x, xticklabels=labels, xlabel="accuracy at admission",
              ylabel="share of exits", ylim=(0, 1.1), title="Exit: graduated vs evicted")
    right.legend(loc="lower right")
    fig.savefig(path, format="png", dpi=120)


# --- Files ----------------------------------------------------------------------------------


def _check_fields(rec: Any, fields: Mapping[str, type], where: str) -> None:
    if not isinstance(rec, dict):
        raise ReportError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key, typ in fields.items():
        if key not in rec:
            raise ReportError(f"{where}: missing key {key!r}")
        value = rec[key]
        # bool is an int subclass in Python but never a valid count; floats accept ints.
        ok = not isinstance(value, bool) and (
            isinstance(value, (int, float)) if typ is float else isinstance(value, typ)
        )
        if not ok:
            raise ReportError(f"{where}: {key!r} should be {typ.__name__}, got {value!r}")
    if "exit" in fields and rec["exit"] not in _EXITS:
        raise ReportError(f"{where}: 'exit' should be one of {_EXITS}, got {rec['exit']!r}")


def read_jsonl(path: Path, fields: Mapping[str, type] | None = None) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file (blank lines skipped), each checked for `fields`."""
    records = []
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror or e})") from e
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
        _check_fields(rec, fields or {}, f"{path}:{lineno}")
        records.append(rec)
    return records


def _config_group_size(run_dir: Path) -> int | None:
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: cannot read the config ({e})") from e
    value = config.get("rl.group_size", (config.get("rl") or {}).get("group_size"))
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ReportError(f"{path}: rl.group_size should be a positive int, got {value!r}")
    return value


def write_report(run_dir: str | Path) -> dict[str, Any]:
    """Read RUN_DIR, write report.json and graduation.png there, return the report dict."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    history_path = run_dir / HISTORY_FILE
    if not history_path.is_file():
        raise ReportError(f"{history_path}: missing (the trainer writes it at each buffer exit)")
    history = read_jsonl(history_path, _HISTORY_FIELDS)
    live_path = run_dir / LIVE_FILE
    live = read_jsonl(live_path, _LIVE_FIELDS) if live_path.is_file() else []
    metrics_path = run_dir / METRICS_FILE
    # Lines without replay counts (the step-0 evaluation, algos without a buffer) are skipped.
    metrics = []
    for lineno, rec in enumerate(read_jsonl(metrics_path) if metrics_path.is_file() else [], 1):
        if isinstance(rec, dict) and "replay/admitted" in rec:
            _check_fields(rec, _METRICS_FIELDS, f"{metrics_path}:{lineno}")
            metrics.append(rec)
    by_step = {m["step"]: m for m in metrics}  # a resumed run's repeated step: last wins

    group_size = _config_group_size(run_dir)
    try:
        if group_size is None:
            group_size = infer_group_size(r["acc_admitted"] for r in [*history, *live])
        summary = summarize(history, group_size, live_records=live,
                            last_step=max(by_step) if by_step else None)
    except ValueError as e:
        raise ReportError(f"{run_dir}: {e}") from e

    if by_step:
        admitted = sum(m["replay/admitted"] for m in by_step.values())
        graduated = sum(m["replay/graduated"] for m in by_step.values())
        summary["metrics"] = {
            "admitted": admitted,
            "graduated": graduated,
            # Admissions the history + live snapshot do not cover (e.g. no replay_live.jsonl).
            "unattributed_admitted": admitted - summary["total"]["admitted"],
        }
    (run_dir / REPORT_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, run_dir / PLOT_FILE)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: write the report of one run directory and print its table."""
    parser = Parser("zppo_fast.report", __doc__)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the trainer's output directory")
    args = parser.parse_args(argv)
    try:
        summary = write_report(args.run_dir)
    except ReportError as e:
        print(f"zppo_fast.report: error: {e}", file=sys.stderr)
        return 2
    steps = summary["steps"]
    span = f"steps {steps[0]}..{steps[-1]}" if steps else "no admissions"
    print(f"group size {summary['group_size']}, {span}")
    print(format_table(summary))
    if summary.get("metrics", {}).get("unattributed_admitted"):
        print(f"note: {summary['metrics']['unattributed_admitted']} admissions in {METRICS_FILE} "
              f"are in neither {HISTORY_FILE} nor {LIVE_FILE}")
    run_dir = Path(args.run_dir)
    print(f"wrote {run_dir / REPORT_FILE} and {run_dir / PLOT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
