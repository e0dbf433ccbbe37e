"""bench/effect.py's numbers: the t-interval against scipy's own, the paired difference pairing by
seed, one run's quantities read from a synthetic run folder (metrics.jsonl + a report.json from
zppo_fast.report), the verdict sentence, and the figures. The whole study runs in
tests/test_bench_smoke.py (--quick)."""

import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from zppo_fast.report import summarize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # effect.py imports its sibling results.py
_spec = importlib.util.spec_from_file_location("bench_effect", ROOT / "bench" / "effect.py")
effect = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(effect)


@pytest.mark.parametrize("n", [2, 3, 5, 30])
def test_t_interval_matches_scipy(n):
    seed = random.randrange(2**32)
    values = np.random.default_rng(seed).normal(0.3, 0.2, size=n)
    low, high = stats.t.interval(0.95, n - 1, loc=values.mean(), scale=stats.sem(values))
    ci = effect.t_interval([*values.tolist(), None])  # None: a run without the quantity, skipped
    assert ci["n"] == n
    assert math.isclose(ci["mean"], values.mean(), rel_tol=1e-12), seed
    assert math.isclose(ci["low"], low, rel_tol=1e-12, abs_tol=1e-15), seed
    assert math.isclose(ci["high"], high, rel_tol=1e-12, abs_tol=1e-15), seed
    assert math.isclose(ci["half"], (high - low) / 2, rel_tol=1e-12), seed


def test_t_interval_of_one_or_no_value_has_no_interval():
    assert effect.t_interval([0.25, None]) == {"n": 1, "mean": 0.25, "low": None, "high": None, "half": None}
    assert effect.t_interval([None])["mean"] is None


def test_paired_difference_pairs_by_seed_not_position():
    rng = random.Random()
    a = {s: rng.random() for s in (4, 0, 2, 1)}
    b = {s: rng.random() for s in (1, 3, 0, 2)}
    b[1] = None  # seed 1 of b lacks the quantity: not a pair
    d = effect.paired_difference(a, b)
    assert d["seeds"] == [0, 2]
    assert d["diffs"] == [a[0] - b[0], a[2] - b[2]]
    low, high = stats.t.interval(0.95, 1, loc=np.mean(d["diffs"]), scale=stats.sem(d["diffs"]))
    assert math.isclose(d["low"], low, rel_tol=1e-12) and math.isclose(d["high"], high, rel_tol=1e-12)


