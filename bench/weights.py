"""Weight sync: what a version costs on the wire, in time to every rollout server, through shared memory,
with a slow subscriber attached, and while generating.

(1) Bytes on the wire per version, delta vs full. (a) The tiny default model (``launcher.tiny``,
    fp32, as published by default) trained 10 AdamW steps at the default ``learner.lr`` and at 3e-3 on a
    real next-token cross-entropy loss of random token batches (grad clip 1.0, as the learner): the size of
    ``encode_delta(v, v+1)`` and ``encode_delta(v, v+2)`` (zstd of the word-wise difference, ``weights.zstd_level``)
    over the version's raw bytes, medians over the run. (b) A ~100M-parameter Llama (quick: ~1M) with
    fp32 master weights updated by AdamW at lr 1e-6 and at 1e-5 (two steps from init, a real loss on
    a random 2 x 16 batch), published cast to bf16 as ``model.dtype = "bfloat16"`` does: delta bytes
    over full bytes, goal <= 10%. (c) The time of ``encode_delta`` (difference + zstd, the publisher's side)
    and of ``apply_delta`` (unzstd + add + digest check, the rollout server's side) on (b)'s lr 1e-5
    delta, beside a numpy memcpy of the version's raw bytes.
(2) Time from a new version existing to all R = 1, 2, 4 rollout clients having it fetched and
    verified, each client a separate process (spawn, so no shared GIL) running the real ``Fetcher`` on
    a uvloop loop, with a SUB ``announce_subscriber`` and the ``weight_client`` DEALER, transport "net".
    podsrl: timed from before ``pack_weights`` (into ``WeightPublisher.alloc``) + ``publish`` to the
    last client's done message (a multiprocessing pipe): announcement, chunked pull (``weights.window``
    chunks in flight), digest check. ``full`` rows: clients ask with no version held, the raw buffer
    travels (the publisher runs ``weights.delta = false``, so no delta is encoded meanwhile).
    ``delta`` rows: clients hold v-1 and every fp32 element moved by +-1e-6 (an AdamW step at lr
    1e-6); the publisher (``weights.delta_max_ratio = 1``: a delta whatever its size, here ~49%)
    encodes it once on publish, and every client decompresses, adds and verifies it. peer: the same client
    processes get a PUB "go", ask a ROUTER in the parent with a
    DEALER and receive one zero-copy frame of exactly the bytes one podsrl client received (the raw
    version, or the delta), nothing else. Goal <= 1.3x. Llama-shaped fp32 states of ~10M parameters
    (full and delta, R = 1, 2, 4) and ~100M (full, R = 1 and 4: on a 2-core machine one round of 4 x
    383 MiB, or of a 100M fp32 delta, takes seconds); quick: ~1M, R = 1, 2. The two sides alternate,
    one transfer each per round, after a warm-up round; ``extra`` has every round and, for podsrl,
    when the pack ended, the last client started fetching and the last finished.
(3) The same-machine path: the learner packs a ~10M / ~100M fp32 version (quick: ~1M) into a
    shared-memory segment (``WeightPublisher.alloc`` + ``publish``, which seals it), and a reader finds
    it from the announcement (``shared_segment``), maps and verifies it (``read_segment``) and copies
    every tensor into a preallocated state (``unpack_weights(verified=True)``, ``copy_``); peer: one
    ``np.copyto`` of the same number of bytes between preallocated buffers. Reported as memcpy time /
    shm time, goal >= 0.5x. Beside it, packing into shared memory (alloc + pack + publish: fallocate,
    mmap, seal, and the unlink of the version it stops keeping) vs ``pack_weights`` into ordinary memory.
(4) A slow subscriber costs nobody else: a learner loop (a fixed step, one single-thread 1024^3 matmul, then
    pack + publish a ~10 MB fp32 version, every step, back to back) with one fast client process (that
    of (2)) fetching every version it sees in full over the network, with and without one more process
    that pulls versions with raw ``WeightsRequest``\\s, one chunk at a time, capped at 10 MB/s (with
    ~50 ms steps and 4 versions kept, it never finishes one: its counts are in ``extra``). Arms of 8
    steps in ABBA order (without, with, with, without, ...); reported: the learner's median step time
    with / without (goal <= 1.02x) and the fast client's median fetch time with / without.
(5) Fetch while generating: real rollout server processes (``python -m rollout_server.server``,
    transport "net", ``max_staleness`` 1000 so staleness never gates, default ``weights``) on a tiny
    Llama (fp32) whose version's fetch is a noticeable share of an engine call, fed by a bench-side
    ``WeightPublisher`` (default ``weights``: deltas when they pay, see ``extra``) that publishes a
    version with every weight moved by ~1e-5 every engine call (the period is the median engine call
    measured in the first warm-up), their groups pulled by a bench-side
    ``group_receiver``. One server runs ``weights.background = true``, the other ``false``
    (stop-and-fetch); both start together, then windows alternate with the other server SIGSTOPped.
    Reported: completion tokens/s, background / stop-and-fetch.

Every process runs one torch thread. Timings on a shared machine are noisy: compare the ratios.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import zmq

from bench.common import ROOT, Result, child_env, free_ports, interleaved, print_results
from protocol.config import NetConfig, WeightsConfig
from protocol.messages import (
    Heartbeat,
    Hello,
    ProtocolError,
    ScoredGroup,
    Weights,
    WeightsAnnouncement,
    WeightsChunk,
    WeightsRequest,
    new_session,
)
from protocol.sockets import announce_subscriber, group_receiver, recv, send, weight_client
from protocol.weights import apply_delta, encode_delta, pack_weights, unpack_weights

if TYPE_CHECKING:  # torch is imported where it is used: the client processes start without it
    import torch

TIMEOUT_S = 120.0
MIB = 1 << 20
STEP = 1e-6  # (2) delta rows: every fp32 element moves by this much per version (an AdamW step at lr 1e-6)


def llama_spec(hidden: int, inter: int, layers: int, vocab: int) -> list[tuple[str, list[int]]]:
    """Names and shapes of a Llama's state dict (untied head)."""
    spec: list[tuple[str, list[int]]] = [("model.embed_tokens.weight", [vocab, hidden])]
    for i in range(layers):
        p = f"model.layers.{i}."
        spec += [(p + "input_layernorm.weight", [hidden]), (p + "post_attention_layernorm.weight", [hidden])]
        spec += [(p + f"self_attn.{k}_proj.weight", [hidden, hidden]) for k in "qkvo"]
        spec += [
            (p + "mlp.gate_proj.weight", [inter, hidden]),
            (p + "mlp.up_proj.weight", [inter, hidden]),
            (p + "mlp.down_proj.weight", [hidden, inter]),
        ]
    return [*spec, ("model.norm.weight", [hidden]), ("lm_head.weight", [vocab, hidden])]


