"""A rollout server's weights client: which version exists, which it has, and getting the next one.

It owns the announcements link (SUB) and the weights link (DEALER) and everything a server knows about
versions: the newest announcement from the current learner (``latest``, ``floor``, the learner's
session and when it was last heard), the version the engine runs (``held``, a delta's base), one
being installed and at most one newer verified version waiting to be swapped in (``ready``). The
server's generation loop asks it whether a version is ``usable`` and installs what is ready.

A fetch goes through the weights sources (``rollout_server/sources/``): the first that can serve the
announced version reads it (shared memory, CUDA IPC, ...), and the network when that one cannot after
all or none other can. With ``weights.background`` the next version is fetched while the engine
generates (:meth:`WeightsClient.keep_fetching`); a learner restart abandons a fetch in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import zmq.asyncio

from protocol.auth import Auth
from protocol.config import Config
from protocol.lora import LoraSpec, check_version
from protocol.messages import LEARNER_SILENT_S, ProtocolError, Weights, WeightsAnnouncement
from protocol.metrics import Monitor, RateLimitedLog
from protocol.sockets import announce_subscriber, arecv, close, weight_client
from protocol.weights import unpack_files
from rollout_server.sampling import Engine
from rollout_server.sources import Fallback, Place, Source, build_sources
from rollout_server.sources.net import NetSource

if TYPE_CHECKING:
    import torch

log = logging.getLogger("podsrl.rollout")


class WeightsClient:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        cfg: Config,
        auth: Auth | None,
        device: torch.device | None,
        monitor: Monitor,
        warn: RateLimitedLog,
        files_needed: Callable[[], bool],
    ) -> None:
        """``device``: the engine's; ``files_needed``: whether the next fetch must bring the tokenizer."""
        self.cfg, self.monitor, self._warn, self._files_needed = cfg, monitor, warn, files_needed
        # the builders make their sockets with this asyncio context, so they are asyncio sockets
        self.sub = cast(zmq.asyncio.Socket, announce_subscriber(ctx, cfg.net, auth))
        self.dealer = cast(zmq.asyncio.Socket, weight_client(ctx, cfg.net, auth))
        self.sources: list[Source] = build_sources(Place(cfg.weights, cfg.net, self.dealer, device, warn))
        self.counters: Counter[str] = Counter()
        self.announcement: WeightsAnnouncement | None = None  # the newest, from the current learner
        self.latest = -1  # newest version announced by the learner
        self.floor = 0  # versions below it were discarded by a learner restart: never generate with them
        self.learner_session: int | None = None
        self.heard_learner = time.monotonic()  # when the last announcement arrived
        self.held: Weights | None = None  # the version the engine runs (a delta's base)
        self.ready: Weights | None = None  # a newer version, fetched and verified, to swap in next
        self.installing: Weights | None = None  # the version being loaded into the engine
        self.news = asyncio.Event()  # a new announcement or version: whoever waits looks again
        self.fetched = asyncio.Event()  # the background fetcher made a version ready (it may clear news)
        self._fetching: asyncio.Task | None = None
        self._fetch_s = 0.0  # how long the last fetch took (whichever source served it)
        self._base_ready = False  # LoRA: the base model is on this machine (_ensure_base)

    def all_counters(self) -> Counter[str]:
        """Its own counters and every source's (``rollout/<key>``)."""
        return sum((s.counters for s in self.sources), self.counters.copy())

    def close(self) -> None:
        close(self.sub, self.dealer)

    # -- what the server knows ------------------------------------------------------------------
    def have(self) -> int:
        """The newest version this server has: running, or fetched and ready to swap in."""
        versions = [w.version for w in (self.held, self.ready, self.installing) if w is not None]
        return max(versions, default=-1)

    def behind(self) -> bool:
        """A newer version than any this server has was announced."""
        return self.latest > self.have()

    def usable(self, version: int | None) -> bool:
        """Whether generating with ``version`` could be trained (not below the floor, not too stale)."""
        return version is not None and version >= self.floor and not self.cfg.too_stale(self.latest, version)

    def learner_gone(self) -> bool:
        return self.learner_session is not None and time.monotonic() - self.heard_learner > LEARNER_SILENT_S

    # -- announcements --------------------------------------------------------------------------
    async def listen(self) -> None:
        """Take announcements until the learner announces the end of the run (then return)."""
        while True:
            try:
                _, msg = await arecv(self.sub, WeightsAnnouncement)
            except ProtocolError as e:
                self.counters["announcements_rejected"] += 1
                self._warn(e.reason, "bad announcement rejected: %s", e)
                continue
            if msg.final:
                log.info("the learner announced the end of the run")
                return
            self.heard(msg)

    def heard(self, msg: WeightsAnnouncement) -> None:
        """A (not final) announcement: a new learner session abandons the fetch in flight."""
        self.heard_learner = time.monotonic()
        if msg.session != self.learner_session:
            if self.learner_session is not None:
                log.info("the learner restarted (version %d, floor %d)", msg.version, msg.floor)
                if self._fetching is not None:  # that transfer died with the old learner
                    self._fetching.cancel()
            self.learner_session = msg.session
        self.announcement = msg
        self.latest = max(self.latest, msg.version)
        self.floor = max(self.floor, msg.floor)
        self.news.set()

    async def wait(self, seconds: float, *also: asyncio.Event) -> None:
        """Sleep until news (an announcement, a fetched version), one of ``also`` is set, or ``seconds`` pass."""
        waits = [asyncio.ensure_future(e.wait()) for e in (self.news, *also)]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def learner_back(self) -> None:
        """Wait while the learner is silent: nothing can be trained until it is back, and it may
        discard the versions this server has."""
        log.info(
            "no announcement from the learner for %.0fs: generation paused until it is back",
            time.monotonic() - self.heard_learner,
        )
        while self.learner_gone():
            await self.wait(0.2)
        log.info("the learner is back (version %d, floor %d)", self.latest, self.floor)

    # -- fetching -------------------------------------------------------------------------------
    async def fetch_latest(self) -> Weights | None:
        """The announced latest version, from the first source that can serve it, else the network;
        None when the fetch was abandoned (the learner restarted, or did not answer in time)."""
        ann, with_files = self.announcement, self._files_needed()
        # the delta base: the newest verified version in memory (running, being installed, or ready)
        base = max(
            (w for w in (self.held, self.installing, self.ready) if w is not None),
            key=lambda w: w.version,
            default=None,
        )
        first = next(s for s in self.sources if s.can_serve(ann, with_files))  # (the network always can)
        for source in dict.fromkeys((first, self.sources[-1])):
            self._fetching = asyncio.ensure_future(source.read(ann, base, with_files))
            try:
                await asyncio.wait({self._fetching})
                if self._fetching.cancelled():
                    return None
                w = self._fetching.result()
            except Fallback as e:
                if e.corrupt >= 0:
                    self.sources[-1].report_corrupt(e.corrupt)
                continue
            finally:
                self._fetching = None
            if w is not None and not await self._admissible(w, source):
                return None
            if w is not None:
                self._fetch_s = source.last["rollout/weights_fetch_s"]
                self.monitor.log(w.version, source.last)
            return w
        raise AssertionError("the network source never falls back")

    async def _admissible(self, w: Weights, source: Source) -> bool:
        """The boundary check of a verified version before any engine sees it: a LoRA version's adapter must
        fit the base (protocol/lora.py: names, shapes, finite values). A hostile or broken one is counted
        (``rollout/adapter_rejected``), never loaded, and fetched again later."""
        try:
            spec = await asyncio.to_thread(check_version, w)
        except ProtocolError as e:
            self.counters["adapter_rejected"] += 1
            self._warn("adapter", "rejected weights v%d: %s", w.version, e)
            source.recycle(w)
            return False
        if spec is not None and not self._base_ready and not await self._ensure_base(spec, w):
            source.recycle(w)
            return False
        return True

    async def _ensure_base(self, spec: LoraSpec, w: Weights) -> bool:
        """LoRA: make sure the base the adapters apply to is on this machine (docs/LORA.md): ``model.path``
        when its digest is the learner's, else the copy fetched before, else fetch it from the learner now,
        once (``rollout/base_fetched``), kept in ``<run.dir>/base/<digest>``. False: try again later."""
        import torch

        from rollout_server.lora import base_cache, find_base, write_base

        cfg, dtype = self.cfg, getattr(torch, self.cfg.model.dtype)
        if await asyncio.to_thread(find_base, cfg.model_dir, cfg.run.dir, spec, dtype) is not None:
            self._base_ready = True
            return True
        net = self.sources[-1]
        assert isinstance(net, NetSource), "the network source comes last"
        log.info("the base model is not at model.path=%s: fetching it from the learner (once)", cfg.model_dir)
        base = await net.read_base()
        if base is None:
            return False
        try:
            await asyncio.to_thread(write_base, base, unpack_files(w), spec, base_cache(cfg.run.dir, spec))
        except ProtocolError as e:
            self.counters["base_rejected"] += 1
            self._warn("base", "rejected the base model the learner sent: %s", e)
            return False
        self.counters["base_fetched"] += 1
        self._base_ready = True
        return True

    async def fetch_now(self) -> None:
        """``weights.background = false``: fetch the announced latest version into ``ready`` now."""
        w = await self.fetch_latest()
        if w is not None and w.version > self.have():
            self.ready = w

    async def keep_fetching(self) -> None:
        """``weights.background``: keep ``ready`` at the newest announced version while the engine generates."""
        while True:
            await self.news.wait()
            self.news.clear()
            if not self.behind():
                continue
            w = await self.fetch_latest()
            if w is None:
                self.news.set()  # try again (at once after a restart; the next announcement otherwise)
                await asyncio.sleep(0.2)
                continue
            if w.version > self.have():
                self.ready = w
                self.news.set()
                self.fetched.set()

    async def next_version(self) -> None:
        """Wait a little for a version newer than the one installed (the server found its own unusable)."""
        if not self.cfg.weights.background:
            await self.wait(0.2)
            return
        # Let the fetcher look, then wait for what it brings. Not on news alone: the fetcher clears it
        # when it looks again right after a fetch, which cost an idle server 0.2 s per version (every
        # step at K=0) until the timeout; fetched has this one waiter.
        self.fetched.clear()
        self.news.set()
        await asyncio.sleep(0)
        if self.ready is None:
            await self.wait(0.2, self.fetched)

    # -- installing -----------------------------------------------------------------------------
    def newer(self, running: int | None) -> Weights | None:
        """The ready version when it is newer than the engine's ``running`` one."""
        ready = self.ready
        return ready if ready is not None and (running is None or ready.version > running) else None

    async def install(self, w: Weights, load: Callable[[Weights], Awaitable[dict[str, Any]]]) -> None:
        """Swap ``w`` (from :meth:`newer`) in with ``load`` (the server's, in its worker thread: it returns
        ``rollout/weights_install_s`` and more); the buffer of the version no longer run is recycled."""
        self.ready, self.installing = None, w
        try:
            metrics = await load(w)
        finally:
            self.installing = None
        old, self.held = self.held, w
        if old is not None and old is not w:  # the engine copied it; no fetch uses it as a base (they are serial)
            for source in self.sources:
                source.recycle(old)
        metrics["rollout/weights_load_s"] = metrics["rollout/weights_install_s"] + self._fetch_s
        self.monitor.log(w.version, metrics)

    def load(self, engine: Engine, w: Weights) -> None:
        """(worker thread) Load verified ``w`` into ``engine``: from a source's device copy when one offers
        it, falling back to the host copy (a partial load is overwritten)."""
        for source in self.sources:
            device_data = source.device_copy(w)
            if device_data is not None:
                try:
                    engine.load(w, verified=True, device_data=device_data)
                except RuntimeError as e:
                    source.device_copy_failed(e)
                    engine.load(w, verified=True)
                return
        engine.load(w, verified=True)
