"""The one place that builds ZeroMQ sockets. Each builder's docstring is that link's contract.

Links (DESIGN.md): the selector and the learner bind, rollout servers connect, so a rollout server
needs only two hosts to join from any machine at any time.

===========  ==================  =====================  ==========================================
link         binds               connects               messages
===========  ==================  =====================  ==========================================
groups       selector ROUTER     rollout DEALER         Hello, Heartbeat, ScoredGroup, WorkRequest -> WorkGrant, Refusal
batches      selector ROUTER     learner rank-0 DEALER  BatchRequest -> TrainBatch
announce     learner XPUB        rollout, selector SUB  WeightsAnnouncement
weights      learner ROUTER      rollout DEALER         WeightsRequest -> WeightsChunk
===========  ==================  =====================  ==========================================

Authentication (``protocol/auth.py``): every builder takes this process's ``auth`` (from
``protocol.auth.load_auth``; None = off). With keys, the binder is the CURVE server behind a ZAP
handler that admits only allowlisted public keys, and :func:`recv` rejects any message whose
``User-Id`` is not allowlisted (reason ``unauthenticated``); :func:`recv_named` also returns the
names the sender's key was made for. Without keys a builder refuses to build a socket for a config
that requires them.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, TypeVar

import zmq
import zmq.asyncio

from protocol import auth as _auth
from protocol.codec import decode, encode
from protocol.messages import Message, ProtocolError

if TYPE_CHECKING:
    from protocol.auth import Allowlist, Auth
    from protocol.config import NetConfig

M = TypeVar("M", bound=Message)
MIB = 1 << 20
_ALLOW: weakref.WeakKeyDictionary[zmq.Socket, Allowlist] = weakref.WeakKeyDictionary()  # server -> its clients


def _socket(ctx: zmq.Context, kind: int, *, sndhwm: int = 1000, rcvhwm: int = 1000, maxmsgsize: int = -1) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.linger = 0  # never block process exit on unsent messages: every link re-requests what it needs
    sock.sndhwm, sock.rcvhwm = sndhwm, rcvhwm
    sock.setsockopt(zmq.MAXMSGSIZE, maxmsgsize)  # per frame; a larger frame disconnects the peer
    return sock


def _secure(sock: zmq.Socket, net: NetConfig, link: str, auth: Auth | None, server: bool) -> zmq.Socket:
    """CURVE server (behind the ZAP handler, messages checked in :func:`recv`) or client of ``link``."""
    if auth is None:
        if _auth.auth_enabled(net):
            sock.close(0)
            _auth.check(net)  # names the fix when no keys are configured at all
            raise _auth.AuthError(
                f"the {link} link requires authentication (net.auth={net.auth!r}): pass "
                "auth=protocol.auth.load_auth(net, role) to its socket builder"
            )
        return sock
    try:
        if server:
            _ALLOW[sock] = _auth.serve(sock, link, auth)
        else:
            _auth.connect_as(sock, link, auth)
    except BaseException:
        close(sock)  # an open socket would make ctx.term() wait forever
        raise
    return sock


def _bind(sock: zmq.Socket, host: str, port: int, key: str) -> zmq.Socket:
    try:
        sock.bind(f"tcp://{host}:{port}")
    except zmq.ZMQError as e:
        close(sock)
        raise OSError(
            f"cannot bind tcp://{host}:{port} ({e}); is another podsrl run using it? "
            f"Choose another port with net.{key}=..."
        ) from None
    return sock


def _connect(sock: zmq.Socket, host: str, port: int) -> zmq.Socket:
    sock.connect(f"tcp://{host}:{port}")
    return sock


def group_receiver(ctx: zmq.Context, net: NetConfig, auth: Auth | None = None) -> zmq.Socket:
    """Selector side of *groups*: ROUTER, binds; read with ``recv(..., routed=True)``. Receive HWM
    ``net.group_hwm`` messages; when the selector's buffer is full it stops reading, the queue fills and
    rollout servers block (back-pressure), so nothing is dropped in transit. Work grants go back to
    the route a WorkRequest came from (ROUTER_MANDATORY: a vanished server raises). Frames over 4x
    ``max_group_mib`` disconnect the sender (hard guard); messages over ``max_group_mib`` are rejected
    and counted by :func:`recv`."""
    sock = _secure(
        _socket(ctx, zmq.ROUTER, rcvhwm=net.group_hwm, maxmsgsize=4 * net.max_group_mib * MIB),
        net,
        "groups",
        auth,
        server=True,
    )
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    return _bind(sock, net.bind_host, net.group_port, "group_port")


def group_sender(ctx: zmq.Context, net: NetConfig, auth: Auth | None = None) -> zmq.Socket:
    """Rollout side of *groups*: DEALER, connects to the selector. Send HWM 2: a finished group waits in
    the rollout server (which polls POLLOUT with ``send_timeout_s``) instead of piling up in queues.
    Receives only WorkGrants and Refusals (small)."""
    sock = _secure(_socket(ctx, zmq.DEALER, sndhwm=2, maxmsgsize=MIB), net, "groups", auth, server=False)
    return _connect(sock, net.selector_host, net.group_port)


def batch_server(ctx: zmq.Context, net: NetConfig, auth: Auth | None = None) -> zmq.Socket:
    """Selector side of *batches*: ROUTER, binds. One reply per request; a learner that restarts
    comes back with a new identity and simply asks again, so no batch is sent without a request."""
    sock = _secure(_socket(ctx, zmq.ROUTER, maxmsgsize=MIB), net, "batches", auth, server=True)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished learner raises instead of vanishing
    return _bind(sock, net.bind_host, net.batch_port, "batch_port")


def batch_client(ctx: zmq.Context, net: NetConfig, auth: Auth | None = None) -> zmq.Socket:
    """Learner rank-0 side of *batches*: DEALER, connects. Receives at most ``max_batch_mib`` frames."""
    sock = _socket(ctx, zmq.DEALER, maxmsgsize=net.max_batch_mib * MIB)
    sock = _secure(sock, net, "batches", auth, server=False)
    return _connect(sock, net.selector_host, net.batch_port)


def announce_publisher(ctx: zmq.Context, net: NetConfig, auth: Auth | None = None) -> zmq.Socket:
    """Learner side of *announce*: XPUB, binds. Announcements are idempotent (the latest wins), so a
    slow subscriber may miss some: it always fetches the newest version over *weights*. With auth, a
    subscriber whose key is not allowlisted never completes the handshake, so it receives nothing.
    XPUB rather than PUB: a new subscriber's subscription arrives as a message (readable on this
    socket), so the learner announces at once to a process that joins, instead of up to
    ``ANNOUNCE_EVERY_S`` later (learner/publisher.py); subscribers see a PUB."""
    sock = _secure(_socket(ctx, zmq.XPUB, sndhwm=100), net, "announce", auth, server=True)
    sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscriber's subscription, not only the first of a topic
    return _bind(sock, net.bind_host, net.announce_port, "announce_port")


def announce_subscriber(ctx: zmq.Context, net: NetConfig, auth: Auth | None = None) -> zmq.Socket:
    """Rollout/selector side of *announce*: SUB to everything, connects to the learner."""
    sock = _secure(_socket(ctx, zmq.SUB, maxmsgsize=MIB), net, "announce", auth, server=False)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    return _connect(sock, net.learner_host, net.announce_port)


def weight_server(ctx: zmq.Context, net: NetConfig, auth: Auth | None = None) -> zmq.Socket:
    """Learner side of *weights*: ROUTER, binds. Each reply is one zero-copy chunk; a peer pulls at most
    ``weights.window`` at a time (the HWM is above any window), so a slow peer's chunks wait in its own
    pipe and a fast peer never waits for it."""
    sock = _secure(_socket(ctx, zmq.ROUTER, sndhwm=256, maxmsgsize=MIB), net, "weights", auth, server=True)
    return _bind(sock, net.bind_host, net.weights_port, "weights_port")


def weight_client(ctx: zmq.Context, net: NetConfig, auth: Auth | None = None) -> zmq.Socket:
    """Rollout side of *weights*: DEALER, connects. No size limit: a version is as big as the model."""
    sock = _secure(_socket(ctx, zmq.DEALER), net, "weights", auth, server=False)
    return _connect(sock, net.learner_host, net.weights_port)


def send(sock: zmq.Socket, msg: Message, *route: bytes, flags: int = 0) -> None:
    """Send one message (after ROUTER identity frames ``route``); arrays go zero-copy."""
    sock.send_multipart([*route, *encode(msg)], flags=flags, copy=False)


def recv(
    sock: zmq.Socket,
    expect: type[M] | tuple[type[Message], ...],
    *,
    routed: bool = False,
    max_bytes: int | None = None,
    flags: int = 0,
) -> tuple[list[bytes], M]:
    """Receive one message; returns (route frames, message). Raises ProtocolError on any bad payload,
    after the whole multipart message has been consumed, so the socket stays usable."""
    route, msg, _ = decode_received(sock, sock.recv_multipart(flags=flags, copy=False), expect, routed, max_bytes)
    return route, msg


def recv_named(
    sock: zmq.Socket,
    expect: type[M] | tuple[type[Message], ...],
    *,
    routed: bool = False,
    max_bytes: int | None = None,
) -> tuple[list[bytes], M, frozenset[str] | None]:
    """:func:`recv`, also returning the names the sender's key was made for (its key files' names: a
    rollout server's ``--server-id``), or None on a link without authentication."""
    return decode_received(sock, sock.recv_multipart(copy=False), expect, routed, max_bytes)


