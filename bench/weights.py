"""Weight sync: one new version to all R rollout clients, podsrl's path vs raw ZeroMQ, on tcp loopback.

podsrl: the learner side calls ``pack_weights`` (the snapshot copy + CRC-32) and
``WeightPublisher.publish``; each client, a separate process (no shared GIL), gets the announcement
on its SUB socket, sends ``WeightsRequest(version=-1)`` on its ``weight_client`` DEALER, receives and
decodes the ``Weights`` message, verifies it (``unpack_weights``: CRC-32 + manifest) and copies every
tensor into a preallocated state (``tensor.copy_``), the full cost of installing a version. Timed from
before ``pack_weights`` to the last client's done message (a multiprocessing pipe).
peer: the same client processes get a one-byte PUB "go", ask a ROUTER in the parent with a DEALER
and receive the same bytes as one zero-copy frame; nothing else (no pack, encode, checksum, load).

The state dict is Llama-shaped float32 tensors (about 100 tensors). ``extra`` breaks the podsrl time
into phases (ends of the slowest client, from before pack) and single-process rates of each step.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
import zlib
from typing import Any

import numpy as np
import torch
import zmq

from bench.common import Result, free_ports, interleaved, median_time, print_results
from protocol.codec import decode, encode
from protocol.config import NetConfig
from protocol.messages import Weights, WeightsAnnouncement, WeightsRequest
from protocol.sockets import announce_subscriber, recv, send, weight_client
from protocol.weights import pack_weights, unpack_weights

TIMEOUT_S = 120.0


def llama_spec(hidden: int, inter: int, layers: int, vocab: int) -> list[tuple[str, list[int]]]:
    """Names and shapes of a Llama's state dict (untied head)."""
    spec: list[tuple[str, list[int]]] = [("model.embed_tokens.weight", [vocab, hidden])]
    for i in range(layers):
        p = f"model.layers.{i}."
        spec += [(p + "input_layernorm.weight", [hidden]), (p + "post_attention_layernorm.weight", [hidden])]
        spec += [(p + f"self_attn.{k}_proj.weight", [hidden, hidden]) for k in "qkvo"]
        spec += [(p + "mlp.gate_proj.weight", [inter, hidden]), (p + "mlp.up_proj.weight", [inter, hidden]),
                 (p + "mlp.down_proj.weight", [hidden, inter])]
    return [*spec, ("model.norm.weight", [hidden]), ("lm_head.weight", [vocab, hidden])]


SIZES = {  # name -> Llama shape; parameter counts are printed with the results
    "1M": llama_spec(128, 352, 4, 800),
    "10M": llama_spec(256, 704, 11, 2048),
    "100M": llama_spec(768, 2048, 12, 10_000),
}


def _client(conn: Any, net: dict[str, Any], raw_go: int, raw_data: int, spec: list[tuple[str, list[int]]]) -> None:
    """One rollout client process: serves podsrl announcements and raw "go"s until told to stop."""
    torch.set_num_threads(1)
    cfg = NetConfig(**net)
    ctx = zmq.Context()
    sub, dealer = announce_subscriber(ctx, cfg), weight_client(ctx, cfg)
    raw_sub, raw_dealer = ctx.socket(zmq.SUB), ctx.socket(zmq.DEALER)
    raw_sub.setsockopt(zmq.SUBSCRIBE, b"")
    raw_sub.connect(f"tcp://127.0.0.1:{raw_go}")
    raw_dealer.connect(f"tcp://127.0.0.1:{raw_data}")
    state = {name: torch.zeros(shape) for name, shape in spec}  # the model the client loads into
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    poller.register(raw_sub, zmq.POLLIN)
    conn.send("ready")
    while True:
        events = dict(poller.poll())
        if sub in events:
            recv(sub, WeightsAnnouncement)
            send(dealer, WeightsRequest(version=-1, with_files=False))
            _, w = recv(dealer, Weights)
            t_recv = time.perf_counter()
            tensors = unpack_weights(w)
            t_crc = time.perf_counter()
            for name, t in tensors.items():
                state[name].copy_(t)
            conn.send(("podsrl", w.version, t_recv, t_crc, time.perf_counter()))
            del w, tensors
        if raw_sub in events:
            if raw_sub.recv() == b"stop":
                break
            raw_dealer.send(b"")
            frame = raw_dealer.recv(copy=False)
            conn.send(("raw", len(frame), time.perf_counter()))
            del frame
    for s in (sub, dealer, raw_sub, raw_dealer):
        s.close(linger=0)
    ctx.term()


def _wait(conns: list[Any]) -> list[Any]:
    out = []
    for c in conns:
        if not c.poll(TIMEOUT_S):
            raise TimeoutError("a weight client did not answer")
        out.append(c.recv())
    return out


