"""Group-level down-sampling rules and advantage computation for the selector process.

A rollout group is the ``n`` scalar rewards of ``n`` completions of one prompt; a rule picks ``m`` of
them to train on and returns their indices (int64, sorted ascending). ``max_variance`` is the PODS
rule (PODS: Xu et al., 'Not All Rollouts are Useful: Down-Sampling Rollouts in LLM Reinforcement
Learning', 2025): the kept subset maximises the population variance of its rewards, which is always
the ``k`` highest plus the ``m - k`` lowest rewards for some ``k`` in ``0..m``, so one sort and prefix
sums find it in O(n log n). Ties between equal rewards are broken by a random permutation drawn from
the caller's generator, so a seed fixes the output. ``process_group`` then applies the zero-variance
rule (DAPO dynamic sampling: Yu et al., "DAPO", 2025) and normalises advantages either by the group
std (GRPO) or by the mean only (Dr. GRPO: Liu et al., "Understanding R1-Zero-Like Training: A
Critical Perspective", 2025). ``process_groups`` does the same for a [G, n] burst of groups, equal
group for group and bit for bit to ``process_group`` on each row (same draws from the generator);
both have fast paths for ``max_variance`` (pure Python for one small group, vectorised numpy for a
burst) that reproduce the numpy reference path exactly.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce
from itertools import accumulate
from operator import add, mul

import numpy as np

# Design note: everything here is group-level (one scalar reward per completion). A later
# token-level selection such as D³S would take per-token data (log-probs, entropies, masks) and
# belongs in its own functions; keep these signatures group-level.

Rule = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

# The name sets of selector.rule (SELECTORS below), selector.adv_norm and selector.zero_variance. The
# config spells them as Literals (protocol/ imports no role) and rejects other names when it loads;
# tests/selector/test_rules.py checks that its Literals are these names.
ADV_NORMS = ("std", "mean")
ZERO_VARIANCE_RULES = ("drop", "keep")


def _check_rewards(rewards: np.ndarray) -> np.ndarray:
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"rewards must be 1-D, got shape {r.shape}")
    if r.size == 0:
        raise ValueError("rewards must be non-empty")
    if not np.all(np.isfinite(r)):
        raise ValueError(f"rewards must be finite, got {r.tolist()}")
    return r


def _check(rewards: np.ndarray, m: int) -> tuple[np.ndarray, int]:
    m = operator.index(m)
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    return _check_rewards(rewards), m


def _tie_broken_order(r: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices sorting ``r`` ascending; equal rewards come in the order of a random permutation."""
    perm = rng.permutation(r.size)
    return perm[np.argsort(r[perm], kind="stable")]


