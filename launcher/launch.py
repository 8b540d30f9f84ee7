"""``podsrl run``: start the selector, the learner and R rollout servers on this machine.

The learner runs through torchrun for ``learner.nproc > 1``, and as a plain process group of one
otherwise (``learner_command``: torchrun's agent would add ~2.8 s of start-up).

Each child is its own process group (own session), logging to
``<run>/logs/<name>.log``. The launcher shows progress from the learner's metrics file (a live
status line on a terminal, a plain line every 5 s otherwise), and ends when the learner does: the rest exit on
its final announcement
and are terminated if they linger. Ctrl-C or SIGTERM stops everything; no child outlives the
launcher, even one killed with SIGKILL (children get SIGTERM when it dies, and torchrun's workers,
which torch starts in sessions of their own, are killed when torchrun dies: learner/train.py).
Exit status: 0 if every child succeeded, 1 if any failed (its log tail is printed), 130 if
interrupted.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_fds
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import IO

from launcher.accounting import account
from launcher.forkserver import RoleSpec, fork, stop_server
from launcher.ports import assign_ports, describe
from protocol.cli import die_with_parent
from protocol.config import Config, LearnerConfig, to_toml
from protocol.shm import remove_segments, run_key

ROOT = Path(__file__).resolve().parents[1]


class Forked:
    """A process forked from the fork server, behind the part of ``subprocess.Popen``'s interface the
    launcher uses (it is the fork server's child, not ours: multiprocessing reports its exit)."""

    def __init__(self, proc: BaseProcess) -> None:
        assert proc.pid is not None
        self.proc, self.pid, self.sentinel = proc, proc.pid, proc.sentinel

    @property
    def returncode(self) -> int | None:
        return self.proc.exitcode

    def poll(self) -> int | None:
        return self.proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.proc.name, timeout or 0.0)
        return self.proc.exitcode


@dataclass
class Child:
    name: str
    cmd: list[str]
    proc: subprocess.Popen | Forked | None = None
    log: IO[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)  # added to the environment it is started with
    forkable: bool = False  # ``cmd`` is ``python -m MODULE ARGS``: may be forked from the fork server
    sentinel: int = -1  # readable once the process has exited (a pidfd for a plain process)

    def start(self, logs: Path, env: dict[str, str], server: ForkServerContext | None = None) -> None:
        path = logs / f"{self.name}.log"
        if server is not None and self.forkable:
            spec = RoleSpec(self.cmd[2], self.cmd[3:], str(path), {**env, **self.env}, os.getcwd())
            forked = Forked(fork(server, spec))
            self.proc, self.sentinel = forked, forked.sentinel
            return
        self.log = path.open("ab")
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**env, **self.env},
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=os.getcwd(),
            preexec_fn=functools.partial(_die_with_parent, os.getpid()),
        )
        self.sentinel = os.pidfd_open(self.proc.pid)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if isinstance(self.proc, subprocess.Popen) and self.sentinel >= 0:
            os.close(self.sentinel)
        self.sentinel = -1

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:  # a forked child not yet its own group leader (setsid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, sig)

    def reap_group(self, grace_s: float = 3.0) -> None:
        """Once the leader has exited, wait for the rest of its process group, then kill what is left.

        A leader's own children can outlive it briefly: multiprocessing's resource tracker (which
        ignores SIGTERM and leaves when its pipe closes) and a reward worker being torn down.
        """
        if self.proc is None:
            return
        deadline = time.monotonic() + grace_s
        while True:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                return
            time.sleep(0.05)


