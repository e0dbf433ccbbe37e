"""bench/bench_replay.py --quick runs end to end and prints every row (no timing is asserted)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_prints_every_row():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_replay.py"), "--quick"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_replay
    finally:
        sys.path.pop(0)
    for label, _, threads, _ in bench_replay.CASES:
        row = re.search(
            rf"^\| {re.escape(label)} \| {threads} \| ([\d,]+) \| ([\d,]+) \| [\d.]+x \| ([\d,]+) \|",
            out.stdout,
            re.MULTILINE,
        )
        assert row, f"no row for {label} x{threads} in:\n{out.stdout}"
        assert all(int(v.replace(",", "")) > 0 for v in row.groups())
    assert "Target: >= 10M C++ admissions/s" in out.stdout
