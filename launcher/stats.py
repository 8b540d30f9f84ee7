"""Statistics across seeds for ``podsrl sweep``: IQM, stratified bootstrap CIs, probability of improvement,
time to a reward threshold.

    from launcher.stats import iqm, iqm_ci, probability_of_improvement, time_to_threshold

Follows the recommendations of Agarwal et al., "Deep RL at the Edge of the Statistical Precipice"
(NeurIPS 2021; the ``rliable`` library): report the interquartile mean with a 95% stratified bootstrap
confidence interval, never a mean of 3 seeds alone, and the probability of improvement between two
configurations. numpy only; every function is vectorised so a 2,000-sample bootstrap takes milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Array = np.ndarray


def iqm_weights(n: int) -> Array:
    """Weights of the sorted sample in the interquartile mean of ``n`` values.

    Fractional definition: sample i (0-based, sorted) occupies [i, i+1) on the rank axis and the IQM
    is the mean over the ranks [n/4, 3n/4], so a sample straddling a quartile counts with the
    fraction of it inside. For n divisible by 4 this is the mean of the middle n/2 values, exactly
    rliable's ``scipy.stats.trim_mean(x, 0.25)``; otherwise it differs from trim_mean, which drops
    floor(n/4) values at each end (n=5: weights 0, .75, 1, .75, 0 over 2.5 here; 0, 1, 1, 1, 0 there).
    It is continuous in the data and uses every quantile of the middle half, so 5 seeds are not
    treated as 3.
    """
    if n < 1:
        raise ValueError("the IQM of an empty sample is undefined: no finished runs to aggregate")
    lo, hi = n / 4, 3 * n / 4
    i = np.arange(n)
    overlap = np.clip(np.minimum(i + 1, hi) - np.maximum(i, lo), 0, None)
    return overlap / (hi - lo)


def iqm(x: Sequence[float] | Array, axis: int = -1) -> Array | float:
    """Interquartile mean along ``axis`` (see :func:`iqm_weights` for the fractional definition)."""
    a = np.sort(np.asarray(x, dtype=float), axis=axis)
    w = iqm_weights(a.shape[axis])
    out = np.tensordot(np.moveaxis(a, axis, -1), w, axes=([-1], [0]))
    return float(out) if np.ndim(out) == 0 else out


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its confidence interval."""

    value: float
    lo: float
    hi: float

    def fmt(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def stratified_bootstrap(
    scores: Sequence[Sequence[float]] | Array,
    statistic: Callable[[Array], Array | float],
    reps: int = 2000,
    seed: int = 0,
) -> Array:
    """``reps`` bootstrap replicates of ``statistic`` over a (runs, tasks) score matrix.

    Stratified as in rliable: the runs of each task (column) are resampled with replacement
    independently of the other tasks, and ``statistic`` takes the resampled (reps, runs * tasks)
    matrix and returns one value per replicate (e.g. ``lambda a: iqm(a, axis=-1)``). A 1-D input is
    one task.
    """
    s = np.asarray(scores, dtype=float)
    if s.ndim == 1:
        s = s[:, None]
    runs, tasks = s.shape
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, runs, size=(reps, runs, tasks))
    resampled = np.take_along_axis(np.broadcast_to(s, (reps, runs, tasks)), idx, axis=1)
    return np.asarray(statistic(resampled.reshape(reps, runs * tasks)))


