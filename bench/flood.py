"""An honest run's step rate while one local peer floods it, against the same run without the flood.

    python -m bench flood            # 3 triples of runs, in rotating order (~4 min on 2 cores)

The default job (``configs/tiny.toml``, ``run.steps=300``) runs three times per triple: with one
flooding thread started as soon as the run has written its ports; with a thread that burns as much CPU
as that flooder did, and sends nothing; and alone. The flooder knows the ports (as any local process
could) but not the learner's session: without stopping, it sends forged batch requests (a random
session) to the selector, starts weight transfers (chunk 0 requests) at the learner, and pushes valid
scored groups of the announced version as a server id of its own (no pacing grant, so
``selector.peer_groups_per_s`` bounds what enters), each on its own socket, as fast as the links take
them. Measured: steps per second between step 50 and the last step (start-up excluded). On a 2-core
machine every cycle the flooder burns is taken from the run whatever the run does with its messages,
and an attacker elsewhere pays for its own: the goal (issue 19, >= 0.9x) is read against the
CPU-matched run, the ratio to the run alone is reported beside it.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import zmq

from bench.common import ROOT, Result
from launcher.cli import podsrl_command
from protocol.config import Config, load_config
from protocol.messages import BatchRequest, Message, ScoredGroup, WeightsAnnouncement, WeightsRequest, new_session
from protocol.metrics import read_metrics
from protocol.sockets import announce_subscriber, batch_client, close, group_sender, recv, send, weight_client

STEPS, SKIP = 300, 50


def forged_group(cfg: Config, session: int, gid: int, version: int) -> ScoredGroup:
    """A group that passes every bound of the run (tokens of the tiny vocabulary, rewards that vary)."""
    n = cfg.rollout.group_size
    return ScoredGroup(
        server_id="flood",
        session=session,
        group_id=gid,
        version=version,
        task=cfg.task.name,
        gen_seconds=0.0,
        prompt_ids=np.array([1, 5, 6, 2], np.int32),
        completion_ids=np.full(2 * n, 5, np.int32),
        completion_lens=np.full(n, 2, np.int32),
        logprobs=np.full(2 * n, -0.5, np.float32),
        rewards=(np.arange(n) % 2).astype(np.float32),
    )


KINDS = ("batch", "weights", "groups")


def flood(run_dir: Path, stop: threading.Event, sent: dict[str, float], kinds: tuple[str, ...] = KINDS) -> None:
    """Forge batch requests, weight-transfer starts and groups at the run's ports until ``stop``."""
    config = run_dir / "config.toml"
    while not config.exists() and not stop.is_set():
        time.sleep(0.01)
    time.sleep(0.2)  # (the launcher writes the file once; let it finish)
    cfg = load_config(str(config), [])
    net = cfg.net
    ctx = zmq.Context()
    batches, weights, groups, sub = (
        batch_client(ctx, net),
        weight_client(ctx, net),
        group_sender(ctx, net),
        announce_subscriber(ctx, net),
    )
    forged, session, version = new_session(), new_session(), -1
    make: dict[str, tuple[zmq.Socket, Callable[[], Message | None]]] = {  # None: nothing to send yet
        "batch": (batches, lambda: BatchRequest(request_id=1, version=0, num_groups=8, session=forged)),
        "weights": (weights, lambda: WeightsRequest(version=-1, fetch=new_session())),
        "groups": (groups, lambda: forged_group(cfg, session, int(sent["groups"]), version) if version >= 0 else None),
    }
    try:
        while not stop.is_set():
            while sub.poll(0):
                version = max(version, recv(sub, WeightsAnnouncement)[1].version)
            for _ in range(64):
                for kind in kinds:
                    sock, message = make[kind]
                    msg = message()
                    if msg is None:
                        continue
                    try:
                        send(sock, msg, flags=zmq.NOBLOCK)
                        sent[kind] += 1
                    except zmq.Again:
                        pass
                # drain whatever comes back, so our own queues never block the links
                for sock in (batches, weights, groups):
                    while sock.poll(0):
                        sock.recv_multipart()
    finally:
        close(batches, weights, groups, sub)
        ctx.term()


def burn(stop: threading.Event, cores: float) -> None:
    """Spin ``cores`` of one core (a 2 ms duty cycle) until ``stop``: the flooder's CPU, without its messages."""
    period = 0.002
    while not stop.is_set():
        until = time.perf_counter() + cores * period
        while time.perf_counter() < until:
            pass
        time.sleep((1 - cores) * period)


