"""CUDA IPC for published versions, for rollout servers whose engine runs on the learner's GPUs' machine.

UNTESTED WITHOUT A GPU: no machine this project is developed on has one. What is tested on CPU is
everything around the two calls into torch: the handle's wire form and its validation, the
announcement carrying it, the publisher keeping each shared buffer alive exactly as long as its
version, the rollout server's choice to use it and its fallback when opening fails. The two calls
themselves, :func:`share` and :func:`open_handle`, are typed against torch's own CUDA IPC (the API
``torch.multiprocessing`` pickles tensors with: ``UntypedStorage._share_cuda_`` and
``UntypedStorage._new_shared_cuda``), kept as thin as that API allows.

How it is used (``weights.cuda_ipc``; learner/transports/cuda_ipc.py, rollout_server/sources/cuda_ipc.py):
a learner on CUDA that offers shared-memory segments also copies each packed version onto its GPU (one host-to-device
copy of the bytes the digests were computed over) and announces the buffer's handle. A rollout
server on the same machine whose torch engine runs on CUDA still maps and verifies the host segment
(the version it keeps as its delta base), but loads its model from the device buffer: a
device-to-device copy instead of a host-to-device copy per server. Any failure to open the handle
falls back to the host segment (``rollout/cuda_ipc_fallbacks``). The vLLM engine loads through its
own worker RPC and does not use this path.

CUDA IPC needs both processes to see the same GPU (``CUDA_VISIBLE_DEVICES`` naming it in both) and, in
containers, ``ipc: host`` (docker/compose.yaml). A process may open a given allocation only once,
so a server opens each version's handle once and drops it when it installs the next.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from protocol.messages import ProtocolError

if TYPE_CHECKING:
    import torch

WIRE_PREFIX = "cuda1"
MAX_WIRE = 1024  # characters: the handles are 64 bytes, the ref-counter name a short path
_HEX = re.compile(r"[0-9a-f]{0,512}")
_INT = re.compile(r"0|[1-9][0-9]{0,18}")


@dataclass(frozen=True)
class CudaIpcHandle:
    """What ``UntypedStorage._share_cuda_`` returns for a storage, plus its length in bytes."""

    device: int
    handle: bytes  # cudaIpcMemHandle_t of the allocation that holds the storage
    storage_bytes: int
    offset_bytes: int  # of the storage within that allocation
    ref_counter: bytes  # torch's shared ref-counter file: the producer frees the memory only when readers let go
    ref_offset: int
    event: bytes  # cudaIpcEventHandle_t the reader waits on before reading (empty: none)
    event_sync: bool

    def to_wire(self) -> str:
        """A compact text for ``WeightsAnnouncement.cuda``."""
        fields = [
            str(self.device),
            self.handle.hex(),
            str(self.storage_bytes),
            str(self.offset_bytes),
            self.ref_counter.hex(),
            str(self.ref_offset),
            self.event.hex(),
            str(int(self.event_sync)),
        ]
        return ";".join([WIRE_PREFIX, *fields])

    @classmethod
    def from_wire(cls, text: str) -> CudaIpcHandle:
        """Parse :meth:`to_wire`'s text; ProtocolError when it is not one."""
        parts = text.split(";")
        if len(text) > MAX_WIRE or len(parts) != 9 or parts[0] != WIRE_PREFIX:
            raise ProtocolError("cuda", f"not a {WIRE_PREFIX} CUDA IPC handle ({len(text)} characters)")
        _, device, handle, size, offset, ref, ref_offset, event, sync = parts
        ints, blobs = (device, size, offset, ref_offset), (handle, ref, event)
        if (
            not all(_INT.fullmatch(x) for x in ints)
            or not all(_HEX.fullmatch(x) and len(x) % 2 == 0 for x in blobs)
            or sync not in ("0", "1")
            or not handle
        ):
            raise ProtocolError("cuda", "a CUDA IPC handle with malformed fields")
        return cls(
            device=int(device),
            handle=bytes.fromhex(handle),
            storage_bytes=int(size),
            offset_bytes=int(offset),
            ref_counter=bytes.fromhex(ref),
            ref_offset=int(ref_offset),
            event=bytes.fromhex(event),
            event_sync=sync == "1",
        )


def share(buf: torch.Tensor) -> CudaIpcHandle:
    """The handle of ``buf`` (a contiguous uint8 CUDA tensor that owns its whole storage). The caller
    keeps ``buf`` alive as long as the handle is announced. Untested without a GPU (module doc)."""
    import torch

    if buf.device.type != "cuda" or buf.dtype != torch.uint8 or buf.dim() != 1 or buf.storage_offset() != 0:
        raise ValueError(
            f"CUDA IPC shares a 1-D uint8 CUDA tensor at offset 0, got {buf.dtype} {tuple(buf.shape)} "
            f"on {buf.device}: weights.cuda_ipc needs the learner on CUDA (learner.device)"
        )
    device, handle, size, offset, ref, ref_offset, event, sync = buf.untyped_storage()._share_cuda_()
    return CudaIpcHandle(
        device=int(device),
        handle=bytes(handle),
        storage_bytes=int(size),
        offset_bytes=int(offset),
        ref_counter=bytes(ref),
        ref_offset=int(ref_offset),
        event=bytes(event or b""),
        event_sync=bool(sync),
    )


def open_handle(h: CudaIpcHandle, nbytes: int) -> torch.Tensor:
    """A uint8 CUDA tensor of the first ``nbytes`` of the shared buffer (no copy; read it, never write).
    Raises ValueError when the handle cannot hold ``nbytes``, and torch's error when CUDA cannot open
    it (another machine's GPU, no ``ipc: host``). Untested without a GPU (module doc)."""
    import torch

    if not 0 <= nbytes <= h.storage_bytes:
        raise ValueError(f"the CUDA IPC buffer has {h.storage_bytes} bytes, the version {nbytes}")
    try:
        torch.cuda._lazy_init()  # (AssertionError in a build without CUDA)
        storage = torch.UntypedStorage._new_shared_cuda(
            h.device,
            h.handle,
            h.storage_bytes,
            h.offset_bytes,
            h.ref_counter,
            h.ref_offset,
            h.event or None,
            h.event_sync,
        )
    except (AssertionError, RuntimeError) as e:
        raise RuntimeError(f"cannot open the learner's CUDA IPC buffer on cuda:{h.device}: {e}") from e
    out = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", h.device))
    out.set_(storage, 0, (nbytes,), (1,))
    return out
