"""``podsrl plot``: figures, PNG and SVG, of a sweep directory or of one run directory.

    podsrl plot runs/sweeps/staleness          # -> runs/sweeps/staleness/plots/{reward,staleness,throughput,iqm}.*
    podsrl plot runs/tiny --out figs/          # one run -> figs/run.png, figs/run.svg

A sweep gets: reward against optimizer step and against wall-clock per configuration (mean across
seeds of the reward smoothed over ``window`` steps, with a 95% bootstrap band); the staleness
histogram of trained rows per configuration; throughput and learner idle fraction against K
(``max_staleness``); the IQM and 95% CI of the final reward and of the time to the first threshold.
One run gets reward, staleness, loss diagnostics and throughput over time. matplotlib (the ``plot``
extra) is imported only here, with the Agg backend: no display is needed.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from launcher.stats import Estimate, mean_band, smooth
from launcher.summary import Row, Run, find_runs, is_run_dir, load_run, manifest, table


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    fig.tight_layout()
    for p in paths:
        fig.savefig(p, dpi=130)
    _plt().close(fig)
    return paths


def plot(path: Path, out: Path, thresholds: list[float] | None = None, window: int | None = None) -> list[Path]:
    """Every figure of ``path`` (a sweep directory or one run directory) into ``out``; returns the files."""
    m = manifest(path)
    thresholds = list(thresholds or m.get("thresholds") or [0.6, 0.8])
    window = int(window or m.get("window") or 10)
    if is_run_dir(path):
        return plot_run(load_run(path), out, window)
    runs = find_runs(path)
    rows = table(runs, thresholds, window, reps=1000)
    return [
        *plot_reward(runs, out, window, thresholds),
        *plot_staleness(runs, out),
        *plot_throughput(rows, out),
        *plot_intervals(rows, out, thresholds),
    ]


def _curves(runs: list[Run], window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Smoothed reward per seed: against step (truncated to the shortest run) and against wall-clock
    (interpolated onto 200 points up to the shortest run's end)."""
    n = min(len(r.reward) for r in runs)
    steps = runs[0].step[:n]
    by_step = np.stack([smooth(r.reward, window)[:n] for r in runs])
    t_end = min(float(r.seconds[-1]) for r in runs)
    t = np.linspace(max(0.0, max(float(r.seconds[0]) for r in runs)), t_end, 200)
    by_time = np.stack([np.interp(t, r.seconds, smooth(r.reward, window)) for r in runs])
    return steps, by_step, t, by_time


def plot_reward(runs: dict[str, list[Run]], out: Path, window: int, thresholds: Iterable[float]) -> list[Path]:
    plt = _plt()
    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for i, (name, rs) in enumerate(runs.items()):
        steps, by_step, t, by_time = _curves(rs, window)
        color = f"C{i % 10}"
        for ax, x, ys in ((ax_s, steps, by_step), (ax_t, t, by_time)):
            mean, lo, hi = mean_band(ys)
            ax.plot(x, mean, color=color, label=f"{name} ({len(rs)} seeds)")
            ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)
    for ax in (ax_s, ax_t):
        for thr in thresholds:
            ax.axhline(thr, color="grey", linestyle=":", linewidth=0.8)
        ax.grid(alpha=0.3)
    ax_s.set(
        xlabel="optimizer step",
        ylabel=f"reward (mean of last {window} steps)",
        title="reward vs step (mean across seeds, 95% band)",
    )
    ax_t.set(xlabel="wall-clock seconds since the first batch", title="reward vs wall-clock")
    ax_s.legend(fontsize=7)
    return save(fig, out, "reward")


