"""The simulated rollout servers of ``bench/fleet.py``: many light clients per process, on loopback.

A simulated server has what the selector and the learner see of a real one (``rollout_server/server.py``):
its own identity (``server_id``, a random ``session``, its own CURVE key when ``net.auth`` is on), a
DEALER on the groups link (Hello, a Heartbeat every ``rollout.heartbeat_s``, ``WorkRequest`` ->
``WorkGrant`` under ``rollout.pacing = "credits"``, then the granted ScoredGroups of the version it runs)
and a SUB on the announce link. As in the real server, any grant is work (one for an older request too), and
a server waiting for work asks again as soon as a newer version is announced (a real one: once it has
loaded it; here loading is instant). It has no engine: a call of ``p`` prompts "generates" for
``p x per_prompt_s`` (the server's speed, drawn log-uniform over ``SPREAD``) and sends pre-built 16x64-token
groups, each with its own (session, group id) header.

One process runs a block of servers on one zmq context and one epoll loop with a timer heap (heartbeats,
calls finishing, requests to re-send): never a process per server. The bench drives the processes with a PUB
(``mode``: idle = Hello and heartbeats only, work = ask, generate, send; ``report``; ``stop``) and they
answer on a PUSH.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import heapq
import logging
import os
import random
import select
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

import msgpack
import numpy as np
import zmq

from bench.common import scored_group
from protocol.auth import load_auth
from protocol.codec import encode
from protocol.config import NetConfig
from protocol.messages import (
    Heartbeat,
    Hello,
    ProtocolError,
    Refusal,
    ScoredGroup,
    WeightsAnnouncement,
    WorkGrant,
    WorkRequest,
    new_session,
)
from protocol.sockets import announce_subscriber, close, group_sender, recv

GROUP_N, GROUP_T, PROMPT_T = 16, 64, 8  # completions per group, tokens per completion, prompt tokens
PROMPTS_PER_CALL = 4
ASK_AGAIN_S = 2.0  # as rollout_server/server.py: an unanswered work request is sent again
LEVELS = np.arange(5, dtype=np.float32) / 4
HEARTBEAT, DONE, ASK = 0, 1, 2  # timer kinds


def server_name(i: int) -> str:
    return f"sim-{i:05d}"


def speed(i: int, fastest_s: float, spread: float) -> float:
    """Seconds per prompt of server ``i``: log-uniform over [fastest_s, spread x fastest_s], fixed per server."""
    return fastest_s * spread ** random.Random(i).random()


def _pool(seed: int) -> list[ScoredGroup]:
    """Pre-built groups (arrays shared by every send; the header is rebuilt per group)."""
    rng = np.random.default_rng(seed)
    return [scored_group(rng.choice(LEVELS, GROUP_N), t=GROUP_T, p=PROMPT_T, gid=32 * seed + k) for k in range(32)]


@dataclass
class Sim:
    """One simulated rollout server."""

    name: str
    per_prompt_s: float
    push: zmq.Socket
    sub: zmq.Socket
    session: int = field(default_factory=new_session)
    version: int = -1  # the newest version announced to it
    heard: dict[int, float] = field(default_factory=dict)  # version -> when it first heard it (monotonic)
    rid: int = 0  # its last work request's id
    asked_at: float = 0.0  # when that request was sent (0: none outstanding)
    asked_version: int = -1
    busy: bool = False  # a granted call is being "generated"
    gid: int = 0  # its next group id
    sent: int = 0  # groups sent
    outbox: deque[list[Any]] = field(default_factory=deque)
    granted: deque[tuple[int, float]] = field(default_factory=deque)  # (prompts, lease ends) not started yet
    refused: str = ""


class Block:
    """The servers of one process, their sockets, timers and counters.

    Readiness comes from epoll on the sockets' ZeroMQ file descriptors, so a turn costs what is ready, not the
    number of sockets (a ``zmq.Poller`` builds its list of all 500 sockets at every call). That descriptor
    only says that something changed: each socket is drained while ``zmq.EVENTS`` says POLLIN, and again
    after every send on it (a send may consume the signal); a sweep of every socket each ``SWEEP_S`` is the
    safety net."""

    SWEEP_S = 0.5

    def __init__(self, ctx: zmq.Context, net: NetConfig, first: int, count: int, opts: dict[str, Any]) -> None:
        self.net, self.opts = net, opts
        self.pool = _pool(first)
        self.sims: list[Sim] = []
        self.ep = select.epoll()
        self.fds: dict[int, tuple[zmq.Socket, int, bool]] = {}  # fd -> (socket, server index, is its groups socket)
        self.timers: list[tuple[float, int, int]] = []  # (due, kind, server index): HEARTBEAT, DONE or ASK
        self.grants: dict[int, tuple[int, int]] = {}  # server index -> (prompts, version) of the call in progress
        self.blocked: set[int] = set()  # servers whose outbox waits for room in their pipe
        self.touched: set[int] = set()  # servers that sent since their groups socket was last drained
        self.mode = "idle"
        self.counters = {"heartbeats": 0, "requests": 0, "grants": 0, "send_waits": 0, "refusals": 0}
        now = time.monotonic()
        for i in range(first, first + count):
            name = server_name(i)
            auth = load_auth(net, "rollout", name)
            push, sub = group_sender(ctx, net, auth), announce_subscriber(ctx, net, auth)
            sim = Sim(name, speed(i, opts["fastest_s"], opts["spread"]), push, sub)
            k = len(self.sims)
            self.sims.append(sim)
            for sock, is_push in ((push, True), (sub, False)):
                self.watch(sock, k, is_push)
            host = f"bench-{os.getpid()}"
            self.queue(k, Hello(server_id=name, host=host, pid=os.getpid(), engine="sim", session=sim.session))
            heapq.heappush(self.timers, (now + random.random() * opts["heartbeat_s"], HEARTBEAT, k))

    def watch(self, sock: zmq.Socket, k: int, is_push: bool) -> None:
        fd = cast(int, sock.getsockopt(zmq.FD))
        self.fds[fd] = (sock, k, is_push)
        self.ep.register(fd, select.EPOLLIN)

    def queue(self, k: int, msg: Hello | Heartbeat | ScoredGroup | WorkRequest) -> None:
        self.sims[k].outbox.append(encode(msg))
        self.flush(k)

    def flush(self, k: int) -> None:
        """Send what server ``k`` has queued while its pipe takes it (sndhwm 2, as a real server's)."""
        sim = self.sims[k]
        while sim.outbox:
            try:
                sim.push.send_multipart(sim.outbox[0], flags=zmq.NOBLOCK, copy=False)
                self.touched.add(k)
            except zmq.Again:
                if k not in self.blocked:
                    self.counters["send_waits"] += 1
                self.blocked.add(k)
                return
            sim.outbox.popleft()
        self.blocked.discard(k)

    def drain(self, sock: zmq.Socket, k: int, is_push: bool, now: float) -> None:
        """Handle every message waiting on ``sock``; refill its pipe when it has room again."""
        while cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            if is_push:
                self.on_reply(k, now)
            else:
                self.on_announcement(k, now)
        if is_push and k in self.blocked:
            self.flush(k)

    def on_reply(self, k: int, now: float) -> None:
        sim = self.sims[k]
        msg: WorkGrant | Refusal
        try:
            _, msg = recv(sim.push, (WorkGrant, Refusal), flags=zmq.NOBLOCK)
        except ProtocolError:
            return
        if isinstance(msg, Refusal):
            self.counters["refusals"] += 1
            sim.refused = f"{msg.reason}: {msg.detail}"
            return
        if msg.group_size != GROUP_N:
            raise RuntimeError(f"{sim.name}: granted groups of {msg.group_size}, the bench makes {GROUP_N}")
        # as rollout_server/server.py: any grant is work (one for an older request too: the selector leased it)
        self.counters["grants"] += 1
        if msg.request_id == sim.rid:
            sim.asked_at = 0.0
        sim.granted.append((msg.prompts, now + msg.lease_s))
        if not sim.busy:
            self.start_call(k, now)

    def start_call(self, k: int, now: float) -> bool:
        """Start the next granted call not expired (with the version the server runs now); False if none."""
        sim = self.sims[k]
        while sim.granted:
            prompts, ends = sim.granted.popleft()
            if ends > now:
                sim.busy = True
                self.grants[k] = (prompts, sim.version)
                heapq.heappush(self.timers, (now + prompts * sim.per_prompt_s, DONE, k))
                return True
        return False

    def on_announcement(self, k: int, now: float) -> None:
        sim = self.sims[k]
        try:
            _, ann = recv(sim.sub, WeightsAnnouncement, flags=zmq.NOBLOCK)
        except ProtocolError:
            return
        sim.heard.setdefault(ann.version, now)
        if ann.version > sim.version:
            sim.version = ann.version
            if sim.asked_at:  # waiting for work with older weights: a real server asks again with the new ones
                self.ask(k, now)

    def call_done(self, k: int, now: float) -> None:
        sim = self.sims[k]
        prompts, version = self.grants.pop(k)
        for _ in range(prompts):
            g = dataclasses.replace(
                self.pool[sim.gid % len(self.pool)],
                server_id=sim.name,
                session=sim.session,
                group_id=sim.gid,
                version=version,
                gen_seconds=sim.per_prompt_s,
            )
            sim.gid += 1
            sim.sent += 1
            self.queue(k, g)
        sim.busy = False
        if not self.start_call(k, now):
            self.ask(k, now)

    def ask(self, k: int, now: float) -> None:
        """Work mode: a server neither generating nor waiting on a fresh request for its version asks for work."""
        sim = self.sims[k]
        if self.mode != "work" or sim.busy or sim.version < 0 or sim.refused:
            return
        if sim.asked_at and sim.asked_version == sim.version and now - sim.asked_at < ASK_AGAIN_S:
            return
        if not sim.asked_at or sim.asked_version != sim.version:
            sim.rid += 1  # a new request (else the same one again: granted at most once)
        sim.asked_at, sim.asked_version = now, sim.version
        self.counters["requests"] += 1
        req = WorkRequest(
            server_id=sim.name, session=sim.session, request_id=sim.rid, version=sim.version, prompts=PROMPTS_PER_CALL
        )
        self.queue(k, req)
        heapq.heappush(self.timers, (now + ASK_AGAIN_S, ASK, k))

    def set_mode(self, mode: str, now: float) -> None:
        self.mode = mode
        for k in range(len(self.sims)):
            self.ask(k, now)

    def tick(self, now: float) -> None:
        while self.timers and self.timers[0][0] <= now:
            due, kind, k = heapq.heappop(self.timers)
            sim = self.sims[k]
            if kind == HEARTBEAT:
                state = "generating" if sim.busy else "waiting_for_work"
                hb = Heartbeat(
                    server_id=sim.name, version=sim.version, groups_sent=sim.sent, state=state, session=sim.session
                )
                self.counters["heartbeats"] += 1
                self.queue(k, hb)
                heapq.heappush(self.timers, (due + self.opts["heartbeat_s"], HEARTBEAT, k))
            elif kind == DONE:
                self.call_done(k, now)
            else:
                self.ask(k, now)
        for k in list(self.blocked):
            self.flush(k)
        touched, self.touched = self.touched, set()
        for k in touched:  # (a send may have taken the descriptor's signal of a reply)
            self.drain(self.sims[k].push, k, True, now)

    def sweep(self, now: float) -> None:
        for sock, k, is_push in list(self.fds.values()):
            self.drain(sock, k, is_push, now)

    def report(self, since: float) -> dict[str, Any]:
        return {
            "sent": {s.name: s.sent for s in self.sims},
            "heard": {s.name: {v: t for v, t in s.heard.items() if t >= since} for s in self.sims},
            "refused": {s.name: s.refused for s in self.sims if s.refused},
            "counters": self.counters,
            "cpu_s": time.process_time(),
        }

    def close(self) -> None:
        self.ep.close()
        close(*(s.push for s in self.sims), *(s.sub for s in self.sims))


def sim_main(index: int, first: int, count: int, net_kwargs: dict[str, Any], opts: dict[str, Any]) -> None:
    """One process of ``count`` simulated servers (``first`` .. ``first + count - 1``), driven by the bench's
    PUB on ``opts["ctl_port"]``, answering on its PULL at ``opts["ack_port"]``."""
    logging.basicConfig(level=logging.ERROR)  # load_auth's per-server notes would drown the log
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID`: where it is, in its log
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 4 * count + 64)  # two per server; libzmq's default is 1023
    ctl, ack = ctx.socket(zmq.SUB), ctx.socket(zmq.PUSH)
    ctl.setsockopt(zmq.SUBSCRIBE, b"")
    ctl.connect(f"tcp://127.0.0.1:{opts['ctl_port']}")
    ack.connect(f"tcp://127.0.0.1:{opts['ack_port']}")
    block = Block(ctx, NetConfig(**net_kwargs), first, count, opts)
    ctl_fd = cast(int, ctl.getsockopt(zmq.FD))
    block.ep.register(ctl_fd, select.EPOLLIN)
    since, swept = 0.0, time.monotonic()
    try:
        while True:
            now = time.monotonic()
            wait = swept + block.SWEEP_S - now
            if block.timers:
                wait = min(wait, block.timers[0][0] - now)
            if block.blocked:
                wait = min(wait, 0.02)
            ready = block.ep.poll(max(0.0, wait))
            now = time.monotonic()
            while cast(int, ctl.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                cmd = msgpack.unpackb(ctl.recv(), strict_map_key=False)
                if cmd["cmd"] == "stop":
                    return
                answer: dict[str, Any] = {"index": index, "id": cmd["id"]}
                if cmd["cmd"] == "mode":
                    block.set_mode(cmd["mode"], now)
                elif cmd["cmd"] == "report":
                    since = cmd.get("since", since)
                    answer.update(block.report(since))
                ack.send(msgpack.packb(answer))
            for fd, _ in ready:
                if fd != ctl_fd:
                    block.drain(*block.fds[fd], now)
            if now - swept >= block.SWEEP_S:
                block.sweep(now)
                swept = now
            block.tick(time.monotonic())
    finally:
        block.close()
        close(ctl, ack)
        ctx.term()
