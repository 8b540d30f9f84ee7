"""Selector benchmarks: pure PODS selection, and the real selector process end to end.

Part 1 (one thread, in process): ``selector.rules.process_group(rewards, m=4, rule="max_variance")``
(one group: its pure-Python fast path) and ``selector.rules.process_groups`` (a [G, 16] burst, the
vectorised path the selector uses for bursts of 8 or more groups) on n=16 rewards from
{0, 0.25, .., 1}, in groups/s; goal >= 200k groups/s. Peers: brute force over all C(16,4)=1820
subsets (vectorised numpy, the fair peer; pure Python for context) and the numpy reference path
(``_process_group_numpy``: what process_group was before the fast paths, still used for n > 64 and
the other rules). Both fast paths are checked bit-exact against it before timing.
``selector.batch.keep_group`` / ``keep_groups`` (the full per-group work) are reported too.

Part 2 (real processes, tcp loopback): ``python -m selector.server`` fed by 4 pusher processes
(ScoredGroups 16x64 tokens, pre-encoded, as fast as the socket accepts) and drained by a learner-side
DEALER asking for batches of 8 groups back to back. Peer: a tiny raw relay process (PULL -> buffer ->
ROUTER, recv_multipart/send_multipart, no decode or selection) on the same sockets. Each group's send
time (monotonic ns) rides in its prompt tokens (a TrainBatch carries no group_id), so the DEALER
measures send -> batch-arrival latency. Flood windows of the selector and the relay alternate;
then both are run paced at a quarter of the selector's capacity, with the learner's request always
outstanding.

Part 3 (the receipt of the pure-Python single-group path in ``selector/rules.py``): per group, with and
without it (``rules.FAST_MAX_N = 0``), for bursts of 1, 2, 4 and 7 groups: the selection alone, the
selector's work without sockets (decode, ``Selector.admit``'s checks, ``Buffer.admit``, take +
build_batch + encode per 8 groups), and the CPU time of a selector process fed 400 groups/s one at a
time. Goal (issue 18): it saves >= 20% of the selector's cost per group at light load.

Run: ``python -m bench.selector`` (all), ``python -m bench.selector fast_path`` (Part 3, ~2.5 min).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from bench.common import ROOT, Result, child_env, free_port, interleaved, print_results, spawn_python
from bench.common import scored_group as make_group
from protocol.codec import decode, encode
from protocol.config import Config, NetConfig, SelectorConfig, load_config
from protocol.messages import BatchRequest, ScoredGroup, TrainBatch, WeightsAnnouncement
from protocol.sockets import (
    announce_publisher,
    batch_client,
    batch_server,
    close,
    group_receiver,
    group_sender,
    recv,
    send,
)
from selector import rules
from selector.batch import build_batch, keep_group, keep_groups
from selector.bounds import Bounds, Identities
from selector.buffer import Buffer
from selector.rules import _process_group_numpy, max_variance, process_group, process_groups
from selector.server import GROUP_LINK

BENCH = "selector"
N, M = 16, 4
LEVELS = np.arange(5, dtype=np.float32) / 4
GOAL_GROUPS_S = 200_000
E2E_T, E2E_P = 64, 8  # tokens per completion, prompt tokens
BATCH_GROUPS = 8
BUFFER_GROUPS = 256
SHAPE = [  # the run's shape as config overrides: groups of N completions, M kept, batches of BATCH_GROUPS
    "max_staleness=1000",
    f"rollout.group_size={N}",
    f"selector.keep={M}",
    f"rollout.max_new_tokens={E2E_T}",
    f"task.max_prompt_tokens={E2E_P}",
    f"learner.groups_per_step={BATCH_GROUPS}",
    f"selector.buffer_groups={BUFFER_GROUPS}",
    "selector.peer_groups_per_s=0",  # the selector's capacity: a pusher here is many servers' worth
]


# ==================================================================================================
# Part 1: pure selection
# ==================================================================================================
class _Cycle:
    """Hands out the rows of a pool of reward vectors in turn (so no call sees a cached input)."""

    def __init__(self, pool: Any) -> None:
        self.pool, self.i = pool, 0

    def __call__(self) -> Any:
        self.i = (self.i + 1) % len(self.pool)
        return self.pool[self.i]


def brute_force_numpy(idx: np.ndarray) -> Any:
    """Vectorised brute force: variance of every m-subset (index matrix precomputed), argmax."""

    def select(r: np.ndarray) -> np.ndarray:
        return idx[r[idx].var(axis=1).argmax()]

    return select


def brute_force_python(r: list[float], m: int) -> tuple[int, ...]:
    best = -1.0
    arg: tuple[int, ...] = ()
    for sub in itertools.combinations(range(len(r)), m):
        vals = [r[i] for i in sub]
        mu = sum(vals) / m
        v = sum((x - mu) ** 2 for x in vals) / m
        if v > best:
            best, arg = v, sub
    return arg


def _variance(r: np.ndarray, kept: Any) -> float:
    return float(np.asarray(r, np.float64)[list(kept)].var())


def _same(d: Any, e: Any) -> bool:
    """Two GroupDecisions are bit-identical."""
    return (
        d.kept.dtype == e.kept.dtype
        and np.array_equal(d.kept, e.kept)
        and d.advantages.dtype == e.advantages.dtype
        and d.advantages.tobytes() == e.advantages.tobytes()
        and d.zero_variance == e.zero_variance
        and d.dropped == e.dropped
    )


def selection(quick: bool) -> list[Result]:
    repeats, min_time = (3, 0.02) if quick else (7, 0.2)
    rng = np.random.default_rng(0)
    pool = rng.choice(LEVELS, (1024, N))
    idx = np.array(list(itertools.combinations(range(N), M)))
    brute = brute_force_numpy(idx)
    lists = [row.tolist() for row in pool]
    burst, small = 64, 8
    bursts = [pool[i : i + burst] for i in range(0, len(pool), burst)]
    smalls = [pool[i : i + small] for i in range(0, len(pool), small)]
    groups = [make_group(row, gid=i) for i, row in enumerate(pool[:256])]
    group_bursts = [groups[i : i + burst] for i in range(0, len(groups), burst)]
    cfg = SelectorConfig()

    # the rules agree on the variance of what they keep (ties may pick different equal rewards) ...
    for i, r in enumerate(pool[:256]):
        want = _variance(r, process_group(r, M, "max_variance", "keep", "std", rng).kept)
        for kept in (brute(r), brute_force_python(lists[i], M)):
            assert abs(_variance(r, kept) - want) < 1e-9, (r, kept)
    # ... and both fast paths are bit-exact with the numpy path, draws from the generator included
    g1, g2, g3 = np.random.default_rng(7), np.random.default_rng(7), np.random.default_rng(7)
    rows = np.concatenate((pool[:512], np.random.default_rng(8).random((256, N))))
    batched = [
        d
        for i in range(0, len(rows), burst)
        for d in process_groups(rows[i : i + burst], M, "max_variance", "keep", "std", g3)
    ]
    for r, b in zip(rows, batched, strict=True):
        d = process_group(r, M, "max_variance", "keep", "std", g1)
        e = _process_group_numpy(r, M, max_variance, "keep", "std", g2, 1e-6)
        assert _same(d, e) and _same(b, e), r
    assert g1.random() == g2.random() == g3.random()

    cyc = {
        k: _Cycle(v)
        for k, v in (
            ("pg", pool),
            ("np", pool),
            ("bf", pool),
            ("bfpy", lists),
            ("batch", bursts),
            ("small", smalls),
            ("kg", groups),
            ("kgs", group_bursts),
        )
    }
    fns = {
        "process_group": lambda: process_group(cyc["pg"](), M, "max_variance", "keep", "std", rng),
        "numpy path": lambda: _process_group_numpy(cyc["np"](), M, max_variance, "keep", "std", rng, 1e-6),
        "brute force numpy": lambda: brute(cyc["bf"]()),
        f"process_groups ({burst}/call)": lambda: process_groups(cyc["batch"](), M, "max_variance", "keep", "std", rng),
        f"process_groups ({small}/call)": lambda: process_groups(cyc["small"](), M, "max_variance", "keep", "std", rng),
        "keep_group": lambda: keep_group(cyc["kg"](), cfg, M, rng),
        f"keep_groups ({burst}/call)": lambda: keep_groups(cyc["kgs"](), cfg, M, rng),
    }
    t = interleaved(fns, repeats=repeats, min_time=min_time)
    for k, per in (
        (f"process_groups ({burst}/call)", burst),
        (f"process_groups ({small}/call)", small),
        (f"keep_groups ({burst}/call)", burst),
    ):
        t[k] /= per
    t_bfpy = interleaved(
        {"brute force python": lambda: brute_force_python(cyc["bfpy"](), M)},
        repeats=max(1, repeats // 2),
        min_time=min_time / 2,
    )["brute force python"]
    rate = {k: 1 / v for k, v in t.items()}
    us = {k: v * 1e6 for k, v in t.items()}
    pg, pgs = rate["process_group"], rate[f"process_groups ({burst}/call)"]
    case = f"n={N} m={M} rule=max_variance, rewards in {{0,.25,..,1}}"
    bf_peer = "vectorised numpy brute force over C(16,4)=1820 subsets (index matrix precomputed)"
    budget = f"200k/s is a {1e6 / GOAL_GROUPS_S:.0f} us budget"
    results = [
        Result(
            BENCH,
            f"process_group {case}",
            pg,
            "groups/s",
            bf_peer,
            rate["brute force numpy"],
            pg / rate["brute force numpy"],
            f">= {GOAL_GROUPS_S // 1000}k groups/s",
            pg >= GOAL_GROUPS_S,
            ratio_means="speed-up over peer",
            notes=(
                f"one group per call: the pure-Python fast path, {us['process_group']:.1f} us per group "
                f"(numpy path {us['numpy path']:.1f} us); {budget}. Bit-exact with the numpy path, so it "
                "keeps its ~25 Python-level steps (tie-break shuffle, sort, numpy's summation order, prefix "
                "sums over all n, numpy arrays out)"
            ),
            extra={"us": us},
        ),
        Result(
            BENCH,
            f"process_group {case}, vs pure-Python brute force",
            pg,
            "groups/s",
            "pure-Python brute force over itertools.combinations",
            1 / t_bfpy,
            pg * t_bfpy,
            "context (no goal)",
            None,
            ratio_means="speed-up over peer",
        ),
        Result(
            BENCH,
            f"process_group {case}, vs the numpy path",
            pg,
            "groups/s",
            "_process_group_numpy: the same rule on numpy arrays (process_group before the fast path; still the "
            "path for n > 64 and the other rules)",
            rate["numpy path"],
            pg / rate["numpy path"],
            "context (no goal)",
            None,
            ratio_means="speed-up over peer",
            notes=f"{us['process_group']:.1f} vs {us['numpy path']:.1f} us per group, bit-identical results",
        ),
        Result(
            BENCH,
            f"process_groups {case}, bursts of {burst} groups ([{burst}, {N}] per call)",
            pgs,
            "groups/s",
            bf_peer,
            rate["brute force numpy"],
            pgs / rate["brute force numpy"],
            f">= {GOAL_GROUPS_S // 1000}k groups/s",
            pgs >= GOAL_GROUPS_S,
            ratio_means="speed-up over peer",
            notes=(
                f"{us[f'process_groups ({burst}/call)']:.2f} us per group ({budget}); at {small} groups per "
                f"call (the smallest burst the vectorised path takes) "
                f"{us[f'process_groups ({small}/call)']:.2f} us per group. Equal, group for group and bit "
                "for bit, to process_group on each row, with the same draws from the generator"
            ),
            extra={"us_per_group": {k: us[k] for k in us if k.startswith("process_groups")}},
        ),
        Result(
            BENCH,
            "keep_group (process_group + slicing kept completions), 16x64 tokens",
            rate["keep_group"],
            "groups/s",
            "process_group alone",
            pg,
            rate["keep_group"] / pg,
            "context (no goal)",
            None,
            notes=f"{us['keep_group']:.1f} us per group",
        ),
        Result(
            BENCH,
            f"keep_groups (process_groups + slicing kept completions), bursts of {burst} groups of 16x64 tokens",
            rate[f"keep_groups ({burst}/call)"],
            "groups/s",
            "keep_group, one group per call",
            rate["keep_group"],
            rate[f"keep_groups ({burst}/call)"] / rate["keep_group"],
            "context (no goal)",
            None,
            ratio_means="speed-up over peer",
            notes=(
                f"{us[f'keep_groups ({burst}/call)']:.1f} us per group; the selector's burst loop drains up "
                f"to {burst} groups per wake-up and hands them to keep_groups"
            ),
        ),
    ]
    return results


# ==================================================================================================
# Part 2: the selector process end to end
# ==================================================================================================


def _stamped_prompt(idx: int, t_ns: int) -> bytes:
    return np.array([1, idx, t_ns >> 31, t_ns & 0x7FFFFFFF] + [5] * (E2E_P - 5) + [2], np.int32).tobytes()


def _stamps(prompts: np.ndarray) -> np.ndarray:
    """prompts [G, P] int32 -> send times (monotonic ns)."""
    p = prompts.astype(np.int64)
    return (p[:, 2] << 31) | p[:, 3]


class _Feed:
    """Pre-encoded 16x64-token groups of rollout server ``bench-<idx>``: each ``send`` is a new group (the
    selector drops replays) stamped with its send time, its rewards drawn from 64 pre-drawn sets."""

    def __init__(self, idx: int, rng: np.random.Generator) -> None:
        g = make_group(rng.choice(LEVELS, N), t=E2E_T, p=E2E_P, server=f"bench-{idx}", gid=idx)
        header, _, self.cids, self.lens, self.logprobs, _ = encode(g)  # ARRAYS order: prompt, .., rewards
        self.head = msgpack.unpackb(header)
        self.rewards = [rng.choice(LEVELS, N).astype(np.float32).tobytes() for _ in range(64)]
        self.idx, self.sent = idx, 0

    def send(self, sock: zmq.Socket) -> None:
        self.head["f"]["group_id"] = self.sent
        frames = [msgpack.packb(self.head, use_bin_type=True), _stamped_prompt(self.idx, time.monotonic_ns())]
        sock.send_multipart([*frames, self.cids, self.lens, self.logprobs, self.rewards[self.sent % 64]], copy=False)
        self.sent += 1


def _pusher_main(idx: int, selector_port: int, relay_port: int, ctl_port: int, ack_port: int) -> None:
    """Child process: push pre-encoded groups to the target the controller names, flooding or paced."""
    ctx = zmq.Context()
    socks = {
        "selector": group_sender(ctx, NetConfig(group_port=selector_port)),
        "relay": group_sender(ctx, NetConfig(group_port=relay_port)),
    }
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{ctl_port}")
    ack = ctx.socket(zmq.PUSH)
    ack.connect(f"tcp://127.0.0.1:{ack_port}")
    feed = _Feed(idx, np.random.default_rng(100 + idx))
    mode, target, period, next_t = "idle", "selector", 0.0, 0.0
    try:
        while True:
            wait = 100.0 if mode == "idle" else 0.0
            if mode == "paced":
                wait = max(0.0, (next_t - time.monotonic()) * 1000)
            if sub.poll(int(wait)):  # wait >= 0; zmq's Poller would truncate a float the same way
                cmd = msgpack.unpackb(sub.recv())
                if cmd[0] == "ping":
                    ack.send(msgpack.packb(idx))
                elif cmd[0] == "stop":
                    return
                else:
                    mode, target, rate = cmd
                    period = 1.0 / rate if rate else 0.0
                    next_t = time.monotonic() + random.random() * period
                continue
            if mode == "idle" or (mode == "paced" and time.monotonic() < next_t):
                continue
            sock = socks[target]
            if not sock.poll(20, zmq.POLLOUT):  # back-pressure; look at the control socket again
                continue
            feed.send(sock)
            if mode == "paced":
                next_t = max(next_t + period, time.monotonic() - period)
    finally:
        close(sub, ack, *socks.values())
        ctx.term()


def _relay_main(group_port: int, batch_port: int) -> None:
    """Child process: the peer. PULL groups into a bounded buffer, answer each request with the raw
    frames of 8 groups: the selector's sockets and loop shape, no decode, no selection, no batching."""
    ctx = zmq.Context()
    net = NetConfig(group_port=group_port, batch_port=batch_port)
    pull, router = group_receiver(ctx, net), batch_server(ctx, net)
    buf: deque[list[zmq.Frame]] = deque()
    pending = None
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    reading = False
    while True:
        want = len(buf) < BUFFER_GROUPS
        if want != reading:
            (poller.register if want else poller.unregister)(pull, *([zmq.POLLIN] if want else []))
            reading = want
        events = dict(poller.poll(200))
        if pull in events:
            for _ in range(64):
                buf.append(pull.recv_multipart(copy=False)[1:])  # less the ROUTER identity frame
                if not pull.poll(0) or len(buf) >= BUFFER_GROUPS:
                    break
        if router in events:
            pending = router.recv_multipart(copy=False)[0]
        if pending is not None and len(buf) >= BATCH_GROUPS:
            out = [pending]
            for _ in range(BATCH_GROUPS):
                out.extend(buf.popleft())
            router.send_multipart(out, copy=False)
            pending = None