def plot_staleness(runs: dict[str, list[Run]], out: Path) -> list[Path]:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(runs) + 4), 4))
    size = max(len(r.staleness_hist) for rs in runs.values() for r in rs)
    hists = {
        name: sum((np.pad(r.staleness_hist, (0, size - len(r.staleness_hist))) for r in rs), np.zeros(size))
        for name, rs in runs.items()
    }
    top = max((int(np.nonzero(h)[0].max()) for h in hists.values() if h.any()), default=0)
    width = 0.8 / max(1, len(hists))
    ks = np.arange(top + 1)
    for i, (name, h) in enumerate(hists.items()):
        frac = h[: top + 1] / max(1.0, h.sum())
        ax.bar(ks + (i - (len(hists) - 1) / 2) * width, frac, width, label=name, color=f"C{i % 10}")
    ax.set(
        xlabel="staleness s = V - v of trained rows",
        ylabel="fraction of trained rows",
        xticks=ks,
        title="staleness histogram (all seeds)",
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return save(fig, out, "staleness")


def plot_throughput(rows: list[Row], out: Path) -> list[Path]:
    """Samples/s and learner idle fraction against K, one line per setting of the other axes; against
    the configuration when K is not an axis."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    has_k = "max_staleness" in (rows[0].values if rows else {})
    groups: dict[str, list[Row]] = {}
    for row in rows:
        rest = ",".join(f"{'.'.join(k.split('.')[-2:])}={v}" for k, v in row.values.items() if k != "max_staleness")
        groups.setdefault(rest if has_k else "", []).append(row)
    for ax, attr, label in (
        (axes[0], "samples_per_s", "samples/s (rows trained per second)"),
        (axes[1], "idle_frac", "learner idle fraction"),
    ):
        top = max(getattr(run, attr) for r in rows for run in r.runs)
        for i, (rest, rs) in enumerate(groups.items()):
            x = np.array([r.values["max_staleness"] for r in rs]) if has_k else np.arange(len(rs))
            per_seed = [[getattr(run, attr) for run in r.runs] for r in rs]
            y = np.array([np.mean(v) for v in per_seed])
            err = np.clip(np.array([[y[j] - min(v), max(v) - y[j]] for j, v in enumerate(per_seed)]).T, 0, None)
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=f"C{i % 10}", label=rest or None)
        if has_k:
            ax.set_xlabel("K = max_staleness")
            ax.set_xticks(sorted({r.values["max_staleness"] for r in rows}))
        else:
            ax.set_xticks(np.arange(len(rows)), [r.config for r in rows], rotation=30, ha="right", fontsize=7)
        ax.set(ylabel=label, title=f"{label.split(' (')[0]} (mean, min-max over seeds)")
        ax.set_ylim(0, 1.15 * top if top > 0 else 1.0)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        if has_k and any(groups):
            ax.legend(fontsize=7)
    return save(fig, out, "throughput")


def _xerr(e: Estimate) -> list[list[float]]:
    """Error-bar lengths; a percentile interval need not contain the point, so clip at 0."""
    return [[max(0.0, e.value - e.lo)], [max(0.0, e.hi - e.value)]]


def plot_intervals(rows: list[Row], out: Path, thresholds: list[float]) -> list[Path]:
    """IQM and 95% CI per configuration: final reward, and seconds to the first threshold (an open
    marker where some seeds never reached it: the interval is then a lower bound)."""
    plt = _plt()
    thr = thresholds[0] if thresholds else None
    fig, axes = plt.subplots(1, 2 if thr is not None else 1, figsize=(11, 0.5 * len(rows) + 1.8), squeeze=False)
    y = np.arange(len(rows))[::-1]
    for i, row in enumerate(rows):
        color = f"C{i % 10}"
        f = row.final
        axes[0, 0].errorbar(f.value, y[i], xerr=_xerr(f), fmt="o", color=color, capsize=4)
        if thr is not None:
            r = row.reach[thr]
            s = r.seconds
            axes[0, 1].errorbar(
                s.value, y[i], xerr=_xerr(s), capsize=4, color=color, fmt="o", mfc="white" if r.censored else color
            )
            axes[0, 1].annotate(f" {r.reached}/{r.runs}", (s.hi, y[i]), fontsize=7, va="center")
    for ax in axes[0]:
        ax.set_yticks(y, [r.config for r in rows], fontsize=7)
        ax.grid(alpha=0.3, axis="x")
    axes[0, 0].set(xlabel="final reward (last 10% of steps): IQM, 95% CI", title="final reward")
    if thr is not None:
        axes[0, 1].set(
            xlabel=f"seconds to reward {thr:g}: IQM, 95% CI (open marker: a lower bound)",
            title=f"time to {thr:g} (k/S seeds reached it)",
        )
    return save(fig, out, "iqm")


def plot_run(run: Run, out: Path, window: int) -> list[Path]:
    """One run: reward, staleness, loss diagnostics and throughput over its steps."""
    plt = _plt()
    fig, ax = plt.subplots(2, 3, figsize=(15, 7.5))
    rec = run.records

    def col(key: str) -> np.ndarray:
        return np.array([np.nan if m.get(key) is None else float(m[key]) for m in rec])

    s = run.step
    ax[0, 0].plot(s, run.reward, alpha=0.3, label="reward/mean")
    ax[0, 0].plot(s, smooth(run.reward, window), label=f"mean of last {window}")
    ax[0, 0].set(xlabel="step", ylabel="reward", title="reward vs step")
    ax[0, 1].plot(run.seconds, smooth(run.reward, window))
    ax[0, 1].set(xlabel="seconds since the first batch", ylabel="reward (smoothed)", title="reward vs wall-clock")
    ax[0, 2].plot(s, col("staleness/mean"), label="mean")
    ax[0, 2].plot(s, col("staleness/max"), label="max", alpha=0.6)
    twin = ax[0, 2].twinx()
    twin.bar(s, col("staleness/dropped"), color="C3", alpha=0.3, label="groups dropped as stale")
    twin.set_ylabel("groups dropped as stale")
    ax[0, 2].set(xlabel="step", ylabel="staleness of trained rows", title="staleness")
    for key in ("loss/entropy", "loss/kl_behav", "loss/ratio_max"):
        ax[1, 0].plot(s, col(key), label=key.split("/", 1)[1])
    ax[1, 0].set(xlabel="step", title="loss diagnostics", yscale="symlog")
    for key in ("loss/clipfrac_low", "loss/clipfrac_high", "loss/masked_frac", "loss/ess"):
        ax[1, 1].plot(s, col(key), label=key.split("/", 1)[1])
    ax[1, 1].set(xlabel="step", title="clipping and effective sample size")
    ax[1, 2].plot(s, smooth(np.nan_to_num(col("train/samples_per_s")), window), label="samples/s (step time)")
    ax[1, 2].set(xlabel="step", ylabel="samples/s", title=f"throughput; learner idle {run.idle_frac:.0%}")
    twin2 = ax[1, 2].twinx()
    twin2.plot(s, col("time/wait_for_batch"), color="C1", alpha=0.5, label="wait for batch (s)")
    twin2.set_ylabel("seconds waiting for the batch")
    for a in ax.flat:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.suptitle(
        f"{run.dir}: final reward {run.final_reward:.3f}, {run.samples_per_s:.0f} samples/s, "
        f"staleness mean {run.staleness_mean:.2f}",
        fontsize=10,
    )
    return save(fig, out, "run")
