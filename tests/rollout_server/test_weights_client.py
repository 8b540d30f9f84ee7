"""The rollout server's weights client and its sources (rollout_server/weights_client.py, sources/), without
a learner: real segments in a temporary directory, real ShmSource and CudaIpcSource, and a hand-written
network source that hands out a given version (the network path itself is tests/rollout_server/
test_weight_transfer.py's)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
import torch
import zmq.asyncio

from learner.transports import TRANSPORTS
from protocol.config import Config, WeightsConfig
from protocol.cuda_ipc import CudaIpcHandle
from protocol.messages import Weights, WeightsAnnouncement
from protocol.metrics import Monitor, RateLimitedLog, read_metrics
from protocol.shm import SegmentStore, host_id
from protocol.weights import manifest_digest, pack_weights
from rollout_server.sampling import Samples, SamplingSpec
from rollout_server.sources import SOURCES, Place, Source
from rollout_server.sources.cuda_ipc import CudaIpcSource
from rollout_server.sources.net import NetSource
from rollout_server.sources.shm import ShmSource
from rollout_server.weights_client import WeightsClient

SESSION = 7
HANDLE = CudaIpcHandle(1, bytes(range(64)), 1 << 20, 0, b"/torch_1_2_0", 0, b"", False).to_wire()


def version(v: int) -> Weights:
    return pack_weights({"w": torch.full((64,), float(v))}, v, "{}")


class Canned(Source):
    """Stands in for the network: always able, hands out ``w`` (None: the learner did not answer)."""

    name = "net"

    def __init__(self, place: Place, w: Weights | None) -> None:
        super().__init__(place)
        self.w = w
        self.reads = 0

    def can_serve(self, ann: WeightsAnnouncement | None, with_files: bool) -> bool:
        return True

    async def read(self, ann: WeightsAnnouncement | None, base: Weights | None, with_files: bool) -> Weights | None:
        self.reads += 1
        self.last = {"rollout/weights_fetch_s": 0.5, "rollout/weights_shm": 0}
        return self.w


class Unable(Canned):
    """A source that can never serve: it must be skipped, never read."""

    name = "unable"

    def can_serve(self, ann: WeightsAnnouncement | None, with_files: bool) -> bool:
        return False


class Stuck(Canned):
    """A source whose read waits forever (a transfer the learner took to its grave)."""

    name = "stuck"

    async def read(self, ann: WeightsAnnouncement | None, base: Weights | None, with_files: bool) -> Weights | None:
        self.reads += 1
        await asyncio.Event().wait()
        return None


class Engine:
    """The engine interface's load, recording what it was given."""

    def __init__(self, fail_device: bool = False) -> None:
        self.version: int | None = None
        self.loads: list[bool] = []  # one per call: from a device copy?
        self.fail_device = fail_device

    def load(self, weights: Weights, verified: bool = False, device_data: torch.Tensor | None = None) -> None:
        self.loads.append(device_data is not None)
        if device_data is not None and self.fail_device:
            raise RuntimeError("cannot load from the device copy")
        self.version = weights.version

    def generate(self, prompts: list[np.ndarray], n: int, spec: SamplingSpec, seed: int) -> Samples:
        raise AssertionError("the weights client never generates")


def run(
    tmp_path: Path, test: Callable[[WeightsClient], Awaitable[None]], *, files: bool = False, **weights: object
) -> None:
    """Run ``test(client)`` in an event loop, with a client whose segments live in ``tmp_path/shm``."""
    (tmp_path / "shm").mkdir(exist_ok=True)
    cfg = Config(weights=WeightsConfig(shm_dir=str(tmp_path / "shm"), **weights))

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        monitor = Monitor(tmp_path, "rollout-test", tensorboard=False)
        log = RateLimitedLog(logging.getLogger("podsrl.rollout"), every_s=30.0)
        client = WeightsClient(ctx, cfg, None, None, monitor, log, lambda: files)
        try:
            await test(client)
        finally:
            client.close()
            monitor.close()
            ctx.term()

    asyncio.run(main())


def place(client: WeightsClient, device: torch.device | None = None) -> Place:
    return Place(client.cfg.weights, client.cfg.net, client.dealer, device, client._warn)


