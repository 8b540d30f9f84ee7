"""The learner's weights transports (learner/transports/) without sockets: what each offers for a version,
and a transport that fails says so once and stops offering, never stopping training. The CUDA IPC
transport's offers are tests/protocol/test_cuda_ipc.py's; the registry is checked against the rollout
side's in tests/rollout_server/test_weights_client.py."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
import torch

from learner.transports import TRANSPORTS, Place, build_transports
from learner.transports.shm import ShmTransport
from protocol.config import WeightsConfig
from protocol.messages import Weights
from protocol.shm import host_id, read_segment
from protocol.weights import manifest_digest, pack_weights

SESSION = 11


def packed(t: ShmTransport, version: int) -> Weights:
    """``version`` packed into the transport's buffer, as the publisher has the learner do."""
    w = pack_weights({"a": torch.full((16,), float(version))}, version, "{}")
    buf = t.alloc(w.data.nbytes)
    assert buf is not None
    buf[:] = w.data
    return Weights(version=version, model_config="{}", tensors=w.tensors, files=[], data=buf)


def test_the_registry_builds_one_of_each_in_order(tmp_path: Path) -> None:
    built = build_transports(Place(WeightsConfig(shm_dir=str(tmp_path)), "", SESSION, None))
    assert [t.name for t in built] == list(TRANSPORTS) and all(cls.name == k for k, cls in TRANSPORTS.items())
    assert list(TRANSPORTS).index("shm") < list(TRANSPORTS).index("cuda_ipc"), "a device copy sits beside a segment"


def test_a_segment_is_offered_with_this_machine_and_removed_with_its_version(tmp_path: Path) -> None:
    t = ShmTransport(Place(WeightsConfig(shm_dir=str(tmp_path)), str(tmp_path / "run"), SESSION, None))
    w = packed(t, 3)
    offer = t.offer(w, {})
    assert offer == {"shm": offer["shm"], "host": host_id()}
    assert (
        read_segment(tmp_path / offer["shm"], 3, SESSION, manifest_digest(w.tensors)).data.tobytes() == w.data.tobytes()
    )
    assert t.offer(pack_weights({"a": torch.ones(4)}, 4, "{}"), {}) == {}, "not packed into a segment: not offered"
    t.drop(3)
    assert not (tmp_path / offer["shm"]).exists()
    assert t.metrics() == {"weights/shm": 1.0}
    t.close()


@pytest.mark.parametrize("why", ["transport net", "no run directory", "no directory"])
def test_no_segments_are_offered_when_they_cannot_be(tmp_path: Path, why: str) -> None:
    cfg = WeightsConfig(shm_dir=str(tmp_path / ("missing" if why == "no directory" else "")))
    if why == "transport net":
        cfg = cfg.model_copy(update={"transport": "net"})
    t = ShmTransport(Place(cfg, "" if why == "no run directory" else str(tmp_path / "run"), SESSION, None))
    assert t.alloc(64) is None and t.metrics() == {"weights/shm": 0.0}


def test_a_full_directory_is_reported_once_and_ends_the_offer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    t = ShmTransport(Place(WeightsConfig(shm_dir=str(tmp_path)), str(tmp_path / "run"), SESSION, None))
    kept = t.offer(packed(t, 0), {})
    with caplog.at_level(logging.WARNING, "podsrl.learner"):
        assert t.alloc(1 << 60) is None, "no file system holds this: posix_fallocate fails"
        assert t.alloc(64) is None, "not tried again"
    assert len([r for r in caplog.records if "shared memory full or unusable" in r.getMessage()]) == 1
    assert t.metrics() == {"weights/shm": 0.0}
    assert not (tmp_path / kept["shm"]).exists(), "its segments are removed with the offer"
    assert [p for p in tmp_path.iterdir() if p.is_file()] == [], "no unfinished segment either"


def test_segments_are_readable_by_the_runs_user_only(tmp_path: Path) -> None:
    """Mode 0600 from allocation to removal, whatever the umask, and a file left at the allocation's
    name (of any mode) is replaced, never reused."""
    t = ShmTransport(Place(WeightsConfig(shm_dir=str(tmp_path)), str(tmp_path / "run"), SESSION, None))
    assert t.store is not None
    left = tmp_path / f".podsrl-{t.store.key}-{os.getpid()}-0.tmp"
    left.write_bytes(b"x")
    left.chmod(0o666)
    old = os.umask(0)
    try:
        w = packed(t, 5)
        assert stat.S_IMODE(left.stat().st_mode) == 0o600, "the unsealed segment"
        offer = t.offer(w, {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / offer["shm"]).stat().st_mode) == 0o600, "the sealed segment"
    t.close()
