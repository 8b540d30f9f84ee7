"""Generation engines: sample n completions per prompt with per-token behaviour log-probs.

``ENGINES`` maps the config's ``rollout.engine.type`` to a class; ``build_engine`` makes one. Every
engine implements ``sampling.Engine``. The torch engine runs anywhere torch does; the vLLM engine
(``vllm_engine.py``) is an optional extra.
Log-probs are those of the distribution actually sampled: ``log_softmax(logits / temperature)``
(temperature 0 is greedy decoding, for evaluation; its log-probs are those of temperature 1).
A completion ends after a stop token (the tokenizer's EOS and the model's ``eos_token_id``s), after
the token that completes a stop string, or at ``max_new_tokens``.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import numpy as np
import torch

from protocol.config import Config
from protocol.lora import LoraSpec, split_config
from protocol.messages import Weights
from protocol.weights import unpack_weights
from rollout_server.sampling import Engine, Samples, SamplingSpec

if TYPE_CHECKING:
    from rollout_server.lora import Adapters

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class StopStrings:
    """Finds rows whose completion now contains a stop string, decoding only each row's tail."""

    def __init__(self, spec: SamplingSpec) -> None:
        assert spec.decode is not None, "stop strings need the tokenizer's decode"
        self.strings, self.decode = spec.stop_strings, spec.decode
        self.window = max(len(s) for s in spec.stop_strings) + 4  # tokens: each is at least one character

    def hits(self, tokens: torch.Tensor, live: torch.Tensor, t: int) -> torch.Tensor:
        """Of the batch rows ``live`` (output rows), which completed a stop string at step ``t``."""
        tails = tokens[live, max(0, t + 1 - self.window) : t + 1].tolist()
        return torch.tensor(
            [any(s in self.decode(tail) for s in self.strings) for tail in tails],
            dtype=torch.bool,
            device=tokens.device,
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TorchEngine:
    """A KV-cached sampling loop over any transformers causal LM (CPU or CUDA).

    Each prompt is prefilled once and its KV cache shared by its n rows; rows that finished are
    dropped from the batch (their later tokens are PAD and are trimmed anyway); the forward after
    the last token is skipped. Sampling is deterministic in ``seed`` (the same prompts, n, seed and
    weights give the same completions on the same device).
    """

    compact_frac = 0.125  # drop finished rows once they are this fraction of the batch (each drop copies the cache)

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.rollout.engine.device)
        self.adapters: Adapters | None = None  # LoRA versions: what applies them to the base
        self.dtype = DTYPES[cfg.model.dtype]
        self.model: torch.nn.Module | None = None
        self.version: int | None = None
        self._last_logits_only = False  # the model takes logits_to_keep (the prefill needs only the last)
        self._cache_kw = "past_key_values"

    def load(self, weights: Weights, verified: bool = False, device_data: torch.Tensor | None = None) -> None:
        """Install a complete version (its digests are checked first unless the caller just did), from
        ``device_data`` when given (a device copy of the same bytes: a device-to-device copy).
        A LoRA version (``protocol/lora.py``) is an adapter: the first one builds the base (``model.path``, or
        the copy the weights client fetched; checked by digest against the learner's), and each is applied
        to it (``rollout_server/lora.py``, ``rollout.engine.lora_mode``)."""
        tensors = unpack_weights(weights, verified=verified, buf=device_data)
        config, lora = split_config(weights.model_config)
        if (lora is None) != (self.adapters is None) and self.model is not None:
            raise RuntimeError("the learner switched between LoRA and full versions: restart the rollout server")
        if self.model is None:
            self.model = self._build(config, lora)
        if self.adapters is not None and lora is not None:
            self.adapters.apply(tensors, lora)
        else:
            self.model.load_state_dict(tensors, strict=True)
        self.version = weights.version

    def _build(self, config: dict, lora: LoraSpec | None) -> torch.nn.Module:
        """The model (random weights until loaded; under LoRA the base, ``rollout_server.lora.find_base``)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        if lora is not None:
            from rollout_server.lora import Adapters, find_base, load_base

            base = find_base(self.cfg.model_dir, self.cfg.run.dir, lora, self.dtype)
            model = load_base(base, lora, self.dtype, self.device)
            self.adapters = Adapters(model, self.cfg.rollout.engine.lora_mode)
        else:
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).to(self.device, self.dtype).eval()
        params = inspect.signature(model.forward).parameters
        self._last_logits_only = "logits_to_keep" in params
        # transformers >= 5.2x renamed ``past_key_values`` to ``cache`` (the old name warns)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        return model

    @torch.inference_mode()
    def generate(self, prompts: list[np.ndarray], n: int, spec: SamplingSpec, seed: int) -> Samples:
        assert self.model is not None, "load weights before generating"
        dev, rows, max_new_tokens = self.device, len(prompts) * n, spec.max_new_tokens
        if rows == 0 or max_new_tokens <= 0:
            return Samples([np.empty(0, np.int32)] * rows, [np.empty(0, np.float32)] * rows)
        gen = torch.Generator(device=dev).manual_seed(seed)
        lens = [len(p) for p in prompts]
        width = max(lens)
        ids = np.full((len(prompts), width), spec.pad_id, np.int64)
        mask = np.zeros((len(prompts), width + max_new_tokens), np.int64)  # every step's mask, sliced
        for i, p in enumerate(prompts):  # left padding keeps every row's next token at the end
            ids[i, width - len(p) :] = p
            mask[i, width - len(p) :] = 1
        ids_t, mask_t = torch.from_numpy(ids).to(dev), torch.from_numpy(mask).to(dev)
        positions = (mask_t[:, :width].cumsum(1) - 1).clamp(min=0)
        extra = {"logits_to_keep": 1} if self._last_logits_only else {}
        out = self.model(
            input_ids=ids_t, attention_mask=mask_t[:, :width], position_ids=positions, use_cache=True, **extra
        )
        cache = out.past_key_values
        expand = torch.arange(len(prompts), device=dev).repeat_interleave(n)  # prompt-major rows
        cache.reorder_cache(expand)
        logits, mask_t, next_pos = out.logits[expand, -1], mask_t[expand], positions[expand, -1:] + 1
        padded = min(lens) != width  # without padding the mask is all ones: let the model skip it
        tokens = torch.full((rows, max_new_tokens), spec.pad_id, dtype=torch.long, device=dev)
        logps = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=dev)
        lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=dev)
        live = torch.arange(rows, device=dev)  # output row of each batch row
        done = torch.zeros(rows, dtype=torch.bool, device=dev)  # finished, still in the batch
        stop_ids = torch.tensor(spec.stop_ids, dtype=torch.long, device=dev)
        stops = StopStrings(spec) if spec.stop_strings else None
        for t in range(max_new_tokens):
            if spec.temperature > 0:
                logp = torch.log_softmax(logits.float() / spec.temperature, dim=-1)
                tok = torch.multinomial(logp.exp(), 1, generator=gen)
            else:
                logp = torch.log_softmax(logits.float(), dim=-1)
                tok = logp.argmax(-1, keepdim=True)
            tokens[live, t] = torch.where(done, spec.pad_id, tok[:, 0])
            logps[live, t] = logp.gather(1, tok)[:, 0]
            ended = ~done & torch.isin(tok[:, 0], stop_ids)
            if stops is not None:
                ended |= ~done & ~ended & stops.hits(tokens, live, t)
            lengths[live[ended]] = t + 1
            done |= ended
            if t == max_new_tokens - 1:
                break
            finished = int(done.sum())
            if finished == live.numel():
                break
            if finished and finished >= self.compact_frac * live.numel():
                keep = (~done).nonzero()[:, 0]
                cache.reorder_cache(keep)
                live, mask_t, next_pos, tok, done = live[keep], mask_t[keep], next_pos[keep], tok[keep], done[keep]
            out = self.model(
                input_ids=tok,
                attention_mask=mask_t[:, : width + t + 1] if padded else None,
                position_ids=next_pos,
                use_cache=True,
                **{self._cache_kw: cache},
            )
            logits, next_pos = out.logits[:, -1], next_pos + 1
        ends = lengths.tolist()
        toks, lps = tokens.cpu().numpy().astype(np.int32), logps.cpu().numpy()
        return Samples([toks[i, :e] for i, e in enumerate(ends)], [lps[i, :e] for i, e in enumerate(ends)])


def _vllm(cfg: Config) -> Engine:
    from rollout_server.vllm_engine import VLLMEngine  # lazy: vllm is an optional GPU-only extra

    return VLLMEngine(cfg)


ENGINES = {"torch": TorchEngine, "vllm": _vllm}


def build_engine(cfg: Config) -> Engine:
    return ENGINES[cfg.rollout.engine.type](cfg)
