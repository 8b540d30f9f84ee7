"""The 10M part of ``bench/fleet.py``: a version of a 10M-parameter fp32 model to many servers, full and delta.

The bench's side is a real ``learner.publisher.WeightPublisher``; each fetching server has its own SUB and
weights DEALER and fetches every announced version with the real ``rollout_server.fetch.Fetcher``
(:func:`fetch_main`, several servers per process on one uvloop loop). Timed: from ``publish`` to the last
server holding the version, verified; beside it, the same to one server.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import subprocess
import sys
import time
from typing import Any, cast

import msgpack
import zmq

from bench.common import ROOT, Result, child_env, free_ports
from bench.fleet_sim import server_name
from protocol.auth import load_auth
from protocol.config import NetConfig, WeightsConfig
from protocol.messages import Weights, WeightsAnnouncement
from protocol.sockets import announce_subscriber, close, weight_client

BENCH = "fleet"
SPREAD_N = 32  # servers: 32 x 38 MiB verified (and, for deltas, decompressed) fits a minute on 2 cores
PER_PROC = 8
TIMEOUT_S = 180.0
MIB = 1 << 20


# -- the bench's side ---------------------------------------------------------------------


def spread(n: int, delta: bool, quick: bool) -> dict[str, Any]:
    """Publish -> the last of ``n`` servers holding the version, verified (``Fetcher``), per round; full versions,
    or deltas from the version the servers hold (every fp32 element moved by 1e-6: an AdamW step at lr 1e-6)."""
    from bench.weights import Mover, random_state
    from learner.publisher import WeightPublisher
    from protocol.weights import pack_weights

    size, rounds = ("1M", 2) if quick else ("10M", 3)
    state = random_state(size)
    mover = Mover(state) if delta else None
    ports = free_ports(3)
    net_kwargs = {"announce_port": ports[0], "weights_port": ports[1], "auth": "off"}
    ctx = zmq.Context()
    acks = ctx.socket(zmq.PULL)
    acks.linger = 0
    acks.bind(f"tcp://127.0.0.1:{ports[2]}")
    cfg = WeightsConfig(transport="net", delta=delta, delta_max_ratio=1.0)
    publisher = WeightPublisher(ctx, NetConfig(**net_kwargs), weights=cfg)
    procs: list[subprocess.Popen] = []
    per = PER_PROC
    version, seconds, packs, wire = 0, [], [], []
    try:
        for i, lo in enumerate(range(0, n, per)):
            code = (
                "from bench.fleet_weights import fetch_main; "
                f"fetch_main({i}, {lo}, {min(per, n - lo)}, {net_kwargs!r}, "
                f"{{'ack_port': {ports[2]}, 'delta': {delta}}})"
            )
            procs.append(subprocess.Popen([sys.executable, "-c", code], env=child_env(), cwd=ROOT))

        def wait(v: int) -> float:
            """When the last server reported version ``v`` (monotonic)."""
            got: dict[str, float] = {}
            deadline = time.monotonic() + TIMEOUT_S
            while len(got) < n:
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"{n - len(got)} of {n} servers did not report version {v}")
                if acks.poll(200):
                    msg = msgpack.unpackb(acks.recv())
                    if msg[0] != "ready" and msg[1] == v:
                        got[msg[0]] = msg[2]
                        wire.append(msg[3])
            return max(got.values())

        for r in range(rounds + 1):  # round 0 (untimed): every server joins and holds a version
            if mover is not None and r:
                mover.step()
            version += 1
            t0 = time.monotonic()
            w = pack_weights(state, version, "{}", alloc=publisher.alloc)
            t1 = time.monotonic()
            publisher.publish(w)
            last = wait(version)
            if r:
                seconds.append(last - t1)
                packs.append(t1 - t0)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
        publisher.close()
        close(acks)
        ctx.destroy(linger=0)
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    return {"seconds": seconds, "pack_s": packs, "nbytes": nbytes, "wire_bytes": statistics.median(wire[-n:])}


def weights_rows(quick: bool) -> list[Result]:
    n = 4 if quick else SPREAD_N
    out = []
    for delta in (False, True):
        many = spread(n, delta, quick)
        one = many if quick else spread(1, delta, quick)  # (quick: no peer, to stay a smoke test)
        a, b = statistics.median(many["seconds"]), statistics.median(one["seconds"])
        kind = "delta (every fp32 element moved by 1e-6)" if delta else "full"
        mib = many["nbytes"] / MIB
        out.append(
            Result(
                BENCH,
                f"a {mib:.0f} MiB fp32 version ({'1M' if quick else '10M'} params), {kind}, publish -> all {n} "
                "servers verified",
                1e3 * a,
                "ms",
                "the same version to 1 server (same run)" if not quick else "(not measured in --quick)",
                1e3 * b if not quick else None,
                a / b if not quick else None,
                "report (no threshold set)",
                None,
                ratio_means=f"time to {n} / time to 1 ({n}x would be serial)",
                notes=(
                    f"{n} servers, 8 per process, each fetching with the real Fetcher (rollout_server/fetch.py) on "
                    f"uvloop, {'a delta from the version it holds' if delta else 'the full version'}; "
                    f"{many['wire_bytes'] / MIB:.1f} MiB on the wire per server; median of {len(many['seconds'])} "
                    f"rounds (pack {1e3 * statistics.median(many['pack_s']):.0f} ms before, not included); "
                    f"{1e3 * a / n:.0f} ms per server amortised; 2 shared cores do every server's verify"
                    f"{' and decompression' if delta else ''}"
                ),
                extra={"seconds": many["seconds"], "one_seconds": one["seconds"], "servers": n},
            )
        )
    return out


# -- servers that fetch every version (the 10M part) ------------------------------------------------------


def fetch_main(index: int, first: int, count: int, net_kwargs: dict[str, Any], opts: dict[str, Any]) -> None:
    """One process of ``count`` servers, each fetching every announced version with the real Fetcher
    (full when ``opts["delta"]`` is false, else a delta from the version the process holds) and reporting
    (server, version, done at, bytes, delta) to the bench's PULL."""
    import uvloop

    logging.basicConfig(level=logging.ERROR)
    uvloop.run(_fetch_async(index, first, count, NetConfig(**net_kwargs), opts))


