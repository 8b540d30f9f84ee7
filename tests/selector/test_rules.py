"""Tests for selector.rules: PODS max-variance down-sampling, the other rules, advantages."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import get_args

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.config import SelectorConfig
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


@pytest.mark.parametrize(
    ("field", "names"), [("rule", SELECTORS), ("adv_norm", ADV_NORMS), ("zero_variance", ZERO_VARIANCE_RULES)]
)
def test_config_names_the_registered_options(field: str, names: Iterable[str]) -> None:
    """protocol/ imports no role, so the config spells these names as Literals; they must be these."""
    assert set(get_args(SelectorConfig.model_fields[field].annotation)) == set(names)


def test_max_variance_large_group() -> None:
    rng = np.random.default_rng(42)
    rewards = rng.normal(size=4096)
    idx = max_variance(rewards, 1024, np.random.default_rng(0))
    _check_indices(idx, 4096, 1024)
    best = np.var(rewards[idx])
    for _ in range(200):
        sub = rng.choice(4096, size=1024, replace=False)
        assert best >= np.var(rewards[sub])


# --------------------------------------------------------------------------------------------------
# Fast paths: the pure-Python process_group path and the batched process_groups are bit-exact with
# the numpy path (_process_group_numpy), generator draws included.
# --------------------------------------------------------------------------------------------------

from selector import rules  # noqa: E402
from selector.rules import _np_sum, _process_group_numpy, process_groups  # noqa: E402


def _numpy_path(rewards, m, rule, zv, norm, rng, eps=1e-6) -> GroupDecision:
    return _process_group_numpy(rewards, m, build_selector(rule), zv, norm, rng, eps)


def _assert_identical(got: GroupDecision, want: GroupDecision) -> None:
    assert isinstance(got, GroupDecision)
    assert got.kept.dtype == want.kept.dtype == np.int64
    np.testing.assert_array_equal(got.kept, want.kept)
    assert got.advantages.dtype == want.advantages.dtype == np.float32
    assert got.advantages.shape == want.advantages.shape
    assert got.advantages.tobytes() == want.advantages.tobytes()  # bit for bit, signs of zero included
    assert got.zero_variance is want.zero_variance
    assert got.dropped is want.dropped


def _same_state(a: np.random.Generator, b: np.random.Generator) -> bool:
    return a.bit_generator.state == b.bit_generator.state


_REWARD_ELEMS = [
    st.floats(-5, 5, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
    st.sampled_from([0.0, -0.0, 1.0]),
    st.sampled_from([0.1, 0.2, 0.3, 1e-300, -1e-300, 5e-324]),
    st.floats(-1e20, 1e20, allow_nan=False, allow_infinity=False),
    st.floats(-1e-10, 1e-10, allow_nan=False, allow_infinity=False),
]


@st.composite
def fast_groups(draw: st.DrawFn, max_n: int = rules.FAST_MAX_N) -> tuple[np.ndarray, int, int, str, str]:
    """(rewards as float32 or float64, m in 1..n+2, seed, zero_variance, adv_norm), n in 1..max_n."""
    n = draw(st.integers(1, max_n))
    m = draw(st.integers(1, n + 2))
    elems = draw(st.sampled_from(_REWARD_ELEMS))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    rewards = np.array(draw(st.lists(elems, min_size=n, max_size=n)), dtype=dtype)
    return (
        rewards,
        m,
        draw(st.integers(0, 2**32 - 1)),
        draw(st.sampled_from(ZERO_VARIANCE_RULES)),
        draw(st.sampled_from(ADV_NORMS)),
    )


@settings(max_examples=400, deadline=None, database=None)
@given(fast_groups())
def test_fast_path_is_bit_exact_with_the_numpy_path(case) -> None:
    rewards, m, seed, zv, norm = case
    fast, ref = np.random.default_rng(seed), np.random.default_rng(seed)
    _assert_identical(
        process_group(rewards, m, "max_variance", zv, norm, fast),
        _numpy_path(rewards, m, "max_variance", zv, norm, ref),
    )
    assert _same_state(fast, ref)  # the same draws: the random stream continues identically


@settings(max_examples=200, deadline=None, database=None)
@given(groups())
def test_fast_path_keeps_a_maximal_variance_subset(group: tuple[np.ndarray, int, int]) -> None:
    rewards, m, seed = group
    d = process_group(rewards, m, "max_variance", "keep", "mean", np.random.default_rng(seed))
    _check_indices(d.kept, rewards.size, m)
    best = max(np.var(rewards[list(c)]) for c in itertools.combinations(range(rewards.size), m))
    assert abs(np.var(rewards[d.kept]) - best) <= 1e-9
    assert d.zero_variance is bool(np.ptp(rewards[d.kept]) == 0)


def test_fast_path_is_taken_for_the_common_case(monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(rules, "_process_group_numpy", lambda *a: calls.append(1))
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        d = process_group(np.array([0, 1, 0.5, 1, 0, 0.25] * 2, dtype), 4, "max_variance", "keep", "std", rng)
        assert isinstance(d, GroupDecision)
    assert calls == []
    for rewards, rule in (
        (np.zeros(rules.FAST_MAX_N + 1), "max_variance"),
        (np.zeros(4, np.int64), "max_variance"),
        ([0.0, 1.0], "max_variance"),
        (np.zeros(4), "max_reward"),
    ):
        process_group(rewards, 2, rule, "keep", "std", rng)  # type: ignore[arg-type]  # the list, on purpose
    assert len(calls) == 4


@pytest.mark.parametrize("norm", ADV_NORMS)
@pytest.mark.parametrize("zv", ZERO_VARIANCE_RULES)
def test_fast_path_known_values(zv: str, norm: str) -> None:
    rewards = np.array([1, 0, 0, 0, 1, 0, 0, 1], np.float32)
    d = process_group(rewards, 4, "max_variance", zv, norm, np.random.default_rng(3))
    assert sorted(rewards[d.kept].tolist()) == [0, 0, 1, 1]
    want = np.where(rewards[d.kept] > 0, 0.5, -0.5)
    if norm == "std":
        want = want / (0.5 + EPS)
    np.testing.assert_array_equal(d.advantages, want.astype(np.float32))
    assert not d.zero_variance and not d.dropped


@pytest.mark.parametrize(
    "rewards",
    [
        pytest.param([1e200, -1e200, 0.0, 5.0], id="squares-overflow"),
        pytest.param([1e30, 2e30, 3e30, 0.0], id="at-the-bound"),
        pytest.param([1.7e308, 1.7e308, -1.0, 2.0], id="sum-overflows"),
        pytest.param([-1e35, 1.0, 2.0, 3.0, 4.0], id="mean-norm-beyond-float32"),
    ],
)
def test_huge_rewards_behave_exactly_as_the_numpy_path(rewards: list[float]) -> None:
    """Rewards the Python path does not take (|r| >= 1e30, or a sum that overflows) give the numpy
    path's result, or its exception, after the same draws."""
    r = np.array(rewards)
    for norm in ADV_NORMS:
        fast, ref = np.random.default_rng(5), np.random.default_rng(5)
        with np.errstate(all="ignore"):
            try:
                want = _numpy_path(r, 2, "max_variance", "keep", norm, ref)
            except Exception as e:  # noqa: BLE001 - whatever the numpy path does, the fast path must do
                with pytest.raises(type(e)):
                    process_group(r, 2, "max_variance", "keep", norm, fast)
            else:
                _assert_identical(process_group(r, 2, "max_variance", "keep", norm, fast), want)
        assert _same_state(fast, ref)


