"""Tests for selector.pacing: work grants to rollout servers, without sockets, in simulated time.

``Sim`` plays the selector's loop (selector/server.py) around a :class:`Buffer` and a :class:`Pacer`: a
learner that trains ``groups_per_step`` groups per update (``Buffer.take``, oldest version first) and
needs ``step_s`` seconds per update, and rollout servers that run the protocol of rollout_server/server.py
(ask with the version their engine runs, generate what is granted at a fixed speed, deliver the groups
when the call ends, ask again; on news of a version, a waiting server asks again with it; an unanswered
request is re-sent every 2 s with the same id). A batch is served as ``Selector.try_serve`` does (held
while ``Pacer.hold`` says so). Time is simulated: every call gets ``now`` explicitly.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocol.config import Config, load_config
from protocol.messages import BatchRequest, ScoredGroup, WorkGrant, WorkRequest
from selector.buffer import Buffer, Tally, exact_quota
from selector.pacing import Pace, Pacer

REWARDS = np.array([0.0, 1.0, 1.0, 0.0], np.float32)  # never of zero variance: every group delivered is kept
ASK_AGAIN_S = 2.0  # rollout_server/server.py re-sends an unanswered request this often
POLL_S = 0.2  # the selector's loop answers waiting requests at least this often


def config(*overrides: str) -> Config:
    return load_config(None, ["rollout.group_size=4", "selector.keep=2", "selector.buffer_groups=4096", *overrides])


def request(sid: str, rid: int, version: int = 0, prompts: int = 4, session: int = 1) -> WorkRequest:
    return WorkRequest(server_id=sid, session=session, request_id=rid, version=version, prompts=prompts)


def route(sid: str) -> list[bytes]:
    return [sid.encode()]


def granted(out: list[tuple[list[bytes], WorkGrant]]) -> dict[str, int]:
    """Prompts granted per server id in one ``grants`` answer."""
    got: dict[str, int] = {}
    for r, g in out:
        assert len(r) == 1 and r[0].decode() not in got  # one call at a time per server
        assert g.prompts >= 1
        got[r[0].decode()] = g.prompts
    return got


@dataclass
class Server:
    sid: str
    s_per_prompt: float  # seconds per prompt of its engine calls
    session: int = 1
    request_id: int = -1
    version: int = 0  # the version its engine runs (and asked with)
    busy: bool = False
    answers: bool = True  # False: it stops delivering (killed, SIGSTOPped) once its current call is granted


@dataclass
class Sim:
    cfg: Config
    speeds: list[float]
    step_s: float
    prime: bool = True  # tell the pacer the true rates up front (else it measures them from the first calls)
    tally: Tally = field(default_factory=Tally)
    now: float = 0.0
    announced: int = 0  # the learner's newest version
    pending: int | None = 0  # the version of the learner's open batch request
    trained: list[list[int]] = field(default_factory=list)  # per update: the staleness of each group
    calls: list[tuple[float, str, int, int]] = field(default_factory=list)  # (time, server, version, prompts)
    late: int = 0  # calls delivered after their lease
    polling: bool = False  # a poll of the waiting requests is due
    checks: list[Callable[[Sim], None]] = field(default_factory=list)  # run after every selector step

    def __post_init__(self) -> None:
        self.pool = Buffer(self.cfg, np.random.default_rng(0), self.tally)
        self.pacer = Pacer(self.cfg, self.tally)
        self.servers = {f"s{i}": Server(f"s{i}", s) for i, s in enumerate(self.speeds)}
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = itertools.count()
        self.gid = itertools.count()
        if self.prime:
            self.pacer.step_s = self.step_s
        for sid in self.servers:
            self.ask(sid)
            if self.prime:
                self.pacer.servers[sid].s_per_prompt = self.servers[sid].s_per_prompt

    def at(self, t: float, kind: str, data: Any = None) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, data))

    def ask(self, sid: str, again: bool = False) -> None:
        s = self.servers[sid]
        if not again:
            s.request_id += 1
            s.version = self.announced  # weights are swapped before a request, never during a call
        self.pacer.request(
            route(sid), request(sid, s.request_id, s.version, self.cfg.rollout.prompts_per_call, s.session), self.now
        )
        self.at(self.now + ASK_AGAIN_S, "ask_again", (sid, s.request_id))

    def step(self) -> None:
        """One pass of the selector's loop: serve the learner, answer waiting requests."""
        per = self.cfg.learner.groups_per_step
        if self.pending is not None:  # as Selector.try_serve: a batch may wait for leases whose last chance it is
            hold = self.pacer.hold(self.pending, self.now) if self.pool.fresh(self.pending) >= per else 0.0
            if hold > 0:
                self.at(self.now + hold, "poll")
            take = (
                None
                if hold > 0
                else self.pool.take(BatchRequest(request_id=self.pending, version=self.pending, num_groups=per))
            )
            if take is not None:
                self.pool.trained(take)
                self.pacer.batch_served(self.pending, [(g.version, g.server_id) for g in take], self.now)
                self.trained.append([self.pending - g.version for g in take])
                self.at(self.now + self.step_s, "announce", self.pending + 1)
                self.pending = None
        for r, grant in self.pacer.grants(self.now, self.announced, self.pool):
            sid = r[0].decode()
            s = self.servers[sid]
            assert not s.busy, "a grant for a request already answered"
            assert grant.group_size == self.cfg.rollout.group_size and grant.prompts >= 1
            s.busy = True
            self.calls.append((self.now, sid, s.version, grant.prompts))
            if s.answers:
                self.at(
                    self.now + grant.prompts * s.s_per_prompt,
                    "deliver",
                    (sid, s.version, grant.prompts, self.now + grant.lease_s),
                )
        for check in self.checks:
            check(self)

    def run(self, steps: int, limit_s: float) -> None:
        """Until the learner has made ``steps`` updates, or ``limit_s`` simulated seconds pass."""
        self.step()
        while self.announced < steps and self.events and self.now <= limit_s:
            self.now, _, kind, data = heapq.heappop(self.events)
            if kind == "announce":
                assert isinstance(data, int)
                self.announced = self.pending = data
                for sid, s in self.servers.items():
                    if not s.busy:  # news wakes a waiting server: it asks again with the new version
                        self.ask(sid)
            elif kind == "deliver":
                sid, version, n, lease_ends = data
                self.late += self.now > lease_ends
                groups = [
                    ScoredGroup(
                        server_id=sid,
                        session=self.servers[sid].session,
                        group_id=next(self.gid),
                        version=version,
                        task="copy",
                        gen_seconds=0.0,
                        prompt_ids=np.array([1], np.int32),
                        completion_ids=np.arange(4, 8, dtype=np.int32),
                        completion_lens=np.ones(4, np.int32),
                        logprobs=np.zeros(4, np.float32),
                        rewards=REWARDS,
                    )
                    for _ in range(n)
                ]
                self.pool.admit(groups, self.announced)
                for _ in groups:
                    self.pacer.received(sid, self.now)
                self.servers[sid].busy = False
                self.ask(sid)
            elif kind == "ask_again":
                sid, rid = data
                s = self.servers[sid]
                if not s.busy and s.request_id == rid:
                    self.ask(sid, again=True)
            elif kind == "poll" and data == "grants":
                self.polling = False
            if self.pacer.queue and not self.polling:
                self.polling = True
                self.at(self.now + POLL_S, "poll", "grants")
            self.step()


