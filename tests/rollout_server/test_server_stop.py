"""A rollout server process stops when told, even while its sends to a missing selector are blocked.

Context: the chaos test once caught a server that kept waiting on a selector that was gone after
the learner's final announcement. On Python 3.11 ``asyncio.wait_for`` can swallow the cancellation
that stops the server; the send loop now uses ``asyncio.timeout`` and checks the stop flag itself.
That race is timing-dependent and this test does not force it: it checks the path around it. With no
selector at all, the groups link fills and every send blocks; the final announcement, or SIGTERM,
must still end the process with exit code 0.
"""

from __future__ import annotations

import signal
import subprocess
import sys
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


def start(tmp_path: Path) -> tuple[subprocess.Popen, WeightPublisher, zmq.Context, Weights]:
    from learner.model import load_model

    ports = [f"net.{k}_port={free_port()}" for k in ("group", "batch", "announce", "weights")]
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", *ports])
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
    return proc, pub, ctx, w


@pytest.mark.parametrize("how", ["final_announcement", "sigterm"])
def test_a_server_blocked_on_a_missing_selector_still_stops(tmp_path: Path, how: str) -> None:
    proc, pub, ctx, w = start(tmp_path)
    metrics = tmp_path / "run" / "metrics" / "rollout-r0.jsonl"

    def loaded() -> str | None:
        assert proc.poll() is None, proc.communicate()[0]
        return line_matching(metrics, '"rollout/weights_load_s"')

    try:
        # Start-up (torch, transformers), then the Hello and a heartbeat fill the groups link (send HWM 2); once
        # v0 is loaded (its metrics line), the server asks the missing selector for work and blocks there.
        wait_for(loaded, 120, "the rollout server to load v0 (its metrics file)", every_s=0.1)
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        else:
            pub.publish(w, final=True)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pub.close()
        ctx.term()
