"""bench/gpu_check.sh without a GPU: its arguments, its preflight's failures, and the --no-gpu run
(preflight, the project imported from the checkout, the summary of a partial results file)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run(*args, env=None, timeout=300):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)


def test_help_and_bad_arguments():
    out = run("--help")
    assert out.returncode == 0 and "Usage: bash bench/gpu_check.sh" in out.stdout and "--no-gpu" in out.stdout
    out = run("--frobnicate")
    assert out.returncode == 2 and "unknown argument '--frobnicate'" in out.stderr and "Usage" in out.stderr
    out = run("--out")
    assert out.returncode == 2 and "--out needs a value" in out.stderr
    out = run("--budget", "8min")
    assert out.returncode == 2 and "--budget must be a number of seconds" in out.stderr


def test_preflight_failures_name_what_is_missing(tmp_path):
    out = run("--no-gpu", "--out", str(tmp_path / "a"), env={"PYTHON": "/nonexistent/python3"})
    assert out.returncode == 1
    assert "'/nonexistent/python3' does not run" in out.stdout and "preflight:         FAILED" in out.stdout
    out = run("--no-gpu", "--out", str(tmp_path / "b"), env={"CC": "/nonexistent/cc"})
    assert out.returncode == 1 and "C compiler: /nonexistent/cc does not run" in out.stdout
    assert "build" not in out.stdout.split("== summary")[1]  # nothing ran after the failed preflight
    assert (tmp_path / "b" / "summary.txt").read_text().rstrip().endswith("RESULT: FAILED (see the steps above)")
    # every step's limit is cut to what the shared deadline leaves (20 s of it kept for the summary)
    out = run("--no-gpu", "--budget", "12", "--out", str(tmp_path / "c"))
    assert out.returncode == 1 and "preflight:         FAILED: no time left of the 12 s budget" in out.stdout


def test_no_gpu_run_imports_the_checkout_and_summarises_partial_results(tmp_path):
    """The CPU part end to end: preflight, the project imported without installing it, and the
    summary of a results file with a missing 'ours' row, an OOM baseline and an unreadable line."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rows = [
        {"N": 4096, "H": 1024, "V": 248320, "variant": "ours", "ms": 10.0, "peak_mb": 900.0},
        {"N": 4096, "H": 1024, "V": 248320, "variant": "floor", "ms": 8.0},
        {"N": 4096, "H": 1024, "V": 248320, "variant": "liger", "ms": 25.0},
        {"N": 4096, "H": 1024, "V": 248320, "variant": "eager", "error": "OOM"},
        {"N": 65536, "H": 4096, "V": 248320, "variant": "floor", "ms": 900.0},
    ]
    (out_dir / "policy_loss.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n{truncated\n")
    out = run("--no-gpu", "--out", str(out_dir))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    text = (out_dir / "summary.txt").read_text()
    assert out.stdout.endswith(text)
    for line in ("preflight:         ok", "build:             ok", "tests:             skipped (--no-gpu)",
                 "sglang:            skipped (--no-gpu)", "RESULT: all steps passed"):
        assert line in text, line
    assert "import zppo_fast: ok" in (out_dir / "build.log").read_text()
    # the recorded facts: commit (or why not), device, versions
    assert "commit: " in text and "device: " in text and "python 3." in text and "; torch " in text
    table = text.split("policy loss, ours vs floor")[1]
    assert " 4096  1024      10.0     1.25       2.50" in table and "OOM" in table
    assert "65536  4096  ours: row missing" in table and "(1 unreadable line(s) skipped)" in table
