"""Tests for selector.buffer: the selector's buffer policy (arrival gate, down-sampling of bursts, the
zero-variance and exact-surplus rules, the bound while the learner is silent, which groups a batch takes),
without sockets."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from helpers import assert_same_kept as _assert_same_kept
from helpers import random_group as _group
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.config import Config, load_config
from protocol.messages import BatchRequest, ScoredGroup
from selector.batch import KeptGroup
from selector.buffer import Buffer, Tally, exact_quota
from selector.rules import BATCH_MIN_GROUPS, ZERO_VARIANCE_RULES


def _cfg(*overrides: str) -> Config:
    return load_config(None, ["max_staleness=1", "rollout.group_size=8", "selector.keep=4", *overrides])


def _kept(version: int, gid: int, server: str = "s-0") -> KeptGroup:
    """A buffered group, for the tests of ``take`` (``seq`` tells groups apart)."""
    empty = np.zeros(0, np.float32)
    return KeptGroup(server, version, np.array([1], np.int32), [], [], empty, empty, 0.0, False, 1, gid)


def _assert_same_buffers(a: Buffer, b: Buffer) -> None:
    assert a.tally.counts == b.tally.counts and a.tally.totals == b.tally.totals
    assert a.rng.bit_generator.state == b.rng.bit_generator.state
    assert len(a) == len(b)
    for x, y in zip(a.groups, b.groups, strict=True):
        _assert_same_kept(x, y)


# --------------------------------------------------------------------------------------------------
# admit: a burst changes counters, buffer and rng as one admit per group does
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zv", ZERO_VARIANCE_RULES)
def test_admit_of_a_burst_matches_one_group_at_a_time(zv: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Single-group calls take keep_group, bursts the vectorised keep_groups (tests/selector/test_rules.py
    checks both against the per-group reference): counters, buffer, outcomes and draws are the same."""
    import selector.batch

    rows: list[int] = []  # the bursts process_groups down-sampled at once
    real = selector.batch.process_groups

    def spy(rewards: np.ndarray, *args: Any) -> list:
        rows.append(len(rewards))
        return real(rewards, *args)

    monkeypatch.setattr(selector.batch, "process_groups", spy)
    cfg = _cfg(f"selector.zero_variance={zv}")
    gen = np.random.default_rng(1)
    burst = [
        _group(gen.choice([0.0, 1.0], 8) if i % 5 else np.full(8, 0.5), i, f"s-{i % 2}", version=i % 4)
        for i in range(40)
    ]
    version = 3  # groups of version 0 and 1 are stale (K = 1)
    one, two = Buffer(cfg, np.random.default_rng(7), Tally()), Buffer(cfg, np.random.default_rng(7), Tally())
    want = [one.admit([g], version)[0] for g in burst]
    assert rows == []  # one group at a time: keep_group
    got = two.admit(burst[:25], version) + two.admit(burst[25:], version)
    assert rows == [12, 8] and BATCH_MIN_GROUPS <= 8  # the fresh groups of each burst, both vectorised
    assert got == want
    _assert_same_buffers(two, one)
    # and what each outcome is, from the groups alone
    constant = [bool(np.all(g.rewards == g.rewards[0])) for g in burst]
    expect = [
        "stale" if cfg.too_stale(version, g.version) else "zero_variance" if c and zv == "drop" else "kept"
        for g, c in zip(burst, constant, strict=True)
    ]
    assert got == expect
    assert two.tally.counts["staleness/dropped"] == 20 and two.tally.counts["groups/received"] == 40
    assert two.tally.counts["groups/received/s-0"] == two.tally.counts["groups/received/s-1"] == 20
    assert two.tally.counts["staleness/dropped/s-0"] == two.tally.counts["staleness/dropped/s-1"] == 10
    fresh_constant = sum(c and not cfg.too_stale(version, g.version) for g, c in zip(burst, constant, strict=True))
    assert fresh_constant > 0
    key = "selector/zero_variance_dropped" if zv == "drop" else "selector/zero_variance_kept"
    assert two.tally.counts[key] == fresh_constant
    assert len(two) == 20 - (fresh_constant if zv == "drop" else 0)
    assert [g.seq for g in two.groups] == [g.group_id for g, o in zip(burst, got, strict=True) if o == "kept"]