def speeds(n: int) -> st.SearchStrategy[list[float]]:
    """Seconds per prompt, as multiples of the learner's seconds per update."""
    return st.lists(st.sampled_from([0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 3.0]), min_size=1, max_size=n)


# --------------------------------------------------------------------------------------------------
# The bound: what is granted is trained within K
# --------------------------------------------------------------------------------------------------


def run_bounded(k: int, per: int, ppc: int, fractions: list[float], step_s: float, told: bool) -> Sim:
    cfg = config(
        f"max_staleness={k}", f"learner.groups_per_step={per}", f"rollout.prompts_per_call={ppc}", "selector.lease_s=60"
    )  # > any call here: every server delivers within its lease
    sim = Sim(cfg, [f * step_s for f in fractions], step_s, prime=told)

    def bounded(sim: Sim) -> None:
        assert sim.tally.totals["staleness/dropped"] == 0, (sim.now, sim.calls[-6:], sim.trained[-3:])

    sim.checks.append(bounded)
    sim.run(steps=12, limit_s=100 * step_s)
    assert sim.late == 0 and sim.tally.totals["pacing/leases_expired"] == 0
    assert all(0 <= s <= k for update in sim.trained for s in update), sim.trained
    assert all(len(update) == per for update in sim.trained)
    return sim


