"""What a version is with LoRA on: the adapter's tensors, their config, and the base they apply to.

A LoRA version is an ordinary ``Weights`` (one buffer, digests, deltas, pins, shared memory: nothing
there changes) whose tensors are the adapter only, named after the base model's modules:
``<module>.lora_A.weight`` (``rank x in``) and ``<module>.lora_B.weight`` (``out x rank``), and whose
``model_config`` (the base's transformers config as JSON) carries one extra key, :data:`LORA_KEY`:
the adapter's rank, alpha and target modules, and the digest of the base weights it applies to
(:func:`state_digest` of the base in the published dtype). A rollout server builds that base from its
own ``model.path`` and refuses to run an adapter on a base whose digest differs.

The update of a target module's weight ``W`` is ``B @ A * alpha / rank`` (peft's LoRA, no rsLoRA).
:func:`check_adapter` is the boundary check every adapter passes before it reaches an engine: names of
modules the base has and the config targets, both halves present, shapes that fit the base, finite
values. torch and transformers are imported lazily so the protocol stays light.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.messages import ProtocolError, Weights

if TYPE_CHECKING:
    import torch

LORA_KEY = "podsrl_lora"  # the model_config key of a LoRA version
HALVES = ("lora_A", "lora_B")
MAX_ALPHA = 65536  # learner.lora.alpha's bound: a larger scale in a version is refused


@dataclass(frozen=True)
class LoraSpec:
    """An adapter's shape and scale, and the base it was trained on (``base_digest``: :func:`state_digest`)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    base_digest: int

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), "base_digest": self.base_digest}

    @classmethod
    def from_json(cls, d: Any) -> LoraSpec:
        """Strict: a LoRA section that is not exactly this is a refused version, never a guess."""
        ok = (
            isinstance(d, dict)
            and set(d) == {"rank", "alpha", "targets", "base_digest"}
            and isinstance(d["rank"], int)
            and 0 < d["rank"] <= 4096
            and isinstance(d["alpha"], int | float)
            and math.isfinite(d["alpha"])
            and 0 < d["alpha"] <= MAX_ALPHA
            and isinstance(d["targets"], list)
            and d["targets"]
            and all(isinstance(t, str) and t for t in d["targets"])
            and isinstance(d["base_digest"], int)
            and 0 <= d["base_digest"] < 2**64
        )
        if not ok:
            raise ProtocolError("adapter", f"bad LoRA section in the model config: {str(d)[:200]}")
        return cls(d["rank"], float(d["alpha"]), tuple(d["targets"]), d["base_digest"])


def with_lora(model_config: str, spec: LoraSpec) -> str:
    """The base's config JSON with the adapter's section added."""
    return json.dumps({**json.loads(model_config), LORA_KEY: spec.to_json()})


def split_config(model_config: str) -> tuple[dict[str, Any], LoraSpec | None]:
    """The base's transformers config (as a dict) and the adapter's spec (None: a full version)."""
    config = json.loads(model_config)
    raw = config.pop(LORA_KEY, None)
    return config, None if raw is None else LoraSpec.from_json(raw)


def adapter_name(module: str, half: str) -> str:
    return f"{module}.{half}.weight"


def parse_name(name: str) -> tuple[str, str] | None:
    """``(module, half)`` of an adapter tensor's name, or None when it is not one."""
    for half in HALVES:
        suffix = f".{half}.weight"
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], half
    return None


def state_digest(state: dict[str, torch.Tensor]) -> int:
    """One number for a whole state dict: names, dtypes, shapes and every tensor's bytes (xxh3-64)."""
    import torch
    import xxhash

    h = xxhash.xxh3_64()
    for name, t in state.items():
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        flat = t.detach().contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).cpu().numpy().data)
    return h.intdigest()


@functools.lru_cache(maxsize=4)
def base_shapes(model_config: str) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the base model ``model_config`` describes (built on the meta device:
    no memory, no weights), the reference an adapter's shapes are checked against."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config, _ = split_config(model_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def check_adapter(tensors: dict[str, torch.Tensor], spec: LoraSpec, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise ProtocolError("adapter") unless ``tensors`` is a LoRA adapter that fits the base ``shapes``
    (from :func:`base_shapes`): only adapter names, of 2-D weights the base has in a targeted module,
    both halves of each, ``A: rank x in`` and ``B: out x rank``, every value finite."""
    import torch

    if not tensors:
        raise ProtocolError("adapter", "the adapter has no tensors")
    halves: dict[str, set[str]] = {}
    for name, t in tensors.items():
        parsed = parse_name(name)
        if parsed is None:
            raise ProtocolError("adapter", f"{name} is not an adapter tensor (<module>.lora_A/B.weight)")
        module, half = parsed
        base = shapes.get(f"{module}.weight")
        if base is None or len(base) != 2:
            raise ProtocolError("adapter", f"{name}: the base model has no linear module {module}")
        if module.rpartition(".")[2] not in spec.targets:
            raise ProtocolError("adapter", f"{name}: {module} is not one of the targets {list(spec.targets)}")
        want = (spec.rank, base[1]) if half == "lora_A" else (base[0], spec.rank)
        if tuple(t.shape) != want:
            raise ProtocolError("adapter", f"{name} has shape {tuple(t.shape)}; the base and rank need {want}")
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise ProtocolError("adapter", f"{name} is not a finite floating-point tensor")
        halves.setdefault(module, set()).add(half)
    lone = [m for m, h in halves.items() if len(h) != 2]
    if lone:
        raise ProtocolError("adapter", f"{lone[0]} has only one of lora_A and lora_B")


def check_version(w: Weights) -> LoraSpec | None:
    """The boundary check of a verified version: a LoRA version's adapter against its base's shapes
    (ProtocolError when it does not fit); returns its spec, None for a full version."""
    from protocol.weights import unpack_weights

    _, spec = split_config(w.model_config)
    if spec is not None:
        check_adapter(unpack_weights(w, verified=True), spec, base_shapes(w.model_config))
    return spec


def merged_weight(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + B @ A * scale`` in fp32, in ``base``'s dtype: the one formula the engine and export share."""
    return (base.float() + (b.float() @ a.float()) * scale).to(base.dtype)


def write_adapter_dir(path: Path, tensors: dict[str, torch.Tensor], spec: LoraSpec, base: str) -> None:
    """``tensors`` (published names) as a peft adapter directory, what vLLM's ``LoRARequest`` and
    ``PeftModel.from_pretrained`` read: ``adapter_model.safetensors`` + ``adapter_config.json``."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {f"base_model.model.{k}": v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors")
    )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted({parse_name(k)[0].rpartition(".")[2] for k in tensors}),  # type: ignore[index]
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "modules_to_save": None,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=1))
