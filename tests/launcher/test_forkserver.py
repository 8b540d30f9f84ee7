"""The fork server of ``podsrl run`` (launcher/forkserver.py): a real ``multiprocessing`` fork server
that preloads torch and transformers, and real forked roles."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from launcher.forkserver import RoleSpec, call, cuda_initialized, fork, run_role, start_server, stop_server


@pytest.fixture(scope="module")
def server():  # -> ForkServerContext
    stop_server()  # one fork server per process: another test's (test_parallel.py) preloads other modules
    yield start_server()
    stop_server()


def _probe() -> dict:
    """(in a fork) What the fork server left behind: CUDA, threads, imports, environment."""
    server_threads = len(os.listdir(f"/proc/{os.getppid()}/task"))
    return {
        "cuda": cuda_initialized(),
        "torch": "torch" in sys.modules and "transformers" in sys.modules and "learner.train" in sys.modules,
        "server_threads": server_threads,
        "threads_here": threading.active_count(),
        "offline": os.environ.get("HF_HUB_OFFLINE"),
    }


def test_preload_imports_torch_without_cuda_or_threads(server) -> None:
    probe = call(server, _probe)
    assert probe["torch"], "the fork server did not preload torch, transformers and the roles"
    assert probe["cuda"] is False  # a fork of a CUDA-initialised process cannot use CUDA
    assert probe["server_threads"] == 1, "a thread in the fork server would be lost (or held) in every fork"
    assert probe["offline"] == "1"  # read by huggingface_hub at import time, i.e. in the fork server


def _fail() -> None:
    raise ValueError("checks failed: model.path does not exist")


def test_call_returns_result_and_raises_the_childs_exception(server) -> None:
    assert call(server, sorted, [3, 1, 2]) == [1, 2, 3]
    with pytest.raises(ValueError, match="model.path does not exist"):
        call(server, _fail)


def _role_with_cuda_initialised(spec: RoleSpec) -> None:
    import torch

    torch.cuda.is_initialized = lambda: True  # what a preload that touched the GPU would leave
    run_role(spec)


def test_a_role_refuses_to_run_after_cuda_was_initialised(server, tmp_path: Path) -> None:
    log = tmp_path / "role.log"
    spec = RoleSpec("launcher.cli", ["config"], str(log))
    with pytest.raises(RuntimeError, match="exit code 1"):
        call(server, _role_with_cuda_initialised, spec)
    assert "CUDA was initialised before the fork; set run.fork_server=false" in log.read_text()


def main(argv: list[str]) -> int:
    """A role for the test below: reports what it was given (forked as ``test_forkserver``)."""
    print(argv, sys.argv, os.environ.get("PODSRL_T"), os.getcwd(), os.getsid(0) == os.getpid(), flush=True)
    return 3


def test_a_forked_role_is_python_dash_m(server, tmp_path: Path) -> None:
    """argv, environment, working directory, own session, log file and exit status, as ``python -m``."""
    log = tmp_path / "role.log"
    proc = fork(server, RoleSpec(__name__, ["a", "b=1"], str(log), {"PODSRL_T": "x"}, str(tmp_path)))
    proc.join(60)
    assert proc.exitcode == 3, log.read_text()
    assert log.read_text() == f"['a', 'b=1'] ['{__name__}', 'a', 'b=1'] x {tmp_path} True\n"
    log = tmp_path / "config.log"
    proc = fork(server, RoleSpec("launcher.cli", ["config", "run.nonsense=1"], str(log)))
    proc.join(60)
    assert proc.exitcode == 2  # a real role's own error exit, its message in its log
    assert "nonsense" in log.read_text()
