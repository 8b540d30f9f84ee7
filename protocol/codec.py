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

import dataclasses
import math
from collections.abc import Sequence
from functools import cache
from typing import Any, NamedTuple, TypeVar

import msgpack
import numpy as np

from protocol.messages import MESSAGES, PROTOCOL_VERSION, Message, ProtocolError, scalar_fields

M = TypeVar("M", bound=Message)
Buffer = bytes | bytearray | memoryview
MAX_HEADER_BYTES = 8 << 20  # manifests of large models are the biggest headers (~100 B per tensor)


def encode(msg: Message) -> list[Buffer]:
    cls = type(msg)
    fields = {name: getattr(msg, name) for name in _scalars(cls)}  # type: ignore[arg-type]  # python/mypy#20409
    arrays, frames = [], []
    for name, (dtype, _) in cls.ARRAYS.items():
        arr = np.ascontiguousarray(getattr(msg, name), dtype=dtype)
        arrays.append([name, dtype.str, list(arr.shape)])
        frames.append(arr.data.cast("B"))  # ndarray.data is memoryview(arr)
    header = msgpack.packb({"t": cls.TYPE, "v": PROTOCOL_VERSION, "f": fields, "a": arrays}, use_bin_type=True)
    return [header, *frames]


def decode(frames: Sequence[Buffer], expect: type[M] | tuple[type[Message], ...] | None = None) -> M:
    """Decode one multipart message; ``expect`` restricts the accepted types."""
    if not frames:
        raise ProtocolError("malformed", "no frames")
    head = frames[0]
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError("too_large", f"header of {len(head)} bytes > {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise ProtocolError("malformed", f"header is not msgpack ({type(e).__name__})") from None
    # msgpack builds exact dict/list/str/int/float/bool objects, so ``type(x) is T`` is isinstance here
    if type(header) is not dict or header.keys() != _HEADER_KEYS:
        raise ProtocolError("malformed", "header must be a map with keys t, v, f, a")
    version = header["v"]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError("version", f"protocol version {version!r}, this process speaks {PROTOCOL_VERSION}")
    name = header["t"]
    cls = MESSAGES.get(name) if type(name) is str else None
    if cls is None:
        raise ProtocolError("unknown_type", f"message type {name!r}")
    if expect is not None and not issubclass(cls, expect):
        raise ProtocolError("unknown_type", f"{cls.TYPE!r} is not expected on this socket")
    plan = _plan(cls)  # type: ignore[arg-type]  # python/mypy#20409
    values = _check_scalars(plan, header["f"])
    _check_arrays(plan, header["a"], frames, values)
    if plan.direct:  # what the dataclass __init__ would do, without its per-field object.__setattr__
        msg = _new(cls)
        msg.__dict__.update(values)
    else:
        msg = cls(**values)
    msg.check()
    return msg  # type: ignore[return-value]  # issubclass(cls, expect) above; mypy cannot tie cls to M


_HEADER_KEYS = frozenset(("t", "v", "f", "a"))
_new = object.__new__
_isfinite = math.isfinite
_vdot = np.vdot


# Calls of these cached functions carry ``type: ignore[arg-type]``: mypy wrongly reports a class object
# as not ``Hashable`` (python/mypy#20409), the type that functools.cache asks of arguments.
@cache
def _scalars(cls: type[Message]) -> dict[str, type]:
    return scalar_fields(cls)


class _Plan(NamedTuple):
    """What decoding one message class needs, worked out once per class."""

    cls: type[Message]
    scalars: tuple[tuple[str, type[Any]], ...]  # (name, Python type) in field order
    keys: frozenset[str]  # the scalar field names
    arrays: tuple[tuple[str, np.dtype, str, int, int, bool], ...]  # (name, dtype, dtype.str, ndim, itemsize, is_float)
    direct: bool  # instances can be built by filling __dict__ (a plain dataclass: no __post_init__, all init)


@cache
def _plan(cls: type[Message]) -> _Plan:
    spec = _scalars(cls)  # type: ignore[arg-type]  # python/mypy#20409
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]  # every concrete Message is a dataclass
    direct = (
        not hasattr(cls, "__post_init__")
        and all(f.init for f in fields)
        and {f.name for f in fields} == set(spec) | set(cls.ARRAYS)
        and "__slots__" not in cls.__dict__
    )
    return _Plan(
        cls,
        tuple(spec.items()),
        frozenset(spec),
        tuple(
            (name, dtype, dtype.str, ndim, dtype.itemsize, dtype.kind == "f")
            for name, (dtype, ndim) in cls.ARRAYS.items()
        ),
        direct,
    )