SIZES = {  # name -> Llama shape (hidden, intermediate, layers, vocab); parameter counts are in the results
    "1M": (128, 352, 4, 800),
    "2.6M": (256, 704, 2, 2048),
    "10M": (256, 704, 11, 2048),
    "100M": (768, 2048, 12, 10_000),
}


def random_state(size: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Llama-shaped fp32 state at init scale (std 0.02; norms 1.0)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen).mul_(0.02)
        for name, shape in llama_spec(*SIZES[size])
    }


def nbytes_of(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def describe(size: str, state: dict[str, torch.Tensor]) -> str:
    n = nbytes_of(state)
    return f"{size} ({n / 4e6:.1f}M fp32 params, {len(state)} tensors, {n / MIB:.0f} MiB)"


def alternate(fns: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Interleaved measurement for calls too long to repeat within a sample: one call of each function
    per round, in turn, ``repeats`` rounds after ``warmup`` untimed rounds. Each call returns its own
    duration (so it can prepare, untimed, first)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            out[k].append(fn())
    return out


def timed(fn: Callable[[], Any]) -> Callable[[], float]:
    """``fn`` returning its own duration in seconds (for :func:`alternate`)."""

    def call() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return call


def measure(fns: dict[str, Callable[[], Any]], repeats: int, nbytes: int) -> dict[str, float]:
    """Median seconds per call, interleaved: ``bench.common.interleaved`` (calls repeated to last 50 ms
    per sample) for buffers under 100 MiB, else :func:`alternate` (single calls)."""
    if nbytes < 100 * MIB:
        return interleaved(fns, repeats=repeats, min_time=0.05)
    return {k: med(v) for k, v in alternate({k: timed(fn) for k, fn in fns.items()}, repeats).items()}


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _next(conn: Any, want: Callable[[Any], bool], timeout: float = TIMEOUT_S) -> Any:
    """The next message on ``conn`` that ``want`` accepts (others, late replies of earlier rounds, are dropped)."""
    deadline = time.monotonic() + timeout
    while True:
        if not conn.poll(max(0.0, deadline - time.monotonic())):
            raise TimeoutError("a bench client process did not answer")
        msg = conn.recv()
        if want(msg):
            return msg


def _wait(conns: list[Any], want: Callable[[Any], bool] = lambda _: True) -> list[Any]:
    return [_next(c, want) for c in conns]


# -- (1) bytes on the wire ----------------------------------------------------------------------------


def _versions(
    model: torch.nn.Module,
    lr: float,
    steps: int,
    dtype: str,
    batch: int,
    seq: int,
    vocab: int,
    config: str,
    seed: int = 0,
) -> list[Weights]:
    """Version 0 and each of ``steps`` AdamW steps on next-token cross-entropy of random tokens, published
    as the learner does (fp32 master weights cast to ``dtype``)."""
    import torch

    from learner.parallel import cast as cast_dtype

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    out = [pack_weights(cast_dtype(model.state_dict(), dtype), 0, config)]
    for v in range(1, steps + 1):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss  # transformers shifts the labels: next-token CE
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(pack_weights(cast_dtype(model.state_dict(), dtype), v, config))
    return out


def _delta_sizes(versions: list[Weights], gap: int, level: int) -> list[int]:
    return [len(encode_delta(a, b, level)) for a, b in zip(versions, versions[gap:], strict=False)]


def wire_tiny(level: int) -> list[Result]:
    import torch

    from launcher.tiny import build_tiny_model
    from learner.model import load_model
    from protocol.config import load_config
    from rollout_server.tasks.data import builtin_alphabet

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"run.dir={tmp}"])
        build_tiny_model(cfg, cfg.model_dir, builtin_alphabet(cfg.task))
        model = load_model(cfg.model_dir, torch.device("cpu")).train()
    vocab = int(model.config.vocab_size)
    params = sum(p.numel() for p in model.parameters())
    init = {k: v.clone() for k, v in model.state_dict().items()}
    steps = 10
    out = []
    for lr in sorted({cfg.learner.lr, 3e-3}):  # the default, and 3e-3 (the default before it)
        model.load_state_dict(init)
        versions = _versions(
            model, lr, steps, cfg.model.dtype, batch=8, seq=32, vocab=vocab, config=model.config.to_json_string()
        )
        full = int(versions[0].data.nbytes)
        for gap in (1, 2):
            sizes = _delta_sizes(versions, gap, level)
            d = med([float(s) for s in sizes])
            out.append(
                Result(
                    bench="weights",
                    case=f"(1a) delta v->v+{gap}, tiny default model ({params / 1e3:.0f}k fp32 params, "
                    f"vocab {vocab}), AdamW lr {lr:g}{' (default)' if lr == cfg.learner.lr else ''}",
                    value=d / 1024,
                    unit="KiB",
                    peer="full version (raw bytes)",
                    peer_value=full / 1024,
                    ratio=d / full,
                    goal="- (report)",
                    met=None,
                    ratio_means="delta bytes / full bytes",
                    notes=f"len(encode_delta(v, v+{gap}, zstd level {level})) over {steps} AdamW steps (lr "
                    f"{lr:g}, grad "
                    "clip 1, next-token CE of random 8x32 token batches), median over the run; fp32, as published "
                    "by default (model.dtype)",
                    extra={"delta_bytes": sizes, "full_bytes": full},
                )
            )
    return out


