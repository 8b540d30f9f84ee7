"""The selector as a real process on real sockets: bad input is rejected and counted, it keeps serving."""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq
from helpers import line_matching, wait_for

from protocol.auth import create_keys, load_auth
from protocol.codec import encode
from protocol.config import Config, load_config
from protocol.messages import (
    PROTOCOL_VERSION,
    BatchRequest,
    Heartbeat,
    Hello,
    Message,
    Refusal,
    ScoredGroup,
    TrainBatch,
    WeightsAnnouncement,
    WorkGrant,
    WorkRequest,
)
from protocol.metrics import read_metrics
from protocol.sockets import MIB, announce_publisher, batch_client, close, group_sender, recv, send

TIMEOUT_MS = 20_000
LEARNER = 5  # the fake learner's session: its announcements and batch requests carry it


def group(version: int, rewards: Sequence[float], server: str = "t-0", gid: int = 0) -> ScoredGroup:
    n = len(rewards)
    lens = np.full(n, 4, np.int32)
    return ScoredGroup(
        server_id=server,
        session=1,
        group_id=gid,
        version=version,
        task="copy",
        gen_seconds=0.01,
        prompt_ids=np.array([1, 5, 6, 2], np.int32),
        completion_ids=np.arange(4 * n, dtype=np.int32),
        completion_lens=lens,
        logprobs=np.full(4 * n, -0.5, np.float32),
        rewards=np.array(rewards, np.float32),
    )


def announce(pub: zmq.Socket, version: int, floor: int = 0, vocab: int = 64, session: int = LEARNER) -> None:
    send(pub, WeightsAnnouncement(version=version, final=False, floor=floor, vocab_size=vocab, session=session))


