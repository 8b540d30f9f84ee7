"""The compose file's `cpu` profile run as plain local processes: the closest thing to `docker compose
--profile cpu up` without a Docker engine.

Each service's entrypoint, command, environment and config are exactly as Docker Compose resolves them,
with three substitutions a container would not need: service hostnames become 127.0.0.1, paths inside
the container become the host folders mounted there, and the resolved config is written to a file. The
rollout service runs docker/podsrl-rollout.sh itself, once per replica. The run must train every step,
each process must pass `podsrl health` while it runs, and every process must exit by itself.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from compose_check import ROOT, Process, check, resolve
from helpers import child_env, free_port, wait_for

from launcher.cli import main
from protocol.config import Config, to_toml
from protocol.metrics import read_metrics

pytestmark = pytest.mark.slow
STEPS = 60


def localize(p: Process, hostnames: set[str]) -> Config:
    """The process's resolved config with service names -> 127.0.0.1 and container paths -> host paths."""
    cfg = p.cfg

    def host(h: str) -> str:
        return "127.0.0.1" if h in hostnames else h

    def path(v: str) -> str:
        return str(p.host_path(v)) if v else v

    return cfg.model_copy(
        update={
            "net": cfg.net.model_copy(
                update={
                    "bind_host": "127.0.0.1",
                    "selector_host": host(cfg.net.selector_host),
                    "learner_host": host(cfg.net.learner_host),
                    "keys_dir": path(cfg.net.keys_dir),
                }
            ),
            "run": cfg.run.model_copy(update={"dir": path(cfg.run.dir)}),
            "model": cfg.model.model_copy(update={"path": path(cfg.model.path)}),
            "task": cfg.task.model_copy(
                update={"dataset": path(cfg.task.dataset), "eval_dataset": path(cfg.task.eval_dataset)}
            ),
        }
    )


def local_command(p: Process, config_file: Path) -> list[str]:
    """The service's entrypoint + command, its config and overrides replaced by ``--config config_file``."""
    spec = p.spec
    tokens, overrides, out = iter([*spec["entrypoint"], *spec["command"]]), list(p.args.overrides), []
    for tok in tokens:
        if tok in ("--config", "-c"):
            next(tokens)
        elif tok in overrides:
            overrides.remove(tok)
        elif not tok.startswith("--config="):
            out.append(tok)
    if out[0] == "podsrl":
        return [sys.executable, "-m", "launcher.cli", *out[1:], "--config", str(config_file)]
    assert out[0] == "podsrl-rollout"
    return ["sh", str(ROOT / "docker" / "podsrl-rollout.sh"), *out[1:], "--config", str(config_file)]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_group_gone(name: str, pgid: int, timeout_s: float = 5) -> None:
    wait_for(
        lambda: not group_alive(pgid),
        timeout_s,
        f"the rest of {name}'s process group to leave",
        detail=lambda: f"processes of its group outlive it: {group(pgid)}",
    )


def group(pgid: int) -> list[str]:
    """The command lines of a process group's members (for the failure message)."""
    import psutil

    out = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(p.pid) == pgid:
                out.append(" ".join(p.cmdline()))
    return out


def health(pid: int) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(["health", "--pid", str(pid)])


def test_cpu_profile_as_local_processes_trains_and_every_process_exits(tmp_path: Path):
    runs, logs, work = tmp_path / "runs", tmp_path / "logs", tmp_path / "work"
    for d in (runs, logs, work):
        d.mkdir()
    knobs = {
        "RUNS_DIR": str(runs),
        "CPU_STEPS": str(STEPS),
        **{k: str(free_port()) for k in ("GROUP_PORT", "BATCH_PORT", "ANNOUNCE_PORT", "WEIGHTS_PORT")},
    }
    project = resolve("cpu", env=knobs)
    procs = check(project)
    services = project["services"]
    order = sorted(services, key=lambda s: len(services[s].get("depends_on", {})))  # dependencies first
    started: dict[str, subprocess.Popen] = {}
    try:
        for service in order:
            p = next(p for p in procs if p.service == service)
            config_file = tmp_path / f"{service}.toml"
            config_file.write_text(to_toml(localize(p, set(services))))
            env = {
                k: str(p.host_path(v) if v.startswith("/") else v) for k, v in (p.spec.get("environment") or {}).items()
            }
            env = {**child_env(), **env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
            for i in range(sum(q.service == service for q in procs)):
                name = f"{service}-{i}"
                with (logs / f"{name}.log").open("wb") as log:
                    started[name] = subprocess.Popen(
                        local_command(p, config_file),
                        env=env,
                        cwd=work,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )

        def tails() -> str:
            return "\n".join(f"--- {f.name}\n{f.read_text()[-1500:]}" for f in sorted(logs.iterdir()))

        learner = started["learner-cpu-0"]
        healthy: set[str] = set()

        def learner_done() -> bool:  # meanwhile every process is asked whether it is healthy
            if learner.poll() is not None:
                return True
            for name, proc in started.items():
                if name not in healthy and proc.poll() is None and health(proc.pid) == 0:
                    healthy.add(name)
            return False

        wait_for(learner_done, 120, "the learner to finish", every_s=0.1, detail=tails)
        # the others leave on the learner's final announcement
        wait_for(
            lambda: all(proc.poll() is not None for proc in started.values()),
            30,
            "every process to exit by itself",
            every_s=0.1,
            detail=tails,
        )
        assert {n: proc.returncode for n, proc in started.items()} == dict.fromkeys(started, 0), tails()
        assert healthy == set(started), f"never healthy while running: {set(started) - healthy}\n" + tails()
        for name, proc in started.items():
            assert health(proc.pid) == 1
            # Nothing of its process group (torchrun's workers included) is left after a short grace: a
            # leader's helpers (multiprocessing's resource tracker) leave when their pipe closes.
            wait_group_gone(name, proc.pid)
        run_dir = runs / "tiny-compose"
        steps = read_metrics(run_dir / "metrics" / "learner.jsonl")
        assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
        assert all(m["reward/mean"] is not None for m in steps)
        # Each replica took its own slot, so both server names (and metrics files) exist.
        assert {f.name for f in (run_dir / "metrics").glob("rollout-*.jsonl")} == {
            "rollout-rollout-0.jsonl",
            "rollout-rollout-1.jsonl",
        }
        assert (run_dir / "checkpoints" / "latest").read_text() == f"v{STEPS:06d}"
    finally:
        for proc in started.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
