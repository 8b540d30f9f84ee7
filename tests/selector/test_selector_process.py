"""The selector as a real process on real sockets: bad input is rejected and counted, it keeps serving."""

from __future__ import annotations

import signal

import msgpack
import numpy as np
import zmq

from protocol.codec import encode
from protocol.config import load_config
from protocol.messages import BatchRequest, Heartbeat, Hello, ScoredGroup, TrainBatch
from protocol.metrics import read_metrics
from protocol.sockets import MIB, batch_client, close, group_sender, recv, send

TIMEOUT_MS = 20_000


def group(version: int, rewards: list[float], server: str = "t-0", gid: int = 0) -> ScoredGroup:
    n = len(rewards)
    lens = np.full(n, 4, np.int32)
    return ScoredGroup(server_id=server, group_id=gid, version=version, task="copy", gen_seconds=0.01,
                       prompt_ids=np.array([1, 5, 6, 2], np.int32), completion_ids=np.arange(4 * n, dtype=np.int32),
                       completion_lens=lens, logprobs=np.full(4 * n, -0.5, np.float32),
                       rewards=np.array(rewards, np.float32))


def test_selector_rejects_bad_input_counts_it_and_keeps_serving(spawn, run_dir, net_overrides):
    overrides = [f"run.dir={run_dir}", "max_staleness=1", "rollout.group_size=8", "selector.keep=4",
                 "learner.groups_per_step=2", "selector.rule=max_variance", "net.max_group_mib=1", *net_overrides]
    cfg = load_config(None, overrides)
    proc = spawn("selector.server", *overrides, log=run_dir.parent / "selector.log")
    ctx = zmq.Context()
    push, dealer = group_sender(ctx, cfg.net), batch_client(ctx, cfg.net)
    try:
        send(push, Hello(server_id="t-0", host="test", pid=1, engine="torch"))
        push.send_multipart([b"\xc1not msgpack"])  # malformed
        header = msgpack.packb({"t": "scored_group", "v": 999, "f": {}, "a": []})
        push.send_multipart([header])  # wrong protocol version
        nan = group(0, [1.0, 0.0, 0.5, 0.0, 1.0, 0.0, 1.0, 0.0])
        frames = encode(nan)
        bad_rewards = np.array([np.nan] * 8, np.float32)
        push.send_multipart([*frames[:-1], bad_rewards.tobytes()])  # NaN rewards
        big = group(0, [1.0] * 8)
        big_frames = encode(big)
        big_frames[2] = np.zeros(2 * MIB // 4 + 8 * 4, np.int32).tobytes()  # oversized (2 MiB > 1 MiB limit)
        push.send_multipart(big_frames)
        send(push, Heartbeat(server_id="t-0", version=0, groups_sent=0, state="generating"))
        send(push, group(0, [1, 0, 0, 0, 1, 0, 0, 1], gid=1))  # valid, version 0
        send(push, group(0, [0.5] * 8, gid=2))  # zero variance: kept with zero advantage (default rule)
        send(push, group(0, [1, 1, 0, 0, 0.5, 0.5, 1, 0], gid=3))

        # Version 0: the first two fresh groups make the batch (FIFO).
        send(dealer, BatchRequest(request_id=1, version=0, num_groups=2))
        assert dealer.poll(TIMEOUT_MS), "selector stopped serving after bad input"
        _, batch = recv(dealer, TrainBatch)
        assert batch.request_id == 1 and batch.size == 8 and batch.servers == ["t-0"]
        assert batch.stats["rejected/malformed"] == 1
        assert batch.stats["rejected/version"] == 1
        assert batch.stats["rejected/non_finite"] == 1
        assert batch.stats["rejected/too_large"] == 1
        assert batch.stats["selector/zero_variance_kept"] == 1
        kept = batch.rewards[:4]
        assert sorted(kept.tolist()) == [0, 0, 1, 1]  # max-variance keeps 2 highest + 2 lowest
        np.testing.assert_allclose(batch.advantages[:4], np.where(kept > 0, 1, -1), atol=1e-5)
        np.testing.assert_array_equal(batch.advantages[4:], 0)

        # Version 2 with K=1: the leftover version-0 group is too stale, dropped and counted; the
        # request waits until fresh groups arrive.
        send(dealer, BatchRequest(request_id=2, version=2, num_groups=2))
        assert not dealer.poll(300)
        send(push, group(1, [1, 0, 1, 0, 1, 0, 1, 0], gid=4))
        send(push, group(2, [1, 0, 1, 0, 1, 0, 1, 0], gid=5))
        assert dealer.poll(TIMEOUT_MS)
        _, batch = recv(dealer, TrainBatch)
        assert batch.request_id == 2
        assert set((batch.version - batch.versions).tolist()) <= {0, 1}
        assert batch.stats["staleness/dropped"] == 1 and batch.stats["staleness/dropped/t-0"] == 1
        assert proc.poll() is None
    finally:
        close(push, dealer)
        ctx.term()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    totals = read_metrics(run_dir / "metrics" / "selector.jsonl")[-1]
    assert totals["total/rejected/malformed"] == 1 and totals["total/groups/received"] == 5
