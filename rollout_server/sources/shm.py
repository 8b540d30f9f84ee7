"""The shared-memory source: map the version's segment when the learner announced one on this machine
(``protocol/shm.py``; ``weights.transport``). Anything wrong with it falls back to the network
(``rollout/shm_fallbacks``, and a warning with ``weights.transport = "shm"``). A segment that is there
but differs from the announced manifest (written by some local process: corrupt or forged) is also
counted as ``rollout/shm_corrupt``, always warned about, and reported to the learner with the network
request, so that the learner serves that version from its own state and stops offering segments."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from protocol.config import WeightsConfig
from protocol.messages import ProtocolError, Weights, WeightsAnnouncement
from protocol.shm import host_id, read_segment
from rollout_server.sources.base import Fallback, Source

log = logging.getLogger("podsrl.rollout")


def shared_segment(cfg: WeightsConfig, ann: WeightsAnnouncement | None) -> Path | None:
    """The segment to map for ``ann``'s version, when there is one on this machine and it may be used."""
    if cfg.transport == "net" or ann is None or not ann.shm:
        return None
    if ann.host != host_id():
        if cfg.transport == "shm":
            log.warning(
                "weights.transport='shm' but the learner runs on another machine (%s, here %s): "
                "fetching over the network",
                ann.host,
                host_id(),
            )
        return None
    return Path(cfg.shm_dir) / ann.shm


async def read_shared(path: Path, ann: WeightsAnnouncement) -> Weights:
    """``ann``'s version from its segment, verified (raises OSError or ProtocolError: use the network)."""
    return await asyncio.to_thread(read_segment, path, ann.version, ann.session, ann.manifest)


class ShmSource(Source):
    name = "shm"

    def can_serve(self, ann: WeightsAnnouncement | None, with_files: bool) -> bool:
        # the tokenizer files come by network (the first version), so a segment carries none
        return not with_files and shared_segment(self.place.weights, ann) is not None

    async def read(self, ann: WeightsAnnouncement | None, base: Weights | None, with_files: bool) -> Weights | None:
        assert ann is not None, "can_serve said no announcement, no segment"
        path = Path(self.place.weights.shm_dir) / ann.shm
        t0 = time.monotonic()
        try:
            w = await read_shared(path, ann)
        except OSError as e:  # evicted meanwhile
            self.counters["shm_fallbacks"] += 1
            if self.place.weights.transport == "shm":
                self.place.warn("shm", "shared-memory segment %s unusable (%s): fetching over the network", path, e)
            raise Fallback from e
        except ProtocolError as e:  # not what the learner announced: never loaded, and the learner is told
            self.counters["shm_fallbacks"] += 1
            self.counters["shm_corrupt"] += 1
            self.place.warn(
                "shm_corrupt", "shared-memory segment %s is corrupt (%s): fetching over the network", path, e
            )
            raise Fallback(corrupt=ann.version) from e
        self.counters["shm_loads"] += 1
        self.last = {"rollout/weights_fetch_s": time.monotonic() - t0, "rollout/weights_shm": 1}
        return w
