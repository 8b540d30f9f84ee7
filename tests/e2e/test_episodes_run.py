"""A run of multi-turn episodes whose environment misbehaves (issue 21): a step that sleeps forever, one that
raises, one that returns 10 MB and one that calls os._exit. The run completes, each is counted by its
reason, and the groups trained are the scored ones (a failed episode scores 0, counted)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_pipeline import assert_all_exited, podsrl_run

from protocol.metrics import read_metrics

pytestmark = pytest.mark.slow

ENV = """
import os, time

class Env:
    def reset(self, row):
        self.mode = row["mode"]
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, messages):
        if self.mode == "sleep":
            time.sleep(3600)
        if self.mode == "raise":
            raise RuntimeError("the tool broke")
        if self.mode == "huge":
            return [{"role": "tool", "content": "x" * (10 << 20)}], None
        if self.mode == "exit":
            os._exit(7)
        if len(messages) < 4:  # one answer, then the model's second turn ends the episode
            return [{"role": "tool", "content": "=ab"}], None
        return None, float(len(messages[-1]["content"]) % 2)
"""


def test_a_run_with_a_hostile_environment_completes_and_counts_each_failure(tmp_path: Path) -> None:
    (tmp_path / "env.py").write_text(ENV)
    rows = [{"prompt": "ab=", "answer": "ab", "mode": m} for m in ("sleep", "raise", "huge", "exit", *["ok"] * 4)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    overrides = [
        "task.type=dataset",
        f"task.dataset={tmp_path / 'rows.jsonl'}",
        "task.reward=exact_match",
        f"task.environment={tmp_path / 'env.py'}:Env",
        "task.env_timeout_s=1",
        "task.max_turns=2",
        "rollout.max_new_tokens=4",
        "rollout.servers=1",
        "rollout.group_size=4",
        "rollout.prompts_per_call=2",
        "selector.keep=2",
        "learner.groups_per_step=4",
        "run.steps=5",
    ]
    out = podsrl_run(run_dir, overrides, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert_all_exited(run_dir)
    steps = read_metrics(run_dir / "metrics" / "learner.jsonl")
    assert len(steps) == 5 and all(math.isfinite(m["loss/pg_loss"]) for m in steps)
    rollout = [m for m in read_metrics(run_dir / "metrics" / "rollout-rollout-0.jsonl") if "env/turns_mean" in m]
    last = rollout[-1]
    for reason in ("timeout", "raised", "too_long", "worker_died"):
        assert last.get(f"env/errors/{reason}", 0) >= 4, (reason, last)  # a group of 4 episodes each time
    assert last["rollout/reward_restarts"] >= 8  # every hang and every exit restarted the worker
    assert any(m["env/turns_mean"] > 1 for m in rollout) and any(m["env/masked_frac"] > 0 for m in rollout)