def segment(tmp_path: Path, w: Weights, **ann: object) -> tuple[SegmentStore, WeightsAnnouncement]:
    """``w`` sealed in a real segment, and the announcement that names it."""
    store = SegmentStore(tmp_path / "shm", "testkey00000", SESSION)
    buf = store.alloc(w.data.nbytes)
    buf[:] = w.data
    name = store.seal(Weights(version=w.version, model_config=w.model_config, tensors=w.tensors, files=[], data=buf))
    fields: dict[str, Any] = {"shm": name, "host": host_id(), "manifest": manifest_digest(w.tensors), **ann}
    return store, WeightsAnnouncement(version=w.version, final=False, session=SESSION, **fields)


def metrics(tmp_path: Path) -> list[dict]:
    return [m for m in read_metrics(tmp_path / "metrics" / "rollout-test.jsonl") if "rollout/weights_shm" in m]


# -- the registry ---------------------------------------------------------------------------------


def test_every_configured_transport_has_a_source_and_the_network_comes_last() -> None:
    """``weights.transport`` names a source ('auto': whichever can serve), and the network, every other
    source's fallback, is last (build_sources checks it too)."""
    transports = set(get_args(WeightsConfig.model_fields["transport"].annotation))
    assert transports - {"auto"} <= set(SOURCES), "a transport in the config has no source"
    assert list(SOURCES)[-1] == "net" and SOURCES["net"] is NetSource
    assert all(cls.name == key for key, cls in SOURCES.items()), "a source's name is its registry key"
    assert list(SOURCES).index("cuda_ipc") < list(SOURCES).index("shm"), "the device copy is preferred"
    assert set(TRANSPORTS) <= set(SOURCES), "whatever the learner offers, a rollout server can read"


# -- choosing a source ----------------------------------------------------------------------------


def test_a_source_that_cannot_serve_is_skipped(tmp_path: Path) -> None:
    async def test(client: WeightsClient) -> None:
        unable, net = Unable(place(client), version(0)), Canned(place(client), version(3))
        client.sources = [unable, net]
        client.heard(WeightsAnnouncement(version=3, final=False, session=SESSION))
        w = await client.fetch_latest()
        assert w is not None and w.version == 3
        assert (unable.reads, net.reads) == (0, 1)

    run(tmp_path, test)


def test_a_segment_on_this_machine_is_mapped_and_counted(tmp_path: Path) -> None:
    v2 = version(2)

    async def test(client: WeightsClient) -> None:
        net = Canned(place(client), version(9))
        client.sources = [ShmSource(place(client)), net]
        store, ann = segment(tmp_path, v2)
        try:
            client.heard(ann)
            w = await client.fetch_latest()
        finally:
            store.close()
        assert w is not None and w.data.tobytes() == v2.data.tobytes() and net.reads == 0
        assert client.all_counters()["shm_loads"] == 1

    run(tmp_path, test)
    assert [(m["step"], m["rollout/weights_shm"]) for m in metrics(tmp_path)] == [(2, 1)]


@pytest.mark.parametrize("transport", ["auto", "shm"])
def test_a_failing_segment_falls_back_to_the_network_and_is_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, transport: str
) -> None:
    """A segment gone (evicted) or not what was announced: the network serves the version, the fallback is
    counted, and with ``weights.transport = "shm"`` the user is told of a segment gone; a file that is not
    the announced segment (something wrote it) is counted as corrupt and always told."""

    async def test(client: WeightsClient) -> None:
        net = Canned(place(client), version(4))
        client.sources = [ShmSource(place(client)), net]
        store, ann = segment(tmp_path, version(4))
        store.close()  # removed: the read fails
        client.heard(ann)
        w = await client.fetch_latest()
        assert w is not None and w.version == 4 and net.reads == 1
        (tmp_path / "shm" / ann.shm).write_bytes(b"not a segment")  # there, but not a segment
        w = await client.fetch_latest()
        assert w is not None and net.reads == 2
        assert client.all_counters()["shm_fallbacks"] == 2 and client.all_counters()["shm_loads"] == 0
        assert client.all_counters()["shm_corrupt"] == 1

    with caplog.at_level(logging.WARNING, "podsrl.rollout"):
        run(tmp_path, test, transport=transport)
    warned = [r.getMessage() for r in caplog.records if "shared-memory segment" in r.getMessage()]
    assert sum("unusable" in m for m in warned) == (1 if transport == "shm" else 0)
    assert sum("is corrupt" in m for m in warned) == 1
    assert [m["rollout/weights_shm"] for m in metrics(tmp_path)] == [0, 0]


