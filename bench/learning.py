"""The learning suite (issue 20): every small CPU task x seeds, how often and how fast each learns.

    python -m bench learning                          # 4 tasks x 10 seeds (~40 min on 2 cores)
    python -m bench.learning --seeds 3 --tasks copy,add2
    python -m bench.learning --set learner.lr=3e-3 --out runs/learning-lr3e-3   # another setting, same suite
    python -m bench learning --quick                  # 1 seed x a few seconds per task (a smoke run)

Each task is a run file of ``configs/`` (its data made by its generator into the output directory), run
as ``podsrl sweep`` with ``run.max_seconds`` set per task (the clock ends each run, not a step count) and
one seed per run (``run.seed`` = 0..S-1). Per task it reports, from the sweep's own summary code
(``launcher/summary.py``, ``launcher/stats.py``):

- the fraction of seeds whose 10-step mean reward reaches the task's threshold (the goal: >= 9 of 10);
- seconds and updates to that threshold: IQM [95% CI] over seeds, a seed that never got there counted
  at its run's length, so the figure is then a lower bound (marked ``>=``);
- the final reward (mean over the last 10% of updates): IQM [95% CI].

Thresholds are where a run has learnt the skill, not a perfect score: copy 0.8 (the default job's own
goal, bench/pacing.py), arith 0.6, add2 0.4, countdown3 0.5 (about where the first runs of the new tasks
stood after a minute, docs/TASKS.md). The suite's runs stay in ``--out`` (default ``runs/learning``):
``podsrl sweep --summarize <out>/<task>`` and ``podsrl plot`` work on them as on any sweep.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT, Result, machine, print_results, save

WINDOW = 10  # updates in the reward mean that must reach the threshold


@dataclass(frozen=True)
class Task:
    config: str  # the run file under configs/
    threshold: float  # the 10-step mean reward that counts as learnt
    seconds: float  # run.max_seconds of each run (the clock ends it)
    data: tuple[str, ...] = ()  # the generator and its arguments; the file it writes is the task's dataset


TASKS = {
    "copy": Task("configs/tiny.toml", 0.8, 25.0),
    "arith": Task("configs/arith.toml", 0.6, 65.0, ("examples/arith/make_data.py", "{out}")),
    "add2": Task("configs/add2.toml", 0.4, 55.0, ("examples/add2/make_add2.py", "{out}")),
    "countdown3": Task("configs/countdown3.toml", 0.5, 65.0, ("examples/countdown3/make_countdown3.py", "{out}")),
}


def make_data(task: Task, out: Path) -> list[str]:
    """Run the task's generator into ``out``; the override that points the task at it."""
    if not task.data:
        return []
    path = out / "data.jsonl"
    args = [a.replace("{out}", str(path)) for a in task.data]
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, capture_output=True)
    return [f"task.dataset={path}"]


def sweep(name: str, task: Task, seeds: int, seconds: float, out: Path, overrides: list[str]) -> Path:
    """The task's runs, one seed each, as ``podsrl sweep``; its directory."""
    where = out / name
    data = make_data(task, where)
    cmd = [
        sys.executable,
        "-m",
        "launcher.cli",
        "sweep",
        "--config",
        task.config,
        "--seeds",
        str(seeds),
        "--out",
        str(where / "runs"),
        "--thresholds",
        str(task.threshold),
        "--window",
        str(WINDOW),
        "run.steps=1000000",
        f"run.max_seconds={seconds}",
        "learner.checkpoint_every=0",
        *data,
        *overrides,
    ]
    print(f"[learning] {name}: {seeds} seed(s) x {seconds:g} s: {' '.join(cmd[2:])}", flush=True)
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"the {name} sweep failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return where / "runs"


def summarize(name: str, task: Task, runs_dir: Path, overrides: list[str]) -> Result:
    """One row: the fraction of seeds that learnt, with time, updates and final reward in the notes."""
    from launcher.summary import find_runs, table

    rows = table(find_runs(runs_dir), [task.threshold], WINDOW)
    assert len(rows) == 1, f"{runs_dir} holds {len(rows)} configurations, the suite makes one per task"
    row = rows[0]
    reach = row.reach[task.threshold]
    fraction = reach.reached / reach.runs
    setting = f" ({' '.join(overrides)})" if overrides else " (defaults)"
    return Result(
        "learning",
        f"{name}: seeds whose {WINDOW}-update mean reward reaches {task.threshold:g}{setting}",
        fraction,
        "fraction of seeds",
        "the goal",
        0.9,
        None,
        ">= 9 of 10 seeds",
        fraction >= 0.9 if reach.runs >= 10 else None,
        notes=(
            f"{reach.reached}/{reach.runs} seeds, {task.config}, run.max_seconds per seed as in bench/learning.py; "
            f"seconds to {task.threshold:g}: {reach.fmt('seconds')}; updates: {reach.fmt('steps', 0)}; "
            f"final reward IQM {row.final.fmt()}"
        ),
        extra={
            "seeds": reach.runs,
            "reached": reach.reached,
            "seconds_iqm": reach.seconds.value,
            "steps_iqm": reach.steps.value,
            "censored": reach.censored,
            "final_iqm": row.final.value,
            "final_ci": [row.final.lo, row.final.hi],
            "runs": str(runs_dir),
        },
    )


def suite(tasks: list[str], seeds: int, out: Path, overrides: list[str], seconds: float | None = None) -> list[Result]:
    results = []
    for name in tasks:
        task = TASKS[name]
        results.append(
            summarize(name, task, sweep(name, task, seeds, seconds or task.seconds, out, overrides), overrides)
        )
        print_results(results[-1:])
    return results


def run(quick: bool = False) -> list[Result]:
    if quick:  # every task's path end to end, in seconds: not a figure to quote
        with tempfile.TemporaryDirectory(prefix="podsrl-bench-learning-") as tmp:
            return suite(list(TASKS), 1, Path(tmp), ["rollout.servers=1"], seconds=6.0)
    return suite(list(TASKS), 10, ROOT / "runs" / "learning", [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of: {', '.join(TASKS)}")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--out", default="runs/learning", help="where the runs stay")
    parser.add_argument("--fresh", action="store_true", help="delete --out first (else finished runs are kept)")
    args = parser.parse_args()
    unknown = [t for t in args.tasks.split(",") if t not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}: the suite has {', '.join(TASKS)}")
    out = (ROOT / args.out).resolve()
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    results = suite(args.tasks.split(","), args.seeds, out, args.set)
    print_results(results)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.learning " + " ".join(sys.argv[1:]),
        "seconds": time.time() - t0,
        "machine": machine(),
    }
    save(results, meta, out / "results.json")
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