def _check_scalars(plan: _Plan, fields: Any) -> dict[str, Any]:
    if type(fields) is not dict or fields.keys() != plan.keys:
        got = sorted(map(str, fields)) if isinstance(fields, dict) else type(fields).__name__
        raise ProtocolError("schema", f"{plan.cls.TYPE}: fields {got}, expected {sorted(plan.keys)}")
    out = {}
    for name, kind in plan.scalars:
        value = fields[name]
        if type(value) is not kind:
            value = _coerce(plan.cls, name, kind, value)
        elif kind is float and not _isfinite(value):
            raise ProtocolError("non_finite", f"{plan.cls.TYPE}.{name} = {value}")
        out[name] = value
    return out


def _coerce(cls: type[Message], name: str, kind: type[Any], value: Any) -> Any:
    """The general scalar check, for values whose type is not exactly ``kind``."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError("schema", f"{cls.TYPE}.{name}: expected {kind.__name__}, got {type(value).__name__}")
    if kind is float and not math.isfinite(value):
        raise ProtocolError("non_finite", f"{cls.TYPE}.{name} = {value}")
    return value


def _check_arrays(plan: _Plan, specs: Any, frames: Sequence[Buffer], out: dict[str, Any]) -> None:
    """Add the arrays, read-only views of ``frames[1:]``, to ``out``."""
    arrays = plan.arrays
    count = len(arrays)
    if type(specs) is not list or len(specs) != count or len(frames) != count + 1:
        raise ProtocolError("schema", f"{plan.cls.TYPE}: expected {count} arrays, got {len(frames) - 1} frames")
    for i in range(count):
        name, dtype, dstr, ndim, itemsize, is_float = arrays[i]
        spec = specs[i]
        if type(spec) is not list or len(spec) != 3 or spec[0] != name:
            raise ProtocolError("schema", f"{plan.cls.TYPE}: array spec {spec!r}, expected {name!r} next")
        if spec[1] != dstr:
            raise ProtocolError("dtype", f"{plan.cls.TYPE}.{name}: dtype {spec[1]!r}, expected {dstr!r}")
        shape = spec[2]
        if type(shape) is not list or len(shape) != ndim:
            raise _bad_shape(plan, name, shape, ndim)
        size = 1
        for d in shape:
            if type(d) is not int or d < 0:
                raise _bad_shape(plan, name, shape, ndim)
            size *= d
        frame = frames[i + 1]
        if len(frame) != size * itemsize:
            raise ProtocolError(
                "shape", f"{plan.cls.TYPE}.{name}: shape {shape} needs {size * itemsize} bytes, frame has {len(frame)}"
            )
        arr = np.frombuffer(frame, dtype=dtype)
        if ndim != 1:
            arr = arr.reshape(shape)
        arr.setflags(write=False)  # a view of the received (or the sender's) memory: never written
        # A finite sum of squares proves there is no NaN or inf (x * x is inf or NaN for those and no
        # term is negative); only an overflowing one, from values beyond ~1e19, needs the exact
        # element-wise scan. np.vdot is BLAS and, unlike np.dot, sets off no overflow/invalid warnings.
        if is_float and not _isfinite(_vdot(arr, arr)) and not np.isfinite(arr).all():
            raise ProtocolError("non_finite", f"{plan.cls.TYPE}.{name} contains NaN or inf")
        out[name] = arr


def _bad_shape(plan: _Plan, name: str, shape: Any, ndim: int) -> ProtocolError:
    return ProtocolError("shape", f"{plan.cls.TYPE}.{name}: shape {shape!r}, expected {ndim} non-negative dims")
