"""Versioned weights: one contiguous buffer with a per-tensor checksummed manifest, and deltas between versions.

A version is complete or absent (DESIGN.md): :func:`verify` checks the xxh3-64 digest of every
tensor (and names the first that differs) before anything touches a model. Between two versions of
the same layout, :func:`encode_delta` is the zstd-compressed difference of their raw words (zigzag,
in byte planes; below): exact for any dtype, and mostly zero bytes when few values changed (bf16 at
RL learning rates), so it compresses to a few percent of the version. :func:`apply_delta` rebuilds
the target from the base and verifies it; a delta that does not rebuild the target bit for bit is
refused, never loaded. torch is imported lazily so the protocol stays light.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xxhash
import zstandard

from protocol.messages import WEIGHTS_ALIGN, ProtocolError, Weights

if TYPE_CHECKING:
    import torch

Alloc = Callable[[int], np.ndarray]  # nbytes -> a writable uint8 buffer of that size


def digest(buf: np.ndarray) -> int:
    """xxh3-64 of a contiguous array's bytes (much faster than zlib.crc32; docs/BENCHMARKS.md)."""
    return xxhash.xxh3_64_intdigest(buf.data)


def manifest_digest(tensors: list) -> int:
    """One number for a whole version: the digest of its tensors' digests, in order."""
    return digest(np.array([t[5] for t in tensors], dtype="<u8"))


