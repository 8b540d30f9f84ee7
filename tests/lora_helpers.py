"""LoRA versions as the learner makes them, for the tests of every side (learner, weights, engine, export)."""

from __future__ import annotations

from typing import cast as typed

import torch
from peft import PeftModel

from learner.lora import apply_lora, published
from learner.parallel import cast
from protocol.config import Config
from protocol.lora import state_digest, with_lora
from protocol.messages import Weights
from protocol.weights import pack_weights


def adapter_model(cfg: Config, base: torch.nn.Module, seed: int = 0) -> tuple[PeftModel, int]:
    """``base`` (changed in place) wrapped by peft as the learner does, with a random, non-zero adapter (peft
    starts B at zero, which would hide any error in applying it); and the base's digest, as the learner
    computes it before wrapping."""
    digest = state_digest(cast(base.state_dict(), cfg.model.dtype))
    model = typed(PeftModel, apply_lora(base, cfg.learner.lora))  # type: ignore[arg-type]
    randomize(model, seed)
    model.eval()
    return model, digest


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random adapter weights (as after some training), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def adapter_version(cfg: Config, model: torch.nn.Module, digest: int, version: int) -> Weights:
    """Version ``version`` of ``model``'s adapter, packed as ``learner.train.Lead.publish`` packs it."""
    from learner.lora import spec

    config = with_lora(model.config.to_json_string(), spec(cfg.learner.lora, digest))  # type: ignore[operator,union-attr]
    state = cast({k: v.detach() for k, v in model.state_dict().items()}, cfg.model.dtype)
    return pack_weights(published(state), version, config)
