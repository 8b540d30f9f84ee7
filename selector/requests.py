"""Which batch requests the selector serves: only the announced learner's.

A batch goes to whoever asks on the batches link. With authentication only the learner's key may
connect; without it (loopback) any local process could, and a forged request took the batch meant for
the learner. So a request carries the learner's ``session`` (random per learner process, announced in
every ``WeightsAnnouncement``), and the selector serves only the session it last heard announced.

A request of another session is held, not refused at once: it may come from a restarted learner whose
first announcement is still on its way (the announce link is another socket), and that learner is
served as soon as the announcement is heard. Held requests are bounded (``MAX_HELD`` sessions, the
newest request of each, for ``WAIT_S`` from the session's first, so a stream of requests cannot keep
one waiting); a session's held requests dropped while a learner is known are hostile and counted once
(``rejected/batch_not_learner``). Before any announcement nothing is counted: the selector does not
know the learner yet, and the learner re-sends every second (``learner/train.py`` BatchSource.RESEND_S).

A connection other than the learner's may send ``STRANGER_PER_S`` requests a second (a burst of twice
that); beyond, its requests are dropped before they are decoded and counted the same way, so a flood
costs the selector a ``recv`` per request (``Selector.on_request``, ``protocol/budget.py``). And at most
``REQUEST_READS_PER_S`` requests are read a second from all connections together
(``protocol.budget.LinkReads``): beyond, the link is not read for a pause and a flood waits in its own
queue, while ZeroMQ's fair queueing still reads the learner's request at its turn
(``Selector.read_requests``).
Without authentication this keeps out a process that does not know the session, not one that
subscribes to the announcements (docs/RELIABILITY.md, "Batch requests").
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from protocol.messages import BatchRequest

WAIT_S = 1.0  # a request of an unannounced session waits this long for its announcement
MAX_HELD = 4  # sessions whose requests wait at once; the oldest is dropped first
REQUEST_READS_PER_S = 1024.0  # batch requests read a second, all connections together (the learner sends one a step)
STRANGER_PER_S = 4.0  # requests a second from a connection not (yet) the learner's (it re-sends once a second)

Request = tuple[list[bytes], BatchRequest]  # (route, request)


@dataclass
class LearnerRequests:
    """The announced learner's session, and the requests of other sessions waiting to be told apart."""

    session: int | None = None  # the announced learner's; None before the first announcement
    wait_s: float = WAIT_S
    max_held: int = MAX_HELD
    held: OrderedDict[int, tuple[float, Request]] = field(default_factory=OrderedDict)  # session -> (deadline, req)
    rejected: int = 0  # requests dropped while a learner was known: not the learner's

    def heard(self, session: int) -> Request | None:
        """The learner announced ``session``: its request held meanwhile, if any, is now to be served."""
        self.session = session
        got = self.held.pop(session, None)
        return None if got is None else got[1]

    def arrive(self, route: list[bytes], req: BatchRequest, now: float) -> Request | None:
        """``(route, req)`` when it is the announced learner's, to serve; else None, and it is held."""
        if req.session == self.session:
            return route, req
        old = self.held.pop(req.session, None)  # a newer request replaces the one held; its wait runs on
        self.held[req.session] = (now + self.wait_s if old is None else old[0], (route, req))
        while len(self.held) > self.max_held:
            self.held.popitem(last=False)
            self.dropped()
        return None

    def expire(self, now: float) -> None:
        """Drop the held requests whose wait ran out."""
        for s in [s for s, (deadline, _) in self.held.items() if deadline <= now]:
            del self.held[s]
            self.dropped()

    def dropped(self) -> None:
        """One request dropped: hostile, once a learner is known."""
        if self.session is not None:
            self.rejected += 1
