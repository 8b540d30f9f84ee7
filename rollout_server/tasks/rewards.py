"""Reward functions: built-in or the user's own, run in a worker process with a hard timeout.

A reward function follows TRL's convention (docs/TASKS.md)::

    def my_reward(prompts: list, completions: list[str], **columns) -> list[float | None]: ...

called once per batch of completions, with the prompt of each completion (the dataset's prompt
value, as in TRL), its decoded text, ``completion_ids`` (the sampled token ids, the training truth:
decoding drops special tokens, which a policy can learn to exploit) and every other dataset column
as a list. ``None`` means "this function does not score this row". ``task.reward`` names one or
more functions: a built-in name, ``package.module:function`` or ``path/to/file.py:function``;
``task.reward_weights`` weighs them (a row's reward is the weighted sum over the functions that
scored it). A function that raises, returns something else than one number or None per row,
returns NaN/inf, or runs past ``task.reward_timeout_s`` gives the rows of that call 0, counted as
``reward/errors/<reason>``; the worker is killed and restarted on a timeout, so a hung reward
function never freezes generation.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import multiprocessing as mp
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rollout_server.tasks.data import TaskError
from rollout_server.tasks.verifiers import BUILTIN_REWARDS, RewardFn

log = logging.getLogger("podsrl.rollout")

ERROR_REASONS = ("raised", "wrong_length", "not_a_number", "non_finite", "timeout", "worker_died", "none")
STARTUP_S = 60.0  # a (re)started worker's imports and load_reward, on top of task.reward_timeout_s


def load_reward(spec: str) -> RewardFn:
    """Resolve one ``task.reward`` entry to a callable, or raise TaskError naming the fix."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise TaskError(
            f"task.reward={spec!r} is neither a built-in ({', '.join(sorted(BUILTIN_REWARDS))}) nor "
            "'package.module:function' / 'path/to/file.py:function'"
        )
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.exists():
                raise TaskError(f"task.reward={spec!r}: file {target} does not exist")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")  # the working directory, as `python -m` has it
            module = importlib.import_module(target)
    except TaskError:
        raise
    except Exception as e:
        raise TaskError(
            f"task.reward={spec!r}: importing {target} failed ({type(e).__name__}: {e}); check the "
            "module is on PYTHONPATH (or give a path/to/file.py) and imports cleanly"
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise TaskError(f"task.reward={spec!r}: {target} has no function {name!r}")
    return fn


def check_signature(spec: str, fn: RewardFn, columns: set[str]) -> None:
    """The function can be called as f(prompts=..., completions=..., **columns)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return  # a builtin or C callable: trust it
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    offered = {"prompts", "completions", "completion_ids", *columns}
    missing = [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty and p.name not in offered
    ]
    if not {"prompts", "completions"} <= names and not var_kw:
        missing = missing or ["prompts", "completions"]
    if missing:
        raise TaskError(
            f"task.reward={spec!r}: the function needs {missing}, which are not dataset columns; the "
            "convention is f(prompts, completions, **columns) -> list[float | None] (docs/TASKS.md)"
        )


def _arguments(fn: RewardFn, kwargs: dict[str, Any]) -> dict[str, Any]:
    """What to pass: everything to a function with ``**kwargs``, else only the names it takes."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params}
    return {k: v for k, v in kwargs.items() if k in names}


def _validate(out: Any, rows: int) -> list[float | None | str]:
    """One function's return value as floats / None per row, or an error reason per row."""
    try:
        items = list(out)
    except TypeError:
        return ["not_a_number"] * rows
    if len(items) != rows:
        return ["wrong_length"] * rows
    clean: list[float | None | str] = []
    for x in items:
        if x is None:
            clean.append(None)
        elif isinstance(x, bool) or not isinstance(x, int | float | np.integer | np.floating):
            clean.append("not_a_number")
        elif not math.isfinite(float(x)):
            clean.append("non_finite")
        else:
            clean.append(float(x))
    return clean


def _worker(conn: Any, specs: list[str]) -> None:
    """The reward process: load the functions once, then score batches until the pipe closes."""
    fns = [load_reward(s) for s in specs]
    try:
        conn.send(("ready", None))
    except OSError:  # closed while starting
        return
    while True:
        try:
            kwargs = conn.recv()
        except EOFError:
            return
        conn.send(("ok", _score_all(fns, kwargs, lambda note: conn.send(("note", note)))))


def _score_all(
    fns: list[RewardFn], kwargs: dict[str, Any], note: Callable[[str], None]
) -> list[list[float | None | str]]:
    """Every function on one batch: validated values, or an error reason per row (``note`` hears why)."""
    rows = len(kwargs["completions"])
    results = []
    for fn in fns:
        try:
            results.append(_validate(fn(**_arguments(fn, kwargs)), rows))
        except Exception as e:
            results.append(["raised"] * rows)
            note(f"{type(e).__name__}: {str(e)[:200]}")
    return results


@dataclass
class RewardScores:
    rewards: np.ndarray  # float32 [rows], the weighted sum
    per_function: dict[str, float]  # mean of each function over the rows it scored
    errors: Counter[str] = field(default_factory=Counter)


class RewardWorker:
    """Scores batches in a separate process, so a reward function can be killed when it hangs.

    When every function is a built-in (``verifiers.BUILTIN_REWARDS``, which are bounded:
    tests/rollout_server/test_verifiers.py feeds them hostile input), they run in this process instead:
    no round trip, and nothing to hang. A user's plug-in always runs in the worker.
    """

    def __init__(self, specs: list[str], weights: list[float], timeout_s: float) -> None:
        self.specs, self.weights, self.timeout_s = specs, weights, timeout_s
        self.names = [s.rpartition(":")[2] or s for s in specs]
        self.ctx = mp.get_context("spawn")  # never fork a process that holds torch threads and sockets
        self.proc: Any = None
        self.conn: Any = None
        self.restarts = 0
        self.starting = True  # until the worker says it has loaded the functions
        in_process = all(s in BUILTIN_REWARDS for s in specs)
        self.in_process = [BUILTIN_REWARDS[s] for s in specs] if in_process else None
        if self.in_process is None:
            self._start()

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child, self.specs), name="podsrl-reward", daemon=True)
        self.proc.start()
        child.close()

    def _restart(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()
        self.restarts += 1
        self.starting = True
        self._start()

    def score(
        self,
        prompts: list[Any],
        completions: list[str],
        completion_ids: list[list[int]],
        columns: dict[str, list[Any]],
        on_wait: Callable[[], None] | None = None,
    ) -> RewardScores:
        rows = len(completions)
        errors: Counter[str] = Counter()
        results = self._call(
            {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns},
            rows,
            errors,
            on_wait,
        )
        total = np.zeros(rows, np.float64)
        unscored = np.ones(rows, bool)  # no function scored the row, and none failed on it
        per_function = {}
        for name, weight, values in zip(self.names, self.weights, results, strict=True):
            got = [v for v in values if isinstance(v, float)]
            if got:
                per_function[name] = sum(got) / len(got)
            for i, v in enumerate(values):
                if isinstance(v, float):
                    total[i] += weight * v
                if v is not None:
                    unscored[i] = False
                if isinstance(v, str):
                    errors[v] += 1
        if unscored.any():  # every function returned None: TRL warns; we score 0 and count it
            errors["none"] += int(unscored.sum())
        return RewardScores(total.astype(np.float32), per_function, errors)

    def _call(
        self, kwargs: dict[str, Any], rows: int, errors: Counter[str], on_wait: Callable[[], None] | None
    ) -> list[list[float | None | str]]:
        if self.in_process is not None:
            return _score_all(self.in_process, kwargs, lambda note: log.warning("a reward function raised: %s", note))
        failed: list[list[float | None | str]] = [["worker_died"] * rows for _ in self.specs]
        try:
            self.conn.send(kwargs)
        except (BrokenPipeError, OSError):
            self._restart()
            return failed
        deadline = time.monotonic() + self.timeout_s + (STARTUP_S if self.starting else 0.0)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning(
                    "reward call over task.reward_timeout_s=%ss: worker killed and restarted; its %d rows score 0",
                    self.timeout_s,
                    rows,
                )
                self._restart()
                return [["timeout"] * rows for _ in self.specs]
            try:
                ready = self.conn.poll(min(left, 0.5))
                if not ready:
                    if on_wait is not None:
                        on_wait()
                    continue
                kind, payload = self.conn.recv()
            except (EOFError, OSError):
                log.warning("reward worker died (exit code %s); restarting it", self.proc.exitcode)
                self._restart()
                return failed
            if kind == "note":
                log.warning("a reward function raised: %s", payload)
                continue
            if kind == "ready":  # start-up is not the reward call's time: the call's clock starts now
                self.starting = False
                deadline = time.monotonic() + self.timeout_s
                continue
            return payload

    def close(self) -> None:
        if self.proc is None:
            return
        self.conn.close()
        self.proc.join(2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2)
