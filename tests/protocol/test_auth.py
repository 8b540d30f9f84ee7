"""CurveZMQ on the four links (protocol/auth.py), over real sockets on loopback.

On every link: the right key exchanges messages; a plain client and a client whose valid key is not
in that link's allowlist complete no handshake (awaited on their own monitor socket), so the binder
receives nothing from them and they receive nothing (PUB, ROUTER replies). Unauthorised clients live
in a second context, as another process would.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import zmq
from helpers import free_ports
from zmq.utils.monitor import recv_monitor_message

from launcher.cli import main as podsrl
from protocol import auth, sockets
from protocol.auth import Auth, AuthError, check_peer, create_keys, load_auth
from protocol.config import NetConfig
from protocol.messages import BatchRequest, Hello, ProtocolError, Weights, WeightsAnnouncement, WeightsRequest
from protocol.weights import digest

TIMEOUT_MS = 5000
QUIET_MS = 500  # "nothing arrives" is a poll this long, after the refusal itself was awaited
REFUSED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
HELLO = Hello(server_id="rollout-0", host="localhost", pid=1, engine="torch")
Builder = Callable[[zmq.Context, NetConfig, Auth | None], zmq.Socket]


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    create_keys(tmp_path / "keys", ["rollout-0"])
    return tmp_path / "keys"


@pytest.fixture
def net(keys: Path) -> NetConfig:
    group, batch, announce, weights = free_ports(4)
    return NetConfig(
        auth="on", keys_dir=str(keys), group_port=group, batch_port=batch, announce_port=announce, weights_port=weights
    )


class Zmq:
    """The binders' context, a second context for clients, and every socket to close at teardown."""

    def __init__(self) -> None:
        self.server, self.client = zmq.Context(), zmq.Context()
        self.opened: list[zmq.Socket] = []
        self.monitors: dict[zmq.Socket, zmq.Socket] = {}

    def track(self, sock: zmq.Socket) -> zmq.Socket:
        self.opened.append(sock)
        return sock

    def watch(self, sock: zmq.Socket) -> zmq.Socket:
        """Attach a monitor to ``sock`` (a client) for :func:`await_refused`. A client that is refused
        reconnects and is refused again, so attaching after connect misses nothing that matters."""
        self.monitors[sock] = self.track(sock.get_monitor_socket(REFUSED | zmq.EVENT_HANDSHAKE_SUCCEEDED))
        return sock

    def plain(self, kind: int, port: int) -> zmq.Socket:
        """A client with no key at all (NULL mechanism), watched."""
        sock = self.track(self.client.socket(kind))
        sock.linger = 0
        self.watch(sock)
        sock.connect(f"tcp://127.0.0.1:{port}")
        return sock

    def close(self) -> None:
        sockets.close(*self.opened)  # also stops the ZAP handler: ctx.term() would wait for it forever
        assert not auth._GUARDS
        self.server.term()
        self.client.term()


@pytest.fixture
def z() -> Iterator[Zmq]:
    env = Zmq()
    try:
        yield env
    finally:
        env.close()


def roles(net: NetConfig) -> tuple[Auth, Auth, Auth]:
    """The selector's, the learner's and rollout-0's keys, as each process loads them."""
    selector, learner = load_auth(net, "selector"), load_auth(net, "learner")
    rollout = load_auth(net, "rollout", "rollout-0")
    assert selector is not None and learner is not None and rollout is not None
    return selector, learner, rollout


def rogue(keys: Path) -> Auth:
    """A client with a valid CURVE key pair that no allowlist names."""
    public, secret = zmq.curve_keypair()
    return Auth(keys, "rollout", "rogue", public, secret)


def client(z: Zmq, build: Builder, net: NetConfig, who: Auth) -> zmq.Socket:
    """A client with ``who``'s keys, built by the link's own builder in the clients' context."""
    return z.track(build(z.client, net, who))


def intruder(z: Zmq, build: Builder, net: NetConfig, who: Auth) -> zmq.Socket:
    return z.watch(client(z, build, net, who))


