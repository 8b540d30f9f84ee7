"""A per-peer bound on weight-transfer starts: one peer flooding the publisher cannot slow it for others.

A transfer starts with a request for chunk 0, and each start costs the serving thread a chunk's send (and
a pin, ``learner/publisher.py``). An honest rollout server starts about one transfer per version it loads
(plus one after a ``gone``), far below ``STARTS_PER_S``; one allowed peer that sent 178,500 starts raised
the learner's step time from 0.080 to 0.124 s (issue 19). A start beyond a peer's budget is ignored and
counted (``weights/throttled``): the peer's own request times out and it asks again, at its own cost.

A token bucket per peer (its ZMQ routing id: one connection): ``STARTS_PER_S`` tokens a second, at most
``STARTS_PER_S`` saved up. The table is bounded (``MAX_PEERS``, least recently seen dropped first; a
dropped peer starts again with a full bucket). A peer that reconnects gets a new routing id, and so a new
bucket: with authentication on, only allowlisted keys can do even that.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

STARTS_PER_S = 32.0  # transfers one peer may start per second (a burst of this many at once)
MAX_PEERS = 4096  # peers whose budgets are tracked at once


@dataclass
class StartLimit:
    """Per-peer token buckets for transfer starts; :meth:`allow` says whether a start may proceed."""

    per_s: float = STARTS_PER_S
    max_peers: int = MAX_PEERS
    buckets: OrderedDict[bytes, tuple[float, float]] = field(default_factory=OrderedDict)  # peer -> (tokens, at)
    throttled: int = 0  # starts refused so far

    def allow(self, peer: bytes, now: float) -> bool:
        """Take one token from ``peer``'s bucket; False (and counted) when it has none."""
        tokens, at = self.buckets.pop(peer, (self.per_s, now))
        tokens = min(self.per_s, tokens + (now - at) * self.per_s)
        ok = tokens >= 1.0
        self.buckets[peer] = (tokens - 1.0 if ok else tokens, now)  # most recently seen last
        while len(self.buckets) > self.max_peers:
            self.buckets.popitem(last=False)
        if not ok:
            self.throttled += 1
        return ok