@st.composite
def admissions(draw: st.DrawFn) -> tuple[Config, list[ScoredGroup], list[int], int, int]:
    """(config, groups, cut points, learner version, seed): bounded or exact mode, a buffer that may fill,
    groups of one size or mixed, some of zero variance, some stale."""
    exact = draw(st.booleans())
    k, per = draw(st.integers(0, 2)), draw(st.integers(1, 4))
    room = draw(st.integers(1, 12)) if not exact else (2 * k + 1) * per + draw(st.integers(0, 4))
    zv = draw(st.sampled_from(ZERO_VARIANCE_RULES))
    cfg = load_config(
        None,
        [
            f"max_staleness={k}",
            "rollout.group_size=8",
            "selector.keep=4",
            f"selector.zero_variance={zv}",
            f"selector.buffer_groups={room}",
            f"learner.groups_per_step={per}",
            f"run.staleness_mode={'exact' if exact else 'bounded'}",
        ],
    )
    version = draw(st.integers(0, 6))
    n = draw(st.integers(0, 30))
    mixed = draw(st.booleans())
    gen = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    groups = []
    for i in range(n):
        size = int(gen.integers(4, 10)) if mixed else 8
        rewards = np.full(size, 0.25) if gen.random() < 0.2 else gen.choice([0.0, 0.5, 1.0], size)
        groups.append(_group(rewards, i, f"s-{i % 3}", int(gen.integers(max(0, version - k - 1), version + 1))))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=3)))
    return cfg, groups, cuts, version, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=80, deadline=None, database=None)
@given(admissions())
def test_admit_in_any_bursts_matches_one_group_at_a_time(case) -> None:
    cfg, groups, cuts, version, seed = case
    one, many = Buffer(cfg, np.random.default_rng(seed)), Buffer(cfg, np.random.default_rng(seed))
    want = [one.admit([g], version)[0] for g in groups]
    got: list[str] = []
    for a, b in zip([0, *cuts], [*cuts, len(groups)], strict=True):
        got += many.admit(groups[a:b], version)
    assert got == want
    _assert_same_buffers(many, one)
    assert len(many) <= cfg.selector.buffer_groups
    assert sum(many.tally.counts[f"groups/received/s-{i}"] for i in range(3)) == len(groups)
    outcome_keys = {
        "stale": "staleness/dropped",
        "zero_variance": "selector/zero_variance_dropped",
        "exact_surplus": "staleness/exact_surplus",
        "full": "selector/dropped_learner_silent",
    }
    for outcome, key in outcome_keys.items():
        assert many.tally.counts[key] == got.count(outcome)
    assert len(many) == got.count("kept")
    if cfg.run.staleness_mode == "exact":
        for v in range(version + 1):
            assert many.count_version(v) <= exact_quota(cfg, v)
    else:
        assert got.count("exact_surplus") == 0


def test_a_full_buffer_reads_on_and_drops_while_the_learner_is_silent() -> None:
    """The selector reads on past the buffer's bound only while the learner is silent (its loop bounds a
    burst by the room left otherwise); groups that do not fit are dropped and counted."""
    from selector.server import Selector

    pool = Buffer(_cfg("selector.buffer_groups=4"), np.random.default_rng(0))
    got = pool.admit([_group([0.0, 1.0] * 4, i) for i in range(6)], 0, learner_silent=True)
    assert got == ["kept"] * 4 + ["full"] * 2
    assert len(pool) == 4 and pool.tally.counts["selector/dropped_learner_silent"] == 2
    assert [g.seq for g in pool.groups] == [0, 1, 2, 3]
    sel = SimpleNamespace(heard_learner=True, heard_at=time.monotonic())
    assert not Selector.learner_silent(sel)  # type: ignore[arg-type]
    sel.heard_at -= 10  # no announcement for 10 s: the learner is gone (restarting)
    assert Selector.learner_silent(sel)  # type: ignore[arg-type]
    sel.heard_learner = False  # never heard: nothing to wait for yet, and no groups are read
    assert not Selector.learner_silent(sel)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# take: re-gating, bounded mode's deadline order, exact mode