def write_run(run_dir: Path) -> None:
    """A 3-step run: evaluations at steps 0, 2, 3; BCQ / NCQ at steps 1 and 3; the buffer admitted
    three questions at 0/8 (one graduated, one evicted, one live) and one at 2/8 (graduated)."""
    run_dir.mkdir()
    recs = [
        {"step": 0, "eval/hard_acc": 0.1, "eval/hard_se": 0.02, "eval/easy_acc": 0.8, "eval/easy_se": 0.015},
        {"step": 1, "perf/student_tokens": 100, "zppo/teacher_tokens": 40, "time/rollout": 1.0, "time/update": 2.0,
         "zppo/bcq_acc": 0.5, "zppo/ncq_acc": 0.0},
        {"step": 2, "perf/student_tokens": 110, "time/rollout": 1.5, "time/update": 2.5,
         "eval/hard_acc": 0.2, "eval/hard_se": 0.02, "eval/easy_acc": 0.7, "eval/easy_se": 0.015},
        {"step": 3, "perf/student_tokens": 120, "zppo/teacher_tokens": 60, "hint/teacher_tokens": 5,
         "time/rollout": 0.5, "time/teacher": 0.5, "time/update": 1.0, "zppo/bcq_acc": 0.25,
         "eval/hard_acc": 0.3, "eval/hard_se": 0.019, "eval/easy_acc": 0.75, "eval/easy_se": 0.014},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    history = [{"id": 1, "step_admitted": 1, "acc_admitted": 0.0, "exit_step": 3, "exit": "graduated", "visits": 2},
               {"id": 2, "step_admitted": 1, "acc_admitted": 0.0, "exit_step": 2, "exit": "evicted", "visits": 1},
               {"id": 3, "step_admitted": 2, "acc_admitted": 0.25, "exit_step": 3, "exit": "graduated", "visits": 1}]
    live = [{"id": 4, "step_admitted": 3, "acc_admitted": 0.0, "visits": 0}]
    (run_dir / "replay_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    (run_dir / "replay_live.jsonl").write_text("".join(json.dumps(r) + "\n" for r in live))
    (run_dir / "report.json").write_text(json.dumps(summarize(history, 8, live_records=live, last_step=3)))


def test_summarize_run_reads_every_quantity(tmp_path):
    write_run(tmp_path / "run")
    r = effect.summarize_run(tmp_path / "run", last_step=3, algo_replay=True)
    assert (r["hard_start"], r["hard_final"], r["easy_start"], r["easy_final"]) == (0.1, 0.3, 0.8, 0.75)
    assert math.isclose(r["hard_gain"], 0.2) and math.isclose(r["easy_gain"], -0.05)
    assert r["hard_curve"] == [(0, 0.1), (2, 0.2), (3, 0.3)]
    assert (r["hard_final_se"], r["easy_final_se"]) == (0.019, 0.014)
    assert (r["grad0_admitted"], r["grad0_graduated"]) == (3, 1)
    assert math.isclose(r["grad0_share"], 1 / 3)
    assert r["grad0_visited"] == 2 and r["grad0_visited_share"] == 0.5  # id 4 (live) was never visited
    assert math.isclose(r["grad_exit_share"], 2 / 3)  # 2 graduated of 3 exits, over every bucket
    assert r["bcq_acc"] == 0.375 and r["ncq_acc"] == 0.0  # over the steps that had them
    assert r["student_tokens"] == 330 and r["teacher_tokens"] == 105
    assert r["step_s"] == 3.0  # median of 3.0, 4.0, 2.0


def test_a_report_written_before_visits_were_counted_is_read_again(tmp_path):
    write_run(tmp_path / "run")
    path = tmp_path / "run" / "report.json"
    report = json.loads(path.read_text())
    for part in [report["total"], *report["per_bucket"].values()]:
        del part["visited"], part["graduated_per_visited"]
    path.write_text(json.dumps(report))
    r = effect.summarize_run(tmp_path / "run", last_step=3, algo_replay=True)
    assert r["grad0_visited"] == 2 and r["grad0_visited_share"] == 0.5
    assert "visited" in json.loads(path.read_text())["total"]


def test_summarize_run_names_a_missing_final_evaluation(tmp_path):
    write_run(tmp_path / "run")
    with pytest.raises(effect.StudyError, match=r"metrics.jsonl: no 'eval/hard_acc' at step 4"):
        effect.summarize_run(tmp_path / "run", last_step=4, algo_replay=False)


def test_verdict_says_whether_the_interval_excludes_zero():
    def diffs(values):
        return {"hard_final": effect.paired_difference(dict(enumerate(values)), dict.fromkeys(range(len(values)), 0.0))}

    assert effect.verdict(diffs([0.1, 0.12, 0.09])).startswith("zppo beat grpo_replay on the hard family")
    assert effect.verdict(diffs([-0.1, -0.12, -0.09])).startswith("zppo did worse than grpo_replay")
    assert effect.verdict(diffs([0.1, -0.12, 0.05])).startswith("zppo did not beat grpo_replay")
    assert "too few for an interval" in effect.verdict(diffs([0.1]))
    assert effect.verdict(None).startswith("No paired comparison")


def test_figures_and_table(tmp_path):
    runs = {}
    for seed in (0, 1, 2):
        write_run(tmp_path / f"run{seed}")
        runs[seed] = effect.summarize_run(tmp_path / f"run{seed}", last_step=3, algo_replay=True)
    results = {"grpo_replay": runs, "zppo": {0: runs[0]}}
    stat = effect.aggregate(results)
    effect.plot_curves(results, tmp_path / "curves.png")
    effect.plot_graduation(stat, tmp_path / "graduation.png", 8)
    for name in ("curves.png", "graduation.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = effect.table(results, stat).splitlines()
    assert lines[2].startswith("| grpo_replay | 3 | 0.100 [0.100, 0.100] | 0.300 [0.300, 0.300] |")
    assert lines[3].startswith("| zppo | 1 | 0.100 | 0.300 |")


def test_a_study_folder_of_the_users_is_refused_untouched(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "effect.json").write_text("the user's file")
    assert effect.main(["--quick", "--out", str(out)]) == 2
    assert "effect.json" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["effect.json"] and (out / "effect.json").read_text() == "the user's file"


def test_premise_text_without_bcq_questions():
    p = {"questions": 16, "samples": 8, "student_hard_acc": 0.0, "student_hard_zero_share": 1.0,
         "teacher_hard_acc": 0.0, "bcq_questions": 0, "student_bcq_hard_acc": None, "student_easy_acc": 0.25}
    text = effect.premise_text(p)
    assert "(a teacher-correct and a student-wrong candidate, 0 questions) -;" in text and "0.250" in text


def test_mechanism_paragraph_gives_each_link_its_numbers(tmp_path):
    runs = {}
    for seed in (0, 1):
        write_run(tmp_path / f"run{seed}")
        runs[seed] = effect.summarize_run(tmp_path / f"run{seed}", last_step=3, algo_replay=True)
    runs[1] = {**runs[1], "grad0_visited": 1}  # seed 1 replayed 1 of its 3 0-of-8 admissions, seed 0 two
    check = {"student_bcq_hard_acc": 0.225, "student_hard_acc": 0.081}
    results = {"grpo_replay": runs, "zppo": runs}
    text = effect.mechanism(results, effect.aggregate(results), check, steps=3, group_size=8)
    assert "solves 0.225 of hard questions on BCQ prompts against 0.081 plainly" in text
    assert "its BCQ rollouts score 0.375 [0.375, 0.375]" in text  # the synthetic run: BCQ 0.5 and 0.25 in steps 1-5
    visited = effect.t_interval([2 / 3, 1 / 3])
    assert f"replays {effect.fmt_interval(visited, '.0%')} of those admitted at 0 of 8" in text
    # a study without grpo_replay keeps only what it measured
    alone = effect.mechanism({"zppo": runs}, effect.aggregate({"zppo": runs}), {**check, "student_bcq_hard_acc": None},
                             steps=3, group_size=8)
    assert alone.startswith("Can the student use candidates? Before RL it solves - of") and "buffer" not in alone
