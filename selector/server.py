"""The selector: gate staleness, down-sample each group with PODS, batch, serve the learner.

Start alone::

    podsrl selector --config configs/tiny.toml net.bind_host=0.0.0.0

Groups arrive from any number of rollout servers (ROUTER). This class only moves messages: what
enters the buffer and what a batch takes is ``selector/buffer.py`` (the staleness gate at arrival and
per request version, PODS down-sampling, oldest version first), and how much work each rollout server
is granted is ``selector/pacing.py`` (work requests and grants on the same link; docs/ARCHITECTURE.md,
"Pacing"). When the buffer is full the selector stops reading, which back-pressures the rollout
servers instead of buffering without bound. The learner asks for each batch (ROUTER), so a batch is
always built for the exact version it will train. One plain loop with a ``zmq.Poller``; malformed
messages are rejected, counted and logged, never fatal.

Trust (docs/RELIABILITY.md): the learner's announcements alone move the selector's version; groups
are read only once one has arrived, a batch request for a version not yet announced waits for it, and
every group passes ``selector/bounds.py`` (the run's bounds and the group's identity: nothing is trained
twice; a group of the next version, which its server heard of first, waits up to a second for the
announcement). With authentication, a rollout server speaks only as the id its key was made for
(``rejected/id_mismatch``); a batch request is served only from the announced learner's session
(``selector/requests.py``, ``rejected/batch_not_learner``). A process refused for good (its key's id
is another, or another live process holds its id) is answered a ``Refusal`` and stops, naming the
fix. Each server id may deliver ``selector.peer_groups_per_s`` groups a second outside its pacing
grants (by default 16 under credits, 1000 unpaced; ``protocol/budget.py``, ``rejected/peer_rate``), so
one peer cannot fill the batches the others share. Rejections are counted per reason and logged at
most once per reason every 10 s. The peer table is bounded (``selector.max_peers``; dead peers are
forgotten).
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
import zmq

from protocol.auth import load_auth
from protocol.budget import Budgets, LinkReads
from protocol.config import Config
from protocol.messages import (
    LEARNER_SILENT_S,
    REFUSALS,
    BatchRequest,
    Heartbeat,
    Hello,
    ProtocolError,
    Refusal,
    ScoredGroup,
    TrainBatch,
    WeightsAnnouncement,
    WorkGrant,
    WorkRequest,
)
from protocol.metrics import Monitor, RateLimitedLog
from protocol.sockets import (
    MIB,
    announce_subscriber,
    batch_server,
    close,
    decode_received,
    group_receiver,
    recv,
    send,
)
from selector.batch import KeptGroup, build_batch
from selector.bounds import Bounds, Early, Identities
from selector.buffer import Buffer, Tally
from selector.pacing import Pacer
from selector.requests import REQUEST_READS_PER_S, STRANGER_PER_S, LearnerRequests

log = logging.getLogger("podsrl.selector")
GroupLinkMessage = Hello | Heartbeat | ScoredGroup | WorkRequest
GROUP_LINK = (Hello, Heartbeat, ScoredGroup, WorkRequest)


@dataclass
class Peer:
    """What the selector knows of one rollout server."""

    last_seen: float
    version: int = -1
    state: str = "joined"
    groups: int = 0
    dead: bool = False
    host: str = ""  # from its Hello: named to a second process that asks for the same id
    pid: int = 0


@dataclass
class Selector:
    cfg: Config
    ctx: zmq.Context = field(default_factory=zmq.Context)

    def __post_init__(self) -> None:
        auth = load_auth(self.cfg.net, "selector")  # None on loopback unless net.auth=on (warned once)
        self.groups = group_receiver(self.ctx, self.cfg.net, auth)
        self.batches = batch_server(self.ctx, self.cfg.net, auth)
        self.sub = announce_subscriber(self.ctx, self.cfg.net, auth)
        self.tally = Tally()
        self.rng = np.random.default_rng(self.cfg.run.seed)
        self.pool = Buffer(self.cfg, self.rng, self.tally)  # the buffer policy (selector/buffer.py)
        self.pacer = Pacer(self.cfg, self.tally)  # work grants (selector/pacing.py)
        self.pending: tuple[list[bytes], BatchRequest] | None = None
        self.requests = LearnerRequests()  # only the announced learner's batch requests are served
        self.strangers = Budgets(per_s=STRANGER_PER_S, burst=2 * STRANGER_PER_S)  # other connections' requests
        self.request_reads = LinkReads(self.batches, REQUEST_READS_PER_S)  # all connections' requests a second
        self.learner_peer = b""  # the routing id of the connection the learner's last request came on
        self.bounds = Bounds(self.cfg)  # the newest announced version, its floor and the vocabulary size
        self.early = Early()  # groups of the next version, waiting for its announcement
        self.heard_learner = False  # groups are read only once the learner's version is known
        self.heard_at = 0.0  # when the last announcement arrived
        # a new process may take a server id over once the old one has missed about three heartbeats
        self.identities = Identities(takeover_s=3 * self.cfg.rollout.heartbeat_s)
        self.warn = RateLimitedLog(log)
        rate = self.cfg.peer_groups_per_s  # groups outside pacing grants, per server id (fair shares)
        burst = max(4 * rate, 4 * self.cfg.rollout.prompts_per_call)
        self.budget = Budgets(per_s=rate, burst=burst, max_peers=4 * self.cfg.selector.max_peers) if rate else None
        self.flooding: dict[bytes, str] = {}  # connections over their server's budget -> that server id
        self.peers: dict[str, Peer] = {}
        self.monitor = Monitor(self.cfg.run.dir, "selector", tensorboard=False)
        self.stopping = False
        self.batches_sent = 0
        self.hold_until = 0.0  # a batch held for late leases (Pacer.hold) is looked at again by then
        self.pending_at = 0.0  # when the pending batch request arrived
        self.reading = False  # the poller watches the groups link (set_reading)
        self.last_check = 0.0  # when check_peers last ran

    @property
    def version(self) -> int:
        """The newest version the learner has announced."""
        return self.bounds.version

    @property
    def buffer(self) -> deque[KeptGroup]:
        return self.pool.groups

    @buffer.setter
    def buffer(self, groups: deque[KeptGroup]) -> None:
        self.pool.groups = groups

    @property
    def counts(self) -> Counter[str]:
        return self.tally.counts

    @property
    def totals(self) -> Counter[str]:
        return self.tally.totals

    def count(self, key: str, n: int = 1) -> None:
        self.tally.add(key, n)

    def reject(self, link: str, e: ProtocolError) -> None:
        self.count(f"rejected/{e.reason}")
        self.warn(e.reason, "rejected a message on the %s link: %s", link, e)

    # -- handlers ------------------------------------------------------------------------------
    def receive_group_message(self) -> GroupLinkMessage | None:
        """Read one message from the groups link and update its peer; a ScoredGroup is returned for
        ``on_groups``, a WorkRequest is handed to the pacer (None for a rejected message)."""
        msg: GroupLinkMessage
        frames = self.groups.recv_multipart(copy=False)
        if self.flooding and self.still_flooding(frames[0].bytes):
            self.count("rejected/peer_rate")
            return None
        try:
            route, msg, names = decode_received(
                self.groups, frames, GROUP_LINK, True, max_bytes=self.cfg.net.max_group_mib * MIB
            )
        except ProtocolError as e:
            self.reject("groups", e)
            return None
        try:
            self.admit(msg, names)
        except ProtocolError as e:
            self.reject("groups", e)
            if e.reason in REFUSALS:
                self.refuse(route, msg, e)
            elif e.reason == "peer_rate":  # its next messages are dropped undecoded while its budget is spent
                self.flooding[route[0]] = msg.server_id
                while len(self.flooding) > 4 * self.cfg.selector.max_peers:
                    del self.flooding[next(iter(self.flooding))]
            return None
        now = time.monotonic()
        peer = self.peers.get(msg.server_id)
        if peer is None:
            peer = self.peers[msg.server_id] = Peer(last_seen=now)
            log.info("rollout server %s joined (%s)", msg.server_id, type(msg).__name__)
        elif peer.dead:
            self.warn("peer_back", "rollout server %s is back after being marked dead", msg.server_id)
            peer.dead = False
        peer.last_seen = now
        if isinstance(msg, Hello):
            peer.host, peer.pid = msg.host, msg.pid
        elif isinstance(msg, Heartbeat):
            peer.version, peer.state = msg.version, msg.state
        elif isinstance(msg, ScoredGroup):
            peer.version, peer.groups = msg.version, peer.groups + 1
            if msg.version > self.bounds.version:  # held by admit until its announcement arrives
                return None
        elif isinstance(msg, WorkRequest):
            self.on_work_request(route, msg, now)
        return msg

    def on_work_request(self, route: list[bytes], msg: WorkRequest, now: float) -> None:
        """Hand a work request to the pacer; a server configured for credits in a run that paces nothing
        is granted what it asked for at once, so it generates."""
        if self.cfg.rollout.pacing == "credits":
            self.pacer.request(route, msg, now)
            return
        grant = WorkGrant(
            request_id=msg.request_id, prompts=msg.prompts, group_size=self.cfg.rollout.group_size, lease_s=3600.0
        )
        self.reply(route, grant)

    def admit(self, msg: GroupLinkMessage, names: frozenset[str] | None = None) -> None:
        """Raise ProtocolError unless ``msg`` may enter: from a key made for its server id (``names``: the
        names the sender's key was made for; None without authentication), a known or admissible peer, a
        new group (not a replay) within the run's bounds, a work request for a version the learner
        published."""
        if names is not None and msg.server_id not in names:  # first: a forged id takes no peer slot
            raise ProtocolError(
                "id_mismatch",
                f"a {type(msg).__name__} as {msg.server_id!r} from the key made for "
                f"{', '.join(repr(n) for n in sorted(names))}: start it with that --server-id, or make "
                f"a key for {msg.server_id!r} with `podsrl keys DIR --rollout {msg.server_id}`",
            )
        now = time.monotonic()
        if isinstance(msg, ScoredGroup) and not self.within_budget(msg.server_id, now):
            raise ProtocolError(
                "peer_rate",
                f"{msg.server_id!r} sends more than selector.peer_groups_per_s="
                f"{self.cfg.peer_groups_per_s:g} groups a second outside its pacing grants: "
                "if it is an honest server, raise that bound or pace it (rollout.pacing = 'credits')",
            )
        if msg.server_id not in self.peers and len(self.peers) >= self.cfg.selector.max_peers:
            self.forget_dead(now, grace_s=0.0)
            if len(self.peers) >= self.cfg.selector.max_peers:
                raise ProtocolError(
                    "too_many_peers",
                    f"{msg.server_id!r} would be peer {len(self.peers) + 1} > "
                    f"selector.max_peers={self.cfg.selector.max_peers}",
                )
        if not isinstance(msg, ScoredGroup):
            self.identities.admit(msg.server_id, msg.session, now)
            if isinstance(msg, WorkRequest):
                if msg.version > self.bounds.version:
                    self.drain_announcements()
                # one ahead: the server may have read an announcement still on its way here; the pacer
                # grants nothing for a version before its announcement arrives
                self.bounds.check_version(msg.version, msg.server_id, "work request", ahead=1)
            return
        gaps = self.identities.gaps
        self.identities.check_group(msg, now)
        if self.identities.gaps > gaps:
            self.count("identity/gaps", self.identities.gaps - gaps)
        if msg.version > self.bounds.version:  # the announcement may be waiting on the other socket
            self.drain_announcements()
        # one ahead: the server may have read an announcement still on its way here (Bounds: Early)
        self.bounds.check(msg, ahead=1)
        if msg.version > self.bounds.version:
            self.early.hold(msg, now)

    def within_budget(self, server_id: str, now: float) -> bool:
        """Whether a group of ``server_id`` may enter: granted by pacing, or within the peer's budget
        (``selector.peer_groups_per_s``). Checked before any other work on it: a flood costs a decode."""
        return self.budget is None or self.pacer.leased(server_id) or self.budget.allow(server_id, now)

    def still_flooding(self, route: bytes) -> bool:
        """Whether the connection ``route``, over its server's group budget before, still is: then its
        message is dropped before decoding (a heartbeat or work request of it too: it is flooding)."""
        sid = self.flooding.get(route)
        if sid is None or self.budget is None:
            return False
        if self.budget.spent(sid, time.monotonic()):
            return True
        del self.flooding[route]
        return False

    def release_early(self) -> None:
        """Admit the held groups whose version is now announced; reject those that waited in vain."""
        ready, expired = self.early.release(self.version, time.monotonic())
        for g in expired:
            detail = f"group of version {g.version} from {g.server_id}: not announced within {self.early.wait_s:g} s"
            self.reject("groups", ProtocolError("version_future", detail))
        admitted: list[ScoredGroup] = []
        for g in ready:
            try:  # a learner restart meanwhile may have discarded its version
                self.bounds.check_version(g.version, g.server_id)
            except ProtocolError as e:
                self.reject("groups", e)
                continue
            admitted.append(g)
        if admitted:
            self.on_groups(admitted)

    def forget_dead(self, now: float, grace_s: float) -> None:
        """Drop peers dead for ``grace_s`` beyond the timeout: the tables stay bounded."""
        limit = self.cfg.selector.peer_timeout_s + grace_s
        for sid in [sid for sid, p in self.peers.items() if p.dead and now - p.last_seen > limit]:
            del self.peers[sid]
            self.identities.forget(sid)

    def on_groups(self, groups: list[ScoredGroup]) -> None:
        """Gate, down-sample and buffer a burst (``Buffer.admit``); each group fills its server's lease."""
        outcomes = self.pool.admit(groups, self.version, self.learner_silent())
        if "zero_variance" in outcomes:
            self._warn_starving()
        now = time.monotonic()
        for g in groups:
            self.pacer.received(g.server_id, now)

    def reply(self, route: list[bytes], msg: WorkGrant | Refusal) -> None:
        try:
            send(self.groups, msg, *route, flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:  # the server went away (or its pipe is full): a grant's lease expires
            key = "pacing/undeliverable_grants" if isinstance(msg, WorkGrant) else "selector/undeliverable_refusals"
            self.count(key)
            self.warn(msg.TYPE, "%s undeliverable (%s)", type(msg).__name__, e)

    def refuse(self, route: list[bytes], msg: GroupLinkMessage, e: ProtocolError) -> None:
        """Tell a rollout server refused for good (``REFUSALS``) why, so that it stops instead of
        generating groups nobody trains. One answer per refused message: the sender's own pace. A taken
        id is told only once its holder has spoken since (``Identities.holder_alive``): a restarted
        server, refused while its killed predecessor's silence is shorter than the takeover time, is not
        told and takes the id over."""
        detail = e.detail
        if e.reason == "server_id_in_use":
            if not self.identities.holder_alive(msg.server_id):
                return
            detail = f"held by {self.holder(msg.server_id)}"
        detail = "".join(c if " " <= c <= "~" else "?" for c in detail[:255])  # a Refusal's detail is printable
        self.reply(route, Refusal(server_id=msg.server_id, reason=e.reason, detail=detail))

    def holder(self, server_id: str) -> str:
        """The live process that holds ``server_id``, as the selector knows it (its Hello, its session)."""
        now, peer, held = time.monotonic(), self.peers.get(server_id), self.identities.sessions.get(server_id)
        who = [f"pid {peer.pid} on {peer.host[:64]}"] if peer is not None and peer.pid else []
        if held is not None:
            who.append(f"session {held.session:x}, heard {now - held.last_seen:.1f}s ago")
        return ", ".join(who) or "another process"

    def send_grants(self) -> None:
        for route, grant in self.pacer.grants(time.monotonic(), self.version, self.pool):
            self.reply(route, grant)

    def _warn_starving(self) -> None:
        dropped, received = self.totals["selector/zero_variance_dropped"], self.totals["groups/received"]
        if dropped in (1000, 10000, 100000) and dropped > 0.9 * received:
            log.warning(
                "%d of %d groups had zero reward variance and were dropped: the task is solved or too "
                "hard for this policy, and the learner is starved. Set selector.zero_variance=keep, or "
                "change the task",
                dropped,
                received,
            )

    def read_requests(self, poller: zmq.Poller) -> None:
        """A burst of batch requests (a flood of forged ones does not queue the learner's behind it),
        within ``REQUEST_READS_PER_S`` for all connections together: when that runs out the link is not
        polled for a pause, so a flood waits in its own queue (ZeroMQ fair-queues the learner's)."""
        now = time.monotonic()
        for _ in range(64):
            if not self.request_reads.take(poller, now):
                return
            try:
                frames = self.batches.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.on_request(frames, now)

    def on_request(self, frames: list[zmq.Frame], now: float) -> None:
        peer = frames[0].bytes
        if peer != self.learner_peer and not self.strangers.allow(peer, now):  # a flood: not even decoded
            rejected = self.requests.rejected
            self.requests.dropped()
            self.count_not_learner(rejected)
            return
        try:
            route, req, _ = decode_received(self.batches, frames, BatchRequest, True, None)
        except ProtocolError as e:
            self.reject("batches", e)
            return
        if req.session != self.requests.session or req.version > self.bounds.version:
            self.drain_announcements()  # a restarted learner's announcement may be waiting on the other socket
        rejected = self.requests.rejected
        mine = self.requests.arrive(route, req, now)
        self.count_not_learner(rejected)
        if mine is not None:
            self.learner_peer = mine[0][0]
            self.set_pending(mine)

    def set_pending(self, request: tuple[list[bytes], BatchRequest]) -> None:
        """The learner's request, to serve. A request never moves the version: one for a version not yet
        announced waits for the announcement (try_serve), so a forged request cannot age every group out
        of the buffer."""
        if self.pending is None:
            self.pending_at = time.monotonic()
        self.pending = request  # a re-sent request replaces the one it repeats

    def count_not_learner(self, before: int) -> None:
        """Count and log the batch requests dropped since ``self.requests.rejected`` was ``before``."""
        if self.requests.rejected > before:
            n = self.requests.rejected - before
            self.count("rejected/batch_not_learner", n)
            self.warn(
                "batch_not_learner",
                "rejected %d batch request(s) not from the learner's session %x",
                n,
                self.requests.session or 0,
            )

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
            log.info(
                "learner at version %d (floor %d, vocabulary %d): reading groups",
                msg.version,
                msg.floor,
                msg.vocab_size,
            )
        self.heard_learner = True
        self.heard_at = time.monotonic()
        if msg.session != self.requests.session:
            if self.pending is not None and self.pending[1].session != msg.session:
                self.pending = None  # the previous learner's: it is gone
            held = self.requests.heard(msg.session)
            if held is not None:  # the new learner asked before its announcement arrived
                self.set_pending(held)
        b = self.bounds
        b.version, b.vocab_size = max(b.version, msg.version), msg.vocab_size or b.vocab_size
        if msg.floor > b.floor:  # a restarted learner discarded the versions in [old floor, msg.floor)
            b.floor = msg.floor
            dropped = self.pool.discard_below(b.floor)
            log.warning(
                "the learner restarted: versions below %d are discarded; %d buffered groups dropped", b.floor, dropped
            )
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
        now = time.monotonic()
        hold = self.pacer.hold(req.version, now) if self.pool.fresh(req.version) >= req.num_groups else 0.0
        if hold > 0:  # granted groups whose last chance this batch is are on their way
            self.hold_until = now + hold
            return
        self.hold_until = 0.0
        take = self.pool.take(req)
        if take is None:
            return
        stats: dict[str, float] = {
            **self.counts,
            "selector/buffer_groups": len(self.buffer),
            "selector/peers_alive": sum(not p.dead for p in self.peers.values()),
            "pacing/outstanding": self.pacer.outstanding(),
            "pacing/hold_s": self.pacer.held_s,
            "pacing/group_size": self.pacer.group_size(),
        }
        batch = build_batch(take, req, stats)
        try:
            send(self.batches, batch, *route)
        except zmq.ZMQError as e:  # the learner went away: keep the groups for whoever asks next
            self.pool.put_back(take)
            self.count("selector/undeliverable_batches")
            log.warning("batch for learner version %d undeliverable (%s); groups kept", req.version, e)
        else:
            self.batches_sent += 1
            self.pool.trained(take)
            now = time.monotonic()
            waited = now - self.pending_at - self.pacer.held_s  # the learner waited for groups (holds excluded)
            self.pacer.batch_served(req.version, [(g.version, g.server_id) for g in take], now, waited)
            self.monitor.log(req.version, self._metrics(batch))
            self.counts.clear()
        self.pending = None

    def _metrics(self, batch: TrainBatch) -> dict[str, float]:
        stale = batch.version - batch.versions
        return {
            **batch.stats,
            "selector/batch_rows": batch.size,
            "staleness/mean": float(stale.mean()),
            "staleness/max": int(stale.max()),
            "reward/kept_mean": float(batch.rewards.mean()),
        }

    def check_peers(self) -> None:
        """Report silent rollout servers. Only meaningful while we read the groups link: under
        back-pressure their heartbeats queue up unread, so reading resumes with a fresh grace period."""
        now, timeout = time.monotonic(), self.cfg.selector.peer_timeout_s
        dead = [sid for sid, peer in self.peers.items() if not peer.dead and now - peer.last_seen > timeout]
        for sid in dead:
            self.peers[sid].dead = True
            self.count("peers/dead")
            self.count(f"peers/dead/{sid}")
            self.pacer.forget(sid)
        if dead:  # one line per sweep, at most one per 10 s: 256 servers dying at once print one line
            self.warn(
                "peer_dead",
                "rollout server%s %s silent for over %.0fs: marked dead (groups so far are kept, work grants "
                "withdrawn)",
                "s" if len(dead) > 1 else "",
                ", ".join(dead[:8]) + (f" and {len(dead) - 8} more" if len(dead) > 8 else ""),
                timeout,
            )
        self.forget_dead(now, grace_s=9 * self.cfg.selector.peer_timeout_s)

    # -- loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        log.info(
            "selector up: groups on :%d, batches on :%d; %s",
            self.cfg.net.group_port,
            self.cfg.net.batch_port,
            self.cfg.summary(),
        )
        poller = zmq.Poller()
        poller.register(self.batches, zmq.POLLIN)
        poller.register(self.sub, zmq.POLLIN)
        self.last_check = time.monotonic()
        try:
            while not self.stopping:
                self.turn(poller)
        finally:
            self.shut_down()

    def turn(self, poller: zmq.Poller) -> None:
        """One turn of the loop: choose whether to read groups, wait for a socket, then handle the
        announcements, a burst of groups and a batch request (in that order), serve, grant, check peers."""
        silent = self.learner_silent()
        self.set_reading(poller, silent)
        self.request_reads.resume(poller, time.monotonic())
        events = dict(poller.poll(self.poll_timeout_ms()))
        if self.sub in events:  # first: a group or request may carry the version just announced
            self.drain_announcements()
        if self.groups in events:
            self.read_burst(silent)
        if self.batches in events:
            self.read_requests(poller)
        if self.early:
            self.release_early()
        if self.requests.held:
            rejected = self.requests.rejected
            self.requests.expire(time.monotonic())
            self.count_not_learner(rejected)
        self.try_serve()
        if self.pacer.queue:
            self.send_grants()
        if self.reading and time.monotonic() - self.last_check > 1.0:
            self.check_peers()
            self.last_check = time.monotonic()

    def set_reading(self, poller: zmq.Poller, silent: bool) -> None:
        """Poll the groups link only once the learner's version is known, and only while the buffer has
        room (back-pressure) or the learner is silent (``learner_silent``). Reading resumes with a fresh
        grace period for every peer: their heartbeats queued up unread meanwhile."""
        want = self.heard_learner and (len(self.buffer) < self.cfg.selector.buffer_groups or silent)
        if want == self.reading:
            return
        self.reading = want
        if not want:
            poller.unregister(self.groups)
            return
        poller.register(self.groups, zmq.POLLIN)
        for peer in self.peers.values():
            peer.last_seen = max(peer.last_seen, time.monotonic())

    def poll_timeout_ms(self) -> int:
        """200 ms, or less when a held batch (``Pacer.hold``) is to be looked at again sooner, or the
        batches link listened to again (``read_requests``)."""
        due = min(self.hold_until or math.inf, self.request_reads.paused_until or math.inf)
        if due == math.inf:
            return 200
        return max(1, min(200, math.ceil(1e3 * (due - time.monotonic()))))

    def read_burst(self, silent: bool) -> None:
        """Drain a burst before serving, without starving the other links; decode it all, then gate and
        down-sample it in one go. ``room`` counts the groups that will pass the staleness gate
        (zero-variance drops are known only after down-sampling); work requests count against the
        burst's 64 messages too, so it stays bounded."""
        burst: list[ScoredGroup] = []
        room = 64 if silent else self.cfg.selector.buffer_groups - len(self.buffer)
        for _ in range(64):
            msg = self.receive_group_message()
            if isinstance(msg, ScoredGroup):
                burst.append(msg)
                room -= 0 if self.cfg.too_stale(self.version, msg.version) else 1
            if not self.groups.poll(0) or room <= 0:
                break
        if burst:
            self.on_groups(burst)

    def shut_down(self) -> None:
        """Record the totals, close the sockets and the metrics."""
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