def max_variance(rewards: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """PODS max-variance down-sampling: the ``min(m, n)`` rewards with maximal population variance."""
    r, m = _check(rewards, m)
    return _max_variance_ordered(r, min(m, r.size), _tie_broken_order(r, rng))


def _max_variance_ordered(r: np.ndarray, m: int, order: np.ndarray) -> np.ndarray:
    """``max_variance`` given ``m <= n`` and the tie-broken ascending order of the rewards."""
    n = r.size
    s = r[order] - r.mean()  # centring changes no variance and limits cancellation below
    p1 = np.concatenate(([0.0], np.cumsum(s)))
    p2 = np.concatenate(([0.0], np.cumsum(s * s)))
    k = np.arange(m + 1)  # k highest + (m - k) lowest; the two ranges never overlap since m <= n
    s1 = p1[m - k] + (p1[n] - p1[n - k])
    s2 = p2[m - k] + (p2[n] - p2[n - k])
    var = s2 / m - (s1 / m) ** 2
    tol = 1e-12 * max(1.0, float(np.max(np.abs(var))))
    best = int(np.flatnonzero(var >= var.max() - tol)[0])  # smallest k among (near-)ties
    kept = np.concatenate((order[: m - best], order[n - best :]))
    return np.sort(kept).astype(np.int64)


def max_reward(rewards: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """The ``min(m, n)`` highest rewards; ties broken by the generator."""
    r, m = _check(rewards, m)
    order = _tie_broken_order(r, rng)
    return np.sort(order[r.size - min(m, r.size) :]).astype(np.int64)


def random_subset(rewards: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random ``min(m, n)``-subset."""
    r, m = _check(rewards, m)
    return np.sort(rng.choice(r.size, size=min(m, r.size), replace=False)).astype(np.int64)


def keep_all(rewards: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """Every completion (``m`` is validated but otherwise ignored)."""
    r, _ = _check(rewards, m)
    return np.arange(r.size, dtype=np.int64)


SELECTORS: dict[str, Rule] = {
    "max_variance": max_variance,
    "max_reward": max_reward,
    "random": random_subset,
    "all": keep_all,
}


def build_selector(name: str) -> Rule:
    """The rule registered as ``name``; ValueError listing the valid names otherwise."""
    try:
        return SELECTORS[name]
    except KeyError:
        raise ValueError(f"unknown selector {name!r}; valid choices: {sorted(SELECTORS)}") from None


def advantages(rewards: np.ndarray, norm: str, eps: float = 1e-6) -> np.ndarray:
    """Group-relative advantages: ``(r - mean) / (std + eps)`` ("std") or ``r - mean`` ("mean")."""
    _check_norm(norm)
    r = _check_rewards(rewards)
    centred = r - r.mean()
    if norm == "std":
        centred = centred / (r.std(ddof=0) + eps)
    return centred.astype(np.float32)


@dataclass(frozen=True, eq=False)
class GroupDecision:
    """What the selector does with one group. ``advantages`` is aligned with ``kept``."""

    kept: np.ndarray  # int64 indices into the group's rewards, sorted ascending
    advantages: np.ndarray  # float32, same length as kept
    zero_variance: bool  # all kept rewards are equal
    dropped: bool  # the group is not trained on (zero variance under the "drop" rule)


def process_group(
    rewards: np.ndarray,
    m: int,
    rule: str,
    zero_variance: str,
    adv_norm: str,
    rng: np.random.Generator,
    eps: float = 1e-6,
) -> GroupDecision:
    """Down-sample one group with ``rule``, then apply the zero-variance rule and compute advantages.

    The common case (``rule="max_variance"``, a 1-D float array of at most ``FAST_MAX_N`` rewards,
    all of magnitude < 1e30) runs in pure Python, bit-exact with the numpy path: same kept indices,
    same float32 advantages, same draws from ``rng`` (see ``_fast_max_variance``).
    """
    if zero_variance not in ZERO_VARIANCE_RULES or adv_norm not in ADV_NORMS:
        _check_options(zero_variance, adv_norm)
    select = SELECTORS.get(rule) or build_selector(rule)
    if (
        select is max_variance
        and type(rewards) is np.ndarray
        and rewards.ndim == 1
        and 0 < rewards.shape[0] <= FAST_MAX_N
        and rewards.dtype.char in _FLOAT_CHARS
        and type(eps) is float
        and type(rng) is _Generator
    ):
        decision = _fast_max_variance(rewards.tolist(), m, zero_variance, adv_norm, rng, eps)
        if decision is not None:
            return decision
    return _process_group_numpy(rewards, m, select, zero_variance, adv_norm, rng, eps)


def process_groups(
    rewards: np.ndarray,
    m: int,
    rule: str,
    zero_variance: str,
    adv_norm: str,
    rng: np.random.Generator,
    eps: float = 1e-6,
) -> list[GroupDecision]:
    """``process_group`` on each row of a [G, n] array of rewards, in row order.

    The result equals ``[process_group(row, m, rule, zero_variance, adv_norm, rng, eps) for row in
    rewards]`` group for group and bit for bit, and leaves ``rng`` in the same state: for
    ``max_variance`` the G tie-breaking permutations come from one ``rng.permuted`` call, which draws
    exactly what G successive ``rng.permutation(n)`` calls draw, and the rest is ~30 vectorised
    numpy calls with numpy's row-wise reductions (the same summation order as on one row). Bursts
    of fewer than ``BATCH_MIN_GROUPS`` small groups, other rules, and rows that ``process_group``
    would reject or that hold rewards of magnitude >= 1e30 go through ``process_group`` row by row
    (so errors are raised at the same row, after the same draws). Only difference: the options are
    validated even when G = 0.
    """
    _check_options(zero_variance, adv_norm)
    select = build_selector(rule)
    r = np.asarray(rewards)
    if r.ndim != 2:
        raise ValueError(f"rewards must be 2-D [groups, n], got shape {r.shape}")
    g, n = r.shape
    if (
        select is max_variance
        and n > 0
        and isinstance(eps, float)
        and type(rng) is _Generator
        and (g >= BATCH_MIN_GROUPS or (g > 1 and n > FAST_MAX_N))
    ):
        decisions = _batched_max_variance(r, m, zero_variance == "drop", adv_norm == "std", rng, eps)
        if decisions is not None:
            return decisions
    return [process_group(row, m, rule, zero_variance, adv_norm, rng, eps) for row in r]


def _check_options(zero_variance: str, adv_norm: str) -> None:
    if zero_variance not in ZERO_VARIANCE_RULES:
        raise ValueError(f"unknown zero_variance rule {zero_variance!r}; valid choices: {list(ZERO_VARIANCE_RULES)}")
    _check_norm(adv_norm)


def _check_norm(adv_norm: str) -> None:
    if adv_norm not in ADV_NORMS:
        raise ValueError(f"unknown advantage norm {adv_norm!r}; valid choices: {list(ADV_NORMS)}")


def _process_group_numpy(
    rewards: np.ndarray,
    m: int,
    select: Rule,
    zero_variance: str,
    adv_norm: str,
    rng: np.random.Generator,
    eps: float,
) -> GroupDecision:
    """The reference path: any rule, any size, through the numpy functions above."""
    r = _check_rewards(rewards)
    return _decide(r, select(r, m, rng), zero_variance, adv_norm, eps)


def _decide(r: np.ndarray, kept: np.ndarray, zero_variance: str, adv_norm: str, eps: float) -> GroupDecision:
    """The zero-variance rule and the advantages of the kept rewards ``r[kept]``."""
    kept_r = r[kept]
    if np.ptp(kept_r) == 0:
        zeros = np.zeros(kept.size, dtype=np.float32)
        return GroupDecision(kept, zeros, zero_variance=True, dropped=zero_variance == "drop")
    return GroupDecision(kept, advantages(kept_r, adv_norm, eps), zero_variance=False, dropped=False)


# -- fast paths ---------------------------------------------------------------------------------
# At n = 16, ``_process_group_numpy`` is ~25 numpy calls of 1-3 us fixed cost each and no arithmetic
# to speak of. ``_fast_max_variance`` runs the same algorithm on Python floats and reproduces every
# floating-point operation of the numpy path in the same order (numpy's summation order included,
# see ``_np_sum``), so its output is bit-identical, not merely close; ``_batched_max_variance`` does
# the same for a [G, n] burst with row-wise numpy operations. The tests check both against the numpy
# path bit for bit, and the generator state after each call.
#
# The pure-Python path's receipt (issue 18: it stays while it saves >= 20% of the selector's cost per
# group at light load, the only load that calls it). ``python -m bench.selector fast_path``, 2026-12-06,
# 2 cores shared with other jobs (absolute times 3-6x a quiet machine's: read the ratios). us per group,
# n=16 m=4, 16x64-token groups, with / without it (rules.FAST_MAX_N = 0: the numpy path for one group,
# the vectorised path for a burst):
#   groups per burst          1               2               4               7
#   selection alone        60 / 291        59 / 140        52 / 72         54 / 48
#   selector's work       368 / 623 -41%  346 / 479 -28%  301 / 345 -13%  283 / 293 -4%
#   selector process      447 / 581 -23%  (its CPU per group, 400 groups/s arriving one at a time)
# "Work" is decode + checks + selection + batch, without sockets. At one group per burst it saved 29-55%
# over five runs, the whole process 23-32% over four. At 4 to 7 groups a burst it saves less (4-18% over
# the runs: the vectorised path catches up); from BATCH_MIN_GROUPS on the vectorised path runs instead.

FAST_MAX_N = 64  # largest group the pure-Python path takes (``_np_sum`` is exact up to 128)
BATCH_MIN_GROUPS = 8  # from this many groups of n <= FAST_MAX_N on, the vectorised path runs (table above)
_INF = math.inf
_Generator = np.random.Generator  # the draws of shuffle / permuted are checked against permutation for this type
_I64, _F32 = np.dtype(np.int64), np.dtype(np.float32)
_BOUND = 1e30  # rewards of magnitude below this overflow nowhere, float32 advantages included
_FLOAT_CHARS = "efd"  # float16/32/64 arrays: ``tolist()`` gives exactly the float64 values numpy uses
_RANGES = [list(range(n)) for n in range(FAST_MAX_N + 1)]


def _np_sum(a: list[float]) -> float:
    """``np.add.reduce`` of a contiguous float64 array of ``len(a) <= 128`` items, bit for bit.

    numpy adds the pairwise sum to the identity 0.0; below its block size of 128 items the pairwise
    sum is a plain loop (from -0.0) under 8 items, else 8 interleaved accumulators combined as
    ``((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))`` followed by the leftover items in order.
    """
    n = len(a)
    if n < 8:
        return 0.0 + reduce(add, a, -0.0)
    if n < 16:
        r0, r1, r2, r3, r4, r5, r6, r7 = a[:8]
    else:
        acc = list(map(add, a[:8], a[8:16]))
        for i in range(16, n - 7, 8):
            acc = list(map(add, acc, a[i : i + 8]))
        r0, r1, r2, r3, r4, r5, r6, r7 = acc
    return 0.0 + reduce(add, a[n - n % 8 :], ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)))


def _fast_max_variance(
    r: list[float], m: int, zero_variance: str, adv_norm: str, rng: np.random.Generator, eps: float
) -> GroupDecision | None:
    """``_process_group_numpy`` with ``max_variance`` on ``len(r) <= 128`` Python floats.

    Returns None, having drawn nothing, where the numpy path must decide (it raises the same error,
    or copes with a sum that overflows). The tie-breaking permutation is ``rng.shuffle`` of
    ``list(range(n))``: the same Fisher-Yates steps on the same draws as ``rng.permutation(n)``, so
    the generator ends in the same state. Rewards of magnitude >= 1e30 (where the Python floats
    could overflow differently) finish on the numpy path from the same tie-broken order.
    """
    n = len(r)
    total = _np_sum(r)
    if not -_INF < total < _INF:  # NaN, inf, or an overflowing sum: the numpy path decides
        return None
    m = operator.index(m)  # a TypeError here is the numpy path's too
    if m < 1:
        return None
    if m > n:
        m = n
    perm = _RANGES[n][:]
    rng.shuffle(perm)
    order = sorted(perm, key=r.__getitem__)  # stable, as _tie_broken_order's argsort
    if not (r[order[0]] > -_BOUND and r[order[-1]] < _BOUND):
        ra = np.array(r)
        return _decide(ra, _max_variance_ordered(ra, m, np.array(order)), zero_variance, adv_norm, eps)
    mean = total / n
    s = [r[j] - mean for j in order]
    p1 = [0.0, *accumulate(s)]  # np.cumsum adds in order too
    p2 = [0.0, *accumulate(map(mul, s, s))]
    t1 = p1[n]
    t2 = p2[n]
    var = []
    for k in range(m + 1):
        q = (p1[m - k] + (t1 - p1[n - k])) / m
        var.append((p2[m - k] + (t2 - p2[n - k])) / m - q * q)  # numpy squares with x * x
    top = max(var)
    threshold = top - 1e-12 * max(1.0, top, -min(var))  # max(top, -min) is max(abs(var))
    best = 0
    while var[best] < threshold:  # smallest k among (near-)ties
        best += 1
    kept = order[: m - best] + order[n - best :]
    kept.sort()
    kr = [r[j] for j in kept]
    if max(kr) == min(kr):
        return GroupDecision(np.array(kept, _I64), np.zeros(m, _F32), True, zero_variance == "drop")
    mu = _np_sum(kr) / m
    centred = [x - mu for x in kr]
    if adv_norm == "std":
        d = math.sqrt(_np_sum(list(map(mul, centred, centred))) / m) + eps
        centred = [x / d for x in centred]
    return GroupDecision(np.array(kept, _I64), np.array(centred, _F32), False, False)


def _batched_max_variance(
    rewards: np.ndarray, m: int, drop: bool, std: bool, rng: np.random.Generator, eps: float
) -> list[GroupDecision] | None:
    """``_process_group_numpy`` with ``max_variance`` on every row of [G, n] rewards (G, n >= 1).

    None, having drawn nothing, where some row must go through ``process_group`` (non-finite or huge
    rewards, m < 1). Each step is the numpy path's, row-wise, and numpy's row-wise reductions add in
    the same order as on a single row, so every row's result is bit-identical to ``process_group``'s.
    ``mean`` and ``std`` are spelled out as ``np.mean``/``np.std`` compute them (``add.reduce``, then
    division by the count; the std of the centred values), which saves their Python-level overhead.
    """
    r = np.asarray(rewards, dtype=np.float64)
    if not np.abs(r).max() < _BOUND:  # False for NaN too
        return None
    m = operator.index(m)
    if m < 1:
        return None
    g, n = r.shape
    m = min(m, n)
    rows = np.arange(g)[:, None]
    perm = rng.permuted(np.broadcast_to(np.arange(n), (g, n)), axis=1)  # = g x rng.permutation(n), in order
    order = perm[rows, np.argsort(r[rows, perm], axis=1, kind="stable")]
    s = r[rows, order]
    s -= np.add.reduce(r, 1, keepdims=True) / n
    p = np.zeros((2, g, n + 1))
    p1, p2 = p[0], p[1]
    np.cumsum(s, 1, out=p1[:, 1:])
    np.cumsum(np.multiply(s, s, out=s), 1, out=p2[:, 1:])
    # columns k = 0..m: p[m - k] is p[:, m::-1], p[n - k] is p[:, n - m:] reversed
    s1 = p1[:, m::-1] + (p1[:, n:] - p1[:, n - m :][:, ::-1])
    s2 = p2[:, m::-1] + (p2[:, n:] - p2[:, n - m :][:, ::-1])
    s1 /= m
    s2 /= m
    var = s2 - s1 * s1
    threshold = var.max(1) - 1e-12 * np.maximum(1.0, np.abs(var).max(1))
    best = (var >= threshold[:, None]).argmax(1)  # smallest k among (near-)ties
    j = np.arange(n)
    kept = order[(j < (m - best)[:, None]) | (j >= (n - best)[:, None])].reshape(g, m)
    kept.sort(1)
    kr = r[rows, kept]
    zero = kr.max(1) == kr.min(1)
    centred = kr - np.add.reduce(kr, 1, keepdims=True) / m
    if std:
        centred /= np.sqrt(np.add.reduce(centred * centred, 1, keepdims=True) / m) + eps
    adv = centred.astype(np.float32)
    adv[zero] = 0.0
    return [GroupDecision(k, a, z, drop and z) for k, a, z in zip(kept, adv, zero.tolist(), strict=True)]
