"""Held-out accuracy, its standard error, and the gain over the run's first evaluation paired by
question (zppo_fast.eval.accuracy_metrics), against a float64 numpy reference."""

import numpy as np
import pytest

from zppo_fast.eval import accuracy_metrics


def _reference(xs):
    xs = np.asarray(xs, dtype=np.float64)
    return xs.mean(), np.sqrt(xs.var() / len(xs))


@pytest.mark.parametrize("n, samples", [(1, 1), (7, 1), (256, 1), (33, 4), (100, 16)])
def test_accuracy_and_paired_gain_match_a_float64_reference(n, samples):
    rng = np.random.default_rng()
    start = rng.binomial(samples, rng.uniform(0, 1, n)) / samples  # per-question mean over samples
    now = np.clip(start + rng.choice([-1, 0, 0, 1], n) / samples, 0, 1)
    easy = rng.binomial(1, 0.7, n + 3).astype(float)
    out = accuracy_metrics({"hard": now.tolist(), "easy": easy.tolist()}, {"hard": start.tolist()})
    for key, xs in (("hard_acc", now), ("easy_acc", easy), ("hard_gain", now - start)):
        mean, se = _reference(xs)
        assert out[f"eval/{key}"] == pytest.approx(mean, rel=1e-12, abs=1e-15)
        assert out[f"eval/{key.removesuffix('_acc')}_se"] == pytest.approx(se, rel=1e-12, abs=1e-15)
    assert "eval/easy_gain" not in out  # no start for that set


def test_a_few_changed_questions_make_a_gain_whose_paired_error_is_below_the_independent_one():
    """100 questions, 40 solved at the start, 10 more later and none lost: a gain of 0.1 whose
    paired standard error, sqrt(0.1 * 0.9 / 100) = 0.03, is below sqrt(se_start^2 + se_now^2) = 0.07,
    the noise two independent evaluations would suggest."""
    start = [1.0] * 40 + [0.0] * 60
    now = [1.0] * 50 + [0.0] * 50
    out = accuracy_metrics({"hard": now}, {"hard": start})
    assert out["eval/hard_gain"] == pytest.approx(0.1)
    assert out["eval/hard_gain_se"] == pytest.approx(0.03)
    assert out["eval/hard_se"] == pytest.approx(0.05)
    assert np.hypot(out["eval/hard_se"], np.sqrt(0.4 * 0.6 / 100)) == pytest.approx(0.0700, abs=1e-4)


def test_no_start_reports_accuracy_only_and_a_set_of_another_size_is_refused():
    out = accuracy_metrics({"hard": [1.0, 0.0, 0.0, 0.0]})
    assert out == {"eval/hard_acc": 0.25, "eval/hard_se": pytest.approx(np.sqrt(0.25 * 0.75 / 4))}
    with pytest.raises(ValueError, match="set 'hard': 4 rewards now against 3 at the start"):
        accuracy_metrics({"hard": [1.0, 0.0, 0.0, 0.0]}, {"hard": [1.0, 0.0, 0.0]})
