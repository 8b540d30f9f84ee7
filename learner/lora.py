"""LoRA on the learner (``learner.lora``, docs/LORA.md): peft adapters, and their names on the wire and on disk.

With ``learner.lora.rank`` > 0 the model is wrapped by peft (``get_peft_model``): the base weights are
frozen, only the adapters train, and the optimizer holds only them (:func:`trainable`). What leaves the
learner is the adapter alone, in three spellings of one name:

- live (peft's parameter names): ``base_model.model.<module>.lora_A.default.weight``;
- published (``protocol/lora.py``: the base model's module names): ``<module>.lora_A.weight``;
- on disk (a peft adapter directory: ``adapter_model.safetensors`` + ``adapter_config.json``, what
  ``PeftModel.from_pretrained`` loads): ``base_model.model.<module>.lora_A.weight``.

Checkpoints of a LoRA run hold that adapter directory (``adapter/``) instead of the whole model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from protocol.config import LoraSettings
from protocol.lora import LoraSpec, parse_name

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"  # peft's name for the one adapter
ADAPTER_FILE = "adapter_model.safetensors"


def enabled(settings: LoraSettings) -> bool:
    return settings.rank > 0


def apply_lora(model: PreTrainedModel, settings: LoraSettings) -> torch.nn.Module:
    """``model`` with an adapter on every ``target_modules`` linear layer; the base frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"learner.lora.target_modules={settings.target_modules}: {e}") from None


def trainable(net: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer holds: all of them, or the adapters alone under LoRA."""
    return [p for p in net.parameters() if p.requires_grad]


def spec(settings: LoraSettings, base_digest: int) -> LoraSpec:
    return LoraSpec(settings.rank, settings.alpha, tuple(settings.target_modules), base_digest)


def published(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a live (peft) state dict, under their published names."""
    out = {}
    for name, t in state.items():
        bare = name.removeprefix(PEFT_PREFIX).replace(f".{ADAPTER}.", ".")
        if parse_name(bare) is not None:
            out[bare] = t
    return out


def live(adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published adapter names back to peft's parameter names (to load into the live model)."""
    out = {}
    for name, t in adapter.items():
        parsed = parse_name(name)
        assert parsed is not None, name
        module, half = parsed
        out[f"{PEFT_PREFIX}{module}.{half}.{ADAPTER}.weight"] = t
    return out


def save_adapter(path: Path, adapter: dict[str, torch.Tensor], settings: LoraSettings, base: str) -> None:
    """A peft adapter directory at ``path`` (``base``: the base model's directory, recorded as peft does)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({PEFT_PREFIX + k: v.detach().contiguous() for k, v in adapter.items()}, str(path / ADAPTER_FILE))
    LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        base_model_name_or_path=base,
        task_type="CAUSAL_LM",
    ).save_pretrained(str(path))


def load_adapter(path: Path) -> dict[str, torch.Tensor]:
    """The adapter of a peft adapter directory, under its published names."""
    from safetensors.torch import load_file

    if not (path / ADAPTER_FILE).exists():
        raise FileNotFoundError(f"no peft adapter at {path} (expected {ADAPTER_FILE})")
    return {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(path / ADAPTER_FILE)).items()}


def adapter_base(path: Path) -> Path:
    """The base model directory an adapter directory names (``base_model_name_or_path``)."""
    return Path(json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"])
