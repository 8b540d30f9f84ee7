"""The one result type and timing helpers every benchmark uses.

A benchmark measures the podsrl path and its peer (the physical limit or the naive alternative)
in the same process, interleaved, and reports medians and their ratio. Machines here are noisy:
never compare numbers across runs, only ratios within one.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from launcher.ports import free_ports  # the launcher's: n distinct free loopback ports
from protocol.messages import ScoredGroup

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    bench: str  # e.g. "codec"
    case: str  # e.g. "scored group 16x1024, encode+decode"
    value: float  # the podsrl measurement (median)
    unit: str  # e.g. "GB/s"
    peer: str  # what it is compared with, e.g. "numpy memcpy of the same bytes"
    peer_value: float | None  # the peer's median in the same unit (None if not applicable)
    ratio: float | None  # value / peer_value, or as defined in `ratio_means`
    goal: str  # e.g. ">= 0.8x memcpy"
    met: bool | None  # None when no goal applies
    ratio_means: str = "podsrl / peer"
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def median_time(fn: Callable[[], Any], repeats: int = 7, min_time: float = 0.2) -> float:
    """Median seconds per call: each repeat runs ``fn`` enough times to last ``min_time``."""
    fn()  # warm-up
    n, t = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        if t >= min_time / 4 or n > 1 << 20:
            break
        n *= 2
    n = max(1, int(n * (min_time / max(t, 1e-9))))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int = 7, min_time: float = 0.2) -> dict[str, float]:
    """Median seconds per call of each function, measured in alternation so drift hits all alike."""
    runs: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            runs[k].append(median_time(fn, repeats=1, min_time=min_time))
    return {k: statistics.median(v) for k, v in runs.items()}


def free_port() -> int:
    return free_ports(1)[0]


def child_env() -> dict[str, str]:
    """Environment of a benchmark's child process: the repo importable, one thread."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def spawn_python(args: list[str], log: Path, **popen: Any) -> subprocess.Popen:
    """``python ARGS`` in the repository root with :func:`child_env`, stdout and stderr to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, *args], env=child_env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, **popen
        )


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return info


def save(results: list[Result], meta: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1))


def print_results(results: list[Result]) -> None:
    for r in results:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        peer = f"{r.peer_value:.4g}" if r.peer_value is not None else "-"
        met = {True: "MET", False: "MISSED", None: ""}[r.met]
        print(
            f"[{r.bench}] {r.case}: {r.value:.4g} {r.unit} vs {peer} ({r.peer}) -> {ratio} ({r.ratio_means}); "
            f"goal {r.goal} {met}",
            flush=True,
        )


def scored_group(rewards: np.ndarray, t: int = 64, p: int = 8, server: str = "bench-0", gid: int = 0) -> ScoredGroup:
    """A valid group of ``len(rewards)`` completions of ``t`` random tokens after a ``p``-token prompt,
    seeded by ``gid``."""
    n = rewards.shape[0]
    rng = np.random.default_rng(gid)
    return ScoredGroup(
        server_id=server,
        session=1,
        group_id=gid,
        version=0,
        task="copy",
        gen_seconds=0.0,
        prompt_ids=np.arange(1, p + 1, dtype=np.int32),
        completion_ids=rng.integers(4, 32000, n * t, dtype=np.int32),
        completion_lens=np.full(n, t, np.int32),
        logprobs=-rng.exponential(1.0, n * t).astype(np.float32),
        rewards=rewards.astype(np.float32),
    )
