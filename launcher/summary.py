"""What a sweep measured: per-run numbers from the metrics files, and the per-configuration table.

    podsrl sweep --summarize runs/sweeps/staleness      # writes summary.md and summary.csv there

A sweep directory holds ``<config>/seed<k>/`` run directories (``podsrl sweep`` makes them; runs
made elsewhere from ``--print-commands`` and copied back work the same). Wall-clock is measured from
the arrival of the learner's first batch, so process start-up, model building and the first
generation, the same for every configuration, are excluded. docs/STALENESS.md explains each column.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from launcher.accounting import account
from launcher.stats import (
    Estimate,
    Reach,
    ReachSummary,
    iqm_ci,
    probability_of_improvement_ci,
    summarize_reach,
    time_to_threshold,
)
from protocol.metrics import read_metrics

# launcher.sweep writes STARTED when it starts a run and DONE only after the run succeeded.
STARTED, DONE = "sweep-run.json", "sweep-done.json"
IGNORED = ("run.dir", "run.seed", "net.")  # differ between runs without making a configuration


@dataclass
class Run:
    dir: Path
    config: str
    seed: int
    values: dict[str, Any]  # the resolved config, flattened to dotted keys
    complete: bool  # the sweep's marker is there
    records: list[dict[str, Any]]  # learner.jsonl
    step: np.ndarray
    seconds: np.ndarray  # since the first batch arrived at the learner
    reward: np.ndarray  # reward/mean over all n completions of each step's groups
    final_reward: float  # mean reward/mean over the last 10% of steps
    samples_per_s: float  # rows trained / wall-clock
    idle_frac: float  # learner time waiting for batches / wall-clock
    staleness_mean: float
    staleness_max: float
    dropped_frac: float  # groups dropped as too stale / groups received by the selector
    waste: float  # generated groups never trained / generated (launcher/accounting.py)
    slowest_share: float | None  # the lowest share ratio of any rollout server (1.0: trained in proportion)
    weight_sync_s: float | None  # mean rollout/weights_load_s, every load after the first
    staleness_hist: np.ndarray  # trained rows per staleness 0..max


def parse_thresholds(text: str) -> list[float]:
    """``"0.6,0.8"`` -> [0.6, 0.8] (the --thresholds option of sweep and plot)."""
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--thresholds takes rewards separated by commas, e.g. 0.6,0.8; got {text!r}") from None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _col(records: list[dict[str, Any]], key: str, default: float = 0.0) -> np.ndarray:
    return np.array([default if r.get(key) is None else float(r[key]) for r in records])


def load_run(run_dir: Path, config: str | None = None, seed: int | None = None) -> Run:
    path = run_dir / "metrics" / "learner.jsonl"
    records = read_metrics(path) if path.exists() else []
    if not records:
        raise ValueError(f"{run_dir} has no learner steps ({path} missing or empty): did the run start?")
    conf = run_dir / "config.toml"
    values = flatten(tomllib.loads(conf.read_text())) if conf.exists() else {}
    time_ = _col(records, "time")
    first = records[0]
    # Origin: the first batch's arrival (its step time minus its wait), i.e. start-up excluded.
    t0 = time_[0] - (float(first.get("time/step") or 0.0) - float(first.get("time/wait_for_batch") or 0.0))
    wall = max(float(time_[-1] - t0), 1e-9)
    reward = _col(records, "reward/mean")
    k = max(1, len(reward) // 10)
    top = max(
        (int(key.rsplit("_", 1)[1]) for r in records for key in r if key.startswith("staleness/hist_")), default=-1
    )
    hist = np.array([_col(records, f"staleness/hist_{i}").sum() for i in range(top + 1)])
    rows = _col(records, "train/samples")
    stal = _col(records, "staleness/mean")
    received, dropped = _col(records, "groups/received").sum(), _col(records, "staleness/dropped").sum()
    acc = account(run_dir)
    shares = [r for name in acc.servers if (r := acc.share_ratio(name)) is not None]
    loads = [
        x
        for p in sorted((run_dir / "metrics").glob("rollout-*.jsonl"))  # each server's first load
        for x in [
            float(m["rollout/weights_load_s"])
            for m in read_metrics(p)  # waits for the learner
            if m.get("rollout/weights_load_s") is not None
        ][1:]
    ]
    return Run(
        dir=run_dir,
        config=config or run_dir.name,
        seed=int(values.get("run.seed", 0) if seed is None else seed),
        values=values,
        complete=(run_dir / DONE).exists(),
        records=records,
        step=_col(records, "step"),
        seconds=time_ - t0,
        reward=reward,
        final_reward=float(reward[-k:].mean()),
        samples_per_s=float(rows.sum() / wall),
        idle_frac=float(_col(records, "time/wait_for_batch")[1:].sum() / wall),
        # row-weighted: a step's mean staleness counts with the rows it trained
        staleness_mean=float((stal * rows).sum() / rows.sum()) if rows.sum() else float(stal.mean()),
        staleness_max=float(_col(records, "staleness/max").max()),
        dropped_frac=float(dropped / received) if received else 0.0,
        waste=acc.waste,
        slowest_share=min(shares, default=None),
        weight_sync_s=float(np.mean(loads)) if loads else None,
        staleness_hist=hist,
    )


def is_run_dir(path: Path) -> bool:
    learner = path / "metrics" / "learner.jsonl"
    return learner.exists() and learner.stat().st_size > 0


def counted(path: Path) -> bool:
    """A run the table counts: finished (the sweep's marker), or made elsewhere (no sweep marker at all).
    A run this sweep started that failed or was interrupted is left out and listed by :func:`unfinished`."""
    return is_run_dir(path) and ((path / DONE).exists() or not (path / STARTED).exists())


def unfinished(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).glob("*/seed*") if p.is_dir() and not counted(p))


def manifest(root: Path) -> dict[str, Any]:
    path = root / "sweep.json"
    return json.loads(path.read_text()) if path.exists() else {}


def find_runs(root: Path) -> dict[str, list[Run]]:
    """Configurations (in the sweep's order, else sorted by their values) -> their runs by seed."""
    root = Path(root)
    if is_run_dir(root):
        return {root.name: [load_run(root)]}
    found: dict[str, list[Run]] = {}
    for conf in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        seeds = sorted((p for p in conf.glob("seed*") if counted(p)), key=lambda p: int(p.name[4:] or 0))
        if seeds:
            found[conf.name] = [load_run(p, conf.name, int(p.name[4:] or 0)) for p in seeds]
    if not found:
        raise ValueError(
            f"{root} holds no runs: expected <config>/seed<k>/metrics/learner.jsonl (a podsrl sweep "
            "--out directory) or metrics/learner.jsonl (one run directory)"
        )
    order = manifest(root).get("configs", [])
    keys = varying_keys(found)
    rank = {name: i for i, name in enumerate(order)}
    return dict(sorted(found.items(), key=lambda kv: (rank.get(kv[0], len(rank)), _sort_key(kv[1][0], keys))))


def _sort_key(run: Run, keys: list[str]) -> tuple:
    return tuple(
        (0, v, "") if isinstance(v, int | float) else (1, 0, str(v)) for v in (run.values.get(k) for k in keys)
    )


def varying_keys(runs: dict[str, list[Run]]) -> list[str]:
    """Config keys whose value differs between configurations (run.dir, run.seed and ports excepted)."""
    firsts = [rs[0].values for rs in runs.values()]
    keys = sorted({k for v in firsts for k in v})
    return [k for k in keys if not k.startswith(IGNORED) and len({json.dumps(v.get(k)) for v in firsts}) > 1]


@dataclass
class Row:
    config: str
    values: dict[str, Any]
    runs: list[Run]
    final: Estimate
    poi: Estimate | None  # P(final reward > the reference configuration's)
    reach: dict[float, ReachSummary]

    def mean(self, attr: str) -> float | None:
        xs = [getattr(r, attr) for r in self.runs if getattr(r, attr) is not None]
        return float(np.mean(xs)) if xs else None


def reaches(run: Run, threshold: float, window: int) -> Reach:
    return time_to_threshold(run.step, run.seconds, run.reward, threshold, window)


def table(
    runs: dict[str, list[Run]], thresholds: list[float], window: int, reference: str | None = None, reps: int = 2000
) -> list[Row]:
    keys = varying_keys(runs)
    ref = reference or next(iter(runs))
    if ref not in runs:
        raise ValueError(f"reference configuration {ref!r} is not one of: {', '.join(runs)}")
    ref_scores = [r.final_reward for r in runs[ref]]
    rows = []
    for name, rs in runs.items():
        scores = [r.final_reward for r in rs]
        poi = None if name == ref else probability_of_improvement_ci(scores, ref_scores, reps=reps)
        rows.append(
            Row(
                name,
                {k: rs[0].values.get(k) for k in keys},
                rs,
                iqm_ci(scores, reps=reps),
                poi,
                {t: summarize_reach([reaches(r, t, window) for r in rs], reps=reps) for t in thresholds},
            )
        )
    return rows


def _blank(x: float | None) -> float | str:
    return "" if x is None else x


def _f(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(rows: list[Row], thresholds: list[float], window: int, reference: str) -> str:
    head = ["config", "seeds", "final reward IQM [95% CI]", f"P(> {reference})"]
    for t in thresholds:
        head += [f"reached {t:g}", f"s to {t:g}", f"steps to {t:g}"]
    head += [
        "samples/s",
        "learner idle",
        "staleness mean",
        "staleness max",
        "dropped stale",
        "waste",
        "lowest share ratio",
        "weight sync ms",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        sync = row.mean("weight_sync_s")
        cells = [f"`{row.config}`", str(len(row.runs)), row.final.fmt(), "—" if row.poi is None else row.poi.fmt(2)]
        for t in thresholds:
            r = row.reach[t]
            cells += [f"{r.reached}/{r.runs}", r.fmt("seconds", 1), r.fmt("steps", 0)]
        cells += [
            _f(row.mean("samples_per_s"), 0),
            _f(row.mean("idle_frac"), 2),
            _f(row.mean("staleness_mean"), 2),
            _f(max(r.staleness_max for r in row.runs), 0),
            _f(row.mean("dropped_frac"), 3),
            _f(row.mean("waste"), 3),
            _f(row.mean("slowest_share"), 2),
            _f(None if sync is None else 1e3 * sync, 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"Final reward: mean `reward/mean` over the last 10% of steps; IQM across seeds, 95% stratified bootstrap "
        f"CI. P(> {reference}): probability that a run of the row beats a run of `{reference}` on final reward "
        "(ties count half), with its bootstrap CI.",
        f"Time to a threshold: first step at which the mean reward of the last {window} steps reaches it; seconds "
        "from the learner's first batch. `k/S` seeds reached it; a seed that never did counts at its run's length "
        "and the IQM [CI] is then marked `>=` (a lower bound); `never` when no seed did.",
        "samples/s: rows trained per second; learner idle: time waiting for batches / wall-clock; staleness: "
        "row-weighted mean and max of trained rows; dropped stale: groups dropped as too stale / groups received; "
        "waste: generated groups never trained / generated; lowest share ratio: the rollout server whose work was "
        "trained least in proportion to what it made (its share of trained / of generated groups, docs/METRICS.md); "
        "weight sync: mean `rollout/weights_load_s` after the first load. Means across seeds (max for staleness max).",
    ]
    elsewhere = [f"`{r.dir}`" for row in rows for r in row.runs if not r.complete]
    if elsewhere:
        notes.append(f"Included without a sweep completion marker (made elsewhere): {', '.join(elsewhere)}.")
    return "\n".join(lines + notes) + "\n"


def csv_text(rows: list[Row], thresholds: list[float]) -> str:
    keys = list(rows[0].values) if rows else []
    head = [
        "config",
        *keys,
        "seeds",
        "final_reward_iqm",
        "final_reward_lo",
        "final_reward_hi",
        "poi_vs_reference",
        "poi_lo",
        "poi_hi",
    ]
    for t in thresholds:
        head += [
            f"reached_{t:g}",
            f"runs_{t:g}",
            f"censored_{t:g}",
            f"seconds_to_{t:g}_iqm",
            f"seconds_to_{t:g}_lo",
            f"seconds_to_{t:g}_hi",
            f"steps_to_{t:g}_iqm",
            f"steps_to_{t:g}_lo",
            f"steps_to_{t:g}_hi",
        ]
    head += [
        "samples_per_s",
        "idle_frac",
        "staleness_mean",
        "staleness_max",
        "dropped_frac",
        "waste",
        "lowest_share_ratio",
        "weight_sync_s",
    ]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    for row in rows:
        poi = [row.poi.value, row.poi.lo, row.poi.hi] if row.poi else ["", "", ""]
        cells: list[Any] = [
            row.config,
            *(row.values[k] for k in keys),
            len(row.runs),
            row.final.value,
            row.final.lo,
            row.final.hi,
            *poi,
        ]
        for t in thresholds:
            r = row.reach[t]
            cells += [
                r.reached,
                r.runs,
                r.censored,
                r.seconds.value,
                r.seconds.lo,
                r.seconds.hi,
                r.steps.value,
                r.steps.lo,
                r.steps.hi,
            ]
        sync = row.mean("weight_sync_s")
        cells += [
            row.mean("samples_per_s"),
            row.mean("idle_frac"),
            row.mean("staleness_mean"),
            max(r.staleness_max for r in row.runs),
            row.mean("dropped_frac"),
            row.mean("waste"),
            _blank(row.mean("slowest_share")),
            "" if sync is None else sync,
        ]
        w.writerow(cells)
    return buf.getvalue()


def write_summary(
    root: Path, thresholds: list[float] | None = None, window: int | None = None, reference: str | None = None
) -> str:
    """Write ``<root>/summary.md`` and ``summary.csv``; thresholds and window default to the sweep's own."""
    m = manifest(root)
    thresholds = list(thresholds or m.get("thresholds") or [0.6, 0.8])
    window = int(window or m.get("window") or 10)
    runs = find_runs(root)
    rows = table(runs, thresholds, window, reference)
    ref = reference or rows[0].config
    md = markdown(rows, thresholds, window, ref)
    left_out = unfinished(root)
    if left_out:
        md += (
            f"Left out, started by the sweep but not finished (failed or interrupted): "
            f"{', '.join(f'`{p}`' for p in left_out)}.\n"
        )
    title = f"# Sweep summary: {root}\n\n" + (f"Made by `{m['command']}`.\n\n" if m.get("command") else "")
    (root / "summary.md").write_text(title + md)
    (root / "summary.csv").write_text(csv_text(rows, thresholds))
    return md + f"\n(written to {root / 'summary.md'} and {root / 'summary.csv'})"