def test_the_first_version_and_transport_net_come_by_network(tmp_path: Path) -> None:
    """The first fetch brings the tokenizer files, which no segment carries; 'net' never maps one."""

    async def test(client: WeightsClient) -> None:
        net = Canned(place(client), version(1))
        client.sources = [ShmSource(place(client)), net]
        store, ann = segment(tmp_path, version(1))
        try:
            client.heard(ann)
            assert await client.fetch_latest() is not None and net.reads == 1
        finally:
            store.close()
        assert client.all_counters()["shm_loads"] == 0

    run(tmp_path, test, files=True)
    run(tmp_path, test, transport="net")


def test_a_learner_restart_abandons_the_read_in_flight(tmp_path: Path) -> None:
    async def test(client: WeightsClient) -> None:
        stuck = Stuck(place(client), None)
        client.sources = [stuck, Canned(place(client), version(0))]
        client.heard(WeightsAnnouncement(version=5, final=False, session=1))
        fetch = asyncio.ensure_future(client.fetch_latest())
        while not stuck.reads:
            await asyncio.sleep(0)
        client.heard(WeightsAnnouncement(version=0, final=False, session=2))  # a new learner
        assert await fetch is None

    run(tmp_path, test)


# -- CUDA IPC: the device copy on top of the segment ------------------------------------------------


def test_a_device_copy_is_used_only_by_an_engine_on_cuda(tmp_path: Path) -> None:
    async def test(client: WeightsClient) -> None:
        ann = WeightsAnnouncement(version=0, final=False, shm="x", host=host_id(), cuda=HANDLE)
        assert not CudaIpcSource(place(client, torch.device("cpu"))).can_serve(ann, False)
        assert not CudaIpcSource(place(client)).can_serve(ann, False), "no device (vLLM)"
        cuda = CudaIpcSource(place(client, torch.device("cuda", 0)))
        assert cuda.can_serve(ann, False)
        assert not cuda.can_serve(WeightsAnnouncement(version=0, final=False, shm="x", host=host_id()), False)
        assert not cuda.can_serve(ann, True), "the first version comes by network"

    run(tmp_path, test)


def test_a_device_copy_that_cannot_be_opened_loads_the_host_copy(tmp_path: Path) -> None:
    """On this machine (no GPU) opening the handle fails: the host segment is loaded and the fallback counted
    (on a GPU a bogus handle fails too, with CUDA's words). Each handle is taken by one install."""
    v0 = version(0)

    async def test(client: WeightsClient) -> None:
        cuda = CudaIpcSource(place(client, torch.device("cuda", 0)))
        client.sources = [cuda, ShmSource(place(client)), Canned(place(client), None)]
        store, ann = segment(tmp_path, v0, cuda=HANDLE)
        try:
            client.heard(ann)
            w = await client.fetch_latest()
        finally:
            store.close()
        assert w is not None and w.data.tobytes() == v0.data.tobytes()
        engine = Engine()
        client.load(engine, w)
        assert engine.loads == [False] and engine.version == 0
        client.load(engine, w)
        assert client.all_counters()["cuda_ipc_fallbacks"] == 1, "the handle was taken once"
        assert client.all_counters()["shm_loads"] == 1

    run(tmp_path, test)


def test_a_load_from_the_device_copy_that_fails_is_redone_from_the_host(tmp_path: Path) -> None:
    class Opened(CudaIpcSource):  # a handle that opened (as on a GPU)
        def device_copy(self, w: Weights) -> torch.Tensor | None:
            return torch.from_numpy(np.asarray(w.data))

    async def test(client: WeightsClient) -> None:
        client.sources = [Opened(place(client, torch.device("cuda", 0))), Canned(place(client), None)]
        engine = Engine(fail_device=True)
        client.load(engine, version(3))
        assert engine.loads == [True, False] and engine.version == 3
        assert client.all_counters()["cuda_ipc_fallbacks"] == 1

    run(tmp_path, test)
