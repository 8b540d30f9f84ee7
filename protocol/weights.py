"""Versioned weights as one contiguous, checksummed buffer (the *weights* link's payload).

A version is complete or absent (DESIGN.md): the receiver checks the CRC-32 of the whole buffer and
the manifest before touching its model. torch is imported lazily so the protocol stays light.
"""

from __future__ import annotations

import math
import warnings
import zlib
from typing import TYPE_CHECKING

from protocol.messages import WEIGHTS_ALIGN, ProtocolError, Weights

if TYPE_CHECKING:
    import torch


def pack_weights(state: dict[str, torch.Tensor], version: int, model_config: str) -> Weights:
    """Snapshot ``state`` into one buffer (exactly one copy of every byte, so training may go on)."""
    import torch

    tensors, offset = [], 0
    for name, t in state.items():
        tensors.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), offset, t.numel() * t.element_size()])
        offset += -(-tensors[-1][4] // WEIGHTS_ALIGN) * WEIGHTS_ALIGN  # next aligned start
    end = tensors[-1][3] + tensors[-1][4] if tensors else 0
    buf = torch.empty(end, dtype=torch.uint8)
    for (_, _, _, start, nbytes), t in zip(tensors, state.values(), strict=True):
        if nbytes:
            buf[start:start + nbytes].copy_(t.detach().contiguous().view(-1).view(torch.uint8), non_blocking=False)
    data = buf.numpy()
    return Weights(version=version, crc32=zlib.crc32(data), model_config=model_config, tensors=tensors, data=data)


def unpack_weights(msg: Weights) -> dict[str, torch.Tensor]:
    """Verify the checksum and return tensors that view ``msg.data`` (no copy)."""
    import torch

    crc = zlib.crc32(msg.data)
    if crc != msg.crc32:
        raise ProtocolError("invariant", f"weights v{msg.version}: crc32 {crc:#010x} != announced {msg.crc32:#010x}")
    with warnings.catch_warnings():  # decoded arrays are read-only; load_state_dict only reads them
        warnings.simplefilter("ignore", UserWarning)
        buf = torch.frombuffer(msg.data, dtype=torch.uint8) if msg.data.size else torch.empty(0, dtype=torch.uint8)
    out = {}
    for name, dtype, shape, offset, nbytes in msg.tensors:
        dt = getattr(torch, dtype, None)
        if not isinstance(dt, torch.dtype):
            raise ProtocolError("dtype", f"weights: tensor {name} has unknown dtype {dtype!r}")
        if nbytes != math.prod(shape) * dt.itemsize:
            raise ProtocolError("shape", f"weights: tensor {name} of shape {shape} and dtype {dtype} "
                                f"cannot have {nbytes} bytes")
        out[name] = buf[offset:offset + nbytes].view(dt).view(shape)
    return out
