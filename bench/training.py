"""Whole-pipeline benchmarks (goals 6 and 7): real `podsrl run` jobs, several seeds, wall-clock.

Layout, the same for every job so the comparison is fair on a 2-core machine: one learner rank
with 1 torch thread, one rollout server with 1 thread, the selector (a light event loop). Times are
measured from the learner's first batch request (start-up excluded, it is the same for all jobs).

6. async vs sync: ``max_staleness=2`` vs ``0`` (the synchronous baseline, same code path):
   wall-clock to a smoothed reward threshold, and the learner's idle fraction (time waiting for
   batches / training time).
7. PODS vs GRPO at equal wall-clock: n=16 -> m=4 max-variance vs GRPO n=4 and GRPO n=16 (all
   kept), each for the same time budget; how much sooner PODS reaches GRPO's best reward.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT, Result, print_results
from launcher.cli import podsrl_command
from protocol.metrics import read_metrics

LAYOUT = [
    "rollout.servers=1",
    "rollout.threads=1",
    "learner.nproc=1",
    "learner.threads=1",
    "learner.checkpoint_every=0",
]


@dataclass
class Curve:
    times: list[float]  # seconds since the learner's first batch request
    rewards: list[float]  # reward/mean, smoothed over `window` steps
    idle_frac: float
    peak_rss: dict[str, float]
    selector_rss: list[float]
    train_s: float  # median learner compute per step
    gen_s: float  # rollout time to produce one step's groups

    def time_to(self, threshold: float) -> float:
        return next((t for t, r in zip(self.times, self.rewards, strict=True) if r >= threshold), float("inf"))


def run_job(overrides: list[str], port_base: int, window: int = 10) -> Curve:
    with tempfile.TemporaryDirectory(prefix="podsrl-bench-") as tmp:
        ports = [f"net.{k}_port={port_base + i}" for i, k in enumerate(("group", "batch", "announce", "weights"))]
        cmd = podsrl_command(Path(tmp) / "run", [*LAYOUT, *ports, *overrides])
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            raise RuntimeError(f"job {overrides} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        steps = read_metrics(Path(tmp) / "run/metrics/learner.jsonl")
        launcher = read_metrics(Path(tmp) / "run/metrics/launcher.jsonl")
        rollout = [
            m for m in read_metrics(Path(tmp) / "run/metrics/rollout-rollout-0.jsonl") if "rollout/groups_sent" in m
        ]
    t0 = steps[0]["time"] - steps[0]["time/step"]
    raw = [m["reward/mean"] for m in steps]
    smooth = [statistics.fmean(raw[max(0, i - window + 1) : i + 1]) for i in range(len(raw))]
    busy = steps[-1]["time"] - t0
    idle = sum(m["time/wait_for_batch"] for m in steps) / busy
    peak = {k.removeprefix("peak_rss_mib/"): v for k, v in launcher[-1].items() if k.startswith("peak_rss_mib/")}
    sel = [m["rss_mib/selector"] for m in launcher[:-1] if "rss_mib/selector" in m]
    groups_per_s = (rollout[-1]["rollout/groups_sent"] - rollout[0]["rollout/groups_sent"]) / max(
        1e-9, rollout[-1]["time"] - rollout[0]["time"]
    )
    per_step = next(
        int(o.split("=")[1])
        for o in [*overrides, "learner.groups_per_step=8"]
        if o.startswith("learner.groups_per_step=")
    )
    return Curve(
        [m["time"] - t0 for m in steps],
        smooth,
        idle,
        peak,
        sel,
        statistics.median(m["time/train"] for m in steps),
        per_step / groups_per_s,
    )


def async_vs_sync(quick: bool = False) -> list[Result]:
    seeds = [0] if quick else [0, 1, 2]
    threshold = 0.2 if quick else 0.6
    budget = ["run.steps=40"] if quick else ["run.steps=3000", "run.max_seconds=90"]
    curves: dict[int, list[Curve]] = {0: [], 2: []}
    for seed in seeds:
        for k in (2, 0):  # interleaved so drift in machine load hits both alike
            curves[k].append(run_job([f"max_staleness={k}", f"run.seed={seed}", *budget], 17000 + 10 * k))
    t = {k: statistics.median(c.time_to(threshold) for c in cs) for k, cs in curves.items()}
    idle = {k: statistics.median(c.idle_frac for c in cs) for k, cs in curves.items()}
    speedup = t[0] / t[2] if t[2] not in (0, float("inf")) else None
    peak = {
        name: max(c.peak_rss.get(name, 0) for cs in curves.values() for c in cs)
        for name in ("selector", "learner", "rollout-0")
    }
    sel = curves[2][0].selector_rss
    g = statistics.median(c.gen_s for c in curves[0])
    tr = statistics.median(c.train_s for c in curves[0])
    notes = (
        f"per step: generation {g * 1e3:.0f} ms, training {tr * 1e3:.0f} ms, so overlapping them can speed "
        f"up wall-clock per step by at most (g+t)/max(g,t) = {(g + tr) / max(g, tr):.2f}x; "
        f"median over seeds {seeds}; time to smoothed reward >= {threshold}: K=2 {t[2]:.1f}s, K=0 {t[0]:.1f}s; "
        f"learner idle K=2 {idle[2]:.0%}, K=0 {idle[0]:.0%}; peak RSS MiB {peak}; selector RSS first/last "
        f"sample {sel[0] if sel else 0:.0f}/{sel[-1] if sel else 0:.0f} MiB"
    )
    return [
        Result(
            "training",
            f"async K=2 vs sync K=0: wall-clock to reward {threshold}",
            t[2],
            "s",
            "synchronous K=0, same code path",
            t[0],
            speedup,
            ">= 1.5x faster",
            None if speedup is None else speedup >= 1.5,
            ratio_means="time(K=0) / time(K=2)",
            notes=notes,
            extra={"time_to_threshold": t, "idle_frac": idle, "peak_rss_mib": peak},
        ),
        Result(
            "training",
            "learner idle fraction, async K=2",
            idle[2],
            "fraction",
            "sync K=0",
            idle[0],
            None,
            "< 10% idle",
            idle[2] < 0.10,
            ratio_means="-",
            notes="time waiting for batches / training time",
        ),
    ]


def pods_vs_grpo(quick: bool = False) -> list[Result]:
    seeds = [0] if quick else [0, 1, 2]
    budget = ["run.steps=30"] if quick else ["run.steps=5000", "run.max_seconds=60"]
    configs = {
        "PODS n=16->m=4": ["rollout.group_size=16", "selector.rule=max_variance", "selector.keep=4"],
        "GRPO n=4": ["rollout.group_size=4", "selector.rule=all"],
        "GRPO n=16": ["rollout.group_size=16", "selector.rule=all"],
    }
    curves: dict[str, list[Curve]] = {k: [] for k in configs}
    for seed in seeds:
        for i, (name, over) in enumerate(configs.items()):
            curves[name].append(run_job([*over, f"run.seed={seed}", "max_staleness=2", *budget], 18000 + 10 * i))
    best = {name: statistics.median(max(c.rewards) for c in cs) for name, cs in curves.items()}
    grpo = max(("GRPO n=4", "GRPO n=16"), key=lambda n: best[n])
    target = 0.95 * best[grpo]  # 95% of the peak, so one lucky smoothed step does not set the bar
    t = {name: statistics.median(c.time_to(target) for c in cs) for name, cs in curves.items()}
    pods = "PODS n=16->m=4"
    speedup = t[grpo] / t[pods] if t[pods] not in (0, float("inf")) else None
    notes = (
        f"median over seeds {seeds}; equal budget {budget[-1]}; best smoothed reward "
        + ", ".join(f"{k} {v:.3f}" for k, v in best.items())
        + f"; time to {target:.3f} (95% of {grpo}'s best): "
        + ", ".join(f"{k} {v:.1f}s" for k, v in t.items())
    )
    return [
        Result(
            "training",
            f"PODS vs {grpo}: wall-clock to GRPO's best reward",
            t[pods],
            "s",
            grpo,
            t[grpo],
            speedup,
            ">= 1.5x sooner",
            None if speedup is None else speedup >= 1.5,
            ratio_means=f"time({grpo}) / time(PODS)",
            notes=notes,
            extra={"best": best, "time": t},
        )
    ]


def run(quick: bool = False) -> list[Result]:
    return async_vs_sync(quick) + pods_vs_grpo(quick)


if __name__ == "__main__":
    print_results(run(quick="--quick" in sys.argv))