def reply(dealer: zmq.Socket, pub: zmq.Socket, version: int, floor: int = 0, session: int = LEARNER) -> TrainBatch:
    """The next batch, announcing ``version`` meanwhile as the learner does (a PUB drops what it sends
    before the selector's SUB has connected, so the announcement is repeated)."""
    for _ in range(TIMEOUT_MS // 100):
        announce(pub, version, floor, session=session)
        if dealer.poll(100):
            return recv(dealer, TrainBatch)[1]
    raise AssertionError("selector stopped serving")


def start_selector(spawn, run_dir: Path, net_overrides: list[str], *extra: str) -> tuple[Any, Config, Path]:
    """A selector process for groups of 8 (keep 4), one group per batch, unpaced: (process, config, log)."""
    overrides = [
        f"run.dir={run_dir}",
        "rollout.group_size=8",
        "selector.keep=4",
        "learner.groups_per_step=1",
        "rollout.pacing=free",
        *extra,
        *net_overrides,
    ]
    log_path = run_dir.parent / "selector.log"
    return spawn("selector.server", *overrides, log=log_path), load_config(None, overrides), log_path


def replies(push: zmq.Socket, n: int) -> list[Message]:
    """The next ``n`` answers of the selector (WorkGrant, Refusal) on a groups-link connection, in order."""
    out: list[Message] = []
    for _ in range(n):
        assert push.poll(TIMEOUT_MS), f"{len(out)} of {n} answers arrived"
        out.append(recv(push, (WorkGrant, Refusal))[1])
    return out


def test_selector_rejects_bad_input_counts_it_and_keeps_serving(spawn, run_dir, net_overrides):
    overrides = [
        f"run.dir={run_dir}",
        "max_staleness=1",
        "rollout.group_size=8",
        "selector.keep=4",
        "learner.groups_per_step=2",
        "selector.rule=max_variance",
        "net.max_group_mib=1",
        *net_overrides,
    ]
    cfg = load_config(None, overrides)
    proc = spawn("selector.server", *overrides, log=run_dir.parent / "selector.log")
    ctx = zmq.Context()
    push, dealer, pub = group_sender(ctx, cfg.net), batch_client(ctx, cfg.net), announce_publisher(ctx, cfg.net)
    try:
        send(push, Hello(server_id="t-0", host="test", pid=1, engine="torch", session=1))
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
        send(push, Heartbeat(server_id="t-0", version=0, groups_sent=0, state="generating", session=1))
        send(push, group(0, [1, 0, 0, 0, 1, 0, 0, 1], gid=1))  # valid, version 0
        send(push, group(0, [0.5] * 8, gid=2))  # zero variance: kept with zero advantage (default rule)
        send(push, group(0, [1, 1, 0, 0, 0.5, 0.5, 1, 0], gid=3))

        # Version 0: the first two fresh groups make the batch (FIFO).
        send(dealer, BatchRequest(request_id=1, version=0, num_groups=2, session=LEARNER))
        batch = reply(dealer, pub, 0)
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
        send(dealer, BatchRequest(request_id=2, version=2, num_groups=2, session=LEARNER))
        announce(pub, 2)
        assert not dealer.poll(300)
        send(push, group(1, [1, 0, 1, 0, 1, 0, 1, 0], gid=4))
        send(push, group(2, [1, 0, 1, 0, 1, 0, 1, 0], gid=5))
        batch = reply(dealer, pub, 2)
        assert batch.request_id == 2
        assert set((batch.version - batch.versions).tolist()) <= {0, 1}
        assert batch.stats["staleness/dropped"] == 1 and batch.stats["staleness/dropped/t-0"] == 1
        assert proc.poll() is None
    finally:
        close(push, dealer, pub)
        ctx.term()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    totals = read_metrics(run_dir / "metrics" / "selector.jsonl")[-1]
    assert totals["total/rejected/malformed"] == 1 and totals["total/groups/received"] == 5


def test_hostile_but_well_formed_input_is_rejected_counted_and_never_batched(spawn, run_dir, net_overrides):
    """Issue 7's attacks on a real selector process: each is rejected with its reason, the log stays
    short, and the honest groups sent around them make the batch."""
    overrides = [
        f"run.dir={run_dir}",
        "max_staleness=2",
        "rollout.group_size=8",
        "selector.keep=4",
        "learner.groups_per_step=2",
        "selector.max_peers=4",
        "rollout.max_new_tokens=4",
        *net_overrides,
    ]
    cfg = load_config(None, overrides)
    log_path = run_dir.parent / "selector.log"
    proc = spawn("selector.server", *overrides, log=log_path)
    ctx = zmq.Context()
    push, dealer, pub = group_sender(ctx, cfg.net), batch_client(ctx, cfg.net), announce_publisher(ctx, cfg.net)
    rewards = [1, 0, 0, 0, 1, 0, 0, 1]
    try:
        # A forged request from the future must not move the selector's version.
        send(dealer, BatchRequest(request_id=99, version=2**40, num_groups=2, session=LEARNER))
        send(
            dealer, BatchRequest(request_id=1, version=3, num_groups=2, session=LEARNER)
        )  # the real learner's, replaces it
        honest = group(3, rewards, gid=0)
        send(push, honest)
        hostile: list[Message] = [
            group(3, rewards, gid=0),  # replay of the honest group
            group(50, rewards, gid=1),  # future version
            group(2**50, rewards, gid=2),
            group(0, rewards, gid=3),  # below the floor of 1
            ScoredGroup(**{**vars(group(3, rewards, gid=4)), "logprobs": np.full(32, -1000.0, np.float32)}),
            ScoredGroup(**{**vars(group(3, rewards, gid=5)), "rewards": np.array([1e30] + [0.0] * 7, np.float32)}),
            ScoredGroup(**{**vars(group(3, rewards, gid=6)), "completion_ids": np.full(32, 10**6, np.int32)}),
            ScoredGroup(**{**vars(group(3, rewards, gid=7)), "task": "reverse"}),
            group(3, [1.0], gid=8),  # n = 1
            ScoredGroup(**{**vars(group(3, rewards, gid=9)), "session": 2}),  # a second process as t-0
        ]
        hostile += [  # work requests (pacing) are bounded like groups
            WorkRequest(server_id="t-0", session=1, request_id=0, version=2**40, prompts=4),  # future version
            WorkRequest(server_id="t-0", session=1, request_id=1, version=0, prompts=4),  # below the floor
            WorkRequest(server_id="t-0", session=2, request_id=0, version=3, prompts=4),  # a second process as t-0
            WorkGrant(request_id=0, prompts=4, group_size=8, lease_s=1.0),  # a grant sent to the selector
        ]
        for msg in hostile:
            send(push, msg)
        header = msgpack.packb(
            {
                "t": "work_request",
                "v": PROTOCOL_VERSION,
                "a": [],
                "f": {  # decodes, absurd
                    "server_id": "t-0",
                    "session": 1,
                    "request_id": 2,
                    "version": 3,
                    "prompts": 10**6,
                },
            }
        )
        push.send_multipart([header])
        for i in range(10):  # a flood of new identities: only max_peers are tracked
            send(push, Heartbeat(server_id=f"flood-{i}", version=0, groups_sent=0, state="generating", session=i))
        for _ in range(200):
            push.send_multipart([b"\xc1not msgpack"])
        send(push, WorkRequest(server_id="t-0", session=1, request_id=3, version=3, prompts=4))  # honest
        send(push, group(3, rewards, gid=10))
        batch = reply(dealer, pub, 3, floor=1)
        # The second process as t-0 is told once, for its work request: its group came when t-0 had not
        # spoken since (it could have been t-0 restarted; Identities.holder_alive). Then the honest answer.
        told, grant = replies(push, 2)
        assert isinstance(told, Refusal) and told.reason == "server_id_in_use" and told.server_id == "t-0"
        assert told.detail.startswith("held by session 1, heard ")
        assert isinstance(grant, WorkGrant) and grant.request_id == 3
        assert 1 <= grant.prompts <= 4 and grant.group_size == 8
        assert batch.request_id == 1 and batch.version == 3 and batch.size == 8
        assert set(batch.versions.tolist()) == {3} and batch.group_index.max() == 1
        stats = batch.stats
        assert stats["rejected/duplicate"] == 1 and stats["rejected/server_id_in_use"] == 2
        assert stats["rejected/version_future"] == 3 and stats["rejected/version_discarded"] == 2
        assert stats["rejected/unknown_type"] == 1 and stats["rejected/invariant"] == 1
        assert stats["rejected/logprob"] == 1 and stats["rejected/reward"] == 1 and stats["rejected/token_id"] == 1
        assert stats["rejected/task"] == 1 and stats["rejected/group_size"] == 1
        assert stats["rejected/too_many_peers"] == 7 and stats["rejected/malformed"] == 200
        assert stats["identity/gaps"] == 1  # t-0 sent no id 9 (the second process did, and was refused)
        assert proc.poll() is None
    finally:
        close(push, dealer, pub)
        ctx.term()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    warnings = [line for line in log_path.read_text().splitlines() if "WARNING" in line and "rejected" in line]
    assert len(warnings) <= 14, "rejections must be logged at most once per reason per interval"


def test_a_key_speaks_only_as_its_own_id_and_a_taken_id_is_told(
    spawn, run_dir: Path, net_overrides: list[str], tmp_path: Path
) -> None:
    """Issue 19: with CURVE keys, rollout b's valid key speaking as "zed" (whose key exists too) is
    rejected, counted and told; as "b" it is trained. A second connection as "b" while b lives is told
    who holds the id."""
    keys = tmp_path / "keys"
    create_keys(keys, ["b", "zed"])
    overrides = [
        f"run.dir={run_dir}",
        "rollout.group_size=8",
        "selector.keep=4",
        "learner.groups_per_step=2",
        "rollout.max_new_tokens=4",
        "rollout.heartbeat_s=10",  # b holds its id for 30 s of silence: ample on a slow machine
        "selector.peer_timeout_s=60",
        "net.auth=on",
        f"net.keys_dir={keys}",
        *net_overrides,
    ]
    cfg = load_config(None, overrides)
    proc = spawn("selector.server", *overrides, log=run_dir.parent / "selector.log")
    rollout_b, learner = load_auth(cfg.net, "rollout", "b"), load_auth(cfg.net, "learner")
    assert rollout_b is not None and learner is not None
    ctx = zmq.Context()
    push, dealer = group_sender(ctx, cfg.net, rollout_b), batch_client(ctx, cfg.net, learner)
    pub = announce_publisher(ctx, cfg.net, learner)
    second = group_sender(ctx, cfg.net, rollout_b)  # another process with a copy of b's key
    rewards = [1, 0, 0, 0, 1, 0, 0, 1]
    try:
        as_zed: list[Message] = [
            Hello(server_id="zed", host="box-b", pid=7, engine="torch", session=1),
            Heartbeat(server_id="zed", version=0, groups_sent=0, state="generating", session=1),
            group(3, rewards, server="zed", gid=0),
            WorkRequest(server_id="zed", session=1, request_id=0, version=3, prompts=4),
        ]
        for msg in as_zed:
            send(push, msg)
        send(push, Hello(server_id="b", host="box-b", pid=4242, engine="torch", session=1))
        send(push, group(3, rewards, server="b", gid=0))
        send(push, group(3, rewards, server="b", gid=1))
        send(dealer, BatchRequest(request_id=1, version=3, num_groups=2, session=LEARNER))
        batch = reply(dealer, pub, 3)
        assert batch.servers == ["b"] and batch.size == 8
        assert batch.stats["rejected/id_mismatch"] == 4 and batch.stats["groups/received"] == 2
        told = replies(push, 4)
        for r in told:
            assert isinstance(r, Refusal) and r.reason == "id_mismatch" and r.server_id == "zed"
            assert "made for 'b'" in r.detail and "--server-id" in r.detail

        # A second process as b while b lives: told once b has spoken after it (before, it could be b restarted).
        # Both keep speaking, as live processes do; messages of two connections arrive in any order.
        send(second, Hello(server_id="b", host="box-c", pid=99, engine="torch", session=2))
        for _ in range(TIMEOUT_MS // 100):
            send(push, Heartbeat(server_id="b", version=3, groups_sent=2, state="generating", session=1))
            send(second, Heartbeat(server_id="b", version=3, groups_sent=0, state="generating", session=2))
            if second.poll(100):
                break
        refusal = replies(second, 1)[0]
        assert isinstance(refusal, Refusal) and refusal.reason == "server_id_in_use" and refusal.server_id == "b"
        assert "pid 4242 on box-b" in refusal.detail and "session 1," in refusal.detail
        assert not push.poll(100)  # the holder is told nothing
        assert proc.poll() is None
    finally:
        close(push, second, dealer, pub)
        ctx.term()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    totals = read_metrics(run_dir / "metrics" / "selector.jsonl")[-1]
    assert totals["total/rejected/id_mismatch"] == 4 and totals["total/rejected/server_id_in_use"] >= 2


def test_a_group_of_the_next_version_waits_for_its_announcement_a_far_future_one_is_rejected(
    spawn, run_dir, net_overrides
):
    """A rollout server may hear of version V+1 before the selector does (issue 19: 8 of 5,164 honest
    groups were rejected): its group is held until the announcement arrives, then trained. A version
    further ahead is still rejected at once."""
    overrides = [
        f"run.dir={run_dir}",
        "rollout.group_size=8",
        "selector.keep=4",
        "learner.groups_per_step=1",
        "rollout.pacing=free",  # a work request is answered at once: the test knows what was read before it
        *net_overrides,
    ]
    cfg = load_config(None, overrides)
    proc = spawn("selector.server", *overrides, log=run_dir.parent / "selector.log")
    ctx = zmq.Context()
    push, dealer, pub = group_sender(ctx, cfg.net), batch_client(ctx, cfg.net), announce_publisher(ctx, cfg.net)
    rewards = [1, 0, 0, 0, 1, 0, 0, 1]
    try:
        send(push, group(0, rewards, gid=0))
        send(dealer, BatchRequest(request_id=1, version=0, num_groups=1, session=LEARNER))
        assert reply(dealer, pub, 0).versions.tolist() == [0] * 4  # the selector is at version 0
        send(push, group(3, rewards, gid=1))  # far future: rejected
        send(push, group(1, rewards, gid=2))  # the next version, not announced yet: held
        send(push, WorkRequest(server_id="t-0", session=1, request_id=0, version=0, prompts=4))
        assert push.poll(TIMEOUT_MS)  # its grant: the selector has read both groups
        assert recv(push, WorkGrant)[1].request_id == 0
        send(dealer, BatchRequest(request_id=2, version=1, num_groups=1, session=LEARNER))
        batch = reply(dealer, pub, 1)  # the announcement of version 1 releases the held group
        assert batch.request_id == 2 and batch.versions.tolist() == [1] * 4
        assert batch.stats["rejected/version_future"] == 1
        assert not {k for k in batch.stats if k.startswith("rejected/")} - {"rejected/version_future"}
        assert proc.poll() is None
    finally:
        close(push, dealer, pub)
        ctx.term()


def test_only_the_announced_learners_batch_requests_are_served(spawn, run_dir, net_overrides):
    """Issue 19: on loopback without auth a third process's batch requests took the learner's batch. A
    request is served only from the session the learner announces; the learner's own request sent before
    its announcement is served once it is heard, a restarted learner (new session) at once too, and
    forged requests get nothing and are counted."""
    proc, cfg, log_path = start_selector(spawn, run_dir, net_overrides)
    ctx = zmq.Context()
    push, dealer, pub = group_sender(ctx, cfg.net), batch_client(ctx, cfg.net), announce_publisher(ctx, cfg.net)
    forger = batch_client(ctx, cfg.net)
    rewards = [1, 0, 0, 0, 1, 0, 0, 1]
    try:
        for gid in range(3):
            send(push, group(0, rewards, gid=gid))
        send(forger, BatchRequest(request_id=7, version=0, num_groups=1, session=LEARNER + 1))  # before the learner
        send(dealer, BatchRequest(request_id=1, version=0, num_groups=1, session=LEARNER))  # before its announcement
        assert reply(dealer, pub, 0).request_id == 1  # served once the announcement is heard
        for i in range(6):  # more forged sessions than are held: the oldest are dropped and counted at once
            send(forger, BatchRequest(request_id=8 + i, version=0, num_groups=1, session=LEARNER + 2 + i))
        wait_for(lambda: line_matching(log_path, "not from the learner's session"), 20, "forged requests counted")
        send(dealer, BatchRequest(request_id=2, version=0, num_groups=1, session=LEARNER))
        batch = reply(dealer, pub, 0)
        assert batch.request_id == 2
        restarted = batch_client(ctx, cfg.net)  # a new learner process: a new session
        try:
            send(restarted, BatchRequest(request_id=1, version=0, num_groups=1, session=LEARNER + 100))
            assert reply(restarted, pub, 0, session=LEARNER + 100).request_id == 1
        finally:
            close(restarted)
        assert not forger.poll(0)  # no batch ever reached the forger
        assert proc.poll() is None
    finally:
        close(push, dealer, pub, forger)
        ctx.term()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    totals = read_metrics(run_dir / "metrics" / "selector.jsonl")[-1]
    assert totals["total/rejected/batch_not_learner"] >= 3  # 7 forged sessions, at most 4 held
    assert "not from the learner's session" in log_path.read_text()


def test_one_peer_flooding_groups_gets_its_budget_and_the_others_theirs(spawn, run_dir, net_overrides):
    """Issue 19, fair shares: each server id may deliver ``selector.peer_groups_per_s`` groups a second
    outside pacing grants (a burst of 4 s worth). A peer sending 40 groups at once gets its burst of 8
    (and what refills meanwhile); the rest are rejected and counted before any work is spent on them,
    while another peer's groups all enter, and the warning names the bound to raise."""
    proc, cfg, log_path = start_selector(  # a burst of max(4 s, 4 calls) = 8 groups
        spawn, run_dir, net_overrides, "selector.peer_groups_per_s=2", "rollout.prompts_per_call=1"
    )
    ctx = zmq.Context()
    push, dealer, pub = group_sender(ctx, cfg.net), batch_client(ctx, cfg.net), announce_publisher(ctx, cfg.net)
    honest = group_sender(ctx, cfg.net)
    rewards = [1, 0, 0, 0, 1, 0, 0, 1]
    try:
        for gid in range(40):
            send(push, group(0, rewards, server="flood", gid=gid))
        for gid in range(3):  # another server: its own connection (the flooding one is dropped undecoded)
            send(honest, group(0, rewards, server="honest", gid=gid))
        send(dealer, BatchRequest(request_id=1, version=0, num_groups=1, session=LEARNER))
        assert reply(dealer, pub, 0).request_id == 1
        wait_for(lambda: line_matching(log_path, "peer_groups_per_s"), 20, "the flood warned about")
    finally:
        close(push, dealer, pub, honest)
        ctx.term()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    totals = read_metrics(run_dir / "metrics" / "selector.jsonl")[-1]
    flooded, refused = totals["total/groups/received/flood"], totals["total/rejected/peer_rate"]
    assert flooded + refused == 40 and 8 <= flooded <= 12  # the burst, plus 2/s while reading
    assert totals["total/groups/received/honest"] == 3
    assert "'flood' sends more than selector.peer_groups_per_s=2" in log_path.read_text()


def test_a_connection_flooding_batch_requests_is_dropped_undecoded_and_the_learner_still_served(
    spawn, run_dir, net_overrides
):
    """Issue 19, fair shares: a connection other than the learner's gets ``STRANGER_PER_S`` requests a
    second decoded (a burst of twice that); the rest of a flood is dropped before decoding and counted,
    and the learner's own requests are served throughout (each batch reports what was rejected since
    the one before)."""
    proc, cfg, _ = start_selector(spawn, run_dir, net_overrides)
    ctx = zmq.Context()
    push, dealer, pub = group_sender(ctx, cfg.net), batch_client(ctx, cfg.net), announce_publisher(ctx, cfg.net)
    forger = batch_client(ctx, cfg.net)
    rewards = [1, 0, 0, 0, 1, 0, 0, 1]
    counted = 0.0
    try:
        send(push, group(0, rewards, gid=0))
        send(dealer, BatchRequest(request_id=1, version=0, num_groups=1, session=LEARNER))
        assert reply(dealer, pub, 0).request_id == 1  # the learner is known
        for i in range(200):
            send(forger, BatchRequest(request_id=i, version=0, num_groups=1, session=LEARNER + 1))
        deadline = time.monotonic() + 20.0
        for rid in itertools.count(2):  # the learner goes on asking; the flood is read between its requests
            assert time.monotonic() < deadline, f"{counted:g} forged requests counted after 20 s"
            send(push, group(0, rewards, gid=rid))
            send(dealer, BatchRequest(request_id=rid, version=0, num_groups=1, session=LEARNER))
            batch = reply(dealer, pub, 0)
            assert batch.request_id == rid
            counted += batch.stats.get("rejected/batch_not_learner", 0.0)
            if counted >= 200 - 8 - 4:
                break
        assert not forger.poll(0)
    finally:
        close(push, dealer, pub, forger)
        ctx.term()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    # all but a burst of 8 (and the refill) dropped undecoded and counted; decoded one at a time, the 200
    # would have been one held request, replaced 199 times and counted at most once a second
    assert 200 - 8 - 4 <= counted <= 200
