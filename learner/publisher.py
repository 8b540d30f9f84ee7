"""Rank 0's weight publisher: announces each version (PUB) and serves it on request (ROUTER).

It runs one background thread that alone owns both sockets, so serving a slow remote rollout server
never stalls training, and a fast local one never waits for the slow one (each reply is one
zero-copy message in its peer's own pipe). The training thread hands over a packed version with
:meth:`publish`; only the newest version is kept, and requests that arrive before version 0 exists
are answered as soon as it does. A request ``with_files`` also gets the tokenizer's files (read once at
start-up), so a rollout server needs no files of its own.

Every announcement carries the learner's ``session`` (random per process: a rollout server waiting
on a request the previous learner took to its grave asks again as soon as a new session speaks), the
version ``floor`` (see ``learner/checkpoint.py``) and the vocabulary size the selector bounds token ids
with. The latest announcement is repeated every ``ANNOUNCE_EVERY_S``, so a process that (re)connects late
learns the version within a second instead of waiting for the next step.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from protocol.auth import load_auth
from protocol.config import NetConfig
from protocol.messages import (
    ANNOUNCE_EVERY_S,
    ProtocolError,
    Weights,
    WeightsAnnouncement,
    WeightsRequest,
    new_session,
)
from protocol.metrics import RateLimitedLog
from protocol.sockets import announce_publisher, close, recv, send, weight_server
from protocol.weights import with_files

log = logging.getLogger("podsrl.learner")



class WeightPublisher:
    def __init__(self, ctx: zmq.Context, net: NetConfig, files: dict[str, bytes] | None = None,
                 vocab_size: int = 0) -> None:
        auth = load_auth(net, "learner")  # first: a missing key must fail before any socket exists
        self._ctx = ctx
        self._files = files or {}
        self._latest: Weights | None = None
        self._floor = 0
        self._final = False
        self.vocab_size = vocab_size
        self.session = new_session()
        self._warn = RateLimitedLog(log)
        self._lock = threading.Lock()
        self._wake_addr = f"inproc://publisher-{id(self)}"
        self._wake = ctx.socket(zmq.PAIR)
        self._wake.bind(self._wake_addr)
        # Bind here, in the caller, so a port clash is an error at start-up, not in the thread.
        self._pub, self._router = announce_publisher(ctx, net, auth), weight_server(ctx, net, auth)
        self.served = 0
        self.rejected = 0
        self._thread = threading.Thread(target=self._serve, name="weight-publisher", daemon=True)
        self._thread.start()

    def publish(self, weights: Weights, floor: int = 0, final: bool = False) -> None:
        """Make ``weights`` the version served and announce it (``floor``: see the module doc)."""
        with self._lock:
            self._latest, self._floor, self._final = weights, floor, final
        self._wake.send(b"new")

    def close(self) -> None:
        self._wake.send(b"stop")
        self._thread.join(timeout=10)
        close(self._wake)

    def _announce(self) -> None:
        with self._lock:
            w, floor, final = self._latest, self._floor, self._final
        if w is not None:
            send(self._pub, WeightsAnnouncement(version=w.version, nbytes=int(w.data.nbytes), crc32=w.crc32,
                                                final=final, floor=floor, vocab_size=self.vocab_size,
                                                session=self.session))

    def _serve(self) -> None:
        wake = self._ctx.socket(zmq.PAIR)
        wake.connect(self._wake_addr)
        waiting: list[tuple[list[bytes], bool]] = []  # (route, with_files) of requests not yet answered
        poller = zmq.Poller()
        poller.register(wake, zmq.POLLIN)
        poller.register(self._router, zmq.POLLIN)
        announced = time.monotonic()
        try:
            while True:
                events = dict(poller.poll(int(ANNOUNCE_EVERY_S * 1000)))
                if self._router in events:
                    try:
                        route, req = recv(self._router, WeightsRequest, routed=True)
                        waiting.append((route, req.with_files))
                    except ProtocolError as e:
                        self.rejected += 1
                        self._warn(e.reason, "rejected a weights request: %s", e)
                if wake in events and wake.recv() == b"stop":
                    return
                if wake in events or time.monotonic() - announced >= ANNOUNCE_EVERY_S:
                    self._announce()
                    announced = time.monotonic()
                with self._lock:
                    latest = self._latest
                if latest is not None:
                    for route, files in waiting:
                        send(self._router, with_files(latest, self._files) if files else latest, *route)
                        self.served += 1
                    waiting.clear()
        finally:
            self._pub.close(linger=2000)  # let the final announcement leave
            close(self._router, wake)
