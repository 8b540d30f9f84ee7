"""Pure codec: ``encode(msg) -> frames`` and ``decode(frames) -> msg``; no sockets here.

Wire format of one message (a ZeroMQ multipart message):
  frame 0: msgpack map ``{"t": type, "v": PROTOCOL_VERSION, "f": {scalar fields}, "a": [[name, dtype, shape], ...]}``
  frame i>0: the raw little-endian bytes of the i-th array field, in ``ARRAYS`` order.

Arrays are never copied by ``encode`` (frames are memoryviews of the arrays) and never copied by
``decode`` (arrays are read-only views of the received frames). Decoding is strict and raises
:class:`ProtocolError` whose ``reason`` is a counter key: ``malformed``, ``unknown_type``,
``version``, ``schema``, ``dtype``, ``shape``, ``non_finite``, ``too_large``, ``invariant``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from typing import Any, TypeVar

import msgpack
import numpy as np

from protocol.messages import MESSAGES, PROTOCOL_VERSION, Message, ProtocolError, scalar_fields

M = TypeVar("M", bound=Message)
Buffer = bytes | bytearray | memoryview
MAX_HEADER_BYTES = 8 << 20  # manifests of large models are the biggest headers (~100 B per tensor)


def encode(msg: Message) -> list[Buffer]:
    cls = type(msg)
    fields = {name: getattr(msg, name) for name in _scalars(cls)}
    arrays, frames = [], []
    for name, (dtype, _) in cls.ARRAYS.items():
        arr = np.ascontiguousarray(getattr(msg, name), dtype=dtype)
        arrays.append([name, dtype.str, list(arr.shape)])
        frames.append(memoryview(arr).cast("B"))
    header = msgpack.packb({"t": cls.TYPE, "v": PROTOCOL_VERSION, "f": fields, "a": arrays}, use_bin_type=True)
    return [header, *frames]


def decode(frames: Sequence[Buffer], expect: type[M] | tuple[type[Message], ...] | None = None) -> M:
    """Decode one multipart message; ``expect`` restricts the accepted types."""
    if not frames:
        raise ProtocolError("malformed", "no frames")
    if len(frames[0]) > MAX_HEADER_BYTES:
        raise ProtocolError("too_large", f"header of {len(frames[0])} bytes > {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(frames[0], raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise ProtocolError("malformed", f"header is not msgpack ({type(e).__name__})") from None
    if not isinstance(header, dict) or set(header) != {"t", "v", "f", "a"}:
        raise ProtocolError("malformed", "header must be a map with keys t, v, f, a")
    if type(header["v"]) is not int or header["v"] != PROTOCOL_VERSION:
        raise ProtocolError("version", f"protocol version {header['v']!r}, this process speaks {PROTOCOL_VERSION}")
    cls = MESSAGES.get(header["t"]) if isinstance(header["t"], str) else None
    if cls is None:
        raise ProtocolError("unknown_type", f"message type {header['t']!r}")
    if expect is not None and not issubclass(cls, expect):
        raise ProtocolError("unknown_type", f"{cls.TYPE!r} is not expected on this socket")
    values = _check_scalars(cls, header["f"])
    values.update(_check_arrays(cls, header["a"], frames[1:]))
    msg = cls(**values)
    msg.check()
    return msg  # type: ignore[return-value]


@cache
def _scalars(cls: type[Message]) -> dict[str, type]:
    return scalar_fields(cls)


def _check_scalars(cls: type[Message], fields: Any) -> dict[str, Any]:
    spec = _scalars(cls)
    if not isinstance(fields, dict) or set(fields) != set(spec):
        got = sorted(map(str, fields)) if isinstance(fields, dict) else type(fields).__name__
        raise ProtocolError("schema", f"{cls.TYPE}: fields {got}, expected {sorted(spec)}")
    out = {}
    for name, kind in spec.items():
        value = fields[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ProtocolError("schema", f"{cls.TYPE}.{name}: expected {kind.__name__}, got {type(value).__name__}")
        if kind is float and not math.isfinite(value):
            raise ProtocolError("non_finite", f"{cls.TYPE}.{name} = {value}")
        out[name] = value
    return out


def _check_arrays(cls: type[Message], specs: Any, frames: Sequence[Buffer]) -> dict[str, np.ndarray]:
    expected = cls.ARRAYS
    if not isinstance(specs, list) or len(specs) != len(expected) or len(frames) != len(expected):
        raise ProtocolError("schema", f"{cls.TYPE}: expected {len(expected)} arrays, got {len(frames)} frames")
    out = {}
    for spec, (name, (dtype, ndim)), frame in zip(specs, expected.items(), frames, strict=True):
        if not (isinstance(spec, list) and len(spec) == 3 and spec[0] == name):
            raise ProtocolError("schema", f"{cls.TYPE}: array spec {spec!r}, expected {name!r} next")
        if spec[1] != dtype.str:
            raise ProtocolError("dtype", f"{cls.TYPE}.{name}: dtype {spec[1]!r}, expected {dtype.str!r}")
        shape = spec[2]
        if not (isinstance(shape, list) and len(shape) == ndim and all(type(d) is int and d >= 0 for d in shape)):
            raise ProtocolError("shape", f"{cls.TYPE}.{name}: shape {shape!r}, expected {ndim} non-negative dims")
        nbytes = math.prod(shape) * dtype.itemsize
        if len(frame) != nbytes:
            raise ProtocolError("shape", f"{cls.TYPE}.{name}: shape {shape} needs {nbytes} bytes, frame has {len(frame)}")
        arr = np.frombuffer(frame, dtype=dtype).reshape(shape)
        arr.flags.writeable = False  # a view of the received (or the sender's) memory: never written
        if dtype.kind == "f" and not np.isfinite(arr).all():
            raise ProtocolError("non_finite", f"{cls.TYPE}.{name} contains NaN or inf")
        out[name] = arr
    return out
