"""Generation engines: sample n completions per prompt with per-token behaviour log-probs.

``ENGINES`` maps the config's ``rollout.engine.type`` to a class; ``build_engine`` makes one.
The torch engine runs anywhere torch does; the vLLM engine (``vllm_engine.py``) needs a CUDA GPU.
Log-probs are those of the distribution actually sampled: ``log_softmax(logits / temperature)``.
"""

from __future__ import annotations

import inspect
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
    """A KV-cached sampling loop over any transformers causal LM (CPU or CUDA).

    Each prompt is prefilled once and its KV cache shared by its n rows; rows that sampled EOS are
    dropped from the batch (their later tokens are PAD and are trimmed anyway); the forward after
    the last token is skipped. Sampling is deterministic in ``seed`` (the same prompts, n, seed and
    weights give the same completions on the same device).
    """

    compact_frac = 0.125  # drop finished rows once they are this fraction of the batch (each drop copies the cache)

    def __init__(self, cfg: Config) -> None:
        self.device = resolve_device(cfg.rollout.engine.device)
        self.model: torch.nn.Module | None = None
        self.version: int | None = None
        self._last_logits_only = False  # the model takes logits_to_keep (the prefill needs only the last)

    def load(self, weights: Weights) -> None:
        """Install a complete, checksummed version (``unpack_weights`` verifies it first)."""
        tensors = unpack_weights(weights)
        if self.model is None:
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.for_model(**json.loads(weights.model_config))
            self.model = AutoModelForCausalLM.from_config(config).to(self.device).eval()
            self._last_logits_only = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self.model.load_state_dict(tensors, strict=True)
        self.version = weights.version

    @torch.inference_mode()
    def generate(self, prompts: list[np.ndarray], n: int, max_new_tokens: int, temperature: float,
                 seed: int) -> Samples:
        assert self.model is not None, "load weights before generating"
        dev, rows = self.device, len(prompts) * n
        if rows == 0 or max_new_tokens <= 0:
            return Samples([np.empty(0, np.int32)] * rows, [np.empty(0, np.float32)] * rows)
        gen = torch.Generator(device=dev).manual_seed(seed)
        lens = [len(p) for p in prompts]
        width = max(lens)
        ids = np.full((len(prompts), width), PAD_ID, np.int64)
        mask = np.zeros((len(prompts), width + max_new_tokens), np.int64)  # every step's mask, sliced
        for i, p in enumerate(prompts):  # left padding keeps every row's next token at the end
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
        ids_t, mask_t = torch.from_numpy(ids).to(dev), torch.from_numpy(mask).to(dev)
        positions = (mask_t[:, :width].cumsum(1) - 1).clamp(min=0)
        extra = {"logits_to_keep": 1} if self._last_logits_only else {}
        out = self.model(input_ids=ids_t, attention_mask=mask_t[:, :width], position_ids=positions, use_cache=True,
                         **extra)
        cache = out.past_key_values
        expand = torch.arange(len(prompts), device=dev).repeat_interleave(n)  # prompt-major rows
        cache.reorder_cache(expand)
        logits, mask_t, next_pos = out.logits[expand, -1], mask_t[expand], positions[expand, -1:] + 1
        padded = min(lens) != width  # without padding the mask is all ones: let the model skip it
        tokens = torch.full((rows, max_new_tokens), PAD_ID, dtype=torch.long, device=dev)
        logps = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=dev)
        live = torch.arange(rows, device=dev)  # output row of each batch row
        done = torch.zeros(rows, dtype=torch.bool, device=dev)  # sampled EOS, still in the batch
        for t in range(max_new_tokens):
            logp = torch.log_softmax(logits.float() / temperature, dim=-1)
            tok = torch.multinomial(logp.exp(), 1, generator=gen)
            tokens[live, t] = torch.where(done, PAD_ID, tok[:, 0])
            logps[live, t] = logp.gather(1, tok)[:, 0]
            done |= tok[:, 0] == EOS_ID
            if t == max_new_tokens - 1:
                break
            finished = int(done.sum())
            if finished == live.numel():
                break
            if finished and finished >= self.compact_frac * live.numel():
                keep = (~done).nonzero()[:, 0]
                cache.reorder_cache(keep)
                live, mask_t, next_pos, tok, done = live[keep], mask_t[keep], next_pos[keep], tok[keep], done[keep]
            out = self.model(input_ids=tok, attention_mask=mask_t[:, :width + t + 1] if padded else None,
                             position_ids=next_pos, past_key_values=cache, use_cache=True)
            logits, next_pos = out.logits[:, -1], next_pos + 1
        return self._trim(tokens.cpu().numpy(), logps.cpu().numpy())

    @staticmethod
    def _trim(tokens: np.ndarray, logps: np.ndarray) -> Samples:
        """Cut each row after its first EOS (kept) or at the token budget."""
        is_eos = tokens == EOS_ID
        ends = np.where(is_eos.any(1), is_eos.argmax(1) + 1, tokens.shape[1]).tolist()
        tokens = tokens.astype(np.int32)
        return Samples([tokens[i, :e] for i, e in enumerate(ends)], [logps[i, :e] for i, e in enumerate(ends)])


def _vllm(cfg: Config) -> Engine:
    from rollout_server.vllm_engine import VLLMEngine  # lazy: vllm is an optional GPU-only extra

    return VLLMEngine(cfg)


ENGINES = {"torch": TorchEngine, "vllm": _vllm}


def build_engine(cfg: Config) -> Engine:
    return ENGINES[cfg.rollout.engine.type](cfg)
