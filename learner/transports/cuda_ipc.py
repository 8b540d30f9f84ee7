"""CUDA IPC: a device copy of each version beside its segment, for torch engines on CUDA on this
machine (``protocol/cuda_ipc.py``). Offered by a learner on CUDA with ``weights.cuda_ipc`` (and not
``weights.transport = "net"``), only for versions in a segment: a server still maps and verifies the
host copy, its delta base. Each device buffer lives exactly as long as its version is kept. A failure
to share is reported once and ends the offer; training goes on. Untested without a GPU.
"""

from __future__ import annotations

import logging
from typing import Any

from learner.transports.base import Offer, Place, Transport
from protocol.messages import Weights
from protocol.shm import host_id

log = logging.getLogger("podsrl.learner")


def share_on_device(weights: Weights, device: Any) -> tuple[str, Any]:
    """A copy of the packed version on ``device`` (CUDA) and its CUDA IPC handle text: the bytes the
    digests were computed over, one host-to-device copy. Untested without a GPU (protocol/cuda_ipc.py)."""
    import torch

    from protocol.cuda_ipc import share

    buf = torch.empty(weights.data.shape[0], dtype=torch.uint8, device=device)
    buf.copy_(torch.from_numpy(weights.data))
    return share(buf).to_wire(), buf


class CudaIpcTransport(Transport):
    name = "cuda_ipc"

    def __init__(self, place: Place) -> None:
        super().__init__(place)
        cfg, device = place.weights, place.device
        self.on = device is not None and device.type == "cuda" and cfg.cuda_ipc and cfg.transport != "net"
        self._buffers: dict[int, Any] = {}  # version -> the device buffer its handle names

    def offer(self, weights: Weights, offered: Offer) -> Offer:
        if not self.on or "shm" not in offered:
            return {}
        try:
            wire, buf = share_on_device(weights, self.place.device)
        except (RuntimeError, ValueError) as e:  # never stop training for an optional fast path
            self.on = False
            log.warning(
                "CUDA IPC unavailable (%s): rollout servers copy from the host segment; set "
                "weights.cuda_ipc=false to silence this",
                e,
            )
            return {}
        self._buffers[weights.version] = buf
        return {"cuda": wire, "host": host_id()}

    def drop(self, version: int) -> None:
        self._buffers.pop(version, None)  # (torch frees the device memory once every reader has let go)

    def close(self) -> None:
        self._buffers.clear()
