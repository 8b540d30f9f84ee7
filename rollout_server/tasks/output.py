"""What a reward worker prints, bounded: its stdout and stderr (fd 1 and 2, so C-level writes too) are a pipe
that the rollout server drains on a thread; at most ``OUTPUT_BYTES`` per ``OUTPUT_WINDOW_S`` reach the rollout
log, line by line, prefixed with the functions' names, and the rest is read and dropped, counted as
``reward/output_dropped_bytes``. The pipe is always drained, so a loud function never blocks on a full pipe,
and a function printing 10 MB per call costs the disk 64 KiB per 10 s (docs/TASKS.md).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

OUTPUT_BYTES = 64 * 1024  # a reward worker's output forwarded into the rollout log per window...
OUTPUT_WINDOW_S = 10.0  # ...of this many seconds; beyond it, dropped and counted
PARTIAL_LINE = 4096  # an unterminated line is logged once it is this long

log = logging.getLogger("podsrl.rollout")


class OutputBudget:
    """Forwards a reward worker's output into the log within ``limit`` bytes per ``window_s``; one per
    :class:`RewardWorker`, shared by the workers it restarts (``dropped`` counts over the run)."""

    def __init__(
        self,
        names: list[str],
        limit: int = OUTPUT_BYTES,
        window_s: float = OUTPUT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prefix = f"reward output ({', '.join(names)}): "
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self.seen = self.forwarded = self.dropped = 0  # bytes, over the run
        self.window_start, self.window_used, self.warned = -float("inf"), 0, False
        self.pending = b""  # the start of a line not yet ended
        self.lock = threading.Lock()  # an old worker's pipe may still drain while its replacement starts

    def feed(self, data: bytes) -> None:
        """Some bytes the worker wrote: the part within this window's budget is logged, the rest counted."""
        with self.lock:
            now = self.clock()
            if now - self.window_start >= self.window_s:
                self.window_start, self.window_used, self.warned = now, 0, False
            self.seen += len(data)
            take = data[: max(0, self.limit - self.window_used)]
            self._log_lines(take)
            if len(take) < len(data) and self.pending:  # the line's end is dropped: log its start, marked
                log.info("%s%s[...]", self.prefix, self.pending.decode(errors="replace"))
                self.pending = b""
            if len(take) < len(data) and not self.warned:
                log.warning(
                    "%sover %d bytes in %.0fs: the rest of this window is dropped (counted as "
                    "reward/output_dropped_bytes); print less, or write to a file of your own",
                    self.prefix,
                    self.limit,
                    self.window_s,
                )
                self.warned = True  # one such line per window
            self.window_used += len(take)
            self.forwarded += len(take)
            self.dropped += len(data) - len(take)

    def _log_lines(self, take: bytes) -> None:
        lines = (self.pending + take).split(b"\n")
        self.pending = lines.pop()
        if len(self.pending) >= PARTIAL_LINE:
            lines.append(self.pending)
            self.pending = b""
        for line in lines:
            log.info("%s%s", self.prefix, line.decode(errors="replace").rstrip("\r"))

    def drain(self, conn: Any) -> None:
        """Read the worker's end of the pipe until it closes (the worker exited or was killed)."""
        fd = conn.fileno()
        try:
            while data := os.read(fd, 1 << 16):
                self.feed(data)
        except OSError:
            pass
        finally:
            conn.close()
