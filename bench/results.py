"""bench/RESULTS.md: each benchmark owns one `## Title` section and rewrites only that one; and the
device line every section starts with (`cpu_name`).

    record_section("Versus TRL", text)   # replace the section (from its heading to the next `## `), or append it

`git_commit()` is the commit every section names; `reset_peak_rss()` / `peak_rss_mb(base)` measure
the peak resident memory a piece of CPU work adds. Used by bench/bench_vs_trl.py,
bench/bench_zppo_vs_grpo.py, bench/bench_threads.py, bench/bench_replay.py and bench/effect.py.
"""

from __future__ import annotations

import platform
import re
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def record_section(title: str, text: str, path: Path = RESULTS) -> None:
    """Write `text` under `## {title}` in `path`, leaving every other section as it was."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    section = f"## {title}\n\n{text.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(old):
        new = pattern.sub(lambda _: section + "\n", old)
    else:
        new = old.rstrip("\n") + "\n\n" + section
    path.write_text(new.rstrip("\n") + "\n")


def cpu_name() -> str:
    """The CPU's model name, for a section's device line."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """The short commit of this checkout, with "+ uncommitted changes" when tracked files other than
    RESULTS.md (which the `--record` runs themselves edit) differ from it."""
    root = RESULTS.parent.parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                            f":(exclude){RESULTS.relative_to(root).as_posix()}"], cwd=root,
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + (" + uncommitted changes" if dirty else "")


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss() -> int:
    """Set this process's peak resident memory (Linux VmHWM) to its current size and return that
    size in KiB: the base of `peak_rss_mb`."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_kb("VmRSS")


def peak_rss_mb(base_kb: int) -> float:
    """MB by which the peak resident memory rose above `base_kb` (from `reset_peak_rss`) since then."""
    return (_proc_status_kb("VmHWM") - base_kb) / 1024
