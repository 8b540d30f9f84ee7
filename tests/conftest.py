"""Shared fixtures: free loopback ports, per-test run directories, pinned threads."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT, child_env, free_port

# Child processes must not fight over the machine's cores (2 in CI): one thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def net_overrides() -> list[str]:
    """Overrides that give a run its own four free ports."""
    return [f"net.{link}_port={free_port()}" for link in ("group", "batch", "announce", "weights")]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def spawn() -> Iterator:
    """Start ``python -m module args`` as a real process; every one is killed at teardown."""
    procs: list[subprocess.Popen] = []

    def start(module: str, *args: str, log: Path | None = None) -> subprocess.Popen:
        out = log.open("wb") if log else subprocess.DEVNULL
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=child_env(),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
