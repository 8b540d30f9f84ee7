"""The network source: the learner's weights link (``rollout_server/fetch.py``). It can always serve:
the first version (it carries the tokenizer files), and whatever another source could not. A version
it fetched is checked against the announced manifest digest too (the transfer verified its bytes
against the manifest it carried): one that differs is rejected (``rollout/weights_rejected``), never
loaded, and fetched again."""

from __future__ import annotations

import logging

from protocol.messages import Weights, WeightsAnnouncement
from protocol.weights import manifest_digest
from rollout_server.fetch import Fetcher
from rollout_server.sources.base import Place, Source

log = logging.getLogger("podsrl.rollout")


class NetSource(Source):
    name = "net"

    def __init__(self, place: Place) -> None:
        super().__init__(place)
        self.fetcher = Fetcher(place.sock, place.weights, place.net.weights_timeout_s)
        self.counters = self.fetcher.counters

    def can_serve(self, ann: WeightsAnnouncement | None, with_files: bool) -> bool:
        return True

    async def read(self, ann: WeightsAnnouncement | None, base: Weights | None, with_files: bool) -> Weights | None:
        """The latest version, a delta from ``base`` when the learner still keeps it; None when the learner
        does not answer within ``net.weights_timeout_s``."""
        try:
            w = await self.fetcher.fetch(base, with_files)
        except TimeoutError:
            net = self.place.net
            log.info(
                "no weights from the learner at %s:%d within %.0fs; asking again",
                net.learner_host,
                net.weights_port,
                net.weights_timeout_s,
            )
            return None
        if ann is not None and ann.manifest and w.version == ann.version and manifest_digest(w.tensors) != ann.manifest:
            self.counters["weights_rejected"] += 1
            self.fetcher.recycle(w)
            self.place.warn("manifest", "weights v%d differ from the manifest the learner announced", w.version)
            return None  # (try again: the learner re-packs a version it was told is corrupt)
        last = self.fetcher.last
        self.last = {
            "rollout/weights_fetch_s": last["seconds"],
            "rollout/weights_shm": 0,
            "rollout/weights_wire_mib": last["bytes"] / 2**20,
            "rollout/weights_delta": last["delta"],
        }
        return w

    async def read_base(self) -> Weights | None:
        """A LoRA run's base model from the learner (verified against its manifest); None when the learner
        does not answer in time."""
        try:
            return await self.fetcher.fetch_base()
        except TimeoutError:
            return None

    def report_corrupt(self, version: int) -> None:
        self.fetcher.corrupt = version

    def recycle(self, w: Weights) -> None:
        self.fetcher.recycle(w)
