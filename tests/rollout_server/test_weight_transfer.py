"""The weights link end to end, over real ZeroMQ sockets on loopback: learner/publisher.py serving,
rollout_server/fetch.py fetching, protocol/shm.py for the same machine.

Publishers run in a child process where the property is about processes (bytes reassembled in
another address space, a learner killed with SIGKILL), else in this process (their serving thread is
real). The child never imports torch (this process packs the versions with ``pack_weights`` and hands
them over as files), so it starts in half a second and uses one core. Every wait has a timeout and
every assertion is on a logical outcome (bytes, versions, counters, orderings), never on durations.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import mmap
import os
import queue
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import msgpack
import numpy as np
import pytest
import torch
import zmq
import zmq.asyncio
import zstandard
from helpers import ROOT, child_env, free_ports, wait_for
from torch import nn
from zmq.utils.monitor import recv_monitor_message

import learner.publisher as publisher_module
from learner.publisher import STARTS_PER_S, WeightPublisher
from learner.transports.shm import ShmTransport
from protocol.codec import encode
from protocol.config import Config, NetConfig, WeightsConfig
from protocol.messages import (
    ProtocolError,
    Weights,
    WeightsAnnouncement,
    WeightsChunk,
    WeightsRequest,
)
from protocol.metrics import Monitor, RateLimitedLog
from protocol.shm import SegmentStore, host_id, read_segment, run_key, segment_name
from protocol.sockets import announce_subscriber, close, recv, send, weight_client, weight_server
from protocol.weights import digest, encode_delta, manifest_digest, pack_weights, verify
from rollout_server.fetch import Fetcher
from rollout_server.sources.shm import read_shared, shared_segment
from rollout_server.weights_client import WeightsClient

MODEL_CONFIG = json.dumps({"model_type": "tiny", "vocab_size": 512, "hidden_size": 32})
REPLY_S = 30.0  # a child process's answer (it may start slowly on a loaded machine)
FETCH_S = 30.0  # one Fetcher.fetch, all retries included
RECV_MS = 10_000  # one reply on a raw socket
SMALL = WeightsConfig(chunk_mib=0.01, window=2)  # ~10 KiB chunks: a version is ~10 chunks, a delta ~5
SMALL_CHUNK = int(0.01 * (1 << 20))


# -- versions -----------------------------------------------------------------------------------


@functools.cache
def chain(steps: int = 5) -> tuple[Weights, ...]:
    """Versions 0..steps of a small model under AdamW (lr 1e-3), packed as the learner packs them:
    fp32 embedding and bias, bf16 projection, ~98 KiB each; a delta is ~44 KiB. Read-only, so no test
    (and no code under test) can write into them."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(512, 32), nn.Linear(32, 512))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    out = []
    for v in range(steps + 1):
        sd = net.state_dict()
        state = {"embed": sd["0.weight"], "proj": sd["1.weight"].to(torch.bfloat16), "bias": sd["1.bias"]}
        w = pack_weights(state, v, MODEL_CONFIG)
        w.data.setflags(write=False)
        out.append(w)
        loss = net(torch.randint(0, 512, (8,))).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert {e[1] for e in out[0].tensors} == {"float32", "bfloat16"}
    return tuple(out)


def same_bytes(got: Weights, want: Weights) -> bool:
    """Bit-identical versions: number, manifest (with digests), config and every byte of the buffer."""
    return (
        got.version == want.version
        and got.tensors == want.tensors
        and got.model_config == want.model_config
        and got.data.dtype == want.data.dtype
        and got.data.tobytes() == want.data.tobytes()
    )


def manifest(w: Weights) -> int:
    """What the learner announces for ``w``: its manifest digest."""
    return manifest_digest(w.tensors)


def big_versions() -> tuple[Weights, Weights]:
    """8 MiB (fp32 + bf16) and the next version, where a few thousand values moved."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1 << 20, generator=g), torch.randn(1 << 21, generator=g).to(torch.bfloat16)
    v0 = pack_weights({"a": a, "b": b}, 0, MODEL_CONFIG)
    a[:4096] += 1e-3
    b[-4096:] += 1
    v1 = pack_weights({"a": a, "b": b}, 1, MODEL_CONFIG)
    return v0, v1


# -- plumbing -----------------------------------------------------------------------------------


@pytest.fixture
def net() -> NetConfig:
    group, batch, announce, weights = free_ports(4)
    return NetConfig(group_port=group, batch_port=batch, announce_port=announce, weights_port=weights)


def term(ctx: zmq.Context) -> None:
    """ctx.term(), failing the test instead of hanging when a socket was left open."""
    t = threading.Thread(target=ctx.term, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "zmq context did not terminate: a socket was left open"


@pytest.fixture
def zctx() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    term(ctx)


class Aio:
    """One event loop and asyncio context for a test's Fetchers (as in a rollout server), driven
    synchronously with :meth:`fetch`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ctx = zmq.asyncio.Context()
        self.socks: list[zmq.Socket] = []

    def fetcher(self, net: NetConfig, cfg: WeightsConfig) -> Fetcher:
        sock = cast(zmq.asyncio.Socket, weight_client(self.ctx, net))
        self.socks.append(sock)
        return Fetcher(sock, cfg, timeout_s=10)

    def fetch(self, fetcher: Fetcher, held: Weights | None, with_files: bool = False) -> Weights:
        return self.loop.run_until_complete(asyncio.wait_for(fetcher.fetch(held, with_files), FETCH_S))

    def close(self) -> None:
        close(*self.socks)
        term(self.ctx)
        self.loop.close()


@pytest.fixture
def aio() -> Iterator[Aio]:
    a = Aio()
    yield a
    a.close()


class Publishers:
    """In-process WeightPublishers on ``zctx``; whichever a test did not close is closed at teardown."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.ctx = ctx
        self.open: list[WeightPublisher] = []

    def make(self, net: NetConfig, cfg: WeightsConfig, run_dir: str = "") -> WeightPublisher:
        p = WeightPublisher(self.ctx, net, weights=cfg, run_dir=run_dir)
        self.open.append(p)
        return p

    def close(self, p: WeightPublisher) -> None:
        self.open.remove(p)
        p.close()


@pytest.fixture
def publishers(zctx: zmq.Context) -> Iterator[Publishers]:
    ps = Publishers(zctx)
    yield ps
    for p in list(ps.open):
        ps.close(p)


def segment_store(p: WeightPublisher) -> SegmentStore:
    """The publisher's shared-memory segments (its shm transport's); fails when it offers none."""
    (shm,) = [t for t in p.transports if isinstance(t, ShmTransport)]
    assert shm.store is not None, "the publisher offers no shared memory"
    return shm.store


def publish_packed(p: WeightPublisher, w: Weights) -> Weights:
    """Publish a copy of ``w`` packed into the publisher's own buffer (a segment when shm is offered),
    as the learner does with ``pack_weights(..., alloc=publisher.alloc)``."""
    buf = p.alloc(w.data.shape[0])
    buf[:] = w.data
    out = Weights(version=w.version, model_config=w.model_config, tensors=w.tensors, files=[], data=buf)
    p.publish(out)
    return out


# A learner's publisher alone, in its own process, driven by one JSON line per command on stdin and
# answering one JSON line on stdout. It does not import torch (so there is no torch thread pool to pin):
# the test packs the versions and passes each as a file, copied into publisher.alloc's buffer.
CHILD = r"""
import json, os, sys
import numpy as np, zmq
from learner.publisher import STARTS_PER_S, WeightPublisher
from protocol.config import NetConfig, WeightsConfig
from protocol.messages import Weights

