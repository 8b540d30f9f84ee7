"""The per-peer bound on weight-transfer starts (learner/throttle.py), without sockets."""

from __future__ import annotations

from learner.throttle import StartLimit


def test_a_peer_gets_a_burst_then_the_rate_and_others_are_unaffected() -> None:
    limit = StartLimit(per_s=4.0)
    assert [limit.allow(b"flood", 0.0) for _ in range(6)] == [True] * 4 + [False] * 2
    assert limit.allow(b"honest", 0.0)  # its own bucket
    assert not limit.allow(b"flood", 0.1)  # 0.4 of a token saved up
    assert limit.allow(b"flood", 0.3)  # 1.2 tokens by now
    assert not limit.allow(b"flood", 0.3)
    assert limit.allow(b"flood", 100.0) and limit.buckets[b"flood"][0] == 3.0  # saved up to a burst, no more
    assert limit.throttled == 4


def test_the_table_of_peers_is_bounded_least_recently_seen_first() -> None:
    limit = StartLimit(per_s=1.0, max_peers=3)
    for peer in (b"a", b"b", b"c", b"a", b"d"):
        limit.allow(peer, 0.0)
    assert list(limit.buckets) == [b"c", b"a", b"d"]
    assert limit.throttled == 1  # a's second start within the second
