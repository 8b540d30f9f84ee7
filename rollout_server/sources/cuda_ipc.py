"""The CUDA IPC source: a device copy on top of the shared-memory segment (``protocol/cuda_ipc.py``).

It reads and verifies the host segment as :class:`ShmSource` does (the version the server keeps, its
delta base; its counters are the segment's, ``rollout/shm_loads`` and ``rollout/shm_fallbacks``) and
keeps the announced handle, so a torch engine on CUDA loads from the learner's device buffer. A handle
that cannot be opened, or a load from it that fails, falls back to the host copy
(``rollout/cuda_ipc_fallbacks``). Untested without a GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.messages import Weights, WeightsAnnouncement
from protocol.shm import host_id
from rollout_server.sources.base import Place
from rollout_server.sources.shm import ShmSource

if TYPE_CHECKING:
    import torch


def open_device_copy(wire: str, nbytes: int, device: torch.device | None) -> torch.Tensor | None:
    """The CUDA IPC device copy announced as ``wire`` (``nbytes`` of it), when there is one and the
    engine runs on CUDA; else None. Raises ProtocolError for a malformed handle and torch's error when
    CUDA cannot open it: the caller loads from the host segment. Untested without a GPU (protocol/cuda_ipc.py)."""
    if not wire or device is None or device.type != "cuda":
        return None
    from protocol.cuda_ipc import CudaIpcHandle, open_handle

    return open_handle(CudaIpcHandle.from_wire(wire), nbytes)


class CudaIpcSource(ShmSource):
    name = "cuda_ipc"

    def __init__(self, place: Place) -> None:
        super().__init__(place)
        self._handles: dict[int, str] = {}  # version -> its handle's text, until installed or superseded

    def can_serve(self, ann: WeightsAnnouncement | None, with_files: bool) -> bool:
        device = self.place.device
        return (
            device is not None
            and device.type == "cuda"
            and ann is not None
            and bool(ann.cuda)
            and ann.host == host_id()  # (checked here too: the shm source warns about another machine once)
            and super().can_serve(ann, with_files)
        )

    async def read(self, ann: WeightsAnnouncement | None, base: Weights | None, with_files: bool) -> Weights | None:
        w = await super().read(ann, base, with_files)
        if w is not None and ann is not None:
            have = base.version if base is not None else -1
            self._handles = {v: h for v, h in self._handles.items() if v > have}
            self._handles[w.version] = ann.cuda
        return w

    def device_copy(self, w: Weights) -> torch.Tensor | None:
        # a process may open an allocation once: each handle is taken once, by the install of its version
        wire = self._handles.pop(w.version, "")
        try:
            return open_device_copy(wire, w.data.shape[0], self.place.device)
        except (RuntimeError, ValueError) as e:  # (ProtocolError is a ValueError)
            self.device_copy_failed(e)
            return None

    def device_copy_failed(self, e: Exception) -> None:
        self.counters["cuda_ipc_fallbacks"] += 1
        self.place.warn(
            "cuda_ipc",
            "CUDA IPC copy of the weights unusable (%s): loading from the host segment "
            "(same GPU visible to both processes? docker: ipc: host)",
            e,
        )
