"""A LoRA run through the launcher: real processes, a 2-rank FSDP2 learner, adapters on the weights link,
then a resumed run (one DDP rank) that continues at the next version."""

from __future__ import annotations

import pytest
from test_pipeline import assert_all_exited, podsrl_run

from protocol.metrics import read_metrics

pytestmark = pytest.mark.slow

LORA = ["learner.lora.rank=8", "learner.lora.alpha=16", "rollout.servers=1", "learner.checkpoint_every=4"]


def test_a_lora_run_publishes_adapters_and_resumes_at_the_next_version(run_dir, net_overrides):
    first = podsrl_run(run_dir, [*LORA, "run.steps=8", "learner.nproc=2", "learner.strategy=fsdp", *net_overrides])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert_all_exited(run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints" / "v000008").iterdir()) == ["adapter", "trainer.pt"]
    second = podsrl_run(run_dir, [*LORA, "run.steps=12", *net_overrides])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    steps = read_metrics(run_dir / "metrics" / "learner.jsonl")
    assert [m["version"] for m in steps] == list(range(1, 13)), "the resumed LoRA run did not continue at 9"
    installs = [m for m in read_metrics(run_dir / "metrics" / "rollout-rollout-0.jsonl") if "rollout/weights_mib" in m]
    assert installs, "the rollout server installed no version"
    # q/k/v/o adapters of the tiny model (2 layers, width 64, rank 8): 2 x 4 x 8 x (64 + 64) fp32 = 32 KiB
    assert all(m["rollout/weights_mib"] == 2 * 4 * 8 * 128 * 4 / 2**20 for m in installs)
    assert not (run_dir / "base").exists(), "the server should have found the base at model.path (same digest)"
