"""What every generation engine takes and returns: the engine interface, ``SamplingSpec`` and ``Samples``.

The engines (``engine.py``: torch and the registry; ``vllm_engine.py``: vLLM) and the rollout server
import these from here, so no engine module imports another for its types. Nothing heavy is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from protocol.messages import Weights

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Samples:
    """Completions in prompt-major order: prompt 0's n completions, then prompt 1's, ..."""

    ids: list[np.ndarray]  # int32 [L_i], EOS included when sampled
    logprobs: list[np.ndarray]  # float32 [L_i]


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample: from the task (stop tokens and strings) and the config (lengths, temperature)."""

    max_new_tokens: int
    temperature: float  # 0 = greedy
    stop_ids: tuple[int, ...]
    pad_id: int
    stop_strings: tuple[str, ...] = ()
    decode: Callable[[list[int]], str] | None = None  # needed for stop strings


class Engine(Protocol):
    version: int | None

    def load(self, weights: Weights, verified: bool = False, device_data: torch.Tensor | None = None) -> None:
        """Install ``weights`` by copying them: the server recycles ``weights.data`` for a later transfer
        once a newer version is installed, so no reference to it may outlive this call. ``device_data``:
        the same bytes already on the engine's device (CUDA IPC), to copy from instead."""

    def generate(self, prompts: list[np.ndarray], n: int, spec: SamplingSpec, seed: int) -> Samples: ...