# --------------------------------------------------------------------------------------------------


def test_take_regates_the_buffer_once_per_request_version() -> None:
    pool = Buffer(_cfg(), np.random.default_rng(0))
    pool.admit([_group([0.0, 1.0] * 4, i, version=i % 3) for i in range(6)], 0)  # versions 0, 1, 2; learner 0
    assert len(pool) == 6
    assert pool.take(BatchRequest(request_id=1, version=2, num_groups=100)) is None
    # version-0 groups are stale for version 2: dropped and counted once
    assert len(pool) == 4 and pool.tally.counts["staleness/dropped"] == 2 and pool.scanned_version == 2
    pool.admit([_group([0.0, 1.0] * 4, 10, version=1)], 2)  # passes the arrival gate, so fresh for version 2
    assert pool.take(BatchRequest(request_id=1, version=2, num_groups=100)) is None
    assert len(pool) == 5 and pool.tally.counts["staleness/dropped"] == 2
    assert pool.take(BatchRequest(request_id=2, version=3, num_groups=100)) is None  # a new version: re-gated
    assert len(pool) == 2 and pool.tally.counts["staleness/dropped"] == 5 and pool.scanned_version == 3
    assert pool.tally.counts["staleness/dropped/s-0"] == 5
    assert pool.fresh(3) == 2 and pool.fresh(4) == 0


def _oldest_first(groups: list[KeptGroup], num: int) -> tuple[list[KeptGroup], list[KeptGroup]]:
    """Reference: the ``num`` oldest versions, ties in arrival order (as a batch: in arrival order); what is
    left, in arrival order."""
    chosen = set(sorted(range(len(groups)), key=lambda i: (groups[i].version, i))[:num])
    return [g for i, g in enumerate(groups) if i in chosen], [g for i, g in enumerate(groups) if i not in chosen]


@settings(max_examples=150, deadline=None, database=None)
@given(st.lists(st.integers(0, 4), max_size=24), st.integers(1, 12), st.integers(0, 2), st.booleans())
def test_bounded_take_is_oldest_version_first_ties_in_arrival_order(
    versions: list[int], num: int, k: int, ordered: bool
) -> None:
    if ordered:
        versions = sorted(versions)  # the common case: a take is the fast path's popleft
    cfg = _cfg(f"max_staleness={k}")
    request = 5
    pool = Buffer(cfg, np.random.default_rng(0))
    pool.groups.extend(_kept(v, i, f"s-{i % 2}") for i, v in enumerate(versions))
    before = list(pool.groups)
    fresh = [g for g in before if not cfg.too_stale(request, g.version)]
    take = pool.take(BatchRequest(request_id=1, version=request, num_groups=num))
    assert pool.tally.counts["staleness/dropped"] == len(before) - len(fresh)
    if len(fresh) < num:
        assert take is None and list(pool.groups) == fresh
        return
    want, rest = _oldest_first(fresh, num)
    assert take is not None
    assert [g.seq for g in take] == [g.seq for g in want] and all(a is b for a, b in zip(take, want, strict=True))
    assert [g.seq for g in pool.groups] == [g.seq for g in rest]
    assert max(g.version for g in take) <= min((g.version for g in rest), default=10)
    if all(a.version <= b.version for a, b in zip(fresh, fresh[1:], strict=False)):
        assert take == fresh[:num] and list(pool.groups) == fresh[num:]  # already in deadline order: the head
    # an undeliverable batch goes back, and the next request takes the same groups
    pool.put_back(take)
    assert pool.take(BatchRequest(request_id=2, version=request, num_groups=num)) == take


def test_bounded_take_puts_a_late_old_group_first() -> None:
    """A slow server's group of version 3 arrives after newer ones: it is trained first, not dropped."""
    pool = Buffer(_cfg("max_staleness=2", "learner.groups_per_step=2"), np.random.default_rng(0))
    pool.groups.extend([_kept(4, 0), _kept(5, 1), _kept(4, 2), _kept(3, 3), _kept(5, 4)])
    assert [g.seq for g in pool.take(BatchRequest(request_id=0, version=5, num_groups=2)) or []] == [0, 3]
    assert [g.seq for g in pool.groups] == [1, 2, 4]
    assert [g.seq for g in pool.take(BatchRequest(request_id=1, version=6, num_groups=2)) or []] == [1, 2]
    assert pool.tally.totals["staleness/dropped"] == 0