def wire_big(quick: bool, level: int) -> list[Result]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, vocab = SIZES["1M" if quick else "100M"]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    params = sum(p.numel() for p in model.parameters())
    init = {k: v.clone() for k, v in model.state_dict().items()}
    out: list[Result] = []
    times: dict[float, dict[str, list[float]]] = {}
    for lr in (1e-6, 1e-5):
        model.load_state_dict(init)
        versions = _versions(model, lr, 2, "bfloat16", batch=2, seq=16, vocab=vocab, config=config.to_json_string())
        full = int(versions[0].data.nbytes)
        dst = np.empty(full, np.uint8)
        sizes: list[int] = []
        samples = times[lr] = {"encode": [], "apply": [], "memcpy": []}
        for a, b in zip(versions, versions[1:], strict=False):  # each delta encoded, applied, next to a memcpy
            t0 = time.perf_counter()
            blob = np.frombuffer(encode_delta(a, b, level), np.uint8)
            t1 = time.perf_counter()
            apply_delta(a, blob, b.version, b.model_config, b.tensors)  # verifies: b rebuilt bit for bit
            t2 = time.perf_counter()
            np.copyto(dst, b.data)
            t3 = time.perf_counter()
            sizes.append(int(blob.nbytes))
            for k, dt in (("encode", t1 - t0), ("apply", t2 - t1), ("memcpy", t3 - t2)):
                samples[k].append(dt)
        d = med([float(s) for s in sizes])
        out.append(
            Result(
                bench="weights",
                case=f"(1b) delta v->v+1, {params / 1e6:.0f}M-param Llama published in bf16, AdamW lr {lr:g}",
                value=d / MIB,
                unit="MiB",
                peer="full bf16 version (raw bytes)",
                peer_value=full / MIB,
                ratio=d / full,
                goal="<= 0.10x",
                met=d / full <= 0.10,
                ratio_means="delta bytes / full bytes",
                notes=f"len(encode_delta(v, v+1, zstd level {level})) for the 2 AdamW steps from init (fp32 master "
                "weights, grad clip 1, next-token CE of a random 2x16 batch), each version cast to bf16; median "
                "of the 2",
                extra={"delta_bytes": sizes, "full_bytes": full, "params": params},
            )
        )
    del init, model
    t = {k: med(v) for k, v in times[1e-5].items()}
    raw = int(out[-1].extra["full_bytes"])
    size = f"{raw / MIB:.0f} MiB bf16 version, delta {out[-1].ratio:.1%}"
    for k, what in (
        ("encode", "encode_delta (difference + zstd), publisher side"),
        ("apply", "apply_delta (unzstd + add + xxh3 verify), rollout side"),
    ):
        out.append(
            Result(
                bench="weights",
                case=f"(1c) {what}, {size}",
                value=t[k] * 1e3,
                unit="ms",
                peer="np.copyto of the version's raw bytes",
                peer_value=t["memcpy"] * 1e3,
                ratio=t[k] / t["memcpy"],
                goal="- (report)",
                met=None,
                ratio_means="podsrl time / memcpy time",
                notes=f"median time of one {k} call on (1b)'s two lr 1e-5 deltas (v0->v1, v1->v2), each call "
                f"followed by "
                "the memcpy into a preallocated buffer",
                extra={
                    "MBps_of_raw": raw / t[k] / 1e6,
                    "memcpy_MBps": raw / t["memcpy"] / 1e6,
                    "ms": {f"lr {lr:g}": {k: [x * 1e3 for x in v] for k, v in tl.items()} for lr, tl in times.items()},
                },
            )
        )
    return out


# -- client processes, for (2) and (4) -----------------------------------------------------------------


def _client(conn: Any, net: dict[str, Any], ctl_port: int, raw_port: int, index: int) -> None:
    """One rollout client process: a Fetcher on uvloop for podsrl versions, a raw DEALER for raw "go"s."""
    import uvloop

    uvloop.run(_client_main(conn, net, ctl_port, raw_port, index))


async def _client_main(conn: Any, net: dict[str, Any], ctl_port: int, raw_port: int, index: int) -> None:
    import zmq.asyncio

    from protocol.sockets import arecv
    from rollout_server.fetch import Fetcher

    cfg = NetConfig(**net)
    ctx = zmq.asyncio.Context()
    # the builders make their sockets with this asyncio context, so they are asyncio sockets
    sub = cast(zmq.asyncio.Socket, announce_subscriber(ctx, cfg))
    dealer = cast(zmq.asyncio.Socket, weight_client(ctx, cfg))
    ctl, raw = ctx.socket(zmq.SUB), ctx.socket(zmq.DEALER)
    ctl.setsockopt(zmq.SUBSCRIBE, b"")
    ctl.connect(f"tcp://127.0.0.1:{ctl_port}")
    raw.connect(f"tcp://127.0.0.1:{raw_port}")
    fetcher = Fetcher(dealer, WeightsConfig(transport="net"), TIMEOUT_S)
    held: Weights | None = None
    last: Weights | None = None  # the version "running"; its buffer is recycled once the next one is in
    got, active, delta = -1, False, False
    poller = zmq.asyncio.Poller()
    poller.register(sub, zmq.POLLIN)
    poller.register(ctl, zmq.POLLIN)
    conn.send("ready")
    try:
        while True:
            events = dict(await poller.poll())
            if ctl in events:
                cmd = json.loads(await ctl.recv())
                if cmd["cmd"] == "stop":
                    return
                if cmd["cmd"] == "set":
                    active, delta = index < cmd["clients"], bool(cmd["delta"])
                    conn.send(("set", cmd["id"]))  # (acknowledged each time it comes)
                elif cmd["cmd"] == "go" and active:
                    await raw.send(b"")
                    frame = await raw.recv(copy=False)
                    conn.send(("raw", len(frame)))
                    del frame
            if sub in events:
                _, ann = await arecv(sub, WeightsAnnouncement)
                if active and ann.version > got:
                    t0 = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
                    w = await fetcher.fetch(held if delta else None, with_files=False)
                    t1 = time.perf_counter()
                    if last is not None and last is not w:
                        fetcher.recycle(last)  # as a rollout server does after installing w
                    held, last, got = (w if delta else None), w, w.version
                    conn.send(
                        ("podsrl", w.version, int(fetcher.last["bytes"]), bool(fetcher.last["delta"]), t1 - t0, t0, t1)
                    )
    finally:
        for s in (sub, dealer, ctl, raw):
            s.close(linger=0)
        ctx.term()


