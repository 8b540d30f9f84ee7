"""Start-up and shutdown of ``podsrl run``, side by side with the import floor.

    python -m bench startup          # 5 runs of each mode, interleaved (~3 min on 2 cores)

The default job (``configs/tiny.toml``, the built-in defaults: the tiny model and copy task, built in
a fresh run directory as on a new user's first run), ``run.steps=20``, with the fork server
(``run.fork_server=true``, the default: launcher/forkserver.py) and without it (every process its own
interpreter). Measured:
from the command to the first training step's record in ``metrics/learner.jsonl`` (the update is
done), and from the last step's record to the command's exit (every process gone). The floors, in
the same run: ``python -c "import torch, transformers"``, and the import of what a role actually
loads (``launcher/preload.py``: torch, transformers' model classes, the roles; torch's compiler and
DTensor come with them).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, Result
from launcher.cli import podsrl_command
from protocol.metrics import read_metrics

STEPS = 20


def import_time(code: str) -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    return time.monotonic() - t0


def one_run(fork: bool) -> tuple[float, float]:
    """(command to first step, last step to exit) of one default run, in seconds."""
    with tempfile.TemporaryDirectory(prefix="podsrl-bench-startup-") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = podsrl_command(run_dir, [f"run.steps={STEPS}", f"run.fork_server={str(fork).lower()}"])
        t0 = time.time()
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        t_end = time.time()
        if res.returncode != 0:
            raise RuntimeError(f"podsrl run failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        steps = read_metrics(run_dir / "metrics/learner.jsonl")
    return steps[0]["time"] - t0, t_end - steps[-1]["time"]


def run(quick: bool = False) -> list[Result]:
    repeats = 1 if quick else 5
    floor = [import_time("import torch, transformers") for _ in range(repeats)]
    stack = [import_time("import launcher.preload") for _ in range(repeats)]
    forked, plain = [], []
    for _ in range(repeats):  # interleaved: the machine's noise falls on both modes alike
        forked.append(one_run(True))
        plain.append(one_run(False))
    med = statistics.median
    f_up, f_down = med(s for s, _ in forked), med(d for _, d in forked)
    p_up, p_down = med(s for s, _ in plain), med(d for _, d in plain)
    fl, st = med(floor), med(stack)
    note = (
        f"median of {repeats}; per run (fork server) start {[round(s, 2) for s, _ in forked]}, plain "
        f"{[round(s, 2) for s, _ in plain]}; floors: import torch+transformers {fl:.2f} s, the roles' "
        f"import (launcher/preload.py) {st:.2f} s"
    )
    return [
        Result(
            "startup",
            "podsrl run: command to first step (fork server)",
            f_up,
            "s",
            'python -c "import torch, transformers"',
            fl,
            f_up / fl,
            "<= 3 s",
            f_up <= 3.0,
            notes=note,
        ),
        Result(
            "startup",
            "podsrl run: command to first step, fork server vs plain processes",
            f_up,
            "s",
            "run.fork_server=false",
            p_up,
            f_up / p_up,
            "< 1x",
            f_up < p_up,
        ),
        Result(
            "startup",
            "podsrl run: last step to exit (fork server)",
            f_down,
            "s",
            "run.fork_server=false",
            p_down,
            f_down / p_down,
            "<= 1 s",
            f_down <= 1.0,
            notes=f"per run {[round(d, 2) for _, d in forked]}, plain {[round(d, 2) for _, d in plain]}",
        ),
        Result(
            "startup",
            "the roles' import (launcher/preload.py), the fork server's own start-up",
            st,
            "s",
            'python -c "import torch, transformers"',
            fl,
            st / fl,
            "-",
            None,
        ),
    ]
