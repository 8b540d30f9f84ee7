"""Which ports a ``podsrl run`` uses: free ones, unless the user chose them.

When the launcher starts every process itself on loopback (``rollout.servers >= 1``, every address
loopback), each ``net.*_port`` that neither the config file nor an override sets is a free port
picked here, so two runs on one machine never meet on the defaults. A port set either way is kept as
given. Otherwise (rollout servers started by hand, another machine) the configured ports stand: the
processes started elsewhere read them from their own config. The launcher prints the ports and writes
them to ``<run.dir>/config.toml``, the file every child reads.
"""

from __future__ import annotations

import contextlib
import socket

from protocol.auth import on_loopback
from protocol.config import PORT_KEYS, Config, NetConfig


def free_ports(n: int, reserve: bool = False) -> list[int]:
    """``n`` distinct free loopback ports (all held open together while they are picked).

    ``reserve``: leave each port in TIME_WAIT (a connection to it, closed first on its side). For that
    minute (Linux) the kernel gives it to no other ``bind(0)``, such as a second launcher picking at
    the same moment, while ZeroMQ, which binds with SO_REUSEADDR, can bind it. Released without a
    reservation, a port is handed out again at once (measured: 5000 ``bind(0)`` after 200 ports were
    picked returned one of them 79 times, and none of 200 reserved ones). A plain socket cannot bind a
    reserved port for that minute either, so tests, which bind some of theirs that way, do not reserve.
    """
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            if reserve:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 0))
        ports = [int(s.getsockname()[1]) for s in socks]
        for s in socks if reserve else ():
            s.listen(1)
            with socket.create_connection(s.getsockname()):
                s.accept()[0].close()  # the side holding the port closes first: it is the one in TIME_WAIT
        return ports


def picks_ports(cfg: Config) -> bool:
    """Whether ``podsrl run`` chooses the ports it was not given: it starts every process on loopback."""
    return cfg.rollout.servers > 0 and on_loopback(cfg.net)


def assign_ports(cfg: Config) -> tuple[Config, list[str]]:
    """``cfg`` with a reserved free port for every ``net.*_port`` the user did not set (when
    :func:`picks_ports`), and the keys that were picked; the ports the user set are never picked."""
    unset = [k for k in PORT_KEYS if k not in cfg.net.model_fields_set] if picks_ports(cfg) else []
    if not unset:
        return cfg, []
    kept = {getattr(cfg.net, k) for k in PORT_KEYS if k not in unset}
    ports = [p for p in free_ports(len(unset) + len(kept), reserve=True) if p not in kept][: len(unset)]
    net = cfg.net.model_copy(update=dict(zip(unset, ports, strict=True)))
    return cfg.model_copy(update={"net": net}), unset


def describe(net: NetConfig, picked: list[str]) -> str:
    """The launcher's line about the ports, e.g. ``ports: group 41234 (free), batch 5556, ...``."""
    return "ports: " + ", ".join(
        f"{k.removesuffix('_port')} {getattr(net, k)}{' (free)' if k in picked else ''}" for k in PORT_KEYS
    )
