"""Open files: the selector and the learner hold one descriptor per rollout server connection.

The selector has one TCP connection per rollout server (the groups link), the learner's rank 0 two
(announce and weights). Past the soft limit of open files (``ulimit -n``; 1024 by default on many
systems) libzmq cannot accept a connection: the server connects, sends, and is never heard, and neither
side logs anything (bench/fleet.py measured it: a selector under ``ulimit -n 1024`` took 1008 of 1100
servers, silently). So each process raises its soft limit to what ``selector.max_peers`` servers need,
within the hard limit, and says so (naming the fix) when the hard limit is lower.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("podsrl.limits")

SPARE = 64  # descriptors beside the servers' connections: sockets, logs, libzmq's own


def open_files_needed(role: str, max_peers: int) -> int:
    """Descriptors ``role`` needs for ``max_peers`` rollout servers (0: it needs no more than any process)."""
    per_server = {"selector": 1, "learner-0": 2}.get(role, 0)
    return per_server * max_peers + SPARE if per_server else 0


def raise_open_files(need: int, what: str) -> int:
    """Raise this process's soft limit of open files to ``need`` (at most the hard limit); the limit now.
    Logs a warning naming the fix when the hard limit is below ``need``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return soft
    new = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < need:
        log.warning(
            "at most %d open files (hard limit), %s needs %d: rollout servers beyond about %d connect and are "
            "never heard. Raise the limit: `ulimit -n %d` before starting it, LimitNOFILE=%d (systemd), "
            "--ulimit nofile=%d (docker), or lower selector.max_peers",
            new,
            what,
            need,
            new - SPARE,
            need,
            need,
            need,
        )
    return new
