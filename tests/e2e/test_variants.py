"""Every loss, down-sampling rule, aggregation and zero-variance rule runs end to end by config alone."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT, free_ports
from test_pipeline import NO_CHECKPOINTS, assert_all_exited, run_env

from launcher.cli import podsrl_command
from protocol.metrics import read_metrics

pytestmark = pytest.mark.slow

# Zipped so that 5 short runs cover 5 losses x 4 rules x 3 aggregations x both zero-variance rules and norms.
VARIANTS = [
    ["learner.loss.type=grpo_is", "selector.rule=max_variance", "learner.loss.aggregation=token_mean"],
    ["learner.loss.type=decoupled_ppo", "selector.rule=max_reward", "learner.loss.aggregation=seq_mean_token_mean"],
    ["learner.loss.type=tis", "selector.rule=random", "learner.loss.aggregation=constant", "selector.adv_norm=mean"],
    ["learner.loss.type=m2po", "selector.rule=all", "rollout.group_size=8"],
    ["learner.loss.type=rec_oneside", "selector.rule=max_variance", "selector.zero_variance=drop"],
]


def test_every_variant_runs_end_to_end(tmp_path: Path) -> None:
    """The five runs go at once, each with its own ports and directory: they are short, so their
    process start-ups (not their training) dominate, and those overlap well even on 2 cores."""
    ports = iter(free_ports(4 * len(VARIANTS)))
    runs = []
    for variant in VARIANTS:
        run_dir = tmp_path / variant[0].split("=")[1]
        net = [f"net.{link}_port={next(ports)}" for link in ("group", "batch", "announce", "weights")]
        overrides = [NO_CHECKPOINTS, "run.steps=12", "rollout.servers=1", "max_staleness=1", *variant, *net]
        cmd = podsrl_command(run_dir, overrides)
        runs.append(
            (
                variant,
                run_dir,
                subprocess.Popen(
                    cmd, env=run_env(run_dir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                ),
            )
        )
    try:
        outputs = [proc.communicate(timeout=300) for _, _, proc in runs]
    finally:
        for _, _, proc in runs:
            if proc.poll() is None:
                proc.kill()
    for (variant, run_dir, proc), (out, err) in zip(runs, outputs, strict=True):
        assert proc.returncode == 0, (variant, out[-3000:] + err[-3000:])
        assert_all_exited(run_dir)
        steps = read_metrics(run_dir / "metrics" / "learner.jsonl")
        assert len(steps) == 12, variant
        kept = 8 if "selector.rule=all" in variant else 4
        assert all(m["train/samples"] == 8 * kept for m in steps), variant
        for key in (
            "loss/pg_loss",
            "loss/ratio_mean",
            "loss/ess",
            "loss/kl_behav",
            "loss/entropy",
            "loss/clipfrac_high",
        ):
            assert all(m[key] is not None and math.isfinite(m[key]) for m in steps), (variant, key)
        assert all(m["staleness/max"] <= 1 for m in steps), variant
