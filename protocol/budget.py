"""Per-peer token buckets: one peer flooding a link cannot take more than its budget from the others.

Used where a message costs the receiver work that the sender does not pay for: weight-transfer starts at
the learner's publisher (``learner/publisher.py``, a peer is a ZMQ routing id) and scored groups at the
selector (``selector/server.py``, a peer is a server id, bound to its key when authentication is on).
A message beyond its peer's budget is dropped and counted by the caller, never queued. A peer whose
budget is spent (:meth:`Budgets.spent`) may have its next messages dropped before they are decoded
(``protocol.sockets.decode_received``): a flood then costs the receiver a ``recv`` each (3-6 us on
loopback) instead of a decode and a check as well (7-13 us; measured in the issue 19 work).

Each peer's bucket holds at most ``burst`` tokens and refills at ``per_s`` a second; a message takes one.
The table is bounded (``max_peers``, least recently seen dropped first; a dropped peer comes back with a
full bucket), so a stream of new identities costs memory once per ``max_peers``.

:class:`LinkReads` bounds what one socket reads a second from all its peers together (the learner's
weights link, the selector's batches link): when that budget is spent the socket leaves its poller for
``pause_s``, and a flood waits in its own ZeroMQ queue instead of in the receiver's CPU (ZeroMQ
fair-queues the peers, so an honest one is read at its turn).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

import zmq

MAX_PEERS = 4096  # peers whose budgets are tracked at once
PAUSE_S = 0.01  # how long a socket whose read budget ran out is not polled


@dataclass
class Budgets:
    """Token buckets per peer; :meth:`allow` says whether one more message of ``peer`` may proceed."""

    per_s: float
    burst: float = 0.0  # tokens saved up at most (0: per_s, one second's worth)
    max_peers: int = MAX_PEERS
    buckets: OrderedDict[Hashable, tuple[float, float]] = field(default_factory=OrderedDict)  # -> (tokens, at)
    refused: int = 0  # messages refused so far

    def __post_init__(self) -> None:
        self.burst = self.burst or self.per_s

    def allow(self, peer: Hashable, now: float) -> bool:
        """Take one token from ``peer``'s bucket; False (and counted) when it has none."""
        tokens, at = self.buckets.pop(peer, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.per_s)
        ok = tokens >= 1.0
        self.buckets[peer] = (tokens - 1.0 if ok else tokens, now)  # most recently seen last
        while len(self.buckets) > self.max_peers:
            self.buckets.popitem(last=False)
        if not ok:
            self.refused += 1
        return ok

    def spent(self, peer: Hashable, now: float) -> bool:
        """Whether :meth:`allow` would refuse ``peer`` now (nothing taken; an unknown peer has its burst)."""
        got = self.buckets.get(peer)
        return got is not None and got[0] + (now - got[1]) * self.per_s < 1.0


@dataclass
class LinkReads:
    """Reads of ``sock`` a second, all peers together: :meth:`take` one before each read; when it says no,
    ``sock`` is off ``poller`` until ``paused_until``, and :meth:`resume` (each loop turn) puts it back."""

    sock: zmq.Socket
    per_s: float
    pause_s: float = PAUSE_S
    paused_until: float = 0.0  # 0: listened to
    bucket: Budgets = field(init=False)

    def __post_init__(self) -> None:
        self.bucket = Budgets(per_s=self.per_s)

    @property
    def pauses(self) -> int:
        """Times the budget ran out so far."""
        return self.bucket.refused

    def take(self, poller: zmq.Poller, now: float) -> bool:
        """One read, if the budget holds it; else ``sock`` leaves ``poller`` for ``pause_s`` and False."""
        if self.bucket.allow(None, now):
            return True
        poller.modify(self.sock, 0)
        self.paused_until = now + self.pause_s
        return False

    def resume(self, poller: zmq.Poller, now: float) -> None:
        """Listen to ``sock`` again once its pause is over."""
        if self.paused_until and now >= self.paused_until:
            poller.modify(self.sock, zmq.POLLIN)
            self.paused_until = 0.0
