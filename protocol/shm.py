"""Published versions in shared memory, for rollout servers on the learner's machine.

The learner packs each version straight into a file under ``weights.shm_dir`` (``/dev/shm``: memory,
not disk), seals it with a header and renames it into place, so a segment is complete or absent. A
rollout server on the same machine (same boot id) maps it read-only, checks the header against the
announcement (the manifest's digest included) and every tensor's digest, and copies it into its
model: no socket. It verifies a private copy (one memcpy), so what a local process writes afterwards
cannot reach its model. Segments are the run's user's only (mode 0600).

Segment ``podsrl-<run key>-<learner pid>-v<version>``, where the run key is a hash of the run directory::

    [raw buffer][zero padding to 4096][header: msgpack][u64 header length][magic b"PODSRLW1"]

Lifetime: the learner removes a segment when it stops keeping that version (a reader that has it
mapped keeps its pages until it unmaps) and all of its segments when it closes. SIGKILL leaves no
chance to clean up, so at start a learner removes every segment of its run key and every segment
whose learner process is gone (any run); ``podsrl run`` also removes its run's segments when it ends.
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import socket
import struct
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from protocol.messages import ProtocolError, Weights

MAGIC = b"PODSRLW1"
PAGE = 4096
MAX_HEADER = 64 << 20
_TRAILER = struct.Struct("<Q8s")


@functools.cache  # announced every second and compared per version: read /proc once
def host_id() -> str:
    """This machine's identity for shared memory: the kernel's boot id (the same in every container on
    the host, different on every other machine and after a reboot), else the host name."""
    try:
        return "boot:" + Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:36]
    except OSError:
        return "host:" + socket.gethostname()[:200]


def run_key(run_dir: str | Path) -> str:
    return hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]


def segment_name(key: str, version: int, pid: int | None = None) -> str:
    return f"podsrl-{key}-{os.getpid() if pid is None else pid}-v{version}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_segments(directory: str | Path, key: str | None = None) -> int:
    """Delete the segments (and unfinished ones) of run ``key``, or, with no key, those whose learner
    process is gone. Returns how many were removed."""
    n = 0
    for p in list(Path(directory).glob("podsrl-*-*-v*")) + list(Path(directory).glob(".podsrl-*-*.tmp")):
        parts = p.name.lstrip(".").split("-")
        if len(parts) < 4 or not parts[2].isdigit():
            continue
        if (parts[1] == key) if key is not None else not _alive(int(parts[2])):
            p.unlink(missing_ok=True)
            n += 1
    return n


class SegmentStore:
    """The learner's segments: :meth:`alloc` a buffer to pack into, :meth:`seal` it under its name,
    :meth:`remove` it when the version is no longer kept, :meth:`close` at the end."""

    def __init__(self, directory: str | Path, key: str, session: int) -> None:
        self.dir, self.key, self.session = Path(directory), key, session
        self.stale_removed = self.remove_stale()
        self._pending: tuple[Path, int] | None = None
        self._live: dict[int, Path] = {}

    @property
    def pending(self) -> bool:
        """A buffer was allocated and not yet sealed."""
        return self._pending is not None

    def remove_stale(self) -> int:
        """Delete what killed learners left: every segment of this run key, and any whose learner is gone."""
        if not self.dir.is_dir() or not os.access(self.dir, os.W_OK):
            raise OSError(f"{self.dir} is not a writable directory")
        return remove_segments(self.dir, self.key) + remove_segments(self.dir)

    def alloc(self, nbytes: int) -> np.ndarray:
        """A writable buffer of ``nbytes`` backed by a new, not yet visible segment.

        Raises OSError (ENOSPC) when the directory cannot hold it: space is reserved up front, because
        writing past a full tmpfs through a mapping would kill the process with SIGBUS."""
        tmp = self.dir / f".podsrl-{self.key}-{os.getpid()}-{len(self._live)}.tmp"  # (a .tmp: never read)
        tmp.unlink(missing_ok=True)  # (a file left there, whatever its mode, is never reused)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the run's user only, whatever the umask: no other user reads or writes it
            size = max(nbytes, 1)
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self._pending = (tmp, nbytes)
        return np.frombuffer(mm, np.uint8, count=nbytes)  # the array keeps the mapping alive

    def seal(self, w: Weights) -> str:
        """Write ``w``'s header after its bytes (packed by :meth:`alloc`'s buffer) and publish the segment."""
        assert self._pending is not None, "seal() follows alloc()"
        tmp, nbytes = self._pending
        self._pending = None
        header = msgpack.packb(
            {
                "version": w.version,
                "session": self.session,
                "model_config": w.model_config,
                "tensors": w.tensors,
                "nbytes": nbytes,
            },
            use_bin_type=True,
        )
        start = -(-nbytes // PAGE) * PAGE
        with open(tmp, "r+b") as f:
            f.truncate(start)
            f.seek(start)
            f.write(header)
            f.write(_TRAILER.pack(len(header), MAGIC))
        name = segment_name(self.key, w.version)
        os.replace(tmp, self.dir / name)
        self._live[w.version] = self.dir / name
        return name

    def remove(self, version: int) -> None:
        path = self._live.pop(version, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        for version in list(self._live):
            self.remove(version)
        if self._pending is not None:
            self._pending[0].unlink(missing_ok=True)


def read_segment(path: str | Path, version: int, session: int, manifest: int) -> Weights:
    """Map a sealed segment read-only and return its version, verified against the announcement
    (``version``, learner ``session``, and ``manifest``: the digest of the per-tensor digests the
    learner computed when it packed the version) and then its bytes against those digests. Any process
    of the run's user can write a segment, header included, so its own digests prove nothing until they
        match the announced manifest. The version returned is a private copy of the segment's bytes, so the
    bytes checked are the bytes loaded. Raises OSError when it is gone and ProtocolError("shm") when it is
    not what it should be (ProtocolError("checksum") when its bytes differ from their digests)."""
    from protocol.weights import manifest_digest, verify

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < _TRAILER.size:
            raise ProtocolError("shm", f"{path}: {size} bytes is no segment")
        # MAP_POPULATE maps every page now, in one call, instead of one page fault per 4 KiB later
        mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
    head_len, magic = _TRAILER.unpack_from(mm, size - _TRAILER.size)
    if magic != MAGIC or head_len > min(MAX_HEADER, size - _TRAILER.size):
        raise ProtocolError("shm", f"{path}: not a podsrl segment (bad trailer)")
    try:
        head: Any = msgpack.unpackb(mm[size - _TRAILER.size - head_len : size - _TRAILER.size], raw=False)
    except Exception as e:
        raise ProtocolError("shm", f"{path}: header is not msgpack ({type(e).__name__})") from None
    if not (
        isinstance(head, dict)
        and head.get("version") == version
        and head.get("session") == session
        and isinstance(head.get("model_config"), str)
        and isinstance(head.get("tensors"), list)
        and type(head.get("nbytes")) is int
        and 0 <= head["nbytes"] <= size - _TRAILER.size - head_len
    ):
        raise ProtocolError("shm", f"{path}: the header is not that of v{version} from learner session {session}")
    # A private copy, verified: bytes a local process writes into the segment after this check (while
    # the version waits to be installed) never reach the model. One memcpy; the digests read it anyway.
    data = np.frombuffer(mm, np.uint8, count=head["nbytes"]).copy()
    w = Weights(version=version, model_config=head["model_config"], tensors=head["tensors"], files=[], data=data)
    w.check()
    if manifest_digest(w.tensors) != manifest:
        raise ProtocolError("shm", f"{path}: its manifest is not the one the learner announced for v{version}")
    verify(w)
    return w
