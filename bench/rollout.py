"""Rollout benchmarks: the server's overhead over its engine, and the torch engine vs transformers.

(a) ``RolloutServer.generate_groups`` (generate + score + build ScoredGroup + push over a real zmq
    PUSH to a PULL sink on loopback, drained by a thread) vs ``engine.generate`` alone on the very
    same prompts and seeds (so both produce identical tokens). Goal: >= 0.9x the bare engine.
(b) ``TorchEngine.generate`` vs transformers ``model.generate(do_sample=True)`` on the same model and
    batch (prompts_per_call x group_size rows), the latter also computing the sampled tokens'
    log-probs from ``output_logits``. Both are measured in tokens/s (completion tokens up to and
    including EOS), because the two sample different tokens. Goal: >= 1.5x transformers.

Models are random-init Llamas built from the config (``build_tiny_model``), as at step 0 of a run:
rows then end at EOS at random, which the engine exploits by dropping finished rows. The
``vocab 204`` case makes early EOS rare (as for a trained policy that answers to full length).
Everything runs on one torch thread, as a rollout server does (``rollout.threads=1``).
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
import zmq

from bench.common import Result, free_ports, interleaved, print_results
from learner.model import build_tiny_model, load_model
from protocol.config import EOS_ID, PAD_ID, Config, load_config
from protocol.sockets import group_receiver
from protocol.weights import pack_weights

TINY: list[str] = []  # the defaults: copy task, length 3, group_size 16, prompts_per_call 4
BIG = ["task.length=16", "rollout.max_new_tokens=17", "model.tiny.hidden_size=256", "model.tiny.num_layers=4",
       "model.tiny.intermediate_size=512"]
BIG_VOCAB = [*BIG, "task.symbols=200"]


def _config(run_dir: Path, overrides: list[str]) -> Config:
    g, b, a, w = free_ports(4)
    return load_config(None, [f"run.dir={run_dir}", f"net.group_port={g}", f"net.batch_port={b}",
                              f"net.announce_port={a}", f"net.weights_port={w}", *overrides])


def _describe(cfg: Config, model: torch.nn.Module) -> str:
    params = sum(p.numel() for p in model.parameters())
    return (f"{cfg.task.type} L={cfg.task.length} vocab {cfg.vocab_size}, {params / 1e6:.2g}M params "
            f"(h{cfg.model.tiny.hidden_size} x{cfg.model.tiny.num_layers}), "
            f"{cfg.rollout.prompts_per_call}x{cfg.rollout.group_size} rows, {cfg.max_new_tokens} new tokens")


class Sink:
    """The selector's PULL socket (``group_receiver``), drained by a thread that only counts messages."""

    def __init__(self, ctx: zmq.Context, cfg: Config) -> None:
        self.sock = group_receiver(ctx, cfg.net)
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            if self.sock.poll(50):
                self.sock.recv_multipart(copy=False)
                self.received += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close(linger=0)


def _tokens(ids: torch.Tensor) -> int:
    """Completion tokens of transformers' output rows: up to the first EOS (kept), PAD after it."""
    is_eos = ids == EOS_ID
    lens = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, ids.shape[1])
    return int(lens.sum())


