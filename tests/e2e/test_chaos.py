"""Chaos in one end-to-end run (issue 7): SIGKILL a rollout server, write into the learner's
shared-memory segments (issue 19), SIGKILL the selector (restarted), then the learner (restarted,
resuming from its checkpoint). The run must complete, and the per-group
audit trail ``metrics/trained_groups.jsonl`` must show every (server, session, seq) trained at most
once, every staleness in 0..K, and no row of a discarded version trained after the learner restart;
no process of the run may outlive it.

Each process is started exactly as the launcher starts it (``launcher.launch.children``), each in a
session of its own; a SIGKILL goes to a whole process group (torchrun's workers lead their own
groups: they must die with torchrun, ``learner.train.die_with_agent``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
from helpers import ROOT, child_env, wait_for

from launcher.launch import Child, children, torchrun_command
from launcher.preflight import preflight
from protocol.config import load_config, to_toml
from protocol.shm import run_key

pytestmark = pytest.mark.slow

T = TypeVar("T")

K = 2
STEPS = 240  # room for every phase: finding a corrupt segment alone has taken 50 steps
EVERY = 20  # learner.checkpoint_every
# Restarted process started -> the first learner step it made possible, start-up included (the learner's
# is 5-9 s on 2 shared cores: torchrun and its worker each import torch, then the checkpoint is loaded).
RECOVERY_S = 20.0
# Restarted learner up (its first announcement) -> its first step; a rollout server's longest pause.
# Issue 7 asks for about 2 s; measured 1.1-1.2 s, so this fails on a stall, not on a slow machine.
RESUME_S = 5.0


def complete_records(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of a file another process is appending to."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


class Run:
    """The processes of one run: started like the launcher does, tracked down to every descendant's
    process group (torchrun's workers and the rollout servers' reward workers included)."""

    def __init__(self, run_dir: Path, overrides: list[str]) -> None:
        self.dir = run_dir
        self.cfg = load_config(ROOT / "configs" / "tiny.toml", [f"run.dir={run_dir}", *overrides])
        preflight(self.cfg)  # builds the tiny model in <run.dir>/model before any process needs it
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.config_path = run_dir / "config.toml"
        self.config_path.write_text(to_toml(self.cfg))
        self.commands = {kid.name: kid.cmd for kid in children(self.cfg, self.config_path)}
        # the learner through torchrun, as with more than one rank: its workers must die with the agent
        self.commands["learner"] = torchrun_command(str(self.config_path), [], 1)
        self.live: dict[str, Child] = {}
        self.dead: list[Child] = []
        self.pgids: set[int] = set()
        self.procs: dict[int, psutil.Process] = {}  # every process seen, by pid (is_running() survives pid reuse)
        self.t0 = time.monotonic()

    def start(self, name: str) -> float:
        """Start (or restart) ``name``; the wall-clock time it was started at."""
        kid = Child(name, self.commands[name])
        started = time.time()
        kid.start(self.dir / "logs", child_env())
        assert kid.proc is not None
        self.live[name] = kid
        self.pgids.add(kid.proc.pid)
        with contextlib.suppress(psutil.Error):
            self.procs[kid.proc.pid] = psutil.Process(kid.proc.pid)
        return started

    def track(self) -> None:
        for kid in self.live.values():
            assert kid.proc is not None
            with contextlib.suppress(psutil.Error):
                for p in psutil.Process(kid.proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error, ProcessLookupError):
                        self.pgids.add(os.getpgid(p.pid))
                        self.procs.setdefault(p.pid, p)

    def kill(self, name: str) -> list[psutil.Process]:
        """SIGKILL the process group of ``name`` and reap its leader; its descendants as they were."""
        self.track()
        kid = self.live.pop(name)
        assert kid.proc is not None and kid.proc.poll() is None, f"{name} died before it was killed"
        descendants = psutil.Process(kid.proc.pid).children(recursive=True)
        os.killpg(kid.proc.pid, signal.SIGKILL)
        kid.proc.wait(timeout=10)
        self.dead.append(kid)
        return descendants

    def exited(self, name: str) -> bool:
        proc = self.live[name].proc
        assert proc is not None
        return proc.poll() is not None

    def log(self, name: str) -> str:
        path = self.dir / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def check_alive(self) -> None:
        for name, kid in self.live.items():
            assert kid.proc is not None
            rc = kid.proc.poll()
            assert rc in (None, 0), f"{name} exited with {rc}:\n{self.log(name)[-3000:]}"

    def wait_for(self, what: str, pred: Callable[[], T | None], timeout: float) -> T:
        """``helpers.wait_for``, failing at once when a process of the run dies, tracking their descendants
        meanwhile, and showing their logs on a timeout."""
        last_track = 0.0

        def poll() -> T | None:
            nonlocal last_track
            value = pred()
            if value:
                return value
            self.check_alive()
            if time.monotonic() - last_track > 0.5:
                self.track()
                last_track = time.monotonic()
            return None

        return wait_for(
            poll,
            timeout,
            what,
            every_s=0.05,
            detail=lambda: "\n".join(f"--- {n}\n{self.log(n)[-1500:]}" for n in self.live),
        )

    def learner_records(self) -> list[dict[str, Any]]:
        return complete_records(self.dir / "metrics" / "learner.jsonl")

    def train_step(self) -> int:
        records = self.learner_records()
        return int(records[-1]["train/step"]) if records else 0

    def at_step(self, step: int, timeout: float) -> int:
        return self.wait_for(f"learner step {step}", lambda: self.train_step() >= step and self.train_step(), timeout)

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.t0:6.1f}s"

    def cleanup(self) -> None:
        for kid in self.live.values():
            kid.stop(signal.SIGKILL)
        for pgid in self.pgids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        for kid in [*self.live.values(), *self.dead]:
            if kid.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    kid.proc.wait(timeout=10)
            if kid.log is not None:
                kid.log.close()


def first_after(records: list[dict[str, Any]], wall: float) -> dict[str, Any] | None:
    return next((r for r in records if r["time"] > wall), None)


def test_chaos_rollout_selector_learner_killed_run_completes_nothing_trained_twice(run_dir, net_overrides):
    run = Run(
        run_dir,
        [
            f"max_staleness={K}",
            "rollout.servers=2",
            f"run.steps={STEPS}",
            f"learner.checkpoint_every={EVERY}",
            "rollout.heartbeat_s=0.3",
            "selector.peer_timeout_s=3",
            *net_overrides,
        ],
    )
    metrics = run_dir / "metrics"
    timings: dict[str, float] = {}
    try:
        for name in run.commands:
            run.start(name)
        print(f"\n{run.elapsed()} started {', '.join(run.commands)}")

        # 1. SIGKILL rollout-1 once groups of both servers were trained: training goes on with rollout-0 alone.
        step = run.at_step(20, timeout=120)

        def both_trained() -> bool:
            audit = complete_records(metrics / "trained_groups.jsonl")
            return {server for line in audit for server, *_ in line["groups"]} >= {"rollout-0", "rollout-1"}

        run.wait_for("groups of both rollout servers trained", both_trained, timeout=60)
        step = run.train_step()
        killed_at = time.time()
        run.kill("rollout-1")
        print(f"{run.elapsed()} SIGKILLed rollout-1 at step {step}")
        step = run.at_step(step + 15, timeout=60)
        times = [r["time"] for r in run.learner_records() if r["time"] > killed_at - 1]
        timings["rollout kill: longest pause between steps"] = max(
            b - a for a, b in zip(times, times[1:], strict=False)
        )
        assert timings["rollout kill: longest pause between steps"] < RESUME_S
        print(
            f"{run.elapsed()} step {step}; longest pause between steps around the kill "
            f"{timings['rollout kill: longest pause between steps']:.2f}s"
        )

        # 1b. A local process writes into the newest shared-memory segment, until a rollout server has found
        # one corrupt (issue 19): the learner confirms it, re-packs from its own state, offers no more
        # segments, and training goes on (nothing corrupt is loaded: tests/rollout_server/test_weight_transfer.py).
        written: set[str] = set()

        def corrupt_newest_segment() -> bool:
            segs = sorted(
                Path("/dev/shm").glob(f"podsrl-{run_key(run_dir)}-*-v*"), key=lambda p: int(p.name.rsplit("v", 1)[1])
            )
            for seg in segs[-1:]:
                if seg.name not in written:
                    with contextlib.suppress(OSError), seg.open("r+b") as f:
                        b = f.read(1)
                        f.seek(0)
                        f.write(bytes([b[0] ^ 0xFF]))
                        written.add(seg.name)
            return any(r.get("weights/shm_corrupt", 0) >= 1 for r in run.learner_records()[-3:])

        run.wait_for("the learner to confirm a corrupt segment", corrupt_newest_segment, timeout=60)
        step = run.at_step(run.train_step() + 10, timeout=60)
        assert run.learner_records()[-1]["weights/shm"] == 0, "shared memory still offered after a corruption"
        print(f"{run.elapsed()} corrupted {len(written)} segment(s); the learner stopped offering them; step {step}")

        # 2. SIGKILL the selector, start a new one on the same ports.
        selector_lines = len(complete_records(metrics / "selector.jsonl"))
        run.kill("selector")
        killed_step = run.train_step()
        started = run.start("selector")
        print(f"{run.elapsed()} SIGKILLed the selector at step {killed_step} and started a new one")

        def first_step_from_new_selector() -> dict[str, Any] | None:
            batches = complete_records(metrics / "selector.jsonl")[selector_lines:]  # the old one wrote no more
            return first_after(run.learner_records(), batches[0]["time"]) if batches else None

        rec = run.wait_for("a step trained on the new selector's batch", first_step_from_new_selector, timeout=60)
        timings["selector restart: started -> first step"] = rec["time"] - started
        assert timings["selector restart: started -> first step"] < RECOVERY_S
        print(
            f"{run.elapsed()} first step on the new selector's batch: step {rec['train/step']}, "
            f"{timings['selector restart: started -> first step']:.2f}s after it was started"
        )

        # 3. SIGKILL the learner between two checkpoints, start it again: it resumes.
        step = run.train_step()
        target = step + 15 + (EVERY // 2 - (step + 15) % EVERY) % EVERY  # >= step + 15, half-way to a checkpoint
        run.at_step(target, timeout=60)
        workers = run.kill("learner")  # torchrun's process group; its workers lead groups of their own
        killed_step = run.train_step()
        gone, alive = psutil.wait_procs(workers, timeout=5)
        assert workers and not alive, f"torchrun's workers outlived it: {alive}"
        published = json.loads((run_dir / "checkpoints" / "published.json").read_text())
        highest = int(published["version"])
        checkpoint = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("v"))
        audit_lines = len(complete_records(metrics / "trained_groups.jsonl"))
        assert checkpoint < highest, (
            f"the kill landed on a checkpoint (v{checkpoint}, published v{highest}): "
            "the resume over discarded versions was not exercised"
        )
        learner_started = run.start("learner")
        print(
            f"{run.elapsed()} SIGKILLed the learner at step {killed_step} (published up to v{highest}, "
            f"checkpoint v{checkpoint}); its {len(workers)} worker(s) died with it; started a new learner"
        )
        up: list[float] = []  # when the restarted learner published its first version (highest + 1)

        def first_step_of_new_learner() -> dict[str, Any] | None:
            if not up:
                with contextlib.suppress(OSError, ValueError, KeyError):
                    path = run_dir / "checkpoints" / "published.json"
                    mtime, version = path.stat().st_mtime, json.loads(path.read_text())["version"]
                    if version == highest + 1:
                        up.append(mtime)
                    elif version > highest + 1:  # already past it: this poll is an upper bound
                        up.append(time.time())
            return first_after(run.learner_records(), learner_started)

        rec = run.wait_for("the restarted learner's first step", first_step_of_new_learner, timeout=90)
        assert up, "the restarted learner's first version was never seen in published.json"
        timings["learner restart: started -> up"] = up[0] - learner_started
        timings["learner restart: up -> first step"] = rec["time"] - up[0]
        timings["learner restart: started -> first step"] = rec["time"] - learner_started
        print(
            f"{run.elapsed()} restarted learner's first step: train/step {rec['train/step']} version "
            f"{rec['step']}, {timings['learner restart: started -> first step']:.2f}s after it was started "
            f"({timings['learner restart: started -> up']:.2f}s start-up, then "
            f"{timings['learner restart: up -> first step']:.2f}s)"
        )
        assert timings["learner restart: started -> first step"] < RECOVERY_S
        assert timings["learner restart: up -> first step"] < RESUME_S

        # 4. The run ends by itself: the learner reaches run.steps, the others leave on its final announcement.
        run.wait_for("the learner to finish", lambda: run.exited("learner"), timeout=120)
        finished = time.monotonic()
        run.wait_for("every process to exit", lambda: all(run.exited(name) for name in run.live), timeout=30)
        print(f"{run.elapsed()} learner done; every process exited {time.monotonic() - finished:.2f}s later")
        for name, kid in run.live.items():
            assert kid.proc is not None and kid.proc.returncode == 0, (
                f"{name} exited with {kid.proc.returncode if kid.proc else None}:\n{run.log(name)[-3000:]}"
            )
    finally:
        run.cleanup()
        with contextlib.suppress(Exception):
            print("recovery times: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))

    # The run completed: the optimizer steps reached run.steps, the restarted learner continued from its checkpoint.
    records = run.learner_records()
    assert records[-1]["train/step"] == STEPS
    after = [r for r in records if r["time"] > learner_started]
    # the checkpoint's step is its version: the learner had not restarted before
    assert [r["train/step"] for r in after] == list(range(checkpoint + 1, STEPS + 1)), (
        "the restarted learner did not continue from its checkpoint's step"
    )
    log = run.log("learner")
    assert "resumed from" in log and f"continues at version {highest + 1}" in log
    restarted_selector = run.log("selector").rsplit("selector up:", 1)[1]
    assert "the learner restarted: versions below" in restarted_selector
    assert "rollout-0 silent" not in restarted_selector, "the live rollout server went unheard (a stalled groups link)"

    # The audit trail: every group trained at most once, every staleness in 0..K, no discarded version.
    audit = complete_records(metrics / "trained_groups.jsonl")
    keys = Counter((server, session, seq) for line in audit for server, session, seq, _ in line["groups"])
    assert sum(keys.values()) >= STEPS * run.cfg.learner.groups_per_step
    twice = {k: n for k, n in keys.items() if n > 1}
    assert not twice, f"groups trained more than once: {list(twice.items())[:5]}"
    versions = [line["version"] for line in audit]
    assert versions == sorted(set(versions)), "a version number was used for two steps"
    staleness = Counter((line["version"] - 1) - v for line in audit for *_, v in line["groups"])
    assert min(staleness) >= 0 and max(staleness) <= K, f"staleness outside 0..{K}: {sorted(staleness.items())}"
    assert all(0 <= r["staleness/max"] <= K for r in records)
    resumed = audit[audit_lines:]
    assert resumed and resumed[0]["version"] == highest + 2, "the restarted learner reused a version number"
    low = sorted({v for line in resumed for *_, v in line["groups"] if v <= highest})
    assert not low, (
        f"rows of versions {low} (at or below v{highest}, discarded with the dead learner) trained after the restart"
    )
    servers = Counter(server for line in audit for server, *_ in line["groups"])
    assert set(servers) == {"rollout-0", "rollout-1"}
    print(
        f"audit: {len(audit)} steps, {sum(keys.values())} groups, each once; staleness "
        f"{dict(sorted(staleness.items()))}; per server {dict(servers)}"
    )

    # No process outlives the run: every process group the test saw (leaders, torchrun's workers,
    # reward workers) is gone.
    # a leader's own children (resource tracker, reward worker) leave just after it
    wait_for(
        lambda: not any(p.is_running() for p in run.procs.values()),
        5,
        "every process of the run to be gone",
        every_s=0.1,
        detail=lambda: f"processes outlived the run: {[p for p in run.procs.values() if p.is_running()]}",
    )
    for pgid in run.pgids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)
    assert len(run.pgids) >= 8, run.pgids  # 4 started + 2 restarted leaders, and each torchrun worker
