"""``podsrl sweep``: grids, plans, command lines that parse back, skipping finished runs, the table.

Most tests run the sweep machinery against a fake ``podsrl run`` (a script that writes synthetic
metrics with known values in milliseconds); one slow test runs a real tiny sweep end to end.
"""

from __future__ import annotations

import csv
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import ROOT, child_env, wait_for

from launcher import sweep as sweep_mod
from launcher.cli import main
from launcher.summary import DONE, find_runs
from launcher.sweep import SweepError, build_grid, load_grid, plan
from protocol.config import load_config

# A stand-in for `python -m launcher.cli`: `run [--config F] overrides...` writes a run directory with
# synthetic metrics. K=0 learns 0.02 reward per step at 0.1 s per step; K=k learns 0.02/(1+k/2) per
# step but steps take 0.1/(1+k) s. learner.lr >= 0.5 fails (exit 3) after writing a few steps.
FAKE_RUN = textwrap.dedent("""
    import json, random, sys
    from pathlib import Path
    from protocol.config import load_config, to_toml
    args = sys.argv[1:]
    assert args[0] == "run", args
    conf, rest = (args[2], args[3:]) if args[1:2] == ["--config"] else (None, args[1:])
    cfg = load_config(conf, rest)
    d = Path(cfg.run.dir)
    (d / "metrics").mkdir(parents=True, exist_ok=True)
    (d / "config.toml").write_text(to_toml(cfg))
    print("fake podsrl run:", cfg.summary(), flush=True)
    k, seed = cfg.max_staleness, cfg.run.seed
    rng = random.Random(1000 * seed + k)
    rate, step_s = 0.02 / (1 + k / 2), 0.1 / (1 + k)
    steps = 3 if cfg.learner.lr >= 0.5 else cfg.run.steps
    with (d / "metrics" / "learner.jsonl").open("w") as f:
        for s in range(1, steps + 1):
            wait = 5.0 if s == 1 else 0.25 * step_s  # the first batch waits for start-up
            hist = [0] * (k + 1)
            hist[min(k, s - 1)] = 32
            rec = {"step": s, "time": 1000.0 + 5.0 + s * step_s, "reward/mean": min(0.95, 0.1 + rate * s)
                   + rng.uniform(-0.02, 0.02), "time/step": step_s + (5.0 if s == 1 else 0.0),
                   "time/wait_for_batch": wait, "train/samples": 32, "train/samples_per_s": 32 / step_s,
                   "staleness/mean": float(min(k, s - 1)), "staleness/max": min(k, s - 1),
                   "staleness/dropped": 1 if k and s % 5 == 0 else 0, "groups/received": 8,
                   "loss/entropy": 2.0 / s, "loss/kl_behav": 0.01 * k, "loss/ratio_max": 1 + 0.1 * k,
                   "loss/clipfrac_low": 0.01, "loss/clipfrac_high": 0.02, "loss/masked_frac": 0.0,
                   "loss/ess": 0.95, **{f"staleness/hist_{i}": h for i, h in enumerate(hist)}}
            f.write(json.dumps(rec) + "\\n")
    with (d / "metrics" / "rollout-rollout-0.jsonl").open("w") as f:
        f.write(json.dumps({"step": 0, "time": 1000.0, "rollout/weights_load_s": 9.0}) + "\\n")
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "time": 1005.0 + s * step_s, "rollout/weights_load_s": 0.005}) + "\\n")
    sys.exit(3 if cfg.learner.lr >= 0.5 else 0)
""")


@pytest.fixture
def fake_runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "fake_podsrl.py"
    script.write_text(FAKE_RUN)
    monkeypatch.setattr(sweep_mod, "RUNNER", [sys.executable, str(script)])
    return script


def podsrl(*args: str | Path) -> int:
    return main([str(a) for a in args])


def grid_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_grid_file_tables_and_quoted_keys_make_the_cartesian_product(tmp_path):
    path = grid_file(
        tmp_path,
        """
        config = "configs/tiny.toml"
        seeds = [0, 3]
        thresholds = [0.5]
        [base]
        "run.steps" = 50
        [grid]
        max_staleness = [0, 2]
        [grid.learner.loss]
        type = ["grpo_is", "m2po"]
    """,
    )
    grid = load_grid(path)
    assert grid.axes == {"max_staleness": [0, 2], "learner.loss.type": ["grpo_is", "m2po"]}
    assert (grid.seeds, grid.thresholds, grid.config) == ([0, 3], [0.5], "configs/tiny.toml")
    specs = plan(grid, tmp_path / "out", ["learner.lr=1e-3"])
    assert len(specs) == 8 and [s.index for s in specs] == list(range(1, 9))
    # seed-major: every configuration's first seed before any second seed (load drift hits all alike)
    assert [(s.name, s.seed) for s in specs[:5]] == [
        ("max_staleness=0,loss.type=grpo_is", 0),
        ("max_staleness=0,loss.type=m2po", 0),
        ("max_staleness=2,loss.type=grpo_is", 0),
        ("max_staleness=2,loss.type=m2po", 0),
        ("max_staleness=0,loss.type=grpo_is", 3),
    ]
    assert specs[-1].dir == tmp_path / "out" / "max_staleness=2,loss.type=m2po" / "seed3"
    assert specs[-1].overrides == ("run.steps=50", "learner.lr=1e-3", "max_staleness=2", "learner.loss.type=m2po")