@pytest.mark.parametrize("bad", [[0.0, np.nan, 1.0], [np.inf, 0.0], [-np.inf, 1.0, 2.0]])
def test_fast_path_non_finite_rewards_same_error_no_draw(bad: list[float]) -> None:
    for dtype in (np.float32, np.float64):
        rng = np.random.default_rng(0)
        with pytest.raises(ValueError, match="finite") as fast_err:
            process_group(np.array(bad, dtype), 2, "max_variance", "keep", "std", rng)
        with pytest.raises(ValueError, match="finite") as ref_err:
            _numpy_path(np.array(bad, dtype), 2, "max_variance", "keep", "std", np.random.default_rng(0))
        assert str(fast_err.value) == str(ref_err.value)
        assert _same_state(rng, np.random.default_rng(0))


def test_fast_path_bad_m_same_errors() -> None:
    rewards = np.array([0.0, 1.0, 0.5])
    # bad m on purpose, wrong types included (the ignores below): the fast path raises what the numpy path raises
    for m, err in ((0, ValueError), (-3, ValueError), (1.5, TypeError), ("2", TypeError)):
        with pytest.raises(err) as fast_err:
            process_group(rewards, m, "max_variance", "keep", "std", np.random.default_rng(0))  # type: ignore[arg-type]
        with pytest.raises(err) as ref_err:
            _numpy_path(rewards, m, "max_variance", "keep", "std", np.random.default_rng(0))
        assert str(fast_err.value) == str(ref_err.value)
    # a numpy integer on purpose (hence the ignore): it is taken as the int it equals
    d = process_group(rewards, np.int64(2), "max_variance", "keep", "std", np.random.default_rng(0))  # type: ignore[arg-type]
    _assert_identical(d, _numpy_path(rewards, 2, "max_variance", "keep", "std", np.random.default_rng(0)))


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.integers(1, 128).flatmap(
        lambda n: st.lists(st.sampled_from(_REWARD_ELEMS[:4]).flatmap(lambda e: e), min_size=n, max_size=n)
    )
)
def test_np_sum_is_numpys_summation(values: list[float]) -> None:
    a = np.array(values, np.float64)
    assert _np_sum(values) == a.sum()
    assert _np_sum(values) / len(values) == a.mean()
    assert np.signbit(_np_sum(values)) == np.signbit(a.sum())


