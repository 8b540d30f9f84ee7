"""The rollout server's side of the weights link: get the latest version, as small as it can travel.

:meth:`Fetcher.fetch` asks for the latest version and says which one the server holds; the learner
answers with a delta from it when it still keeps that version, else the whole version
(learner/publisher.py). Chunks are pulled with at most ``weights.window`` requests in flight. The
result is verified tensor by tensor before it is returned: a delta that does not rebuild the target
exactly (corrupt, or applied to the wrong base) is counted (``weights_rejected``) and the version is
fetched again in full, while the server keeps generating with the version it has.

It is the network source's machinery (``rollout_server/sources/net.py``; the other sources are
beside it). The buffer of the version a server stops running comes back through
:meth:`Fetcher.recycle` and receives the next transfer: its pages are already mapped, where a fresh
buffer of a large model costs a page fault per 4 KiB (seconds per GB on a VM). It runs on the
server's asyncio loop (uvloop); the CPU-heavy parts (decompression, decoding, digests) run in a helper
thread so heartbeats and sends keep flowing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import numpy as np
import zmq.asyncio

from protocol.config import WeightsConfig
from protocol.messages import (
    ProtocolError,
    Weights,
    WeightsChunk,
    WeightsRequest,
    new_session,
)
from protocol.metrics import RateLimitedLog
from protocol.sockets import arecv, asend
from protocol.weights import apply_delta, verify

log = logging.getLogger("podsrl.rollout")


class Gone(Exception):
    """The learner no longer keeps the version (or delta base) this transfer started with."""


class Fetcher:
    def __init__(self, sock: zmq.asyncio.Socket, cfg: WeightsConfig, timeout_s: float) -> None:
        self.sock, self.cfg, self.timeout_s = sock, cfg, timeout_s
        self.counters: Counter[str] = Counter()
        self.last: dict[str, float] = {}  # the last transfer: bytes, seconds, kind
        self._spare: np.ndarray | None = None  # a buffer no version uses any more (recycle)
        self.corrupt = -1  # a version whose segment was corrupt, told to the learner with the next request
        self.warn = RateLimitedLog(log)  # a flood of bad replies costs a line per 10 s per reason

    def recycle(self, w: Weights) -> None:
        """Give back the buffer of a version the server no longer runs or holds; the next transfer of
        the same size is written into it. Only buffers this process allocated are taken (a version read
        from shared memory is such a private copy too; a mapped or decoded view is not)."""
        if w.data.flags.owndata and w.data.flags.writeable and w.data.dtype == np.uint8:
            self._spare = w.data

    def _take(self, nbytes: int) -> np.ndarray:
        """A writable buffer of ``nbytes``: the recycled one when it has that size, else a new one."""
        spare, self._spare = self._spare, None
        return spare if spare is not None and spare.shape == (nbytes,) else np.empty(nbytes, np.uint8)

    async def fetch(self, held: Weights | None, with_files: bool) -> Weights:
        """The latest version, verified, with the tokenizer files if ``with_files``. Raises TimeoutError
        when the learner does not answer within ``timeout_s``; ``held`` (the version the server runs)
        is the delta base and is never modified."""
        base = held
        while True:
            try:
                return await self._transfer(base, with_files)
            except Gone:
                self.counters["weights_gone"] += 1
            except ProtocolError as e:
                self.counters["weights_rejected"] += 1
                self.warn(f"rejected/{e.reason}", "weights rejected (%s): fetching the full version", e)
                base = None  # the delta path failed: the full version has no base to be wrong about

    async def fetch_base(self) -> Weights:
        """A LoRA run's base model (docs/LORA.md), verified; RuntimeError when the learner has none to serve.
        Raises TimeoutError as :meth:`fetch` does."""
        while True:
            try:
                return await self._transfer(None, False, base_model=True)
            except Gone:
                raise RuntimeError("the learner serves no base model (is learner.lora on?)") from None
            except ProtocolError as e:
                self.counters["weights_rejected"] += 1
                self.warn(f"rejected/{e.reason}", "base model rejected (%s): fetching it again", e)

    async def _transfer(self, held: Weights | None, with_files: bool, base_model: bool = False) -> Weights:
        fetch_id = new_session()
        t0 = time.monotonic()
        have = held.version if held is not None else -1
        corrupt, self.corrupt = self.corrupt, -1
        await asend(
            self.sock,
            WeightsRequest(
                version=-1, have=have, with_files=with_files, fetch=fetch_id, corrupt=corrupt, base_model=base_model
            ),
        )
        first = await self._recv(fetch_id)
        if first.status == "gone":
            raise Gone
        if first.base >= 0 and (held is None or first.base != held.version):
            raise ProtocolError("delta", f"a delta from v{first.base}, but this server holds v{have}")
        payload = self._take(first.size) if first.base < 0 else np.empty(first.size, np.uint8)
        payload[: first.data.shape[0]] = first.data
        todo = list(range(first.chunks - 1, 0, -1))  # chunk numbers still to ask for, next last
        inflight = 0
        while todo or inflight:
            while todo and inflight < self.cfg.window:
                await asend(
                    self.sock,
                    WeightsRequest(
                        version=first.version, have=first.base, chunk=todo.pop(), fetch=fetch_id, base_model=base_model
                    ),
                )
                inflight += 1
            part = await self._recv(fetch_id)
            inflight -= 1
            if part.status == "gone":
                raise Gone
            if (part.version, part.base, part.chunks, part.size, part.chunk_bytes) != (
                first.version,
                first.base,
                first.chunks,
                first.size,
                first.chunk_bytes,
            ):
                raise ProtocolError("chunk", f"chunk {part.chunk} does not belong to the transfer of v{first.version}")
            start = part.chunk * part.chunk_bytes
            payload[start : start + part.data.shape[0]] = part.data
        out = self._take(held.data.shape[0]) if first.base >= 0 and held is not None else None  # (base's size)
        w = await asyncio.to_thread(_rebuild, first, payload, held, out)
        self.last = {"bytes": float(first.size), "seconds": time.monotonic() - t0, "delta": float(first.base >= 0)}
        self.counters["deltas" if first.base >= 0 else "full"] += 1
        return w

    async def _recv(self, fetch_id: int) -> WeightsChunk:
        """The next reply of transfer ``fetch_id`` (replies to an abandoned transfer are skipped)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            try:
                async with asyncio.timeout(left):  # (not wait_for: on 3.11 it can swallow a cancellation)
                    _, msg = await arecv(self.sock, WeightsChunk)
            except ProtocolError as e:  # one bad reply: count it, the transfer times out or goes on
                self.counters["weights_rejected"] += 1
                self.warn(f"bad_reply/{e.reason}", "bad weights reply rejected: %s", e)
                continue
            if msg.fetch == fetch_id:
                return msg
            self.counters["stale_replies"] += 1


def _rebuild(first: WeightsChunk, payload: np.ndarray, held: Weights | None, out: np.ndarray | None) -> Weights:
    """The version a transfer carried: the raw buffer, or the base with the delta applied; verified."""
    if first.base < 0:
        w = Weights(
            version=first.version, model_config=first.model_config, tensors=first.tensors, files=[], data=payload
        )
        w.check()
        verify(w)
    else:
        assert held is not None
        w = apply_delta(held, payload, first.version, first.model_config, first.tensors, out=out)
    if first.files:
        w = Weights(
            version=w.version,
            model_config=w.model_config,
            tensors=w.tensors,
            files=first.files,
            data=w.data,
            file_data=first.file_data,
        )
    return w