@settings(max_examples=60, deadline=None, database=None)
@given(st.integers(0, 4), st.integers(1, 6), st.integers(1, 6), speeds(4), st.sampled_from([0.1, 1.0, 2.0]))
@example(k=3, per=1, ppc=2, fractions=[0.01, 1.5], step_s=1.0)  # a newer call overtakes an outstanding older one
def test_what_is_granted_is_trained_within_k(k: int, per: int, ppc: int, fractions: list[float], step_s: float) -> None:
    """Bounded mode, with the rates the pacer was told (it knows the servers' and the learner's speeds from
    the start, and they keep them): rollout servers of any speed (a prompt may take longer than an update)
    deliver every call within its lease; no group is dropped as stale, every trained group has staleness
    0..K: what the pacer grants is trained within the bound, however the calls overtake one another."""
    run_bounded(k, per, ppc, fractions, step_s, told=True)


@settings(max_examples=60, deadline=None, database=None)
@given(st.integers(0, 4), st.integers(1, 6), st.integers(1, 6), speeds(4), st.sampled_from([0.1, 1.0, 2.0]))
@example(k=1, per=1, ppc=1, fractions=[0.01, 1.5], step_s=1.0)  # the same before the first step is measured
def test_what_is_granted_is_trained_within_k_before_any_rate_is_measured(
    k: int, per: int, ppc: int, fractions: list[float], step_s: float
) -> None:
    """The same from a cold start: the pacer measures the rates from the first calls and batches. The
    capacity rule alone (no rates) can keep the bound while every call is delivered within its lease."""
    run_bounded(k, per, ppc, fractions, step_s, told=False)


@settings(max_examples=60, deadline=None, database=None)
@given(st.integers(0, 4), st.integers(1, 6), st.integers(1, 6), speeds(3), st.sampled_from(["bounded", "exact"]))
@example(k=0, per=1, ppc=2, fractions=[0.01], mode="bounded")  # a call larger than (K + 1) x G
@example(k=0, per=3, ppc=2, fractions=[0.01], mode="bounded")  # 2 + 2 > 3: the last group is never granted
def test_the_learner_is_never_starved_for_good(k: int, per: int, ppc: int, fractions: list[float], mode: str) -> None:
    """Live rollout servers always get work the learner can train: it keeps making updates."""
    cfg = config(
        f"max_staleness={k}",
        f"learner.groups_per_step={per}",
        f"rollout.prompts_per_call={ppc}",
        f"run.staleness_mode={mode}",
    )
    sim = Sim(cfg, fractions, 1.0)
    sim.run(steps=10, limit_s=400.0)
    assert sim.announced == 10, (
        sim.now,
        sim.calls[-6:],
        len(sim.pool),
        sim.pacer.outstanding(),
        [(s, p.waiting) for s, p in sim.pacer.servers.items()],
    )


@settings(max_examples=60, deadline=None, database=None)
@given(st.integers(0, 3), st.integers(1, 5), st.integers(1, 5), speeds(3))
def test_exact_mode_grants_no_more_than_each_version_trains(k: int, per: int, ppc: int, fractions: list[float]) -> None:
    """Exact mode: what is granted of a version, plus what is buffered or trained of it, never exceeds
    exact_quota; every update V trains version max(0, V - K) only; nothing is dropped."""
    cfg = config(
        f"max_staleness={k}",
        f"learner.groups_per_step={per}",
        f"rollout.prompts_per_call={ppc}",
        "run.staleness_mode=exact",
    )
    sim = Sim(cfg, fractions, 1.0)

    def within_quota(sim: Sim) -> None:
        counted = {
            v: sum(update - s == v for update, ss in enumerate(sim.trained) for s in ss)
            for v in range(sim.announced + 1)
        }
        for v in range(sim.announced + 1):
            done = counted[v] + sim.pool.count_version(v) + sim.pacer.outstanding(v)
            assert done <= exact_quota(cfg, v), (v, done, sim.calls)
        given_out: dict[int, int] = {}
        for _, _, v, n in sim.calls:
            given_out[v] = given_out.get(v, 0) + n
        assert all(n <= exact_quota(cfg, v) for v, n in given_out.items()), given_out

    sim.checks.append(within_quota)
    sim.run(steps=8, limit_s=400.0)
    assert sim.tally.totals["staleness/dropped"] == 0 and sim.tally.totals["staleness/exact_surplus"] == 0
    assert all(update == [min(v, k)] * per for v, update in enumerate(sim.trained)), sim.trained


