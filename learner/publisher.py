"""Rank 0's weight publisher: announces each version (PUB) and serves it on request (ROUTER).

It runs one background thread that alone owns both sockets, so serving a slow remote rollout server
never stalls training, and a fast local one never waits for the slow one (each reply is one
zero-copy message in its peer's own pipe). The training thread hands over a packed version with
:meth:`publish`; only the newest version is kept, and requests that arrive before version 0 exists
are answered as soon as it does. A request ``with_files`` also gets the tokenizer's files (read once at
start-up), so a rollout server needs no files of its own.
"""

from __future__ import annotations

import logging
import threading

import zmq

from protocol.config import NetConfig
from protocol.messages import ProtocolError, Weights, WeightsAnnouncement, WeightsRequest
from protocol.sockets import announce_publisher, close, recv, send, weight_server
from protocol.weights import with_files

log = logging.getLogger("podsrl.learner")


class WeightPublisher:
    def __init__(self, ctx: zmq.Context, net: NetConfig, files: dict[str, bytes] | None = None) -> None:
        self._ctx = ctx
        self._files = files or {}
        self._latest: Weights | None = None
        self._lock = threading.Lock()
        self._wake_addr = f"inproc://publisher-{id(self)}"
        self._wake = ctx.socket(zmq.PAIR)
        self._wake.bind(self._wake_addr)
        # Bind here, in the caller, so a port clash is an error at start-up, not in the thread.
        self._pub, self._router = announce_publisher(ctx, net), weight_server(ctx, net)
        self.served = 0
        self.rejected = 0
        self._thread = threading.Thread(target=self._serve, name="weight-publisher", daemon=True)
        self._thread.start()

    def publish(self, weights: Weights, final: bool = False) -> None:
        with self._lock:
            self._latest = weights
        self._wake.send(b"final" if final else b"new")

    def close(self) -> None:
        self._wake.send(b"stop")
        self._thread.join(timeout=10)
        close(self._wake)

    def _serve(self) -> None:
        wake = self._ctx.socket(zmq.PAIR)
        wake.connect(self._wake_addr)
        waiting: list[tuple[list[bytes], bool]] = []  # (route, with_files) of requests not yet answered
        poller = zmq.Poller()
        poller.register(wake, zmq.POLLIN)
        poller.register(self._router, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if self._router in events:
                    try:
                        route, req = recv(self._router, WeightsRequest, routed=True)
                        waiting.append((route, req.with_files))
                    except ProtocolError as e:
                        self.rejected += 1
                        log.warning("rejected a weights request: %s", e)
                if wake in events:
                    cmd = wake.recv()
                    if cmd == b"stop":
                        return
                    w = self._latest
                    assert w is not None
                    send(self._pub, WeightsAnnouncement(version=w.version, nbytes=int(w.data.nbytes), crc32=w.crc32,
                                                        final=cmd == b"final"))
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