class _Learner:
    """A learner-side DEALER asking one target for batches of 8 groups, one request outstanding."""

    def __init__(self, ctx: zmq.Context, port: int, raw: bool) -> None:
        self.sock = batch_client(ctx, NetConfig(batch_port=port))
        self.raw, self.outstanding, self.request_id = raw, False, 0

    def request(self) -> None:
        if not self.outstanding:
            self.request_id += 1
            send(self.sock, BatchRequest(request_id=self.request_id, version=0, num_groups=BATCH_GROUPS))
            self.outstanding = True

    def receive(self, timeout_ms: int) -> tuple[int, np.ndarray] | None:
        """(arrival monotonic ns, send stamps of the batch's groups), or None on timeout."""
        if not self.sock.poll(timeout_ms):
            return None
        if self.raw:
            frames = self.sock.recv_multipart(copy=False)
            arrival = time.monotonic_ns()
            prompts = np.stack([np.frombuffer(f.buffer, np.int32) for f in frames[1::6]])
        else:
            _, batch = recv(self.sock, TrainBatch)  # the learner decodes its batch too
            arrival = time.monotonic_ns()
            first = np.flatnonzero(np.diff(batch.group_index, prepend=-1))  # first row of each group
            prompts = batch.prompt_ids.reshape(-1, E2E_P)[first]
        self.outstanding = False
        return arrival, _stamps(prompts)


