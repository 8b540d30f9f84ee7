"""A rollout server process stops when told, even while its sends to a missing selector are blocked.

Context: the chaos test once caught a server that kept waiting on a selector that was gone after
the learner's final announcement. On Python 3.11 ``asyncio.wait_for`` can swallow the cancellation
that stops the server; the send loop now uses ``asyncio.timeout`` and checks the stop flag itself.
That race is timing-dependent and this test does not force it: it checks the path around it. With no
selector at all, the groups link fills and every send blocks; the final announcement, or SIGTERM,
must still end the process with exit code 0.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from helpers import ROOT, child_env, free_port, line_matching, wait_for

from launcher.tiny import build_tiny_model
from learner.publisher import WeightPublisher
from protocol.config import load_config, to_toml
from protocol.messages import Weights
from protocol.weights import pack_weights, read_tokenizer_files

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def started(tmp_path: Path, *overrides: str) -> Iterator[tuple[subprocess.Popen, WeightPublisher, Weights]]:
    """A rollout server process with version 0 published and no selector; killed (if still running) after."""
    from learner.model import load_model

    ports = [f"net.{k}_port={free_port()}" for k in ("group", "batch", "announce", "weights")]
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", *ports, *overrides])
    build_tiny_model(cfg, cfg.model_dir, alphabet="abcdefghijkl=")
    model = load_model(cfg.model_dir, __import__("torch").device("cpu"))
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    ctx = zmq.Context()
    pub = WeightPublisher(ctx, cfg.net, files=read_tokenizer_files(cfg.model_dir), vocab_size=17)
    w = pack_weights(model.state_dict(), 0, model.config.to_json_string())
    pub.publish(w)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollout_server.server", "--config", str(path), "--server-id", "r0"],
        env=child_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield proc, pub, w
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pub.close()
        ctx.term()


@pytest.mark.parametrize("how", ["final_announcement", "sigterm"])
def test_a_server_blocked_on_a_missing_selector_still_stops(tmp_path: Path, how: str) -> None:
    metrics = tmp_path / "run" / "metrics" / "rollout-r0.jsonl"
    with started(tmp_path) as (proc, pub, w):

        def loaded() -> str | None:
            assert proc.poll() is None, proc.communicate()[0]
            return line_matching(metrics, '"rollout/weights_load_s"')

        # Start-up (torch, transformers), then the Hello and a heartbeat fill the groups link (send HWM 2); once
        # v0 is loaded (its metrics line), the server asks the missing selector for work and blocks there.
        wait_for(loaded, 120, "the rollout server to load v0 (its metrics file)", every_s=0.1)
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        else:
            pub.publish(w, final=True)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out


def test_a_reward_function_that_always_fails_stops_the_server_non_zero_naming_it(tmp_path: Path) -> None:
    # issue 19: rewards of 1e38 starved a run silently; after task.max_reward_failures failed calls the server
    # exits with the function, the reason and the fix in its log (the launcher prints a failed process's tail)
    plugin = tmp_path / "huge.py"
    plugin.write_text("def score(prompts, completions, **kw):\n    return [1e38] * len(completions)\n")
    overrides = [f"task.reward={plugin}:score", "task.max_reward_failures=1", "rollout.pacing=free"]
    with started(tmp_path, *overrides) as (proc, _, _):
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0, out
        assert "RewardFailure: reward function 'score' failed 1 calls in a row" in out, out
        assert "out_of_range: returned 1e+38, outside +-selector.max_abs_reward=10000" in out, out
