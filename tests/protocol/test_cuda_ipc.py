"""Everything around CUDA IPC that runs without a GPU (protocol/cuda_ipc.py): the handle's wire form
and its validation, the announcement carrying it, the publisher keeping each device buffer alive
exactly as long as its version, the rollout server's choice to use it, and loads from a device copy.
The two calls into torch's CUDA IPC themselves need a GPU: here they must fail with a clear error."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
import zmq
from helpers import free_ports
from hypothesis import given
from hypothesis import strategies as st

from protocol.codec import decode, encode
from protocol.config import NetConfig
from protocol.cuda_ipc import CudaIpcHandle, open_handle, share
from protocol.messages import ProtocolError, Weights, WeightsAnnouncement
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
    back = decode(encode(ann))
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
    bad = frames[0].replace(b"\xa4cuda\xa0", b"\xa4cuda" + _msgpack_str(cuda))
    assert bad != frames[0]
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


def test_the_publisher_announces_the_handle_and_frees_the_buffer_with_its_version() -> None:
    from learner.publisher import WeightPublisher
    from protocol.config import WeightsConfig

    announce, weights = free_ports(2)
    net = NetConfig(announce_port=announce, weights_port=weights)
    ctx = zmq.Context()
    pub = WeightPublisher(ctx, net, weights=WeightsConfig(keep_versions=1))
    sub = announce_subscriber(ctx, net)
    try:

        class Buffer:  # stands in for the device tensor the handle names
            pass

        buf = Buffer()
        alive = weakref.ref(buf)
        w = pack_weights({"a": torch.ones(8)}, 0, "{}")
        pub.publish(w, cuda=(HANDLE.to_wire(), buf))
        del buf
        for _ in range(50):
            assert sub.poll(10_000), "no announcement"
            ann = recv(sub, WeightsAnnouncement)[1]
            if ann.version == 0:
                break
        assert CudaIpcHandle.from_wire(ann.cuda) == HANDLE and ann.host, "the handle, and the machine it is on"
        gc.collect()
        assert alive() is not None, "kept while its version is kept"
        pub.publish(pack_weights({"a": torch.zeros(8)}, 1, "{}"))  # v0 evicted (keep_versions=1)
        gc.collect()
        assert alive() is None, "released once its version is no longer kept"
    finally:
        sub.close(linger=0)
        pub.close()
        ctx.term()
