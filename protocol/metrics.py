"""One small monitor interface: every process logs flat, namespaced metric dicts through it.

JSON lines always (``<run>/metrics/<role>.jsonl``, one object per record with ``step`` and ``time``);
TensorBoard too when ``torch.utils.tensorboard`` and ``tensorboard`` are installed. The keys are
documented in ``docs/METRICS.md``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class Monitor:
    def __init__(self, run_dir: str | Path, role: str, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics" / f"{role}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tb" / role))
            except Exception:  # tensorboard not installed: JSONL is the record
                self._tb = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _plain(v: Any) -> Any:
    """JSON-safe value: numpy/torch scalars become floats; NaN/inf become None (JSON has none)."""
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of one JSONL metrics file."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


class RateLimitedLog:
    """Warnings at most once per key every ``every_s`` seconds, each saying how many were held back,
    so a flood of bad messages costs a few log lines, not one per message (the counters stay exact)."""

    def __init__(self, logger: Any, every_s: float = 10.0) -> None:
        self.logger, self.every_s = logger, every_s
        self.last: dict[str, float] = {}
        self.held: dict[str, int] = {}

    def __call__(self, key: str, fmt: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last.get(key, -math.inf) < self.every_s:
            self.held[key] = self.held.get(key, 0) + 1
            return
        held = self.held.pop(key, 0)
        self.last[key] = now
        suffix = f" (and {held} more like it in the last {self.every_s:.0f}s)" if held else ""
        self.logger.warning(fmt + "%s", *args, suffix)