args = json.loads(sys.argv[1])
ctx = zmq.Context()
pub = WeightPublisher(ctx, NetConfig(**args["net"]), files={k: bytes.fromhex(v) for k, v in args["files"].items()},
                      weights=WeightsConfig(**args["weights"]), run_dir=args["run_dir"])

def say(**kw):
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()

say(op="ready", pid=os.getpid(), session=pub.session, shm=bool(pub.metrics()["weights/shm"]))
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "publish":
        raw = np.fromfile(cmd["data"], np.uint8)
        buf = pub.alloc(raw.shape[0])
        buf[:] = raw
        pub.publish(Weights(version=cmd["version"], model_config=cmd["model_config"], tensors=cmd["tensors"],
                            files=[], data=buf))
        say(op="published", version=cmd["version"])
    elif cmd["op"] == "alloc":
        pub.alloc(cmd["nbytes"])
        say(op="allocated")
    elif cmd["op"] == "stats":
        say(op="stats", served=pub.served, bytes_served=pub.bytes_served, deltas_served=pub.deltas_served,
            full_served=pub.full_served, rejected=pub.rejected)
    elif cmd["op"] == "close":
        pub.close()
        ctx.term()
        say(op="closed")
        break
"""


class Child:
    """The CHILD publisher process, with a reader thread on its stdout and its stderr in a log file."""

    def __init__(
        self, tmp: Path, net: NetConfig, cfg: WeightsConfig, run_dir: str = "", files: dict[str, bytes] | None = None
    ) -> None:
        self.tmp, self.log = tmp, tmp / f"publisher-{time.monotonic_ns()}.log"
        args = {
            "net": net.model_dump(),
            "weights": cfg.model_dump(),
            "run_dir": run_dir,
            "files": {k: v.hex() for k, v in (files or {}).items()},
        }
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, json.dumps(args)],
                cwd=ROOT,
                env=child_env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready: dict[str, Any] = {}

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def reply(self, op: str) -> dict[str, Any]:
        deadline = time.monotonic() + REPLY_S
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no {op!r} from the publisher process within {REPLY_S} s; "
                    f"its stderr:\n{self.log.read_text()[-3000:]}"
                ) from None
            if line is None:
                raise AssertionError(
                    f"the publisher process exited (rc {self.proc.poll()}) before {op!r}; "
                    f"its stderr:\n{self.log.read_text()[-3000:]}"
                )
            with contextlib.suppress(ValueError):
                msg = json.loads(line)
                if isinstance(msg, dict) and msg.get("op") == op:
                    return msg

    def ask(self, op: str, reply: str, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self.reply(reply)

    def publish(self, w: Weights) -> None:
        path = self.tmp / f"v{w.version}-{time.monotonic_ns()}.bin"
        w.data.tofile(path)
        assert (
            self.ask(
                "publish",
                "published",
                version=w.version,
                model_config=w.model_config,
                tensors=w.tensors,
                data=str(path),
            )["version"]
            == w.version
        )

    def stats(self) -> dict[str, Any]:
        return self.ask("stats", "stats")

    def close(self) -> None:
        self.ask("close", "closed")
        assert self.proc.wait(10) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    made: list[Child] = []

    def start(net: NetConfig, cfg: WeightsConfig, **kw: Any) -> Child:
        c = Child(tmp_path, net, cfg, **kw)
        made.append(c)  # killed at teardown even if it never gets ready
        c.ready = c.reply("ready")
        return c

    yield start
    for c in made:
        c.kill()


def eventually(read: Callable[[], dict[str, int]], want: dict[str, int]) -> dict[str, int]:
    """A publisher's counters once they reach ``want``. Its serving thread bumps them just after each
    send, so they may trail the reply a client already has by a moment; they must never exceed it."""

    def reached() -> dict[str, int] | None:
        got = read()
        return got if all(got[k] >= v for k, v in want.items()) else None

    got = wait_for(reached, REPLY_S, f"the publisher's counters to reach {want}", detail=lambda: f"they are {read()}")
    assert {k: got[k] for k in want} == want
    return got


def ask_raw(sock: zmq.Socket, req: WeightsRequest) -> WeightsChunk:
    """One request and its reply on a raw (synchronous) weights DEALER."""
    send(sock, req)
    assert sock.poll(RECV_MS, zmq.POLLIN), f"no reply to {req} within {RECV_MS} ms"
    return recv(sock, WeightsChunk)[1]


# -- 1. a delta chain across processes --------------------------------------------------------------


def test_a_delta_chain_reassembles_bit_exactly_across_processes(
    net: NetConfig, aio: Aio, children: Callable[..., Child]
) -> None:
    """A publisher process publishes v0..v5 (fp32 and bf16 tensors); a Fetcher in this process gets v0
    in full (with the tokenizer files), then each next version as a multi-chunk delta from the one it
    holds. Every result is bit-identical to what the learner packed, every delta is smaller than the
    version, and both ends count the same transfers, chunks and bytes."""
    versions = chain()
    files = {"tokenizer.json": b'{"model": "chars"}', "vocab.txt": b"a\nb\nc\n"}
    child = children(net, SMALL, files=files)
    fetcher = aio.fetcher(net, SMALL)
    held: Weights | None = None
    wire: list[int] = []
    for w in versions:
        child.publish(w)
        got = aio.fetch(fetcher, held, with_files=held is None)
        assert same_bytes(got, w), f"v{w.version} differs from what the publisher packed"
        verify(got)
        assert fetcher.last["delta"] == float(held is not None)
        if held is None:
            assert got.files == [[k, len(v)] for k, v in files.items()]
            assert got.file_data.tobytes() == b"".join(files.values())
        else:
            assert held.data.tobytes() == versions[held.version].data.tobytes(), "the delta base was modified"
        wire.append(int(fetcher.last["bytes"]))
        held = got
    full = versions[0].data.nbytes
    assert wire[0] == full and full > 8 * SMALL_CHUNK, "v0 came whole, in many chunks"
    assert all(SMALL_CHUNK < b < full for b in wire[1:]), f"deltas of several chunks, smaller than {full}: {wire}"
    assert fetcher.counters["deltas"] == 5 and fetcher.counters["full"] == 1
    for k in ("weights_rejected", "weights_gone", "stale_replies"):
        assert fetcher.counters[k] == 0, k
    # one chunk reply per chunk asked for, no more; each transfer counted once, as what it was
    stats = eventually(
        child.stats,
        {
            "served": sum(-(-b // SMALL_CHUNK) for b in wire),
            "bytes_served": sum(wire),
            "full_served": 1,
            "deltas_served": 5,
        },
    )
    assert stats["rejected"] == 0
    child.close()


@pytest.mark.parametrize("delta", [True, False])
def test_a_recycled_buffer_receives_the_next_version(
    delta: bool, net: NetConfig, aio: Aio, publishers: Publishers
) -> None:
    """The server gives the buffer of the version it stopped running back to its Fetcher; the next
    transfer (a delta rebuilt into it, or a full version pulled into it) lands there, bit for bit. A
    read-only buffer (as a shared-memory mapping is) is never taken."""
    versions = chain()
    cfg = WeightsConfig(chunk_mib=0.01, window=2, delta=delta)
    pub = publishers.make(net, cfg)
    fetcher = aio.fetcher(net, cfg)
    pub.publish(versions[0])
    held = aio.fetch(fetcher, None)
    spare: np.ndarray | None = None
    for v in (1, 2, 3):
        pub.publish(versions[v])
        got = aio.fetch(fetcher, held)
        assert same_bytes(got, versions[v]) and fetcher.last["delta"] == float(delta)
        if v >= 2:
            assert got.data is spare, f"v{v} was not written into the recycled buffer"
        fetcher.recycle(held)  # installed: the old version's buffer is free
        spare, held = held.data, got
    fresh = aio.fetcher(net, cfg)
    fresh.recycle(versions[0])  # read-only: not taken, though it has the size of the full v3 fetched next
    got = aio.fetch(fresh, None)
    assert same_bytes(got, versions[3]) and got.data is not versions[0].data and got.data.flags.writeable


# -- 2. a faulty learner ---------------------------------------------------------------------------


class FakeLearner(threading.Thread):
    """A raw weights ROUTER (no WeightPublisher) that answers every request with ``respond(req)`` and
    records the requests. The socket is bound here, in the test's thread, and then used by this one."""

    def __init__(self, ctx: zmq.Context, net: NetConfig, respond: Callable[[WeightsRequest], WeightsChunk]) -> None:
        super().__init__(daemon=True, name="fake-learner")
        self.router = weight_server(ctx, net)
        self.respond = respond
        self.requests: list[WeightsRequest] = []
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.done.is_set():
                if self.router.poll(50, zmq.POLLIN):
                    route, req = recv(self.router, WeightsRequest, routed=True)
                    self.requests.append(req)
                    send(self.router, self.respond(req), *route)
        except BaseException as e:  # reported by stop()
            self.error = e
        finally:
            self.router.close(linger=0)

    def stop(self) -> None:
        self.done.set()
        self.join(10)
        assert not self.is_alive() and self.error is None, self.error


