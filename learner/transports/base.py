"""What every weights transport implements: the learner's side of one way a version reaches servers.

The publisher (``learner/publisher.py``) always serves every version over the network; a transport
offers it another way too. For each version it may provide the buffer the version is packed into
(:meth:`Transport.alloc`), and it *offers* the version (:meth:`Transport.offer`): what it returns are
the announcement's fields that tell a rollout server where to find it (``rollout_server/sources/``
reads them). It keeps whatever backs the offer until :meth:`Transport.drop` (the version is no longer
kept) or :meth:`Transport.close`. A transport that fails says so once and stops offering: it never
stops training.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypedDict

import numpy as np

from protocol.config import WeightsConfig
from protocol.messages import Weights

if TYPE_CHECKING:
    import torch


class Offer(TypedDict, total=False):
    """The ``WeightsAnnouncement`` fields transports fill for one version (protocol/messages.py)."""

    shm: str  # the segment's file name in weights.shm_dir
    host: str  # the machine it is on (protocol.shm.host_id)
    cuda: str  # a CUDA IPC handle's text (protocol/cuda_ipc.py)


@dataclass(frozen=True)
class Place:
    """What a transport may need to know about the learner it runs in."""

    weights: WeightsConfig
    run_dir: str  # "" in tests without a run: nothing on disk
    session: int  # the publisher's (every announcement's) learner session
    device: torch.device | None  # where rank 0 trains (None: not said)


class Transport(ABC):
    name: ClassVar[str]  # its key in TRANSPORTS (and the rollout side's SOURCES)

    def __init__(self, place: Place) -> None:
        self.place = place

    def alloc(self, nbytes: int) -> np.ndarray | None:
        """A buffer to pack the next version into, when this transport wants it there; None: not its concern."""
        return None

    @abstractmethod
    def offer(self, weights: Weights, offered: Offer) -> Offer:
        """Offer ``weights`` (packed into :meth:`alloc`'s buffer when it gave one): the announcement fields
        that say where it is, {} when not offered. ``offered``: what the transports before it offered."""

    def drop(self, version: int) -> None:
        """The publisher no longer keeps ``version``: release what backs its offer."""
        return None

    def metrics(self) -> dict[str, float]:
        """Its ``weights/*`` metrics (the learner's, each step)."""
        return {}

    def close(self) -> None:
        return None
