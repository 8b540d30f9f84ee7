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
returns NaN/inf or a value outside ``+-selector.max_abs_reward`` (the bound the selector enforces:
one such row would get its whole group rejected), or runs past ``task.reward_timeout_s`` gives the
rows of that call 0, counted as ``reward/errors/<reason>``; the worker is killed and restarted on a
timeout, so a hung reward function never freezes generation. A function that fails
``task.max_reward_failures`` calls in a row stops the run with :class:`RewardFailure` instead of
letting it crawl (:class:`FailureStreaks`).
"""

from __future__ import annotations

import inspect
import logging
import math
import multiprocessing as mp
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rollout_server.tasks.data import TaskError
from rollout_server.tasks.environments import Messages, env_call, load_environment
from rollout_server.tasks.output import OUTPUT_BYTES, OUTPUT_WINDOW_S, OutputBudget
from rollout_server.tasks.plugins import load_plugin
from rollout_server.tasks.verifiers import BUILTIN_REWARDS, RewardFn

log = logging.getLogger("podsrl.rollout")


class RewardFailure(TaskError):
    """A reward function failed ``task.max_reward_failures`` calls in a row: the run stops, naming it."""


ERROR_REASONS = (
    "raised",
    "wrong_length",
    "not_a_number",
    "non_finite",
    "out_of_range",
    "timeout",
    "worker_died",
    "none",
)
STARTUP_S = 60.0  # a (re)started worker's imports and load_reward, on top of task.reward_timeout_s


def load_reward(spec: str) -> RewardFn:
    """Resolve one ``task.reward`` entry to a callable, or raise TaskError naming the fix."""
    fn = load_plugin("task.reward", spec, BUILTIN_REWARDS, "function")
    if not callable(fn):
        raise TaskError(f"task.reward={spec!r}: {spec.rpartition(':')[0]} has no function {spec.rpartition(':')[2]!r}")
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
        else:
            clean.append(float(x))  # NaN, inf and the bound are checked by the caller (check_value)
    return clean


def check_value(v: float | None | str, max_abs: float) -> float | None | str:
    """A validated row value, or ``non_finite`` / ``out_of_range`` (outside ``+-max_abs``, the selector's bound)."""
    if not isinstance(v, float):
        return v
    if not math.isfinite(v):
        return "non_finite"
    return v if abs(v) <= max_abs else "out_of_range"


def _worker(conn: Any, specs: list[str], out: Any, env: str = "") -> None:
    """The reward process: load the functions (and the environment, ``task.environment``) once, then score
    batches and run environment steps until the pipe closes. Its stdout and stderr are ``out``, a pipe the
    parent drains within a byte budget (``output.OutputBudget``)."""
    os.dup2(out.fileno(), 1)  # fd level: a C extension's writes and a subprocess's too
    os.dup2(out.fileno(), 2)
    out.close()
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # lines reach the log as printed
    fns = [load_reward(s) for s in specs]
    factory = load_environment(env) if env else None
    try:
        conn.send(("ready", None))
    except OSError:  # closed while starting
        return
    while True:
        try:
            kind, payload = conn.recv()
        except EOFError:
            return
        if kind == "env" and factory is not None:
            conn.send(("ok", env_call(factory, *payload)))
        else:
            conn.send(("ok", _score_all(fns, payload, lambda i, note: conn.send(("note", (i, note))))))


def _score_all(
    fns: list[RewardFn], kwargs: dict[str, Any], note: Callable[[int, str], None]
) -> list[list[float | None | str]]:
    """Every function on one batch: validated values, or an error reason per row (``note`` hears which
    function raised, and why)."""
    rows = len(kwargs["completions"])
    results = []
    for i, fn in enumerate(fns):
        try:
            results.append(_validate(fn(**_arguments(fn, kwargs)), rows))
        except Exception as e:
            results.append(["raised"] * rows)
            note(i, f"{type(e).__name__}: {str(e)[:200]}")
    return results


class FailureStreaks:
    """Consecutive failed calls of each reward function; at ``limit`` (``task.max_reward_failures``, 0 = never)
    :meth:`update` raises :class:`RewardFailure`. A call fails for a function when most of its rows are
    errors (raised, timeout, NaN, out of range, ...): a function that fails on most calls would otherwise
    starve the run silently, every group scored 0 or rejected."""

    def __init__(self, names: list[str], limit: int) -> None:
        self.names, self.limit = names, limit
        self.streaks = [0] * len(names)

    def update(self, results: list[list[float | None | str]], failures: dict[str, str]) -> None:
        for i, (name, values) in enumerate(zip(self.names, results, strict=True)):
            failed = 2 * sum(isinstance(v, str) for v in values) > len(values)
            self.streaks[i] = self.streaks[i] + 1 if failed else 0
            if self.limit and self.streaks[i] >= self.limit:
                raise RewardFailure(
                    f"reward function {name!r} failed {self.streaks[i]} calls in a row (most rows of each were "
                    f"errors; the last: {failures[name]}): the run stops rather than "
                    "train on nothing. Fix the function (run it on a few rows of the dataset), raise "
                    "task.reward_timeout_s or selector.max_abs_reward if those are its limits, or set "
                    "task.max_reward_failures=0 to keep going"
                )


@dataclass
class RewardScores:
    rewards: np.ndarray  # float32 [rows], the weighted sum
    per_function: dict[str, float]  # mean of each function over the rows it scored
    errors: Counter[str] = field(default_factory=Counter)
    failures: dict[str, str] = field(default_factory=dict)  # function name -> its first failure in the call, in words


class RewardWorker:
    """Scores batches in a separate process, so a reward function can be killed when it hangs.

    When every function is a built-in (``verifiers.BUILTIN_REWARDS``, which are bounded:
    tests/rollout_server/test_verifiers.py feeds them hostile input), they run in this process instead:
    no round trip, and nothing to hang. A user's plug-in always runs in the worker.
    """

    def __init__(
        self,
        specs: list[str],
        weights: list[float],
        timeout_s: float,
        max_abs: float = math.inf,
        max_failures: int = 0,
        output_bytes: int = OUTPUT_BYTES,
        output_window_s: float = OUTPUT_WINDOW_S,
        env: str = "",
        env_timeout_s: float = 10.0,
        max_env_chars: int = 4096,
    ) -> None:
        """``max_abs``: the selector's ``selector.max_abs_reward``; ``max_failures``: ``task.max_reward_failures``;
        the worker's stdout/stderr reach the log at most ``output_bytes`` per ``output_window_s``. ``env``:
        ``task.environment``, whose steps (:meth:`step_env`) run in the same worker, each cut at
        ``env_timeout_s``, its new messages bounded by ``max_env_chars``."""
        self.specs, self.weights, self.timeout_s, self.max_abs = specs, weights, timeout_s, max_abs
        self.env, self.env_timeout_s, self.max_env_chars = env, env_timeout_s, max_env_chars
        self.names = [s.rpartition(":")[2] or s for s in specs]
        self.streaks = FailureStreaks(self.names, max_failures)
        self.output = OutputBudget(self.names, output_bytes, output_window_s)
        self.notes: dict[int, str] = {}  # this call: function index -> why it raised
        self.ctx = mp.get_context("spawn")  # never fork a process that holds torch threads and sockets
        self.proc: Any = None
        self.conn: Any = None
        self.restarts = 0
        self.starting = True  # until the worker says it has loaded the functions
        in_process = all(s in BUILTIN_REWARDS for s in specs) and not env  # an environment always runs there
        self.in_process = [BUILTIN_REWARDS[s] for s in specs] if in_process else None
        if self.in_process is None:
            self._start()

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        out_read, out_write = self.ctx.Pipe(duplex=False)
        self.proc = self.ctx.Process(
            target=_worker, args=(child, self.specs, out_write, self.env), name="podsrl-reward", daemon=True
        )
        self.proc.start()
        child.close()
        out_write.close()  # the worker holds the only write end: its exit ends the drain
        self.drainer = threading.Thread(target=self.output.drain, args=(out_read,), name="podsrl-reward-output")
        self.drainer.daemon = True
        self.drainer.start()

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
        """Score one batch; raises RewardFailure when a function has failed ``max_failures`` calls in a row."""
        rows = len(completions)
        errors: Counter[str] = Counter()
        self.notes = {}
        raw = self._call(
            {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns},
            rows,
            errors,
            on_wait,
        )
        results = [[check_value(v, self.max_abs) for v in values] for values in raw]
        failures = {
            name: self._failure(i, got, checked)
            for i, (name, got, checked) in enumerate(zip(self.names, raw, results, strict=True))
            if any(isinstance(v, str) for v in checked)
        }
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
        # each value is within the bound, but a weighted sum of several need not be (nor its float32, which the
        # selector checks): such a row is 0 too
        with np.errstate(over="ignore"):
            rewards = total.astype(np.float32)
        over = ~np.isfinite(rewards) | (np.abs(rewards) > self.max_abs)
        if over.any():
            errors["out_of_range"] += int(over.sum())
            rewards[over] = 0.0
        self.streaks.update(results, failures)
        return RewardScores(rewards, per_function, errors, failures)

    def _failure(self, i: int, raw: list[float | None | str], checked: list[float | None | str]) -> str:
        """Function ``i``'s first failed row of this call, in words (for the stop message and preflight)."""
        j = next(j for j, v in enumerate(checked) if isinstance(v, str))
        reason = checked[j]
        if reason == "non_finite":
            return f"non_finite: returned {raw[j]!r}"
        if reason == "out_of_range":
            return f"out_of_range: returned {raw[j]!r}, outside +-selector.max_abs_reward={self.max_abs:g}"
        if reason == "raised" and i in self.notes:
            return f"raised {self.notes[i]}"
        if reason == "timeout":
            return f"timeout: ran past task.reward_timeout_s={self.timeout_s:g}"
        return str(reason)

    def _call(
        self, kwargs: dict[str, Any], rows: int, errors: Counter[str], on_wait: Callable[[], None] | None
    ) -> list[list[float | None | str]]:
        if self.in_process is not None:
            return _score_all(self.in_process, kwargs, self._note)
        kind, payload = self._roundtrip(("score", kwargs), self.timeout_s, on_wait)
        if kind == "timeout":
            log.warning(
                "reward call over task.reward_timeout_s=%ss: worker killed and restarted; its %d rows score 0",
                self.timeout_s,
                rows,
            )
        return payload if kind == "ok" else [[kind] * rows for _ in self.specs]

    def step_env(self, row: dict[str, Any], turns: Messages, on_wait: Callable[[], None] | None = None) -> Any:
        """One environment step in the worker (``environments.env_call``): ``("ok", (messages | None, reward |
        None, tool_calls, tool_errors))``, or ``(reason, detail)``: the environment's own failures, ``timeout``
        (past ``task.env_timeout_s``: the worker is killed and restarted) or ``worker_died``."""
        kind, payload = self._roundtrip(("env", (row, turns, self.max_env_chars)), self.env_timeout_s, on_wait)
        if kind == "timeout":
            log.warning("environment step over task.env_timeout_s=%ss: worker killed and restarted", self.env_timeout_s)
            return "timeout", f"ran past task.env_timeout_s={self.env_timeout_s:g}"
        if kind == "worker_died":
            return "worker_died", "the worker died (os._exit, a crash, the OOM killer)"
        return payload

    def _roundtrip(self, request: tuple[str, Any], timeout_s: float, on_wait: Callable[[], None] | None) -> Any:
        """``("ok", the worker's answer)``, or ``("timeout" | "worker_died", None)`` (the worker restarted)."""
        try:
            self.conn.send(request)
        except (BrokenPipeError, OSError):
            self._restart()
            return "worker_died", None
        deadline = time.monotonic() + timeout_s + (STARTUP_S if self.starting else 0.0)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._restart()
                return "timeout", None
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
                return "worker_died", None
            if kind == "note":
                self._note(*payload)
                continue
            if kind == "ready":  # start-up is not the call's time: the call's clock starts now
                self.starting = False
                deadline = time.monotonic() + timeout_s
                continue
            return "ok", payload

    def _note(self, i: int, text: str) -> None:
        self.notes.setdefault(i, text)
        log.warning("reward function %r raised: %s", self.names[i], text)

    def close(self) -> None:
        if self.proc is None:
            return
        self.conn.close()
        self.proc.join(2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2)
        self.drainer.join(2)  # the worker's last output is logged (or counted) before close returns