def test_exact_mode_grants_a_versions_last_groups_as_a_partial_call() -> None:
    cfg = config("max_staleness=1", "learner.groups_per_step=3", "run.staleness_mode=exact")
    tally = Tally()
    pool, pacer = Buffer(cfg, np.random.default_rng(0), tally), Pacer(cfg, tally)
    assert exact_quota(cfg, 0) == 6 and exact_quota(cfg, 1) == 3
    pacer.request(route("a"), request("a", 0, prompts=4), 0.0)
    pacer.request(route("b"), request("b", 0, prompts=4), 0.0)
    assert granted(pacer.grants(0.0, 0, pool)) == {"a": 4, "b": 2}  # version 0 owes 6 groups: 4 + the last 2
    pacer.request(route("a"), request("a", 1, prompts=4), 0.1)
    assert pacer.grants(0.1, 0, pool) == []  # nothing of version 0 is left to grant
    assert pacer.capacity(0, 0, pool) == 0 and pacer.outstanding(0) == 6
    pacer.request(route("a"), request("a", 2, version=1, prompts=4), 0.2)  # the same server, new weights
    assert granted(pacer.grants(0.2, 1, pool)) == {"a": 3}  # version 1 owes one batch
    pacer.request(route("b"), request("b", 1, version=1, prompts=4), 0.3)
    assert pacer.grants(0.3, 1, pool) == [] and pacer.capacity(1, 1, pool) == 0


# --------------------------------------------------------------------------------------------------
# Leases: a server that stops answering loses its grant; a dead or restarted one its leases
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("measured", [None, 2.0])
def test_a_server_that_stops_answering_loses_its_grant(measured: float | None) -> None:
    k, per = 0, 4
    cfg = config(f"max_staleness={k}", f"learner.groups_per_step={per}", "selector.lease_s=5")
    tally = Tally()
    pool, pacer = Buffer(cfg, np.random.default_rng(0), tally), Pacer(cfg, tally)
    pacer.request(route("a"), request("a", 0, prompts=4), 0.0)
    pacer.servers["a"].s_per_prompt = measured
    pacer.step_s = 100.0  # sizing leaves the call whole
    out = pacer.grants(0.0, 0, pool)
    assert granted(out) == {"a": 4}
    lease_s = out[0][1].lease_s
    assert lease_s == max(5.0, 4 * 4 * (measured or 0.0))  # 5 s, or 4 x the expected 8 s
    pacer.request(route("b"), request("b", 0, prompts=4), 1.0)
    assert pacer.grants(1.0, 0, pool) == [] and pacer.outstanding() == 4  # K = 0: the window is a's
    assert pacer.grants(lease_s - 0.01, 0, pool) == [] and pacer.outstanding() == 4
    assert tally.totals["pacing/leases_expired"] == 0
    out = pacer.grants(lease_s, 0, pool)  # a delivered nothing within its lease: its capacity goes to b
    assert tally.totals["pacing/leases_expired"] == tally.totals["pacing/leases_expired/a"] == 1
    assert granted(out) == {"b": 4} and pacer.outstanding() == 4
    pacer.received("a", lease_s + 1)  # a late group fills no lease (the staleness gate still applies)
    assert tally.totals["pacing/unleased"] == 1 and pacer.outstanding() == 4


def test_a_stopped_server_in_a_simulation_loses_its_capacity_to_the_others() -> None:
    cfg = config("max_staleness=0", "learner.groups_per_step=4", "rollout.prompts_per_call=4", "selector.lease_s=5")
    sim = Sim(cfg, [0.1, 0.1], 1.0)
    sim.servers["s0"].answers = False  # granted once, then silent forever
    sim.run(steps=6, limit_s=100.0)
    assert sim.announced == 6  # s1 alone feeds the learner once s0's lease ends
    assert sim.tally.totals["pacing/leases_expired/s0"] == 1 and sim.tally.totals["pacing/leases_expired/s1"] == 0
    assert [c[1] for c in sim.calls].count("s0") == 1 and sim.calls[0][1] == "s0"
    assert 5.0 <= sim.calls[1][0] <= 5.0 + POLL_S  # K = 0: s0's call held the whole window until its lease ended