def chunk_of(
    req: WeightsRequest, target: Weights, base: int, payload: np.ndarray, chunk_bytes: int, **changes: Any
) -> WeightsChunk:
    """Chunk ``req.chunk`` of ``payload`` (the full version when ``base`` is -1, else a delta), as the
    protocol lays it out (messages.WeightsChunk); ``changes`` overrides fields."""
    k, size = req.chunk, int(payload.shape[0])
    fields: dict[str, Any] = dict(
        fetch=req.fetch,
        version=target.version,
        status="ok",
        base=base,
        encoding="raw" if base < 0 else "diff+zstd",
        chunk=k,
        chunks=max(1, -(-size // chunk_bytes)),
        chunk_bytes=chunk_bytes,
        size=size,
        raw_bytes=int(target.data.shape[0]),
        model_config=target.model_config if k == 0 else "",
        tensors=target.tensors if k == 0 else [],
        data=payload[k * chunk_bytes : (k + 1) * chunk_bytes],
    )
    fields.update(changes)
    return WeightsChunk(**fields)


def claim_content_size(blob: bytes, size: int) -> bytes:
    """The zstd frame ``blob`` with its header's content size rewritten as an 8-byte ``size`` (the
    field every frame of more than 4 GiB has, i.e. every LLM's delta): what one flipped bit in the
    top byte of that field makes of a real delta."""
    fhd = blob[4]
    assert fhd & 0x23 == 0x20, "expected a single-segment frame without a dictionary id"
    fcs = {0: 1, 1: 2, 2: 4, 3: 8}[fhd >> 6]
    return blob[:4] + bytes([(fhd & 0x3F) | 0xC0]) + struct.pack("<Q", size) + blob[5 + fcs :]


def flip(blob: bytes, at: int, mask: int = 0xFF) -> bytes:
    b = bytearray(blob)
    b[at] ^= mask
    return bytes(b)


def faulty_delta(case: str) -> tuple[int, Weights, bytes]:
    """(base, target, delta payload) a faulty learner sends a server holding v0, for each ``case``."""
    v0, v1, v2 = chain()[:3]
    good = encode_delta(v0, v1)
    if case == "zstd-byte":  # a byte of the compressed stream flipped
        return 0, v1, flip(good, len(good) // 2)
    if case == "delta-bit":  # decompresses fine, one bit of one weight is wrong: only the digests can tell
        inner = bytearray(zstandard.ZstdDecompressor().decompress(good))
        inner[len(inner) // 3] ^= 0x10
        return 0, v1, zstandard.ZstdCompressor(level=1).compress(bytes(inner))
    if case == "wrong-base":  # a correct delta, from a version this server does not hold
        return 1, v2, encode_delta(v1, v2)
    if case == "huge-content-size":  # the frame header claims 2**62 bytes
        return 0, v1, claim_content_size(good, 1 << 62)
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["zstd-byte", "delta-bit", "wrong-base", "huge-content-size"])
def test_a_faulty_delta_is_rejected_and_the_full_version_is_fetched(
    case: str, net: NetConfig, zctx: zmq.Context, aio: Aio
) -> None:
    """A learner answers a server holding v0 with a faulty delta (a corrupted byte of the zstd stream,
    a wrong bit inside a stream that decompresses, a correct delta from another base, or a frame
    header claiming an absurd size), and the full version correctly when asked with ``have = -1``.
    The Fetcher refuses the delta (``weights_rejected == 1``), asks for the full version, returns the
    target bit for bit, and leaves the version it holds untouched until then."""
    v0 = chain()[0]
    base, target, blob = faulty_delta(case)
    delta = np.frombuffer(blob, np.uint8)
    chunk_bytes = 8192

    def respond(req: WeightsRequest) -> WeightsChunk:
        if req.have >= 0:  # a delta transfer (every chunk of it names the base)
            return chunk_of(req, target, base, delta, chunk_bytes)
        return chunk_of(req, target, -1, target.data, chunk_bytes)

    learner = FakeLearner(zctx, net, respond)
    learner.start()
    try:
        fetcher = aio.fetcher(net, WeightsConfig(window=2))
        before = v0.data.tobytes()
        try:
            got = aio.fetch(fetcher, v0)
        except MemoryError:
            pytest.fail(
                f"BUG ({case}): a delta whose zstd header claims 2**62 bytes made Fetcher.fetch raise "
                "MemoryError (protocol/weights.py apply_delta catches only zstandard.ZstdError, and "
                "max_output_size does not apply to a frame that declares its content size) instead "
                "of rejecting it and fetching the full version"
            )
    finally:
        learner.stop()
    assert same_bytes(got, target), "the full version arrived bit for bit"
    assert v0.data.tobytes() == before, "the held version was not touched"
    assert fetcher.counters["weights_rejected"] == 1 and fetcher.counters["full"] == 1
    assert fetcher.counters["deltas"] == 0 and fetcher.counters["weights_gone"] == 0
    asked = learner.requests
    assert (asked[0].have, asked[0].chunk) == (0, 0), "the first request offered v0 as the base"
    full_from = next(i for i, r in enumerate(asked) if r.have == -1)
    assert all(r.have == 0 for r in asked[:full_from]) and all(r.have == -1 for r in asked[full_from:])
    delta_chunks = max(1, -(-delta.shape[0] // chunk_bytes))
    if case == "wrong-base":
        assert full_from == 1, "a delta from a base it does not hold is refused at its first chunk"
    else:
        assert full_from == delta_chunks, "the whole delta was pulled, refused, then the full version asked for"
    assert sorted(r.chunk for r in asked[full_from:]) == list(range(-(-target.data.shape[0] // chunk_bytes)))


def test_a_chunk_that_belongs_to_another_transfer_is_rejected(net: NetConfig, zctx: zmq.Context, aio: Aio) -> None:
    """A learner answers one chunk of a delta transfer with a chunk of another layout (a different
    size): the Fetcher abandons that transfer (rejected), the replies still in flight for it are
    skipped as stale, and the full version it fetches next is exact."""
    v0, v1 = chain()[:2]
    delta = np.frombuffer(encode_delta(v0, v1), np.uint8)
    chunk_bytes = 8192

    def respond(req: WeightsRequest) -> WeightsChunk:
        if req.have < 0:
            return chunk_of(req, v1, -1, v1.data, chunk_bytes)
        reply = chunk_of(req, v1, 0, delta, chunk_bytes)
        if req.chunk == 2:  # the same chunk, claiming a payload one chunk longer
            return chunk_of(req, v1, 0, delta, chunk_bytes, size=reply.size + chunk_bytes, chunks=reply.chunks + 1)
        return reply

    learner = FakeLearner(zctx, net, respond)
    learner.start()
    try:
        fetcher = aio.fetcher(net, WeightsConfig(window=2))
        got = aio.fetch(fetcher, v0)
    finally:
        learner.stop()
    assert same_bytes(got, v1)
    assert fetcher.counters["weights_rejected"] == 1 and fetcher.counters["full"] == 1
    delta_asked = sum(r.have == 0 for r in learner.requests)
    assert delta_asked >= 3, "chunk 2 of the delta was asked for"
    assert fetcher.counters["stale_replies"] <= delta_asked - 3, "only replies of the abandoned transfer are stale"


# -- 3. a late joiner --------------------------------------------------------------------------------


def test_a_late_joiner_catches_up_and_an_evicted_base_gets_the_full_version(
    net: NetConfig, aio: Aio, children: Callable[..., Child]
) -> None:
    """keep_versions=3. A server that joins after v0..v4 were published gets v4 in full, then v5 as a
    delta from v4. A server still holding v0 when v5 is the latest (v0 no longer kept) gets v5 in
    full: no error, no gone."""
    versions = chain()
    cfg = WeightsConfig(keep_versions=3, chunk_mib=0.01, window=2)
    child = children(net, cfg)
    child.publish(versions[0])
    early = aio.fetcher(net, cfg)
    held0 = aio.fetch(early, None)
    assert same_bytes(held0, versions[0])
    for w in versions[1:5]:
        child.publish(w)
    late = aio.fetcher(net, cfg)
    got4 = aio.fetch(late, None)
    assert same_bytes(got4, versions[4]) and late.last["delta"] == 0.0
    child.publish(versions[5])
    got5 = aio.fetch(late, got4)
    assert same_bytes(got5, versions[5]) and late.last["delta"] == 1.0
    assert late.last["bytes"] < versions[5].data.nbytes
    assert (late.counters["full"], late.counters["deltas"]) == (1, 1)
    caught_up = aio.fetch(early, held0)
    assert same_bytes(caught_up, versions[5]) and early.last["delta"] == 0.0
    assert early.last["bytes"] == versions[5].data.nbytes
    assert (early.counters["full"], early.counters["deltas"]) == (2, 0)
    for f in (early, late):
        assert f.counters["weights_gone"] == f.counters["weights_rejected"] == 0
    stats = eventually(child.stats, {"full_served": 3, "deltas_served": 1})
    assert stats["rejected"] == 0
    child.close()


# -- 4. a throttled subscriber ---------------------------------------------------------------------

SLOW_S = 0.1  # the throttled client's pause before each chunk request


class ThrottledClient(threading.Thread):
    """A raw DEALER (own context) that pulls a full version one chunk at a time, pausing SLOW_S before
    each request while ``throttle`` is set; ``received`` counts the chunks it has."""

    def __init__(self, net: NetConfig) -> None:
        super().__init__(daemon=True, name="throttled-client")
        self.net = net
        self.throttle, self.started = threading.Event(), threading.Event()
        self.throttle.set()
        self.received = self.chunks = 0
        self.outcome = ""  # "complete" or "gone"
        self.version = -1
        self.payload = np.empty(0, np.uint8)
        self.error: BaseException | None = None

    def run(self) -> None:
        ctx = zmq.Context()
        sock = weight_client(ctx, self.net)
        try:
            first = ask_raw(sock, WeightsRequest(version=-1, fetch=7))
            assert first.status == "ok" and first.base == -1
            self.version, self.chunks = first.version, first.chunks
            self.payload = np.empty(first.size, np.uint8)
            self.payload[: first.data.shape[0]] = first.data
            self.received = 1
            self.started.set()
            for k in range(1, first.chunks):
                if self.throttle.is_set():
                    time.sleep(SLOW_S)  # not a wait: this client is the slow peer the test is about
                part = ask_raw(sock, WeightsRequest(version=first.version, chunk=k, fetch=7))
                if part.status == "gone":
                    self.outcome = "gone"
                    return
                assert (part.version, part.chunk, part.chunks) == (first.version, k, first.chunks)
                self.payload[k * part.chunk_bytes : k * part.chunk_bytes + part.data.shape[0]] = part.data
                self.received += 1
            self.outcome = "complete"
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.started.set()
            close(sock)
            term(ctx)


@pytest.mark.parametrize(("keep", "pin_s"), [(2, 30.0), (1, 30.0), (1, 0.0)])
def test_a_throttled_client_does_not_slow_the_others(
    keep: int, pin_s: float, net: NetConfig, aio: Aio, publishers: Publishers
) -> None:
    """An 8 MiB version in 64 chunks. A throttled client starts pulling it one chunk at a time; while
    it has fewer than half of its chunks, a normal Fetcher (window 4) gets the same version, the
    learner publishes the next one and the Fetcher gets that too (a delta when the old version is
    still kept). Afterwards the throttled client finishes its transfer bit for bit: its version is
    still kept (keep_versions=2), or was evicted but pinned by the transfer in progress (keep 1);
    without pins (pin_s=0) an evicted version is answered ``gone``."""
    v0, v1 = big_versions()
    cfg = WeightsConfig(chunk_mib=0.125, window=4, keep_versions=keep, pin_s=pin_s)
    pub = publishers.make(net, cfg)
    pub.publish(v0)
    slow = ThrottledClient(net)
    slow.start()
    assert slow.started.wait(RECV_MS / 1000) and slow.error is None, slow.error
    assert slow.chunks == 64
    try:
        fast = aio.fetcher(net, cfg)
        got0 = aio.fetch(fast, None)
        pub.publish(v1)
        got1 = aio.fetch(fast, got0)
        received_when_done = slow.received
    finally:
        slow.throttle.clear()
        slow.join(30)
    assert not slow.is_alive() and slow.error is None, slow.error
    assert same_bytes(got0, v0) and same_bytes(got1, v1)
    assert fast.last["delta"] == float(keep > 1), "a delta when v0 is still kept, else the full version"
    assert received_when_done < slow.chunks // 2, (
        f"the fast fetcher needed the throttled client to get {received_when_done} of {slow.chunks} chunks first"
    )
    if pin_s > 0:
        assert slow.outcome == "complete" and slow.received == slow.chunks
        assert slow.payload.tobytes() == v0.data.tobytes(), "the throttled transfer is exact"
        assert (pub.pinned_served > 0) == (keep == 1), "chunks of an evicted version come from the pin"
        assert not pub._pins, "a completed transfer releases its pin"
    else:
        assert slow.outcome == "gone" and slow.received < slow.chunks


def test_pins_are_bounded_and_expire(net: NetConfig, zctx: zmq.Context, publishers: Publishers) -> None:
    """keep_versions=1, max_pinned=1: two transfers in progress (of v0 and of v1) see both versions
    evicted; only the newer pin survives, so the v0 transfer is told ``gone`` and the v1 transfer
    completes bit for bit. A third transfer that goes silent for longer than pin_s loses its pin."""
    versions = chain()
    cfg = WeightsConfig(chunk_mib=0.01, window=1, keep_versions=1, max_pinned=1, pin_s=2.0)
    pub = publishers.make(net, cfg)
    a, b, c = (weight_client(zctx, net) for _ in range(3))
    try:
        pub.publish(versions[0])
        first_a = ask_raw(a, WeightsRequest(version=-1, fetch=1))
        pub.publish(versions[1])
        first_b = ask_raw(b, WeightsRequest(version=-1, fetch=2))
        assert (first_a.version, first_b.version, first_a.chunks) == (0, 1, 10)
        pub.publish(versions[2])  # v0 and v1 evicted; both are pinned, one more than max_pinned
        part = ask_raw(a, WeightsRequest(version=0, chunk=1, fetch=1))
        assert part.status == "gone", "the oldest pin beyond max_pinned is dropped"
        payload = np.empty(first_b.size, np.uint8)
        payload[: first_b.data.shape[0]] = first_b.data
        for k in range(1, first_b.chunks):
            part = ask_raw(b, WeightsRequest(version=1, chunk=k, fetch=2))
            assert part.status == "ok" and part.version == 1
            payload[k * part.chunk_bytes : k * part.chunk_bytes + part.data.shape[0]] = part.data
        assert payload.tobytes() == versions[1].data.tobytes()
        assert pub.pins_dropped == 1 and pub.pinned_served == first_b.chunks - 1

        first_c = ask_raw(c, WeightsRequest(version=-1, fetch=3))
        assert first_c.version == 2
        pub.publish(versions[3])  # v2 evicted, pinned by c's transfer, which now goes silent
        wait_for(lambda: pub.pins_expired, REPLY_S, "the silent transfer's pin to expire")
        assert pub.pins_expired == 1
        assert ask_raw(c, WeightsRequest(version=2, chunk=1, fetch=3)).status == "gone"
        assert pub.metrics()["weights/pins_expired"] == 1
    finally:
        close(a, b, c)


def test_a_peer_flooding_transfer_starts_is_throttled_and_an_honest_peer_still_fetches(
    net: NetConfig, zctx: zmq.Context, aio: Aio, publishers: Publishers
) -> None:
    """Issue 19: one peer sent 178,500 requests for new transfers. Each peer may start at most
    ``STARTS_PER_S`` a second: the flood's starts beyond that get no reply and are counted
    (``weights/throttled``), and another peer fetches the version bit for bit meanwhile."""
    versions = chain()
    pub = publishers.make(net, SMALL)
    pub.publish(versions[0])
    flood = weight_client(zctx, net)
    sent, answered = 2000, [0]

    def settled() -> int | None:
        """The flood's throttled starts, once each of its requests is answered or throttled."""
        while flood.poll(0):
            flood.recv_multipart()
            answered[0] += 1
        return pub.starts.refused if pub.starts.refused + answered[0] >= sent else None

    try:
        started = time.monotonic()
        for i in range(sent):
            send(flood, WeightsRequest(version=-1, fetch=i))
        got = aio.fetch(aio.fetcher(net, SMALL), None)
        assert same_bytes(got, versions[0])
        throttled = wait_for(settled, REPLY_S, "every flooded start to be answered or throttled")
        assert answered[0] <= STARTS_PER_S * (1 + time.monotonic() - started)  # a burst, then the rate
        assert pub.metrics()["weights/throttled"] == throttled == sent - answered[0]
    finally:
        close(flood)


def test_reads_are_bounded_for_all_peers_together_and_an_honest_fetch_gets_its_turn(
    net: NetConfig, zctx: zmq.Context, aio: Aio, publishers: Publishers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19: the serving thread shares the learner's GIL with training, and a flood of 35,000
    requests a second cost it 0.4 of a core even dropped undecoded. The thread reads at most
    ``READS_PER_S`` requests a second (here 500), the rest wait in their peers' queues; ZeroMQ's fair
    queueing still gives another peer its turn, so it fetches the version meanwhile."""
    monkeypatch.setattr(publisher_module, "READS_PER_S", 500.0)
    versions = chain()
    pub = publishers.make(net, SMALL)
    pub.publish(versions[0])
    flood = weight_client(zctx, net)
    try:
        started = time.monotonic()
        for i in range(3000):
            send(flood, WeightsRequest(version=-1, fetch=i))
        got = aio.fetch(aio.fetcher(net, SMALL), None)
        assert same_bytes(got, versions[0])
        wait_for(lambda: pub.reads.pauses, REPLY_S, "the read budget to run out")
        handled = pub.starts.refused + pub.metrics()["weights/chunks_served"]
        assert handled <= 500 * (time.monotonic() - started) + 500 + 64  # the rate, a burst, one burst read
        assert handled < 3000
    finally:
        close(flood)


# -- 5. shared memory ----------------------------------------------------------------------------


@pytest.fixture
def shm_dir(tmp_path: Path) -> Path:
    """A directory for segments: under tmp_path when it can reserve space (posix_fallocate), else
    /dev/shm (segment names carry the key of this test's unique run directory)."""
    d = tmp_path / "shm"
    d.mkdir()
    probe = d / "probe"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, 4096)
        finally:
            os.close(fd)
        probe.unlink()
        return d
    except OSError:
        return Path("/dev/shm")


def segments(d: Path, key: str) -> list[str]:
    """This run key's segment files, sealed and unfinished."""
    return sorted(p.name for p in d.iterdir() if p.name.startswith((f"podsrl-{key}-", f".podsrl-{key}-")))


def announcement(sub: zmq.Socket, version: int) -> WeightsAnnouncement:
    """The first announcement of ``version`` (earlier ones, and repeats, are skipped)."""
    deadline = time.monotonic() + RECV_MS / 1000
    while (left := deadline - time.monotonic()) > 0:
        if sub.poll(int(left * 1000) + 1, zmq.POLLIN):
            ann = recv(sub, WeightsAnnouncement)[1]
            if ann.version == version:
                return ann
    raise AssertionError(f"no announcement of v{version}")


def test_the_shared_memory_path_is_used_and_leaves_no_segment(
    net: NetConfig, zctx: zmq.Context, aio: Aio, publishers: Publishers, tmp_path: Path, shm_dir: Path
) -> None:
    """A publisher with a run directory packs each version into a segment (``alloc``): the
    announcement names it and this machine, so a rollout server here maps it (``shared_segment``,
    ``read_shared``; not with transport 'net' or from another machine) and gets the same bytes as
    the network transfer. Only the newest keep_versions segments exist (a reader that mapped an
    evicted one still reads it), and close() removes every segment of the run."""
    versions = chain()
    run_dir = tmp_path / "run"
    key = run_key(run_dir)
    cfg = WeightsConfig(shm_dir=str(shm_dir), keep_versions=2)
    sub = announce_subscriber(zctx, net)
    try:
        pub = publishers.make(net, cfg, run_dir=str(run_dir))
        assert segment_store(pub).stale_removed == 0
        published = publish_packed(pub, versions[0])
        ann = announcement(sub, 0)
        assert (ann.shm, ann.host, ann.session) == (segment_name(key, 0), host_id(), pub.session)
        assert ann.nbytes == versions[0].data.nbytes
        mapped0 = read_segment(shm_dir / ann.shm, 0, ann.session, ann.manifest)
        assert same_bytes(mapped0, versions[0])
        base = published.data.base
        assert isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap), "packed straight into the segment"
        path = shared_segment(cfg, ann)  # what a rollout server on this machine maps instead of fetching
        assert path == shm_dir / ann.shm
        assert same_bytes(aio.loop.run_until_complete(read_shared(path, ann)), versions[0])
        assert shared_segment(cfg.model_copy(update={"transport": "net"}), ann) is None
        assert shared_segment(cfg, dataclasses.replace(ann, host="boot:another-machine")) is None
        over_net = aio.fetch(aio.fetcher(net, cfg), None)
        assert same_bytes(over_net, versions[0]), "the network path serves the segment's bytes"
        with pytest.raises(ProtocolError):  # another learner session's segment is not taken for this one
            read_segment(shm_dir / ann.shm, 0, ann.session ^ 1, ann.manifest)
        for w in versions[1:4]:
            publish_packed(pub, w)
        assert announcement(sub, 3).shm == segment_name(key, 3)
        assert segments(shm_dir, key) == [segment_name(key, 2), segment_name(key, 3)]
        with pytest.raises(FileNotFoundError):
            read_segment(shm_dir / segment_name(key, 0), 0, pub.session, manifest(versions[0]))
        assert mapped0.data.tobytes() == versions[0].data.tobytes(), "a mapping outlives its removed segment"
        assert same_bytes(
            read_segment(shm_dir / segment_name(key, 3), 3, pub.session, manifest(versions[3])), versions[3]
        )
        publishers.close(pub)
        assert segments(shm_dir, key) == []
    finally:
        close(sub)


def test_a_killed_publishers_segments_are_removed_by_the_next_one(
    net: NetConfig, publishers: Publishers, children: Callable[..., Child], tmp_path: Path, shm_dir: Path
) -> None:
    """A publisher process publishes v0 into shared memory, allocates the next segment, and is
    SIGKILLed: both files remain. The next publisher of the same run directory removes them at start
    (``stale_removed``), leaves other runs' segments alone, and then only its own segments exist."""
    run_dir = tmp_path / "run"
    other = shm_dir / segment_name(run_key(tmp_path / "another-run"), 0)
    other.write_bytes(b"another run's segment")
    try:
        _killed_then_restarted(net, publishers, children, run_dir, shm_dir, other)
    finally:
        other.unlink(missing_ok=True)


def _killed_then_restarted(
    net: NetConfig, publishers: Publishers, children: Callable[..., Child], run_dir: Path, shm_dir: Path, other: Path
) -> None:
    key = run_key(run_dir)
    cfg = WeightsConfig(shm_dir=str(shm_dir))
    child = children(net, cfg, run_dir=str(run_dir))
    assert child.ready["shm"], "the child publisher offers shared memory"
    v0 = chain()[0]
    child.publish(v0)
    child.ask("alloc", "allocated", nbytes=v0.data.nbytes)
    killed = read_segment(shm_dir / segment_name(key, 0, child.ready["pid"]), 0, child.ready["session"], manifest(v0))
    assert same_bytes(killed, v0)
    child.kill()
    assert child.proc.returncode == -signal.SIGKILL
    assert segments(shm_dir, key) == [
        f".podsrl-{key}-{child.ready['pid']}-1.tmp",
        segment_name(key, 0, child.ready["pid"]),
    ]

    net2 = net.model_copy(update=dict(zip(("announce_port", "weights_port"), free_ports(2), strict=True)))
    pub = publishers.make(net2, cfg, run_dir=str(run_dir))
    assert segment_store(pub).stale_removed == 2
    assert segments(shm_dir, key) == [] and other.exists()
    publish_packed(pub, chain()[1])
    assert segments(shm_dir, key) == [segment_name(key, 1)]
    assert same_bytes(read_segment(shm_dir / segment_name(key, 1), 1, pub.session, manifest(chain()[1])), chain()[1])
    publishers.close(pub)
    assert segments(shm_dir, key) == [] and other.exists()


# -- 5b. shared memory that cannot be poisoned ----------------------------------------------------


def flip_a_byte(path: Path, versions: tuple[Weights, ...]) -> None:
    """A local process flips one byte of the first tensor, in place (the learner's mapping sees it)."""
    with path.open("r+b") as f:
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 1]))


def forge(path: Path, versions: tuple[Weights, ...]) -> None:
    """A local process rewrites tensor ``proj`` and its digest in the segment's own header, in place: a
    segment consistent with itself (the digests it carries match its bytes), unlike what was announced."""
    raw = bytearray(path.read_bytes())
    head_len, magic = struct.unpack_from("<Q8s", raw, len(raw) - 16)
    start = len(raw) - 16 - head_len
    head = msgpack.unpackb(bytes(raw[start : len(raw) - 16]), raw=False)
    entry = next(t for t in head["tensors"] if t[0] == "proj")
    offset, nbytes = entry[3], entry[4]
    raw[offset : offset + nbytes] = bytes([0x3F]) * nbytes
    entry[5] = digest(np.frombuffer(bytes(raw[offset : offset + nbytes]), np.uint8))
    header = msgpack.packb(head, use_bin_type=True)
    with path.open("r+b") as f:
        f.write(raw[:start])
        f.write(header)
        f.write(struct.pack("<Q8s", len(header), magic))
        f.truncate()
    v = head["version"]
    forged = read_segment(path, v, head["session"], manifest_digest(head["tensors"]))  # (what the old check took)
    assert forged.data.tobytes() != versions[v].data.tobytes()


@contextlib.contextmanager
def weights_client(aio: Aio, net: NetConfig, cfg: WeightsConfig, run_dir: Path) -> Iterator[WeightsClient]:
    """A rollout server's weights client (every source: shared memory, then the network) on ``aio``'s loop."""
    monitor = Monitor(run_dir, "rollout-test", tensorboard=False)
    warn = RateLimitedLog(logging.getLogger("podsrl.rollout"), every_s=30.0)
    client = WeightsClient(aio.ctx, Config(net=net, weights=cfg), None, None, monitor, warn, lambda: False)
    try:
        yield client
    finally:
        client.close()
        monitor.close()


@pytest.mark.parametrize("tamper", [flip_a_byte, forge], ids=["byte-flipped", "forged-with-its-digest"])
def test_a_tampered_segment_is_never_loaded_and_the_learner_serves_its_own_state(
    net: NetConfig,
    zctx: zmq.Context,
    aio: Aio,
    publishers: Publishers,
    tmp_path: Path,
    shm_dir: Path,
    tamper: Callable[[Path, tuple[Weights, ...]], None],
) -> None:
    """A local process writes into the segment of the latest version (the learner's own packed buffer).
    A rollout server checks the segment against the announced manifest digest, not against itself: the
    corruption is detected and counted, never loaded, and reported with the network request. The learner
    finds its copy differs from its digests, serves nothing of it (the request waits), has the training
    thread pack the version again from the model's state into ordinary memory, and offers no segment
    from then on: the server gets the right bytes over the network."""
    versions = chain()
    cfg = WeightsConfig(shm_dir=str(shm_dir), keep_versions=2)
    sub = announce_subscriber(zctx, net)
    try:
        pub = publishers.make(net, cfg, run_dir=str(tmp_path / "run"))
        publish_packed(pub, versions[0])
        ann = announcement(sub, 0)
        assert ann.shm and ann.manifest == manifest(versions[0])
        tamper(shm_dir / ann.shm, versions)
        with pytest.raises(ProtocolError):
            read_segment(shm_dir / ann.shm, 0, ann.session, ann.manifest)

        repacked: list[Weights] = []

        def training_thread() -> None:  # (Lead.repack, while the learner waits for a batch)
            wait_for(lambda: pub.repack_due(0), REPLY_S, "the publisher asking for v0 again")
            repacked.append(publish_packed(pub, versions[0]))

        trainer = threading.Thread(target=training_thread)
        trainer.start()
        with weights_client(aio, net, cfg, tmp_path / "rollout") as client:
            client.heard(ann)
            w = aio.loop.run_until_complete(asyncio.wait_for(client.fetch_latest(), FETCH_S))
            counters = client.all_counters()
        trainer.join(REPLY_S)
        assert w is not None and same_bytes(w, versions[0]), "the learner's bytes, not the segment's"
        assert (counters["shm_corrupt"], counters["shm_fallbacks"], counters["shm_loads"], counters["full"]) == (
            1,
            1,
            0,
            1,
        )
        assert pub.metrics()["weights/shm_corrupt"] == 1 and not pub.repack_due(0)
        assert not isinstance(repacked[0].data.base, memoryview), "re-packed into ordinary memory"
        deadline = time.monotonic() + RECV_MS / 1000
        while announcement(sub, 0).shm:  # (announcements sent before the report still name the segment)
            assert time.monotonic() < deadline, "v0 is still announced in shared memory"
        published = publish_packed(pub, versions[1])
        assert announcement(sub, 1).shm == "" and not isinstance(published.data.base, memoryview)
    finally:
        close(sub)


def test_a_network_copy_unlike_the_announced_manifest_is_rejected(
    net: NetConfig, aio: Aio, publishers: Publishers, tmp_path: Path
) -> None:
    """The network transfer is checked against the announcement too: a version whose manifest is not the
    announced one is counted and not returned (the server asks again), never loaded."""
    pub = publishers.make(net, WeightsConfig())
    publish_packed(pub, chain()[0])
    with weights_client(aio, net, WeightsConfig(transport="net"), tmp_path) as client:
        client.heard(WeightsAnnouncement(version=0, final=False, session=pub.session, manifest=manifest(chain()[1])))
        assert aio.loop.run_until_complete(asyncio.wait_for(client.fetch_latest(), FETCH_S)) is None
        assert client.all_counters()["weights_rejected"] == 1
        client.heard(WeightsAnnouncement(version=0, final=False, session=pub.session, manifest=manifest(chain()[0])))
        w = aio.loop.run_until_complete(asyncio.wait_for(client.fetch_latest(), FETCH_S))
        assert w is not None and same_bytes(w, chain()[0])


# -- 6. hostile requests -------------------------------------------------------------------------


def test_hostile_requests_do_not_break_the_publisher(
    net: NetConfig, zctx: zmq.Context, aio: Aio, publishers: Publishers
) -> None:
    """Garbage frames, another message type, a request that breaks the invariants, a chunk beyond the
    count (all counted in ``rejected``; the chunk beyond the count is also answered ``gone``), requests for a
    version never published or a delta
    that cannot be made (answered ``gone``) and a frame over the link's size limit (the peer is
    dropped) leave the publisher serving: the next request on the same socket, and a normal fetch,
    get exact replies."""
    versions = chain()
    cfg = WeightsConfig(chunk_mib=0.01, window=2)
    pub = publishers.make(net, cfg)
    publish_packed(pub, versions[0])
    raw = weight_client(zctx, net)
    huge = weight_client(zctx, net)
    events = huge.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        huge.send(b"x" * (2 << 20))  # over the weights ROUTER's 1 MiB frame limit: libzmq drops the peer
        assert events.poll(RECV_MS, zmq.POLLIN), "the oversized frame did not make the publisher drop its sender"
        assert recv_monitor_message(events)["event"] == zmq.EVENT_DISCONNECTED
    finally:
        huge.disable_monitor()
        close(events, huge)
    hostile: list[list[bytes]] = [
        [b"\xc1 not msgpack"],
        [bytes(f) for f in encode(WeightsAnnouncement(version=0, final=False))],
        [bytes(f) for f in encode(WeightsRequest(version=-5))],  # below -1
        [bytes(f) for f in encode(WeightsRequest(version=-1, chunk=1 << 40))],  # beyond MAX_CHUNKS
        [*(bytes(f) for f in encode(WeightsRequest(version=-1))), b"extra frame"],
    ]
    try:
        for frames in hostile:
            raw.send_multipart(frames)
        send(raw, WeightsRequest(version=-1, chunk=10**6, fetch=1))  # well formed, but v0 has ~10 chunks
        send(raw, WeightsRequest(version=7, fetch=2))  # never published
        send(raw, WeightsRequest(version=0, have=0, chunk=1, fetch=3))  # a delta v0 -> v0 cannot be made
        send(raw, WeightsRequest(version=-1, fetch=4))
        replies: list[WeightsChunk] = []  # one connection: the replies come in request order
        while not replies or replies[-1].fetch != 4:
            assert raw.poll(RECV_MS, zmq.POLLIN), f"no more replies after {replies}"
            replies.append(recv(raw, WeightsChunk)[1])
    finally:
        close(raw)
    # the chunk beyond the count is answered "gone" too (its client starts again instead of timing out)
    assert [(r.fetch, r.status, r.version) for r in replies] == [
        (1, "gone", 0),
        (2, "gone", 7),
        (3, "gone", 0),
        (4, "ok", 0),
    ]
    good = replies[-1]
    assert (good.chunk, good.chunks, good.base) == (0, -(-versions[0].data.nbytes // SMALL_CHUNK), -1)
    assert good.data.tobytes() == versions[0].data[:SMALL_CHUNK].tobytes()
    assert pub.rejected == len(hostile) + 1, "every malformed request, and the chunk beyond the count, is counted"
    eventually(
        lambda: {"full_served": pub.full_served, "deltas_served": pub.deltas_served},
        {"full_served": 1, "deltas_served": 0},
    )
    got = aio.fetch(aio.fetcher(net, cfg), None)
    assert same_bytes(got, versions[0])
    publish_packed(pub, versions[1])
    fetcher = aio.fetcher(net, cfg)
    assert same_bytes(aio.fetch(fetcher, got), versions[1]) and fetcher.last["delta"] == 1.0


def test_segments_of_a_dead_learner_of_any_run_are_removed_at_start(tmp_path: Path) -> None:
    """A learner killed in a run that is never restarted leaves its segments; the next learner on the
    machine, of any run, removes those whose process is gone and leaves live learners' alone."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    gone_pid = int(dead.stdout)
    left = tmp_path / segment_name("aaaaaaaaaaaa", 3, gone_pid)
    alive = tmp_path / segment_name("bbbbbbbbbbbb", 3, 1)  # pid 1 lives as long as the machine
    for p in (left, alive):
        p.write_bytes(b"x")
    store = SegmentStore(tmp_path, "cccccccccccc", session=7)
    assert store.stale_removed == 1 and not left.exists() and alive.exists()


def test_deltas_that_do_not_pay_give_way_to_full_versions(net: NetConfig, aio: Aio, publishers: Publishers) -> None:
    """A delta larger than ``delta_max_ratio`` of the version is not worth encoding: once one is seen,
    the publisher sends full versions (and stops encoding deltas eagerly) until a probe pays again."""
    versions = chain()  # deltas are ~45% of a version here
    cfg = WeightsConfig(chunk_mib=0.01, window=2, delta_max_ratio=0.05)
    pub = publishers.make(net, cfg)
    publish_packed(pub, versions[0])
    fetcher = aio.fetcher(net, cfg)
    held = aio.fetch(fetcher, None)
    publish_packed(pub, versions[1])
    held = aio.fetch(fetcher, held)  # the delta v0->v1 was encoded (eagerly), and found too large
    assert same_bytes(held, versions[1]) and not pub._deltas_pay
    publish_packed(pub, versions[2])
    held = aio.fetch(fetcher, held)
    assert same_bytes(held, versions[2]) and fetcher.last["delta"] == 0.0
    assert fetcher.last["bytes"] == versions[2].data.nbytes and (1, 2) not in pub._deltas
    relaxed = publishers.make(
        net.model_copy(update=dict(zip(("announce_port", "weights_port"), free_ports(2), strict=True))),
        WeightsConfig(chunk_mib=0.01),
    )
    publish_packed(relaxed, versions[0])
    publish_packed(relaxed, versions[1])
    assert relaxed._delta(versions[0], versions[1]).result(timeout=10).shape[0] < versions[1].data.nbytes / 2
    assert relaxed._deltas_pay


def test_a_subscriber_that_joins_hears_the_latest_version_at_once(
    net: NetConfig, zctx: zmq.Context, publishers: Publishers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The announce socket is an XPUB: a process that subscribes after version 0 was announced hears it
    at once, not at the next periodic repeat (the start-up of every rollout server and of the selector
    waited up to a second for it). The repeat is pushed out of reach here, so only a join can deliver;
    every joiner is heard, not only the first of a topic (XPUB_VERBOSE)."""
    monkeypatch.setattr(publisher_module, "ANNOUNCE_EVERY_S", 600.0)
    pub = publishers.make(net, WeightsConfig(transport="net"))
    pub.publish(chain()[0])
    for _ in range(3):
        sub = announce_subscriber(zctx, net)
        try:
            assert announcement(sub, 0).session == pub.session
        finally:
            close(sub)


def test_a_failed_serving_thread_stops_the_learner(net: NetConfig, tmp_path: Path) -> None:
    """The weights server runs in its own thread: if it fails, the learner must not train on unseen
    while no rollout server can fetch a version (it would wait for batches forever). The failure is
    logged and the main thread interrupted, so the process exits non-zero."""
    script = tmp_path / "serving.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import time, zmq
            from learner.publisher import STARTS_PER_S, WeightPublisher
            from protocol.config import NetConfig, WeightsConfig

            def broken(self):
                raise RuntimeError("a bug in the serving loop")

            WeightPublisher._announce = broken  # called within ANNOUNCE_EVERY_S of the start
            net = NetConfig(**{net.model_dump()!r})
            p = WeightPublisher(zmq.Context(), net, weights=WeightsConfig(transport="net"))
            time.sleep(60)  # the training thread, waiting for a batch
            print("not stopped")
            """
        )
    )
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=child_env())
    assert res.returncode != 0 and "not stopped" not in res.stdout
    assert "the weights server thread failed; stopping the learner" in res.stderr
    assert "a bug in the serving loop" in res.stderr and time.monotonic() - t0 < 30