def await_refused(z: Zmq, sock: zmq.Socket) -> None:
    """Wait for the handshake of ``sock`` to fail (auth or mechanism); it must never succeed."""
    mon = z.monitors[sock]
    while True:
        assert mon.poll(TIMEOUT_MS), "no handshake result within the timeout"
        event = recv_monitor_message(mon)["event"]
        assert event != zmq.EVENT_HANDSHAKE_SUCCEEDED, "an unauthorised client completed the handshake"
        if event & REFUSED:
            return


def quiet(*socks: zmq.Socket) -> bool:
    """Nothing arrives on any of ``socks`` within QUIET_MS (one wait for all)."""
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    return not poller.poll(QUIET_MS)


def ready(sock: zmq.Socket) -> None:
    assert sock.poll(TIMEOUT_MS, zmq.POLLIN), f"nothing arrived within {TIMEOUT_MS} ms"


def weights(version: int) -> Weights:
    data = np.arange(64, dtype=np.uint8)
    return Weights(
        version=version, model_config="{}", files=[], tensors=[["w", "uint8", [64], 0, 64, digest(data)]], data=data
    )


# --- the four links ---


def test_groups_link_accepts_only_allowlisted_rollout_servers(z: Zmq, net: NetConfig, keys: Path) -> None:
    selector, learner, rollout = roles(net)
    rx = z.track(sockets.group_receiver(z.server, net, selector))
    intruders = [
        z.plain(zmq.DEALER, net.group_port),
        intruder(z, sockets.group_sender, net, rogue(keys)),
        intruder(z, sockets.group_sender, net, learner),
    ]  # a valid key of the wrong role
    for sock in intruders:
        sockets.send(sock, HELLO)
    good = client(z, sockets.group_sender, net, rollout)
    sockets.send(good, HELLO)
    ready(rx)
    assert sockets.recv(rx, Hello, routed=True)[1] == HELLO
    for sock in intruders:
        await_refused(z, sock)
    assert quiet(rx)  # the intruders' queued messages never arrive
    assert selector.allowlist("groups").denied >= 2


def test_batches_link_accepts_only_the_learner(z: Zmq, net: NetConfig, keys: Path) -> None:
    selector, learner, rollout = roles(net)
    server = z.track(sockets.batch_server(z.server, net, selector))
    intruders = [
        z.plain(zmq.DEALER, net.batch_port),
        intruder(z, sockets.batch_client, net, rogue(keys)),
        intruder(z, sockets.batch_client, net, rollout),
    ]
    request = BatchRequest(request_id=1, version=10**6, num_groups=1)
    for sock in intruders:
        sockets.send(sock, request)
    good = client(z, sockets.batch_client, net, learner)
    sockets.send(good, BatchRequest(request_id=7, version=0, num_groups=1))
    ready(server)
    route, got = sockets.recv(server, BatchRequest, routed=True)
    assert got.request_id == 7
    sockets.send(server, WeightsAnnouncement(version=0, final=False), *route)  # a reply
    ready(good)
    for sock in intruders:
        await_refused(z, sock)
    assert quiet(server, *intruders)  # nothing from them, and no reply ever reaches them


def test_announce_link_reaches_only_allowlisted_subscribers(z: Zmq, net: NetConfig, keys: Path) -> None:
    selector, learner, rollout = roles(net)
    pub = z.track(sockets.announce_publisher(z.server, net, learner))
    intruders = [z.plain(zmq.SUB, net.announce_port), intruder(z, sockets.announce_subscriber, net, rogue(keys))]
    intruders[0].setsockopt(zmq.SUBSCRIBE, b"")
    subs = [client(z, sockets.announce_subscriber, net, who) for who in (rollout, selector)]
    for sock in intruders:
        await_refused(z, sock)
    version = 0
    for sub in subs:  # slow joiners: publish until each allowlisted subscriber hears one
        while not sub.poll(20, zmq.POLLIN):
            version += 1
            assert version < TIMEOUT_MS // 20, "an allowlisted subscriber heard nothing"
            sockets.send(pub, WeightsAnnouncement(version=version, final=False))
        assert isinstance(sockets.recv(sub, WeightsAnnouncement)[1], WeightsAnnouncement)
    sockets.send(pub, WeightsAnnouncement(version=version + 1, final=False))
    assert quiet(*intruders)


