"""Per-peer token buckets (protocol/budget.py: weight-transfer starts, scored groups), without sockets."""

from __future__ import annotations

from protocol.budget import Budgets


def test_a_peer_gets_a_burst_then_the_rate_and_others_are_unaffected() -> None:
    limit = Budgets(per_s=4.0)
    assert [limit.allow(b"flood", 0.0) for _ in range(6)] == [True] * 4 + [False] * 2
    assert limit.allow(b"honest", 0.0)  # its own bucket
    assert not limit.allow(b"flood", 0.1)  # 0.4 of a token saved up
    assert limit.allow(b"flood", 0.3)  # 1.2 tokens by now
    assert not limit.allow(b"flood", 0.3)
    assert limit.allow(b"flood", 100.0) and limit.buckets[b"flood"][0] == 3.0  # saved up to a burst, no more
    assert limit.refused == 4


def test_the_table_of_peers_is_bounded_least_recently_seen_first() -> None:
    limit = Budgets(per_s=1.0, max_peers=3)
    for peer in (b"a", b"b", b"c", b"a", b"d"):
        limit.allow(peer, 0.0)
    assert list(limit.buckets) == [b"c", b"a", b"d"]
    assert limit.refused == 1  # a's second start within the second


def test_a_burst_larger_than_the_rate_is_saved_up_and_refills_at_the_rate() -> None:
    limit = Budgets(per_s=2.0, burst=5.0)
    assert [limit.allow("flood", 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert [limit.allow("flood", 1.0) for _ in range(3)] == [True, True, False]  # 2 a second after the burst
    assert limit.allow("flood", 10.0) and limit.buckets["flood"][0] == 4.0  # full again, at most the burst


def test_spent_says_whether_allow_would_refuse_without_taking_anything() -> None:
    limit = Budgets(per_s=2.0)
    assert not limit.spent("p", 0.0)  # unknown: a full bucket
    assert limit.allow("p", 0.0) and limit.allow("p", 0.0) and not limit.spent("q", 0.0)
    assert limit.spent("p", 0.0) and limit.spent("p", 0.4)  # 0.8 of a token by then
    assert not limit.spent("p", 0.5) and limit.refused == 0  # one token: allow would say yes
    assert limit.allow("p", 0.5) and limit.spent("p", 0.5)