def role_cpu(proc: subprocess.Popen) -> dict[str, float]:
    """Wait for the run ``proc``; the CPU seconds each of its roles used (a process is named by the log
    it writes under ``logs/``: roles are forks of one fork server, their command lines alike)."""
    seen: dict[int, tuple[str, float]] = {}
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    logs = sorted({Path(f.path).stem for f in child.open_files() if "/logs/" in f.path})
                    if logs and logs != ["forkserver"]:
                        seen[child.pid] = (",".join(logs), sum(child.cpu_times()[:2]))
        time.sleep(0.3)
    out: dict[str, float] = {}
    for role, cpu in seen.values():
        out[role] = out.get(role, 0.0) + cpu
    return out


def one_run(
    kinds: tuple[str, ...] = (), burn_cores: float = 0.0, steps_total: int = STEPS, skip: int = SKIP
) -> tuple[float, float, dict[str, float]]:
    """Flooding ``kinds`` (none: quiet) or burning ``burn_cores``: (steps/s after step ``skip``, the
    bench process's CPU seconds per second of run, messages sent and what became of them)."""
    with tempfile.TemporaryDirectory(prefix="podsrl-bench-flood-") as tmp:
        run_dir = Path(tmp) / "run"
        stop, sent = threading.Event(), dict.fromkeys(("batch", "weights", "groups"), 0.0)
        if kinds:
            side = threading.Thread(target=flood, args=(run_dir, stop, sent, kinds), daemon=True)
        else:
            side = threading.Thread(target=burn, args=(stop, burn_cores), daemon=True)
        me = psutil.Process()
        cpu0 = sum(me.cpu_times()[:2])
        t0 = time.monotonic()
        side.start()
        log = Path(tmp) / "podsrl.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                podsrl_command(run_dir, [f"run.steps={steps_total}", "learner.checkpoint_every=0"]),
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            roles = role_cpu(proc)
        finally:
            stop.set()
            side.join()
        wall, cpu = time.monotonic() - t0, sum(me.cpu_times()[:2]) - cpu0
        if proc.returncode != 0:
            raise RuntimeError(f"podsrl run failed:\n{log.read_text()[-3000:]}")
        steps = read_metrics(run_dir / "metrics/learner.jsonl")
        totals = read_metrics(run_dir / "metrics/selector.jsonl")[-1]
    sent.update({f"cpu_s/{role}": round(c, 2) for role, c in roles.items()})
    if kinds:  # what the run did with the flood
        for key in ("groups/received/flood", "rejected/peer_rate", "rejected/batch_not_learner"):
            sent[key] = int(totals.get(f"total/{key}", 0))
        sent["weights/throttled"] = int(max(r.get("weights/throttled", 0) for r in steps))
    a, b = steps[skip - 1], steps[-1]
    return (b["step"] - a["step"]) / (b["time"] - a["time"]), cpu / wall, sent


def run(quick: bool = False) -> list[Result]:
    triples = 1 if quick else 3
    size = (100, 20) if quick else (STEPS, SKIP)
    rates: dict[str, list[float]] = {"flood": [], "matched": [], "alone": []}
    cpu: list[float] = []
    sent: list[dict[str, float]] = []
    for i in range(triples):  # rotating order: no mode always runs first; "matched" needs its flood's CPU
        order = [("flood", "matched", "alone"), ("alone", "flood", "matched"), ("flood", "alone", "matched")][i % 3]
        for mode in order:
            if mode == "flood":
                rate, share, n = one_run(KINDS, 0.0, *size)
                cpu.append(share)
                sent.append(n)
            else:
                rate, _, _ = one_run((), cpu[-1] if mode == "matched" else 0.0, *size)
            rates[mode].append(rate)
    vs_matched = [f / m for f, m in zip(rates["flood"], rates["matched"], strict=True)]
    vs_alone = [f / q for f, q in zip(rates["flood"], rates["alone"], strict=True)]
    case = "default run, one local peer flooding forged batch requests, weight-transfer starts and groups"
    flooded = statistics.median(rates["flood"])
    return [
        Result(
            "flood",
            case,
            flooded,
            "steps/s",
            "the same run beside a thread burning the flooder's CPU, sending nothing",
            statistics.median(rates["matched"]),
            statistics.median(vs_matched),
            ">= 0.9x",
            statistics.median(vs_matched) >= 0.9,
            notes=(
                f"{triples} triples, ratios {[round(r, 3) for r in vs_matched]}; flooder CPU "
                f"{[round(c, 2) for c in cpu]} cores; messages sent and their fate {sent}"
            ),
        ),
        Result(
            "flood",
            case + ", vs the run alone (the flooder's own CPU included)",
            flooded,
            "steps/s",
            "the same run alone",
            statistics.median(rates["alone"]),
            statistics.median(vs_alone),
            "context (no goal)",
            None,
            notes=f"ratios {[round(r, 3) for r in vs_alone]}",
        ),
    ]