def test_weights_link_serves_only_rollout_servers(z: Zmq, net: NetConfig, keys: Path) -> None:
    selector, learner, rollout = roles(net)
    server = z.track(sockets.weight_server(z.server, net, learner))
    intruders = [
        z.plain(zmq.DEALER, net.weights_port),
        intruder(z, sockets.weight_client, net, rogue(keys)),
        intruder(z, sockets.weight_client, net, selector),
    ]
    for sock in intruders:
        sockets.send(sock, WeightsRequest(version=-1, with_files=True))
    good = client(z, sockets.weight_client, net, rollout)
    sockets.send(good, WeightsRequest(version=-1))
    ready(server)
    route, _ = sockets.recv(server, WeightsRequest, routed=True)
    sockets.send(server, weights(3), *route)
    ready(good)
    assert sockets.recv(good, Weights)[1].version == 3
    for sock in intruders:
        await_refused(z, sock)
    assert quiet(server, *intruders)


# --- the receiver's own check ---


class FakeFrame:
    """A received frame as check_peer sees it: its User-Id property, or none (EINVAL, like libzmq)."""

    def __init__(self, user: str | None) -> None:
        self.user = user

    def get(self, prop: str) -> str:
        assert prop == "User-Id"
        if self.user is None:
            raise zmq.ZMQError(zmq.EINVAL)
        return self.user


def frame(user: str | None) -> zmq.Frame:
    return cast(zmq.Frame, FakeFrame(user))


def test_user_id_check_rejects_any_key_not_allowlisted(net: NetConfig, keys: Path) -> None:
    selector = load_auth(net, "selector")
    assert selector is not None
    allow = selector.allowlist("groups")
    member = (keys / "rollout" / "rollout-0.key").read_text().split('public-key = "')[1].split('"')[0]
    check_peer(frame(member), allow)
    for user in (None, "", zmq.curve_keypair()[0].decode(), "anonymous"):
        with pytest.raises(ProtocolError) as info:
            check_peer(frame(user), allow)
        assert info.value.reason == "unauthenticated"
    with pytest.raises(ProtocolError):
        check_peer(zmq.Frame(b"not received from a peer"), allow)


def test_a_key_names_the_id_it_was_made_for(net: NetConfig, keys: Path) -> None:
    """check_peer returns the names a sender's key was made for (its key files' names), which the
    selector holds a rollout server's id to; a key copied under a second name carries both."""
    create_keys(keys, ["b"])
    selector = load_auth(net, "selector")
    assert selector is not None
    allow = selector.allowlist("groups")
    b = (keys / "rollout" / "b.key").read_text().split('public-key = "')[1].split('"')[0]
    assert check_peer(frame(b), allow) == {"b"}
    assert allow.names(b.encode()) == {"b"} and allow.names("unknown") == frozenset()
    (keys / "rollout" / "b-alias.key").write_bytes((keys / "rollout" / "b.key").read_bytes())
    allow._scanned = 0.0  # the next unknown key re-reads the files
    assert allow.names("unknown") == frozenset() and allow.names(b) == {"b", "b-alias"}


def test_without_its_zap_handler_a_link_still_rejects_every_unknown_message(z: Zmq, net: NetConfig, keys: Path) -> None:
    """libzmq's trap: with no ZAP handler answering, a CURVE server admits any client key. The
    receiver's User-Id check still rejects (and its callers count) every message of such a client."""
    selector = load_auth(net, "selector")
    assert selector is not None
    rx = z.track(sockets.group_receiver(z.server, net, selector))
    auth._GUARDS[id(z.server)].authenticator.stop()
    sockets.send(client(z, sockets.group_sender, net, rogue(keys)), HELLO)
    ready(rx)  # admitted at the handshake...
    with pytest.raises(ProtocolError) as info:
        sockets.recv(rx, Hello, routed=True)  # ...refused at the receiver
    assert info.value.reason == "unauthenticated"