@pytest.mark.parametrize(
    ("axis", "message"),
    [
        ("learner.lrr=1,2", "'learner.lrr' is not a config key (did you mean learner.lr"),
        ("run.seed=1,2", "use --seeds instead"),
        ("run.dir=a,b", "use --out instead"),
    ],
)
def test_bad_grid_keys_are_named_with_the_fix(tmp_path, capsys, axis, message):
    assert podsrl("sweep", "--axis", axis, "--out", tmp_path / "s") == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "s").exists()


def test_unknown_key_points_at_the_config_reference(tmp_path):
    with pytest.raises(SweepError, match=r"docs/CONFIG.md"):
        plan(build_grid(None, None, ["selector.bogus=1"], "2", None, None), tmp_path, [])
    path = grid_file(tmp_path, "[grid]\nmax_staleness = 2\n")
    with pytest.raises(SweepError, match=r"must be a non-empty list of values, e.g. max_staleness = \[0, 2\]"):
        load_grid(path)
    with pytest.raises(SweepError, match="unknown top-level key"):
        load_grid(grid_file(tmp_path, "max_staleness = [0, 2]\n"))


def test_an_invalid_value_stops_the_sweep_before_any_run(tmp_path, capsys, fake_runner):
    assert podsrl("sweep", "--axis", "max_staleness=0,-1", "--seeds", "1", "--out", tmp_path / "s") == 2
    err = capsys.readouterr().err
    assert "configuration max_staleness=-1" in err and "max_staleness" in err and "docs/CONFIG.md" in err
    assert not (tmp_path / "s").exists()


