"""Text in, text out, by config alone: the user's own model directory, tokenizer, JSONL and reward module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT
from test_pipeline import assert_all_exited, first_last, run_env

from protocol.config import load_config
from protocol.metrics import read_metrics

pytestmark = pytest.mark.slow

REWARD_MODULE = '''
def myreward(prompts, completions, answer, completion_ids, **columns):
    """Partial credit per character; completion_ids are the sampled ids (lists of ints)."""
    assert all(isinstance(ids, list) and all(isinstance(i, int) for i in ids) for ids in completion_ids)
    return [sum(a == b for a, b in zip(ans, text)) / len(ans) for text, ans in zip(completions, answer)]
'''


def make_user_files(root: Path, rows: int = 200) -> dict[str, Path]:
    """What a user brings: a model directory with its tokenizer, a JSONL file, a reward module."""
    from launcher.tiny import build_tiny_model

    rng = np.random.default_rng(0)
    letters = "abcdef"
    with (root / "data.jsonl").open("w") as f:
        for _ in range(rows):
            word = "".join(rng.choice(list(letters), 3))
            f.write(json.dumps({"question": f"{word}=", "answer": word[::-1], "id": int(rng.integers(1000))}) + "\n")
    build_tiny_model(load_config(overrides=["run.seed=3"]), root / "model", alphabet=letters + "=")
    (root / "mymod.py").write_text(REWARD_MODULE)
    return {"model": root / "model", "data": root / "data.jsonl", "plugins": root}


def podsrl_run_text(run_dir: Path, files: dict[str, Path], overrides: list[str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "launcher.cli",
        "run",
        f"run.dir={run_dir}",
        "learner.checkpoint_every=0",
        f"model.path={files['model']}",
        "model.init=pretrained",
        f"task.dataset={files['data']}",
        "task.prompt_field=question",
        "task.reward=mymod:myreward",
        *overrides,
    ]
    env = {**run_env(run_dir), "PYTHONPATH": os.pathsep.join([str(ROOT), str(files["plugins"])])}
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(["learner.nproc=1"], id="ddp-1"),
        pytest.param(["learner.nproc=2", "learner.strategy=fsdp"], id="fsdp-2"),
    ],
)
def test_user_model_dataset_and_reward_learn_by_config_alone(tmp_path, run_dir, net_overrides, layout):
    files = make_user_files(tmp_path)
    steps = 200
    res = podsrl_run_text(
        run_dir,
        files,
        [
            f"run.steps={steps}",
            "rollout.max_new_tokens=6",
            "task.eval_fraction=0.1",
            "eval.every=100",
            "eval.prompts=16",
            *layout,
            *net_overrides,
        ],
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert_all_exited(run_dir)
    learner = read_metrics(run_dir / "metrics" / "learner.jsonl")
    assert [m["step"] for m in learner] == list(range(1, steps + 1))
    first, last = first_last([m["reward/mean"] for m in learner])
    assert last > first + 0.15, f"reward did not rise: {first:.3f} -> {last:.3f}"
    rollout = read_metrics(run_dir / "metrics" / "rollout-rollout-0.jsonl")
    assert all("reward/errors/raised" not in m for m in rollout), "the reward function raised"
    assert any("reward/fn/myreward" in m for m in rollout)
    evals = [m for m in rollout if "eval/reward_mean" in m]
    # at the first version the server loads (0, unless the other server let the learner move on while
    # this one started), then at the first version it loads at or past 100 (it may skip one)
    at = [m["step"] for m in evals]
    first_loaded = min(m["step"] for m in rollout if "rollout/weights_install_s" in m)
    assert first_loaded < 100 and at[0] == first_loaded, (at, first_loaded)
    assert 100 <= at[1] < 110 and all(m["eval/prompts"] == 16 for m in evals), at
    assert max(m["data/progress"] for m in rollout if "data/progress" in m) > 1, "never finished an epoch"
    assert "180 training rows, 20 eval rows" in res.stdout
