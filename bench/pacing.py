"""Pacing (issue 17): ``rollout.pacing = "credits"`` against ``"free"`` on real `podsrl run` jobs, side by side.

    python -m bench pacing            # ~15 min on 2 cores
    python -m bench pacing --quick    # a smoke test, not figures to quote

Every job is the default run (configs/tiny.toml: 2 rollout servers, K=2) with one change; credits and
free jobs alternate seed by seed, so drift in machine load hits both alike. Rows:

1. default run: wall-clock from the first training step to a 10-step mean reward of 0.8, credits / free,
   and the waste of each (generated groups never trained / generated, ``launcher/accounting.py``).
2. exact mode (``run.staleness_mode=exact``), K=2 and K=8: waste, credits and free.
3. heterogeneous: rollout-1 is SIGSTOPped 70 ms of every 100 ms; its share of trained groups / its share of
   generated groups (1.0 = its work is trained in proportion), credits and free. Each job's audit trail is
   checked: no trained group beyond K, none trained twice.
4. length: the variable-length copy task (``task.min_length=1 task.length=16``, scored by ``char_match_strict``
   so that the model learns where to stop): mean completion length of
   the trained groups / of the generated ones, credits and free.
5. overhead: a WorkRequest -> WorkGrant round trip to a real selector process, as a fraction of the
   median engine call of the default run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from bench.common import ROOT, Result, child_env, free_ports, print_results
from launcher.accounting import Accounting, account
from launcher.cli import podsrl_command
from protocol.config import NetConfig
from protocol.messages import WorkGrant, WorkRequest
from protocol.metrics import read_metrics
from protocol.sockets import close, group_sender, recv, send

THRESHOLD, WINDOW = 0.8, 10


@dataclass
class Job:
    acc: Accounting
    time_to: float  # seconds from the first step to a WINDOW-step mean reward >= THRESHOLD (inf: never)
    gen_call_s: float  # median engine call (time/generate) of the rollout servers
    max_staleness: int  # over every trained row, from the learner's metrics
    duplicates: int  # groups the audit trail lists more than once
    seconds: float  # wall-clock of the training steps


def duty_cycle(run_dir: Path, name: str, stop_s: float, period_s: float, done: threading.Event) -> None:
    """SIGSTOP the process group of ``name`` for ``stop_s`` of every ``period_s`` until ``done``, from the
    learner's first step on (start-up at 30% speed would only delay the run's start)."""
    first_step = run_dir / "metrics" / "learner.jsonl"
    while not first_step.exists() and not done.wait(0.05):
        pass
    if done.is_set():
        return
    pgid = json.loads((run_dir / "pids.json").read_text())[name]
    try:
        while not done.is_set():
            os.killpg(pgid, signal.SIGSTOP)
            time.sleep(stop_s)
            os.killpg(pgid, signal.SIGCONT)
            time.sleep(period_s - stop_s)
    except ProcessLookupError:
        return
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGCONT)


def run_job(overrides: list[str], slow: str = "") -> Job:
    with tempfile.TemporaryDirectory(prefix="podsrl-bench-pacing-") as tmp:
        run_dir = Path(tmp) / "run"
        # ports: the launcher picks free ones (none set here)
        cmd = podsrl_command(run_dir, ["learner.checkpoint_every=0", *overrides])
        done = threading.Event()
        cycler = threading.Thread(target=duty_cycle, args=(run_dir, slow, 0.07, 0.1, done), daemon=True)
        if slow:
            cycler.start()
        try:
            res = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900)
        finally:
            done.set()
            if slow:
                cycler.join()
        if res.returncode != 0:
            raise RuntimeError(f"job {overrides} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        steps = read_metrics(run_dir / "metrics/learner.jsonl")
        calls = [
            m["time/generate"]
            for p in (run_dir / "metrics").glob("rollout-*.jsonl")
            for m in read_metrics(p)
            if "time/generate" in m
        ]
        audit = [
            tuple(g[:3])
            for line in (run_dir / "metrics/trained_groups.jsonl").read_text().splitlines()
            for g in json.loads(line)["groups"]
        ]
        acc = account(run_dir)
    t0 = steps[0]["time"] - steps[0]["time/step"]
    raw = [m["reward/mean"] for m in steps]
    smooth = [statistics.fmean(raw[max(0, i - WINDOW + 1) : i + 1]) for i in range(len(raw))]
    reach = next(
        (
            m["time"] - t0
            for i, (m, r) in enumerate(zip(steps, smooth, strict=True))
            if i >= WINDOW - 1 and r >= THRESHOLD
        ),
        float("inf"),
    )  # a 10-step mean needs 10 steps
    return Job(
        acc,
        reach,
        statistics.median(calls) if calls else float("nan"),
        int(max(m.get("staleness/max", 0) for m in steps)),
        len(audit) - len(set(audit)),
        steps[-1]["time"] - t0,
    )


def pair(overrides: list[str], seeds: list[int], slow: str = "") -> dict[str, list[Job]]:
    jobs: dict[str, list[Job]] = {"credits": [], "free": []}
    for seed in seeds:
        for mode in jobs:
            jobs[mode].append(run_job([f"rollout.pacing={mode}", f"run.seed={seed}", *overrides], slow))
            print(
                f"  {mode} seed {seed} {' '.join(overrides)}: " + "; ".join(jobs[mode][-1].acc.lines()[:1]), flush=True
            )
    return jobs


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def default_run(quick: bool) -> tuple[list[Result], float]:
    seeds = [0] if quick else [0, 1, 2]
    jobs = pair(["run.steps=40"] if quick else [], seeds)
    t = {k: med([j.time_to for j in js]) for k, js in jobs.items()}
    waste = {k: med([j.acc.waste for j in js]) for k, js in jobs.items()}
    ratio = t["credits"] / t["free"] if all(v not in (0, float("inf")) for v in t.values()) else None
    notes = (
        f"seeds {seeds}; per seed time to {WINDOW}-step mean {THRESHOLD} credits "
        + ", ".join(f"{j.time_to:.1f}" for j in jobs["credits"])
        + " s, free "
        + ", ".join(f"{j.time_to:.1f}" for j in jobs["free"])
        + " s; waste credits "
        + ", ".join(f"{j.acc.waste:.3f}" for j in jobs["credits"])
        + ", free "
        + ", ".join(f"{j.acc.waste:.3f}" for j in jobs["free"])
    )
    call_s = med([j.gen_call_s for j in jobs["credits"]])
    return [
        Result(
            "pacing",
            f"default run: wall-clock to a {WINDOW}-step mean reward {THRESHOLD}",
            t["credits"],
            "s",
            "rollout.pacing=free",
            t["free"],
            ratio,
            "<= 0.8x (never > 1.0x)",
            None if ratio is None else ratio <= 0.8,
            ratio_means="time(credits) / time(free)",
            notes=notes,
            extra={"time_to": t, "waste": waste},
        ),
        Result(
            "pacing",
            "default run: generated groups never trained",
            waste["credits"],
            "fraction",
            "rollout.pacing=free",
            waste["free"],
            None,
            "<= 5%",
            waste["credits"] <= 0.05,
            ratio_means="-",
            notes="(generated - trained in the audit trail) / generated, median over seeds",
        ),
    ], call_s


def exact_mode(quick: bool) -> list[Result]:
    out = []
    for k in (2, 8):
        jobs = pair(
            [
                f"max_staleness={k}",
                "run.staleness_mode=exact",
                "selector.buffer_groups=256",
                "run.steps=30" if quick else "run.steps=300",
            ],
            [0],
        )
        w = {m: js[0].acc.waste for m, js in jobs.items()}
        out.append(
            Result(
                "pacing",
                f"exact mode K={k}: generated groups never trained",
                w["credits"],
                "fraction",
                "rollout.pacing=free",
                w["free"],
                None,
                "<= 20%",
                w["credits"] <= 0.20,
                ratio_means="-",
                notes="300 steps, seed 0",
            )
        )
    return out


def heterogeneous(quick: bool) -> list[Result]:
    seeds = [0] if quick else [0, 1]
    jobs = pair(["run.steps=40"] if quick else [], seeds, slow="rollout-1")
    share = {m: med([r for j in js if (r := j.acc.share_ratio("rollout-1")) is not None]) for m, js in jobs.items()}
    gen = {m: med([j.acc.servers["rollout-1"].generated / j.acc.generated for j in js]) for m, js in jobs.items()}
    worst = max(j.max_staleness for js in jobs.values() for j in js)
    dup = sum(j.duplicates for js in jobs.values() for j in js)
    return [
        Result(
            "pacing",
            "heterogeneous (rollout-1 stopped 70% of every 100 ms): its trained/generated share",
            share["credits"],
            "ratio",
            "rollout.pacing=free",
            share["free"],
            None,
            "within 10% of 1.0",
            abs(share["credits"] - 1) <= 0.10,
            ratio_means="-",
            notes=f"seeds {seeds}, the default 600 steps; rollout-1's share of generated groups credits "
            f"{gen['credits']:.3f}, "
            f"free {gen['free']:.3f}; max trained staleness {worst} (K=2); groups trained twice: {dup}",
            extra={"share_ratio": share, "generated_share": gen, "max_staleness": worst, "duplicates": dup},
        )
    ]


def length(quick: bool) -> list[Result]:
    jobs = pair(
        [
            "task.min_length=1",
            "task.length=16",
            "task.reward=char_match_strict",
            "run.steps=30" if quick else "run.steps=300",
        ],
        [0],
    )
    ratio = {m: (js[0].acc.length("trained") or 0) / (js[0].acc.length("received") or 1) for m, js in jobs.items()}
    lens = {m: (js[0].acc.length("received"), js[0].acc.length("trained")) for m, js in jobs.items()}
    return [
        Result(
            "pacing",
            "variable-length copy (1-16 symbols): mean trained / mean generated completion length",
            ratio["credits"],
            "ratio",
            "rollout.pacing=free",
            ratio["free"],
            None,
            "within 5% of 1.0",
            abs(ratio["credits"] - 1) <= 0.05,
            ratio_means="-",
            notes="300 steps, seed 0; (generated, trained) mean tokens: "
            + ", ".join(f"{m} ({g:.2f}, {t:.2f})" for m, (g, t) in lens.items() if g and t),
        )
    ]


def grant_round_trip(quick: bool, call_s: float) -> list[Result]:
    """Median WorkRequest -> WorkGrant round trip to a real selector process with capacity to spare."""
    from bench.selector import _announce_main

    group, batch, announce, weights = free_ports(4)
    with tempfile.TemporaryDirectory(prefix="podsrl-bench-grant-") as tmp:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "selector.server",
                f"run.dir={tmp}",
                f"net.group_port={group}",
                f"net.batch_port={batch}",
                f"net.announce_port={announce}",
                f"net.weights_port={weights}",
                "max_staleness=100000",
            ],
            cwd=ROOT,
            env=child_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        ctx, stop = zmq.Context(), threading.Event()
        announcer = threading.Thread(target=_announce_main, args=(ctx, announce, stop), daemon=True)
        announcer.start()
        sock = group_sender(ctx, NetConfig(group_port=group))
        try:
            rtts: list[float] = []
            deadline = time.monotonic() + 60
            n = 50 if quick else 1000
            rid = 0
            while len(rtts) < n and time.monotonic() < deadline:
                t0 = time.perf_counter()
                send(sock, WorkRequest(server_id="bench", session=1, request_id=rid, version=0, prompts=1))
                rid += 1
                if sock.poll(1000):
                    recv(sock, WorkGrant)
                    if rid > 5:  # the first ones wait for the selector to hear the learner
                        rtts.append(time.perf_counter() - t0)
        finally:
            stop.set()
            close(sock)
            proc.terminate()
            proc.wait(10)
            announcer.join()
            ctx.term()
    rtt = med(rtts) if rtts else float("nan")
    return [
        Result(
            "pacing",
            "work request -> grant round trip per engine call",
            rtt * 1e3,
            "ms",
            "median engine call of the default run (time/generate)",
            call_s * 1e3,
            rtt / call_s,
            "< 5% of a call",
            rtt / call_s < 0.05,
            ratio_means="round trip / call",
            notes=f"{len(rtts)} round trips to a selector process on loopback with capacity to spare",
        )
    ]


def run(quick: bool = False) -> list[Result]:
    rows, call_s = default_run(quick)
    return rows + exact_mode(quick) + heterogeneous(quick) + length(quick) + grant_round_trip(quick, call_s)


if __name__ == "__main__":
    print_results(run(quick="--quick" in sys.argv))
