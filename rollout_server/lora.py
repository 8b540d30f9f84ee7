"""A rollout server's side of LoRA (docs/LORA.md): where the base comes from, and (torch engine) each
version's adapter applied to it.

The base is built once and must be the one the learner trains on: its :func:`protocol.lora.state_digest`
(in ``model.dtype``) must equal the ``base_digest`` every LoRA version carries. It is ``model.path`` on
this machine when that matches; otherwise the weights client fetches the base over the weights link once
and keeps it in ``<run.dir>/base/<digest>`` (:func:`write_base`), where the next start finds it.

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

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from protocol.lora import LoraSpec, merged_weight, parse_name, split_config, state_digest
from protocol.messages import ProtocolError, Weights
from protocol.weights import unpack_weights

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def base_cache(run_dir: str, spec: LoraSpec) -> Path:
    """Where a base fetched over the weights link is kept (``<run.dir>/base/<digest>``): fetched once."""
    return Path(run_dir) / "base" / f"{spec.base_digest:016x}"


@functools.lru_cache(maxsize=8)
def _digest_of(path: Path, dtype: torch.dtype) -> int | None:
    """The state digest (in ``dtype``) of the model at ``path``; None when there is none (memoized: the
    weights client and the engine both ask, and a large model is read once)."""
    from transformers import AutoModelForCausalLM

    if not (path / "config.json").exists():
        return None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return state_digest({k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()})


def find_base(model_dir: Path, run_dir: str, spec: LoraSpec, dtype: torch.dtype) -> Path | None:
    """The directory of the learner's base on this machine: ``model.path`` when its digest is the learner's,
    else the copy fetched earlier (:func:`base_cache`), else None (fetch it: :func:`write_base`)."""
    for path in (model_dir, base_cache(run_dir, spec)):
        if _digest_of(path, dtype) == spec.base_digest:
            return path
    return None


def write_base(w: Weights, files: dict[str, bytes], spec: LoraSpec, path: Path) -> None:
    """Keep a base fetched over the weights link (verified: its digest must be the one the adapters name)
    at ``path`` as a transformers directory (config, safetensors, the tokenizer ``files``); atomically."""
    import json
    import shutil

    from safetensors.torch import save_file

    tensors = unpack_weights(w, verified=True)
    got = state_digest(tensors)
    if got != spec.base_digest:
        raise ProtocolError(
            "base", f"the base model sent has digest {got:#018x}, the adapters' is {spec.base_digest:#018x}"
        )
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
    config, _ = split_config(w.model_config)
    (tmp / "config.json").write_text(json.dumps(config))
    for name, blob in files.items():
        (tmp / name).write_bytes(blob)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    _digest_of.cache_clear()


def check_base(path: Path | None, spec: LoraSpec, dtype: torch.dtype) -> PreTrainedModel:
    """The base model at ``path`` (from :func:`find_base`; fp32, on the CPU), refused unless its digest in
    ``dtype`` is the learner's."""
    from transformers import AutoModelForCausalLM

    if path is None or _digest_of(path, dtype) != spec.base_digest:
        raise RuntimeError(
            f"learner.lora is on: a version is an adapter for a base model (digest {spec.base_digest:#018x}) "
            "that this rollout server has neither at model.path nor fetched from the learner: point model.path "
            "at a copy of the learner's model directory (same model.dtype), or let the server fetch it"
        )
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def load_base(path: Path | None, spec: LoraSpec, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
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