async def _fetch_async(index: int, first: int, count: int, net: NetConfig, opts: dict[str, Any]) -> None:
    import zmq.asyncio

    from protocol.sockets import arecv
    from rollout_server.fetch import Fetcher

    ctx = zmq.asyncio.Context()
    ack = ctx.socket(zmq.PUSH)
    ack.connect(f"tcp://127.0.0.1:{opts['ack_port']}")
    held: list[Weights | None] = [None]  # the version this process's servers hold (one copy, shared as a base)
    socks: list[zmq.Socket] = []

    async def server(i: int) -> None:
        name = server_name(i)
        auth = load_auth(net, "rollout", name)
        sub = cast(zmq.asyncio.Socket, announce_subscriber(ctx, net, auth))
        dealer = cast(zmq.asyncio.Socket, weight_client(ctx, net, auth))
        socks.extend([sub, dealer])
        fetcher = Fetcher(dealer, WeightsConfig(transport="net"), 120.0)
        got = -1
        while True:
            _, ann = await arecv(sub, WeightsAnnouncement)
            if ann.version <= got:
                continue
            base = held[0] if opts["delta"] and held[0] is not None and held[0].version < ann.version else None
            w = await fetcher.fetch(base, with_files=False)
            t = time.monotonic()
            got = w.version
            if held[0] is None or held[0].version < w.version:
                held[0] = w  # the next delta's base; the other servers' copies are dropped
            delta = bool(fetcher.last.get("delta"))
            await ack.send(msgpack.packb([name, w.version, t, int(fetcher.last.get("bytes", 0)), delta]))

    tasks = [asyncio.ensure_future(server(i)) for i in range(first, first + count)]
    await ack.send(msgpack.packb(["ready", index]))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            t.result()
    finally:
        for t in tasks:
            t.cancel()
        for s in [*socks, ack]:
            s.close(linger=0)
        ctx.term()
