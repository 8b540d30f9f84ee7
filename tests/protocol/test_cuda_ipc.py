"""Everything around CUDA IPC that runs without a GPU (protocol/cuda_ipc.py): the handle's wire form
and its validation, the announcement carrying it, the publisher keeping each device buffer alive
exactly as long as its version, the rollout server's choice to use it, and loads from a device copy.
The two calls into torch's CUDA IPC themselves need a GPU: here they must fail with a clear error."""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
from helpers import free_ports
from hypothesis import given
from hypothesis import strategies as st

from learner.publisher import WeightPublisher
from learner.transports import Place, cuda_ipc
from protocol.codec import decode, encode
from protocol.config import NetConfig, WeightsConfig
from protocol.cuda_ipc import CudaIpcHandle, open_handle, share
from protocol.messages import Message, ProtocolError, Weights, WeightsAnnouncement
from protocol.shm import host_id
from protocol.sockets import announce_subscriber, recv
from protocol.weights import pack_weights, unpack_weights
from rollout_server.sources.cuda_ipc import open_device_copy

HANDLE = CudaIpcHandle(
    device=1,
    handle=bytes(range(64)),
    storage_bytes=4096,
    offset_bytes=512,
    ref_counter=b"/torch_1234_5678_0",
    ref_offset=3,
    event=b"\x07" * 64,
    event_sync=True,
)


@given(
    device=st.integers(0, 15),
    handle=st.binary(min_size=1, max_size=64),
    size=st.integers(0, 2**53),
    offset=st.integers(0, 2**40),
    ref=st.binary(max_size=64),
    ref_offset=st.integers(0, 2**20),
    event=st.binary(max_size=64),
    sync=st.booleans(),
)
def test_a_handle_survives_its_wire_form_and_an_announcement(
    device, handle, size, offset, ref, ref_offset, event, sync
) -> None:
    h = CudaIpcHandle(device, handle, size, offset, ref, ref_offset, event, sync)
    assert CudaIpcHandle.from_wire(h.to_wire()) == h
    ann = WeightsAnnouncement(version=3, final=False, cuda=h.to_wire(), host="boot:x")
    back: Message = decode(encode(ann))
    assert isinstance(back, WeightsAnnouncement) and CudaIpcHandle.from_wire(back.cuda) == h


@pytest.mark.parametrize(
    "text",
    [
        "",
        "cuda1",
        "cuda2;1;00;1;0;;0;;0",
        HANDLE.to_wire() + ";0",
        HANDLE.to_wire()[:-1] + "2",
        "cuda1;1;;4096;0;;0;;0",  # no handle
        "cuda1;-1;00;4096;0;;0;;0",
        "cuda1;01;00;4096;0;;0;;0",
        "cuda1;1;0;4096;0;;0;;0",  # sign, leading 0, odd hex
        "cuda1;1;0g;4096;0;;0;;0",
        "cuda1;1;00;99999999999999999999;0;;0;;0",
        "cuda1;1;00;4096;0;;0;;yes",
        "cuda1;1;" + "00" * 600 + ";4096;0;;0;;0",
    ],
)
def test_a_malformed_handle_is_refused(text: str) -> None:
    with pytest.raises(ProtocolError, match="CUDA IPC handle"):
        CudaIpcHandle.from_wire(text)


@pytest.mark.parametrize("cuda", ["CUDA1;X", "cuda1;1;00;1;0;;0;;0\n", "x" * 1025, "cuda1;1;00;1;0;;0;;0 "])
def test_an_announcement_with_a_bad_cuda_field_is_rejected_at_decode(cuda: str) -> None:
    frames = encode(WeightsAnnouncement(version=1, final=False))
    head = bytes(frames[0])
    bad = head.replace(b"\xa4cuda\xa0", b"\xa4cuda" + _msgpack_str(cuda))
    assert bad != head
    with pytest.raises(ProtocolError, match="cuda"):
        decode([bad, *frames[1:]])


def _msgpack_str(s: str) -> bytes:
    import msgpack

    return msgpack.packb(s)


def test_sharing_needs_a_cuda_tensor_and_opening_needs_cuda() -> None:
    with pytest.raises(ValueError, match="weights.cuda_ipc needs the learner on CUDA"):
        share(torch.zeros(16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="4096 bytes, the version 4097"):
        open_handle(HANDLE, 4097)
    if not torch.cuda.is_available():  # a bogus handle on a GPU fails too, but with CUDA's own words
        with pytest.raises(RuntimeError, match="cannot open the learner's CUDA IPC buffer on cuda:1"):
            open_handle(HANDLE, 4096)


def test_the_server_uses_a_device_copy_only_on_cuda_and_refuses_bad_ones() -> None:
    wire = HANDLE.to_wire()
    assert open_device_copy("", 10, torch.device("cuda", 0)) is None, "nothing announced"
    assert open_device_copy(wire, 10, torch.device("cpu")) is None, "a CPU engine copies from the host segment"
    assert open_device_copy(wire, 10, None) is None, "an engine without a device (vLLM) too"
    with pytest.raises(ProtocolError):
        open_device_copy("cuda1;garbage", 10, torch.device("cuda", 0))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            open_device_copy(wire, 10, torch.device("cuda", 0))


def test_unpack_views_the_device_copy_not_the_host_bytes() -> None:
    state = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    w = pack_weights(state, 0, "{}")
    copy = torch.from_numpy(w.data.copy())  # stands in for the device copy: same bytes, other memory
    host = Weights(version=0, model_config="{}", tensors=w.tensors, files=[], data=np.zeros_like(w.data))
    out = unpack_weights(host, verified=True, buf=copy)
    assert all(torch.equal(out[k], v) for k, v in state.items())
    assert out["a"].untyped_storage().data_ptr() == copy.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="device copy of v0"):
        unpack_weights(host, verified=True, buf=copy[:-1])


