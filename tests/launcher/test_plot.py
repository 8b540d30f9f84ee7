"""``podsrl plot``: every figure of a sweep and of one run is written, PNG and SVG, non-empty."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_sweep import fake_runner, podsrl, run_fake_sweep  # noqa: F401  (fake_runner is a fixture)

pytest.importorskip("matplotlib")


def test_sweep_figures(tmp_path, capsys, fake_runner):  # noqa: F811
    out = tmp_path / "sw"
    assert run_fake_sweep(out, axis="max_staleness=0,2", seeds="3") == 0
    capsys.readouterr()
    assert podsrl("plot", out) == 0
    printed = capsys.readouterr().out.split()
    expected = [
        out / "plots" / f"{name}.{ext}"
        for name in ("reward", "staleness", "throughput", "iqm")
        for ext in ("png", "svg")
    ]
    assert sorted(map(Path, printed)) == sorted(expected)
    assert all(p.stat().st_size > 5000 for p in expected)


def test_sweep_without_k_axis_and_one_seed(tmp_path, fake_runner):  # noqa: F811
    out = tmp_path / "sw"
    assert run_fake_sweep(out, axis="learner.lr=1e-3,3e-3", seeds="1") == 0
    assert podsrl("plot", out, "--out", tmp_path / "figs", "--thresholds", "0.5") == 0
    assert (tmp_path / "figs" / "throughput.png").stat().st_size > 5000


def test_one_run_figure_and_several_dirs(tmp_path, fake_runner):  # noqa: F811
    out = tmp_path / "sw"
    assert run_fake_sweep(out, seeds="1") == 0
    runs = [out / "max_staleness=0" / "seed0", out / "max_staleness=2" / "seed0"]
    assert podsrl("plot", *runs, "--out", tmp_path / "figs") == 0
    for run in runs:  # both are called seed0: the figures are kept apart by the config's name too
        for ext in ("png", "svg"):
            assert (tmp_path / "figs" / run.parent.name / "seed0" / f"run.{ext}").stat().st_size > 5000


def test_plot_of_a_directory_without_runs_says_what_it_expected(tmp_path, capsys):
    assert podsrl("plot", tmp_path) == 2
    assert "holds no runs" in capsys.readouterr().err