def test_forget_drops_the_leases_and_the_waiting_request() -> None:
    cfg = config("max_staleness=0", "learner.groups_per_step=4")
    tally = Tally()
    pool, pacer = Buffer(cfg, np.random.default_rng(0), tally), Pacer(cfg, tally)
    pacer.request(route("a"), request("a", 0), 0.0)
    assert granted(pacer.grants(0.0, 0, pool)) == {"a": 4}
    pacer.request(route("a"), request("a", 1), 0.5)  # a asks for its next call while the first runs
    pacer.request(route("b"), request("b", 0), 0.5)
    assert pacer.grants(0.5, 0, pool) == [] and list(pacer.queue) == ["a", "b"]
    pacer.forget("a")
    assert pacer.outstanding() == 0 and "a" not in pacer.servers and list(pacer.queue) == ["b"]
    assert tally.totals["pacing/leases_expired"] == tally.totals["pacing/leases_expired/a"] == 1
    assert granted(pacer.grants(0.6, 0, pool)) == {"b": 4}  # a's capacity and turn go to b
    pacer.forget("nobody")  # unknown: nothing happens
    pacer.received("a", 1.0)
    assert tally.totals["pacing/unleased"] == 1 and pacer.outstanding() == 4


def test_a_restarted_server_drops_its_old_leases() -> None:
    cfg = config("max_staleness=0", "learner.groups_per_step=4")
    tally = Tally()
    pool, pacer = Buffer(cfg, np.random.default_rng(0), tally), Pacer(cfg, tally)
    pacer.request(route("a"), request("a", 7, session=1), 0.0)
    assert granted(pacer.grants(0.0, 0, pool)) == {"a": 4} and pacer.outstanding() == 4
    pacer.request(route("a"), request("a", 0, session=2), 1.0)  # a new process: its request ids start again
    assert pacer.outstanding() == 0
    assert tally.totals["pacing/leases_restarted"] == tally.totals["pacing/leases_restarted/a"] == 1
    assert granted(pacer.grants(1.0, 0, pool)) == {"a": 4}  # request 0 of the new session is no repeat


class CountedLeases(deque):
    """A server's lease queue that counts the passes over it."""

    passes = 0

    def __iter__(self) -> Any:
        CountedLeases.passes += 1
        return super().__iter__()