def test_a_rollout_server_added_later_joins_without_a_restart(
    z: Zmq, net: NetConfig, keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "RESCAN_S", 0.0)
    selector = load_auth(net, "selector")
    assert selector is not None
    rx = z.track(sockets.group_receiver(z.server, net, selector))
    assert len(selector.allowlist("groups")) == 1
    create_keys(keys, ["box-7"])
    late = load_auth(net, "rollout", "box-7")
    assert late is not None
    sockets.send(client(z, sockets.group_sender, net, late), HELLO)
    ready(rx)
    assert sockets.recv(rx, Hello, routed=True)[1] == HELLO


# --- when auth is on, and what it needs ---


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("127.0.1.1", True),
        ("0.0.0.0", False),
        ("10.0.0.5", False),
        ("::", False),
        ("box-a", False),
        ("eth0", False),
    ],
)
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert auth.is_loopback(host) is loopback


@pytest.mark.parametrize("field", ["bind_host", "selector_host", "learner_host"])
def test_auto_auth_off_the_loopback_without_keys_fails_naming_the_fix(field: str) -> None:
    net = NetConfig(**{field: "10.0.0.5"})
    assert auth.auth_enabled(net)
    ctx = zmq.Context()
    try:
        for attempt in (lambda: load_auth(net, "selector"), lambda: sockets.group_receiver(ctx, net)):
            with pytest.raises(AuthError) as info:
                attempt()
            assert all(fix in str(info.value) for fix in ("podsrl keys", "net.keys_dir", "net.auth"))
    finally:
        ctx.term()  # returns: the refused builder left no socket open


def test_loopback_runs_stay_unauthenticated_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    net = NetConfig(group_port=free_ports(1)[0])  # a NetConfig of its own: load_auth is cached per config
    assert NetConfig().auth == "auto" and not auth.auth_enabled(net)
    with caplog.at_level(logging.WARNING, logger="podsrl.auth"):
        assert load_auth(net, "selector") is None and load_auth(net, "selector") is None
    assert len([r for r in caplog.records if "authentication is off" in r.message]) == 1
    off = NetConfig(bind_host="0.0.0.0", auth="off")
    with caplog.at_level(logging.WARNING, logger="podsrl.auth"):
        assert load_auth(off, "learner") is None
    assert "net.auth=off" in caplog.records[-1].message


def test_a_rollout_server_without_its_key_is_told_how_to_make_one(net: NetConfig) -> None:
    with pytest.raises(AuthError, match=r"podsrl keys .* --rollout box-9"):
        load_auth(net, "rollout", "box-9")
    with pytest.raises(AuthError, match="--server-id"):
        load_auth(net, "rollout", "../selector")


def test_podsrl_keys_creates_loadable_pairs_and_never_overwrites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "keys"
    assert podsrl(["keys", str(d), "--rollout", "2"]) == 0
    files = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
    assert files == [
        "learner.key",
        "learner.key_secret",
        "rollout/rollout-0.key",
        "rollout/rollout-0.key_secret",
        "rollout/rollout-1.key",
        "rollout/rollout-1.key_secret",
        "selector.key",
        "selector.key_secret",
    ]
    assert all((d / f).stat().st_mode & 0o077 == 0 for f in files if f.endswith("_secret"))
    before = {f: (d / f).read_bytes() for f in files}
    assert podsrl(["keys", str(d), "--rollout", "box-7", "rollout-0"]) == 0
    assert all((d / f).read_bytes() == b for f, b in before.items())
    assert (d / "rollout" / "box-7.key_secret").exists()
    net = NetConfig(auth="on", keys_dir=str(d), group_port=free_ports(1)[0])
    whos = [("selector", ""), ("learner", ""), *(("rollout", n) for n in ("rollout-0", "rollout-1", "box-7"))]
    loaded = {who: load_auth(net, *who) for who in whos}
    assert len({a.public for a in loaded.values() if a is not None}) == 5
    selector = loaded["selector", ""]
    assert selector is not None and len(selector.allowlist("groups")) == 3
    assert len(selector.allowlist("batches")) == 1
    assert podsrl(["keys", str(d), "--rollout", "a/b"]) == 2
    assert "rollout server id 'a/b'" in capsys.readouterr().err
