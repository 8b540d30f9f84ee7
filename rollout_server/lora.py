"""The torch engine's side of LoRA (docs/LORA.md): the base from this server's own ``model.path``, and
each version's adapter applied to it.

The base is built once, from ``model.path`` on this machine, and must be the one the learner trains on:
its :func:`protocol.lora.state_digest` (in ``model.dtype``) must equal the ``base_digest`` every LoRA
version carries, else the server refuses to start generating and says how to fix it (the base is not
sent over the weights link).

Two ways to apply an adapter (``rollout.engine.lora_mode``):

- ``merged``: each target module's weight becomes ``W + B @ A * alpha/rank``, computed in fp32 from a
  private copy of the base weight (so versions never accumulate), then generation runs at the base's
  speed. Costs a private copy of the targeted base weights and one matmul per module per version.
- ``unmerged``: the base weights stay as they are; a forward hook on each target module adds
  ``B(A(x)) * alpha/rank`` (peft's own computation): two thin matmuls per module per token, nothing
  per version beyond copying the adapter.

The adapter reaching this module has passed :func:`protocol.lora.check_version` (names, shapes, finite).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from protocol.lora import LoraSpec, merged_weight, parse_name, state_digest

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def check_base(path: Path, spec: LoraSpec, dtype: torch.dtype) -> PreTrainedModel:
    """The base model at ``path`` (fp32, on the CPU), refused unless its digest in ``dtype`` is the learner's."""
    from transformers import AutoModelForCausalLM

    if not (path / "config.json").exists():
        raise RuntimeError(
            f"learner.lora is on: a version is an adapter, and this rollout server builds the base model from "
            f"model.path={path}, which holds no model. Copy the learner's model directory to this machine and "
            "point model.path at it (the base is not sent over the weights link)"
        )
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    got = state_digest(state)
    if got != spec.base_digest:
        raise RuntimeError(
            f"the base model at model.path={path} is not the one the learner trains adapters for (digest "
            f"{got:#018x}, the learner's is {spec.base_digest:#018x}): give this rollout server the same model "
            "directory (and model.dtype) as the learner"
        )
    return model


def load_base(path: Path, spec: LoraSpec, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The base model at ``path`` in ``dtype`` on ``device``, refused unless it is the learner's."""
    model = check_base(path, spec, dtype)
    torch.nn.Module.to(model, device, dtype)
    return model.eval()


class Adapters:
    """Applies each version's adapter to one model, merged or unmerged (see the module doc)."""

    def __init__(self, model: torch.nn.Module, mode: str) -> None:
        if mode not in ("merged", "unmerged"):
            raise ValueError(f"rollout.engine.lora_mode must be 'merged' or 'unmerged', got {mode!r}")
        self.model, self.mode = model, mode
        self.modules = dict(model.named_modules())
        self.base: dict[str, torch.Tensor] = {}  # merged: a private copy of each targeted base weight
        self.live: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}  # unmerged: (A, B, scale)
        self._hooks: dict[str, Any] = {}

    @torch.inference_mode()
    def apply(self, tensors: dict[str, torch.Tensor], spec: LoraSpec) -> None:
        """Make the model compute base + this adapter (copies the tensors: the caller's buffer is recycled)."""
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            parsed = parse_name(name)
            assert parsed is not None, f"{name} passed protocol.lora.check_adapter"
            pairs.setdefault(parsed[0], {})[parsed[1]] = t
        if self.base and set(pairs) != set(self.base) or self.live and set(pairs) != set(self.live):
            raise RuntimeError("an adapter for other modules than the previous version's: restart the rollout server")
        for module, ab in pairs.items():
            layer = self.modules[module]
            weight = layer.weight
            a, b = ab["lora_A"].to(weight.device), ab["lora_B"].to(weight.device)
            if self.mode == "merged":
                if module not in self.base:
                    self.base[module] = weight.detach().clone()
                weight.copy_(merged_weight(self.base[module], a, b, spec.scale))
            else:
                self.live[module] = (a.to(weight.dtype).clone(), b.to(weight.dtype).clone(), spec.scale)
                if module not in self._hooks:
                    self._hooks[module] = layer.register_forward_hook(self._hook(module))

    def _hook(self, module: str) -> Any:
        live = self.live

        def add_adapter(layer: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            a, b, scale = live[module]
            return out + torch.nn.functional.linear(torch.nn.functional.linear(args[0], a), b) * scale

        return add_adapter