def _announce_main(ctx: zmq.Context, port: int, stop: threading.Event) -> None:
    """A stand-in learner's announcements: version 0 (vocabulary unknown), every 0.2 s until ``stop``."""
    pub = announce_publisher(ctx, NetConfig(announce_port=port))
    try:
        while not stop.wait(0.2):
            send(pub, WeightsAnnouncement(version=0, final=False))
    finally:
        close(pub)


class _Rig:
    """The selector, the relay, 4 pushers and two learners; every process is killed by ``close``."""

    def __init__(self, tmp: Path) -> None:
        self.procs: list[subprocess.Popen] = []
        self.ctx = zmq.Context()
        self.tmp = tmp
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.linger = 0
        self.acks = self.ctx.socket(zmq.PULL)
        self.acks.linger = 0
        self.learners: dict[str, _Learner] = {}
        self.stop = threading.Event()
        self.announcer: threading.Thread | None = None

    def start(self) -> None:
        tmp = self.tmp
        ports = {k: free_port() for k in ("group", "batch", "announce", "weights", "relay_group", "relay_batch")}
        overrides = [
            f"run.dir={tmp / 'run'}",
            f"net.group_port={ports['group']}",
            f"net.batch_port={ports['batch']}",
            f"net.announce_port={ports['announce']}",
            f"net.weights_port={ports['weights']}",
            *SHAPE,
        ]
        ctl_port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        ack_port = self.acks.bind_to_random_port("tcp://127.0.0.1")
        self._spawn("selector", ["-m", "selector.server", *overrides])
        self._spawn(
            "relay",
            [
                "-c",
                f"from bench.selector import _relay_main; _relay_main({ports['relay_group']}, {ports['relay_batch']})",
            ],
        )
        for i in range(4):
            self._spawn(
                f"pusher{i}",
                [
                    "-c",
                    f"from bench.selector import _pusher_main; _pusher_main({i}, "
                    f"{ports['group']}, {ports['relay_group']}, {ctl_port}, {ack_port})",
                ],
            )
        # the learner's announcements of version 0, which the selector waits for before reading groups
        self.announcer = threading.Thread(
            target=_announce_main, args=(self.ctx, ports["announce"], self.stop), daemon=True
        )
        self.announcer.start()
        self.learners = {
            "selector": _Learner(self.ctx, ports["batch"], raw=False),
            "relay": _Learner(self.ctx, ports["relay_batch"], raw=True),
        }

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        proc = spawn_python(args, self.tmp / f"{name}.log", start_new_session=True)
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.tmp.glob("*.log")))

    def wait_pushers(self, timeout: float = 60.0) -> None:
        seen: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(seen) < 4:
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"pushers not ready ({sorted(seen)})\n{self.logs()}")
            self.pub.send(msgpack.packb(["ping"]))
            while self.acks.poll(100):
                seen.add(msgpack.unpackb(self.acks.recv()))

    def command(self, mode: str, target: str, rate_per_pusher: float = 0.0) -> None:
        self.pub.send(msgpack.packb([mode, target, rate_per_pusher]))

    def prime(self, target: str, timeout: float = 60.0) -> None:
        """Flood until the first batch comes back (the target is up and connected), then drain."""
        learner = self.learners[target]
        self.command("flood", target)
        deadline = time.monotonic() + timeout
        while True:
            learner.request()
            if learner.receive(100) is not None:
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"{target} served no batch\n{self.logs()}")
        self.drain(target)

    def drain(self, target: str, quiet_ms: int = 250) -> None:
        """Stop the pushers and take batches until none comes for ``quiet_ms``; one request stays outstanding."""
        self.command("idle", target)
        learner = self.learners[target]
        while True:
            learner.request()
            if learner.receive(quiet_ms) is None:
                return

    def phase(self, target: str, mode: str, rate_per_pusher: float, warm: float, window: float) -> dict[str, Any]:
        learner = self.learners[target]
        t0 = time.monotonic_ns()
        self.command(mode, target, rate_per_pusher)
        start, end = t0 + int(warm * 1e9), t0 + int((warm + window) * 1e9)
        delivered, per_group, last = 0, [], []
        while True:
            learner.request()  # back to back: a new request as soon as the previous batch arrived
            got = learner.receive(20)
            if got is not None:
                arrival, stamps = got
                if start <= arrival <= end:
                    delivered += stamps.size
                    fresh = stamps[stamps >= t0]  # groups sent in this phase (not leftovers of the last one)
                    per_group.extend(((arrival - fresh) / 1e6).tolist())
                    if fresh.size:
                        last.append((arrival - int(stamps.max())) / 1e6)
            if time.monotonic_ns() > end:
                break
        self.drain(target)
        return {"groups_s": delivered / window, "latency_ms": per_group, "last_ms": last}

    def close(self) -> None:
        self.stop.set()
        if self.announcer is not None:
            self.announcer.join()
        with contextlib.suppress(zmq.ZMQError):
            self.pub.send(msgpack.packb(["stop"]))
        for p in self.procs[:2]:  # the selector closes its sockets and metrics on SIGTERM; the relay just dies
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 3
        for p in self.procs:
            try:
                p.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        close(self.pub, self.acks, *(learner.sock for learner in self.learners.values()))
        self.ctx.term()


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def end_to_end(quick: bool) -> list[Result]:
    reps, warm, window, paced_window = (1, 0.2, 0.6, 0.8) if quick else (3, 0.3, 1.5, 2.5)
    with tempfile.TemporaryDirectory(prefix="podsrl-bench-") as d:
        rig = _Rig(Path(d))
        try:
            rig.start()
            rig.wait_pushers()
            rig.prime("selector")
            rig.prime("relay")
            flood: dict[str, list[dict[str, Any]]] = {"selector": [], "relay": []}
            for rep in range(reps):
                for target in ("selector", "relay") if rep % 2 == 0 else ("relay", "selector"):
                    flood[target].append(rig.phase(target, "flood", 0.0, warm, window))
            capacity = statistics.median(p["groups_s"] for p in flood["selector"])
            paced_total = max(50.0, 0.25 * capacity)
            paced = {t: rig.phase(t, "paced", paced_total / 4, warm, paced_window) for t in ("selector", "relay")}
            if any(p.poll() is not None for p in rig.procs):
                raise RuntimeError(f"a process died\n{rig.logs()}")
        finally:
            rig.close()

    ours = [p["groups_s"] for p in flood["selector"]]
    raw = [p["groups_s"] for p in flood["relay"]]
    ratio = statistics.median(a / b for a, b in zip(ours, raw, strict=True))
    sat = {t: [x for p in flood[t] for x in p["latency_ms"]] for t in flood}
    results = [
        Result(
            BENCH,
            f"selector process end to end, 4 pushers flooding 16x{E2E_T}-token groups, batches of "
            f"{BATCH_GROUPS} requested back to back",
            statistics.median(ours),
            "groups/s",
            "raw relay process (PULL -> bounded buffer -> ROUTER, recv/send_multipart, no decode/selection)",
            statistics.median(raw),
            ratio,
            "report (no threshold set)",
            None,
            ratio_means="median over adjacent window pairs of podsrl / relay",
            notes=(
                f"{reps} alternating windows of {window}s each after {warm}s warm-up; groups delivered in batches "
                f"/ window; 2 cores shared by 4 pushers, the server, this learner and ZeroMQ I/O threads"
            ),
            extra={"selector_windows": ours, "relay_windows": raw},
        )
    ]
    for q in (50, 99):
        a, b = _pct(sat["selector"], q), _pct(sat["relay"], q)
        results.append(
            Result(
                BENCH,
                f"end to end latency p{q}, saturated (send -> batch arrival at the learner)",
                a,
                "ms",
                "raw relay, same load",
                b,
                a / b,
                "report (lower is better)",
                None,
                ratio_means="podsrl / relay",
                notes=(
                    f"includes queueing in ZeroMQ/TCP buffers and the {BUFFER_GROUPS}-group buffer under "
                    f"back-pressure (by Little's law ~ queued groups / throughput); {len(sat['selector'])} and "
                    f"{len(sat['relay'])} groups"
                ),
            )
        )
    for key, what in (
        ("last_ms", "batch-completing group (send of the batch's newest group -> batch arrival)"),
        ("latency_ms", "every group (includes waiting for the batch to fill)"),
    ):
        for q in (50, 99):
            a, b = _pct(paced["selector"][key], q), _pct(paced["relay"][key], q)
            results.append(
                Result(
                    BENCH,
                    f"latency p{q}, learner always waiting, paced at {paced_total:.0f} groups/s: {what}",
                    a,
                    "ms",
                    "raw relay, same pacing",
                    b,
                    a / b,
                    "report (lower is better)",
                    None,
                    ratio_means="podsrl / relay",
                    notes=(
                        f"added by the selector: {a - b:+.2f} ms; paced at 25% of the selector's flood capacity; "
                        f"{len(paced['selector'][key])} / {len(paced['relay'][key])} samples"
                    ),
                )
            )
    return results


