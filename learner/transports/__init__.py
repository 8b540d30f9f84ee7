"""Weights transports, the learner's side: ways a version reaches rollout servers besides the network.

``TRANSPORTS`` are built once by the publisher and asked in order: the first that wants to gives the
buffer a version is packed into, and each offers the version in turn (seeing what those before it
offered: a CUDA IPC copy is offered only beside a segment). The network is the publisher's own and
always serves. To add a transport: write a :class:`~learner.transports.base.Transport` in its own
module, add it here, and add its reader to ``rollout_server/sources/`` (docs/ARCHITECTURE.md, "Weights").
"""

from __future__ import annotations

from learner.transports.base import Offer, Place, Transport
from learner.transports.cuda_ipc import CudaIpcTransport
from learner.transports.shm import ShmTransport

TRANSPORTS: dict[str, type[Transport]] = {
    "shm": ShmTransport,  # a segment on this machine
    "cuda_ipc": CudaIpcTransport,  # a device copy beside the segment
}


def build_transports(place: Place) -> list[Transport]:
    return [cls(place) for cls in TRANSPORTS.values()]


__all__ = ["TRANSPORTS", "Offer", "Place", "Transport", "build_transports"]
