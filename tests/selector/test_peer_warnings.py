"""Warnings about many peers at once: one line per sweep, at most one per 10 s, the counters exact (issue 19)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from types import SimpleNamespace
from typing import cast

from protocol.metrics import RateLimitedLog
from selector.server import Peer, Selector, log


def fake_selector(peers: dict[str, Peer]) -> SimpleNamespace:
    """What ``Selector.check_peers`` touches, without sockets."""
    counts: Counter[str] = Counter()
    forgotten: list[str] = []
    return SimpleNamespace(
        cfg=SimpleNamespace(selector=SimpleNamespace(peer_timeout_s=5.0)),
        peers=peers,
        counts=counts,
        count=lambda key, n=1: counts.update({key: n}),
        pacer=SimpleNamespace(forget=forgotten.append),
        forgotten=forgotten,
        warn=RateLimitedLog(log),
        forget_dead=lambda now, grace_s: None,
    )


def test_a_burst_of_dead_peers_logs_one_line_and_counts_each(caplog):
    now = time.monotonic()
    peers = {f"s{i}": Peer(last_seen=now - 60) for i in range(256)} | {"alive": Peer(last_seen=now)}
    fake = fake_selector(peers)
    with caplog.at_level(logging.INFO, logger="podsrl.selector"):
        Selector.check_peers(cast(Selector, fake))
        Selector.check_peers(cast(Selector, fake))  # nobody new: nothing more
        peers["alive"].last_seen = now - 60
        Selector.check_peers(cast(Selector, fake))  # one more within 10 s: held, counted
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "rollout servers s0, s1, s2, s3, s4, s5, s6, s7 and 248 more silent for over 5s: marked dead (groups so "
        "far are kept, work grants withdrawn)"
    ]
    assert fake.counts["peers/dead"] == 257 and fake.counts["peers/dead/s255"] == 1 and len(fake.forgotten) == 257
    assert all(p.dead for p in peers.values()) and fake.warn.held == {"peer_dead": 1}
