"""A rollout server whose id the selector refuses for good stops, saying why and what to do (issue 19).

Before, a second process with a taken server id was refused but never told, and kept generating
groups nobody trained. The selector now answers a ``Refusal``; here a stand-in selector (the real
one's answer is tested in ``tests/selector/test_selector_process.py``) answers a real rollout server
process's Hello, which must exit with code 3 and a message naming its id, the other holder and the fix.
"""

from __future__ import annotations

from pathlib import Path

import zmq

from protocol.config import load_config
from protocol.messages import Hello, Refusal
from protocol.sockets import close, group_receiver, recv, send
from rollout_server.server import REFUSED_EXIT, refused_message

HELD = "held by pid 4242 on box-b, session 1, heard 0.4s ago"


def test_the_refusal_message_names_the_id_the_holder_and_the_fix() -> None:
    text = refused_message(Refusal(server_id="r0", reason="server_id_in_use", detail=HELD))
    assert "'r0'" in text and "pid 4242 on box-b" in text and "--server-id" in text
    mismatch = Refusal(server_id="zed", reason="id_mismatch", detail="from the key made for 'b': start it with ...")
    assert "'zed'" in refused_message(mismatch) and "made for 'b'" in refused_message(mismatch)


def test_a_refused_rollout_server_stops_with_the_reason(spawn, run_dir: Path, net_overrides: list[str]) -> None:
    overrides = [f"run.dir={run_dir}", *net_overrides]
    cfg = load_config(None, overrides)
    ctx = zmq.Context()
    rx = group_receiver(ctx, cfg.net)  # the selector's side of the groups link
    log = run_dir.parent / "rollout.log"
    proc = spawn("rollout_server.server", "--server-id", "r0", *overrides, log=log)
    try:
        assert rx.poll(120_000), "no Hello from the rollout server within 120 s"
        route, hello = recv(rx, Hello, routed=True)
        assert hello.server_id == "r0"
        send(rx, Refusal(server_id="other", reason="server_id_in_use", detail=HELD), *route)  # not about r0
        send(rx, Refusal(server_id="r0", reason="server_id_in_use", detail=HELD), *route)
        proc.wait(timeout=30)
    finally:
        close(rx)
        ctx.term()
    out = log.read_text()
    assert proc.returncode == REFUSED_EXIT, out
    assert "refused server id 'r0'" in out and "pid 4242 on box-b" in out and "--server-id" in out
    assert "'other'" in out  # the refusal of another id was rejected (logged), not obeyed
