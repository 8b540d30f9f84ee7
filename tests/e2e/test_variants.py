"""Every loss, down-sampling rule, aggregation and zero-variance rule runs end to end by config alone."""

from __future__ import annotations

import math

import pytest
from test_pipeline import assert_all_exited, podsrl_run

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


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v[0].split("=")[1])
def test_variant_runs_end_to_end(run_dir, net_overrides, variant):
    res = podsrl_run(run_dir, ["run.steps=12", "rollout.servers=1", "max_staleness=1", *variant, *net_overrides])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert_all_exited(run_dir)
    steps = read_metrics(run_dir / "metrics" / "learner.jsonl")
    assert len(steps) == 12
    kept = 8 if "selector.rule=all" in variant else 4
    assert all(m["train/samples"] == 8 * kept for m in steps)
    for key in ("loss/pg_loss", "loss/ratio_mean", "loss/ess", "loss/kl_behav", "loss/entropy", "loss/clipfrac_high"):
        assert all(m[key] is not None and math.isfinite(m[key]) for m in steps), key
    assert all(m["staleness/max"] <= 1 for m in steps)
