"""``podsrl health`` (the images' HEALTHCHECK) against stand-in processes whose command lines look like
podsrl's: the check reads the command line and config of the process, then its ports or metrics."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_port, wait_for

from launcher.cli import main

SLEEP = "import time; time.sleep(60)"  # not a wait: the stand-in process only has to stay alive


@pytest.fixture
def fake(tmp_path: Path) -> Iterator:
    """Start a sleeping process whose command line is ``<python> <tmp>/bin/podsrl ARGS`` (or any argv)."""
    script = tmp_path / "bin" / "podsrl"
    script.parent.mkdir()
    script.write_text(f"#!{sys.executable}\n{SLEEP}\n")
    script.chmod(0o755)
    procs: list[subprocess.Popen] = []

    def start(*args: str, argv: list[str] | None = None) -> int:
        argv = argv or [str(script), *args]
        procs.append(subprocess.Popen(argv, cwd=tmp_path))
        cmdline = Path(f"/proc/{procs[-1].pid}/cmdline")
        wait_for(
            lambda: cmdline.read_bytes().split(b"\0")[-2:-1] == [argv[-1].encode()],
            10,
            f"{argv} to exec (its /proc cmdline)",
        )
        return procs[-1].pid

    yield start
    for p in procs:
        p.kill()
        p.wait()


def health(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    rc = main(["health", *args])
    out = capsys.readouterr()
    return rc, (out.out + out.err).strip()


def write_run(tmp_path: Path, **ports: int) -> Path:
    net = "\n".join(f"{k} = {v}" for k, v in ports.items())
    path = tmp_path / "run.toml"
    path.write_text(f'[run]\ndir = "run"\n\n[net]\nbind_host = "0.0.0.0"\n{net}\n')
    return path


def listen(port: int) -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def test_selector_is_alive_while_both_its_ports_accept(fake, tmp_path, capsys):
    group, batch = free_port(), free_port()
    write_run(tmp_path, group_port=group, batch_port=batch)
    pid = fake("selector", "--config", "run.toml")  # relative to the process's own directory
    with listen(group), listen(batch):
        assert health(capsys, "--pid", str(pid)) == (
            0,
            f"selector pid {pid}: alive, accepting on 127.0.0.1:{group}, 127.0.0.1:{batch}",
        )
    with listen(group):
        rc, out = health(capsys, "--pid", str(pid))
    assert rc == 1 and f"selector pid {pid}: nothing accepts connections on 127.0.0.1:{batch} (net.batch_port)" in out


def test_learner_under_torchrun_is_found_by_its_module_and_checked_on_its_ports(fake, tmp_path, capsys):
    announce, weights = free_port(), free_port()
    config = write_run(tmp_path, announce_port=announce, weights_port=weights)
    pid = fake(argv=[sys.executable, "-c", SLEEP, "-m", "learner.train", "--config", str(config)])
    with listen(announce), listen(weights):
        rc, out = health(capsys, "--pid", str(pid))
    assert rc == 0 and out.startswith(f"learner pid {pid}: alive")
    rc, out = health(capsys, "--pid", str(pid))
    assert rc == 1 and "(net.announce_port)" in out


def test_rollout_is_alive_while_its_metrics_are_fresh(fake, tmp_path, capsys):
    write_run(tmp_path)
    pid = fake("rollout", "--server-id", "box-1", "--config", "run.toml", "max_staleness=1")
    metrics = tmp_path / "run" / "metrics" / "rollout-box-1.jsonl"
    rc, out = health(capsys, "--pid", str(pid))
    assert rc == 1 and f"no metrics yet at {metrics}" in out
    metrics.parent.mkdir(parents=True)
    metrics.write_text('{"step": 0}\n')
    rc, out = health(capsys, "--pid", str(pid))
    assert rc == 0 and out.startswith(f"rollout pid {pid}: alive, metrics written 0s ago")
    old = time.time() - 700
    os.utime(metrics, (old, old))
    rc, out = health(capsys, "--pid", str(pid))
    assert rc == 1 and "s old (more than --max-age 600)" in out
    assert health(capsys, "--pid", str(pid), "--max-age", "1000")[0] == 0


def test_rollout_without_server_id_uses_the_servers_default_name(fake, tmp_path, capsys):
    write_run(tmp_path)
    pid = fake("rollout", "--config", "run.toml")
    metrics = tmp_path / "run" / "metrics" / f"rollout-{socket.gethostname()}-{pid}.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.touch()
    assert health(capsys, "--pid", str(pid))[0] == 0


def test_a_config_that_does_not_load_is_unhealthy(fake, tmp_path, capsys):
    write_run(tmp_path)
    pid = fake("selector", "--config", "run.toml", "max_stalenes=1")
    rc, out = health(capsys, "--pid", str(pid))
    assert rc == 1 and f"selector pid {pid}: its config does not load" in out and "max_stalenes" in out


def test_other_and_dead_processes_are_not_podsrl(fake, capsys):
    pid = fake(argv=[sys.executable, "-c", SLEEP, "selector"])  # `selector` not after podsrl: not a podsrl process
    assert health(capsys, "--pid", str(pid)) == (
        1,
        f"podsrl health: process {pid} is not a running podsrl selector, learner or rollout server",
    )
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert health(capsys, "--pid", str(dead.pid))[0] == 1
