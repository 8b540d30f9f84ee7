"""Pacing, without sockets: rollout servers generate only what can be trained within the bound.

With ``rollout.pacing = "credits"`` a rollout server sends a ``WorkRequest`` (the version its engine
runs, the prompts it wants) before each engine call and generates only what the selector grants
(``WorkGrant``: prompts, group size, a lease). The selector answers from :class:`Pacer`:

- **Capacity.** Batches take groups oldest version first (``selector/buffer.py``), ``G =
  learner.groups_per_step`` per update, and the next batch is for request version ``R``. A group of
  version ``v`` that has ``p`` groups ahead of it (buffered or granted and not yet delivered) is trained
  by request ``R + p // G`` at the latest, so it is within the bound when ``p < (K + 1 - (R - v)) * G``.
  A request for version ``v`` is granted only while ``buffered + outstanding + n`` stays within that
  for ``v`` and for the oldest version still outstanding, which later grants may overtake
  (``capacity``); when nothing is outstanding and a whole call does not fit, a smaller one is granted,
  so the learner never waits for good. In exact mode each version has a quota instead (``exact_quota``: the
  groups updates
  will train of it), less what is buffered, outstanding or already trained of it.
- **Sizing.** Each server's seconds per prompt are measured from its leases (grant to last group,
  an exponential average), the learner's seconds per update from the batches served. A call of ``n``
  prompts must arrive before its version ages out: ``n <= (K + 1 - (R - v)) * step_s / s_per_prompt``,
  so a slow server gets smaller calls (at least one prompt), a fast one up to what it asked for. A server
  that joins, restarts or changes speed is re-sized from its next completed lease.
- **Fairness.** Waiting requests are answered in arrival order, one call at a time per server; the
  first that does not fit blocks the ones behind it (bounded mode), so no server is starved by faster
  ones asking more often. Exact mode answers each version's requests from its own quota.
- **Deadlines.** A batch waits, briefly, for the open leases whose last chance it is (``hold``):
  a group of version ``v`` can be trained until request ``v + K``, and a batch cut without it orphans it.
  The wait is at most ``selector.max_hold_steps`` x the learner's step time per batch, so a slow server
  costs the learner a bounded delay instead of losing its work (``pacing/holds``, ``pacing/hold_s``).
- **Leases.** A grant must be delivered within ``max(selector.lease_s, 4 x expected call time)``;
  then it expires (``pacing/leases_expired``) and its capacity goes to others, so a server that stops
  answering (killed, SIGSTOPped, cut off) holds nothing for long. Its groups, if they still come, pass
  the staleness gate like any other: pacing saves work, the gate keeps the bound.

- **Surplus** (``rollout.surplus = "grow_n"``). While servers wait for work and the learner does not
  wait for batches, generation is cheap: grants raise the group size n (up to
  ``rollout.max_group_size``) so PODS picks its m from more candidates. The factor grows with the
  servers' waiting (by at most 25% a grant) and shrinks by 20% whenever the learner waited for a batch.

Counters (``Tally``): ``pacing/requests``, ``pacing/granted`` (prompts) and ``pacing/granted/<server>``,
``pacing/leases_expired[/<server>]``, ``pacing/unleased`` (groups that arrived with no open lease).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from protocol.config import Config
from protocol.messages import WorkGrant, WorkRequest
from selector.buffer import Buffer, Tally, exact_quota

EMA = 0.3  # weight of the newest measurement in the speed averages


@dataclass
class Lease:
    request_id: int
    version: int
    prompts: int
    left: int  # groups not yet delivered
    granted_at: float
    expires_at: float
    group_size: int = 0  # n of each group (rollout.surplus = "grow_n" may raise it)


@dataclass
class Waiting:
    route: list[bytes]
    req: WorkRequest
    since: float


@dataclass
class Pace:
    """What the pacer knows of one rollout server process."""

    session: int
    leases: deque[Lease] = field(default_factory=deque)
    waiting: Waiting | None = None
    last_granted: int = -1  # request id: a re-sent request already granted is not granted twice
    s_per_prompt: float | None = None  # measured from completed leases, at rollout.group_size completions a prompt


@dataclass
class Pipeline:
    """Bounded mode: groups buffered and fresh for the next request, granted and not delivered, and the
    oldest version with an open lease (None: none)."""

    fresh: int
    outstanding: int
    oldest: int | None


@dataclass
class Pacer:
    cfg: Config
    tally: Tally
    servers: dict[str, Pace] = field(default_factory=dict)
    queue: deque[str] = field(default_factory=deque)  # servers with a waiting request, in arrival order
    step_s: float | None = None  # the learner's seconds per update, measured between batches served (holds excluded)
    last_batch_at: float | None = None
    held_s: float = 0.0  # how long the batch being prepared was held for late leases
    hold_since: tuple[int, float] | None = None  # (request version, since when) of the hold in progress
    served: int = -1  # the newest request version served
    trained_versions: dict[int, int] = field(default_factory=dict)  # exact mode: groups trained per version
    grow: float = 1.0  # rollout.surplus = "grow_n": group size / rollout.group_size

    @property
    def enabled(self) -> bool:
        return self.cfg.rollout.pacing == "credits"

    def next_request(self, announced: int) -> int:
        """The version of the next batch request: the announced one, or the one after a batch just served."""
        return max(announced, self.served + 1)

    # -- events ------------------------------------------------------------------------------------
    def request(self, route: list[bytes], req: WorkRequest, now: float) -> None:
        """Hold ``req`` until :meth:`grants` can answer it; a newer request of a server replaces its older one."""
        self.tally.add("pacing/requests")
        pace = self.servers.get(req.server_id)
        if pace is None or pace.session != req.session:  # new, or a restarted process: its old leases die with it
            if pace is not None:
                self._drop_leases(req.server_id, pace, "pacing/leases_restarted")
            pace = self.servers[req.server_id] = Pace(req.session)
        if req.request_id <= pace.last_granted:
            self.tally.add("pacing/repeated_requests")
            return
        if pace.waiting is None:
            self.queue.append(req.server_id)
        pace.waiting = Waiting(route, req, now if pace.waiting is None else pace.waiting.since)

    def received(self, server_id: str, now: float) -> None:
        """A group of ``server_id`` arrived: it fills that server's oldest open lease."""
        pace = self.servers.get(server_id)
        if pace is None or not pace.leases:
            self.tally.add("pacing/unleased")
            return
        lease = pace.leases[0]
        lease.left -= 1
        if lease.left <= 0:
            pace.leases.popleft()
            s = (now - lease.granted_at) / lease.prompts * self.cfg.rollout.group_size / lease.group_size
            pace.s_per_prompt = s if pace.s_per_prompt is None else (1 - EMA) * pace.s_per_prompt + EMA * s

    def leased(self, server_id: str) -> bool:
        """Whether ``server_id`` holds an open lease: its next group was granted, not volunteered."""
        pace = self.servers.get(server_id)
        return pace is not None and bool(pace.leases)

    def batch_served(self, version: int, groups: list[tuple[int, str]], now: float, waited_s: float = 0.0) -> None:
        """A batch for request ``version`` left, of ``groups`` as (version, server id) pairs; the learner's
        request waited ``waited_s`` for it (holds excluded)."""
        if self.growing and self.step_s and waited_s > 0.1 * self.step_s:  # the learner waits: no surplus
            self.grow = max(1.0, self.grow * 0.8)
        if self.last_batch_at is not None:
            dt = max(0.0, now - self.last_batch_at - self.held_s)  # the pace the learner sets, not the holds
            self.step_s = dt if self.step_s is None else (1 - EMA) * self.step_s + EMA * dt
        self.last_batch_at, self.held_s, self.hold_since = now, 0.0, None
        self.served = max(self.served, version)
        if self.cfg.run.staleness_mode == "exact":
            for v, _ in groups:
                self.trained_versions[v] = self.trained_versions.get(v, 0) + 1
            for v in [v for v in self.trained_versions if v < version - self.cfg.max_staleness]:
                del self.trained_versions[v]  # no later request trains these versions

    def forget(self, server_id: str) -> None:
        """A dead server: its leases and its waiting request go."""
        pace = self.servers.pop(server_id, None)
        if pace is not None:
            self._drop_leases(server_id, pace, "pacing/leases_expired")
            if server_id in self.queue:
                self.queue.remove(server_id)

    def expire(self, now: float) -> None:
        for sid, pace in self.servers.items():
            while pace.leases and pace.leases[0].expires_at <= now:
                pace.leases.popleft()
                self.tally.add("pacing/leases_expired")
                self.tally.add(f"pacing/leases_expired/{sid}")

    def _drop_leases(self, server_id: str, pace: Pace, key: str) -> None:
        if pace.leases:
            self.tally.add(key, len(pace.leases))
            self.tally.add(f"{key}/{server_id}", len(pace.leases))
            pace.leases.clear()

    # -- decisions ---------------------------------------------------------------------------------
    def outstanding(self, version: int | None = None) -> int:
        """Groups granted and not yet delivered (of ``version`` only, when given)."""
        return sum(
            lease.left
            for p in self.servers.values()
            for lease in p.leases
            if version is None or lease.version == version
        )

    def capacity(self, version: int, request_version: int, buffer: Buffer, pipeline: Pipeline | None = None) -> int:
        """How many more groups of ``version`` can be granted now and still be trained within the bound.
        ``pipeline``: the totals :meth:`grants` keeps for its whole pass (else counted here)."""
        k = self.cfg.max_staleness
        if self.cfg.run.staleness_mode == "exact":
            last_use = k if version == 0 else version + k  # the last request that trains this version
            if last_use < request_version:
                return 0
            done = self.trained_versions.get(version, 0) + buffer.count_version(version) + self.outstanding(version)
            return exact_quota(self.cfg, version) - done
        p = pipeline or self.pipeline(request_version, buffer)
        # A buffered group goes before newer ones (oldest first), but a granted one not yet here may arrive
        # after everything granted since: what is granted now must leave room for the oldest of those.
        oldest = version if p.oldest is None else min(version, p.oldest)
        return self.window(oldest, request_version) - p.fresh - p.outstanding

    def pipeline(self, request_version: int, buffer: Buffer) -> Pipeline:
        """What bounded mode's capacity subtracts, counted once: O(leases + buffer)."""
        versions = [lease.version for p in self.servers.values() for lease in p.leases]
        return Pipeline(buffer.fresh(request_version), self.outstanding(), min(versions, default=None))

    def window(self, version: int, request_version: int) -> int:
        """Bounded mode: the groups of ``version`` an empty pipeline could take and still train within K."""
        return (self.cfg.max_staleness + 1 - (request_version - version)) * self.cfg.learner.groups_per_step

    def size(self, pace: Pace, req: WorkRequest, request_version: int) -> int:
        """The prompts of one call for this server: what it asks, cut to what arrives within the bound."""
        n = req.prompts
        per = self.s_per_prompt(pace)
        if self.step_s is not None and per:
            slack = self.cfg.max_staleness + 1 - (request_version - req.version)
            fit = math.floor(slack * self.step_s / per)
            n = max(1, min(n, fit))
        return n

    def s_per_prompt(self, pace: Pace) -> float | None:
        """A server's expected seconds per prompt at the group size granted now (time grows with n)."""
        if pace.s_per_prompt is None or pace.s_per_prompt <= 0:
            return None
        return pace.s_per_prompt * self.group_size() / self.cfg.rollout.group_size

    @property
    def growing(self) -> bool:
        return self.enabled and self.cfg.rollout.surplus == "grow_n"

    def group_size(self) -> int:
        """n of the groups granted now: rollout.group_size, or more while generation has surplus (grow_n)."""
        base = self.cfg.rollout.group_size
        return min(self.cfg.max_group_size, round(base * self.grow)) if self.growing else base

    def _adapt(self, waited_s: float, call_s: float | None) -> None:
        """grow_n: a server that waited ``waited_s`` for a call of ``call_s`` could have sampled
        (waited + call) / call times as many completions per prompt: grow towards that, by at most 25%."""
        if call_s and waited_s > 0.5 * call_s:
            cap = self.cfg.max_group_size / self.cfg.rollout.group_size
            self.grow = min(cap, self.grow * min(1.25, (waited_s + call_s) / call_s))

    def hold(self, request_version: int, now: float) -> float:
        """Seconds the batch for ``request_version`` should still wait (0: cut it now).

        A lease of version ``R - K`` has its last chance in the batch for request ``R``: cut without it, its
        groups can only be dropped when they arrive. The batch waits for such leases while they are open,
        at most ``selector.max_hold_steps`` x the learner's step time per batch (bounded mode; exact mode
        waits for its version by construction)."""
        limit = self.cfg.selector.max_hold_steps
        if not (self.enabled and limit) or self.cfg.run.staleness_mode == "exact":
            return 0.0
        due = [
            lease.expires_at
            for p in self.servers.values()
            for lease in p.leases
            if lease.version + self.cfg.max_staleness == request_version and lease.expires_at > now
        ]
        if not due:
            return 0.0
        if self.hold_since is None or self.hold_since[0] != request_version:
            self.hold_since = (request_version, now)
            self.tally.add("pacing/holds")
        # before the first step is measured, only the leases' own expiry bounds the wait
        end = min(self.hold_since[1] + limit * (self.step_s or math.inf), min(due))
        self.held_s = max(0.0, min(now, end) - self.hold_since[1])
        return max(0.0, end - now)

    def lease_s(self, pace: Pace, prompts: int) -> float:
        expected = prompts * (self.s_per_prompt(pace) or 0.0)
        return min(3600.0, max(self.cfg.selector.lease_s, 4 * expected))

    def grants(self, now: float, announced: int, buffer: Buffer) -> list[tuple[list[bytes], WorkGrant]]:
        """Answer the waiting requests that fit now, in arrival order."""
        self.expire(now)
        out: list[tuple[list[bytes], WorkGrant]] = []
        r = self.next_request(announced)
        exact = self.cfg.run.staleness_mode == "exact"
        # counted once per pass and updated with each grant: per request they cost O(servers + buffer), and
        # with 1,000 servers waiting that was 40% of the selector's CPU (bench/fleet.py, docs/BENCHMARKS.md)
        pipe = None if exact else self.pipeline(r, buffer)
        done: set[str] = set()
        for sid in self.queue:
            pace = self.servers[sid]
            w = pace.waiting
            assert w is not None
            if w.req.version > announced:
                continue  # its announcement is still on its way to this process
            n, cap = self.size(pace, w.req, r), self.capacity(w.req.version, r, buffer, pipe)
            if exact:
                n = min(n, cap)  # a version's last groups may be fewer than a call: it must still complete
            elif cap < n:
                if cap >= 1 and not (pipe.outstanding if pipe is not None else self.outstanding()):
                    n = cap  # nothing else is on its way: a smaller call, or the learner waits for good
                elif self.window(w.req.version, r) >= n:
                    break  # it fits once the pipeline drains: the ones behind it wait their turn
            if n < 1 or cap < n:
                continue  # its version cannot be trained (any more): it asks again with newer weights
            per = self.s_per_prompt(pace)
            if self.growing:
                self._adapt(now - w.since, None if per is None else n * per)
            lease_s, size = self.lease_s(pace, n), self.group_size()
            pace.leases.append(Lease(w.req.request_id, w.req.version, n, n, now, now + lease_s, size))
            pace.waiting, pace.last_granted = None, w.req.request_id
            done.add(sid)
            if pipe is not None:
                pipe.outstanding += n
                pipe.oldest = w.req.version if pipe.oldest is None else min(pipe.oldest, w.req.version)
            self.tally.add("pacing/granted", n)
            self.tally.add(f"pacing/granted/{sid}", n)
            out.append((w.route, WorkGrant(request_id=w.req.request_id, prompts=n, group_size=size, lease_s=lease_s)))
        if done:
            self.queue = deque(sid for sid in self.queue if sid not in done)
        return out