class Buffer:  # stands in for the device tensor a handle names
    pass


@pytest.fixture
def cuda_publisher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[WeightPublisher, zmq.Socket]]:
    """A publisher that believes it trains on cuda:0 and offers segments (in ``tmp_path``), and a subscriber
    to its announcements. Sharing a device copy is the one call that needs a GPU: tests replace it."""
    announce, weights = free_ports(2)
    net = NetConfig(announce_port=announce, weights_port=weights)
    cfg = WeightsConfig(keep_versions=1, shm_dir=str(tmp_path))
    ctx = zmq.Context()
    monkeypatch.setattr(cuda_ipc, "share_on_device", lambda w, device: (HANDLE.to_wire(), Buffer()))
    pub = WeightPublisher(ctx, net, weights=cfg, run_dir=str(tmp_path / "run"), device=torch.device("cuda", 0))
    sub = announce_subscriber(ctx, net)
    try:
        yield pub, sub
    finally:
        sub.close(linger=0)
        pub.close()
        ctx.term()


def publish(pub: WeightPublisher, sub: zmq.Socket, version: int) -> WeightsAnnouncement:
    """Pack ``version`` into the publisher's buffer as the learner does, publish it, return its announcement."""
    pub.publish(pack_weights({"a": torch.full((8,), float(version))}, version, "{}", alloc=pub.alloc))
    for _ in range(50):
        assert sub.poll(10_000), "no announcement"
        ann = recv(sub, WeightsAnnouncement)[1]
        if ann.version == version:
            return ann
    raise AssertionError(f"no announcement of v{version}")


def test_the_publisher_announces_the_handle_and_frees_the_buffer_with_its_version(
    cuda_publisher: tuple[WeightPublisher, zmq.Socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    pub, sub = cuda_publisher
    made: list[weakref.ref] = []

    def share(w: Weights, device: torch.device) -> tuple[str, Buffer]:
        made.append(weakref.ref(buf := Buffer()))
        return HANDLE.to_wire(), buf

    monkeypatch.setattr(cuda_ipc, "share_on_device", share)
    ann = publish(pub, sub, 0)
    assert CudaIpcHandle.from_wire(ann.cuda) == HANDLE and ann.shm, "beside its segment"
    assert ann.host == host_id(), "the machine it is on"
    gc.collect()
    assert made[0]() is not None, "kept while its version is kept"
    publish(pub, sub, 1)  # v0 evicted (keep_versions=1)
    gc.collect()
    assert made[0]() is None, "released once its version is no longer kept"
    assert made[1]() is not None


def test_a_learner_that_cannot_share_says_so_once_and_goes_on_without(
    cuda_publisher: tuple[WeightPublisher, zmq.Socket],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pub, sub = cuda_publisher
    calls: list[int] = []

    def fails(w: Weights, device: torch.device) -> tuple[str, object]:
        calls.append(w.version)
        raise RuntimeError("no IPC on this device")

    monkeypatch.setattr(cuda_ipc, "share_on_device", fails)
    with caplog.at_level(logging.WARNING, "podsrl.learner"):
        anns = [publish(pub, sub, v) for v in range(3)]
    assert [(a.cuda, bool(a.shm)) for a in anns] == [("", True)] * 3, "the segment is still offered"
    assert calls == [0], "not tried again"
    assert len([r for r in caplog.records if "CUDA IPC unavailable" in r.getMessage()]) == 1


def test_a_learner_off_cuda_or_without_segments_offers_no_device_copy(tmp_path: Path) -> None:
    place = Place(WeightsConfig(shm_dir=str(tmp_path)), str(tmp_path / "run"), 1, torch.device("cpu"))
    assert not cuda_ipc.CudaIpcTransport(place).on, "a learner on CPU"
    on_cuda = Place(place.weights, place.run_dir, 1, torch.device("cuda", 0))
    assert cuda_ipc.CudaIpcTransport(on_cuda).on
    for cfg in (WeightsConfig(cuda_ipc=False), WeightsConfig(transport="net")):
        assert not cuda_ipc.CudaIpcTransport(Place(cfg, place.run_dir, 1, on_cuda.device)).on
    w = pack_weights({"a": torch.ones(8)}, 0, "{}")
    assert cuda_ipc.CudaIpcTransport(on_cuda).offer(w, {}) == {}, "only beside a segment"
