"""Versioned weights as one contiguous, checksummed buffer (the *weights* link's payload).

A version is complete or absent (DESIGN.md): the receiver checks the CRC-32 of the whole buffer and
the manifest before touching its model. torch is imported lazily so the protocol stays light.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from protocol.messages import WEIGHTS_ALIGN, ProtocolError, Weights

if TYPE_CHECKING:
    import torch


def pack_weights(state: dict[str, torch.Tensor], version: int, model_config: str) -> Weights:
    """Snapshot ``state`` into one buffer (exactly one copy of every byte, so training may go on)."""
    import torch

    tensors: list[list] = []  # [name, dtype, shape, offset, nbytes]: the manifest's wire form
    spans: list[tuple[int, int]] = []
    offset = end = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        tensors.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), offset, nbytes])
        spans.append((offset, nbytes))
        end = offset + nbytes
        offset += -(-nbytes // WEIGHTS_ALIGN) * WEIGHTS_ALIGN  # next aligned start
    buf = torch.empty(end, dtype=torch.uint8)
    for (start, nbytes), t in zip(spans, state.values(), strict=True):
        if nbytes:
            buf[start:start + nbytes].copy_(t.detach().contiguous().view(-1).view(torch.uint8), non_blocking=False)
    data = buf.numpy()
    return Weights(version=version, crc32=zlib.crc32(data.data), model_config=model_config, tensors=tensors, files=[],
                   data=data)


def with_files(weights: Weights, files: dict[str, bytes]) -> Weights:
    """The same version with ``files`` attached (the weight bytes are shared, not copied)."""
    blob = np.frombuffer(b"".join(files.values()), np.uint8)
    return dataclasses.replace(weights, files=[[k, len(v)] for k, v in files.items()], file_data=blob)


def unpack_files(weights: Weights) -> dict[str, bytes]:
    """The files a ``with_files`` reply carries, name -> bytes (names were checked by the codec)."""
    out, offset, blob = {}, 0, weights.file_data.tobytes()
    for name, nbytes in weights.files:
        out[name] = blob[offset:offset + nbytes]
        offset += nbytes
    return out


def read_tokenizer_files(model_dir: str | Path) -> dict[str, bytes]:
    """Every file of the model's tokenizer, as written by ``save_pretrained`` into a scratch directory.

    Saving through transformers (rather than picking files by name) sends exactly what
    ``AutoTokenizer.from_pretrained`` needs, whatever the tokenizer's kind.
    """
    import tempfile

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def unpack_weights(msg: Weights) -> dict[str, torch.Tensor]:
    """Verify the checksum and return tensors that view ``msg.data`` (no copy)."""
    import torch

    crc = zlib.crc32(msg.data.data)
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
