"""Rank 0's weight publisher: announces each version (PUB) and serves it in chunks on request (ROUTER).

The weight-transfer protocol (docs/ARCHITECTURE.md, "Weights"):

- The training thread packs each version (``pack_weights``: one copy, a digest per tensor) into a
  buffer from :meth:`WeightPublisher.alloc` (a shared-memory segment when offered) and hands it over
  with :meth:`publish`. The publisher keeps the newest ``weights.keep_versions``. Besides the network,
  the weights transports (``learner/transports/``: shared memory, CUDA IPC) offer each version their
  way; what they offer travels in its announcement.
- A rollout server asks for chunk 0 of the latest version and says which version it ``have``\\s. If
  that version is still kept (and not below the floor), the payload is the delta: zstd of the two raw
  buffers' word-wise difference (``protocol/weights.py``), computed once per (base, target) pair and
  cached; otherwise the full buffer.
  Chunk 0 tells the payload's kind, size and chunk count and carries the manifest with the target's
  digests; the server then pulls the other chunks, at most ``weights.window`` in flight. A version or
  base evicted in the meantime is answered ``gone`` and the server starts again from the latest.
  Deltas are encoded on an encoder thread (the one from the previous version as soon as a version
  is published), so serving and the announcements never wait for compression. A delta larger than
  ``weights.delta_max_ratio`` of the version (fp32 weights at a high learning rate barely compress)
  is not worth its encoding: full versions are sent until a probe every 16 versions says otherwise.
- Flow control is the server's pull: the learner holds at most ``window`` chunks for any peer, so a
  slow link delays only its own server; a reply is zero-copy (a view of the kept buffer or delta).
  Each peer may start at most ``STARTS_PER_S`` transfers (chunk 0 requests) a second;
  a start beyond that is ignored and counted (``weights/throttled``), and so is every request of that
  peer, undecoded, until its budget refills, so a flooding peer cannot slow the serving thread for the
  others.
- A transfer in progress pins what it started with: its version (or delta) stays alive after it is
  no longer kept, until its last chunk is served or it is silent for ``weights.pin_s``, so a server
  slower than ``keep_versions`` steps still completes a version and catches up instead of being
  told ``gone`` forever. At most ``weights.max_pinned`` versions no longer kept are held this way
  (the memory of one version each); beyond that the oldest pin is dropped and its server told ``gone``.

One background thread alone owns both sockets, so serving never stalls training. Requests that
arrive before version 0 exists are answered as soon as it does. Every announcement carries the
learner's ``session`` (random per process: a rollout server waiting on a request the previous learner
took to its grave asks again as soon as a new session speaks), the version ``floor``
(``learner/checkpoint.py``), the vocabulary size the selector bounds token ids with, and the
fields the transports offered for the version (its segment name and this machine's id when it is in
shared memory, its CUDA IPC handle when a learner on CUDA shares a device copy). The latest announcement
is sent again at once (within ``JOIN_GAP_S``) to a process that subscribes (the announce socket is an
XPUB: a subscription is a message the learner reads), and repeated every ``ANNOUNCE_EVERY_S`` for one
whose subscription was lost. Each announcement also carries the version's manifest digest (of the
per-tensor digests computed while packing), the reference a rollout server checks what it reads against.

A segment is the learner's packed buffer, and any process of the run's user can write into it. A
rollout server that finds a segment unlike its announced manifest says so in its next request
(``WeightsRequest.corrupt``). The learner then (``weights/shm_corrupt``) stops offering shared
memory and packs later versions into ordinary memory, checks every version it keeps in a segment
against its own digests, serves none whose bytes differ (nor deltas from or to one), and asks the
training thread to pack the latest again from the model's state (:meth:`WeightPublisher.repack_due`;
requests for it wait until then). The network never serves the corrupted bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import zmq

from learner.transports import Offer, Place, build_transports
from protocol.auth import load_auth
from protocol.budget import Budgets, LinkReads
from protocol.config import NetConfig, WeightsConfig
from protocol.messages import (
    ANNOUNCE_EVERY_S,
    ProtocolError,
    Weights,
    WeightsAnnouncement,
    WeightsChunk,
    WeightsRequest,
    new_session,
)
from protocol.metrics import RateLimitedLog
from protocol.sockets import announce_publisher, close, decode_received, send, weight_server
from protocol.weights import encode_delta, manifest_digest, same_layout, verify

if TYPE_CHECKING:
    import torch

log = logging.getLogger("podsrl.learner")
_WAIT: Future = Future()  # never done: a request answered with it waits (for a re-packed version)
JOIN_GAP_S = 0.05  # a new subscriber is announced to within this (announcements at most this often for joins)
# An honest rollout server starts about one transfer per version it loads (plus one after a 'gone'); one
# allowed peer sending 178,500 starts raised the step time from 0.080 to 0.124 s (issue 19).
STARTS_PER_S = 32.0  # transfers one peer may start per second (a burst of this many at once)
# Requests read per second, all peers together: this thread shares the GIL with training, and a flood of
# 35,000 requests a second cost the learner 0.4 of a core even with each dropped undecoded (issue 19,
# bench/flood.py). 4,096 chunk requests a second are 16 GiB/s of 4 MiB chunks; beyond, requests wait in
# their peers' queues (fair-queued by ZeroMQ, so a flooding peer delays an honest one by its turn only).
READS_PER_S = 4096.0
MAX_PINS = 4096  # transfers tracked at once (a hostile peer opening transfers cannot grow this further)


@dataclasses.dataclass
class Pin:
    """What a transfer in progress started with, served to it even after the version is evicted."""

    version: int
    base: int
    raw_bytes: int
    payload: np.ndarray
    left: set[int]  # chunk numbers not served yet
    seen: float  # monotonic time of its last request


class WeightPublisher:
    def __init__(
        self,
        ctx: zmq.Context,
        net: NetConfig,
        files: dict[str, bytes] | None = None,
        vocab_size: int = 0,
        weights: WeightsConfig | None = None,
        run_dir: str = "",
        device: torch.device | None = None,
        base: Weights | None = None,
    ) -> None:
        """``run_dir`` and ``device`` (rank 0's) tell the transports whether they can offer anything;
        ``base``: a LoRA run's base model (in ``model.dtype``), served to a ``WeightsRequest(base_model=True)``."""
        auth = load_auth(net, "learner")  # first: a missing key must fail before any socket exists
        self.cfg = weights or WeightsConfig()
        self._ctx = ctx
        self._files = files or {}
        self._base = base
        self._files_blob = np.frombuffer(b"".join(self._files.values()), np.uint8)
        self._file_list = [[k, len(v)] for k, v in self._files.items()]
        self._kept: OrderedDict[int, Weights] = OrderedDict()  # version -> packed buffer, oldest first
        self._deltas: OrderedDict[tuple[int, int], Future] = OrderedDict()  # (base, target) -> payload
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="weight-delta")
        self._deltas_pay = True  # the last delta encoded was small enough (weights.delta_max_ratio)
        self._offers: dict[int, Offer] = {}  # version -> the announcement fields its transports filled
        self._latest: Weights | None = None
        self._private = False  # a segment was found corrupt: pack into ordinary memory, offer no segment
        self._bad: set[int] = set()  # kept versions whose bytes differ from their digests: never served
        self.shm_corrupt = 0  # corruption reports that the learner's own check confirmed
        self._floor = 0
        self._final = False
        self.vocab_size = vocab_size
        self.session = new_session()
        self._chunk = max(1, int(self.cfg.chunk_mib * (1 << 20)))
        self._warn = RateLimitedLog(log)
        self._lock = threading.Lock()
        self.transports = build_transports(Place(self.cfg, run_dir, self.session, device))
        self._wake_addr = f"inproc://publisher-{id(self)}"
        self._wake = ctx.socket(zmq.PAIR)
        self._wake.bind(self._wake_addr)
        # Bind here, in the caller, so a port clash is an error at start-up, not in the thread.
        self._pub, self._router = announce_publisher(ctx, net, auth), weight_server(ctx, net, auth)
        self.served = 0  # chunk replies sent
        self.bytes_served = 0
        self.deltas_served = self.full_served = 0  # transfers (chunk 0 replies) of each kind
        self.rejected = 0
        self._pins: OrderedDict[tuple[bytes, int], Pin] = OrderedDict()  # (peer, fetch id) -> pin, oldest first
        self.pinned_served = 0  # chunk replies that only a pin made possible (the version was evicted)
        self.pins_dropped = 0  # transfers told 'gone' because weights.max_pinned was reached
        self.pins_expired = 0  # transfers silent for weights.pin_s
        self.starts = Budgets(per_s=STARTS_PER_S)  # per-peer bound on transfer starts (weights/throttled)
        self.reads = LinkReads(self._router, READS_PER_S)  # all peers' requests a second (this thread's GIL share)
        self._thread = threading.Thread(target=self._serve_or_stop, name="weight-publisher", daemon=True)
        self._thread.start()

    # -- the training thread's side ------------------------------------------------------------
    def alloc(self, nbytes: int) -> np.ndarray:
        """The buffer to pack the next version into: the first transport's that wants it (a shared-memory
        segment), else ordinary memory."""
        for transport in self.transports if not self._private else ():
            buf = transport.alloc(nbytes)
            if buf is not None:
                return buf
        return np.empty(nbytes, np.uint8)

    def publish(self, weights: Weights, floor: int = 0, final: bool = False) -> None:
        """Make ``weights`` the version served and announce it, with what every transport offers
        (``floor``: see the module doc). ``weights.data`` must come from :meth:`alloc`."""
        offer: Offer = {}
        for transport in self.transports:
            offer.update(transport.offer(weights, offer))
        if self._private and offer:  # packed into a segment just before a corruption report: not offered,
            offer = {}  # and served from a private copy
            weights = dataclasses.replace(weights, data=weights.data.copy())
        with self._lock:
            previous = self._latest
            self._latest, self._floor, self._final = weights, floor, final
            self._kept[weights.version] = weights
            self._bad.discard(weights.version)  # (re-packed)
            if offer:
                self._offers[weights.version] = offer
            while len(self._kept) > self.cfg.keep_versions:
                old, _ = self._kept.popitem(last=False)
                self._offers.pop(old, None)
                self._bad.discard(old)
                for transport in self.transports:
                    transport.drop(old)
                for pair in [p for p in self._deltas if old in p]:
                    self._deltas.pop(pair).cancel()  # a queued encoding of an evicted pair never runs
        probe = weights.version % 16 == 0  # deltas that did not pay may pay now (a lower lr, bf16)
        with self._lock:
            busy = any(not f.done() for f in self._deltas.values())  # never queue eagerly behind a backlog
        if (
            self.cfg.delta
            and (self._deltas_pay or probe)
            and not busy
            and previous is not None
            and previous.version < weights.version
            and same_layout(previous.tensors, weights.tensors)
        ):
            self._delta(previous, weights)  # the one most servers will ask for: start encoding it now
        self._wake.send(b"new")

    def repack_due(self, version: int) -> bool:
        """(training thread) Whether ``version``, the model's current one, must be packed and published
        again: its bytes in a segment were found corrupt."""
        with self._lock:
            return version in self._bad

    def metrics(self) -> dict[str, float]:
        """Cumulative serving counters (``weights/*`` in the learner's metrics)."""
        return {
            "weights/bytes_served_mib": self.bytes_served / 2**20,
            "weights/deltas_served": self.deltas_served,
            "weights/full_served": self.full_served,
            "weights/chunks_served": self.served,
            "weights/requests_rejected": self.rejected,
            "weights/shm_corrupt": self.shm_corrupt,
            **{k: v for t in self.transports for k, v in t.metrics().items()},
            **({"weights/shm": 0.0} if self._private else {}),  # (no segment offered since a corruption)
            "weights/pinned_served": self.pinned_served,
            "weights/pins_dropped": self.pins_dropped,
            "weights/pins_expired": self.pins_expired,
            "weights/throttled": self.starts.refused,
            "weights/read_pauses": self.reads.pauses,
        }

    def close(self) -> None:
        self._wake.send(b"stop")
        self._thread.join(timeout=10)
        self._encoder.shutdown(wait=True, cancel_futures=True)
        close(self._wake)
        for transport in self.transports:
            transport.close()

    # -- the serving thread --------------------------------------------------------------------
    def _announce(self) -> None:
        with self._lock:
            w, floor, final = self._latest, self._floor, self._final
            offer = self._offers.get(w.version, {}) if w is not None else {}
        if w is not None:
            send(
                self._pub,
                WeightsAnnouncement(
                    version=w.version,
                    nbytes=int(w.data.nbytes),
                    final=final,
                    floor=floor,
                    vocab_size=self.vocab_size,
                    session=self.session,
                    manifest=manifest_digest(w.tensors),
                    **offer,
                ),
            )

    def _payload(self, req: WeightsRequest) -> tuple[Weights, int, np.ndarray] | Future | None:
        """(target, base, payload) for a request; the encoding in progress when its delta is not ready
        yet; None when what it names is no longer kept."""
        with self._lock:
            target = self._latest if req.version == -1 else self._kept.get(req.version)
            base = self._kept.get(req.have) if req.have >= self._floor and req.have not in self._bad else None
            if target is not None and target.version in self._bad:  # the latest is re-packed soon; others never
                return _WAIT if target is self._latest else None
        if target is None:
            return None
        use_delta = (
            self.cfg.delta
            and base is not None
            and base.version < target.version
            and same_layout(base.tensors, target.tensors)
        )
        if use_delta and base is not None and req.chunk == 0 and not self._deltas_pay:
            with self._lock:  # deltas do not pay lately: serve the full version unless this one is encoded
                cached = self._deltas.get((base.version, target.version))
            use_delta = cached is not None and cached.done() and self._pays(cached.result(), target)
        if req.chunk > 0 and req.have >= 0 and not use_delta:
            return None  # the delta this transfer started with can no longer be made
        if not use_delta or base is None:
            return target, -1, target.data
        done = self._delta(base, target)
        return (target, base.version, done.result()) if done.done() else done

    def _corrupt_reported(self, version: int) -> None:
        """A rollout server found ``version``'s segment unlike its announced manifest (see the module doc).
        Only a version offered in a segment counts, so a report costs at most one check of each kept segment."""
        with self._lock:
            if "shm" not in self._offers.get(version, {}):
                return
            self._private = True
            in_segments = [w for v, w in self._kept.items() if "shm" in self._offers.get(v, {})]
            self._offers.clear()
        self.shm_corrupt += 1
        bad = {w.version for w in in_segments if not _intact(w)}
        log.warning(
            "a rollout server found the shared-memory segment of v%d corrupt; %s: no more shared memory, "
            "serving from the learner's own memory",
            version,
            f"versions {sorted(bad)} differ from their digests" if bad else "the learner's bytes are intact",
        )
        with self._lock:
            self._bad |= bad
            for pair in [p for p in self._deltas if bad & set(p)]:
                self._deltas.pop(pair).cancel()
        for key in [k for k, p in self._pins.items() if p.version in bad or p.base in bad]:
            del self._pins[key]
        self._announce()  # without the segment

    def _pays(self, blob: np.ndarray, target: Weights) -> bool:
        return blob.shape[0] <= self.cfg.delta_max_ratio * max(1, target.data.shape[0])

    def _delta(self, base: Weights, target: Weights) -> Future:
        """The delta base -> target: cached, or being encoded on the encoder thread (zstd releases the GIL,
        so serving and announcing go on meanwhile, however large the model)."""
        key = (base.version, target.version)
        with self._lock:
            done = self._deltas.get(key)
            if done is None:
                done = self._encoder.submit(self._encode, base, target)
                self._deltas[key] = done
                while len(self._deltas) > 2 * self.cfg.keep_versions:
                    self._deltas.popitem(last=False)
        return done

    def _encode(self, base: Weights, target: Weights) -> np.ndarray:
        """(encoder thread) The delta; also learns whether deltas pay for their encoding at all."""
        blob = np.frombuffer(encode_delta(base, target, self.cfg.zstd_level), np.uint8)
        pays = self._pays(blob, target)
        if pays != self._deltas_pay:
            log.info(
                "deltas are %s of the version: %s",
                f"{blob.shape[0] / max(1, target.data.shape[0]):.0%}",
                "sending deltas" if pays else "sending full versions (weights.delta_max_ratio)",
            )
        self._deltas_pay = pays
        return blob

    def _reply(self, route: list[bytes], req: WeightsRequest) -> bool:
        """Answer one request; False when its delta is still being encoded (ask again later)."""
        if req.base_model:  # LoRA: the base, kept for the whole run; served like a full version 0
            if self._base is None:
                send(self._router, WeightsChunk(fetch=req.fetch, version=0, status="gone"), *route)
                return True
            held = self._base
            return self._send_part(
                route, req, 0, -1, int(held.data.shape[0]), held.data, target=held if not req.chunk else None
            )
        key = (bytes(route[0]), req.fetch)
        pin = self._pins.get(key) if req.chunk > 0 else None
        if pin is not None and (pin.version, pin.base) == (req.version, req.have):
            return self._send_part(route, req, pin.version, pin.base, pin.raw_bytes, pin.payload, pin=pin)
        found = self._payload(req)
        if isinstance(found, Future):
            return False
        if found is None:
            send(self._router, WeightsChunk(fetch=req.fetch, version=max(req.version, 0), status="gone"), *route)
            return True
        target, base, payload = found
        first = req.chunk == 0
        chunks = max(1, -(-int(payload.shape[0]) // self._chunk))
        if first and chunks > 1 and self.cfg.pin_s > 0:
            self._pins[key] = Pin(
                target.version, base, int(target.data.shape[0]), payload, set(range(1, chunks)), time.monotonic()
            )
            while len(self._pins) > MAX_PINS:
                self._pins.popitem(last=False)
        return self._send_part(
            route, req, target.version, base, int(target.data.shape[0]), payload, target=target if first else None
        )

    def _send_part(
        self,
        route: list[bytes],
        req: WeightsRequest,
        version: int,
        base: int,
        raw_bytes: int,
        payload: np.ndarray,
        target: Weights | None = None,
        pin: Pin | None = None,
    ) -> bool:
        """Send chunk ``req.chunk`` of ``payload`` (chunk 0 carries ``target``'s manifest and config)."""
        size = int(payload.shape[0])
        chunks = max(1, -(-size // self._chunk))
        if req.chunk >= chunks:
            self.rejected += 1
            self._warn("chunk", "a weights request asked for chunk %d of %d", req.chunk, chunks)
            send(self._router, WeightsChunk(fetch=req.fetch, version=version, status="gone"), *route)
            return True
        files = target is not None and req.with_files
        part = payload[req.chunk * self._chunk : (req.chunk + 1) * self._chunk]
        self.served += 1
        self.bytes_served += int(part.shape[0])
        if target is not None:
            if base < 0:
                self.full_served += 1
            else:
                self.deltas_served += 1
        if pin is not None:
            pin.left.discard(req.chunk)
            pin.seen = time.monotonic()
            with self._lock:
                evicted = version not in self._kept
            self.pinned_served += evicted
            if not pin.left:
                self._pins.pop((bytes(route[0]), req.fetch), None)
        send(
            self._router,
            WeightsChunk(
                fetch=req.fetch,
                version=version,
                status="ok",
                base=base,
                encoding="raw" if base < 0 else "diff+zstd",
                chunk=req.chunk,
                chunks=chunks,
                chunk_bytes=self._chunk,
                size=size,
                raw_bytes=raw_bytes,
                model_config=target.model_config if target is not None else "",
                tensors=target.tensors if target is not None else [],
                files=self._file_list if files else [],
                data=part,
                file_data=self._files_blob if files else np.empty(0, np.uint8),
            ),
            *route,
        )
        return True

    def _expire_pins(self) -> None:
        """Drop pins silent for ``pin_s``, then the oldest pins of versions no longer kept beyond ``max_pinned``."""
        now = time.monotonic()
        for key in [k for k, p in self._pins.items() if now - p.seen > self.cfg.pin_s]:
            del self._pins[key]
            self.pins_expired += 1
        with self._lock:
            kept = set(self._kept)
        held = sorted(
            {
                (p.version, p.base)
                for p in self._pins.values()
                if p.version not in kept or (p.base >= 0 and p.base not in kept)
            }
        )
        for pair in held[: max(0, len(held) - self.cfg.max_pinned)]:
            for key in [k for k, p in self._pins.items() if (p.version, p.base) == pair]:
                del self._pins[key]
                self.pins_dropped += 1

    def _drain_subscriptions(self) -> bool:
        """Read the subscription messages waiting on the announce socket (at most 64: a peer that
        reconnects in a loop gets at most one announcement per ``JOIN_GAP_S``, not one per message);
        True when a process subscribed, so that it hears the latest version now."""
        joined = False
        for _ in range(64):
            try:
                joined |= self._pub.recv(zmq.NOBLOCK)[:1] == b"\x01"
            except zmq.Again:
                break
        return joined

    def _serve_or_stop(self) -> None:
        """The serving thread: a learner whose weights server has failed must not train on, unseen, while
        no rollout server can get a version (it would wait for batches that never come). The error is
        logged and the main thread interrupted (SIGINT: KeyboardInterrupt), so the learner exits non-zero and the
        launcher reports it."""
        try:
            self._serve()
        except Exception:
            log.critical("the weights server thread failed; stopping the learner", exc_info=True)
            os.kill(os.getpid(), signal.SIGINT)  # a real signal: it wakes a main thread blocked in a wait

    def _read_requests(self, waiting: list[tuple[list[bytes], WeightsRequest]], poller: zmq.Poller, now: float) -> None:
        """Read a burst of requests into ``waiting``, within the read budget (``READS_PER_S``)."""
        for _ in range(64):  # a burst of chunk requests, then look at the clock again
            if not self.reads.take(poller, now):
                return
            try:
                frames = self._router.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            peer = frames[0].bytes
            if self.starts.spent(peer, now):  # a flooding peer: not even decoded until it refills
                self.starts.refused += 1
                self._warn("throttled", "ignored weight-transfer starts beyond a peer's budget")
                continue
            try:
                route, req, _ = decode_received(self._router, frames, WeightsRequest, True, None)
            except ProtocolError as e:
                self.rejected += 1
                self._warn(e.reason, "rejected a weights request: %s", e)
                continue
            if req.chunk == 0 and not self.starts.allow(peer, now):
                self._warn("throttled", "ignored weight-transfer starts beyond a peer's budget")
                continue
            if req.corrupt >= 0:
                self._corrupt_reported(req.corrupt)
            waiting.append((route, req))

    def _serve(self) -> None:
        wake = self._ctx.socket(zmq.PAIR)
        wake.connect(self._wake_addr)
        waiting: list[tuple[list[bytes], WeightsRequest]] = []  # requests that came before version 0
        poller = zmq.Poller()
        poller.register(wake, zmq.POLLIN)
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._pub, zmq.POLLIN)  # subscriptions: a process joined (protocol/sockets.py)
        announced, join_due = time.monotonic(), math.inf  # join_due: announce then, for a new subscriber
        timeout_ms = int(ANNOUNCE_EVERY_S * 1000)
        try:
            while True:
                due = min(join_due, self.reads.paused_until or math.inf)
                due_ms = math.ceil((due - time.monotonic()) * 1000) if due < math.inf else timeout_ms
                events = dict(poller.poll(max(0, min(timeout_ms, due_ms))))
                now = time.monotonic()
                self.reads.resume(poller, now)
                if self._router in events:
                    self._read_requests(waiting, poller, now)
                if wake in events and wake.recv() == b"stop":
                    return
                if self._pub in events and self._drain_subscriptions():  # (a reconnecting loop: one per JOIN_GAP_S)
                    join_due = min(join_due, max(time.monotonic(), announced + JOIN_GAP_S))
                now = time.monotonic()
                if wake in events or now >= join_due or now - announced >= ANNOUNCE_EVERY_S:
                    self._announce()
                    announced, join_due = time.monotonic(), math.inf
                if self._pins:
                    self._expire_pins()
                if self._latest is not None:
                    waiting = [(route, req) for route, req in waiting if not self._reply(route, req)]
                    timeout_ms = 5 if waiting else int(ANNOUNCE_EVERY_S * 1000)  # a delta being encoded
        finally:
            self._pub.close(linger=2000)  # let the final announcement leave
            close(self._router, wake)


def _intact(w: Weights) -> bool:
    """Whether ``w``'s bytes match the digests the learner computed when it packed them."""
    try:
        verify(w)
    except ProtocolError:
        return False
    return True