def test_printed_commands_parse_back_to_the_planned_configs(tmp_path, capsys):
    out = tmp_path / "sw"
    assert (
        podsrl(
            "sweep",
            "--config",
            "configs/tiny.toml",
            "--axis",
            "max_staleness=0,4",
            "--axis",
            "learner.loss.type=grpo_is,decoupled_ppo",
            "--seeds",
            "2",
            "--out",
            out,
            "--print-commands",
            "--port-base",
            "21000",
            "run.steps=20",
            'task.stop=["x y"]',
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8 and not out.exists(), "printing commands must not run or create anything"
    seen = set()
    for i, line in enumerate(lines):
        argv = shlex.split(line)
        assert argv[:4] == ["podsrl", "run", "--config", "configs/tiny.toml"]
        cfg = load_config(ROOT / argv[3], argv[4:])
        seen.add((cfg.max_staleness, cfg.learner.loss.type, cfg.run.seed))
        assert cfg.run.steps == 20 and cfg.task.stop == ["x y"]
        assert (
            Path(cfg.run.dir)
            == out / f"max_staleness={cfg.max_staleness},loss.type={cfg.learner.loss.type}" / f"seed{cfg.run.seed}"
        )
        assert cfg.net.group_port == 21000 + 4 * i and cfg.net.weights_port == 21000 + 4 * i + 3
    assert len(seen) == 8


def test_a_config_alone_sweeps_its_seeds_and_nothing_at_all_is_refused(tmp_path, capsys):
    """``--config FILE`` without a grid or an axis is one configuration ("base") x its seeds: the learning
    suite (bench/learning.py) runs each task this way. With neither, the error names the three ways."""
    out = tmp_path / "sw"
    assert podsrl("sweep", "--config", "configs/tiny.toml", "--seeds", "3", "--out", out, "--print-commands") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    dirs = {Path(load_config(ROOT / "configs/tiny.toml", shlex.split(line)[4:]).run.dir) for line in lines}
    assert dirs == {out / "base" / f"seed{k}" for k in range(3)}
    assert podsrl("sweep", "--seeds", "3", "--out", out) == 2
    assert "--config FILE alone for its seeds" in capsys.readouterr().err


def run_fake_sweep(out: Path, *extra: str, axis: str = "max_staleness=0,2", seeds: str = "2") -> int:
    return podsrl(
        "sweep",
        "--axis",
        axis,
        "--seeds",
        seeds,
        "--out",
        out,
        "--thresholds",
        "0.6,0.8",
        "--window",
        "5",
        "run.steps=40",
        *extra,
    )


def test_fake_sweep_runs_every_run_writes_the_table_and_skips_finished_runs(tmp_path, capsys, fake_runner):
    out = tmp_path / "sw"
    assert run_fake_sweep(out, "--parallel", "2") == 0
    printed = capsys.readouterr().out
    assert "4 runs (2 configurations x 2 seeds); 0 finished earlier (skipped); 4 to run, 2 at a time" in printed
    for i in range(1, 5):
        assert f"[{i}/4] start" in printed and f"[{i}/4] done" in printed
    assert "ETA" in printed and "final reward" in printed
    for name in ("max_staleness=0", "max_staleness=2"):
        for seed in (0, 1):
            run = out / name / f"seed{seed}"
            assert (run / DONE).exists() and (run / "sweep.log").read_text().startswith("fake podsrl run")
            assert f"seed = {seed}" in (run / "config.toml").read_text()
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["config"] for r in rows] == ["max_staleness=0", "max_staleness=2"]
    k0, k2 = rows
    assert (k0["max_staleness"], k0["seeds"], k0["reached_0.6"], k2["reached_0.6"]) == ("0", "2", "2", "0")
    assert k2["censored_0.6"] == "True" and float(k2["seconds_to_0.6_iqm"]) == pytest.approx(40 * 0.1 / 3)
    assert float(k0["weight_sync_s"]) == pytest.approx(0.005) and float(k2["staleness_max"]) == 2
    assert float(k2["dropped_frac"]) == pytest.approx(8 / (8 * 40)) and float(k0["dropped_frac"]) == 0
    # wall-clock from the first batch's arrival: 40 steps of 0.1 s; idle: 39 waits of 0.025 s
    assert float(k0["samples_per_s"]) == pytest.approx(32 * 40 / 4.0)
    assert float(k0["idle_frac"]) == pytest.approx(39 * 0.025 / 4.0)
    assert float(k2["poi_vs_reference"]) == 0.0 and k0["poi_vs_reference"] == ""
    md = (out / "summary.md").read_text()
    assert "| `max_staleness=0` | 2 |" in md and "| 0/2 | never (>=" in md and "`podsrl sweep --axis" in md

    # Started again: everything is skipped, nothing is rewritten.
    stamp = (out / "max_staleness=0" / "seed0" / DONE).stat().st_mtime_ns
    assert run_fake_sweep(out) == 0
    again = capsys.readouterr().out
    assert "4 finished earlier (skipped); 0 to run" in again and "start" not in again.split("skipped")[1]
    assert (out / "max_staleness=0" / "seed0" / DONE).stat().st_mtime_ns == stamp

    # A run interrupted half-way (no marker) starts afresh; only it runs.
    half = out / "max_staleness=2" / "seed1"
    (half / DONE).unlink()
    (half / "metrics" / "learner.jsonl").write_text('{"step": 1, "time": 0}\n')
    assert run_fake_sweep(out) == 0
    again = capsys.readouterr().out
    assert "3 finished earlier (skipped); 1 to run" in again and "[4/4] start max_staleness=2 seed1" in again
    assert len((half / "metrics" / "learner.jsonl").read_text().splitlines()) == 40

    # The same directory with other settings is refused, never silently reused.
    assert run_fake_sweep(out, "learner.lr=1e-3") == 2
    assert "finished with other settings" in capsys.readouterr().err


def test_failed_runs_are_reported_left_out_of_the_table_and_retried(tmp_path, capsys, fake_runner):
    out = tmp_path / "sw"
    assert run_fake_sweep(out, axis="learner.lr=1e-3,0.5", seeds="1") == 1
    captured = capsys.readouterr()
    assert "FAILED (status 3)" in captured.out and "1 run(s) failed" in captured.err
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["config"] for r in rows] == ["learner.lr=0.001"]
    assert "Left out, started by the sweep but not finished" in (out / "summary.md").read_text()
    assert run_fake_sweep(out, axis="learner.lr=1e-3,0.5", seeds="1") == 1
    assert "1 finished earlier (skipped); 1 to run" in capsys.readouterr().out


