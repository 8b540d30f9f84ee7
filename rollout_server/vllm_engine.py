"""vLLM engine (CUDA GPU only; optional extra ``pip install -e ".[vllm]"``).

NOT EXERCISED IN THIS REPOSITORY'S TESTS: vLLM needs a CUDA GPU and replaces the CPU torch build,
so it is never installed on the CPU machines CI runs on. The path is kept thin and written against
vLLM's public offline API (``vllm.LLM``, ``SamplingParams``, ``TokensPrompt``, ``collective_rpc``):

- the engine starts from ``model.path`` (a local transformers directory, e.g. the learner's initial
  model or a checkpoint's ``model/``), because vLLM loads architectures from files;
- ``logprobs_mode="processed_logprobs"`` makes the returned log-probs those of the distribution
  actually sampled (after temperature), as the importance ratios need; vLLM's default is the raw
  pre-temperature distribution, which would bias every ratio at temperature != 1;
- new versions are loaded in place with each worker's ``model.load_weights`` through
  ``collective_rpc`` (no restart, no files).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from protocol.config import Config
from protocol.messages import Weights
from protocol.weights import unpack_weights
from rollout_server.engine import Samples, SamplingSpec


def _load_weights(worker: Any, named: list[tuple[str, Any]]) -> None:
    """Runs inside every vLLM worker process."""
    worker.model_runner.model.load_weights(weights=[(n, t.to(worker.device)) for n, t in named])


class VLLMEngine:
    def __init__(self, cfg: Config) -> None:
        try:
            from vllm import LLM
        except ImportError as e:
            raise RuntimeError("rollout.engine.type='vllm' needs vLLM on a CUDA machine: pip install -e '.[vllm]'; "
                               "on CPU use rollout.engine.type='torch'") from e
        if not cfg.model.path:
            raise ValueError("the vllm engine loads the architecture from files: set model.path to a local model "
                             "directory (e.g. <run.dir>/model once the learner has built it)")
        self.llm = LLM(model=cfg.model.path, gpu_memory_utilization=cfg.rollout.engine.gpu_memory_utilization,
                       seed=cfg.run.seed, logprobs_mode="processed_logprobs", enable_prefix_caching=True,
                       dtype=cfg.model.dtype)
        self.version: int | None = None

    def load(self, weights: Weights) -> None:
        tensors = unpack_weights(weights)  # checksum verified before anything is touched
        self.llm.collective_rpc(_load_weights, args=(list(tensors.items()),))
        self.version = weights.version

    def generate(self, prompts: list[np.ndarray], n: int, spec: SamplingSpec, seed: int) -> Samples:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # The engine's own EOS handling is replaced by the task's stop ids; the stop string and the
        # token that completes it stay in the output, as in the torch engine (ids are the truth).
        params = SamplingParams(n=n, temperature=spec.temperature, max_tokens=spec.max_new_tokens, logprobs=0,
                                seed=seed, stop_token_ids=list(spec.stop_ids), stop=list(spec.stop_strings) or None,
                                include_stop_str_in_output=True, ignore_eos=True)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p.tolist()) for p in prompts], params, use_tqdm=False)
        ids, lps = [], []
        for out in outs:
            for c in out.outputs:
                ids.append(np.asarray(c.token_ids, np.int32))
                lps.append(np.asarray([step[tok].logprob for step, tok in zip(c.logprobs, c.token_ids, strict=True)],
                                      np.float32))
        return Samples(ids, lps)
