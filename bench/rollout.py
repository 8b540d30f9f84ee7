"""Rollout benchmarks: the server's overhead over its engine, the text path's cost, and the torch engine
vs transformers.

(a) ``RolloutServer.produce`` (tokenize the prompts + generate + decode + score in the reward
    worker process + build ScoredGroups + push over a real zmq PUSH to a PULL sink on loopback, drained
    by a thread) vs ``engine.generate`` alone on the very same prompts and seeds (so both produce
    identical tokens). Goal: >= 0.9x the bare engine.
(a2) The text path's cost over a token path, on the tiny default model: ``produce`` as in (a)
    vs the same engine calls scored directly on token ids in-process (the copy task's partial credit:
    the fraction of answer positions holding the answer's token id), building the same ScoredGroups
    and pushing them through the same socket, as the server did before tasks became text. The token
    path's prompt and answer ids are drawn beforehand (a token task draws ids directly). Goal: the
    text path takes <= 1.10x the token path's time. Its parts (tokenize = ``task.next_prompts``,
    decode = ``task.decode``, reward = ``task.rewards.score``, a round trip to the worker process) are
    reported per call beside it, as shares of the text path's time.
(b) ``TorchEngine.generate`` vs transformers ``model.generate(do_sample=True)`` on the same model and
    batch (prompts_per_call x group_size rows), the latter also computing the sampled tokens'
    log-probs from ``output_logits``. Both are measured in tokens/s (completion tokens up to and
    including EOS), because the two sample different tokens. Goal: >= 1.5x transformers.

Models are random-init Llamas with a character-level tokenizer (``launcher.tiny.build_tiny_model``),
as at step 0 of a run: rows then end at EOS at random, which the engine exploits by dropping finished
rows. The ``big, wide alphabet`` case gives the tokenizer 190 characters the prompts never use, so
EOS is one token of ~200 and early EOS is rare (as for a trained policy that answers to full length).
Everything runs on one torch thread, as a rollout server does (``rollout.threads=1``).
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq

from bench.common import Result, free_ports, interleaved, print_results
from launcher.tiny import build_tiny_model
from learner.model import load_model
from protocol.config import Config, load_config
from protocol.messages import ScoredGroup
from protocol.sockets import group_receiver, group_sender, send
from protocol.weights import pack_weights, read_tokenizer_files, with_files
from rollout_server.tasks.data import builtin_alphabet

TINY: list[str] = []  # the defaults: copy task, length 3, group_size 16, prompts_per_call 4
BIG = [
    "task.length=16",
    "rollout.max_new_tokens=17",
    "model.tiny.hidden_size=256",
    "model.tiny.num_layers=4",
    "model.tiny.intermediate_size=512",
]
WIDE = "".join(chr(0x100 + i) for i in range(190))  # Latin Extended letters: in the vocabulary, never in a prompt
TEXT_GOAL = 1.10  # (a2): the text path may cost at most 10% over the token path


def _config(run_dir: Path, overrides: list[str]) -> Config:
    g, b, a, w = free_ports(4)
    return load_config(
        None,
        [
            f"run.dir={run_dir}",
            f"net.group_port={g}",
            f"net.batch_port={b}",
            f"net.announce_port={a}",
            f"net.weights_port={w}",
            *overrides,
        ],
    )


def _describe(cfg: Config, model: torch.nn.Module, vocab: int) -> str:
    params = sum(p.numel() for p in model.parameters())
    return (
        f"{cfg.task.type} L={cfg.task.length} vocab {vocab}, {params / 1e6:.2g}M params "
        f"(h{cfg.model.tiny.hidden_size} x{cfg.model.tiny.num_layers}), "
        f"{cfg.rollout.prompts_per_call}x{cfg.rollout.group_size} rows, {cfg.max_new_tokens} new tokens"
    )


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


@dataclass(frozen=True)
class Call:
    """One engine call: what ``produce`` draws once ``server.rng`` and ``task.source.rng`` are
    both reset to ``default_rng(k)``."""

    prompts: list[Any]  # rollout_server.tasks.Prompt
    seed: int
    answers: list[np.ndarray]  # each prompt's answer as token ids (the token path's ground truth)


def _plan(task: Any, seeds: range, prompts_per_call: int) -> list[Call]:
    out = []
    for k in seeds:
        task.source.rng = np.random.default_rng(k)
        prompts = task.next_prompts(prompts_per_call)
        answers = [
            np.asarray(task.tokenizer(p.row["answer"], add_special_tokens=False)["input_ids"], np.int32)
            for p in prompts
        ]
        out.append(Call(prompts, int(np.random.default_rng(k).integers(2**62)), answers))
    return out


def copy_credit(completions: list[np.ndarray], answer: np.ndarray) -> np.ndarray:
    """The copy task's partial credit on token ids: the fraction of answer positions holding the answer's id."""
    out = np.empty(len(completions), np.float32)
    for j, c in enumerate(completions):
        m = min(len(c), len(answer))
        out[j] = np.count_nonzero(c[:m] == answer[:m]) / len(answer)
    return out


def server_groups(server: Any, push: zmq.Socket) -> None:
    """What the server's loop does per engine call: ``produce`` (in its worker thread), then push each
    group and log one metrics line (here on a plain socket: the loop's asyncio send is the same frames)."""
    produced = server.produce(server.cfg.rollout.prompts_per_call, server.cfg.rollout.group_size)
    for group in produced.groups:
        send(push, group)
        server.groups_sent += 1
    server.monitor.log(
        server.engine.version,
        {
            **produced.metrics,
            "rollout/groups_sent": server.groups_sent,
            **{f"rollout/{k}": v for k, v in server.counters.items()},
        },
    )


def token_groups(server: Any, push: zmq.Socket, call: Call, spec: Any) -> None:
    """``produce`` as a token task ran it: the same engine call, scored on ids in-process, the
    same ScoredGroups pushed through the same socket, the same kind of metrics line."""
    n, version = server.cfg.rollout.group_size, server.engine.version
    t0 = time.monotonic()
    samples = server.engine.generate([p.ids for p in call.prompts], n, spec, seed=call.seed)
    gen_s = time.monotonic() - t0
    rewards = [copy_credit(samples.ids[i * n : (i + 1) * n], a) for i, a in enumerate(call.answers)]
    for i, prompt in enumerate(call.prompts):
        ids, lps = samples.ids[i * n : (i + 1) * n], samples.logprobs[i * n : (i + 1) * n]
        send(
            push,
            ScoredGroup(
                server_id=server.server_id,
                session=server.session,
                group_id=server.groups_sent,
                version=version,
                task=server.task.name,
                gen_seconds=gen_s / len(call.prompts),
                prompt_ids=prompt.ids,
                completion_ids=np.concatenate(ids),
                completion_lens=np.array([len(c) for c in ids], np.int32),
                logprobs=np.concatenate(lps),
                rewards=rewards[i],
            ),
        )
        server.groups_sent += 1
    tokens = sum(len(c) for c in samples.ids)
    server.monitor.log(
        version,
        {
            "rollout/groups_sent": server.groups_sent,
            "rollout/tokens_per_s": tokens / gen_s,
            "rollout/reward_mean": float(np.mean(rewards)),
            "time/generate": gen_s,
            **{f"rollout/{k}": v for k, v in server.counters.items()},
        },
    )


def reward_args(
    task: Any, prompts: list[Any], completions: list[np.ndarray], texts: list[str], n: int
) -> tuple[list[Any], list[str], list[list[int]], dict[str, list[Any]]]:
    """What ``Task.score`` hands ``task.rewards.score`` for these completions (built the same way)."""
    rows = [p.row for p in prompts for _ in range(n)]
    keys = sorted({k for p in prompts for k in p.row} - {task.cfg.prompt_field})
    return (
        [r[task.cfg.prompt_field] for r in rows],
        texts,
        [c.tolist() for c in completions],
        {k: [r.get(k) for r in rows] for k in keys},
    )


def _tokens(ids: torch.Tensor, stop_ids: torch.Tensor) -> int:
    """Completion tokens of transformers' output rows: up to the first stop token (kept), PAD after it."""
    is_eos = torch.isin(ids, stop_ids)
    lens = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, ids.shape[1])
    return int(lens.sum())