def test_trained_and_discard_below_count() -> None:
    pool = Buffer(_cfg(), np.random.default_rng(0))
    pool.groups.extend(_kept(v, i, f"s-{i % 2}") for i, v in enumerate([0, 1, 2, 1, 0]))
    take = pool.take(BatchRequest(request_id=0, version=1, num_groups=3))
    assert take is not None and [g.seq for g in take] == [0, 1, 4]
    pool.trained(take)
    assert pool.tally.totals["groups/trained"] == 3
    assert pool.tally.totals["groups/trained/s-0"] == 2 and pool.tally.totals["groups/trained/s-1"] == 1
    assert pool.discard_below(2) == 1 and [g.seq for g in pool.groups] == [2]
    assert pool.tally.totals["restart/discarded_groups"] == 1


def test_exact_mode_trains_every_update_on_rows_exactly_k_versions_old() -> None:
    """run.staleness_mode='exact': update V trains version max(0, V-K) only, and V is served only once
    version V has supplied what later updates need (no version is skipped, so no deadlock)."""
    k, per = 2, 2
    cfg = _cfg(f"max_staleness={k}", "run.staleness_mode=exact", f"learner.groups_per_step={per}")
    pool = Buffer(cfg, np.random.default_rng(0))
    gid, trained = 0, []
    for v in range(8):  # the rollout servers now generate with version v, and more than is needed
        req = BatchRequest(request_id=v, version=v, num_groups=per)
        take = pool.take(req)
        while take is None:
            assert gid < 1000
            pool.admit([_group([0.0, 1.0] * 4, gid, version=v)], v)
            gid += 1
            take = pool.take(req)
        trained.append([v - g.version for g in take])
    assert trained[:k] == [[s] * per for s in range(k)], trained  # the first K updates: version-0 rows
    assert all(t == [k] * per for t in trained[k:]), trained
    assert pool.tally.counts["staleness/exact_surplus"] == 0  # take is called as soon as a group arrives
    assert pool.tally.counts["staleness/dropped"] == 0
    assert gid == exact_quota(cfg, 0) + 7 * per  # not one group more than the updates train
    assert exact_quota(cfg, 0) == (k + 1) * per and exact_quota(cfg, 5) == per
    assert pool.exact_surplus(7) and not pool.exact_surplus(8)
    got = pool.admit([_group([0.0, 1.0] * 4, gid + i, version=7) for i in range(per + 3)], 7)
    assert got == ["exact_surplus"] * (per + 3)
    assert pool.tally.counts["staleness/exact_surplus"] == per + 3  # version 7 already holds the one batch it owes


def test_exact_take_waits_for_the_version_it_trains() -> None:
    k, per = 1, 2
    cfg = _cfg(f"max_staleness={k}", "run.staleness_mode=exact", f"learner.groups_per_step={per}")
    pool = Buffer(cfg, np.random.default_rng(0))
    pool.groups.extend([_kept(2, 0), _kept(3, 1), _kept(2, 2), _kept(3, 3), _kept(1, 4)])
    # request 3 trains version 2 only (the version-1 group is stale), once version 3 holds its batch
    take = pool.take(BatchRequest(request_id=0, version=3, num_groups=per))
    assert take is not None and [g.seq for g in take] == [0, 2]
    assert [g.seq for g in pool.groups] == [1, 3] and pool.tally.counts["staleness/dropped"] == 1
    assert pool.take(BatchRequest(request_id=1, version=4, num_groups=per)) is None  # version 4 owes a batch
    pool.groups.extend([_kept(4, 5), _kept(4, 6)])
    take = pool.take(BatchRequest(request_id=1, version=4, num_groups=per))
    assert take is not None and [g.seq for g in take] == [1, 3]
