"""``podsrl sweep``: a grid of configurations x seeds, each a whole ``podsrl run`` in its own directory.

    podsrl sweep --grid configs/sweeps/staleness.toml                 # every run, one after another
    podsrl sweep --grid configs/sweeps/staleness.toml --parallel 2 run.steps=100
    podsrl sweep --axis max_staleness=0,2,8 --axis learner.lr=1e-3,3e-3 --seeds 3 --out runs/lr-k
    podsrl sweep --config configs/add2.toml --seeds 10 --out runs/add2-seeds            # one config, its seeds
    podsrl sweep --grid configs/sweeps/staleness.toml --print-commands   # to run them elsewhere
    podsrl sweep --summarize runs/sweeps/staleness                     # rebuild summary.md / .csv

A grid file is TOML: ``config`` (the base run file), ``seeds`` (a count or a list), ``thresholds``
and ``window`` (for time to threshold), ``[base]`` overrides for every run and ``[grid]`` axes, each a
config key with a list of values; dotted keys are quoted (``"learner.loss.type" = ["grpo_is", "m2po"]``)
or written as tables. Any config key can be an axis (docs/CONFIG.md). Run ``<out>/<config>/seed<k>``
gets ``run.seed=k``. A marker (``sweep-done.json``) is written only after a run succeeds, and a
sweep started again skips every run that has one (a run interrupted half-way starts afresh).
After the runs, ``<out>/summary.md`` and ``summary.csv`` hold the table (launcher/summary.py).
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel

from launcher.ports import PORT_KEYS, free_ports
from launcher.summary import DONE, STARTED, flatten, load_run, parse_thresholds, write_summary
from protocol.config import Config, _toml_value, load_config, parse_override, read_toml, to_toml

# How a run is executed here; printed command lines use ``podsrl run`` instead. Tests swap in a fake.
RUNNER = [sys.executable, "-m", "launcher.cli"]
GRID_KEYS = {"config", "seeds", "thresholds", "window", "out", "base", "grid"}
OWNED = {"run.dir": "--out", "run.seed": "--seeds"}
DEFAULT_THRESHOLDS = (0.6, 0.8)


class SweepError(ValueError):
    """A grid or sweep that cannot run as given; the message names the fix."""


@dataclass
class Grid:
    config: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    thresholds: list[float] = field(default_factory=lambda: list(DEFAULT_THRESHOLDS))
    window: int = 10
    out: str = ""
    base: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, list[Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSpec:
    index: int  # 1-based position in the whole plan
    name: str  # the configuration, e.g. "max_staleness=2,loss.type=grpo_is"
    seed: int
    dir: Path
    overrides: tuple[str, ...]  # everything but run.dir, run.seed and ports


def config_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted config key (``learner.loss.type``, ...)."""
    keys = []
    for name, f in model.model_fields.items():
        if isinstance(f.default, BaseModel):
            keys += config_keys(type(f.default), f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def check_key(key: str, where: str) -> None:
    keys = config_keys()
    if key in OWNED:
        raise SweepError(f"{where} {key!r}: the sweep sets {key} itself; use {OWNED[key]} instead")
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise SweepError(
            f"{where} {key!r} is not a config key{hint}. Every key is listed in docs/CONFIG.md "
            "(or: podsrl config --reference)."
        )


def _seeds(value: Any) -> list[int]:
    if isinstance(value, bool) or not (
        isinstance(value, int)
        or (isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value))
    ):
        raise SweepError(f"seeds must be a count (seeds = 5) or a list of integers (seeds = [0, 3]), got {value!r}")
    seeds = list(range(value)) if isinstance(value, int) else list(value)
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SweepError(f"seeds must give at least one distinct non-negative seed, got {value!r}")
    return seeds


