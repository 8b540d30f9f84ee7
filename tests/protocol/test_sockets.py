"""Tests for protocol.sockets over real ZeroMQ sockets on loopback (no sleeps: poll with a timeout)."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import zmq
from helpers import free_ports

from protocol import sockets
from protocol.config import NetConfig
from protocol.messages import (
    BatchRequest,
    Heartbeat,
    Hello,
    Message,
    ProtocolError,
    ScoredGroup,
    TrainBatch,
    Weights,
    WeightsAnnouncement,
    WeightsRequest,
    WorkGrant,
)
from protocol.weights import digest

TIMEOUT_MS = 5000
GROUP_TYPES = (Hello, Heartbeat, ScoredGroup)


@pytest.fixture
def net() -> NetConfig:
    group, batch, announce, weights = free_ports(4)
    return NetConfig(group_port=group, batch_port=batch, announce_port=announce, weights_port=weights, max_group_mib=1)


_OPENED: list[zmq.Socket] = []


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    """A fresh context; every socket passed to track() is closed (linger 0) afterwards, then the context."""
    c = zmq.Context()
    try:
        yield c
    finally:
        sockets.close(*_OPENED)
        _OPENED.clear()
        c.destroy(linger=0)


def track(ctx: zmq.Context, sock: zmq.Socket) -> zmq.Socket:
    assert sock.context is ctx
    _OPENED.append(sock)
    return sock


def wait_readable(sock: zmq.Socket) -> None:
    assert sock.poll(TIMEOUT_MS, zmq.POLLIN), f"nothing arrived within {TIMEOUT_MS} ms"


def scored_group(group_id: int = 1, n: int = 4, length: int = 3) -> ScoredGroup:
    ids = np.arange(n * length, dtype=np.int32) % 12 + 4
    return ScoredGroup(
        server_id="box-7/0",
        session=77,
        group_id=group_id,
        version=3,
        task="copy",
        gen_seconds=0.5,
        prompt_ids=np.array([1, 5, 6, 7, 2], np.int32),
        completion_ids=ids,
        completion_lens=np.full(n, length, np.int32),
        logprobs=-np.linspace(0.1, 1.0, n * length, dtype=np.float32),
        rewards=np.linspace(0, 1, n, dtype=np.float32),
    )


def assert_same_group(got: ScoredGroup, want: ScoredGroup) -> None:
    assert isinstance(got, ScoredGroup)
    for f in dataclasses.fields(want):
        g, w = getattr(got, f.name), getattr(want, f.name)
        if isinstance(w, np.ndarray):
            assert np.array_equal(g, w), f.name
        else:
            assert g == w, f.name


# --- groups link ---


def test_group_round_trip(ctx: zmq.Context, net: NetConfig) -> None:
    rx = track(ctx, sockets.group_receiver(ctx, net))
    tx = track(ctx, sockets.group_sender(ctx, net))
    hello = Hello(server_id="box-7/0", host="localhost", pid=123, engine="torch")
    group = scored_group()
    sockets.send(tx, hello)
    sockets.send(tx, group)
    sockets.send(tx, Heartbeat(server_id="box-7/0", version=3, groups_sent=1, state="generating"))

    wait_readable(rx)
    got: Message
    route, got = sockets.recv(rx, GROUP_TYPES, routed=True)
    assert len(route) == 1 and got == hello  # the sender's ROUTER identity: work grants go back to it
    wait_readable(rx)
    again, got = sockets.recv(rx, GROUP_TYPES, routed=True, max_bytes=net.max_group_mib * sockets.MIB)
    assert again == route and isinstance(got, ScoredGroup)
    assert_same_group(got, group)
    assert not got.rewards.flags.owndata  # a view of the received frame
    wait_readable(rx)
    assert isinstance(sockets.recv(rx, GROUP_TYPES, routed=True)[1], Heartbeat)
    grant = WorkGrant(request_id=3, prompts=2, group_size=16, lease_s=5.0)
    sockets.send(rx, grant, *route)
    wait_readable(tx)
    assert sockets.recv(tx, WorkGrant)[1] == grant


def test_too_large_message_is_consumed_and_the_next_one_arrives(ctx: zmq.Context, net: NetConfig) -> None:
    rx = track(ctx, sockets.group_receiver(ctx, net))
    tx = track(ctx, sockets.group_sender(ctx, net))
    big, small = scored_group(group_id=1, n=16, length=200), scored_group(group_id=2)
    limit = 4096
    assert sum(f.nbytes for f in (big.completion_ids, big.logprobs)) > limit
    sockets.send(tx, big)
    sockets.send(tx, small)

    wait_readable(rx)
    with pytest.raises(ProtocolError) as info:
        sockets.recv(rx, GROUP_TYPES, routed=True, max_bytes=limit)
    assert info.value.reason == "too_large" and str(limit) in str(info.value)

    wait_readable(rx)
    got: Message
    _, got = sockets.recv(rx, GROUP_TYPES, routed=True, max_bytes=limit)
    assert isinstance(got, ScoredGroup)
    assert_same_group(got, small)
    assert rx.poll(0) == 0  # nothing left over from the big one


def test_bad_payloads_leave_the_socket_usable(ctx: zmq.Context, net: NetConfig) -> None:
    rx = track(ctx, sockets.group_receiver(ctx, net))
    tx = track(ctx, sockets.group_sender(ctx, net))
    tx.send_multipart([b"\xc1garbage", b"more", b"frames"])
    sockets.send(tx, BatchRequest(request_id=1, version=0, num_groups=1))  # valid, but not on this link
    group = scored_group(group_id=5)
    sockets.send(tx, group)

    wait_readable(rx)
    with pytest.raises(ProtocolError) as info:
        sockets.recv(rx, GROUP_TYPES, routed=True)
    assert info.value.reason == "malformed"
    wait_readable(rx)
    with pytest.raises(ProtocolError) as info:
        sockets.recv(rx, GROUP_TYPES, routed=True)
    assert info.value.reason == "unknown_type"
    wait_readable(rx)
    assert_same_group(sockets.recv(rx, GROUP_TYPES, routed=True)[1], group)


def test_received_arrays_are_read_only(ctx: zmq.Context, net: NetConfig) -> None:
    rx = track(ctx, sockets.group_receiver(ctx, net))
    tx = track(ctx, sockets.group_sender(ctx, net))
    sockets.send(tx, scored_group())
    wait_readable(rx)
    got: Message
    _, got = sockets.recv(rx, GROUP_TYPES, routed=True)
    assert isinstance(got, ScoredGroup) and not got.rewards.flags.writeable


# --- batches and weights links (ROUTER/DEALER) ---


def test_batch_request_and_reply(ctx: zmq.Context, net: NetConfig) -> None:
    server = track(ctx, sockets.batch_server(ctx, net))
    client = track(ctx, sockets.batch_client(ctx, net))
    sockets.send(client, BatchRequest(request_id=9, version=4, num_groups=1))
    wait_readable(server)
    route, req = sockets.recv(server, BatchRequest, routed=True)
    assert len(route) == 1 and req == BatchRequest(request_id=9, version=4, num_groups=1)

    batch = TrainBatch(
        request_id=9,
        version=4,
        servers=["box-7/0"],
        stats={"groups": 1},
        prompt_ids=np.array([1, 5, 2], np.int32),
        prompt_lens=np.array([3], np.int32),
        completion_ids=np.array([5, 3], np.int32),
        completion_lens=np.array([2], np.int32),
        logprobs=np.array([-0.5, -0.1], np.float32),
        advantages=np.array([0.0], np.float32),
        rewards=np.array([1.0], np.float32),
        versions=np.array([4], np.int64),
        group_index=np.array([0], np.int32),
        server_index=np.array([0], np.int32),
        group_sessions=np.array([1], np.int64),
        group_seqs=np.array([0], np.int64),
    )
    sockets.send(server, batch, *route)
    wait_readable(client)
    _, got = sockets.recv(client, TrainBatch)
    assert got.request_id == 9 and got.servers == ["box-7/0"] and got.stats == {"groups": 1}
    assert np.array_equal(got.completion_ids, batch.completion_ids)


def test_weights_request_and_reply(ctx: zmq.Context, net: NetConfig) -> None:
    server = track(ctx, sockets.weight_server(ctx, net))
    client = track(ctx, sockets.weight_client(ctx, net))
    sockets.send(client, WeightsRequest(version=-1))
    wait_readable(server)
    route, req = sockets.recv(server, WeightsRequest, routed=True)
    assert req.version == -1

    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8)  # larger than the server's 1 MiB
    weights = Weights(
        version=2,
        model_config="{}",
        files=[],
        tensors=[["w", "uint8", [data.shape[0]], 0, data.shape[0], digest(data)]],
        data=data,
    )
    sockets.send(server, weights, *route)
    wait_readable(client)
    _, got = sockets.recv(client, Weights)
    assert got.tensors == weights.tensors and np.array_equal(got.data, data)


def test_announcements_reach_a_subscriber(ctx: zmq.Context, net: NetConfig) -> None:
    pub = track(ctx, sockets.announce_publisher(ctx, net))
    sub = track(ctx, sockets.announce_subscriber(ctx, net))
    ann = WeightsAnnouncement(version=7, final=True)
    # PUB drops messages until the subscription has propagated: re-publish (idempotent) until one lands.
    for _ in range(TIMEOUT_MS // 50):
        sockets.send(pub, ann)
        if sub.poll(50, zmq.POLLIN):
            break
    else:
        pytest.fail("no announcement arrived")
    assert sockets.recv(sub, WeightsAnnouncement)[1] == ann


# --- binding errors ---


@pytest.mark.parametrize(
    ("builder", "link"),
    [
        (sockets.group_receiver, "group"),
        (sockets.batch_server, "batch"),
        (sockets.announce_publisher, "announce"),
        (sockets.weight_server, "weights"),
    ],
)
def test_port_in_use(ctx: zmq.Context, net: NetConfig, builder: Callable[..., zmq.Socket], link: str) -> None:
    port = getattr(net, f"{link}_port")
    first = track(ctx, builder(ctx, net))
    with pytest.raises(OSError) as info:
        track(ctx, builder(ctx, net))
    msg = str(info.value)
    assert f"tcp://{net.bind_host}:{port}" in msg  # which port
    assert "net." in msg and "_port" in msg  # how to change it
    assert first.closed is False


def test_port_in_use_by_another_program(ctx: zmq.Context, net: NetConfig) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.bind((net.bind_host, net.group_port))
        other.listen()
        with pytest.raises(OSError, match=str(net.group_port)):
            track(ctx, sockets.group_receiver(ctx, net))


def test_port_in_use_names_the_config_key(ctx: zmq.Context, net: NetConfig) -> None:
    track(ctx, sockets.group_receiver(ctx, net))
    with pytest.raises(OSError, match="net.group_port"):
        track(ctx, sockets.group_receiver(ctx, net))
