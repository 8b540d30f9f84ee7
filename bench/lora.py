"""LoRA: what a version weighs, and how the torch engine should apply an adapter (docs/LORA.md).

    python -m bench lora            # ~70 s on 2 cores: every row below, into bench/results.json
    python -m bench.lora --sync     # (d) alone, into bench/results-lora-sync.json
    python -m bench.lora --quick    # the tiny model only, a few seconds

(a) Bytes per version on the ~100M-parameter Llama of bench/weights.py (``SIZES["100M"]``, published in
    bf16 as ``model.dtype = "bfloat16"`` does): the adapter's raw bytes at rank 8 and 64 (targets
    q/k/v/o_proj, the default) over the full version's raw bytes (goal for rank 8: <= 1%). Shapes come
    from the model built on the meta device and the adapter from peft itself, so no weights are made.
(b) Engine time per generated token, ``rollout.engine.lora_mode`` merged vs unmerged, on the tiny default
    model (``launcher.tiny``) and the 2.6M Llama (``SIZES["2.6M"]``), fp32 on CPU, one thread: 4 prompts
    x n = 8, 32 new tokens (no stop tokens, so every call makes the same number of tokens),
    rank 8 on q/k/v/o_proj; the two modes alternate (``bench.common.interleaved``), medians. Beside them
    the same engine with a full version (no adapter), and the time to install one adapter version.
(d) (``--sync``, ~1 min alone) Time for a version to reach 4 rollout client processes over the network
    (bench/weights.py's (2): the real ``WeightPublisher`` and ``Fetcher`` in 4 spawned clients, full raw
    transfers), the rank-8 adapter of the 100M bf16 Llama vs its full bf16 version; medians of 2 rounds.
(c) The learner's step, LoRA (rank 8, q/k/v/o) vs full fine-tuning, on the ~100M Llama (quick: ~1M) with
    ``model.dtype = "bfloat16"`` (autocast over fp32 master weights, as the learner runs): the real
    ``learner.step.train_step`` on 4 rows of 16 prompt + 16 completion tokens, one thread, one warm-up step
    then the median of 2; peak memory is each arm's process's peak RSS (``ru_maxrss``: imports, the fp32
    model, gradients and AdamW state; each arm runs in a fresh spawned process).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, Result, interleaved, machine, print_results, save
from bench.weights import SIZES

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def llama_config(size: str) -> Any:
    from transformers import LlamaConfig

    hidden, inter, layers, vocab = SIZES[size]
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def bytes_per_version(size: str) -> list[Result]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(size))
    params = sum(p.numel() for p in model.parameters())
    full = 2 * params  # bf16
    out = []
    for rank in (8, 64):
        with torch.device("meta"):
            peft = get_peft_model(LlamaForCausalLM(llama_config(size)), LoraConfig(r=rank, target_modules=TARGETS))
        adapter = 2 * sum(p.numel() for n, p in peft.named_parameters() if ".lora_" in n)
        out.append(
            Result(
                bench="lora",
                case=f"(a) adapter rank {rank} (q/k/v/o) vs full version, {params / 1e6:.0f}M Llama in bf16",
                value=adapter / 2**20,
                unit="MiB",
                peer="full bf16 version (raw bytes)",
                peer_value=full / 2**20,
                ratio=adapter / full,
                goal="<= 1% (rank 8)" if rank == 8 else "-",
                met=adapter / full <= 0.01 if rank == 8 else None,
                extra={"params": params, "adapter_params": adapter // 2},
            )
        )
    return out


def adapter_weights(model_dir: Path, rank: int, version: int) -> Any:
    """A LoRA version of the model at ``model_dir``, packed as the learner publishes it (random adapter)."""
    import torch

    from learner.lora import apply_lora, published, spec
    from learner.model import load_model
    from protocol.config import LoraSettings
    from protocol.lora import state_digest, with_lora
    from protocol.weights import pack_weights

    settings = LoraSettings(rank=rank, alpha=2 * rank, target_modules=TARGETS)
    base = load_model(model_dir, torch.device("cpu"))
    digest = state_digest(base.state_dict())
    model = apply_lora(base, settings)
    g = torch.Generator().manual_seed(version)
    state = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in published(model.state_dict()).items()}
    return pack_weights(state, version, with_lora(base.config.to_json_string(), spec(settings, digest)))


def engine_per_token(name: str, model_dir: Path, vocab: int) -> list[Result]:
    import torch

    from learner.model import load_model
    from protocol.config import load_config
    from protocol.weights import pack_weights
    from rollout_server.engine import TorchEngine
    from rollout_server.sampling import SamplingSpec

    torch.set_num_threads(1)
    base = load_model(model_dir, torch.device("cpu"))
    full = pack_weights(base.state_dict(), 0, base.config.to_json_string())
    adapter = adapter_weights(model_dir, 8, 1)
    engines = {}
    for mode in ("full", "merged", "unmerged"):
        cfg = load_config(
            None,
            [
                f"model.path={model_dir}",
                "model.init=pretrained",
                f"rollout.engine.lora_mode={mode.replace('full', 'merged')}",
            ],
        )
        engines[mode] = TorchEngine(cfg)
        engines[mode].load(full if mode == "full" else adapter)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, vocab - 1, size=12).astype(np.int32) for _ in range(4)]
    spec = SamplingSpec(max_new_tokens=32, temperature=1.0, stop_ids=(), pad_id=0)
    tokens = 4 * 8 * 32
    calls: dict[str, Callable[[], Any]] = {
        m: functools.partial(e.generate, prompts, 8, spec, 1) for m, e in engines.items()
    }
    secs = interleaved(calls, repeats=5, min_time=0.2)
    install = {}
    for mode in ("merged", "unmerged"):
        t0 = time.perf_counter()
        for _ in range(5):
            engines[mode].load(adapter, verified=True)
        install[mode] = (time.perf_counter() - t0) / 5
    us = {m: s / tokens * 1e6 for m, s in secs.items()}
    return [
        Result(
            bench="lora",
            case=f"(b) torch engine per token, unmerged vs merged adapter (rank 8, q/k/v/o), {name}",
            value=us["unmerged"],
            unit="us/token",
            peer="merged",
            peer_value=us["merged"],
            ratio=us["unmerged"] / us["merged"],
            goal="-",
            met=None,
            notes=f"full version (no adapter): {us['full']:.1f} us/token; installing one version: merged "
            f"{install['merged'] * 1e3:.2f} ms, unmerged {install['unmerged'] * 1e3:.2f} ms",
            extra={"us_per_token": us, "install_s": install},
        )
    ]


def _learner_arm(size: str, rank: int, conn: Any) -> None:
    """(spawned) Build the model, time ``train_step``, send (median step seconds, peak RSS MiB)."""
    import resource

    import torch
    from transformers import LlamaForCausalLM

    from learner.lora import apply_lora, trainable
    from learner.step import train_step
    from protocol.config import LoraSettings, load_config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model: torch.nn.Module = LlamaForCausalLM(llama_config(size))
    if rank:
        model = apply_lora(model, LoraSettings(rank=rank, alpha=2 * rank, target_modules=TARGETS))  # type: ignore[arg-type]
    opt = torch.optim.AdamW(trainable(model), lr=1e-5)
    cfg = load_config(None, ["model.dtype=bfloat16", "learner.micro_batch_tokens=0", "rollout.max_new_tokens=16"])
    vocab = SIZES[size][3]
    g = torch.Generator().manual_seed(1)
    rows = {
        "prompts": [torch.randint(0, vocab, (16,), generator=g) for _ in range(4)],
        "completions": [torch.randint(0, vocab, (16,), generator=g) for _ in range(4)],
        "behav": [-2.0 - torch.rand(16, generator=g) for _ in range(4)],
        "advantages": torch.randn(4, generator=g),
    }
    times = []
    for step in range(3):
        t0 = time.perf_counter()
        train_step(model, opt, rows, cfg, 1, torch.device("cpu"), step)
        times.append(time.perf_counter() - t0)
    conn.send((sorted(times[1:])[len(times[1:]) // 2], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def learner_step(size: str) -> list[Result]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    arms = {}
    for rank in (8, 0):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_learner_arm, args=(size, rank, child))
        proc.start()
        arms[rank] = parent.recv()
        proc.join()
    (lora_s, lora_mib), (full_s, full_mib) = arms[8], arms[0]
    return [
        Result(
            bench="lora",
            case=f"(c) learner step, LoRA rank 8 vs full fine-tuning, {size} Llama, bf16 autocast",
            value=lora_s,
            unit="s",
            peer="full fine-tuning",
            peer_value=full_s,
            ratio=lora_s / full_s,
            goal="-",
            met=None,
            notes=f"peak RSS: LoRA {lora_mib:.0f} MiB, full {full_mib:.0f} MiB ({lora_mib / full_mib:.2f}x)",
            extra={"peak_rss_mib": {"lora": lora_mib, "full": full_mib}},
        )
    ]


def sync_to_servers(repeats: int = 2) -> list[Result]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from bench.weights import Rig, random_state, sync_one
    from protocol.config import WeightsConfig

    full = {k: v.to(torch.bfloat16) for k, v in random_state("100M").items()}
    with torch.device("meta"):
        peft = get_peft_model(LlamaForCausalLM(llama_config("100M")), LoraConfig(r=8, target_modules=TARGETS))
    g = torch.Generator().manual_seed(0)
    adapter = {
        n: torch.randn(p.shape, generator=g).mul_(0.02).to(torch.bfloat16)
        for n, p in peft.named_parameters()
        if ".lora_" in n
    }
    rig = Rig(4, WeightsConfig(transport="net", delta=False))
    try:
        t = {
            name: statistics.median(sync_one(rig, state, None, 4, repeats)["t"]["podsrl"])
            for name, state in (("adapter", adapter), ("full", full))
        }
    finally:
        rig.close()
    return [
        Result(
            bench="lora",
            case="(d) a version to 4 rollout clients over the network, rank-8 adapter vs full, 100M Llama in bf16",
            value=t["adapter"] * 1e3,
            unit="ms",
            peer="the full bf16 version",
            peer_value=t["full"] * 1e3,
            ratio=t["adapter"] / t["full"],
            goal="-",
            met=None,
            notes="from pack + publish to the last client's verified copy (bench/weights.py (2), full transfers)",
        )
    ]


def run(quick: bool = False) -> list[Result]:
    from launcher.tiny import build_tiny_model
    from protocol.config import load_config

    out = bytes_per_version("1M" if quick else "100M") + learner_step("1M" if quick else "100M")
    with tempfile.TemporaryDirectory(prefix="podsrl-bench-lora-") as tmp:
        cfg = load_config(None, [f"run.dir={tmp}"])
        build_tiny_model(cfg, cfg.model_dir, alphabet="abcdefghijkl:")
        from transformers import AutoConfig

        vocab = int(AutoConfig.from_pretrained(cfg.model_dir).vocab_size)
        out += engine_per_token("tiny model", cfg.model_dir, vocab)
        if not quick:
            import torch
            from transformers import LlamaForCausalLM

            torch.manual_seed(0)
            path = Path(tmp) / "2.6M"
            LlamaForCausalLM(llama_config("2.6M")).save_pretrained(path)
            out += engine_per_token("2.6M Llama", path, SIZES["2.6M"][3])
    return out if quick else out + sync_to_servers()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sync", action="store_true", help="only (d), the time to 4 servers")
    args = parser.parse_args()
    t0 = time.time()
    results = sync_to_servers() if args.sync else run(args.quick)
    print_results(results)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.lora" + (" --quick" if args.quick else "") + (" --sync" if args.sync else ""),
        "seconds": time.time() - t0,
        "machine": machine(),
    }
    name = "results-lora" + ("-quick" if args.quick else "") + ("-sync" if args.sync else "")
    save(results, meta, ROOT / "bench" / f"{name}.json")


if __name__ == "__main__":
    main()