def bench_case(size: str, clients: int, repeats: int, state: dict[str, torch.Tensor]) -> Result:
    from learner.publisher import WeightPublisher

    spec = [(k, list(v.shape)) for k, v in state.items()]
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    announce, weights, go, data = free_ports(4)
    net: dict[str, Any] = {  # NetConfig keyword arguments (also sent to the client processes)
        "bind_host": "127.0.0.1", "learner_host": "127.0.0.1", "announce_port": announce, "weights_port": weights}
    ctx = zmq.Context()
    publisher = WeightPublisher(ctx, NetConfig(**net))
    raw_pub, raw_router = ctx.socket(zmq.PUB), ctx.socket(zmq.ROUTER)
    raw_pub.bind(f"tcp://127.0.0.1:{go}")
    raw_router.bind(f"tcp://127.0.0.1:{data}")
    raw_bytes = pack_weights(state, 0, "{}").data.data  # the same bytes, packed once (memoryview)
    spawn = mp.get_context("spawn")
    pipes = [spawn.Pipe() for _ in range(clients)]
    procs = [spawn.Process(target=_client, args=(child, net, go, data, spec), daemon=True) for _, child in pipes]
    conns = [parent for parent, _ in pipes]
    phases: list[tuple[float, float, float, float]] = []
    version = 0
    try:
        for p in procs:
            p.start()
        _wait(conns)
        time.sleep(0.5)  # let the SUB subscriptions reach the publishers

        def podsrl() -> None:
            nonlocal version
            version += 1
            t0 = time.perf_counter()
            w = pack_weights(state, version, "{}")
            t_pack = time.perf_counter()
            publisher.publish(w)
            done = _wait(conns)
            assert all(d[0] == "podsrl" and d[1] == version for d in done), done
            phases.append((t_pack - t0, max(d[2] for d in done) - t0, max(d[3] for d in done) - t0,
                           max(d[4] for d in done) - t0))

        def raw() -> None:
            raw_pub.send(b"go")
            for _ in range(clients):
                ident, _ = raw_router.recv_multipart()
                raw_router.send_multipart([ident, raw_bytes], copy=False)
            done = _wait(conns)
            assert all(d[0] == "raw" and d[1] == nbytes for d in done), done

        t = interleaved({"podsrl": podsrl, "raw": raw}, repeats=repeats, min_time=0.01)
    finally:
        raw_pub.send(b"stop")
        for p in procs:
            if p.pid is None:  # never started
                continue
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        publisher.close()
        raw_pub.close(linger=0)
        raw_router.close(linger=0)
        ctx.term()
    med = [statistics.median(p[i] for p in phases[1:] or phases) for i in range(4)]
    ratio = t["podsrl"] / t["raw"]
    params = nbytes // 4
    return Result(
        bench="weights", case=f"{size} ({params / 1e6:.1f}M fp32 params, {len(spec)} tensors, {nbytes / 2**20:.0f} MiB) "
                              f"to {clients} client process{'es' if clients > 1 else ''}",
        value=t["podsrl"] * 1e3, unit="ms", peer="raw zmq ROUTER->DEALER, one zero-copy frame, same bytes",
        peer_value=t["raw"] * 1e3, ratio=ratio, goal="<= 2x", met=ratio <= 2.0,
        notes="pack_weights + publish -> every client: announce, request, recv+decode, CRC verify, copy_ into state",
        extra={"params": params, "podsrl_GBps_per_client": nbytes / t["podsrl"] / 1e9,
               "raw_GBps_per_client": nbytes / t["raw"] / 1e9, "phase_pack_ms": med[0] * 1e3,
               "phase_last_recv_ms": med[1] * 1e3, "phase_last_crc_ms": med[2] * 1e3,
               "phase_last_load_ms": med[3] * 1e3, "ratio_without_load": med[2] / t["raw"]})


def step_rates(state: dict[str, torch.Tensor]) -> dict[str, float]:
    """GB/s of each podsrl step alone, in this process (no contention): where the time can go."""
    w = pack_weights(state, 0, "{}")
    frames = [bytes(memoryview(f)) if i == 0 else f for i, f in enumerate(encode(w))]
    views = unpack_weights(w)
    buf = w.data.data  # memoryview of the packed bytes (zlib.crc32 reads the same buffer as from the array)
    dst = {k: torch.empty_like(v) for k, v in state.items()}

    def load() -> None:
        for k, v in views.items():
            dst[k].copy_(v)

    t = {"pack_weights (copy + crc32)": median_time(lambda: pack_weights(state, 0, "{}"), repeats=3, min_time=0.05),
         "zlib.crc32": median_time(lambda: zlib.crc32(buf), repeats=3, min_time=0.05),
         "torch.cat copy (pack minus crc)": median_time(
             lambda: torch.cat([v.view(-1).view(torch.uint8) for v in state.values()]), repeats=3, min_time=0.05),
         "decode": median_time(lambda: decode(frames, Weights), repeats=3, min_time=0.05),
         "unpack_weights (crc32 + views)": median_time(lambda: unpack_weights(w), repeats=3, min_time=0.05),
         "load (copy_ into state)": median_time(load, repeats=3, min_time=0.05),
         "numpy memcpy": median_time(lambda: np.copyto(np.empty_like(w.data), w.data), repeats=3, min_time=0.05)}
    return {k: w.data.nbytes / v / 1e9 for k, v in t.items()}


def run(quick: bool = False) -> list[Result]:
    torch.set_num_threads(1)
    plan = {"1M": (1, 2)} if quick else {"10M": (1, 2, 4), "100M": (1, 2, 4)}
    results = []
    for size, client_counts in plan.items():
        gen = torch.Generator().manual_seed(0)
        state = {name: torch.randn(shape, generator=gen) for name, shape in SIZES[size]}
        for r in client_counts:
            results.append(bench_case(size, r, repeats=3 if quick else 5 if size == "100M" else 7, state=state))
        results[-1].extra["single_process_GBps"] = step_rates(state)
        del state
    return results


if __name__ == "__main__":
    print_results(run())