async def arecv(
    sock: zmq.asyncio.Socket,
    expect: type[M] | tuple[type[Message], ...],
    *,
    routed: bool = False,
    max_bytes: int | None = None,
) -> tuple[list[bytes], M]:
    """:func:`recv` on an asyncio socket (the rollout server's control plane)."""
    route, msg, _ = decode_received(sock, await sock.recv_multipart(copy=False), expect, routed, max_bytes)
    return route, msg


async def asend(sock: zmq.asyncio.Socket, msg: Message, *route: bytes) -> None:
    """:func:`send` on an asyncio socket: waits (without blocking the loop) while the peer's queue is full."""
    await sock.send_multipart([*route, *encode(msg)], copy=False)


def decode_received(
    sock: zmq.Socket,
    frames: list[zmq.Frame],
    expect: type[M] | tuple[type[Message], ...],
    routed: bool,
    max_bytes: int | None,
) -> tuple[list[bytes], M, frozenset[str] | None]:
    """:func:`recv_named` of frames already received: a receiver may look at the routing id
    (``frames[0]``) first and drop a flooding peer's message without decoding it (``protocol/budget.py``)."""
    allow = _ALLOW.get(sock)
    # an authenticated link: the last frame surely came from the peer, whose key names it
    names = None if allow is None else _auth.check_peer(frames[-1], allow)
    route = [f.bytes for f in frames[:1]] if routed else []
    body = [f.buffer for f in frames[len(route) :]]
    size = sum(len(b) for b in body)
    if max_bytes is not None and size > max_bytes:
        raise ProtocolError("too_large", f"message of {size} bytes > limit {max_bytes}")
    return route, decode(body, expect), names


def close(*socks: zmq.Socket | None) -> None:
    """Close with linger 0, then stop the ZAP handler of a context whose server sockets are all closed."""
    for sock in socks:
        if sock is not None:
            sock.close(linger=0)
    _auth.release()
