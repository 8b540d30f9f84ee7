"""Helpers the tests import (conftest.py holds the fixtures)."""

from __future__ import annotations

import os
from pathlib import Path

from launcher.sweep import free_ports  # the launcher's: n distinct free loopback ports

__all__ = ["ROOT", "child_env", "free_port", "free_ports"]

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    return free_ports(1)[0]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
