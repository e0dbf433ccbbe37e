"""The end-to-end benchmarks still run: bench/bench_vs_trl.py and bench/bench_zppo_vs_grpo.py with
--quick (toy sizes, one warm-up and one timed step of each trainer), the first also with --profile (one
more step of each under torch.profiler), and bench/bench_shared_prefix.py at toy sizes, all at once. Their numbers are not checked (no timing
assertions); their tables must be complete. bench/effect.py --quick: the study's pipeline end to end."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"\d+\.\d+"


def test_bench_scripts_run_quick():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    scripts = {"bench_vs_trl.py": ["--quick", "--profile"], "bench_zppo_vs_grpo.py": ["--quick"],
               "bench_shared_prefix.py": ["--groups", "2", "--group-size", "2", "--prompt-len", "12",
                                          "--response-len", "4", "--repeats", "1", "--memory-rounds", "1"]}
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
    shared = out["bench_shared_prefix.py"]
    for phase, layout in [("update", "shared"), ("update", "packed"), ("update", "padded"),
                          ("generate", "prefill once"), ("generate", "every sample"), ("generate", "model forward"),
                          ("generate", "model.generate")]:
        assert re.search(rf"^\| {phase} \| {layout} \| {NUMBER} \|", shared, re.MULTILINE), shared[-2000:]
    for layout in ("shared", "packed", "padded"):  # each layout's peak memory, from its own process
        assert re.search(rf"^\| {layout} \| -?\d+ \|", shared, re.MULTILINE), shared[-2000:]


def test_effect_quick(tmp_path):
    """bench/effect.py --quick: grpo_replay and zppo, one seed each, two steps, run in parallel from one
    warm-up; the study's json holds both algos with finite numbers, and both figures exist."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "effect.py"), "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"effect.py --quick failed:\n{(run.stdout + run.stderr)[-4000:]}"
    study = json.loads((tmp_path / "effect.json").read_text())
    assert sorted(study["runs"]) == ["grpo_replay", "zppo"]
    for algo in ("grpo_replay", "zppo"):
        (res,) = study["runs"][algo].values()
        for key in ("hard_start", "hard_final", "easy_start", "easy_final", "student_tokens", "step_s"):
            assert math.isfinite(res[key]), (algo, key, res[key])
        assert res["grad_exit_share"] is None or 0 <= res["grad_exit_share"] <= 1, (algo, res)
    zppo = study["runs"]["zppo"]["0"]
    assert zppo["teacher_tokens"] > 0 and (zppo["bcq_acc"] is None or 0 <= zppo["bcq_acc"] <= 1), zppo
    assert study["paired"]["hard_final"]["seeds"] == [0]
    for name in ("effect_curves.png", "effect_graduation.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