@st.composite
def bursts(draw: st.DrawFn) -> tuple[np.ndarray, int, int, str, str]:
    """[G, n] rewards with G in 0..24 (both sides of BATCH_MIN_GROUPS) and n in 1..80 (both sides of FAST_MAX_N)."""
    g = draw(st.integers(0, 24))
    n = draw(st.sampled_from([1, 2, 3, 4, 7, 8, 9, 16, 17, 33, 64, 65, 80]))
    m = draw(st.integers(1, n + 2))
    kind = draw(st.sampled_from(["levels", "binary", "normal", "uniform"]))
    gen = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rewards = {
        "levels": lambda: gen.choice(np.arange(5) / 4, (g, n)),
        "binary": lambda: gen.choice([0.0, 1.0], (g, n)),
        "normal": lambda: gen.normal(size=(g, n)) * 10.0 ** gen.integers(-6, 7),
        "uniform": lambda: gen.random((g, n)),
    }[kind]()
    rewards = rewards.astype(draw(st.sampled_from([np.float64, np.float32])))
    return (
        rewards,
        m,
        draw(st.integers(0, 2**32 - 1)),
        draw(st.sampled_from(ZERO_VARIANCE_RULES)),
        draw(st.sampled_from(ADV_NORMS)),
    )


@settings(max_examples=150, deadline=None, database=None)
@given(bursts())
def test_process_groups_equals_process_group_row_by_row(case) -> None:
    rewards, m, seed, zv, norm = case
    a, b, c = np.random.default_rng(seed), np.random.default_rng(seed), np.random.default_rng(seed)
    got = process_groups(rewards, m, "max_variance", zv, norm, a)
    assert isinstance(got, list) and len(got) == rewards.shape[0]
    for d, row in zip(got, rewards, strict=True):
        _assert_identical(d, process_group(row, m, "max_variance", zv, norm, b))
    assert _same_state(a, b)
    for d, row in zip(got, rewards, strict=True):  # and with the numpy reference path itself
        _assert_identical(d, _numpy_path(row, m, "max_variance", zv, norm, c))
    assert _same_state(a, c)


@pytest.mark.parametrize("rule", sorted(SELECTORS))
def test_process_groups_other_rules_loop(rule: str) -> None:
    rewards = np.random.default_rng(1).choice([0.0, 0.5, 1.0], (12, 8))
    a, b = np.random.default_rng(9), np.random.default_rng(9)
    got = process_groups(rewards, 3, rule, "drop", "mean", a)
    for d, row in zip(got, rewards, strict=True):
        _assert_identical(d, process_group(row, 3, rule, "drop", "mean", b))
    assert _same_state(a, b)


@settings(max_examples=100, deadline=None, database=None)
@given(
    st.integers(8, 20),
    st.integers(1, 9),
    st.integers(1, 9),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["levels", "normal"]),
)
def test_process_groups_rows_have_maximal_variance_and_are_deterministic(
    g: int, n: int, m: int, seed: int, kind: str
) -> None:
    gen = np.random.default_rng(seed)
    rewards = gen.choice(np.arange(5) / 4, (g, n)) if kind == "levels" else gen.normal(size=(g, n))
    got = process_groups(rewards, m, "max_variance", "keep", "std", np.random.default_rng(seed))
    again = process_groups(rewards, m, "max_variance", "keep", "std", np.random.default_rng(seed))
    for d, e, row in zip(got, again, rewards, strict=True):
        _assert_identical(d, e)
        _check_indices(d.kept, n, min(m, n))
        best = max(np.var(row[list(c)]) for c in itertools.combinations(range(n), min(m, n)))
        assert abs(np.var(row[d.kept]) - best) <= 1e-9
        if not d.zero_variance:
            np.testing.assert_array_equal(d.advantages, advantages(row[d.kept], "std"))
        else:
            np.testing.assert_array_equal(d.advantages, np.zeros(min(m, n), np.float32))