def load_grid(path: str | Path) -> Grid:
    """Read a grid file (see the module docstring); every key is checked against the config schema."""
    try:
        data = read_toml(path, "grid file", " (example: configs/sweeps/staleness.toml)")
    except ValueError as e:
        raise SweepError(str(e)) from None
    unknown = sorted(set(data) - GRID_KEYS)
    if unknown:
        raise SweepError(
            f"grid file {path}: unknown top-level key(s) {', '.join(unknown)}; a grid file has "
            f"{', '.join(sorted(GRID_KEYS))} (put config keys under [base] or [grid])"
        )
    grid = Grid(
        config=data.get("config"),
        out=str(data.get("out", "")),
        base=flatten(data.get("base", {})),
        window=int(data.get("window", 10)),
    )
    if "seeds" in data:
        grid.seeds = _seeds(data["seeds"])
    if "thresholds" in data:
        grid.thresholds = [float(t) for t in data["thresholds"]]
    for key, values in flatten(data.get("grid", {})).items():
        if not isinstance(values, list) or not values:
            raise SweepError(
                f"grid file {path}: [grid] {key} must be a non-empty list of values, "
                f"e.g. {key} = [0, 2], got {values!r}"
            )
        grid.axes[key] = values
    return grid


def parse_axis(item: str) -> tuple[str, list[Any]]:
    """``--axis key=v1,v2`` -> (key, [v1, v2]), each value read as TOML (else a string)."""
    key, sep, raw = item.partition("=")
    if not sep or not key or not raw:
        raise SweepError(f"--axis {item!r} is not key=v1,v2,... (e.g. --axis max_staleness=0,2,8)")
    return key.strip(), [parse_override(f"v={v.strip()}")[1] for v in raw.split(",")]


def override(key: str, value: Any) -> str:
    """``key=value`` as the command line reads it back (strings bare where TOML would not take them)."""
    if isinstance(value, str) and parse_override(f"v={value}")[1] == value and value.strip() == value and value:
        return f"{key}={value}"
    return f"{key}={_toml_value(value)}"


