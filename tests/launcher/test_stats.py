"""The statistics of ``podsrl sweep`` against hand-computed values and known distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from launcher.stats import (
    Reach,
    iqm,
    iqm_ci,
    iqm_weights,
    mean_band,
    probability_of_improvement,
    probability_of_improvement_ci,
    smooth,
    summarize_reach,
    time_to_threshold,
)


def test_iqm_divisible_by_four_is_the_mean_of_the_middle_half():
    assert iqm([8, 1, 3, 2, 100, 5, 4, -50]) == pytest.approx((2 + 3 + 4 + 5) / 4)
    assert iqm([1, 2, 3, 4]) == pytest.approx(2.5)


def test_iqm_fractional_weights_by_hand():
    # n=5: ranks [1.25, 3.75] -> weights 0, .75, 1, .75, 0 over 2.5
    assert iqm([10, 0, 1, 2, 3]) == pytest.approx((0.75 * 1 + 2 + 0.75 * 3) / 2.5)
    # n=3: ranks [.75, 2.25] -> .25, 1, .25 over 1.5
    assert iqm([3, 1, 2]) == pytest.approx((0.25 * 1 + 2 + 0.25 * 3) / 1.5)
    # n=6: ranks [1.5, 4.5] -> 0, .5, 1, 1, .5, 0 over 3
    assert iqm([6, 5, 4, 3, 2, 1]) == pytest.approx((0.5 * 2 + 3 + 4 + 0.5 * 5) / 3)
    assert iqm([7.0]) == 7.0 and iqm([1, 3]) == pytest.approx(2.0)
    for n in range(1, 40):
        assert iqm_weights(n).sum() == pytest.approx(1.0)


def test_iqm_is_vectorised_along_an_axis():
    a = np.random.default_rng(0).normal(size=(7, 9))
    assert np.allclose(iqm(a, axis=-1), [float(iqm(row)) for row in a])
    assert np.allclose(iqm(a, axis=0), [float(iqm(col)) for col in a.T])


def test_iqm_of_nothing_says_why():
    with pytest.raises(ValueError, match="no finished runs"):
        iqm([])


def test_probability_of_improvement_by_hand():
    # pairs (x, y): 3 > 1, 3 > 2, 3 = 3; 1 = 1, 1 < 2, 1 < 3 -> (2 + 0.5 + 0.5) / 6
    assert probability_of_improvement([3, 1], [1, 2, 3]) == pytest.approx(3 / 6)
    assert probability_of_improvement([5, 6], [1, 2]) == 1.0
    assert probability_of_improvement([1, 2], [5, 6]) == 0.0
    assert probability_of_improvement([1, 1], [1]) == 0.5
    x, y = [0.2, 0.9, 0.4], [0.3, 0.35, 0.1, 0.5]
    assert probability_of_improvement(x, y) + probability_of_improvement(y, x) == pytest.approx(1.0)


def test_probability_of_improvement_ci_contains_the_point_and_is_bounded():
    est = probability_of_improvement_ci([0.8, 0.9, 0.7, 0.85], [0.5, 0.75, 0.6, 0.65], reps=500)
    assert 0 <= est.lo <= est.value <= est.hi <= 1
    assert est.value == pytest.approx(15 / 16)


def coverage(sampler, true_value: float, n: int, trials: int = 200, reps: int = 500) -> float:
    rng = np.random.default_rng(1234)
    hits = 0
    for t in range(trials):
        est = iqm_ci(sampler(rng, n), reps=reps, seed=t)
        hits += est.lo <= true_value <= est.hi
    return hits / trials


def test_bootstrap_ci_covers_the_population_iqm_of_a_normal():
    # A symmetric distribution's IQM is its centre.
    cov = coverage(lambda rng, n: rng.normal(3.0, 1.0, n), 3.0, n=20)
    assert 0.88 <= cov <= 0.99, cov


def test_bootstrap_ci_covers_the_population_iqm_of_an_exponential():
    # Exp(1): IQM = 2 * integral_{q1}^{q3} x e^-x dx = 2 * [.75 (1 + ln 4/3) - .25 (1 + ln 4)]
    true = 2 * (0.75 * (1 + math.log(4 / 3)) - 0.25 * (1 + math.log(4)))
    assert true == pytest.approx(0.7384, abs=1e-4)
    cov = coverage(lambda rng, n: rng.exponential(1.0, n), true, n=40)
    assert 0.88 <= cov <= 0.99, cov


def test_stratified_bootstrap_over_tasks_pools_the_runs_of_every_task():
    scores = np.array([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7]])  # 3 runs x 2 tasks
    est = iqm_ci(scores, reps=300)
    assert est.value == pytest.approx(iqm(scores.ravel()))
    assert est.lo <= est.value <= est.hi
    assert iqm_ci([0.5], reps=50).fmt() == "0.500 [0.500, 0.500]"


def test_smooth_is_a_trailing_mean():
    assert np.allclose(smooth([1, 2, 3, 4, 5], 2), [1, 1.5, 2.5, 3.5, 4.5])
    assert np.allclose(smooth([1, 2, 3], 10), [1, 1.5, 2])


def test_time_to_threshold_uses_full_windows_and_censors_failures():
    steps = list(range(1, 9))
    secs = [0.5 * s for s in steps]
    rewards = [0.9, 0.0, 0.0, 0.6, 0.6, 0.8, 0.9, 0.9]
    # windows of 3: (.9,0,0)=.3 (0,0,.6)=.2 (0,.6,.6)=.4 (.6,.6,.8)=.667 -> first at step 6
    assert time_to_threshold(steps, secs, rewards, 0.6, window=3) == Reach(True, 6, 3.0)
    assert time_to_threshold(steps, secs, rewards, 0.95, window=3) == Reach(False, 8, 4.0)
    assert time_to_threshold([1, 2], [1.0, 2.0], [0.7, 0.7], 0.6, window=10) == Reach(True, 2, 2.0)
    assert time_to_threshold([], [], [], 0.5) == Reach(False, 0, 0.0)


def test_reach_summary_counts_failures_and_labels_the_lower_bound():
    runs = [Reach(True, 10, 5.0), Reach(True, 20, 7.0), Reach(False, 100, 50.0), Reach(True, 12, 6.0)]
    s = summarize_reach(runs, reps=200)
    assert (s.reached, s.runs, s.censored) == (3, 4, True)
    assert s.seconds.value == pytest.approx((6.0 + 7.0) / 2)  # the censored 50 s is not dropped: it is the top
    assert s.fmt().startswith(">= ")
    none = summarize_reach([Reach(False, 100, 50.0), Reach(False, 90, 45.0)], reps=50)
    assert none.fmt() == "never (>= 47.5)"
    assert not summarize_reach(runs[:2], reps=50).censored


def test_mean_band_brackets_the_mean():
    curves = np.random.default_rng(0).normal(size=(5, 30))
    mean, lo, hi = mean_band(curves, reps=300)
    assert np.allclose(mean, curves.mean(axis=0)) and np.all(lo <= mean + 1e-12) and np.all(mean <= hi + 1e-12)
    one = mean_band(curves[:1])
    assert np.array_equal(one[1], one[2])