def test_process_groups_invalid_rows_fail_like_the_loop() -> None:
    """A bad row raises the error process_group raises, after the draws of the rows before it."""
    rewards = np.random.default_rng(0).random((12, 6))
    rewards[7, 2] = np.nan
    a, b = np.random.default_rng(4), np.random.default_rng(4)
    with pytest.raises(ValueError, match="finite"):
        process_groups(rewards, 3, "max_variance", "keep", "std", a)
    for row in rewards[:7]:
        process_group(row, 3, "max_variance", "keep", "std", b)
    assert _same_state(a, b)
    for m, err in ((0, ValueError), ("3", TypeError)):  # bad m on purpose, a str included (hence the ignore)
        with pytest.raises(err):
            process_groups(rewards[:7], m, "max_variance", "keep", "std", np.random.default_rng(0))  # type: ignore[arg-type]


def test_process_groups_argument_errors() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="2-D"):
        process_groups(np.zeros(4), 2, "max_variance", "keep", "std", rng)
    with pytest.raises(ValueError, match="2-D"):
        process_groups(np.zeros((2, 2, 2)), 2, "max_variance", "keep", "std", rng)
    empty = np.zeros((0, 16))
    assert process_groups(empty, 4, "max_variance", "keep", "std", rng) == []
    with pytest.raises(ValueError, match="drop"):
        process_groups(empty, 4, "max_variance", "skip", "std", rng)
    with pytest.raises(ValueError, match="mean"):
        process_groups(empty, 4, "max_variance", "keep", "l2", rng)
    with pytest.raises(ValueError, match="max_variance"):
        process_groups(empty, 4, "pods", "keep", "std", rng)
    with pytest.raises(ValueError, match="non-empty"):
        process_groups(np.zeros((9, 0)), 4, "max_variance", "keep", "std", rng)
    assert _same_state(rng, np.random.default_rng(0))


def test_process_groups_zero_variance_rows() -> None:
    rewards = np.array([[0.1] * 8, [0, 1, 0, 1, 0, 1, 0, 1], [0.3] * 8, [1, 1, 1, 1, 1, 1, 1, 0]] * 3)
    for zv in ZERO_VARIANCE_RULES:
        got = process_groups(rewards, 4, "max_variance", zv, "std", np.random.default_rng(0))
        assert [d.zero_variance for d in got] == [True, False, True, False] * 3
        assert [d.dropped for d in got] == [zv == "drop", False, zv == "drop", False] * 3
        for d in got[::2]:
            assert d.advantages.tobytes() == np.zeros(4, np.float32).tobytes()


# --------------------------------------------------------------------------------------------------
# The selector's burst path: keep_groups and the faster build_batch give exactly what the per-group
# code gives (tests/selector/test_buffer.py: Buffer.admit of a burst changes counters and buffer as one
# admit per group does).
# --------------------------------------------------------------------------------------------------

from helpers import assert_same_kept as _assert_same_kept  # noqa: E402
from helpers import random_group as _group  # noqa: E402

from protocol.config import load_config  # noqa: E402
from protocol.messages import BatchRequest, ScoredGroup  # noqa: E402
from selector.batch import KeptGroup, build_batch, keep_group, keep_groups  # noqa: E402


def _reference_keep_group(group: ScoredGroup, cfg: SelectorConfig, m: int, rng: np.random.Generator):
    """keep_group as it was: process_group, then numpy cumsum slicing."""
    decision = process_group(group.rewards, m, cfg.rule, cfg.zero_variance, cfg.adv_norm, rng)
    if decision.dropped:
        return None
    ends = np.cumsum(group.completion_lens)
    starts = ends - group.completion_lens
    kept = decision.kept
    return KeptGroup(
        server_id=group.server_id,
        version=group.version,
        prompt_ids=group.prompt_ids,
        completions=[group.completion_ids[starts[i] : ends[i]] for i in kept],
        logprobs=[group.logprobs[starts[i] : ends[i]] for i in kept],
        rewards=group.rewards[kept],
        advantages=decision.advantages,
        group_reward_mean=float(group.rewards.mean()),
        zero_variance=decision.zero_variance,
        session=group.session,
        seq=group.group_id,
        tokens=int(group.completion_lens.sum()),
        n=len(group.completion_lens),
    )


