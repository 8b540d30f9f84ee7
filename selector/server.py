"""The selector: gate staleness, down-sample each group with PODS, batch, serve the learner.

Start alone::

    podsrl selector --config configs/tiny.toml net.bind_host=0.0.0.0

Groups arrive from any number of rollout servers (PULL). A group whose staleness would exceed
``max_staleness`` is dropped and counted, at arrival and again when a batch is cut for a learner
version. Kept groups wait in a bounded FIFO; when it is full the selector stops reading, which
back-pressures the rollout servers instead of buffering without bound. The learner asks for each
batch (ROUTER), so a batch is always built for the exact version it will train. One plain loop
with a ``zmq.Poller``; malformed messages are rejected, counted and logged, never fatal.

Trust (docs/RELIABILITY.md): the learner's announcements alone move the selector's version; groups
are read only once one has arrived, a batch request for a version not yet announced waits for it, and
every group passes ``selector/bounds.py`` (the run's bounds and the group's identity: nothing is trained
twice). Rejections are counted per reason and logged at most once per reason every 10 s. The peer
table is bounded (``selector.max_peers``; dead peers are forgotten).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
import zmq

from protocol.auth import load_auth
from protocol.config import Config
from protocol.messages import (
    LEARNER_SILENT_S,
    BatchRequest,
    Heartbeat,
    Hello,
    ProtocolError,
    ScoredGroup,
    TrainBatch,
    WeightsAnnouncement,
)
from protocol.metrics import Monitor, RateLimitedLog
from protocol.sockets import MIB, announce_subscriber, batch_server, close, group_receiver, recv, send
from selector.batch import KeptGroup, build_batch, keep_groups
from selector.bounds import Bounds, Identities

log = logging.getLogger("podsrl.selector")



@dataclass
class Peer:
    """What the selector knows of one rollout server."""

    last_seen: float
    version: int = -1
    state: str = "joined"
    groups: int = 0
    dead: bool = False


@dataclass
class Selector:
    cfg: Config
    ctx: zmq.Context = field(default_factory=zmq.Context)

    def __post_init__(self) -> None:
        auth = load_auth(self.cfg.net, "selector")  # None on loopback unless net.auth=on (warned once)
        self.groups = group_receiver(self.ctx, self.cfg.net, auth)
        self.batches = batch_server(self.ctx, self.cfg.net, auth)
        self.sub = announce_subscriber(self.ctx, self.cfg.net, auth)
        self.buffer: deque[KeptGroup] = deque()
        self.pending: tuple[list[bytes], BatchRequest] | None = None
        self.scanned_version: int | None = None  # request version the buffer was last gated for in try_serve
        self.bounds = Bounds(self.cfg)  # the newest announced version, its floor and the vocabulary size
        self.heard_learner = False  # groups are read only once the learner's version is known
        self.heard_at = 0.0  # when the last announcement arrived
        # a new process may take a server id over once the old one has missed about three heartbeats
        self.identities = Identities(takeover_s=3 * self.cfg.rollout.heartbeat_s)
        self.warn = RateLimitedLog(log)
        self.peers: dict[str, Peer] = {}
        self.counts: Counter[str] = Counter()  # since the last batch; reset when a batch is sent
        self.totals: Counter[str] = Counter()  # since start
        self.rng = np.random.default_rng(self.cfg.run.seed)
        self.monitor = Monitor(self.cfg.run.dir, "selector", tensorboard=False)
        self.stopping = False
        self.batches_sent = 0

    @property
    def version(self) -> int:
        """The newest version the learner has announced."""
        return self.bounds.version

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n
        self.totals[key] += n

    def reject(self, link: str, e: ProtocolError) -> None:
        self.count(f"rejected/{e.reason}")
        self.warn(e.reason, "rejected a message on the %s link: %s", link, e)

    # -- handlers ------------------------------------------------------------------------------
    def receive_group_message(self) -> Hello | Heartbeat | ScoredGroup | None:
        """Read one message from the groups link and update its peer; a ScoredGroup is returned for
        ``on_groups`` (None for a rejected message)."""
        msg: Hello | Heartbeat | ScoredGroup
        try:
            _, msg = recv(self.groups, (Hello, Heartbeat, ScoredGroup), max_bytes=self.cfg.net.max_group_mib * MIB)
            self.admit(msg)
        except ProtocolError as e:
            self.reject("groups", e)
            return None
        peer = self.peers.get(msg.server_id)
        if peer is None:
            peer = self.peers[msg.server_id] = Peer(last_seen=time.monotonic())
            log.info("rollout server %s joined (%s)", msg.server_id, type(msg).__name__)
        elif peer.dead:
            log.info("rollout server %s is back", msg.server_id)
            peer.dead = False
        peer.last_seen = time.monotonic()
        if isinstance(msg, Heartbeat):
            peer.version, peer.state = msg.version, msg.state
        elif isinstance(msg, ScoredGroup):
            peer.version, peer.groups = msg.version, peer.groups + 1
        return msg

    def admit(self, msg: Hello | Heartbeat | ScoredGroup) -> None:
        """Raise ProtocolError unless ``msg`` may enter: a known or admissible peer, a new group
        (not a replay) within the run's bounds."""
        now = time.monotonic()
        if msg.server_id not in self.peers and len(self.peers) >= self.cfg.selector.max_peers:
            self.forget_dead(now, grace_s=0.0)
            if len(self.peers) >= self.cfg.selector.max_peers:
                raise ProtocolError("too_many_peers", f"{msg.server_id!r} would be peer {len(self.peers) + 1} > "
                                    f"selector.max_peers={self.cfg.selector.max_peers}")
        if not isinstance(msg, ScoredGroup):
            self.identities.admit(msg.server_id, msg.session, now)
            return
        gaps = self.identities.gaps
        self.identities.check_group(msg, now)
        if self.identities.gaps > gaps:
            self.count("identity/gaps", self.identities.gaps - gaps)
        if msg.version > self.bounds.version:  # the announcement may be waiting on the other socket
            self.drain_announcements()
        self.bounds.check(msg)

    def forget_dead(self, now: float, grace_s: float) -> None:
        """Drop peers dead for ``grace_s`` beyond the timeout: the tables stay bounded."""
        limit = self.cfg.selector.peer_timeout_s + grace_s
        for sid in [sid for sid, p in self.peers.items() if p.dead and now - p.last_seen > limit]:
            del self.peers[sid]
            self.identities.forget(sid)

    def drop_stale(self, server_id: str) -> None:
        """Never train on s > K (DESIGN.md): drop and count, per rollout server too."""
        self.count("staleness/dropped")
        self.count(f"staleness/dropped/{server_id}")

    def on_groups(self, groups: list[ScoredGroup]) -> None:
        """Gate staleness, down-sample the fresh groups of a burst in one ``keep_groups`` call, buffer
        the kept ones. Counters, warnings and the buffer change in arrival order, group by group, and
        the draws from ``self.rng`` are those of one ``keep_group`` per fresh group."""
        stale = [self.cfg.too_stale(self.version, g.version) for g in groups]
        fresh = [g for g, s in zip(groups, stale, strict=True) if not s]
        kept_groups = iter(keep_groups(fresh, self.cfg.selector, self.cfg.kept_per_group, self.rng))
        for group, is_stale in zip(groups, stale, strict=True):
            self.count("groups/received")
            if is_stale:
                self.drop_stale(group.server_id)
                continue
            kept = next(kept_groups)
            if kept is not None and self.exact_surplus(kept.version):
                self.count("staleness/exact_surplus")
                continue
            if kept is None:
                self.count("selector/zero_variance_dropped")
                self._warn_starving()
                continue
            if kept.zero_variance:
                self.count("selector/zero_variance_kept")
            if len(self.buffer) >= self.cfg.selector.buffer_groups:  # read on while the learner is gone
                self.count("selector/dropped_learner_silent")
                continue
            self.buffer.append(kept)

    def exact_surplus(self, version: int) -> bool:
        """Exact mode: each version is trained once (version 0 by the first K+1 updates), so more than
        that many groups of a version can only wait until they are dropped, filling the buffer."""
        if self.cfg.run.staleness_mode != "exact":
            return False
        per_step = self.cfg.learner.groups_per_step
        cap = per_step * (self.cfg.max_staleness + 1 if version == 0 else 1)
        return sum(g.version == version for g in self.buffer) >= cap

    def take_exact(self, req: BatchRequest) -> list[KeptGroup] | None:
        """The groups of version ``max(0, V - K)`` for request version V, once the buffer also holds all
        that version V must supply to later updates (one batch; K+1 batches for version 0): the rollout
        servers move on to V+1 as soon as it exists, so no version may be left short."""
        k = self.cfg.max_staleness
        want = max(0, req.version - k)
        rows = [i for i, g in enumerate(self.buffer) if g.version == want][:req.num_groups]
        need = req.num_groups * (k + 1 if req.version == 0 else 1)
        if len(rows) < req.num_groups or (k and sum(g.version == req.version for g in self.buffer) < need):
            return None
        chosen = set(rows)
        take = [self.buffer[i] for i in rows]
        self.buffer = deque(g for i, g in enumerate(self.buffer) if i not in chosen)
        return take

    def _warn_starving(self) -> None:
        dropped, received = self.totals["selector/zero_variance_dropped"], self.totals["groups/received"]
        if dropped in (1000, 10000, 100000) and dropped > 0.9 * received:
            log.warning("%d of %d groups had zero reward variance and were dropped: the task is solved or too "
                        "hard for this policy, and the learner is starved. Set selector.zero_variance=keep, or "
                        "change the task", dropped, received)

    def on_request(self) -> None:
        try:
            route, req = recv(self.batches, BatchRequest, routed=True)
        except ProtocolError as e:
            self.reject("batches", e)
            return
        # A request never moves the version: one for a version not yet announced waits for the
        # announcement (try_serve), so a forged request cannot age every group out of the buffer.
        self.pending = (route, req)  # a re-sent request replaces the one it repeats
        if req.version > self.bounds.version:
            self.drain_announcements()

    def drain_announcements(self) -> None:
        while self.sub.poll(0):
            self.on_announcement()

    def on_announcement(self) -> None:
        try:
            _, msg = recv(self.sub, WeightsAnnouncement)
        except ProtocolError as e:
            self.reject("announce", e)
            return
        if not self.heard_learner:
            log.info("learner at version %d (floor %d, vocabulary %d): reading groups", msg.version, msg.floor,
                     msg.vocab_size)
        self.heard_learner = True
        self.heard_at = time.monotonic()
        b = self.bounds
        b.version, b.vocab_size = max(b.version, msg.version), msg.vocab_size or b.vocab_size
        if msg.floor > b.floor:  # a restarted learner discarded the versions in [old floor, msg.floor)
            b.floor = msg.floor
            before = len(self.buffer)
            self.buffer = deque(g for g in self.buffer if g.version >= b.floor)
            self.count("restart/discarded_groups", before - len(self.buffer))
            log.warning("the learner restarted: versions below %d are discarded; %d buffered groups dropped",
                        b.floor, before - len(self.buffer))
        if msg.final:
            self.stopping = True

    def learner_silent(self) -> bool:
        """The learner has been heard, but not for ``LEARNER_SILENT_S``: it is gone, maybe restarting.

        A full buffer then does not stop the selector reading: groups that do not fit are dropped and
        counted (``selector/dropped_learner_silent``). The buffer already holds more than the learner
        can train before those groups' version ages past K, and a restarted learner may discard them
        all. A groups link left unread for seconds instead stalls when reading resumes: the rollout
        servers' TCP connections back off (zero window, retries doubling), and the first group the
        restarted learner could train waited up to 8.7 s for the next retry (docs/RELIABILITY.md)."""
        return self.heard_learner and time.monotonic() - self.heard_at > LEARNER_SILENT_S

    def try_serve(self) -> None:
        if self.pending is None:
            return
        route, req = self.pending
        if req.version > self.bounds.version:  # not announced yet: wait for the announcement
            return
        # Re-gate the buffer only for a new request version: a group admitted since the last scan
        # passed the arrival gate with self.version >= req.version, so it is fresh enough for req.
        if req.version != self.scanned_version:
            kept: deque[KeptGroup] = deque()
            for g in self.buffer:
                if self.cfg.too_stale(req.version, g.version):
                    self.drop_stale(g.server_id)
                else:
                    kept.append(g)
            self.buffer = kept
            self.scanned_version = req.version
        if self.cfg.run.staleness_mode == "exact":
            exact = self.take_exact(req)
            if exact is None:
                return
            take = exact
        elif len(self.buffer) < req.num_groups:
            return
        else:
            take = [self.buffer.popleft() for _ in range(req.num_groups)]
        stats: dict[str, float] = {**self.counts, "selector/buffer_groups": len(self.buffer),
                                   "selector/peers_alive": sum(not p.dead for p in self.peers.values())}
        batch = build_batch(take, req, stats)
        try:
            send(self.batches, batch, *route)
        except zmq.ZMQError as e:  # the learner went away: keep the groups for whoever asks next
            self.buffer.extendleft(reversed(take))
            self.count("selector/undeliverable_batches")
            log.warning("batch for learner version %d undeliverable (%s); groups kept", req.version, e)
        else:
            self.batches_sent += 1
            self.monitor.log(req.version, self._metrics(batch))
            self.counts.clear()
        self.pending = None

    def _metrics(self, batch: TrainBatch) -> dict[str, float]:
        stale = batch.version - batch.versions
        return {**batch.stats, "selector/batch_rows": batch.size, "staleness/mean": float(stale.mean()),
                "staleness/max": int(stale.max()), "reward/kept_mean": float(batch.rewards.mean())}

    def check_peers(self) -> None:
        """Report silent rollout servers. Only meaningful while we read the groups link: under
        back-pressure their heartbeats queue up unread, so reading resumes with a fresh grace period."""
        now = time.monotonic()
        for sid, peer in self.peers.items():
            if not peer.dead and now - peer.last_seen > self.cfg.selector.peer_timeout_s:
                peer.dead = True
                self.count("peers/dead")
                self.count(f"peers/dead/{sid}")
                log.warning("rollout server %s silent for %.0fs: marked dead (its groups so far are kept)",
                            sid, now - peer.last_seen)
        self.forget_dead(now, grace_s=9 * self.cfg.selector.peer_timeout_s)

    # -- loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        log.info("selector up: groups on :%d, batches on :%d; %s", self.cfg.net.group_port,
                 self.cfg.net.batch_port, self.cfg.summary())
        poller = zmq.Poller()
        poller.register(self.batches, zmq.POLLIN)
        poller.register(self.sub, zmq.POLLIN)
        reading = False
        last_check = time.monotonic()
        try:
            while not self.stopping:
                # full buffer: back-pressure (unless the learner is silent: learner_silent); and nothing
                # is read before the learner's version is known
                silent = self.learner_silent()
                want = self.heard_learner and (len(self.buffer) < self.cfg.selector.buffer_groups or silent)
                if want != reading:
                    (poller.register if want else poller.unregister)(self.groups, *([zmq.POLLIN] if want else []))
                    reading = want
                    if reading:
                        for peer in self.peers.values():
                            peer.last_seen = max(peer.last_seen, time.monotonic())
                events = dict(poller.poll(200))
                if self.sub in events:  # first: a group or request may carry the version just announced
                    self.drain_announcements()
                if self.groups in events:
                    # Drain a burst before serving, without starving the other links; decode it all,
                    # then gate and down-sample it in one go. ``room`` counts the groups that will pass
                    # the staleness gate (zero-variance drops are known only after down-sampling).
                    burst: list[ScoredGroup] = []
                    room = 64 if silent else self.cfg.selector.buffer_groups - len(self.buffer)
                    for _ in range(64):
                        msg = self.receive_group_message()
                        if isinstance(msg, ScoredGroup):
                            burst.append(msg)
                            if not self.cfg.too_stale(self.version, msg.version):
                                room -= 1
                        if not self.groups.poll(0) or room <= 0:
                            break
                    if burst:
                        self.on_groups(burst)
                if self.batches in events:
                    self.on_request()
                self.try_serve()
                if reading and time.monotonic() - last_check > 1.0:
                    self.check_peers()
                    last_check = time.monotonic()
        finally:
            log.info("selector stopping: %s", dict(self.totals))
            self.monitor.log(self.version, {f"total/{k}": v for k, v in self.totals.items()})
            close(self.groups, self.batches, self.sub)
            self.ctx.term()
            self.monitor.close()


def main(argv: list[str] | None = None) -> int:
    from protocol.cli import configure, process_parser

    parser = process_parser("podsrl selector", __doc__)
    cfg = configure(parser.parse_args(argv), role="selector")
    selector = Selector(cfg)
    signal.signal(signal.SIGTERM, lambda *_: setattr(selector, "stopping", True))
    selector.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