def _die_with_parent(launcher_pid: int) -> None:
    """In the child, before exec: SIGTERM it when the launcher dies, however it dies (SIGKILL included).
    Linux only (prctl PR_SET_PDEATHSIG); elsewhere a killed launcher can leave its children running."""
    if die_with_parent(signal.SIGTERM) and os.getppid() != launcher_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def torchrun_command(
    cfg_path: str, overrides: list[str], nproc: int, learner: LearnerConfig | None = None
) -> list[str]:
    """The exact torchrun line ``podsrl learner`` and ``podsrl run`` (for more than one rank) use.

    One node: ``--standalone``. ``learner.nnodes > 1``: torchrun's own c10d rendezvous at
    ``learner.rdzv_endpoint`` (node 0's agent hosts its store), the same line on every node but for
    ``learner.node_rank``; no restarts (``--max-restarts=0``): a node that dies ends the job, which
    every node then starts again from the last checkpoint (docs/DEPLOY.md)."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if learner is None or learner.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [
            f"--nnodes={learner.nnodes}",
            f"--node-rank={learner.node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={learner.rdzv_endpoint}",
            f"--rdzv-id={learner.rdzv_id}",
            f"--rdzv-conf=join_timeout={learner.rdzv_timeout_s:g}",
            "--max-restarts=0",
        ]
    cmd += [f"--nproc-per-node={nproc}", "-m", "learner.train"]
    return cmd + (["--config", cfg_path] if cfg_path else []) + list(overrides)


def learner_command(cfg_path: str, overrides: list[str], nproc: int) -> tuple[list[str], dict[str, str]]:
    """How ``podsrl run`` starts the learner: the command and the environment it adds.

    One rank runs as a plain process with the variables torchrun would set: torchrun's agent costs
    ~2.8 s of start-up (its own torch import and rendezvous) and nothing else for a single rank. Its
    rendezvous store binds port 0, i.e. whatever port is free when it starts: no other rank needs to
    find it, and a port picked here and released could be taken before the learner binds it (seen
    with five runs starting at once). More ranks go through torchrun."""
    if nproc > 1:
        return torchrun_command(cfg_path, overrides, nproc), {}
    cmd = [sys.executable, "-m", "learner.train", *(["--config", cfg_path] if cfg_path else []), *overrides]
    return cmd, {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "0",
    }


def log_tail(run_dir: Path, name: str, lines: int = 15) -> str:
    path = run_dir / "logs" / f"{name}.log"
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(f"    {line}" for line in text[-lines:])


def children(cfg: Config, config_path: Path) -> list[Child]:
    """The processes of a run. Forkable (launcher/forkserver.py): the selector, a one-rank learner (more
    ranks go through torchrun) and torch-engine rollout servers (vLLM runs its own multiprocessing)."""
    py, conf = sys.executable, ["--config", str(config_path)]
    learner_cmd, learner_env = learner_command(str(config_path), [], cfg.learner.nproc)
    kids = [
        Child("selector", [py, "-m", "selector.server", *conf], forkable=True),
        Child("learner", learner_cmd, env=learner_env, forkable=cfg.learner.nproc == 1),
    ]
    for i in range(cfg.rollout.servers):
        kids.append(
            Child(
                f"rollout-{i}",
                [
                    py,
                    "-m",
                    "rollout_server.server",
                    *conf,
                    "--server-id",
                    f"rollout-{i}",
                    "--seed",
                    str(cfg.run.seed * 1000 + i),
                ],
                forkable=cfg.rollout.engine.type == "torch",
            )
        )
    return kids


class MemoryMonitor:
    """Samples the resident memory of each child's process tree (torchrun's workers included)."""

    def __init__(self, kids: list[Child], run_dir: Path, every_s: float = 2.0) -> None:
        from protocol.metrics import Monitor

        self.kids, self.every_s, self.last = kids, every_s, 0.0
        self.peak: dict[str, float] = {}
        self.monitor = Monitor(run_dir, "launcher", tensorboard=False)

    def poll(self, step: int) -> None:
        if time.monotonic() - self.last < self.every_s:
            return
        self.last = time.monotonic()
        import psutil

        sample = {}
        for kid in self.kids:
            if kid.proc is None or kid.proc.poll() is not None:
                continue
            try:
                root = psutil.Process(kid.proc.pid)
                procs = [root, *root.children(recursive=True)]
                sample[kid.name] = sum(p.memory_info().rss for p in procs) / 2**20
            except psutil.Error:  # exited between the check and the read
                continue
            self.peak[kid.name] = max(self.peak.get(kid.name, 0.0), sample[kid.name])
        self.monitor.log(step, {f"rss_mib/{k}": v for k, v in sample.items()})

    def close(self) -> None:
        self.monitor.log(-1, {f"peak_rss_mib/{k}": v for k, v in self.peak.items()})
        self.monitor.close()


class Progress:
    """Follows ``metrics/learner.jsonl``: on a terminal, one live status line (step/total, reward,
    staleness, throughput, ETA) rewritten in place; otherwise (a log file, CI, a pipe) a plain line
    every ``every_s`` seconds and at the last step, so a long run's log stays readable."""

    def __init__(self, cfg: Config, live: bool | None = None, every_s: float = 5.0) -> None:
        self.cfg = cfg
        self.path = Path(cfg.run.dir) / "metrics" / "learner.jsonl"
        self.offset = self.path.stat().st_size if self.path.exists() else 0  # skip earlier runs' records
        self.rewards: list[float] = []
        self.t0 = time.monotonic()
        self.live = sys.stdout.isatty() if live is None else live
        self.every_s, self.last_print = every_s, -math.inf
        self.first: tuple[int, float] | None = None  # (step, metrics time) of the first record seen
        self.shown = 0  # length of the live line on screen without its newline (0: none)

    def line(self, m: dict) -> str:
        total, step = self.cfg.run.steps, int(m.get("train/step", m["step"]))
        now = time.monotonic()
        assert self.first is not None
        done, seconds = step - self.first[0], m.get("time", 0.0) - self.first[1]  # the records' own clock
        eta = seconds / done * (total - step) if done > 0 else math.nan
        eta_text = f"ETA {eta:4.0f}s" if math.isfinite(eta) else "ETA    ?"
        width = 20
        bar = "#" * int(width * step / total) + "-" * (width - int(width * step / total))
        return (
            f"step {step:>5}/{total} [{bar}] reward {self.rewards[-1]:.3f}  staleness "
            f"{m.get('staleness/mean', 0):.2f} (max {m.get('staleness/max', 0)}, K={self.cfg.max_staleness})  "
            f"{m.get('train/samples_per_s', 0):6.1f} samples/s  wait {m.get('time/wait_for_batch', 0):5.2f}s  "
            f"dropped {m.get('staleness/dropped', 0)}  {now - self.t0:5.0f}s  {eta_text}"
        )

    def poll(self) -> None:
        if not self.path.exists():
            return
        with self.path.open() as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind("\n") + 1
        self.offset += len(chunk[:end].encode())
        records = [json.loads(line) for line in chunk[:end].splitlines()]
        for m in records:
            self.rewards.append(m.get("reward/mean") or 0.0)
        if not records:
            return
        if self.first is None:
            self.first = (int(records[0].get("train/step", records[0]["step"])), records[0].get("time", 0.0))
        m, now = records[-1], time.monotonic()
        last = int(m.get("train/step", m["step"])) >= self.cfg.run.steps
        if self.live:
            # Padded to the previous line's length: a shorter line (staleness max 2 after 10) must not
            # leave the old line's last characters behind ("ETA 6ss"). Spaces, not an ANSI erase, so
            # any terminal shows it right.
            text = self.line(m)
            print("\r" + text.ljust(self.shown), end="\n" if last else "", flush=True)
            self.shown = 0 if last else len(text)
        elif last or now - self.last_print >= self.every_s:
            self.last_print = now
            print(self.line(m), flush=True)

    def finish(self) -> None:
        """End a live line left open (a run stopped before its last step)."""
        if self.shown:
            print(flush=True)
            self.shown = 0

    def summary(self) -> str:
        r = self.rewards
        if not r:
            return "no steps completed"
        k = max(1, len(r) // 10)
        first, last = sum(r[:k]) / k, sum(r[-k:]) / k
        return (
            f"{len(r)} steps in {time.monotonic() - self.t0:.0f}s; mean reward first 10% {first:.3f} "
            f"-> last 10% {last:.3f}"
        )


def wait_for_exit(kids: list[Child], timeout: float) -> None:
    """Return when one of ``kids`` exits (now, if one has already) or after ``timeout`` seconds."""
    fds = [k.sentinel for k in kids if k.sentinel >= 0 and k.proc is not None and k.proc.poll() is None]
    if fds:
        wait_fds(fds, timeout)
    else:
        time.sleep(timeout)


def launch(cfg: Config, report: str, server: ForkServerContext | None = None) -> int:
    """Start every process of ``cfg`` (checked by ``preflight``, whose ``report`` is printed), forked
    from ``server`` where they may be (launcher/forkserver.py)."""
    run_dir = Path(cfg.run.dir)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    cfg, picked = assign_ports(cfg)
    config_path = run_dir / "config.toml"  # what every child reads: the ports picked included
    config_path.write_text(to_toml(cfg))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    print(
        f"podsrl run: {cfg.summary()}\n{report}\n  run dir {run_dir}  (logs in {run_dir / 'logs'}, metrics in "
        f"{run_dir / 'metrics'})\n  {describe(cfg.net, picked)}; in {config_path}, with which another rollout "
        f"server on this machine joins: podsrl rollout --config {config_path} --server-id NAME",
        flush=True,
    )
    kids = children(cfg, config_path)
    progress = Progress(cfg)
    memory = MemoryMonitor(kids, run_dir)
    interrupted = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal interrupted
        interrupted = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    failed: list[str] = []
    try:
        for kid in kids:
            kid.start(run_dir / "logs", env, server)
        # Each child leads its own process group (torchrun's workers included): tests and users can
        # check that none outlives the run.
        (run_dir / "pids.json").write_text(json.dumps({k.name: k.proc.pid for k in kids if k.proc}))
        learner = next(k for k in kids if k.name == "learner")
        while not interrupted:
            wait_for_exit(kids, 0.5)  # wakes at once when a process exits: the end is seen without delay
            progress.poll()
            memory.poll(len(progress.rewards))
            for kid in kids:
                rc = kid.proc.poll() if kid.proc else None
                if rc is not None and rc != 0 and kid.name not in failed:
                    failed.append(kid.name)
                    print(
                        f"\n{kid.name} exited with status {rc}; last lines of its log:\n{log_tail(run_dir, kid.name)}",
                        file=sys.stderr,
                        flush=True,
                    )
            rollouts_alive = any(k.proc.poll() is None for k in kids if k.name.startswith("rollout") and k.proc)
            assert learner.proc is not None
            if learner.proc.poll() is not None or "selector" in failed or (cfg.rollout.servers and not rollouts_alive):
                break
        progress.poll()
        if not interrupted:
            deadline = time.monotonic() + 15  # the rest leave on the learner's final announcement
            while time.monotonic() < deadline and any(k.proc.poll() is None for k in kids if k.proc):
                wait_for_exit(kids, deadline - time.monotonic())
    finally:
        for kid in kids:
            kid.stop()
        deadline = time.monotonic() + 10
        for kid in kids:
            if kid.proc is not None:
                try:
                    kid.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    kid.stop(signal.SIGKILL)
                    kid.proc.wait()
            kid.reap_group()
            kid.close()
        memory.close()
        if server is not None:
            stop_server()  # last: every fork has exited (launcher/forkserver.py)
        with contextlib.suppress(OSError):  # a learner killed above leaves its shared-memory segments
            remove_segments(cfg.weights.shm_dir, run_key(run_dir))
        for s, h in old.items():
            signal.signal(s, h)
    progress.finish()
    print(
        f"podsrl run: {progress.summary()}; peak RSS MiB: " + ", ".join(f"{k} {v:.0f}" for k, v in memory.peak.items()),
        flush=True,
    )
    for line in account(run_dir).lines():
        print(f"podsrl run: {line}", flush=True)
    if interrupted:
        print("podsrl run: interrupted; all processes stopped", file=sys.stderr)
        return 130
    if learner.proc is not None and learner.proc.returncode != 0 and "learner" not in failed:
        failed.append("learner")
    if failed:
        print(f"podsrl run: failed: {', '.join(failed)} (logs in {run_dir / 'logs'})", file=sys.stderr)
        return 1
    return 0