def bench_case(name: str, overrides: list[str], quick: bool) -> list[Result]:
    from rollout_server.server import RolloutServer

    seeds = range(2 if quick else 4)  # engine calls per measured call: identical work for both sides
    repeats, min_time = (3, 0.05) if quick else (7, 0.2)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(Path(tmp), overrides)
        build_tiny_model(cfg, cfg.model_dir)
        model = load_model(cfg.model_dir, torch.device("cpu")).eval()
        weights = pack_weights(model.state_dict(), 0, model.config.to_json_string())
        desc = _describe(cfg, model)
        sink_ctx = zmq.Context()
        sink = Sink(sink_ctx, cfg)
        server = RolloutServer(cfg, "bench", seed=0)
        server.engine.load(weights)
        engine, task, r = server.engine, server.task, cfg.rollout
        try:
            def server_path() -> None:
                for k in seeds:
                    server.rng = np.random.default_rng(k)
                    server.generate_groups()

            def calls() -> list[tuple[list[np.ndarray], int]]:
                out = []
                for k in seeds:  # exactly what generate_groups draws from its rng
                    rng = np.random.default_rng(k)
                    prompts = [task.sample_prompt(rng) for _ in range(r.prompts_per_call)]
                    out.append((prompts, int(rng.integers(2**62))))
                return out

            plan = calls()

            def bare_engine() -> int:
                return sum(sum(len(c) for c in engine.generate(p, r.group_size, cfg.max_new_tokens, r.temperature,
                                                                 seed=s).ids) for p, s in plan)

            hf_batches = []
            for prompts, _ in plan:
                batch = [p for p in prompts for _ in range(r.group_size)]
                width = max(len(p) for p in batch)
                ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, p in enumerate(batch):
                    ids[i, width - len(p):] = torch.from_numpy(p.astype(np.int64))
                    mask[i, width - len(p):] = 1
                hf_batches.append((ids, mask))

            @torch.inference_mode()
            def transformers_generate() -> int:
                tokens = 0
                for k, (ids, mask) in enumerate(hf_batches):
                    torch.manual_seed(k)
                    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                         max_new_tokens=cfg.max_new_tokens, temperature=r.temperature, top_k=None,
                                         top_p=None, output_logits=True, return_dict_in_generate=True,
                                         eos_token_id=EOS_ID, pad_token_id=PAD_ID)
                    new = out.sequences[:, ids.shape[1]:]
                    logits = torch.stack(out.logits, 1).float() / r.temperature
                    torch.log_softmax(logits, -1).gather(2, new[:, :, None])  # the behaviour log-probs
                    tokens += _tokens(new)
                return tokens

            engine_tokens, hf_tokens = bare_engine(), transformers_generate()
            fns = {"server": server_path, "engine": bare_engine, "transformers": transformers_generate}
            if name == "big, vocab 204":
                del fns["server"]  # (a) is about the server's per-group work, measured on the other cases
            t = interleaved(fns, repeats=repeats, min_time=min_time)
        finally:
            server.monitor.close()
            for s in (server.push, server.sub, server.dealer):
                s.close(linger=0)
            server.ctx.term()
            sink.close()
            sink_ctx.term()

    rows = r.prompts_per_call * r.group_size * len(seeds)
    engine_tps, hf_tps = engine_tokens / t["engine"], hf_tokens / t["transformers"]
    results = []
    if "server" in t:
        server_tps = engine_tokens / t["server"]
        results.append(Result(
            bench="rollout", case=f"(a) server path, {name}: {desc}", value=server_tps, unit="tokens/s",
            peer="bare engine.generate, same prompts and seeds", peer_value=engine_tps,
            ratio=server_tps / engine_tps, goal=">= 0.9x", met=server_tps / engine_tps >= 0.9,
            notes="generate + score + ScoredGroup + zmq PUSH to a PULL sink drained by a thread; identical tokens",
            extra={"server_ms_per_call": 1e3 * t["server"] / len(seeds),
                   "engine_ms_per_call": 1e3 * t["engine"] / len(seeds),
                   "overhead_ms_per_call": 1e3 * (t["server"] - t["engine"]) / len(seeds),
                   "groups_received": sink.received}))
    results.append(Result(
        bench="rollout", case=f"(b) torch engine, {name}: {desc}", value=engine_tps, unit="tokens/s",
        peer="transformers generate(do_sample) + log-probs from output_logits", peer_value=hf_tps,
        ratio=engine_tps / hf_tps, goal=">= 1.5x", met=engine_tps / hf_tps >= 1.5,
        notes="tokens/s because the two sample different tokens; same model, batch, budget",
        extra={"engine_mean_len": engine_tokens / rows, "transformers_mean_len": hf_tokens / rows,
               "engine_ms_per_call": 1e3 * t["engine"] / len(seeds),
               "transformers_ms_per_call": 1e3 * t["transformers"] / len(seeds)}))
    return results


def run(quick: bool = False) -> list[Result]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    cases = {"tiny": TINY} if quick else {"tiny": TINY, "big": BIG, "big, vocab 204": BIG_VOCAB}
    results = []
    for name, overrides in cases.items():
        results += bench_case(name, overrides, quick)
    return results


if __name__ == "__main__":
    print_results(run())