def percentile_ci(replicates: Array, alpha: float = 0.05) -> tuple[float, float]:
    lo, hi = np.percentile(replicates, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def iqm_ci(
    scores: Sequence[float] | Sequence[Sequence[float]] | Array, reps: int = 2000, alpha: float = 0.05, seed: int = 0
) -> Estimate:
    """IQM of the scores (all runs of all tasks pooled) with a percentile stratified-bootstrap CI.

    With one run the interval is the point itself: one seed says nothing about the spread.
    """
    s = np.asarray(scores, dtype=float)
    point = iqm(s.ravel())
    assert isinstance(point, float)
    reps_ = stratified_bootstrap(s, lambda a: iqm(a, axis=-1), reps, seed)
    lo, hi = percentile_ci(reps_, alpha)
    return Estimate(point, lo, hi)


def _poi(x: Array, y: Array) -> Array:
    """P(X > Y) + 0.5 P(X = Y) over all pairs, along the last axis of x (..., n) and y (..., m)."""
    gt = (x[..., :, None] > y[..., None, :]).mean(axis=(-2, -1))
    eq = (x[..., :, None] == y[..., None, :]).mean(axis=(-2, -1))
    return np.asarray(gt + 0.5 * eq)


def probability_of_improvement(x: Sequence[float] | Array, y: Sequence[float] | Array) -> float:
    """P(X > Y) + 0.5 P(X = Y), the Mann-Whitney U statistic over n*m: the chance that a run of X
    scores higher than a run of Y, ties split (rliable's probability of improvement, one task)."""
    return float(_poi(np.asarray(x, dtype=float), np.asarray(y, dtype=float)))


def probability_of_improvement_ci(
    x: Sequence[float] | Array, y: Sequence[float] | Array, reps: int = 2000, alpha: float = 0.05, seed: int = 0
) -> Estimate:
    """:func:`probability_of_improvement` with a bootstrap CI (the runs of X and of Y resampled
    independently: each configuration is its own stratum)."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rng = np.random.default_rng(seed)
    xs = xa[rng.integers(0, len(xa), size=(reps, len(xa)))]
    ys = ya[rng.integers(0, len(ya), size=(reps, len(ya)))]
    lo, hi = percentile_ci(_poi(xs, ys), alpha)
    return Estimate(probability_of_improvement(xa, ya), lo, hi)


def smooth(values: Sequence[float] | Array, window: int) -> Array:
    """Trailing mean over ``window`` steps; the first ``window - 1`` points average what exists so far."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    i = np.arange(1, len(v) + 1)
    start = np.maximum(0, i - window)
    return np.asarray((c[i] - c[start]) / (i - start))


@dataclass(frozen=True)
class Reach:
    """When one run first reached a reward threshold, or, if it never did, how long it ran (censored)."""

    reached: bool
    step: int  # the step at which the smoothed reward first reached it; the last step if never
    seconds: float  # wall-clock seconds at that step; the run's length if never


def time_to_threshold(
    steps: Sequence[int] | Array,
    seconds: Sequence[float] | Array,
    rewards: Sequence[float] | Array,
    threshold: float,
    window: int = 10,
) -> Reach:
    """First step (and wall-clock second) at which the mean reward of the last ``window`` steps is
    >= ``threshold``.

    Only full windows count (``min(window, len)`` steps), so one lucky batch at the start is not a
    success. A run that never gets there is a failure: ``reached`` is False and step/seconds are the
    run's length, a lower bound of its true time (right-censored), never dropped.
    """
    r = np.asarray(rewards, dtype=float)
    if len(r) == 0:
        return Reach(False, 0, 0.0)
    w = max(1, min(window, len(r)))
    full = smooth(r, w)[w - 1 :]
    hits = np.nonzero(full >= threshold)[0]
    i = int(hits[0]) + w - 1 if len(hits) else len(r) - 1
    return Reach(bool(len(hits)), int(steps[i]), float(seconds[i]))


@dataclass(frozen=True)
class ReachSummary:
    """Time to a threshold across seeds: how many got there, and the IQM with failures censored."""

    reached: int
    runs: int
    seconds: Estimate  # IQM [CI] of seconds, failures counted at their run's length
    steps: Estimate
    censored: bool  # True when some run never reached it: the estimates are lower bounds

    def fmt(self, what: str = "seconds", digits: int = 1) -> str:
        est = self.seconds if what == "seconds" else self.steps
        if self.reached == 0:
            return f"never (>= {est.value:.{digits}f})"
        return (">= " if self.censored else "") + est.fmt(digits)


def summarize_reach(reaches: Sequence[Reach], reps: int = 2000, seed: int = 0) -> ReachSummary:
    """Across seeds. Failures enter at their censored value (the run's length) and the result is
    labelled a lower bound; the fraction reached is reported next to it."""
    if not reaches:
        raise ValueError("no runs to summarize")
    secs = [r.seconds for r in reaches]
    stps = [float(r.step) for r in reaches]
    n_reached = sum(r.reached for r in reaches)
    return ReachSummary(
        n_reached, len(reaches), iqm_ci(secs, reps, seed=seed), iqm_ci(stps, reps, seed=seed), n_reached < len(reaches)
    )


def mean_band(curves: Array, reps: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[Array, Array, Array]:
    """Mean across seeds of a (seeds, points) matrix with a pointwise 95% percentile-bootstrap band
    (the seeds resampled); with one seed the band is the curve itself."""
    c = np.asarray(curves, dtype=float)
    mean = c.mean(axis=0)
    if c.shape[0] < 2:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, c.shape[0], size=(reps, c.shape[0]))
    boot = c[idx].mean(axis=1)  # (reps, points)
    lo, hi = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return mean, lo, hi
