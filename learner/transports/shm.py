"""Shared memory: each version packed straight into a segment on this machine (``protocol/shm.py``).

Offered unless ``weights.transport = "net"`` or there is no run directory. A directory that cannot
hold segments (missing, read-only, or full) is reported once and ends the offer: rollout servers on
this machine fetch over the network from then on.
"""

from __future__ import annotations

import logging

import numpy as np

from learner.transports.base import Offer, Place, Transport
from protocol.messages import Weights
from protocol.shm import SegmentStore, host_id, run_key

log = logging.getLogger("podsrl.learner")


class ShmTransport(Transport):
    name = "shm"

    def __init__(self, place: Place) -> None:
        super().__init__(place)
        cfg = place.weights
        self.store: SegmentStore | None = None
        if cfg.transport != "net" and place.run_dir:
            try:
                self.store = SegmentStore(cfg.shm_dir, run_key(place.run_dir), place.session)
                if self.store.stale_removed:
                    log.info(
                        "removed %d shared-memory segments left by a learner of this run that was killed",
                        self.store.stale_removed,
                    )
            except OSError as e:
                log.warning(
                    "no shared memory for weights (%s: %s): rollout servers on this machine fetch over the "
                    "network; set weights.shm_dir to a writable tmpfs",
                    cfg.shm_dir,
                    e,
                )

    def alloc(self, nbytes: int) -> np.ndarray | None:
        if self.store is None:
            return None
        try:
            return self.store.alloc(nbytes)
        except OSError as e:
            log.warning(
                "shared memory full or unusable (%s); rollout servers on this machine fetch over the "
                "network from now on (raise the tmpfs size, e.g. docker shm_size)",
                e,
            )
            self.store.close()
            self.store = None
            return None

    def offer(self, weights: Weights, offered: Offer) -> Offer:
        if self.store is None or not self.store.pending:  # (not packed into a segment)
            return {}
        return {"shm": self.store.seal(weights), "host": host_id()}

    def drop(self, version: int) -> None:
        if self.store is not None:
            self.store.remove(version)

    def metrics(self) -> dict[str, float]:
        return {"weights/shm": float(self.store is not None)}

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