def short_names(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key, at least two parts, unique among ``keys``."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(min(2, len(parts)), len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if sum(k == suffix or k.endswith("." + suffix) for k in keys) == 1:
                out[key] = suffix
                break
        else:
            out[key] = key
    return out


def config_name(values: dict[str, Any], names: dict[str, str]) -> str:
    if not values:
        return "base"
    text = ",".join(override(names[k], v) for k, v in values.items())
    return "".join(c if c.isalnum() or c in "=,.-_+" else "_" for c in text)


def plan(grid: Grid, out: Path, overrides: list[str]) -> list[RunSpec]:
    """Check every key, then the cartesian product of the axes x seeds, seed-major: seed k of every
    configuration runs before any seed k+1, so drift in the machine's load over a sweep falls on every
    configuration alike instead of on whichever ran last."""
    for key in grid.axes:
        check_key(key, "grid axis")
    for key in grid.base:
        check_key(key, "[base] key")
    for item in overrides:
        key = item.partition("=")[0].strip()
        check_key(key, "override")
        if key in grid.axes:
            raise SweepError(f"{key} is both a grid axis and an override: drop one of them")
    base = [override(k, v) for k, v in grid.base.items() if k not in grid.axes] + list(overrides)
    names = short_names(list(grid.axes))
    configs: dict[str, tuple[str, ...]] = {}
    for combo in itertools.product(*grid.axes.values()):
        values = dict(zip(grid.axes, combo, strict=True))
        name = config_name(values, names)
        if name in configs:
            raise SweepError(f"two configurations share the directory name {name!r}: give distinct values")
        configs[name] = (*base, *(override(k, v) for k, v in values.items()))
    specs: list[RunSpec] = []
    for seed in grid.seeds:
        for name, run_overrides in configs.items():
            specs.append(RunSpec(len(specs) + 1, name, seed, out / name / f"seed{seed}", run_overrides))
    return specs


def resolve(grid: Grid, spec: RunSpec) -> Config:
    try:
        return load_config(grid.config, [*spec.overrides, f"run.seed={spec.seed}", f"run.dir={spec.dir}"])
    except ValueError as e:
        raise SweepError(f"configuration {spec.name}: {e}") from None


def port_overrides(spec: RunSpec, port_base: int | None) -> list[str]:
    """Run i's ports: PORT+4i..PORT+4i+3 with ``--port-base``, else free ones (reserved: the next run
    starts before this one binds them), whatever its config says, so parallel runs never share one."""
    ports = [port_base + 4 * (spec.index - 1) + i for i in range(4)] if port_base else free_ports(4, reserve=True)
    return [f"net.{key}={p}" for key, p in zip(PORT_KEYS, ports, strict=True)]


def run_args(grid: Grid, spec: RunSpec, ports: list[str]) -> list[str]:
    """The arguments after ``podsrl``: ``run [--config F] overrides... run.seed=k run.dir=D [ports]``."""
    conf = ["--config", grid.config] if grid.config else []
    return ["run", *conf, *spec.overrides, f"run.seed={spec.seed}", f"run.dir={spec.dir}", *ports]


def print_commands(grid: Grid, specs: list[RunSpec], port_base: int | None) -> None:
    for spec in specs:
        ports = port_overrides(spec, port_base) if port_base else []
        print(shlex.join(["podsrl", *run_args(grid, spec, ports)]))


def fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclass
class Active:
    spec: RunSpec
    proc: subprocess.Popen
    log: IO[bytes]
    t0: float


def outcome(a: Active, rc: int) -> str:
    """What the progress line says about a run that ended."""
    if rc != 0:
        tail = (a.spec.dir / "sweep.log").read_text(errors="replace").splitlines()[-8:]
        return f"FAILED (status {rc}); last lines of {a.spec.dir / 'sweep.log'}:\n" + "\n".join(
            f"    {line}" for line in tail
        )
    try:
        return f"final reward {load_run(a.spec.dir).final_reward:.3f}"
    except ValueError as e:
        return str(e)


def settings(grid: Grid, spec: RunSpec) -> list[str]:
    return [f"--config={grid.config or ''}", *spec.overrides]


def finished(grid: Grid, spec: RunSpec) -> bool:
    """Finished earlier with the same settings; finished with other settings is an error, never reused."""
    if not (spec.dir / DONE).exists():
        return False
    started = spec.dir / STARTED
    recorded = json.loads(started.read_text()).get("settings") if started.exists() else None
    if recorded is not None and recorded != settings(grid, spec):
        raise SweepError(
            f"{spec.dir} finished with other settings ({' '.join(recorded)}); now: "
            f"{' '.join(settings(grid, spec))}. Choose another --out, or remove that directory."
        )
    return True


def start(grid: Grid, spec: RunSpec, port_base: int | None) -> Active:
    """Start one run in a fresh directory (a half-finished attempt of this sweep is removed) holding its
    resolved config and a record of the command that runs it."""
    if spec.dir.exists() and any(spec.dir.iterdir()):
        if not (spec.dir / STARTED).exists():
            raise SweepError(f"{spec.dir} exists and was not made by podsrl sweep: remove it or choose another --out")
        shutil.rmtree(spec.dir)
    spec.dir.mkdir(parents=True, exist_ok=True)
    (spec.dir / "config.toml").write_text(to_toml(resolve(grid, spec)))
    cmd = [*RUNNER, *run_args(grid, spec, port_overrides(spec, port_base))]
    (spec.dir / STARTED).write_text(
        json.dumps(
            {"config": spec.name, "seed": spec.seed, "settings": settings(grid, spec), "command": shlex.join(cmd)}
        )
        + "\n"
    )
    log = (spec.dir / "sweep.log").open("ab")
    # Its own session: a Ctrl-C reaches the sweep only, which stops each run through its launcher.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return Active(spec, proc, log, time.monotonic())


def execute(grid: Grid, specs: list[RunSpec], parallel: int, port_base: int | None) -> tuple[int, int, bool]:
    """Run every unfinished spec, ``parallel`` at a time; returns (succeeded, failed, interrupted)."""
    todo = deque(s for s in specs if not finished(grid, s))
    total, skipped = len(specs), len(specs) - len(todo)
    n_seeds = len(grid.seeds)
    print(
        f"podsrl sweep: {total} runs ({total // n_seeds} configurations x {n_seeds} seed{'s' * (n_seeds != 1)}); "
        f"{skipped} finished earlier (skipped); {len(todo)} to run, {parallel} at a time",
        flush=True,
    )
    active: list[Active] = []
    durations: list[float] = []
    ok = failed = 0
    t_start = time.monotonic()
    interrupted = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal interrupted
        interrupted = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while (todo or active) and not interrupted:
            while todo and len(active) < parallel:
                a = start(grid, todo.popleft(), port_base)
                active.append(a)
                print(
                    f"[{a.spec.index:>{len(str(total))}}/{total}] start {a.spec.name} seed{a.spec.seed} -> "
                    f"{a.spec.dir}",
                    flush=True,
                )
            time.sleep(0.2)
            for a in [a for a in active if a.proc.poll() is not None]:
                active.remove(a)
                a.log.close()
                took, rc = time.monotonic() - a.t0, a.proc.returncode
                if rc == 0:  # the marker is what makes a later sweep skip this run
                    (a.spec.dir / DONE).write_text(json.dumps({"seconds": took, "finished": time.time()}) + "\n")
                    ok += 1
                    durations.append(took)
                else:
                    failed += 1
                what = outcome(a, rc)
                mean = sum(durations) / len(durations) if durations else None
                left = len(todo) + len(active)
                eta = (
                    "unknown"
                    if mean is None
                    else fmt_s(
                        (mean * len(todo) + sum(max(0.0, mean - (time.monotonic() - x.t0)) for x in active)) / parallel
                    )
                )
                print(
                    f"[{a.spec.index:>{len(str(total))}}/{total}] done  {a.spec.name} seed{a.spec.seed} in "
                    f"{fmt_s(took)}: {what}  | {ok + skipped}/{total} finished, {failed} failed, {left} left, "
                    f"elapsed {fmt_s(time.monotonic() - t_start)}, ETA {eta}",
                    flush=True,
                )
    finally:
        for a in active:  # interrupted (or an error): each `podsrl run` stops its own processes on SIGTERM
            with contextlib.suppress(ProcessLookupError):
                a.proc.send_signal(signal.SIGTERM)
        for a in active:
            try:
                a.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(a.proc.pid, signal.SIGKILL)
                a.proc.wait()
            a.log.close()
        for s, h in old.items():
            signal.signal(s, h)
    return ok, failed, interrupted


def write_manifest(grid: Grid, specs: list[RunSpec], out: Path, argv: list[str]) -> None:
    """``<out>/sweep.json``: the grid, the configurations in order, thresholds and window, for --summarize."""
    names = list(dict.fromkeys(s.name for s in specs))
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(
        json.dumps(
            {
                "command": shlex.join(["podsrl", "sweep", *argv]),
                "config": grid.config,
                "base": grid.base,
                "axes": grid.axes,
                "seeds": grid.seeds,
                "configs": names,
                "thresholds": grid.thresholds,
                "window": grid.window,
            },
            indent=1,
        )
        + "\n"
    )


def build_grid(
    grid_file: str | None,
    config: str | None,
    axes: list[str],
    seeds: str | None,
    thresholds: str | None,
    window: int | None,
) -> Grid:
    grid = load_grid(grid_file) if grid_file else Grid()
    if config:
        grid.config = config
    for item in axes:
        key, values = parse_axis(item)
        grid.axes[key] = values
    if seeds is not None:
        grid.seeds = _seeds(parse_override(f"v={seeds}")[1])
    if thresholds:
        grid.thresholds = parse_thresholds(thresholds)
    if window is not None:
        grid.window = window
    if grid.window < 1:
        raise SweepError(f"window must be >= 1 step, got {grid.window}")
    return grid


def sweep(
    argv: list[str],
    grid: Grid,
    out: Path,
    overrides: list[str],
    parallel: int,
    port_base: int | None,
    print_only: bool,
    reference: str | None = None,
) -> int:
    """Plan, check, then print or run; summarise what finished. Exit status: 0 all runs succeeded,
    1 some failed, 130 interrupted."""
    if parallel < 1:
        raise SweepError(f"--parallel must be >= 1, got {parallel}")
    specs = plan(grid, out, overrides)
    for spec in {s.name: s for s in specs}.values():  # every configuration valid before anything starts
        resolve(grid, spec)
    if print_only:
        try:
            print_commands(grid, specs, port_base)
            sys.stdout.flush()
        except BrokenPipeError:  # `| head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    write_manifest(grid, specs, out, argv)
    ok, failed, interrupted = execute(grid, specs, parallel, port_base)
    if any((s.dir / DONE).exists() for s in specs):
        print(write_summary(out, grid.thresholds, grid.window, reference=reference), flush=True)
    if interrupted:
        print(
            "podsrl sweep: interrupted; runs in progress were stopped and will start afresh next time", file=sys.stderr
        )
        return 130
    if failed:
        print(
            f"podsrl sweep: {failed} run(s) failed (their sweep.log and logs/ say why); start the same sweep "
            "again to retry only the unfinished ones",
            file=sys.stderr,
        )
        return 1
    return 0