def bench_case(
    name: str, overrides: list[str], quick: bool, extra_chars: str = "", text_path: bool = False
) -> list[Result]:
    from rollout_server.server import RolloutServer

    seeds = range(2 if quick else 4)  # engine calls per measured call: identical work for every side
    repeats, min_time = (3, 0.05) if quick else (7, 0.2)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(Path(tmp), overrides)
        build_tiny_model(cfg, cfg.model_dir, builtin_alphabet(cfg.task) + extra_chars)
        model = load_model(cfg.model_dir, torch.device("cpu")).eval()
        weights = with_files(
            pack_weights(model.state_dict(), 0, model.config.to_json_string()), read_tokenizer_files(cfg.model_dir)
        )
        sink_ctx = zmq.Context()
        sink = Sink(sink_ctx, cfg)
        server = RolloutServer(cfg, "bench", seed=0)
        push = group_sender(sink_ctx, cfg.net)
        try:
            server.install(weights)  # as the server does with the first version
            engine, task, r = server.engine, server.task, cfg.rollout
            desc = _describe(cfg, model, len(task.tokenizer))
            spec = server.sampling(r.temperature)
            plan = _plan(task, seeds, r.prompts_per_call)

            def server_path() -> None:
                for k in seeds:
                    server.rng = np.random.default_rng(k)
                    task.source.rng = np.random.default_rng(k)
                    server_groups(server, push)

            def bare_engine() -> int:
                return sum(
                    sum(
                        len(c) for c in engine.generate([p.ids for p in c.prompts], r.group_size, spec, seed=c.seed).ids
                    )
                    for c in plan
                )

            def token_path() -> None:
                for c in plan:
                    token_groups(server, push, c, spec)

            samples = [engine.generate([p.ids for p in c.prompts], r.group_size, spec, seed=c.seed) for c in plan]
            texts = [task.decode(s.ids) for s in samples]
            args = [
                reward_args(task, c.prompts, s.ids, t, r.group_size)
                for c, s, t in zip(plan, samples, texts, strict=True)
            ]

            def tokenize() -> None:
                for k in seeds:
                    task.source.rng = np.random.default_rng(k)
                    task.next_prompts(r.prompts_per_call)

            def decode() -> None:
                for s in samples:
                    task.decode(s.ids)

            def reward() -> None:
                for a in args:
                    task.rewards.score(*a)

            stop_ids = torch.tensor(task.stop_ids)
            hf_batches = []
            for c in plan:
                batch = [p.ids for p in c.prompts for _ in range(r.group_size)]
                width = max(len(p) for p in batch)
                ids = torch.full((len(batch), width), task.pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, p in enumerate(batch):
                    ids[i, width - len(p) :] = torch.from_numpy(p.astype(np.int64))
                    mask[i, width - len(p) :] = 1
                hf_batches.append((ids, mask))

            @torch.inference_mode()
            def transformers_generate() -> int:
                tokens = 0
                for k, (ids, mask) in enumerate(hf_batches):
                    torch.manual_seed(k)
                    out = model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        do_sample=True,
                        max_new_tokens=cfg.max_new_tokens,
                        temperature=r.temperature,
                        top_k=None,
                        top_p=None,
                        output_logits=True,
                        return_dict_in_generate=True,
                        eos_token_id=list(task.stop_ids),
                        pad_token_id=task.pad_id,
                    )
                    new = out.sequences[:, ids.shape[1] :]
                    logits = torch.stack(out.logits, 1).float() / r.temperature
                    torch.log_softmax(logits, -1).gather(2, new[:, :, None])  # the behaviour log-probs
                    tokens += _tokens(new, stop_ids)
                return tokens

            # sanity: the token path scores what the text path scores (one character per token here)
            text_rewards = np.concatenate([task.rewards.score(*a).rewards for a in args])
            id_rewards = np.concatenate(
                [
                    copy_credit(s.ids[i * r.group_size : (i + 1) * r.group_size], ans)
                    for c, s in zip(plan, samples, strict=True)
                    for i, ans in enumerate(c.answers)
                ]
            )
            agreement = float(np.mean(np.isclose(text_rewards, id_rewards)))
            engine_tokens, hf_tokens = bare_engine(), transformers_generate()
            fns: dict[str, Any] = {"server": server_path, "engine": bare_engine, "transformers": transformers_generate}
            if text_path:
                fns |= {"token": token_path, "tokenize": tokenize, "decode": decode, "reward": reward}
            if extra_chars:
                del fns["server"]  # (a) is about the server's per-group work, measured on the other cases
            t = interleaved(fns, repeats=repeats, min_time=min_time)
        finally:
            if server.task is not None:
                server.task.close()
            server.monitor.close()
            for s in (server.push, push):
                s.close(linger=0)
            server.weights.close()
            server.ctx.term()
            server._worker.shutdown()
            sink.close()
            sink_ctx.term()

    rows = r.prompts_per_call * r.group_size * len(seeds)
    ms = {k: 1e3 * v / len(seeds) for k, v in t.items()}  # per engine call (one produce)
    engine_tps, hf_tps = engine_tokens / t["engine"], hf_tokens / t["transformers"]
    results = []
    if "server" in t:
        server_tps = engine_tokens / t["server"]
        results.append(
            Result(
                bench="rollout",
                case=f"(a) server path, {name}: {desc}",
                value=server_tps,
                unit="tokens/s",
                peer="bare engine.generate, same prompts and seeds",
                peer_value=engine_tps,
                ratio=server_tps / engine_tps,
                goal=">= 0.9x",
                met=server_tps / engine_tps >= 0.9,
                notes="tokenize + generate + decode + reward worker + ScoredGroup + zmq PUSH to a PULL sink drained "
                "by a thread; identical tokens",
                extra={
                    "server_ms_per_call": ms["server"],
                    "engine_ms_per_call": ms["engine"],
                    "overhead_ms_per_call": ms["server"] - ms["engine"],
                    "groups_received": sink.received,
                },
            )
        )
    if "token" in t:
        ratio = t["server"] / t["token"]
        parts = {k: ms[k] for k in ("tokenize", "decode", "reward")}
        results.append(
            Result(
                bench="rollout",
                case=f"(a2) text path vs token path, {name}: {desc}",
                value=ms["server"],
                unit="ms/call",
                peer="token path: same engine calls, copy credit on token ids in-process, same ScoredGroups and socket",
                peer_value=ms["token"],
                ratio=ratio,
                goal=f"<= {TEXT_GOAL:.2f}x",
                met=ratio <= TEXT_GOAL,
                ratio_means="text path time / token path time",
                notes="produce (tokenize + generate + decode + reward worker round trip + push) vs the "
                "pre-text server loop on pre-drawn ids; identical tokens, both pushed to the same sink",
                extra={
                    "text_ms_per_call": ms["server"],
                    "token_ms_per_call": ms["token"],
                    "engine_ms_per_call": ms["engine"],
                    "text_over_token_ms_per_call": ms["server"] - ms["token"],
                    **{f"{k}_ms_per_call": v for k, v in parts.items()},
                    "reward_agreement": agreement,
                },
            )
        )
        what = {
            "tokenize": "task.next_prompts (render + tokenize)",
            "decode": "task.decode (batch_decode)",
            "reward": "task.rewards.score (round trip to the reward worker)",
        }
        for k, v in parts.items():
            results.append(
                Result(
                    bench="rollout",
                    case=f"(a2) text path part: {what[k]}, {name}",
                    value=v,
                    unit="ms/call",
                    peer="the whole text path (produce)",
                    peer_value=ms["server"],
                    ratio=v / ms["server"],
                    goal="-",
                    met=None,
                    ratio_means="part / text path",
                    notes="median per produce call, measured alone on the same prompts and completions",
                )
            )
    results.append(
        Result(
            bench="rollout",
            case=f"(b) torch engine, {name}: {desc}",
            value=engine_tps,
            unit="tokens/s",
            peer="transformers generate(do_sample) + log-probs from output_logits",
            peer_value=hf_tps,
            ratio=engine_tps / hf_tps,
            goal=">= 1.5x",
            met=engine_tps / hf_tps >= 1.5,
            notes="tokens/s because the two sample different tokens; same model, batch, budget",
            extra={
                "engine_mean_len": engine_tokens / rows,
                "transformers_mean_len": hf_tokens / rows,
                "engine_ms_per_call": ms["engine"],
                "transformers_ms_per_call": ms["transformers"],
            },
        )
    )
    return results


def run(quick: bool = False) -> list[Result]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    results = bench_case("tiny", TINY, quick, text_path=True)
    if not quick:
        results += bench_case("big", BIG, quick)
        results += bench_case("big, wide alphabet", BIG, quick, extra_chars=WIDE)
    return results


if __name__ == "__main__":
    print_results(run())
