"""Built-in tasks with exact verifiers, small enough for a tiny model to learn from scratch on a CPU.

Token layout (protocol.config): PAD=0, BOS=1, SEP=2, EOS=3, symbols 4..4+S-1. A prompt is
``BOS s_1 .. s_L SEP``; the answer is L symbols then EOS. The reward is the fraction of the L answer
positions that are right (partial credit gives groups reward variance for PODS to use). A random
policy scores about 1/S.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from protocol.config import BOS_ID, NUM_SPECIAL, SEP_ID, TaskConfig


class Task(Protocol):
    name: str

    def sample_prompt(self, rng: np.random.Generator) -> np.ndarray:
        """One prompt as int32 token ids."""
        ...

    def score(self, prompt: np.ndarray, completion: np.ndarray) -> float:
        """Reward in [0, 1] of one completion (token ids, EOS included if sampled)."""
        ...


@dataclass(frozen=True)
class SymbolTask:
    """Shared prompt format; subclasses define the target answer of a prompt."""

    name: str
    length: int
    symbols: int

    def sample_prompt(self, rng: np.random.Generator) -> np.ndarray:
        body = rng.integers(NUM_SPECIAL, NUM_SPECIAL + self.symbols, size=self.length)
        return np.concatenate([[BOS_ID], body, [SEP_ID]]).astype(np.int32)

    def target(self, prompt: np.ndarray) -> np.ndarray:
        return prompt[1:-1]

    def score(self, prompt: np.ndarray, completion: np.ndarray) -> float:
        target = self.target(prompt)
        answer = completion[: self.length]
        hits = int((answer == target[: answer.shape[0]]).sum())
        return hits / self.length


@dataclass(frozen=True)
class ReverseTask(SymbolTask):
    def target(self, prompt: np.ndarray) -> np.ndarray:
        return prompt[1:-1][::-1]


TASKS: dict[str, type[SymbolTask]] = {"copy": SymbolTask, "reverse": ReverseTask}


def build_task(cfg: TaskConfig) -> Task:
    return TASKS[cfg.type](name=cfg.type, length=cfg.length, symbols=cfg.symbols)