def layout(state: dict[str, torch.Tensor]) -> tuple[list[list], int]:
    """The manifest entries (digests 0 until filled) and buffer size for ``state``."""
    tensors: list[list] = []
    offset = end = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        tensors.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), offset, nbytes, 0])
        end = offset + nbytes
        offset += -(-nbytes // WEIGHTS_ALIGN) * WEIGHTS_ALIGN  # next aligned start
    return tensors, end


def pack_weights(
    state: dict[str, torch.Tensor], version: int, model_config: str, alloc: Alloc | None = None
) -> Weights:
    """Snapshot ``state`` into one buffer (exactly one copy of every byte, so training may go on) and
    digest each tensor. ``alloc`` provides the buffer (e.g. a shared-memory segment, ``protocol/shm.py``)."""
    import torch

    tensors, end = layout(state)
    data = alloc(end) if alloc is not None else np.empty(end, np.uint8)
    buf = torch.from_numpy(data) if end else torch.empty(0, dtype=torch.uint8)
    for entry, t in zip(tensors, state.values(), strict=True):
        offset, nbytes = entry[3], entry[4]
        if nbytes:
            buf[offset : offset + nbytes].copy_(t.detach().contiguous().view(-1).view(torch.uint8))
        entry[5] = digest(data[offset : offset + nbytes])
    return Weights(version=version, model_config=model_config, tensors=tensors, files=[], data=data)


def verify(w: Weights) -> None:
    """Raise ProtocolError("checksum") naming the first tensor whose bytes do not match its digest."""
    data = w.data
    for name, _, _, offset, nbytes, want in w.tensors:
        got = digest(data[offset : offset + nbytes])
        if got != want:
            raise ProtocolError(
                "checksum", f"weights v{w.version}: tensor {name} has xxh3 {got:#018x}, the manifest says {want:#018x}"
            )


def with_files(weights: Weights, files: dict[str, bytes]) -> Weights:
    """The same version with ``files`` attached (the weight bytes are shared, not copied)."""
    blob = np.frombuffer(b"".join(files.values()), np.uint8)
    return dataclasses.replace(weights, files=[[k, len(v)] for k, v in files.items()], file_data=blob)


def unpack_files(weights: Weights) -> dict[str, bytes]:
    """The files a ``with_files`` version carries, name -> bytes (names were checked by the codec)."""
    out, offset, blob = {}, 0, weights.file_data.tobytes()
    for name, nbytes in weights.files:
        out[name] = blob[offset : offset + nbytes]
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


def unpack_weights(msg: Weights, verified: bool = False, buf: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Verify the digests (unless the caller just did) and return tensors that view ``msg.data`` (no
    copy), or ``buf``: the same bytes elsewhere (a version's CUDA IPC device copy, protocol/cuda_ipc.py)."""
    import torch

    if not verified:
        verify(msg)
    if buf is not None:
        if buf.dtype != torch.uint8 or tuple(buf.shape) != tuple(msg.data.shape):
            raise ValueError(
                f"a device copy of v{msg.version} must be {msg.data.shape[0]} uint8 bytes, "
                f"got {buf.dtype} {tuple(buf.shape)}"
            )
    else:
        with warnings.catch_warnings():  # decoded arrays are read-only; load_state_dict only reads them
            warnings.simplefilter("ignore", UserWarning)
            buf = torch.frombuffer(msg.data, dtype=torch.uint8) if msg.data.size else torch.empty(0, dtype=torch.uint8)
    out = {}
    for name, dtype, shape, offset, nbytes, _ in msg.tensors:
        dt = getattr(torch, dtype, None)
        if not isinstance(dt, torch.dtype):
            raise ProtocolError("dtype", f"weights: tensor {name} has unknown dtype {dtype!r}")
        if nbytes != math.prod(shape) * dt.itemsize:
            raise ProtocolError(
                "shape", f"weights: tensor {name} of shape {shape} and dtype {dtype} cannot have {nbytes} bytes"
            )
        out[name] = buf[offset : offset + nbytes].view(dt).view(shape)
    return out


# -- deltas -----------------------------------------------------------------------------------------
#
# A delta is one zstd frame (content size = the version's size) of the target's bytes relative to the
# base's, block by block. Each tensor is read as little-endian words of its element size (gaps between
# tensors as bytes); a word's delta is the zigzag of target - base (mod 2**bits): a value that moved by
# a few units in the last place becomes a small number, whatever its sign. The words of a block are then
# stored as byte planes (all the low bytes, then the next, ...), so the high planes of small deltas are
# runs of zeros. Exact for any dtype, like an XOR, and 24-38% smaller than zstd(XOR) on AdamW updates of
# bf16 and fp32 weights (docs/BENCHMARKS.md).

DELTA_BLOCK = 1 << 20  # bytes per block (a multiple of 8): encoded and decoded a block at a time, in cache
_ITEMSIZE = {
    "float64": 8,
    "int64": 8,
    "uint64": 8,
    "complex64": 8,
    "float32": 4,
    "int32": 4,
    "uint32": 4,
    "bfloat16": 2,
    "float16": 2,
    "int16": 2,
    "uint16": 2,
}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_INT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def same_layout(a: list, b: list) -> bool:
    """Manifests that slice their buffers identically (names, dtypes, shapes, offsets; digests aside)."""
    return len(a) == len(b) and all(x[:5] == y[:5] for x, y in zip(a, b, strict=True))


def _blocks(tensors: list, raw: int) -> list[tuple[int, int, int]]:
    """(start, end, word size) blocks covering ``[0, raw)``: each tensor in words of its element size,
    the gaps between tensors in bytes; no block is longer than DELTA_BLOCK."""
    segments, pos = [], 0
    for _, dtype, _, offset, nbytes, _ in tensors:
        if offset > pos:
            segments.append((pos, offset, 1))
        k = _ITEMSIZE.get(dtype, 1)
        if nbytes:
            segments.append((offset, offset + nbytes, k if nbytes % k == 0 else 1))
        pos = offset + nbytes
    if raw > pos:
        segments.append((pos, raw, 1))
    return [(s, min(s + DELTA_BLOCK, end), k) for start, end, k in segments for s in range(start, end, DELTA_BLOCK)]


# (Planes are split and joined with shifts, not with a transposed copy: 6x faster in numpy.)


def _encode_block(base: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    d = (target.view(_UINT[k]) - base.view(_UINT[k])).view(_INT[k])  # wraps: exact mod 2**bits
    z = ((d << 1) ^ (d >> (8 * k - 1))).view(_UINT[k])  # zigzag: -1 -> 1, 1 -> 2, -2 -> 3, ...
    planes = np.empty((k, z.shape[0]), np.uint8)
    for j in range(k):  # plane j: byte j of every word (setitem truncates to the low byte)
        planes[j] = z >> (8 * j) if j else z
    return planes.ravel()


def _decode_block(base: np.ndarray, planes: np.ndarray, k: int, out: np.ndarray) -> None:
    p = planes.reshape(k, -1)
    z = p[k - 1].astype(_UINT[k])
    for j in range(k - 2, -1, -1):
        z <<= 8
        z |= p[j]
    d = z >> 1  # un-zigzag: (z >> 1) ^ -(z & 1), in unsigned words
    z &= 1
    np.negative(z, out=z)
    np.bitwise_xor(d, z, out=d)
    np.add(base.view(_UINT[k]), d, out=out.view(_UINT[k]))


def encode_delta(base: Weights, target: Weights, level: int = 1) -> bytes:
    """The delta base -> target (see above); the two must have the same layout."""
    if not same_layout(base.tensors, target.tensors) or base.data.shape != target.data.shape:
        raise ValueError(f"v{base.version} and v{target.version} have different layouts: send the full version")
    raw = target.data.shape[0]
    cobj = zstandard.ZstdCompressor(level=level, write_content_size=True).compressobj(size=raw)
    parts = [
        cobj.compress(_encode_block(base.data[s:e], target.data[s:e], k).data)
        for s, e, k in _blocks(target.tensors, raw)
    ]
    parts.append(cobj.flush())
    return b"".join(parts)


def apply_delta(
    base: Weights, blob: np.ndarray, version: int, model_config: str, tensors: list, out: np.ndarray | None = None
) -> Weights:
    """Version ``version`` from ``base`` and a delta, written into ``out`` (a recycled buffer of the
    version's size, else a new one); verified. Raises ProtocolError when the delta is corrupt or does
    not rebuild the target exactly (the caller then fetches the full version); ``base`` is never written.

    One pass: the delta is decompressed a block at a time and decoded straight into the result, so no
    version-sized temporary is allocated (and page-faulted) per delta."""
    raw = base.data.shape[0]
    if not same_layout(base.tensors, tensors):
        raise ProtocolError("delta", f"the delta to v{version} has another layout than v{base.version}")
    data = out if out is not None and out.shape == (raw,) and out.dtype == np.uint8 else np.empty(raw, np.uint8)
    scratch = np.empty(min(DELTA_BLOCK, max(raw, 1)), np.uint8)
    try:  # the frame must declare exactly the version's size, and hold exactly that many bytes
        declared = zstandard.frame_content_size(blob.data)
        if declared != raw:
            raise ProtocolError("delta", f"the delta v{base.version}->v{version} declares {declared} bytes, not {raw}")
        with zstandard.ZstdDecompressor().stream_reader(blob.data) as reader:
            for s, e, k in _blocks(tensors, raw):
                got = 0
                while got < e - s:
                    n = reader.readinto(scratch[got : e - s])
                    if n == 0:
                        raise ProtocolError(
                            "delta", f"the delta v{base.version}->v{version} ends at byte {s + got}, not {raw}"
                        )
                    got += n
                _decode_block(base.data[s:e], scratch[: e - s], k, data[s:e])
            if reader.read(1):
                raise ProtocolError("delta", f"the delta v{base.version}->v{version} has more than {raw} bytes")
    except zstandard.ZstdError as e:
        raise ProtocolError("delta", f"the delta v{base.version}->v{version} does not decompress: {e}") from None
    result = Weights(version=version, model_config=model_config, tensors=tensors, files=[], data=data)
    verify(result)
    return result