def _reference_build_batch(groups, req, stats):
    """build_batch as it was: one Python-level row at a time."""
    servers = sorted({g.server_id for g in groups})
    index = {s: i for i, s in enumerate(servers)}
    rows = [(gi, g, j) for gi, g in enumerate(groups) for j in range(len(g.completions))]
    stats = {
        **stats,
        "reward/mean": float(np.mean([g.group_reward_mean for g in groups])),
        "reward/kept_std": float(np.mean([g.rewards.std() for g in groups])),
    }
    return dict(
        request_id=req.request_id,
        version=req.version,
        servers=servers,
        stats=stats,
        prompt_ids=np.concatenate([g.prompt_ids for _, g, _ in rows]).astype(np.int32),
        prompt_lens=np.array([len(g.prompt_ids) for _, g, _ in rows], np.int32),
        completion_ids=np.concatenate([g.completions[j] for _, g, j in rows]).astype(np.int32),
        completion_lens=np.array([len(g.completions[j]) for _, g, j in rows], np.int32),
        logprobs=np.concatenate([g.logprobs[j] for _, g, j in rows]).astype(np.float32),
        advantages=np.array([g.advantages[j] for _, g, j in rows], np.float32),
        rewards=np.array([g.rewards[j] for _, g, j in rows], np.float32),
        versions=np.array([g.version for _, g, _ in rows], np.int64),
        group_index=np.array([gi for gi, _, _ in rows], np.int32),
        server_index=np.array([index[g.server_id] for _, g, _ in rows], np.int32),
        group_sessions=np.array([g.session for g in groups], np.int64),
        group_seqs=np.array([g.seq for g in groups], np.int64),
        loss_mask=np.empty(0, np.uint8),  # single-turn groups: every token counts, no mask travels
    )


@settings(max_examples=120, deadline=None, database=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 30),
    st.sampled_from([1, 3, 8, 16]),
    st.integers(1, 6),
    st.sampled_from(sorted(SELECTORS)),
    st.sampled_from(ZERO_VARIANCE_RULES),
    st.sampled_from(ADV_NORMS),
    st.booleans(),
)
def test_keep_groups_and_build_batch_equal_the_per_group_code(
    seed: int, g: int, n: int, m: int, rule: str, zv: str, norm: str, mixed: bool
) -> None:
    gen = np.random.default_rng(seed)
    sizes = gen.integers(1, 10, g) if mixed else np.full(g, n)
    groups = [
        _group(gen.choice([0.0, 0.5, 1.0], k) if i % 3 else gen.random(k), i, f"s-{i % 3}", i % 4)
        for i, k in enumerate(sizes.tolist())
    ]
    cfg = SelectorConfig(rule=rule, zero_variance=zv, adv_norm=norm)
    a, b = np.random.default_rng(seed), np.random.default_rng(seed)
    got = keep_groups(groups, cfg, m, a)
    want = [_reference_keep_group(x, cfg, m, b) for x in groups]
    assert len(got) == len(want)
    for x, y in zip(got, want, strict=True):
        _assert_same_kept(x, y)
    assert _same_state(a, b)
    kept = [k for k in got if k is not None]
    if kept:
        req = BatchRequest(request_id=5, version=3, num_groups=len(kept))
        batch, ref = build_batch(kept, req, {"x": 1}), _reference_build_batch(kept, req, {"x": 1})
        for name, value in ref.items():
            mine = getattr(batch, name)
            if isinstance(value, np.ndarray):
                assert mine.dtype == value.dtype and mine.shape == value.shape and mine.tobytes() == value.tobytes()
            else:
                assert mine == value and type(mine) is type(value)
        batch.check()


def test_keep_group_single_equals_reference() -> None:
    cfg = SelectorConfig()
    for i in range(50):
        group = _group(np.random.default_rng(i).choice([0.0, 0.25, 1.0], 16), i)
        a, b = np.random.default_rng(i), np.random.default_rng(i)
        _assert_same_kept(keep_group(group, cfg, 4, a), _reference_keep_group(group, cfg, 4, b))
        assert _same_state(a, b)


def test_legacy_random_state_takes_the_numpy_path() -> None:
    rewards = np.random.default_rng(0).choice([0.0, 1.0], (9, 6))
    a, b = np.random.RandomState(3), np.random.RandomState(3)
    got = process_groups(rewards, 3, "max_variance", "keep", "std", a)  # type: ignore[arg-type]
    for d, row in zip(got, rewards, strict=True):
        _assert_identical(d, _numpy_path(row, 3, "max_variance", "keep", "std", b))
    assert a.randint(1 << 30) == b.randint(1 << 30)


def test_exact_mode_needs_room_for_2k_plus_1_batches() -> None:
    with pytest.raises(ValueError, match="selector.buffer_groups"):
        load_config(
            None,
            ["run.staleness_mode=exact", "max_staleness=8", "learner.groups_per_step=8", "selector.buffer_groups=100"],
        )
