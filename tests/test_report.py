"""Replay-buffer graduation telemetry on a small synthetic run, numbers worked by hand."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zppo_fast.report import (
    ReportError,
    bucket_labels,
    infer_group_size,
    main,
    summarize,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]


def exit_(id, admitted, acc, exit_step, exit, visits):
    return {"id": id, "step_admitted": admitted, "acc_admitted": acc, "exit_step": exit_step,
            "exit": exit, "visits": visits}


# G = 8. Buckets: 0/8 {1 grad, 2 evict, 6 live}, 1/8 {3 grad}, 2/8 {7 live}, 3/8 {4, 5 grad}.
HISTORY = [
    exit_(1, 1, 0.0, 3, "graduated", 2),
    exit_(2, 1, 0.0, 5, "evicted", 3),
    exit_(3, 2, 0.125, 4, "graduated", 1),
    exit_(4, 2, 0.375, 3, "graduated", 1),
    exit_(5, 4, 0.375, 6, "graduated", 2),
]
LIVE = [
    {"id": 6, "step_admitted": 5, "acc_admitted": 0.0, "visits": 1},
    {"id": 7, "step_admitted": 6, "acc_admitted": 0.25, "visits": 0},
]
# Admitted / graduated AT each step; they agree with HISTORY + LIVE. Step 7 only moves the end.
METRICS = [
    {"step": s, "replay/admitted": a, "replay/graduated": g, "loss": 0.0}
    for s, a, g in [(1, 2, 0), (2, 2, 0), (3, 0, 2), (4, 1, 1), (5, 1, 0), (6, 1, 1), (7, 0, 0)]
]


def test_summarize_by_hand():
    s = summarize(HISTORY, 8, live_records=LIVE, last_step=7)
    assert s["group_size"] == 8
    assert s["buckets"] == ["0/8", "1/8", "2/8", "3/8"]
    assert s["steps"] == [1, 2, 3, 4, 5, 6, 7]
    b0, b1, b2, b3 = (s["per_bucket"][b] for b in s["buckets"])

    assert (b0["admitted"], b0["graduated"], b0["evicted"], b0["live"]) == (3, 1, 1, 1)
    assert b0["graduated_share"] == 0.5 and b0["evicted_share"] == 0.5
    assert b0["mean_visits_to_graduate"] == 2.0 and b0["mean_steps_to_graduate"] == 2.0
    assert b0["visited"] == 3 and b0["graduated_per_visited"] == pytest.approx(1 / 3)
    assert b0["cumulative_admitted"] == [2, 2, 2, 2, 3, 3, 3]
    assert b0["cumulative_graduated"] == [0, 0, 1, 1, 1, 1, 1]
    assert b0["cumulative_graduation_rate"] == pytest.approx([0, 0, 0.5, 0.5, 1 / 3, 1 / 3, 1 / 3])

    assert (b1["admitted"], b1["graduated"], b1["evicted"], b1["live"]) == (1, 1, 0, 0)
    assert b1["graduated_share"] == 1.0 and b1["evicted_share"] == 0.0
    assert b1["cumulative_graduation_rate"] == [None, 0, 0, 1, 1, 1, 1]

    assert (b2["admitted"], b2["graduated"], b2["evicted"], b2["live"]) == (1, 0, 0, 1)
    assert b2["graduated_share"] is None and b2["mean_visits_to_graduate"] is None
    assert b2["visited"] == 0 and b2["graduated_per_visited"] is None  # id 7: never visited
    assert b2["cumulative_graduation_rate"] == [None] * 5 + [0, 0]

    assert (b3["admitted"], b3["graduated"], b3["evicted"]) == (2, 2, 0)
    assert b3["cumulative_admitted"] == [0, 1, 1, 2, 2, 2, 2]
    assert b3["cumulative_graduated"] == [0, 0, 1, 1, 1, 2, 2]
    assert b3["mean_visits_to_graduate"] == 1.5 and b3["mean_steps_to_graduate"] == 1.5

    t = s["total"]
    assert (t["admitted"], t["graduated"], t["evicted"], t["live"]) == (7, 4, 1, 2)
    assert t["graduated_share"] == 0.8
    assert t["visited"] == 6 and t["graduated_per_visited"] == pytest.approx(4 / 6)
    assert t["mean_visits_to_graduate"] == 1.5 and t["mean_steps_to_graduate"] == 1.75
    assert t["cumulative_admitted"] == [2, 4, 4, 5, 6, 7, 7]
    assert t["cumulative_graduated"] == [0, 0, 2, 3, 3, 4, 4]
    json.dumps(s)  # JSON-ready


def test_summarize_history_only_and_empty():
    s = summarize(HISTORY, 8)  # no live entries, no last step: steps end at the last exit
    assert s["steps"] == [1, 2, 3, 4, 5, 6]
    assert s["total"]["admitted"] == 5 and s["total"]["live"] == 0
    empty = summarize([], 4)
    assert empty["buckets"] == ["0/4", "1/4"] and empty["steps"] == []
    assert empty["total"]["graduated_share"] is None


def test_summarize_rejects_accuracy_off_the_grid():
    with pytest.raises(ValueError, match="id 3"):
        summarize(HISTORY, 6)  # 1/8 is not k/6
    with pytest.raises(ValueError, match="live record 0"):
        summarize([], 8, live_records=[{"id": 9, "step_admitted": 0, "acc_admitted": 0.5,
                                        "visits": 0}])


def test_bucket_labels_and_group_size_inference():
    assert bucket_labels(8) == ["0/8", "1/8", "2/8", "3/8"]
    assert bucket_labels(5) == ["0/5", "1/5", "2/5"]
    assert infer_group_size([]) == 8
    assert infer_group_size([0.0, 0.0]) == 8
    assert infer_group_size([0.0, 0.25, 0.375]) == 8
    assert infer_group_size([0.0, 1 / 16, 3 / 16]) == 16
    assert infer_group_size([1 / 3]) == 3
    with pytest.raises(ValueError):
        infer_group_size([0.5])


def write_run(run_dir: Path, history=HISTORY, live=LIVE, metrics=METRICS, config=None):
    run_dir.mkdir(exist_ok=True)
    (run_dir / "replay_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    if live is not None:
        (run_dir / "replay_live.jsonl").write_text("".join(json.dumps(r) + "\n" for r in live))
    if metrics is not None:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    if config is not None:
        (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


def test_write_report_files(tmp_path):
    run = write_run(tmp_path / "run", config={"rl": {"group_size": 8}})
    s = write_report(run)
    assert s["steps"] == [1, 2, 3, 4, 5, 6, 7]
    assert s["metrics"] == {"admitted": 7, "graduated": 4, "unattributed_admitted": 0}
    assert json.loads((run / "report.json").read_text()) == s
    png = (run / "graduation.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    image = matplotlib.image.imread(run / "graduation.png")  # decodes: a valid PNG
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_group_size_from_config_and_without_live_snapshot(tmp_path):
    run = write_run(tmp_path / "run", live=None, config={"rl.group_size": 16})
    s = write_report(run)
    assert s["buckets"][:3] == ["0/16", "1/16", "2/16"] and len(s["buckets"]) == 8
    assert s["per_bucket"]["2/16"]["admitted"] == 1  # acc 1/8
    assert s["metrics"]["unattributed_admitted"] == 2  # the two live entries


def test_cli_prints_table(tmp_path, capsys):
    run = write_run(tmp_path / "run")  # no config: G inferred as 8
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "group size 8, steps 1..7" in out
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["0/8"])
    assert row == ["0/8", "3", "1", "1", "1", "33.3%", "3", "33.3%", "50.0%", "2.00"]
    assert "all" in out and "note:" not in out


def test_cli_as_module(tmp_path):
    run = write_run(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "zppo_fast.report", str(run)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (run / "graduation.png").is_file()
    missing = subprocess.run([sys.executable, "-m", "zppo_fast.report", str(tmp_path / "nope")],
                             capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode == 2 and "nope: no such run directory" in missing.stderr


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"id": 1, "step_admitted": 1', r"replay_history.jsonl:2: invalid JSON"),
        ('[1, 2]', r"replay_history.jsonl:2: expected a JSON object"),
        ('{"id": 1, "step_admitted": 1, "acc_admitted": 0.0, "exit_step": 2, "visits": 1}',
         r"replay_history.jsonl:2: missing key 'exit'"),
        ('{"id": 1, "step_admitted": 1, "acc_admitted": 0.0, "exit_step": 2, "exit": "left", '
         '"visits": 1}', r"replay_history.jsonl:2: 'exit' should be one of"),
        ('{"id": 1, "step_admitted": "1", "acc_admitted": 0.0, "exit_step": 2, '
         '"exit": "evicted", "visits": 1}',
         r"replay_history.jsonl:2: 'step_admitted' should be int"),
    ],
)
def test_corrupt_history_names_file_and_line(tmp_path, line, message):
    run = write_run(tmp_path / "run")
    good = json.dumps(HISTORY[0])
    (run / "replay_history.jsonl").write_text(f"{good}\n{line}\n")
    with pytest.raises(ReportError, match=message):
        write_report(run)


def test_missing_inputs(tmp_path, capsys):
    with pytest.raises(ReportError, match="no such run directory"):
        write_report(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match=r"empty/replay_history.jsonl: missing"):
        write_report(tmp_path / "empty")
    assert main([str(tmp_path / "empty")]) == 2
    assert "replay_history.jsonl: missing" in capsys.readouterr().err


def test_bad_config_and_off_grid_accuracy(tmp_path):
    run = write_run(tmp_path / "a", config={"rl": {"group_size": 6}})
    with pytest.raises(ReportError, match="not k/6"):
        write_report(run)
    run = write_run(tmp_path / "b")
    (run / "config.json").write_text("{not json")
    with pytest.raises(ReportError, match="config.json"):
        write_report(run)