# ==================================================================================================
# Part 3: the pure-Python single-group path at light load (its receipt, selector/rules.py)
# ==================================================================================================
LIGHT_BURSTS = (1, 2, 4, 7)  # bursts that process_groups hands to the pure-Python path (< BATCH_MIN_GROUPS)
LIGHT_GROUPS = 56  # a multiple of every burst size and of BATCH_GROUPS
LIGHT_SAVING_GOAL = 0.20  # issue 18: the fast path stays only if it saves this much of the selector's work
LIGHT_RATE = 400  # groups/s, one at a time: ~20% of a core for the selector, so every burst is one group
_WITHOUT_FAST_PATH = (  # python -c: the selector process with rules.FAST_MAX_N = 0 (as _without_fast_path)
    "import sys, selector.rules as r; r.FAST_MAX_N = 0; from selector.server import main; sys.exit(main(sys.argv[1:]))"
)


def _selector_work(frames: list[list[bytes]], cfg: Config, burst: int, rng: np.random.Generator) -> list[bytes]:
    """The selector process's work on groups arriving ``burst`` at a time, less the sockets and the loop:
    decode, validate (``Selector.admit``: Identities.check_group, Bounds.check), gate and down-sample
    (``Buffer.admit``), and for every BATCH_GROUPS groups take, build and encode a batch. Returns the
    batches' bytes."""
    identities, bounds, pool = Identities(takeover_s=3.0), Bounds(cfg), Buffer(cfg, rng)
    req = BatchRequest(request_id=1, version=0, num_groups=BATCH_GROUPS)
    now = time.monotonic()
    out = []
    for start in range(0, len(frames), burst):
        groups: list[ScoredGroup] = [decode(f, GROUP_LINK) for f in frames[start : start + burst]]
        for g in groups:
            identities.check_group(g, now)
            bounds.check(g)
        pool.admit(groups, bounds.version)
        while len(pool) >= BATCH_GROUPS:
            take = pool.take(req)
            assert take is not None
            out.append(b"".join(bytes(b) for b in encode(build_batch(take, req, dict(pool.tally.counts)))))
    return out


