"""What every weights source implements: the rollout server's side of one weights transport.

A source says whether it can serve an announced version (:meth:`Source.can_serve`) and reads it
(:meth:`Source.read`), verified; it may also offer a copy of that version already on the engine's
device (:meth:`Source.device_copy`, CUDA IPC). The registry and the order they are tried in are in
``rollout_server/sources/__init__.py``; the weights client that tries them is
``rollout_server/weights_client.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import zmq.asyncio

from protocol.config import NetConfig, WeightsConfig
from protocol.messages import Weights, WeightsAnnouncement
from protocol.metrics import RateLimitedLog

if TYPE_CHECKING:
    import torch


class Fallback(Exception):
    """A source could not serve this version after all (it counted and said why): the network will.
    ``corrupt``: the version it found corrupt or forged (-1: none), reported to the learner by the network."""

    def __init__(self, corrupt: int = -1) -> None:
        super().__init__(corrupt)
        self.corrupt = corrupt


@dataclass(frozen=True)
class Place:
    """What a source may need to know about the server it runs in."""

    weights: WeightsConfig
    net: NetConfig
    sock: zmq.asyncio.Socket  # the weights link's DEALER (protocol/sockets.py: weight_client)
    device: torch.device | None  # where the engine keeps its model (None: it does not say, e.g. vLLM)
    warn: RateLimitedLog  # the server's rate-limited warnings


class Source(ABC):
    """One way a version reaches this server. Counters (``rollout/<key>`` in its metrics) live in
    ``counters``; ``last`` holds the ``rollout/weights_*`` metrics of its last read."""

    name: ClassVar[str]  # its key in SOURCES

    def __init__(self, place: Place) -> None:
        self.place = place
        self.counters: Counter[str] = Counter()
        self.last: dict[str, float] = {}

    @abstractmethod
    def can_serve(self, ann: WeightsAnnouncement | None, with_files: bool) -> bool:
        """Whether it can read ``ann``'s version (``with_files``: with the tokenizer files)."""

    @abstractmethod
    async def read(self, ann: WeightsAnnouncement | None, base: Weights | None, with_files: bool) -> Weights | None:
        """The announced version, verified; None when the read was abandoned (try again later). Raises
        :class:`Fallback` when this source turned out unable to serve it. ``base`` is the newest version the
        server has in memory (a delta's base; never modified)."""

    def report_corrupt(self, version: int) -> None:
        """Another source found ``version`` corrupt: tell the learner, if this source can (the network)."""
        return None

    def device_copy(self, w: Weights) -> torch.Tensor | None:
        """(worker thread) ``w``'s bytes already on the engine's device, to load from; None: none."""
        return None

    def device_copy_failed(self, e: Exception) -> None:
        """(worker thread) Loading from :meth:`device_copy`'s tensor failed with ``e``: the host copy is used."""
        return None

    def recycle(self, w: Weights) -> None:
        """``w`` is no longer run or held: a buffer this source allocated may be reused."""
        return None
