"""The one place that builds ZeroMQ sockets. Each builder's docstring is that link's contract.

Links (DESIGN.md): the selector and the learner bind, rollout servers connect, so a rollout server
needs only two hosts to join from any machine at any time.

===========  ==================  =====================  ==========================================
link         binds               connects               messages
===========  ==================  =====================  ==========================================
groups       selector PULL       rollout PUSH           Hello, Heartbeat, ScoredGroup
batches      selector ROUTER     learner rank-0 DEALER  BatchRequest -> TrainBatch
announce     learner PUB         rollout, selector SUB  WeightsAnnouncement
weights      learner ROUTER      rollout DEALER         WeightsRequest -> Weights
===========  ==================  =====================  ==========================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import zmq

from protocol.codec import decode, encode
from protocol.messages import Message, ProtocolError

if TYPE_CHECKING:
    from protocol.config import NetConfig

M = TypeVar("M", bound=Message)
MIB = 1 << 20


def _socket(ctx: zmq.Context, kind: int, *, sndhwm: int = 1000, rcvhwm: int = 1000, maxmsgsize: int = -1) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.linger = 0  # never block process exit on unsent messages: every link re-requests what it needs
    sock.sndhwm, sock.rcvhwm = sndhwm, rcvhwm
    sock.setsockopt(zmq.MAXMSGSIZE, maxmsgsize)  # per frame; a larger frame disconnects the peer
    return sock


def _bind(sock: zmq.Socket, host: str, port: int, key: str) -> zmq.Socket:
    try:
        sock.bind(f"tcp://{host}:{port}")
    except zmq.ZMQError as e:
        sock.close(0)
        raise OSError(f"cannot bind tcp://{host}:{port} ({e}); is another podsrl run using it? "
                      f"Choose another port with net.{key}=...") from None
    return sock


def _connect(sock: zmq.Socket, host: str, port: int) -> zmq.Socket:
    sock.connect(f"tcp://{host}:{port}")
    return sock


def group_receiver(ctx: zmq.Context, net: NetConfig) -> zmq.Socket:
    """Selector side of *groups*: PULL, binds. Receive HWM ``net.group_hwm`` messages; when the
    selector's buffer is full it stops reading, the queue fills and rollout servers block (back-pressure),
    so nothing is dropped in transit. Frames over 4x ``max_group_mib`` disconnect the sender (hard
    guard); messages over ``max_group_mib`` are rejected and counted by :func:`recv`."""
    sock = _socket(ctx, zmq.PULL, rcvhwm=net.group_hwm, maxmsgsize=4 * net.max_group_mib * MIB)
    return _bind(sock, net.bind_host, net.group_port, "group_port")


def group_sender(ctx: zmq.Context, net: NetConfig) -> zmq.Socket:
    """Rollout side of *groups*: PUSH, connects to the selector. Send HWM 2: a finished group waits in
    the rollout server (which polls POLLOUT with ``send_timeout_s``) instead of piling up in queues."""
    return _connect(_socket(ctx, zmq.PUSH, sndhwm=2), net.selector_host, net.group_port)


def batch_server(ctx: zmq.Context, net: NetConfig) -> zmq.Socket:
    """Selector side of *batches*: ROUTER, binds. One reply per request; a learner that restarts
    comes back with a new identity and simply asks again, so no batch is sent without a request."""
    sock = _socket(ctx, zmq.ROUTER, maxmsgsize=MIB)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished learner raises instead of vanishing
    return _bind(sock, net.bind_host, net.batch_port, "batch_port")


def batch_client(ctx: zmq.Context, net: NetConfig) -> zmq.Socket:
    """Learner rank-0 side of *batches*: DEALER, connects. Receives at most ``max_batch_mib`` frames."""
    return _connect(_socket(ctx, zmq.DEALER, maxmsgsize=net.max_batch_mib * MIB), net.selector_host, net.batch_port)


def announce_publisher(ctx: zmq.Context, net: NetConfig) -> zmq.Socket:
    """Learner side of *announce*: PUB, binds. Announcements are idempotent (the latest wins), so a
    slow subscriber may miss some: it always fetches the newest version over *weights*."""
    return _bind(_socket(ctx, zmq.PUB, sndhwm=100), net.bind_host, net.announce_port, "announce_port")


def announce_subscriber(ctx: zmq.Context, net: NetConfig) -> zmq.Socket:
    """Rollout/selector side of *announce*: SUB to everything, connects to the learner."""
    sock = _socket(ctx, zmq.SUB, maxmsgsize=MIB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    return _connect(sock, net.learner_host, net.announce_port)


def weight_server(ctx: zmq.Context, net: NetConfig) -> zmq.Socket:
    """Learner side of *weights*: ROUTER, binds. Each reply is one zero-copy multipart message of the
    whole version; a slow peer's reply waits in its own pipe, so a fast peer never waits for it."""
    sock = _socket(ctx, zmq.ROUTER, sndhwm=4, maxmsgsize=MIB)
    return _bind(sock, net.bind_host, net.weights_port, "weights_port")


def weight_client(ctx: zmq.Context, net: NetConfig) -> zmq.Socket:
    """Rollout side of *weights*: DEALER, connects. No size limit: a version is as big as the model."""
    return _connect(_socket(ctx, zmq.DEALER), net.learner_host, net.weights_port)


def send(sock: zmq.Socket, msg: Message, *route: bytes, flags: int = 0) -> None:
    """Send one message (after ROUTER identity frames ``route``); arrays go zero-copy."""
    sock.send_multipart([*route, *encode(msg)], flags=flags, copy=False)


def recv(sock: zmq.Socket, expect: type[M] | tuple[type[Message], ...], *, routed: bool = False,
         max_bytes: int | None = None, flags: int = 0) -> tuple[list[bytes], M]:
    """Receive one message; returns (route frames, message). Raises ProtocolError on any bad payload,
    after the whole multipart message has been consumed, so the socket stays usable."""
    frames = sock.recv_multipart(flags=flags, copy=False)
    route = [f.bytes for f in frames[:1]] if routed else []
    body = [f.buffer for f in frames[len(route):]]
    size = sum(len(b) for b in body)
    if max_bytes is not None and size > max_bytes:
        raise ProtocolError("too_large", f"message of {size} bytes > limit {max_bytes}")
    return route, decode(body, expect)


def close(*socks: zmq.Socket | None) -> None:
    for sock in socks:
        if sock is not None:
            sock.close(linger=0)
