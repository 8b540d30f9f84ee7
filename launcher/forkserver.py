"""``podsrl run``'s fork server: torch and transformers are imported once, and every process forks from it.

Each podsrl process spends ~3 s of a 2-core machine importing torch and transformers before it does
anything (``python -c "import torch, transformers"``: docs/BENCHMARKS.md, "Start-up"). ``podsrl run``
starts the selector, the learner and R rollout servers at once, so they used to pay that R + 2 times
over, on the same cores. Here Python's own fork server (``multiprocessing``'s ``forkserver`` start
method) is started first thing, before the launcher's checks, and imports :data:`PRELOAD` while those
checks run; each process is then a fork of it, up in milliseconds, and calls its module's ``main(argv)``
as ``python -m <module>`` would (:func:`run_role`).

CUDA: a process that initialised CUDA cannot fork a working child. The fork server only *imports*
modules (none of them touches a device at import), and :func:`run_role` refuses to run a role in a
child whose CUDA was initialised before the fork (``tests/launcher/test_forkserver.py`` checks both);
each role initialises its own device after the fork, as it would in a fresh process. The vLLM engine
runs its own multiprocessing and is started as a plain process (``vllm_tests``), as is a learner of
more than one rank (through torchrun). ``run.fork_server = false`` starts every process plainly.

A child is its own session and process group (``os.setsid``), writes to its log file, and gets SIGTERM
when the fork server dies; the fork server exits when the launcher does (SIGKILL included: it reads a
pipe from the launcher and leaves on its end of file). So, as before, no process outlives the launcher.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import multiprocessing.context
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import forkserver, resource_tracker
from multiprocessing.connection import Connection
from typing import Any, TypeVar

T = TypeVar("T")

# What the fork server imports before its first fork: the heavy libraries and every role's module.
PRELOAD = ["launcher.preload"]
SERVER_MARK = "PODSRL_FORK_SERVER"  # set in the fork server's environment only
# Read by huggingface_hub and transformers when they are imported, i.e. in the fork server: a role's
# own set-up (protocol/cli.py: configure) comes too late for a preloaded transformers.
FORK_ENV = {
    "OMP_NUM_THREADS": "1",  # libgomp sizes its pool when torch loads; each role sets its threads after
    "PYTHONUNBUFFERED": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",  # a tokenizer's thread pool must not cross a fork
}


@dataclass(frozen=True)
class RoleSpec:
    """One process to fork: ``python -m module *argv`` with ``env`` added, output appended to ``log``."""

    module: str
    argv: list[str]
    log: str
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "."


def start_server(log: str | os.PathLike[str] = os.devnull) -> multiprocessing.context.ForkServerContext:
    """Start the fork server now (it imports :data:`PRELOAD` in the background) and return its context.

    Returns at once: the import runs while the caller goes on; the first :func:`fork` waits for it.
    The fork server (and multiprocessing's resource tracker, started with it) write to ``log``, not to
    this process's stdout and stderr: a reader of those pipes (``podsrl run | tee``, a test, a
    benchmark) would otherwise wait for the fork server's own exit, a torch interpreter's teardown
    (0.6 s here) after the launcher has gone.
    """
    ctx = multiprocessing.get_context("forkserver")
    assert isinstance(ctx, multiprocessing.context.ForkServerContext)
    ctx.set_forkserver_preload(PRELOAD)
    for key, value in FORK_ENV.items():  # the fork server inherits this process's environment
        os.environ.setdefault(key, value)
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[SERVER_MARK] = "1"  # for the fork server alone (launcher/preload.py: it exits at once)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(1), os.dup(2)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        forkserver.ensure_running()  # (the server inherits fds 1 and 2 as they are now)
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)
        del os.environ[SERVER_MARK]
    return ctx


def stop_server(grace_s: float = 5.0) -> None:
    """End the fork server and multiprocessing's resource tracker (started with it, a child of this
    process), and wait for both, so that no process of the run outlives the launcher. The fork server
    leaves at once (``os._exit``, launcher/preload.py); the tracker leaves when the last process holding
    its pipe has (every fork of the run, and their spawned reward workers): it is killed after
    ``grace_s``. Uses CPython's own ``_stop`` and tracker state (3.9 and later); where they are missing,
    both still leave on their own once the launcher has exited."""
    stop = getattr(forkserver._forkserver, "_stop", None)
    if stop is not None:
        stop()
    tracker = getattr(resource_tracker, "_resource_tracker", None)
    fd, pid = getattr(tracker, "_fd", None), getattr(tracker, "_pid", None)
    if tracker is None or fd is None or pid is None:
        return
    os.close(fd)  # our end of its pipe: with every other end closed, it reads end of file and leaves
    tracker._fd = tracker._pid = None
    deadline = time.monotonic() + grace_s
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        time.sleep(0.01)


def fork(ctx: multiprocessing.context.ForkServerContext, spec: RoleSpec) -> multiprocessing.process.BaseProcess:
    """Fork ``spec`` from the fork server; the process object reports its pid, exit code and sentinel."""
    proc = ctx.Process(target=run_role, args=(spec,), name=spec.module)
    proc.start()
    return proc


def call(ctx: multiprocessing.context.ForkServerContext, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` run in a fork of the server: its result, or its exception raised here. The
    launcher's checks (launcher/preflight.py) run so, and the launcher never imports torch itself."""
    ours, theirs = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_call_in_child, args=(theirs, fn, args), name=getattr(fn, "__name__", "call"))
    proc.start()
    theirs.close()
    try:
        ok, value = ours.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"the fork server's child running {proc.name} died (exit code {proc.exitcode})") from None
    finally:
        ours.close()
    proc.join()
    if not ok:
        raise value
    return value


def _call_in_child(conn: Connection, fn: Callable[..., Any], args: tuple) -> None:
    try:
        result: tuple[bool, Any] = (True, fn(*args))
    except Exception as e:  # noqa: BLE001 - every failure goes back to the caller
        result = (False, e)
    try:
        conn.send(result)
    except Exception as e:  # noqa: BLE001 - an exception that does not pickle: its text does
        conn.send((False, RuntimeError(f"{type(result[1]).__name__}: {result[1]} ({e})")))


def cuda_initialized() -> bool:
    """Whether this process has initialised CUDA (only possible if torch is imported)."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def run_role(spec: RoleSpec) -> None:
    """(in the forked child) Become ``python -m spec.module *spec.argv``: own session, own log, own
    environment; exits with ``main``'s status."""
    from protocol.cli import die_with_parent

    os.setsid()
    if die_with_parent(signal.SIGTERM) and os.getppid() == 1:  # the fork server died before prctl
        os._exit(1)
    fd = os.open(spec.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    os.environ.update(spec.env)
    os.environ.pop(SERVER_MARK, None)
    os.chdir(spec.cwd)
    if cuda_initialized():  # never true when PRELOAD is kept free of device work: a guard, not a path
        print("podsrl: CUDA was initialised before the fork; set run.fork_server=false", file=sys.stderr)
        sys.exit(1)
    sys.argv = [spec.module, *spec.argv]
    try:
        rc = importlib.import_module(spec.module).main(spec.argv)
    finally:
        import logging

        logging.shutdown()  # (multiprocessing leaves with os._exit: flush the log handlers here)
    sys.exit(int(rc or 0))
