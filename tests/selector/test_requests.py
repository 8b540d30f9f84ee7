"""Which batch requests the selector serves (selector/requests.py), without sockets."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

import selector.server as server
from protocol.budget import PAUSE_S
from protocol.config import load_config
from protocol.messages import BatchRequest
from protocol.sockets import batch_client, close, send
from selector.requests import LearnerRequests


def req(session: int, request_id: int = 1) -> BatchRequest:
    return BatchRequest(request_id=request_id, version=0, num_groups=1, session=session)


def test_only_the_announced_session_is_served_others_are_held_then_counted() -> None:
    gate = LearnerRequests(wait_s=1.0, max_held=2)
    gate.heard(5)
    assert gate.arrive([b"a"], req(5), now=0.0) == ([b"a"], req(5))
    assert gate.arrive([b"f"], req(6), now=0.0) is None and gate.rejected == 0  # may be a restarted learner
    gate.expire(now=0.5)
    assert gate.rejected == 0 and 6 in gate.held
    gate.expire(now=1.0)
    assert gate.rejected == 1 and not gate.held


def test_a_restarted_learners_early_request_is_served_when_its_announcement_is_heard() -> None:
    gate = LearnerRequests()
    gate.heard(5)
    assert gate.arrive([b"new"], req(9, request_id=1), now=0.0) is None
    assert gate.arrive([b"new"], req(9, request_id=2), now=0.1) is None  # a re-sent request replaces it
    assert gate.heard(9) == ([b"new"], req(9, request_id=2))
    assert gate.session == 9 and not gate.held and gate.rejected == 0


def test_before_any_announcement_nothing_is_counted_and_held_requests_stay_bounded() -> None:
    gate = LearnerRequests(wait_s=1.0, max_held=2)
    for s in range(10):
        gate.arrive([b"x"], req(s), now=0.0)
    gate.expire(now=5.0)
    assert gate.rejected == 0 and not gate.held  # the learner is not known yet: nobody is hostile
    gate.heard(100)
    for s in range(5):
        gate.arrive([b"x"], req(s), now=6.0)
    assert len(gate.held) == 2 and gate.rejected == 3  # the oldest sessions are dropped first
    assert list(gate.held) == [3, 4]


def test_a_stream_of_requests_cannot_keep_a_forged_session_waiting() -> None:
    """A flood of one forged session replaced its held request forever and was never counted; the
    session's wait now runs from its first request, and each expiry is counted."""
    gate = LearnerRequests(wait_s=1.0)
    gate.heard(5)
    for i in range(30):  # 3 s of requests, 10 a second
        gate.arrive([b"f"], req(6, request_id=i), now=i / 10)
        gate.expire(now=i / 10)
    assert gate.rejected == 2 and 6 in gate.held  # dropped at 1.0 and 2.0; the third is waiting


def test_the_batches_link_is_read_within_a_budget_then_left_alone_for_a_pause(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, net_overrides: list[str]
) -> None:
    """All connections together get ``REQUEST_READS_PER_S`` reads a second (here 16, a burst of 16):
    beyond, the batches link is not polled for ``protocol.budget.PAUSE_S`` and the rest of a flood waits in its own
    queue instead of costing the selector's CPU; the loop wakes up in time to listen again."""
    monkeypatch.setattr(server, "REQUEST_READS_PER_S", 16.0)
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", *net_overrides])
    sel = server.Selector(cfg)
    forger = batch_client(sel.ctx, cfg.net)
    poller = zmq.Poller()
    poller.register(sel.batches, zmq.POLLIN)
    try:
        for i in range(100):
            send(forger, req(6, request_id=i))
        assert poller.poll(5000)
        for _ in range(16):  # bursts of at most 64 each, until the budget runs out
            if sel.request_reads.paused_until:
                break
            sel.read_requests(poller)
        assert sel.request_reads.paused_until and sel.request_reads.pauses == 1
        assert sel.strangers.refused == 16 - 8  # 16 read: 8 decoded (a stranger's burst), 8 dropped undecoded
        assert not poller.poll(0)  # not listened to during the pause, though 84 requests wait
        assert sel.poll_timeout_ms() <= 1e3 * PAUSE_S
        left = 0
        while sel.batches.poll(0):
            sel.batches.recv_multipart()
            left += 1
        assert left == 100 - 16
    finally:
        close(forger)
        sel.shut_down()
