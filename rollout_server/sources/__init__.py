"""Weights sources: how a version reaches a rollout server. One module per transport, one line here.

``SOURCES`` is tried in order for each fetch: the first source that can serve the announced version
reads it; when it turns out unable to (:class:`~rollout_server.sources.base.Fallback`: counted and
reported by the source), the network does, which always can and so comes last. To add a transport:
write a :class:`~rollout_server.sources.base.Source` in its own module, add it here before the ones
it should be preferred to, and add its learner side to ``learner/transports/`` (docs/ARCHITECTURE.md,
"Weights").
"""

from __future__ import annotations

from rollout_server.sources.base import Fallback, Place, Source
from rollout_server.sources.cuda_ipc import CudaIpcSource
from rollout_server.sources.net import NetSource
from rollout_server.sources.shm import ShmSource

SOURCES: dict[str, type[Source]] = {
    "cuda_ipc": CudaIpcSource,  # the segment, and the learner's device copy for a torch engine on CUDA
    "shm": ShmSource,  # the segment, on the learner's machine
    "net": NetSource,  # the weights link: always able, the fallback of every other
}


def build_sources(place: Place) -> list[Source]:
    """One of each source, in the order they are tried (the network last)."""
    sources = [cls(place) for cls in SOURCES.values()]
    assert isinstance(sources[-1], NetSource), "the network comes last: it is every other source's fallback"
    return sources


__all__ = ["SOURCES", "Fallback", "Place", "Source", "build_sources"]
