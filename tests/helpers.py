"""Helpers the tests import (conftest.py holds the fixtures)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from launcher.ports import free_ports  # the launcher's: n distinct free loopback ports

__all__ = [
    "ROOT",
    "child_env",
    "free_port",
    "free_ports",
    "wait_for",
    "line_matching",
    "random_group",
    "assert_same_kept",
]

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    return free_ports(1)[0]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def wait_for(
    predicate: Callable[[], T | None],
    timeout_s: float,
    what: str,
    *,
    every_s: float = 0.02,
    detail: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that: how a test waits for another
    process or thread (a file, a log line, a counter, an exit) instead of sleeping for a guessed time.

    After ``timeout_s`` it fails (AssertionError) naming ``what`` it waited for, followed by ``detail()``
    where given (a log's tail, the last value seen). ``predicate`` may raise to fail at once, e.g. an
    assertion that the process it waits on is still alive. The short sleep between polls is the only one.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s:g}s waiting for {what}" + (f"\n{detail()}" if detail else "")
            )
        time.sleep(every_s)


def line_matching(path: Path, pattern: str) -> str | None:
    """The first complete line of ``path`` (a log or metrics file another process appends to) in which the
    regular expression ``pattern`` is found; None while there is none, or no file yet."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return None
    found = re.compile(pattern).search
    return next((line for line in text[: text.rfind("\n") + 1].splitlines() if found(line)), None)


def random_group(rewards, gid: int, server: str = "s-0", version: int = 0):  # -> ScoredGroup
    """A valid group of ``len(rewards)`` completions of random lengths (0-5 tokens), seeded by ``gid``."""
    from protocol.messages import ScoredGroup

    gen = np.random.default_rng(gid)
    n = len(rewards)
    lens = gen.integers(0, 6, n).astype(np.int32)
    total = int(lens.sum())
    return ScoredGroup(
        server_id=server,
        session=1,
        group_id=gid,
        version=version,
        task="copy",
        gen_seconds=0.0,
        prompt_ids=np.arange(1, 2 + gid % 5, dtype=np.int32),
        completion_ids=gen.integers(4, 99, total, dtype=np.int32),
        completion_lens=lens,
        logprobs=-gen.random(total, dtype=np.float32),
        rewards=np.asarray(rewards, np.float32),
    )


def assert_same_kept(a, b) -> None:  # KeptGroup | None each
    """Two down-sampling results are identical: the same fields, bit for bit, and views of the same group."""
    if a is None or b is None:
        assert a is b
        return
    assert (a.server_id, a.version, a.zero_variance, a.session, a.seq, a.tokens, a.n) == (
        b.server_id,
        b.version,
        b.zero_variance,
        b.session,
        b.seq,
        b.tokens,
        b.n,
    )
    assert a.prompt_ids is b.prompt_ids
    assert type(a.group_reward_mean) is float and a.group_reward_mean == b.group_reward_mean
    assert a.rewards.dtype == b.rewards.dtype and a.rewards.tobytes() == b.rewards.tobytes()
    assert a.advantages.dtype == b.advantages.dtype and a.advantages.tobytes() == b.advantages.tobytes()
    for xs, ys in ((a.completions, b.completions), (a.logprobs, b.logprobs)):
        assert len(xs) == len(ys)
        for x, y in zip(xs, ys, strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y) and np.shares_memory(x, y) or x.size == y.size == 0
