"""Generation engines: sample n completions per prompt with per-token behaviour log-probs.

``ENGINES`` maps the config's ``rollout.engine.type`` to a class; ``build_engine`` makes one.
The torch engine runs anywhere torch does; the vLLM engine (``vllm_engine.py``) needs a CUDA GPU.
Log-probs are those of the distribution actually sampled: ``log_softmax(logits / temperature)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from protocol.config import EOS_ID, PAD_ID, Config
from protocol.messages import Weights
from protocol.weights import unpack_weights


@dataclass(frozen=True)
class Samples:
    """Completions in prompt-major order: prompt 0's n completions, then prompt 1's, ..."""

    ids: list[np.ndarray]  # int32 [L_i], EOS included when sampled
    logprobs: list[np.ndarray]  # float32 [L_i]


class Engine(Protocol):
    version: int | None

    def load(self, weights: Weights) -> None: ...

    def generate(self, prompts: list[np.ndarray], n: int, max_new_tokens: int, temperature: float,
                 seed: int) -> Samples: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TorchEngine:
    """A KV-cached sampling loop over any transformers causal LM (CPU or CUDA)."""

    def __init__(self, cfg: Config) -> None:
        self.device = resolve_device(cfg.rollout.engine.device)
        self.model: torch.nn.Module | None = None
        self.version: int | None = None

    def load(self, weights: Weights) -> None:
        """Install a complete, checksummed version (``unpack_weights`` verifies it first)."""
        tensors = unpack_weights(weights)
        if self.model is None:
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.for_model(**json.loads(weights.model_config))
            self.model = AutoModelForCausalLM.from_config(config).to(self.device).eval()
        self.model.load_state_dict(tensors, strict=True)
        self.version = weights.version

    @torch.inference_mode()
    def generate(self, prompts: list[np.ndarray], n: int, max_new_tokens: int, temperature: float,
                 seed: int) -> Samples:
        assert self.model is not None, "load weights before generating"
        gen = torch.Generator(device=self.device).manual_seed(seed)
        rows = [p for p in prompts for _ in range(n)]
        width = max(len(p) for p in rows)
        ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, p in enumerate(rows):  # left padding keeps every row's next token at the end
            ids[i, width - len(p):] = torch.from_numpy(p.astype(np.int64))
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        tokens, logps = [], []
        done = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
        next_pos = positions[:, -1:] + 1
        for _ in range(max_new_tokens):
            logp = torch.log_softmax(out.logits[:, -1].float() / temperature, dim=-1)
            tok = torch.multinomial(logp.exp(), 1, generator=gen)
            tokens.append(torch.where(done[:, None], PAD_ID, tok))
            logps.append(logp.gather(1, tok))
            done |= tok[:, 0] == EOS_ID
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            out = self.model(input_ids=tok, attention_mask=mask, position_ids=next_pos,
                             past_key_values=out.past_key_values, use_cache=True)
            next_pos = next_pos + 1
        return _trim(torch.cat(tokens, 1).cpu().numpy(), torch.cat(logps, 1).cpu().numpy())


def _trim(tokens: np.ndarray, logps: np.ndarray) -> Samples:
    """Cut each row after its first EOS (kept) or at the token budget."""
    ids, lps = [], []
    for row, lp in zip(tokens, logps, strict=True):
        eos = np.flatnonzero(row == EOS_ID)
        end = int(eos[0]) + 1 if eos.size else row.shape[0]
        ids.append(row[:end].astype(np.int32))
        lps.append(lp[:end].astype(np.float32))
    return Samples(ids, lps)


def _vllm(cfg: Config) -> Engine:
    from rollout_server.vllm_engine import VLLMEngine  # lazy: vllm is an optional GPU-only extra

    return VLLMEngine(cfg)


ENGINES = {"torch": TorchEngine, "vllm": _vllm}


def build_engine(cfg: Config) -> Engine:
    return ENGINES[cfg.rollout.engine.type](cfg)