def test_a_pass_over_many_waiting_servers_counts_the_pipeline_once() -> None:
    """One ``grants`` pass over S waiting servers reads every lease queue a bounded number of times, not once
    per waiting request: counted per request, the pipeline (fresh, outstanding, oldest lease) made a pass
    O(S x leases), 40% of the selector's CPU with 1,000 servers (bench/fleet.py). The pass still grants exactly
    what the window leaves, in arrival order."""
    servers, k, per_step = 300, 4, 64
    cfg = config(f"max_staleness={k}", f"learner.groups_per_step={per_step}")
    tally = Tally()
    pool, pacer = Buffer(cfg, np.random.default_rng(0), tally), Pacer(cfg, tally)
    names = [f"s{i:03d}" for i in range(servers)]
    for sid in names:
        pacer.request(route(sid), request(sid, 0, prompts=1), 0.0)
    assert len(pacer.grants(0.0, 0, pool)) == servers and pacer.outstanding() == servers
    for sid in names:
        pacer.servers[sid].leases = CountedLeases(pacer.servers[sid].leases)
        pacer.request(route(sid), request(sid, 1), 0.1)
    CountedLeases.passes = 0
    got = granted(pacer.grants(0.1, 0, pool))
    assert CountedLeases.passes <= 3 * servers, CountedLeases.passes
    room = pacer.window(0, 0) - servers  # 5 x 64 - 300 = 20 groups: five calls of 4, to the first five asking
    assert got == {sid: 4 for sid in names[: room // 4]}
    assert pacer.outstanding() == pacer.window(0, 0) and list(pacer.queue) == names[room // 4 :]


# --------------------------------------------------------------------------------------------------
# Requests: answered once, in arrival order, sized to the server
# --------------------------------------------------------------------------------------------------


def test_a_repeated_request_is_not_granted_twice() -> None:
    cfg = config("max_staleness=4", "learner.groups_per_step=8")
    tally = Tally()
    pool, pacer = Buffer(cfg, np.random.default_rng(0), tally), Pacer(cfg, tally)
    pacer.request(route("a"), request("a", 3), 0.0)
    pacer.request(route("a"), request("a", 3), 0.1)  # re-sent while waiting: still one request
    assert granted(pacer.grants(0.2, 0, pool)) == {"a": 4} and pacer.outstanding() == 4
    for rid in (3, 2):  # re-sent after the grant (it crossed the grant), or older still
        pacer.request(route("a"), request("a", rid), 0.3)
        assert pacer.grants(0.3, 0, pool) == [] and pacer.outstanding() == 4
    assert tally.totals["pacing/repeated_requests"] == 2 and tally.totals["pacing/granted"] == 4
    pacer.request(route("a"), request("a", 4), 0.4)
    assert granted(pacer.grants(0.4, 0, pool)) == {"a": 4} and pacer.outstanding() == 8


@settings(max_examples=60, deadline=None, database=None)
@given(
    st.integers(1, 4),
    st.integers(1, 6).flatmap(lambda per: st.tuples(st.just(per), st.integers(1, per))),
    st.lists(st.sampled_from(["a", "b", "a again", "b again"]), min_size=0, max_size=4),
    st.sampled_from([0.05, 0.3, 1.0]),
)
@example(k=1, sizes=(3, 2), order=[], s_per_prompt=1.0)  # a server that asks as a batch leaves gets smaller calls
def test_grants_are_fair_to_within_one_call(
    k: int, sizes: tuple[int, int], order: list[str], s_per_prompt: float
) -> None:
    """Two servers of one speed that ask again and again: the calls granted to each differ by at most
    one at every point, whoever asks first and however often a request is re-sent. (Calls, not prompts:
    a request made with weights one version behind is sized smaller on purpose, see ``Pacer.size``.)"""
    per, ppc = sizes
    cfg = config(f"max_staleness={k}", f"learner.groups_per_step={per}", f"rollout.prompts_per_call={ppc}")
    sim = Sim(cfg, [s_per_prompt, s_per_prompt], 1.0)
    for what in order:  # re-sent requests, before the first answer
        sid = "s0" if what.startswith("a") else "s1"
        sim.ask(sid, again=what.endswith("again"))

    def fair(sim: Sim) -> None:
        calls = Counter(sid for _, sid, _, _ in sim.calls)
        assert abs(calls["s0"] - calls["s1"]) <= 1, sim.calls

    sim.checks.append(fair)
    sim.run(steps=10, limit_s=200.0)
    assert sim.announced == 10


def test_a_slow_server_gets_smaller_calls_but_at_least_one_prompt() -> None:
    """Speeds measured from completed leases size the next calls to what arrives within the bound."""
    k, per = 1, 8
    cfg = config(
        f"max_staleness={k}", f"learner.groups_per_step={per}", "rollout.prompts_per_call=8", "selector.lease_s=100"
    )
    tally = Tally()
    pool, pacer = Buffer(cfg, np.random.default_rng(0), tally), Pacer(cfg, tally)
    now = 0.0
    for i in range(3):  # the learner: an update per second
        pacer.batch_served(i - 3, [], now)
        now += 1.0
    step_s = pacer.step_s
    assert step_s is not None and step_s == pytest.approx(1.0)
    pacer.served = -1  # (those were only to measure the step)
    for sid, s_per_prompt in (("fast", 0.01), ("slow", 0.5), ("slower", 30.0)):  # one call each, measured
        pacer.request(route(sid), request(sid, 0, prompts=1), now)
        assert granted(pacer.grants(now, 0, pool)) == {sid: 1}  # unmeasured: what it asked for
        pacer.received(sid, now + s_per_prompt)
        assert pacer.servers[sid].s_per_prompt == pytest.approx(s_per_prompt)
    sizes = {}
    for sid in ("fast", "slow", "slower"):
        pacer.request(route(sid), request(sid, 1, prompts=8), now)
        sizes.update(granted(pacer.grants(now, 0, pool)))
    slack = k + 1  # the next request is for version 0, as is each server
    assert sizes == {"fast": 8, "slow": math.floor(slack * 1.0 / 0.5), "slower": 1}
    for sid, n in sizes.items():  # each call arrives before its version ages out, or is one prompt
        measured = pacer.servers[sid].s_per_prompt
        assert measured is not None and (n == 1 or n * measured <= slack * step_s)
    # a server one version behind has less slack: a smaller call
    pacer.request(route("slow"), request("slow", 2, version=0, prompts=8), now)
    assert pacer.size(pacer.servers["slow"], request("slow", 2, version=0, prompts=8), 1) == 2
    assert pacer.size(pacer.servers["slow"], request("slow", 2, version=1, prompts=8), 1) == 4


@settings(max_examples=60, deadline=None, database=None)
@given(st.integers(0, 4), st.integers(0, 4), st.integers(1, 64), st.floats(0.001, 100), st.floats(0.01, 100))
def test_size_is_at_least_one_and_at_most_asked_and_fits_the_slack(
    k: int, behind: int, asked: int, s_per_prompt: float, step_s: float
) -> None:
    cfg = config(f"max_staleness={k}")
    pacer = Pacer(cfg, Tally())
    pacer.request(route("a"), request("a", 0, version=10, prompts=asked), 0.0)
    pace = pacer.servers["a"]
    req = request("a", 0, version=10, prompts=asked)
    assert pacer.size(pace, req, 10 + behind) == asked  # nothing measured yet
    pace.s_per_prompt, pacer.step_s = s_per_prompt, step_s
    n = pacer.size(pace, req, 10 + behind)
    assert 1 <= n <= asked
    slack = k + 1 - behind
    assert n == 1 or n * s_per_prompt <= slack * step_s * (1 + 1e-9)
    assert n == asked or (n + 1) * s_per_prompt > slack * step_s * (1 - 1e-9)  # no smaller than it must be
    assert pacer.size(Pace(1, s_per_prompt=s_per_prompt * 2), req, 10 + behind) <= n  # slower: no larger


# --------------------------------------------------------------------------------------------------
# Surplus: rollout.surplus = "grow_n"
# --------------------------------------------------------------------------------------------------


def test_grow_n_raises_the_group_size_while_servers_wait_and_lowers_it_while_the_learner_waits() -> None:
    cfg = config(
        "max_staleness=1",
        "learner.groups_per_step=4",
        "rollout.surplus=grow_n",
        "rollout.max_group_size=12",
        "rollout.prompts_per_call=2",
    )
    assert cfg.max_group_size == 12
    tally = Tally()
    pool, pacer = Buffer(cfg, np.random.default_rng(0), tally), Pacer(cfg, tally)
    pacer.step_s = 1.0
    now, sizes = 0.0, []
    for rid in range(12):  # a server whose calls take 0.2 s and that then waits 1 s for each grant
        pacer.request(route("a"), request("a", rid, prompts=2), now)
        now += 1.0
        ((_, grant),) = pacer.grants(now, 0, pool)
        sizes.append(grant.group_size)
        for _ in range(grant.prompts):
            pacer.received("a", now + 0.2 * grant.group_size / 4)
        now += 0.2 * grant.group_size / 4
    assert sizes[0] == 4 and sizes == sorted(sizes) and sizes[-1] == 12, sizes  # grows, to the cap, never past it
    assert all(b <= round(a * 1.25) for a, b in itertools.pairwise(sizes)), sizes  # by at most 25% a grant
    grow = pacer.grow
    pacer.batch_served(0, [], now, waited_s=0.5)  # the learner waited for its batch: generation is short
    assert pacer.grow == pytest.approx(grow * 0.8)
    pacer.batch_served(1, [], now + 1.0, waited_s=0.0)
    assert pacer.grow == pytest.approx(grow * 0.8)


def test_without_grow_n_the_group_size_never_changes() -> None:
    cfg = config("max_staleness=1", "learner.groups_per_step=4", "rollout.prompts_per_call=2")
    assert cfg.max_group_size == cfg.rollout.group_size == 4
    tally = Tally()
    pool, pacer = Buffer(cfg, np.random.default_rng(0), tally), Pacer(cfg, tally)
    for rid in range(4):
        pacer.request(route("a"), request("a", rid, prompts=2), 10.0 * rid)
        ((_, grant),) = pacer.grants(10.0 * rid + 5.0, 0, pool)
        assert grant.group_size == 4
        pacer.received("a", 10.0 * rid + 5.1)
        pacer.received("a", 10.0 * rid + 5.1)