class Rig:
    """A learner-side publisher (``weights``, transport net), ``n`` client processes (:func:`_client`), the
    PUB that commands them and the raw ROUTER; for (2) and (4)."""

    def __init__(self, n: int, weights: WeightsConfig) -> None:
        from learner.publisher import WeightPublisher

        self.net: dict[str, Any] = {"bind_host": "127.0.0.1", "learner_host": "127.0.0.1"}  # NetConfig kwargs
        self.net["announce_port"], self.net["weights_port"], self.ctl_port, raw_port = free_ports(4)
        self.ctx = zmq.Context()
        self.publisher = WeightPublisher(self.ctx, NetConfig(**self.net), weights=weights)
        self.ctl, self.router = self.ctx.socket(zmq.PUB), self.ctx.socket(zmq.ROUTER)
        self.ctl.bind(f"tcp://127.0.0.1:{self.ctl_port}")
        self.router.bind(f"tcp://127.0.0.1:{raw_port}")
        spawn = mp.get_context("spawn")
        pipes = [spawn.Pipe() for _ in range(n)]
        self.conns = [parent for parent, _ in pipes]
        self.procs = [
            spawn.Process(target=_client, args=(child, self.net, self.ctl_port, raw_port, i), daemon=True)
            for i, (_, child) in enumerate(pipes)
        ]
        self.version = 0
        self.active = 0
        self._cmd_id = 0
        try:
            for p in self.procs:
                p.start()
            _wait(self.conns)
            time.sleep(0.5)  # let the SUB subscriptions reach the publishers
        except BaseException:
            self.close()
            raise

    def command(self, **cmd: Any) -> None:
        self.ctl.send(json.dumps(cmd).encode())

    def request(self, conns: list[Any], **cmd: Any) -> None:
        """Send ``cmd`` (with a fresh id) until every process of ``conns`` acknowledged it (a PUB message
        sent before a subscription has reached it is lost: the command must be idempotent)."""
        self._cmd_id += 1
        ack = (cmd["cmd"], self._cmd_id)
        pending, deadline = list(conns), time.monotonic() + TIMEOUT_S
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no process acknowledged {cmd}")
            self.command(**cmd, id=self._cmd_id)
            until = time.monotonic() + 0.5
            for c in list(pending):
                while c.poll(max(0.0, until - time.monotonic())):
                    if c.recv() == ack:
                        pending.remove(c)
                        break

    def set(self, clients: int, delta: bool) -> None:
        """Make the first ``clients`` processes fetch each new version (from the version held if ``delta``)."""
        self.request(self.conns, cmd="set", clients=clients, delta=delta)
        self.active = clients

    def publish(self, state: dict[str, torch.Tensor]) -> tuple[int, float]:
        """Pack ``state`` as the next version into the publisher's buffer and publish it: (version, pack s)."""
        self.version += 1
        t0 = time.perf_counter()
        w = pack_weights(state, self.version, "{}", alloc=self.publisher.alloc)
        t1 = time.perf_counter()
        self.publisher.publish(w)
        return self.version, t1 - t0

    def raw(self, payload: memoryview) -> float:
        """One raw round: "go", then one zero-copy frame to each active client; seconds to the last done."""
        t0 = time.perf_counter()
        self.command(cmd="go")
        for _ in range(self.active):
            ident, _ = self.router.recv_multipart()
            self.router.send_multipart([ident, payload], copy=False)
        done = _wait(self.conns[: self.active], lambda m: m[0] == "raw")
        seconds = time.perf_counter() - t0
        assert all(d == ("raw", len(payload)) for d in done), done
        return seconds

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.command(cmd="stop")
        for p in self.procs:
            if p.pid is None:  # never started
                continue
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self.publisher.close()
        self.ctx.destroy(linger=0)


# -- (2) time to R servers -------------------------------------------------------------------------------