def _without_fast_path(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` as it runs without the pure-Python path (``rules.FAST_MAX_N = 0``): one group goes through the
    numpy path, a burst of 2 or more through the vectorised one (process_groups takes it for n > FAST_MAX_N).
    The module attribute is swapped, not mock.patch'ed, so the switch costs nanoseconds."""

    def run() -> Any:
        saved, rules.FAST_MAX_N = rules.FAST_MAX_N, 0
        try:
            return fn()
        finally:
            rules.FAST_MAX_N = saved

    return run


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _light_window(feed: _Feed, sock: zmq.Socket, learner: _Learner, pid: int, seconds: float) -> tuple[float, int]:
    """Send one group every 1 / LIGHT_RATE s for ``seconds`` with a batch request always outstanding, then take
    the batches left; (CPU seconds the selector ``pid`` spent meanwhile, groups delivered)."""
    cpu, delivered = _cpu_s(pid), 0
    due = time.monotonic()
    end = due + seconds
    while time.monotonic() < end:
        if time.monotonic() >= due:
            feed.send(sock)
            due += 1 / LIGHT_RATE
        learner.request()
        got = learner.receive(max(0, math.ceil(1e3 * (due - time.monotonic()))))
        delivered += 0 if got is None else got[1].size
    while True:  # take the batches left; a partial one waits for the next window
        learner.request()
        got = learner.receive(300)
        if got is None:
            return _cpu_s(pid) - cpu, delivered
        delivered += got[1].size


def light_load_process(quick: bool) -> dict[str, list[float]]:
    """The selector process's CPU time per group delivered (us), fed single groups at LIGHT_RATE: one process
    as shipped ("fast"), one without the pure-Python path ("without"), in alternating windows."""
    reps, window = (2, 0.5) if quick else (8, 4.0)
    ctx, stop = zmq.Context(), threading.Event()
    procs: list[subprocess.Popen] = []
    announcers: list[threading.Thread] = []
    links: dict[str, tuple[_Feed, zmq.Socket, _Learner]] = {}
    with tempfile.TemporaryDirectory(prefix="podsrl-bench-") as d:
        try:
            for name, args in (("fast", ["-m", "selector.server"]), ("without", ["-c", _WITHOUT_FAST_PATH])):
                ports = {k: free_port() for k in ("group", "batch", "announce", "weights")}
                overrides = [f"run.dir={d}/{name}", *(f"net.{k}_port={v}" for k, v in ports.items()), *SHAPE]
                with open(Path(d) / f"{name}.log", "wb") as log:
                    procs.append(
                        subprocess.Popen(
                            [sys.executable, *args, *overrides], env=child_env(), cwd=ROOT, stdout=log, stderr=log
                        )
                    )
                announcers.append(threading.Thread(target=_announce_main, args=(ctx, ports["announce"], stop)))
                announcers[-1].start()
                sender = group_sender(ctx, NetConfig(group_port=ports["group"]))
                links[name] = (_Feed(0, np.random.default_rng(100)), sender, _Learner(ctx, ports["batch"], raw=False))
            pids = dict(zip(links, (p.pid for p in procs), strict=True))
            for name, link in links.items():  # warm up: each selector has heard the learner and served a batch
                deadline = time.monotonic() + 60
                while _light_window(*link, pids[name], 0.5)[1] == 0:
                    if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                        raise RuntimeError(
                            f"the {name} selector served no batch\n{(Path(d) / f'{name}.log').read_text()}"
                        )
            us: dict[str, list[float]] = {name: [] for name in links}
            for rep in range(reps):
                for name in ("fast", "without") if rep % 2 == 0 else ("without", "fast"):
                    cpu, n = _light_window(*links[name], pids[name], window)
                    us[name].append(1e6 * cpu / n)
        finally:
            stop.set()
            for t in announcers:
                t.join()
            for p in procs:
                p.terminate()
                p.wait(timeout=10)
            close(*(sock for _, sock, _ in links.values()), *(learner.sock for _, _, learner in links.values()))
            ctx.term()
    return us


def fast_path(quick: bool) -> list[Result]:
    """Per group, with and without the pure-Python path, for bursts of 1, 2, 4 and 7 groups: the selection
    alone (and the numpy path row by row), and the selector's whole work on a group (``_selector_work``)."""
    repeats, min_time = (3, 0.02) if quick else (21, 0.1)
    rng = np.random.default_rng(0)
    pool = rng.choice(LEVELS, (1024, N))
    cfg = load_config(None, SHAPE)
    frames = [[bytes(f) for f in encode(make_group(row, E2E_T, E2E_P, gid=i))] for i, row in enumerate(pool)]
    frames = frames[:LIGHT_GROUPS]
    with_it = _selector_work(frames, cfg, 1, np.random.default_rng(1))  # the two paths build the same batches
    assert _without_fast_path(lambda: _selector_work(frames, cfg, 1, np.random.default_rng(1)))() == with_it

    def select(bursts: _Cycle) -> Callable[[], Any]:
        return lambda: process_groups(bursts(), M, "max_variance", "keep", "std", rng)

    def numpy_rows(bursts: _Cycle) -> Callable[[], Any]:
        return lambda: [_process_group_numpy(r, M, max_variance, "keep", "std", rng, 1e-6) for r in bursts()]

    def work(burst: int) -> Callable[[], Any]:
        return lambda: _selector_work(frames, cfg, burst, rng)

    fns: dict[str, Callable[[], Any]] = {}
    for g in LIGHT_BURSTS:
        bursts = _Cycle([pool[i : i + g] for i in range(0, len(pool) - g + 1, g)])
        fns[f"select {g} fast"] = select(bursts)
        fns[f"select {g} without"] = _without_fast_path(select(bursts))
        fns[f"select {g} numpy rows"] = numpy_rows(bursts)
        fns[f"work {g} fast"] = work(g)
        fns[f"work {g} without"] = _without_fast_path(work(g))
    t = interleaved(fns, repeats=repeats, min_time=min_time)
    us = {k: v * 1e6 / (int(k.split()[1]) if k.startswith("select") else LIGHT_GROUPS) for k, v in t.items()}
    saved = {g: 1 - us[f"work {g} fast"] / us[f"work {g} without"] for g in LIGHT_BURSTS}
    rows = "; ".join(
        f"bursts of {g}: work {us[f'work {g} fast']:.1f} / {us[f'work {g} without']:.1f} us (saves {saved[g]:.0%}), "
        f"selection {us[f'select {g} fast']:.1f} / {us[f'select {g} without']:.1f} us "
        f"(numpy path row by row {us[f'select {g} numpy rows']:.1f})"
        for g in LIGHT_BURSTS
    )
    light = us["work 1 fast"] / us["work 1 without"]
    windows = light_load_process(quick)
    cpu = {k: statistics.median(v) for k, v in windows.items()}
    goal = f"saves >= {LIGHT_SAVING_GOAL:.0%} (ratio <= {1 - LIGHT_SAVING_GOAL:.2f})"
    return [
        Result(
            BENCH,
            f"pure-Python single-group path at light load: the selector process's CPU per group, fed {LIGHT_RATE} "
            f"16x{E2E_T}-token groups/s one at a time, a batch of {BATCH_GROUPS} always requested",
            cpu["fast"],
            "us/group",
            "the same process without it (rules.FAST_MAX_N = 0: the numpy path)",
            cpu["without"],
            cpu["fast"] / cpu["without"],
            goal,
            cpu["fast"] / cpu["without"] <= 1 - LIGHT_SAVING_GOAL,
            ratio_means="with / without the fast path",
            notes=(
                "utime + stime of the selector process (its ZeroMQ I/O thread included) per group delivered; "
                "median of alternating windows, two selector processes; the whole cost of a group: sockets, "
                "loop, decode, checks, selection, batch, metrics"
            ),
            extra={"us_per_group_windows": windows},
        ),
        Result(
            BENCH,
            "pure-Python single-group path at light load (one group per burst): the selector's work per group "
            f"(decode + validate + select + batch), 16x{E2E_T}-token groups",
            us["work 1 fast"],
            "us/group",
            "the same work without it (rules.FAST_MAX_N = 0: the numpy path)",
            us["work 1 without"],
            light,
            goal,
            light <= 1 - LIGHT_SAVING_GOAL,
            ratio_means="with / without the fast path",
            notes=(
                f"per group, with / without the pure-Python path (medians of {repeats} interleaved runs; without it "
                f"a burst of 2 or more goes through the vectorised path): {rows}. Work = decode, Selector.admit's "
                "checks, Buffer.admit, and take + build_batch + encode per 8 groups; no sockets"
            ),
            extra={"us_per_group": us},
        ),
    ]


def run(quick: bool = False) -> list[Result]:
    return selection(quick) + end_to_end(quick) + fast_path(quick)


if __name__ == "__main__":
    if sys.argv[1:] == ["fast_path"]:  # Part 3 alone
        for r in fast_path(quick=False):
            print_results([r])
            print(r.notes)
    else:
        print_results(run())
