"""Who may talk on each link: CurveZMQ keys, allowlists and the ZAP handler (docs/RELIABILITY.md).

    podsrl keys keys --rollout 2          # keys for the selector, the learner, rollout-0 and rollout-1
    podsrl run net.auth=on net.keys_dir=keys

Key layout (``zmq.auth`` certificate files; ``NAME.key`` is public, ``NAME.key_secret`` holds both)::

    keys/selector.key  selector.key_secret        the selector's pair
    keys/learner.key   learner.key_secret         the learner's pair
    keys/rollout/<server-id>.key  .key_secret     one pair per rollout server (its --server-id)

The binder of each link accepts only the public keys listed here (``rollout/*.key`` is re-read
when an unknown key knocks, so a rollout server added with ``podsrl keys`` joins without a restart):

===========  ===============  ======================================
link         server (binds)   accepted clients
===========  ===============  ======================================
groups       selector         rollout/*.key
batches      selector         learner.key
announce     learner          rollout/*.key, selector.key
weights      learner          rollout/*.key
===========  ===============  ======================================

Two locks on every server link, because libzmq 4.3 accepts any client key when no ZAP handler
answers (and the option to refuse instead is a DRAFT API absent from the pyzmq wheels): a
``ThreadAuthenticator`` per context refuses unknown keys at the handshake, and the receiver checks
each message's ``User-Id`` against the same allowlist (:func:`check_peer`).

A key is bound to its name: :func:`check_peer` returns the names the sender's key was made for (its
key file's name), and the selector refuses (``rejected/id_mismatch``) any message of a rollout
server whose ``server_id`` is not its key's, so a valid key cannot speak as another server.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import zmq
import zmq.auth
import zmq.auth.thread

from protocol.config import is_loopback
from protocol.messages import ProtocolError

if TYPE_CHECKING:
    from protocol.config import NetConfig

log = logging.getLogger("podsrl.auth")

Role = Literal["selector", "learner", "rollout"]
# link -> (the role that binds it, the roles whose keys it accepts)
LINKS: dict[str, tuple[Role, tuple[Role, ...]]] = {
    "groups": ("selector", ("rollout",)),
    "batches": ("selector", ("learner",)),
    "announce": ("learner", ("rollout", "selector")),
    "weights": ("learner", ("rollout",)),
}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RESCAN_S = 1.0  # an unknown key re-reads the allowlist's files at most this often
FIX = (
    "create keys with `podsrl keys DIR --rollout N` (or --rollout NAME ...), then set net.keys_dir=DIR "
    "(docs/RELIABILITY.md); or set net.auth=off to run without authentication"
)


class AuthError(ValueError):
    """Authentication is required but cannot be set up; the message says what to do."""


def on_loopback(net: NetConfig) -> bool:
    """Every address of the run is loopback: the bind address, and the selector's and learner's
    addresses a client connects to."""
    return all(is_loopback(h) for h in (net.bind_host, net.selector_host, net.learner_host))


def auth_enabled(net: NetConfig) -> bool:
    """``net.auth`` resolved: 'auto' is on as soon as one address of the run leaves loopback
    (:func:`on_loopback`), so both sides agree."""
    if net.auth != "auto":
        return net.auth == "on"
    return not on_loopback(net)


def check(net: NetConfig) -> None:
    """Raise :class:`AuthError` (naming the fix) when authentication is on but no keys are configured."""
    if auth_enabled(net) and not net.keys_dir:
        why = (
            "net.auth=on"
            if net.auth == "on"
            else f"net.bind_host={net.bind_host!r}, net.selector_host={net.selector_host!r}, "
            f"net.learner_host={net.learner_host!r} are not all loopback"
        )
        raise AuthError(f"{why}, so every link must be authenticated (CurveZMQ), but net.keys_dir is not set: {FIX}")


class Allowlist:
    """The public keys (z85 text) one server link accepts: every ``*.key`` file of its sources (files
    or directories), each with the name it was made for (the file's name without ``.key``). Also the
    ZAP credentials provider of that link (:meth:`callback`)."""

    def __init__(self, link: str, sources: tuple[Path, ...]) -> None:
        self.link, self.sources = link, sources
        self.denied = 0  # handshakes refused; read by tests and logs
        self._lock = threading.Lock()
        self._logged: set[str] = set()
        self._scanned = 0.0
        self._keys = self._scan()

    def _scan(self) -> dict[str, frozenset[str]]:
        files: list[Path] = []
        for src in self.sources:
            files += sorted(src.glob("*.key")) if src.is_dir() else [src] if src.exists() else []
        keys: dict[str, set[str]] = {}
        for f in files:
            try:  # one unreadable file must not take the link down (this also runs in the ZAP thread)
                key = zmq.auth.load_certificate(f)[0].decode("ascii")
            except (OSError, ValueError) as e:
                log.warning("ignoring %s in the %s link's allowlist: %s", f, self.link, e)
                continue
            keys.setdefault(key, set()).add(f.stem)  # the name it was made for: rollout/<server-id>.key
        self._scanned = time.monotonic()
        return {k: frozenset(names) for k, names in keys.items()}

    def __contains__(self, key: object) -> bool:
        return bool(self.names(key))

    def names(self, key: object) -> frozenset[str]:
        """The names ``key`` (z85 text or bytes) was made for: its key files' names, a rollout server's
        ``--server-id``; empty for a key not listed. Several only where one public key was copied under
        several names (then each of them is the operator's choice)."""
        k = key.decode("ascii", "replace") if isinstance(key, bytes) else key
        if not isinstance(k, str):
            return frozenset()
        names = self._keys.get(k)
        if names is not None:
            return names
        with self._lock:  # an unknown key: maybe one added since; re-read at most once per RESCAN_S
            if time.monotonic() - self._scanned > RESCAN_S:
                self._keys = self._scan()
        return self._keys.get(k, frozenset())

    def __len__(self) -> int:
        return len(self._keys)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: accept the handshake of a client whose public key (z85) is listed."""
        if key in self:
            return True
        text = key.decode("ascii", "replace")
        with self._lock:
            self.denied += 1
            first = len(self._logged) < 16 and text not in self._logged
            if first:
                self._logged.add(text)
        if first or self.denied % 1000 == 0:  # quiet under a flood of unknown keys
            log.warning(
                "refused a client on the %s link: public key %s... is not in %s (%d refused so far)",
                self.link,
                text[:12],
                ", ".join(str(s) for s in self.sources),
                self.denied,
            )
        return False


def check_peer(frame: zmq.Frame, allow: Allowlist) -> frozenset[str]:
    """The receiver's own check of one received frame: its ``User-Id`` (set by the ZAP handler to the
    client's z85 public key) must be allowlisted. A frame that crossed no ZAP handler has none. Returns
    the names the sender's key was made for (:meth:`Allowlist.names`): the selector holds a rollout
    server to the id its key names."""
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:
        user = None
    names = allow.names(user) if user else frozenset()
    if not names:
        raise ProtocolError(
            "unauthenticated",
            f"a message on the {allow.link} link from a peer whose key is not allowlisted (User-Id {str(user)[:12]!r})",
        )
    return names


def _read_pair(path: Path, what: str) -> tuple[bytes, bytes]:
    if not path.exists():
        raise AuthError(f"{what}: no key file {path}; {FIX}")
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise AuthError(f"{what}: {path} holds no secret key (copy the .key_secret file made by podsrl keys)")
    return public, secret


def _read_public(path: Path, what: str) -> bytes:
    if not path.exists():
        raise AuthError(f"{what}: no public key {path}; copy it from the machine where `podsrl keys` ran")
    return zmq.auth.load_certificate(path)[0]


@dataclass
class Auth:
    """One process's key material: its own pair, the servers' public keys, the allowlists of the links
    it binds. Built once per process by :func:`load_auth` and passed to every socket builder."""

    keys_dir: Path
    role: Role
    name: str
    public: bytes
    secret: bytes
    _allow: dict[str, Allowlist] = field(default_factory=dict, repr=False)

    def server_key(self, link: str) -> bytes:
        """The public key of the process that binds ``link`` (a CURVE client must know it)."""
        return _read_public(self.keys_dir / f"{LINKS[link][0]}.key", f"{self.role} {self.name}")

    def allowlist(self, link: str) -> Allowlist:
        """The clients ``link`` accepts (the same object for the ZAP handler and the receiver)."""
        server, clients = LINKS[link]
        if server != self.role:
            raise ValueError(f"the {self.role} does not bind the {link} link (the {server} does)")
        if link not in self._allow:
            d = self.keys_dir
            self._allow[link] = Allowlist(
                link, tuple(d / "rollout" if r == "rollout" else d / f"{r}.key" for r in clients)
            )
        return self._allow[link]


def key_path(keys_dir: Path, role: Role, name: str = "") -> Path:
    """Where ``podsrl keys`` writes (and a process reads) a role's secret key file."""
    if role == "rollout":
        return keys_dir / "rollout" / f"{name}.key_secret"
    return keys_dir / f"{role}.key_secret"


@cache
def load_auth(net: NetConfig, role: Role, name: str = "") -> Auth | None:
    """This process's keys, or None when ``net.auth`` resolves to off (logged once as a warning).
    ``name`` is a rollout server's ``--server-id``; its key is ``<keys_dir>/rollout/<name>.key_secret``.
    Raises :class:`AuthError` naming the fix when a key is missing."""
    if not auth_enabled(net):
        if net.auth == "off" and not is_loopback(net.bind_host):
            log.warning(
                "net.auth=off with net.bind_host=%s: ANY host that reaches these ports can push "
                "groups, fetch weights and request batches; %s",
                net.bind_host,
                FIX,
            )
        else:
            log.warning(
                "authentication is off (net.auth=%s, every address is loopback): any local process "
                "can join this run; set net.auth=on net.keys_dir=DIR to turn it on",
                net.auth,
            )
        return None
    check(net)
    keys_dir = Path(net.keys_dir).expanduser()
    who = f"{role} {name}".strip()
    if role == "rollout" and not NAME.fullmatch(name):
        raise AuthError(
            f"rollout server id {name!r} cannot name a key file: use --server-id with letters, "
            "digits, '.', '_', '-' (at most 64)"
        )
    path = key_path(keys_dir, role, name)
    if role == "rollout" and not path.exists():
        raise AuthError(
            f"{who}: no key {path}; create it with `podsrl keys {keys_dir} --rollout {name}` "
            f"where the keys were made and copy rollout/{name}.key_secret, selector.key and "
            "learner.key here (docs/RELIABILITY.md)"
        )
    public, secret = _read_pair(path, who)
    auth = Auth(keys_dir, role, name, public, secret)
    for link, (server, _) in LINKS.items():  # fail at start-up, not at the first message
        if server == role:
            if not auth.allowlist(link):
                log.warning(
                    "the %s link accepts no client yet: %s hold no public key",
                    link,
                    ", ".join(str(s) for s in auth.allowlist(link).sources),
                )
        else:
            auth.server_key(link)
    log.info("authentication on (CurveZMQ): %s, keys in %s", who, keys_dir)
    return auth


# --- one ZAP handler per context, stopped when the last server socket it guards is closed -----------------


@dataclass
class _Guard:
    authenticator: zmq.auth.thread.ThreadAuthenticator
    socks: list[zmq.Socket]


_GUARDS: dict[int, _Guard] = {}
_GUARDS_LOCK = threading.Lock()


def serve(sock: zmq.Socket, link: str, auth: Auth) -> Allowlist:
    """Make ``sock`` (not yet bound) the CURVE server of ``link`` behind its context's ZAP handler."""
    allow = auth.allowlist(link)
    ctx = sock.context
    with _GUARDS_LOCK:
        guard = _GUARDS.get(id(ctx))
        if guard is not None and guard.authenticator.context is not ctx:
            guard = None  # a context that is gone, whose id was reused
        if guard is None or not guard.authenticator.is_alive():
            if guard is not None:
                guard.authenticator.stop()  # a dead handler: free the ZAP endpoint for a new one
            authenticator = zmq.auth.thread.ThreadAuthenticator(ctx, log=logging.getLogger("podsrl.auth.zap"))
            authenticator.start()
            guard = _GUARDS[id(ctx)] = _Guard(authenticator, guard.socks if guard is not None else [])
        domain = f"podsrl-{link}"  # the socket's ZAP domain must equal the handler's, or everyone is refused
        guard.authenticator.configure_curve_callback(domain=domain, credentials_provider=allow)
        guard.socks.append(sock)
    sock.curve_secretkey, sock.curve_publickey = auth.secret, auth.public
    sock.curve_server = True
    sock.zap_domain = domain.encode()
    return allow


def connect_as(sock: zmq.Socket, link: str, auth: Auth) -> None:
    """Make ``sock`` (not yet connected) a CURVE client of ``link`` with this process's keys."""
    sock.curve_secretkey, sock.curve_publickey = auth.secret, auth.public
    sock.curve_serverkey = auth.server_key(link)


def release() -> None:
    """Stop every ZAP handler whose server sockets are all closed (``ctx.term()`` waits for it otherwise)."""
    with _GUARDS_LOCK:
        done = [k for k, g in _GUARDS.items() if all(s.closed for s in g.socks)]
        guards = [_GUARDS.pop(k) for k in done]
    for g in guards:
        g.authenticator.stop()


def create_keys(keys_dir: Path, rollout: list[str]) -> list[Path]:
    """``podsrl keys``: create the missing key pairs (never overwrite one); returns the files written.
    Secret files are readable by their owner only."""
    for name in rollout:  # all checked before any file is written
        if not NAME.fullmatch(name):
            raise AuthError(f"rollout server id {name!r}: use letters, digits, '.', '_', '-' (at most 64)")
    made: list[Path] = []
    for role, name in [("selector", ""), ("learner", ""), *(("rollout", n) for n in rollout)]:
        secret = key_path(keys_dir, role, name)  # type: ignore[arg-type]
        if secret.exists():
            continue
        secret.parent.mkdir(parents=True, exist_ok=True)
        umask = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
        try:
            public_file, secret_file = zmq.auth.create_certificates(secret.parent, secret.stem)
        finally:
            os.umask(umask)
        Path(public_file).chmod(0o644)
        made += [Path(public_file), Path(secret_file)]
    return made