class Mover:
    """The training step of (2)'s delta rows: every element of ``state`` moves by ``STEP`` per version."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        import torch

        self.state, self.k = state, 0
        self.base = {k: v.clone() for k, v in state.items()}
        self.noise = {k: torch.sign(v.roll(1)) for k, v in self.base.items()}  # +-1, uncorrelated with v's sign

    def step(self) -> None:
        import torch

        self.k += 1
        for k, v in self.state.items():
            torch.add(self.base[k], self.noise[k], alpha=STEP * self.k, out=v)


def sync_one(rig: Rig, state: dict[str, torch.Tensor], mover: Mover | None, r: int, repeats: int) -> dict[str, Any]:
    """Alternating podsrl and raw rounds to the first ``r`` clients; durations and what went on the wire."""
    rig.set(r, delta=mover is not None)
    raw_buf = np.ones(nbytes_of(state), np.uint8)
    wire: list[int] = []
    deltas: list[bool] = []
    phases: list[tuple[float, float, float]] = []

    def podsrl() -> float:
        if mover is not None:
            mover.step()  # the training step: untimed
        t0 = time.perf_counter()
        v, pack_s = rig.publish(state)
        done = _wait(rig.conns[:r], lambda m: m[0] == "podsrl" and m[1] >= rig.version)
        seconds = time.perf_counter() - t0
        assert all(d[1] == v for d in done), done
        wire.append(max(d[2] for d in done))
        deltas.append(all(d[3] for d in done))
        phases.append((pack_s, max(d[5] for d in done) - t0, max(d[6] for d in done) - t0))
        return seconds

    def raw() -> float:
        return rig.raw(raw_buf.data[: wire[-1]])

    served0 = rig.publisher.bytes_served
    # Two warm-up rounds: a client's first two fetches land in fresh buffers (first-touch page faults);
    # from the third on it writes into the buffer of the version it replaced, as a rollout server does.
    t = alternate({"podsrl": podsrl, "raw": raw}, repeats, warmup=2)
    return {
        "t": t,
        "wire": wire[2:],
        "all_delta": all(deltas[2:]),
        "phase_ms": {
            k: med([p[i] * 1e3 for p in phases[2:]])
            for i, k in enumerate(("pack", "last_fetch_started", "last_fetched"))
        },
        "bytes_served_MiB": (rig.publisher.bytes_served - served0) / MIB,
    }


def sync_cases(
    rig: Rig, size: str, state: dict[str, torch.Tensor], counts: tuple[int, ...], modes: tuple[str, ...], repeats: int
) -> list[Result]:
    full = nbytes_of(state)
    results = []
    for mode in modes:
        mover = Mover(state) if mode == "delta" else None
        for r in counts:
            got = sync_one(rig, state, mover, r, repeats)
            t = got["t"]
            p, q = med(t["podsrl"]), med(t["raw"])
            mib = med([float(w) for w in got["wire"]]) / MIB
            what = (
                "the delta from v-1 (publisher with weights.delta_max_ratio=1 encodes difference + zstd once, on "
                f"publish; each client unzstd + add + xxh3 verify; every element moved by +-{STEP:g})"
                if mode == "delta"
                else "the full raw buffer (no version held; publisher with weights.delta=false), xxh3 verify"
            )
            results.append(
                Result(
                    bench="weights",
                    case=f"(2) {mode}, {describe(size, state)} to {r} client process{'es' if r > 1 else ''}",
                    value=p * 1e3,
                    unit="ms",
                    peer="raw zmq ROUTER->DEALER, one zero-copy frame of the bytes one podsrl client received",
                    peer_value=q * 1e3,
                    ratio=p / q,
                    goal="<= 1.3x",
                    met=p / q <= 1.3,
                    notes="from before pack_weights (into publisher.alloc) + publish to the last client's done "
                    "message: "
                    f"announcement, Fetcher chunked pull of {what}; peer: PUB go -> DEALER request -> one frame "
                    "of that many bytes per client, no pack, no verify; medians of alternating rounds after two "
                    "warm-up rounds (clients recycle the buffer of the version they replace)",
                    extra={
                        "wire_MiB_per_client": mib,
                        "full_MiB": full / MIB,
                        "wire_over_full": mib * MIB / full,
                        "all_delta": got["all_delta"],
                        "podsrl_ms": [x * 1e3 for x in t["podsrl"]],
                        "raw_ms": [x * 1e3 for x in t["raw"]],
                        "bytes_served_MiB": got["bytes_served_MiB"],
                        "phase_ms_from_start": got["phase_ms"],
                    },
                )
            )
        del mover
    return results


# -- (3) same machine: shared memory -------------------------------------------------------------------


def shm_case(size: str, state: dict[str, torch.Tensor], repeats: int) -> list[Result]:
    import torch

    from learner.publisher import WeightPublisher
    from protocol.shm import read_segment
    from rollout_server.sources.shm import shared_segment

    nbytes = nbytes_of(state)
    shm_root = "/dev/shm" if Path("/dev/shm").is_dir() else None
    net = NetConfig(**dict(zip(("announce_port", "weights_port"), free_ports(2), strict=True)))
    ctx = zmq.Context()
    with tempfile.TemporaryDirectory(dir=shm_root) as shm_dir, tempfile.TemporaryDirectory() as run_dir:
        wcfg = WeightsConfig(transport="auto", shm_dir=shm_dir)
        publisher = WeightPublisher(ctx, net, weights=wcfg, run_dir=run_dir)
        sub = announce_subscriber(ctx, net)
        try:
            assert publisher.metrics()["weights/shm"], "no shared memory"
            version = 0

            def pack_shm() -> None:
                nonlocal version
                version += 1
                publisher.publish(pack_weights(state, version, "{}", alloc=publisher.alloc))

            def pack_mem() -> None:
                pack_weights(state, version, "{}")

            tp = measure({"shm": pack_shm, "mem": pack_mem}, repeats, nbytes)
            deadline = time.monotonic() + 10  # the reader learns the segment from the announcement
            while True:
                if not sub.poll(int(max(0.0, deadline - time.monotonic()) * 1000)):
                    raise TimeoutError("no announcement")
                _, ann = recv(sub, WeightsAnnouncement)
                if ann.version == version:
                    break
            path = shared_segment(wcfg, ann)
            assert path is not None, ann
            dst = {k: torch.empty_like(v) for k, v in state.items()}
            src_buf, dst_buf = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)

            def shm_read() -> None:
                w = read_segment(path, ann.version, ann.session, ann.manifest)
                for k, v in unpack_weights(w, verified=True).items():
                    dst[k].copy_(v)

            # (a rollout server maps and verifies in the background while generating: only the copy into
            # the model stops generation)
            mapped = read_segment(path, ann.version, ann.session, ann.manifest)

            def install() -> None:
                for k, v in unpack_weights(mapped, verified=True).items():
                    dst[k].copy_(v)

            tr = measure(
                {"shm": shm_read, "install": install, "memcpy": lambda: np.copyto(dst_buf, src_buf)}, repeats, nbytes
            )
            assert all(torch.equal(dst[k], v) for k, v in state.items())
        finally:
            sub.close(linger=0)
            publisher.close()
            ctx.destroy(linger=0)
    desc = describe(size, state)
    ratio = tr["memcpy"] / tr["shm"]
    return [
        Result(
            bench="weights",
            case=f"(3) shm read + load, {desc}",
            value=tr["shm"] * 1e3,
            unit="ms",
            peer="np.copyto of the same bytes",
            peer_value=tr["memcpy"] * 1e3,
            ratio=ratio,
            goal=">= 0.5x",
            met=ratio >= 0.5,
            ratio_means="memcpy time / podsrl time",
            notes="read_segment (open + mmap + header check + xxh3 of every tensor) + unpack_weights(verified="
            "True) + copy_ of every tensor into a preallocated state; the segment was published by "
            "WeightPublisher and found from its announcement (shared_segment); medians, interleaved",
            extra={"GBps": nbytes / tr["shm"] / 1e9, "memcpy_GBps": nbytes / tr["memcpy"] / 1e9},
        ),
        Result(
            bench="weights",
            case=f"(3) shm install (generation stall), {desc}",
            value=tr["install"] * 1e3,
            unit="ms",
            peer="np.copyto of the same bytes",
            peer_value=tr["memcpy"] * 1e3,
            ratio=tr["memcpy"] / tr["install"],
            goal="- (report)",
            met=None,
            ratio_means="memcpy time / podsrl time",
            notes="the part of the row above that stops generation: unpack_weights + copy_ of every tensor from "
            "a segment already mapped and verified (the rollout server maps and verifies in the background "
            "while its engine generates); medians, interleaved",
            extra={"GBps": nbytes / tr["install"] / 1e9},
        ),
        Result(
            bench="weights",
            case=f"(3) pack into shm + publish, {desc}",
            value=tp["shm"] * 1e3,
            unit="ms",
            peer="pack_weights into ordinary memory",
            peer_value=tp["mem"] * 1e3,
            ratio=tp["shm"] / tp["mem"],
            goal="- (report)",
            met=None,
            ratio_means="podsrl / peer",
            notes="publisher.alloc (fallocate + mmap of a new segment) + pack_weights (copy + xxh3) + publish "
            "(seal: header, rename; unlink of the version no longer kept) vs pack_weights into np.empty; "
            "medians, interleaved",
            extra={"GBps": nbytes / tp["shm"] / 1e9, "mem_GBps": nbytes / tp["mem"] / 1e9},
        ),
    ]


# -- (4) a slow subscriber ---------------------------------------------------------------------------------


def _slow_client(conn: Any, net: dict[str, Any], ctl_port: int, rate: float) -> None:
    """Pull whole versions with raw WeightsRequests, one chunk at a time, at most ``rate`` bytes/s, while
    switched on (the ctl PUB's {"cmd": "slow", "on": bool}); report its counts when stopped."""
    cfg = NetConfig(**net)
    ctx = zmq.Context()
    dealer, ctl = weight_client(ctx, cfg), ctx.socket(zmq.SUB)
    ctl.setsockopt(zmq.SUBSCRIBE, b"")
    ctl.connect(f"tcp://127.0.0.1:{ctl_port}")
    on, running = False, True
    stats = {"chunks": 0, "bytes": 0, "completed": 0, "gone": 0}
    conn.send("ready")

    def control(timeout_ms: int) -> None:
        nonlocal on, running
        while ctl.poll(timeout_ms):
            cmd = json.loads(ctl.recv())
            timeout_ms = 0
            if cmd["cmd"] == "stop":
                running = False
            elif cmd["cmd"] == "slow":
                on = bool(cmd["on"])
                conn.send(("slow", cmd["id"]))

    def ask(version: int, chunk: int, fetch: int) -> WeightsChunk:
        send(dealer, WeightsRequest(version=version, have=-1, chunk=chunk, fetch=fetch))
        if not dealer.poll(int(TIMEOUT_S * 1000)):
            raise TimeoutError("no chunk")
        _, msg = recv(dealer, WeightsChunk)
        return msg

    next_at = time.monotonic()
    try:
        while running:
            control(0 if on else 100)
            if not (on and running):
                continue
            fetch = new_session()
            first = ask(-1, 0, fetch)
            stats["chunks"] += 1
            stats["bytes"] += first.data.nbytes
            next_at = max(next_at, time.monotonic()) + first.data.nbytes / rate
            for k in range(1, first.chunks):
                control(max(0, int((next_at - time.monotonic()) * 1000)))
                if not (on and running):
                    break
                time.sleep(max(0.0, next_at - time.monotonic()))
                part = ask(first.version, k, fetch)
                if part.status == "gone":  # the learner stopped keeping that version meanwhile
                    stats["gone"] += 1
                    break
                stats["chunks"] += 1
                stats["bytes"] += part.data.nbytes
                next_at = max(next_at, time.monotonic()) + part.data.nbytes / rate
            else:
                stats["completed"] += 1
    finally:
        conn.send(("slow", stats))
        dealer.close(linger=0)
        ctl.close(linger=0)
        ctx.term()


def slow_case(rig: Rig, quick: bool) -> list[Result]:
    import torch

    state = random_state("2.6M")
    nbytes = nbytes_of(state)
    rate = 10e6
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)  # the step: one matmul, ~35 ms on one core
    spawn = mp.get_context("spawn")
    slow_parent, slow_child = spawn.Pipe()
    slow = spawn.Process(target=_slow_client, args=(slow_child, rig.net, rig.ctl_port, rate), daemon=True)
    steps: dict[bool, list[float]] = {False: [], True: []}
    arm_of: dict[int, bool] = {}
    fetches: dict[bool, list[float]] = {False: [], True: []}
    per_arm, skip = (6, 1) if quick else (8, 2)
    arms = [False, True, True, False] * (2 if quick else 10)  # ABBA: no arm always second

    def drain(timeout: float = 0.0) -> None:
        while rig.conns[0].poll(timeout):
            msg = rig.conns[0].recv()
            if msg[0] == "podsrl" and msg[1] in arm_of:
                fetches[arm_of[msg[1]]].append(msg[4])

    try:
        slow.start()
        _wait([slow_parent])
        rig.set(1, delta=False)
        for i, arm in enumerate([False, *arms]):  # the first arm is a warm-up
            rig.request([slow_parent], cmd="slow", on=arm)
            for s in range(per_arm):
                t0 = time.perf_counter()
                a @ b
                v, _ = rig.publish(state)
                seconds = time.perf_counter() - t0
                if i > 0 and s >= skip:  # a few steps for the switch to take effect
                    steps[arm].append(seconds)
                    arm_of[v] = arm
                drain()
        rig.request([slow_parent], cmd="slow", on=False)
        drain(0.5)
        rig.set(0, delta=False)
        drain()
        rig.command(cmd="stop")  # stops the slow client (and the fast ones: the rig is done)
        stats = _next(slow_parent, lambda m: m[0] == "slow" and isinstance(m[1], dict))[1]
    finally:
        slow.join(timeout=10)
        if slow.is_alive():
            slow.kill()
    s_with, s_without = med(steps[True]), med(steps[False])
    f_with, f_without = med(fetches[True]), med(fetches[False])
    desc = f"{nbytes / MIB:.0f} MiB fp32 version per step, 1 fast client"
    extra = {
        "slow_client": stats,
        "slow_rate_MBps": rate / 1e6,
        "steps_measured": {"with": len(steps[True]), "without": len(steps[False])},
        "fetches_measured": {"with": len(fetches[True]), "without": len(fetches[False])},
    }
    return [
        Result(
            bench="weights",
            case=f"(4) learner step with a 10 MB/s subscriber, {desc}",
            value=s_with * 1e3,
            unit="ms",
            peer="the same without it",
            peer_value=s_without * 1e3,
            ratio=s_with / s_without,
            goal="<= 1.02x",
            met=s_with / s_without <= 1.02,
            ratio_means="with / without",
            notes=f"median learner step: one single-thread 1024x1024 fp32 matmul + pack_weights into publisher.alloc "
            "+ publish, back to back, while a fast client process fetches every version it sees in full "
            "(Fetcher) and, in the 'with' arms, one more process pulls versions with raw WeightsRequests, "
            f"one chunk at a time, capped at 10 MB/s; {len(arms)} arms of {per_arm} steps in ABBA order, "
            f"the first {skip} of each dropped",
            extra=extra,
        ),
        Result(
            bench="weights",
            case=f"(4) fast client's fetch with a 10 MB/s subscriber, {desc}",
            value=f_with * 1e3,
            unit="ms",
            peer="the same without it",
            peer_value=f_without * 1e3,
            ratio=f_with / f_without,
            goal="- (report)",
            met=None,
            ratio_means="with / without",
            notes="median Fetcher.fetch time (full version: chunked pull + xxh3 verify) in the fast client "
            "process, by the arm in which the version fetched was published",
            extra=extra,
        ),
    ]