def test_summarize_rebuilds_the_table_and_counts_runs_made_elsewhere(tmp_path, capsys, fake_runner):
    out = tmp_path / "sw"
    assert run_fake_sweep(out, seeds="1") == 0
    before = (out / "summary.csv").read_text()
    (out / "summary.csv").unlink()
    assert podsrl("sweep", "--summarize", out) == 0
    assert (out / "summary.csv").read_text() == before
    # A run made from a printed command on another machine has no sweep markers: it counts.
    elsewhere = out / "max_staleness=2" / "seed7"
    subprocess.run(
        [
            sys.executable,
            str(fake_runner),
            "run",
            "max_staleness=2",
            "run.seed=7",
            "run.steps=40",
            f"run.dir={elsewhere}",
        ],
        check=True,
        env=child_env(),
        capture_output=True,
    )
    assert podsrl("sweep", "--summarize", out, "--reference", "max_staleness=2") == 0
    rows = {r["config"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert rows["max_staleness=2"]["seeds"] == "2" and rows["max_staleness=0"]["poi_vs_reference"] == "1.0"
    assert "made elsewhere" in (out / "summary.md").read_text()
    capsys.readouterr()
    assert podsrl("sweep", "--summarize", tmp_path / "nothing") == 2
    assert "holds no runs" in capsys.readouterr().err


def test_sweep_needs_something_to_sweep(capsys):
    assert podsrl("sweep") == 2
    assert "--grid FILE" in capsys.readouterr().err


def test_shipped_sweep_grids_are_valid(tmp_path):
    for path in sorted((ROOT / "configs" / "sweeps").glob("*.toml")):
        grid = load_grid(path)
        specs = plan(grid, tmp_path, [])
        for spec in {s.name: s for s in specs}.values():
            sweep_mod.resolve(grid, spec)


def test_sweep_and_plot_help_are_instant():
    code = (
        "import sys; from launcher.cli import main\nfor c in ('sweep', 'plot'):\n try:\n  main([c, '--help'])\n"
        " except SystemExit: pass\nheavy = {'torch', 'numpy', 'matplotlib'} & set(sys.modules)\n"
        "assert not heavy, heavy"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "--print-commands" in res.stdout and "--summarize" in res.stdout and "RUN_DIR" in res.stdout


@pytest.mark.slow
def test_tiny_real_sweep_runs_tables_plots_and_skips(tmp_path):
    out = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "launcher.cli",
        "sweep",
        "--config",
        str(ROOT / "configs/tiny.toml"),
        "--axis",
        "max_staleness=0,2",
        "--seeds",
        "2",
        "--parallel",
        "2",
        "--out",
        str(out),
        "--window",
        "3",
        "--thresholds",
        "0.05,0.9",
        "run.steps=10",
        "rollout.servers=1",
        "learner.groups_per_step=4",
        "learner.checkpoint_every=0",
    ]
    t0 = time.monotonic()
    res = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    runs = find_runs(out)
    assert list(runs) == ["max_staleness=0", "max_staleness=2"]
    for rs in runs.values():
        assert [r.seed for r in rs] == [0, 1] and all(len(r.reward) == 10 and r.complete for r in rs)
    assert all(r.staleness_max == 0 for r in runs["max_staleness=0"])
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["config"] for r in rows] == ["max_staleness=0", "max_staleness=2"]
    assert all(r["seeds"] == "2" and float(r["samples_per_s"]) > 0 and r["weight_sync_s"] for r in rows)
    md = (out / "summary.md").read_text()
    assert md.count("| `max_staleness=") == 2 and "reached 0.9" in md

    res = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "plot", str(out)],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    for name in ("reward", "staleness", "throughput", "iqm"):
        for ext in ("png", "svg"):
            assert (out / "plots" / f"{name}.{ext}").stat().st_size > 1000

    again = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "4 finished earlier (skipped); 0 to run" in again.stdout
    print(f"tiny real sweep: {took:.0f}s")


def test_interrupted_sweep_stops_its_runs_and_leaves_them_unfinished(tmp_path):
    """Ctrl-C: every running `podsrl run` gets SIGTERM (it stops its own processes), none is marked done."""
    sleeper = tmp_path / "sleeper.py"  # a stand-in `podsrl run`
    sleeper.write_text(
        "import os, sys, time\nfrom pathlib import Path\n"
        "d = Path(next(a for a in sys.argv if a.startswith('run.dir=')).split('=', 1)[1])\n"
        "(d / 'pid').write_text(str(os.getpid()))\ntime.sleep(60)\n"  # not a wait: it runs until it is stopped
    )
    out = tmp_path / "sw"
    code = (
        f"import sys; from launcher import sweep; sweep.RUNNER = [sys.executable, {str(sleeper)!r}]\n"
        f"from launcher.cli import main; sys.exit(main(['sweep', '--axis', 'max_staleness=0,2', '--seeds', '1', "
        f"'--parallel', '2', '--out', {str(out)!r}]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pids = [out / name / "seed0" / "pid" for name in ("max_staleness=0", "max_staleness=2")]

    def both_running() -> bool:
        assert proc.poll() is None, proc.communicate()
        return all(p.exists() and p.read_text() for p in pids)

    wait_for(both_running, 30, "both runs of the sweep to start (their pid files)")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted" in err
    for p in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(int(p.read_text()), 0)
        assert not (p.parent / DONE).exists()
