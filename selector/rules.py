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
Critical Perspective", 2025).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Design note: everything here is group-level (one scalar reward per completion). A later
# token-level selection such as D³S would take per-token data (log-probs, entropies, masks) and
# belongs in its own functions; keep these signatures group-level.

Rule = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

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
    n = r.size
    m = min(m, n)
    order = _tie_broken_order(r, rng)
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
    if norm not in ADV_NORMS:
        raise ValueError(f"unknown advantage norm {norm!r}; valid choices: {list(ADV_NORMS)}")
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
    """Down-sample one group with ``rule``, then apply the zero-variance rule and compute advantages."""
    if zero_variance not in ZERO_VARIANCE_RULES:
        raise ValueError(
            f"unknown zero_variance rule {zero_variance!r}; valid choices: {list(ZERO_VARIANCE_RULES)}"
        )
    if adv_norm not in ADV_NORMS:
        raise ValueError(f"unknown advantage norm {adv_norm!r}; valid choices: {list(ADV_NORMS)}")
    select = build_selector(rule)
    r = _check_rewards(rewards)
    kept = select(r, m, rng)
    kept_r = r[kept]
    if np.ptp(kept_r) == 0:
        zeros = np.zeros(kept.size, dtype=np.float32)
        return GroupDecision(kept, zeros, zero_variance=True, dropped=zero_variance == "drop")
    return GroupDecision(kept, advantages(kept_r, adv_norm, eps), zero_variance=False, dropped=False)
