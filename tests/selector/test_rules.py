"""Tests for selector.rules: PODS max-variance down-sampling, the other rules, advantages."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selector.rules import (
    ADV_NORMS,
    SELECTORS,
    ZERO_VARIANCE_RULES,
    GroupDecision,
    advantages,
    build_selector,
    keep_all,
    max_reward,
    max_variance,
    process_group,
    random_subset,
)

EPS = 1e-6


@st.composite
def groups(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    """(rewards, m, seed): n in 1..10, m in 1..n; continuous rewards or heavily tied {0, 0.5, 1}."""
    n = draw(st.integers(1, 10))
    m = draw(st.integers(1, n))
    elems = draw(
        st.sampled_from(
            [
                st.floats(-5, 5, allow_nan=False, allow_infinity=False),
                st.sampled_from([0.0, 0.5, 1.0]),
            ]
        )
    )
    rewards = np.array(draw(st.lists(elems, min_size=n, max_size=n)), dtype=np.float64)
    seed = draw(st.integers(0, 2**32 - 1))
    return rewards, m, seed


def _check_indices(idx: np.ndarray, n: int, length: int) -> None:
    assert idx.dtype == np.int64
    assert idx.shape == (length,)
    assert np.all(np.diff(idx) > 0)  # sorted and unique
    assert idx.size == 0 or (idx[0] >= 0 and idx[-1] < n)


@settings(max_examples=200, deadline=None, database=None)
@given(groups())
def test_max_variance_matches_brute_force(group: tuple[np.ndarray, int, int]) -> None:
    rewards, m, seed = group
    idx = max_variance(rewards, m, np.random.default_rng(seed))
    _check_indices(idx, rewards.size, m)
    best = max(np.var(rewards[list(c)]) for c in itertools.combinations(range(rewards.size), m))
    assert abs(np.var(rewards[idx]) - best) <= 1e-9


@settings(max_examples=200, deadline=None, database=None)
@given(groups())
def test_max_reward_matches_brute_force(group: tuple[np.ndarray, int, int]) -> None:
    rewards, m, seed = group
    idx = max_reward(rewards, m, np.random.default_rng(seed))
    _check_indices(idx, rewards.size, m)
    assert abs(rewards[idx].sum() - np.sort(rewards)[-m:].sum()) <= 1e-9
    # Every kept reward is >= every dropped one.
    dropped = np.setdiff1d(np.arange(rewards.size), idx)
    if dropped.size:
        assert rewards[idx].min() >= rewards[dropped].max()


@pytest.mark.parametrize("rule", [max_variance, max_reward, random_subset])
def test_same_seed_same_output(rule) -> None:
    rewards = np.random.default_rng(0).choice([0.0, 0.5, 1.0], size=16)
    a = rule(rewards, 5, np.random.default_rng(123))
    b = rule(rewards, 5, np.random.default_rng(123))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rule", [max_variance, max_reward, random_subset])
def test_ties_broken_differently_by_different_seeds(rule) -> None:
    rewards = np.ones(8)
    outs = {tuple(rule(rewards, 3, np.random.default_rng(seed)).tolist()) for seed in range(10)}
    assert len(outs) > 1


def test_max_variance_tied_group_picks_extremes() -> None:
    # Two 1s and six 0s, m=4: optimum keeps both 1s and two 0s (variance 0.25).
    rewards = np.array([0, 1, 0, 0, 0, 1, 0, 0], dtype=np.float64)
    for seed in range(5):
        idx = max_variance(rewards, 4, np.random.default_rng(seed))
        assert rewards[idx].sum() == 2
        assert np.var(rewards[idx]) == pytest.approx(0.25)


def test_max_variance_smallest_k_on_tie() -> None:
    # m=1: every k gives variance 0, so k=0 (the single lowest reward) is chosen.
    rewards = np.array([3.0, -2.0, 7.0, 0.5])
    for seed in range(5):
        np.testing.assert_array_equal(max_variance(rewards, 1, np.random.default_rng(seed)), [1])


def test_m_larger_than_n_keeps_everything() -> None:
    rewards = np.array([0.3, -1.0, 2.0])
    for rule in (max_variance, max_reward, random_subset):
        np.testing.assert_array_equal(rule(rewards, 10, np.random.default_rng(0)), [0, 1, 2])


@settings(max_examples=50, deadline=None, database=None)
@given(groups())
def test_random_subset_distinct_sorted_deterministic(group: tuple[np.ndarray, int, int]) -> None:
    rewards, m, seed = group
    a = random_subset(rewards, m, np.random.default_rng(seed))
    _check_indices(a, rewards.size, m)
    np.testing.assert_array_equal(a, random_subset(rewards, m, np.random.default_rng(seed)))


def test_random_subset_varies_with_seed() -> None:
    rewards = np.arange(20, dtype=np.float64)
    outs = {tuple(random_subset(rewards, 5, np.random.default_rng(s)).tolist()) for s in range(10)}
    assert len(outs) > 1


def test_keep_all_ignores_m() -> None:
    rewards = np.array([3.0, 1.0, 2.0, 2.0, 0.0])
    for m in (1, 3, 5, 99):
        idx = keep_all(rewards, m, np.random.default_rng(0))
        assert idx.dtype == np.int64
        np.testing.assert_array_equal(idx, np.arange(5))


def test_registry_and_build_selector() -> None:
    assert set(SELECTORS) == {"max_variance", "max_reward", "random", "all"}
    assert build_selector("max_variance") is max_variance
    assert build_selector("max_reward") is max_reward
    assert build_selector("random") is random_subset
    assert build_selector("all") is keep_all


def test_advantages_std_exact() -> None:
    r = np.array([0.0, 1.0, 1.0, 0.0])
    adv = advantages(r, "std", eps=EPS)
    assert adv.dtype == np.float32
    expected = np.array([-1.0, 1.0, 1.0, -1.0]) * (0.5 / (0.5 + EPS))
    np.testing.assert_allclose(adv, expected.astype(np.float32), rtol=0, atol=1e-7)


def test_advantages_mean_exact() -> None:
    r = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    adv = advantages(r, "mean")
    assert adv.dtype == np.float32
    np.testing.assert_allclose(adv, [-0.6, 0.4, 0.4, -0.6, 0.4], rtol=0, atol=1e-7)
    assert abs(float(adv.astype(np.float64).sum())) < 1e-6


@settings(max_examples=50, deadline=None, database=None)
@given(groups())
def test_advantages_mean_norm_sums_to_zero(group: tuple[np.ndarray, int, int]) -> None:
    rewards, _, _ = group
    assert abs(float(advantages(rewards, "mean").astype(np.float64).sum())) < 1e-5


def test_advantages_constant_group_is_zero() -> None:
    for norm in ADV_NORMS:
        np.testing.assert_array_equal(advantages(np.full(4, 0.7), norm), np.zeros(4, np.float32))


def test_advantages_unknown_norm() -> None:
    with pytest.raises(ValueError, match="std"):
        advantages(np.array([0.0, 1.0]), "median")


@pytest.mark.parametrize("zv", ZERO_VARIANCE_RULES)
def test_process_group_zero_variance(zv: str) -> None:
    rewards = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    d = process_group(rewards, 4, "max_variance", zv, "std", np.random.default_rng(0))
    assert isinstance(d, GroupDecision)
    assert d.zero_variance is True
    assert d.dropped is (zv == "drop")
    assert d.kept.dtype == np.int64 and d.kept.size == 4
    assert d.advantages.dtype == np.float32
    np.testing.assert_array_equal(d.advantages, np.zeros(4, np.float32))


def test_process_group_zero_variance_only_after_selection() -> None:
    # The whole group has variance but the top-2 are equal: max_reward keeps a zero-variance pair.
    rewards = np.array([0.0, 1.0, 1.0, 0.5])
    d = process_group(rewards, 2, "max_reward", "drop", "std", np.random.default_rng(0))
    np.testing.assert_array_equal(d.kept, [1, 2])
    assert d.zero_variance and d.dropped


@pytest.mark.parametrize("norm", ADV_NORMS)
@pytest.mark.parametrize("rule", sorted(SELECTORS))
def test_process_group_nonzero_variance(rule: str, norm: str) -> None:
    rewards = np.array([0.0, 1.0, 0.25, 0.0, 1.0, 0.5, 0.75, 1.0])
    d = process_group(rewards, 4, rule, "drop", norm, np.random.default_rng(7))
    expected_kept = build_selector(rule)(rewards, 4, np.random.default_rng(7))
    np.testing.assert_array_equal(d.kept, expected_kept)
    if np.ptp(rewards[d.kept]) > 0:
        assert not d.zero_variance and not d.dropped
        np.testing.assert_array_equal(d.advantages, advantages(rewards[d.kept], norm))
        assert d.advantages.dtype == np.float32


def test_process_group_unknown_options() -> None:
    rewards = np.array([0.0, 1.0])
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="drop"):
        process_group(rewards, 2, "max_variance", "skip", "std", rng)
    with pytest.raises(ValueError, match="mean"):
        process_group(rewards, 2, "max_variance", "drop", "l2", rng)
    with pytest.raises(ValueError, match="max_variance"):
        process_group(rewards, 2, "pods", "drop", "std", rng)


@pytest.mark.parametrize("rule", list(SELECTORS.values()))
def test_rule_errors(rule) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="m must be"):
        rule(np.array([0.0, 1.0]), 0, rng)
    with pytest.raises(ValueError, match="1-D"):
        rule(np.zeros((2, 3)), 1, rng)
    with pytest.raises(ValueError, match="finite"):
        rule(np.array([0.0, np.nan, 1.0]), 1, rng)
    with pytest.raises(ValueError, match="finite"):
        rule(np.array([0.0, np.inf]), 1, rng)


def test_unknown_rule_lists_valid_names() -> None:
    with pytest.raises(ValueError) as exc:
        build_selector("pods")
    for name in SELECTORS:
        assert name in str(exc.value)


def test_max_variance_large_group() -> None:
    rng = np.random.default_rng(42)
    rewards = rng.normal(size=4096)
    idx = max_variance(rewards, 1024, np.random.default_rng(0))
    _check_indices(idx, 4096, 1024)
    best = np.var(rewards[idx])
    for _ in range(200):
        sub = rng.choice(4096, size=1024, replace=False)
        assert best >= np.var(rewards[sub])
