"""The end-to-end benchmarks still run: bench/bench_vs_trl.py and bench/bench_zppo_vs_grpo.py with
--quick (toy sizes, one warm-up and one timed step of each trainer), both at once, the first also with
--profile (one more step of each under torch.profiler). Their numbers are not checked (no timing
assertions); their tables must be complete."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"\d+\.\d+"


def test_bench_scripts_run_quick():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    scripts = {"bench_vs_trl.py": ["--quick", "--profile"], "bench_zppo_vs_grpo.py": ["--quick"]}
    runs = {s: subprocess.Popen([sys.executable, str(ROOT / "bench" / s), *flags], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for s, flags in scripts.items()}
    out = {}
    for script, run in runs.items():
        out[script], _ = run.communicate(timeout=600)
        assert run.returncode == 0, f"{script} --quick failed:\n{out[script][-4000:]}"
    trl = out["bench_vs_trl.py"]
    assert re.search(rf"^\| TRL GRPOTrainer \| {NUMBER} \|", trl, re.MULTILINE), trl[-2000:]
    # zppo_fast's row: step, range, the three phases, other, and its ratio to TRL
    assert re.search(rf"^\| zppo_fast \| {NUMBER} \| {NUMBER}-{NUMBER} \|( -?{NUMBER} \|){{4}} {NUMBER} \|$", trl,
                     re.MULTILINE), trl[-2000:]
    profiles = trl.split("\nprofile of one ")[1:]  # one table per trainer, each listing aten ops
    assert [p.split(" step ")[0] for p in profiles] == ["TRL GRPOTrainer", "zppo_fast"], trl[-2000:]
    assert all(re.search(r"^ *aten::\w+ ", p, re.MULTILINE) for p in profiles), trl[-2000:]
    algos = out["bench_zppo_vs_grpo.py"]
    for algo in ("grpo", "zppo"):
        assert re.search(rf"^\| {algo} \| {NUMBER} \| \d+ \| {NUMBER} \|( -?{NUMBER} \|){{5}}$", algos,
                         re.MULTILINE), algos[-2000:]
    assert re.search(rf"ZPPO / GRPO: {NUMBER}x per step, {NUMBER}x per trained student token", algos), algos[-2000:]