# -- (5) fetch while generating -----------------------------------------------------------------------------

WIDE = "".join(chr(0x100 + i) for i in range(190))  # in the vocabulary, never in a prompt: EOS is rare


class GroupLog:
    """The selector's PULL socket, drained by a thread that records every group's arrival."""

    def __init__(self, ctx: zmq.Context, net: NetConfig) -> None:
        self.sock = group_receiver(ctx, net)
        self.groups: list[tuple[float, str, int, int, int]] = []  # (time, server, group id, tokens, version)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            if self.sock.poll(50):
                try:
                    got: tuple[list[bytes], Any] = recv(self.sock, (Hello, Heartbeat, ScoredGroup), routed=True)
                except ProtocolError:
                    continue
                msg = got[1]
                if isinstance(msg, ScoredGroup):
                    self.groups.append(
                        (time.time(), msg.server_id, msg.group_id, int(msg.completion_lens.sum()), msg.version)
                    )

    def started(self, server: str) -> bool:
        return any(g[1] == server for g in list(self.groups))

    def rate(self, server: str, t0: float, t1: float, per_call: int) -> tuple[float, int]:
        """Completion tokens/s of ``server``'s engine calls finished in [t0, t1], from the first call's end to
        the last's (so partial calls at the edges do not count), and how many calls."""
        calls: dict[int, list[float]] = {}
        for t, s, gid, tokens, _ in list(self.groups):
            if s == server:
                c = calls.setdefault(gid // per_call, [0.0, 0.0])
                c[0], c[1] = max(c[0], t), c[1] + tokens
        done = sorted(c for c in calls.values() if t0 <= c[0] <= t1)
        if len(done) < 2:
            return sum(c[1] for c in done) / (t1 - t0), len(done)
        return sum(c[1] for c in done[1:]) / (done[-1][0] - done[0][0]), len(done)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close(linger=0)


def _metrics(path: Path) -> list[dict[str, Any]]:
    """A metrics JSONL file being written: the complete lines."""
    out = []
    with contextlib.suppress(FileNotFoundError), path.open() as f:
        for line in f:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def generate_case(quick: bool) -> list[Result]:
    import torch

    from launcher.tiny import build_tiny_model
    from learner.model import load_model
    from learner.publisher import WeightPublisher
    from protocol.config import load_config, to_toml
    from protocol.weights import read_tokenizer_files
    from rollout_server.tasks.data import builtin_alphabet

    window, warm = (3.0, 1.5) if quick else (6.0, 2.0)
    order = ["bg", "stop"] * (1 if quick else 2)
    shape = (
        ["model.tiny.hidden_size=128", "model.tiny.num_layers=2", "model.tiny.intermediate_size=256"]
        if quick
        else ["model.tiny.hidden_size=256", "model.tiny.num_layers=4", "model.tiny.intermediate_size=704"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        g, b, an, w = free_ports(4)
        cfg = load_config(
            None,
            [
                f"run.dir={tmp}",
                f"net.group_port={g}",
                f"net.batch_port={b}",
                f"net.announce_port={an}",
                f"net.weights_port={w}",
                "max_staleness=1000",
                'weights.transport="net"',
                "task.length=8",
                "rollout.max_new_tokens=9",
                "rollout.prompts_per_call=2",
                "rollout.group_size=8",
                'rollout.pacing="free"',
                *shape,
            ],
        )  # the sink grants no work: the servers generate unpaced
        config_path = Path(tmp) / "config.toml"
        config_path.write_text(to_toml(cfg))
        build_tiny_model(cfg, cfg.model_dir, builtin_alphabet(cfg.task) + WIDE)
        model = load_model(cfg.model_dir, torch.device("cpu"))
        params = sum(p.numel() for p in model.parameters())
        state = {k: v.detach() for k, v in model.state_dict().items()}
        base = {k: v.clone() for k, v in state.items()}
        noise = {k: torch.sign(v.roll(1)) for k, v in base.items()}
        model_config = model.config.to_json_string()
        ctx = zmq.Context()
        publisher = WeightPublisher(
            ctx,
            cfg.net,
            files=read_tokenizer_files(cfg.model_dir),
            vocab_size=int(model.config.vocab_size),
            weights=cfg.weights,
        )
        log = GroupLog(ctx, cfg.net)
        published: list[tuple[float, int]] = []  # (time, version)
        nbytes = 0
        period = 0.0

        def publish(final: bool = False) -> None:
            nonlocal nbytes
            version = len(published)
            for k, v in state.items():  # a small move of every weight (lr 1e-5-sized), different each version
                torch.add(base[k], noise[k], alpha=1e-5 * (version % 16), out=v)
            wts = pack_weights(state, version, model_config, alloc=publisher.alloc)
            nbytes = int(wts.data.nbytes)
            publisher.publish(wts, final=final)
            published.append((time.time(), version))

        def tick(until: float) -> None:
            """Publish a new version every ``period`` until ``until``."""
            while (now := time.time()) < until:
                nxt = published[-1][0] + period
                if now >= nxt:
                    publish()
                else:
                    time.sleep(min(nxt, until) - now)

        def metrics(name: str, t0: float, t1: float) -> list[dict[str, Any]]:
            return [m for m in _metrics(Path(tmp) / "metrics" / f"rollout-{name}.jsonl") if t0 <= m["time"] <= t1]

        procs: dict[str, subprocess.Popen] = {}
        logs = []
        windows: list[tuple[str, float, float]] = []
        try:
            publish()
            for name in ("bg", "stop"):
                out = (Path(tmp) / f"{name}.log").open("w")
                logs.append(out)
                procs[name] = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "rollout_server.server",
                        "--config",
                        str(config_path),
                        "--server-id",
                        name,
                        f"weights.background={'true' if name == 'bg' else 'false'}",
                    ],
                    cwd=ROOT,
                    env=child_env(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            deadline = time.time() + TIMEOUT_S
            while not all(log.started(n) for n in procs):  # no new versions while they start
                if time.time() > deadline or any(p.poll() is not None for p in procs.values()):
                    raise RuntimeError(
                        "a rollout server did not start: "
                        + " | ".join((Path(tmp) / f"{n}.log").read_text()[-2000:] for n in procs)
                    )
                time.sleep(0.1)
            paused = ""
            for i, name in enumerate(order):
                other = "stop" if name == "bg" else "bg"
                if paused == name:
                    os.kill(procs[name].pid, signal.SIGCONT)
                os.kill(procs[other].pid, signal.SIGSTOP)
                paused = other
                t0 = time.time()
                if i == 0:  # the period: one engine call of the background server, alone
                    period = 0.25
                    tick(t0 + warm)
                    gen = [m["time/generate"] for m in metrics(name, t0, time.time()) if "time/generate" in m]
                    period = min(1.0, max(0.1, med(gen))) if gen else 0.25
                tick(time.time() + warm)
                t0 = time.time()
                tick(t0 + window)
                windows.append((name, t0, time.time()))
            os.kill(procs[paused].pid, signal.SIGCONT)
            publish(final=True)
            for p in procs.values():
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
        finally:
            for p in procs.values():
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGCONT)
                    p.kill()
                    p.wait()
            for f in logs:
                f.close()
            log.close()
            publisher.close()
            ctx.destroy(linger=0)
        per_call = cfg.rollout.prompts_per_call
        rates: dict[str, list[float]] = {"bg": [], "stop": []}
        info: dict[str, dict[str, Any]] = {}
        for name in ("bg", "stop"):
            mine = [(t0, t1) for n, t0, t1 in windows if n == name]
            calls = 0
            for t0, t1 in mine:
                r, n = log.rate(name, t0, t1, per_call)
                rates[name].append(r)
                calls += n
            recs = [m for t0, t1 in mine for m in metrics(name, t0, t1)]
            fetch = [m["rollout/weights_fetch_s"] for m in recs if "rollout/weights_fetch_s" in m]
            gen = [m["time/generate"] for m in recs if "time/generate" in m]
            delta = [m["rollout/weights_delta"] for m in recs if "rollout/weights_delta" in m]
            wire = [m["rollout/weights_wire_mib"] for m in recs if "rollout/weights_wire_mib" in m]
            lag = [
                max(v for t, v in published if t <= at) - ver
                for at, s, _, _, ver in list(log.groups)
                if s == name and any(t0 <= at <= t1 for t0, t1 in mine)
            ]
            info[name] = {
                "tokens_per_s": rates[name],
                "engine_calls": calls,
                "fetches": len(fetch),
                "fetch_s_median": med(fetch),
                "generate_s_median": med(gen),
                "delta_fraction": float(np.mean(delta)) if delta else None,
                "wire_MiB_median": med(wire),
                "version_lag_mean": float(np.mean(lag)) if lag else None,
            }
    bg, stop = float(np.mean(rates["bg"])), float(np.mean(rates["stop"]))
    ratio = bg / stop if stop > 0 else float("nan")
    return [
        Result(
            bench="weights",
            case=f"(5) fetch while generating: a rollout server, {params / 1e6:.1f}M fp32 params "
            f"({nbytes / MIB:.0f} MiB), a new version every {period * 1e3:.0f} ms",
            value=bg,
            unit="tokens/s",
            peer="the same server with weights.background=false (stop-and-fetch)",
            peer_value=stop,
            ratio=ratio,
            goal=">= 1x",
            met=ratio >= 1.0,
            ratio_means="background / stop-and-fetch",
            notes=f"completion tokens/s of the groups a group_receiver got from a real rollout server process "
            f"(transport net, max_staleness 1000, {cfg.rollout.prompts_per_call}x{cfg.rollout.group_size} rows x "
            f"{cfg.max_new_tokens} new tokens per engine call), from the first to the last engine call ending in "
            f"each window; {len(order) // 2} alternating {window:.0f} s window(s) per mode after {warm:.0f} s "
            "warm-up each, the other server SIGSTOPped; versions published every median engine call",
            extra={"bg": info["bg"], "stop": info["stop"], "period_s": period, "versions_published": len(published)},
        )
    ]


def run(quick: bool = False) -> list[Result]:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    level = WeightsConfig().zstd_level
    wire = wire_tiny(level) + wire_big(quick, level)
    states = {size: random_state(size) for size in (("1M",) if quick else ("10M", "100M"))}
    if quick:
        shm = shm_case("1M", states["1M"], repeats=3)
    else:
        shm = shm_case("10M", states["10M"], repeats=5) + shm_case("100M", states["100M"], repeats=3)
    # (2) full rows and (4): a learner with deltas off, so no delta is encoded beside the full transfers;
    # (2) delta rows: every transfer a delta, whatever its size (weights.delta_max_ratio=1)
    rig = Rig(2 if quick else 4, WeightsConfig(transport="net", delta=False))
    try:
        if quick:
            sync = sync_cases(rig, "1M", states["1M"], (1, 2), ("full",), repeats=3)
        else:
            sync = sync_cases(rig, "10M", states["10M"], (1, 2, 4), ("full",), repeats=5)
            sync += sync_cases(rig, "100M", states.pop("100M"), (1, 4), ("full",), repeats=2)
        slow = slow_case(rig, quick)
    finally:
        rig.close()
    rig = Rig(2 if quick else 4, WeightsConfig(transport="net", delta_max_ratio=1.0))
    try:
        size = "1M" if quick else "10M"
        sync += sync_cases(rig, size, states.pop(size), (1, 2) if quick else (1, 2, 4), ("delta",), repeats=3)
    finally:
        rig.close()
    return wire + sync + shm + slow + generate_case(quick)


if __name__ == "__main__":
    print_results(run())
