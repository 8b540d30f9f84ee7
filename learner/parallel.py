"""Data parallelism for the learner (DDP or FSDP2) and the full state dicts that leave it.

``learner.strategy='ddp'``: every rank holds the whole model and optimizer; gradients are
all-reduced once per step (``no_sync`` for all but the last micro-batch). ``'fsdp'``: FSDP2
(``fully_shard`` on each decoder layer, then the root, which keeps tied embeddings together)
shards parameters, gradients and optimizer state; each micro-batch's backward reduce-scatters its
gradients, so unsharded gradients never accumulate (the memory FSDP exists to save).

Precision: master weights and optimizer state are fp32 under both. With ``model.dtype='bfloat16'``
DDP runs the forward under ``torch.autocast`` and FSDP2 gathers parameters in bf16
(``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``).

With LoRA (``learner/lora.py``) the base is frozen: what leaves the learner is the trainable part alone
(``ignore_frozen_params``), the adapter, and loading it back leaves the frozen base as it is.

Everything that leaves the learner goes through one code path for both strategies:
``get_model_state_dict``/``get_optimizer_state_dict`` with ``full_state_dict=True, cpu_offload=True``
(collectives: every rank calls them, rank 0 receives the tensors, the others an empty dict), and
back in with ``broadcast_from_rank0=True``, so checkpoints are plain, strategy-free files.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from protocol.config import Config

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
TRAINABLE = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
TRAINABLE_FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: transformers names their class in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"cannot find the decoder layers of {type(model).__name__} (no _no_split_modules): "
            "use learner.strategy='ddp'"
        )
    return layers


def enable_grad_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward. transformers checkpoints only in
    training mode, which also enables dropout: the on-policy ratio is exactly 1 only for models whose
    dropout is 0 (Llama, Qwen and most recent LMs by default)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    model.train()


def wrap(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.nn.Module:
    """``model`` made ready to train under ``cfg.learner.strategy``; call forward/backward on the result."""
    if cfg.learner.grad_checkpointing:
        enable_grad_checkpointing(model)
    if cfg.learner.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # FSDP2: torch >= 2.6

        bf16 = cfg.model.dtype == "bfloat16"
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16
            else MixedPrecisionPolicy()
        )
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def is_fsdp(net: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 has no FSDP2, so nothing was sharded by it
        return False
    return isinstance(net, FSDPModule)


def unwrap(net: torch.nn.Module) -> Any:
    """The transformers model inside (FSDP2 shards in place; DDP wraps)."""
    return net.module if isinstance(net, DistributedDataParallel) else net


def sync_gradients(net: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP: skip the all-reduce of a micro-batch that is not the step's last. FSDP2 reduce-scatters
    every micro-batch (keeping gradients sharded); a plain module has nothing to sync."""
    if isinstance(net, DistributedDataParallel) and not sync:
        return net.no_sync()
    return contextlib.nullcontext()


def autocast(net: torch.nn.Module, dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 compute over fp32 master weights: autocast, except under FSDP2, whose policy casts."""
    if dtype == "float32" or is_fsdp(net):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def has_frozen(net: torch.nn.Module) -> bool:
    """Whether part of the model does not train (a LoRA base)."""
    return any(not p.requires_grad for p in net.parameters())


def full_model_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full fp32 state dict on rank 0's CPU (``{}`` on the others); of the trainable parameters only
    when part of the model is frozen (LoRA). A collective: call on every rank.
    Under DDP on CPU the tensors are the live parameters (no copy): pack or save them before the next step."""
    return get_model_state_dict(net, options=TRAINABLE if has_frozen(net) else FULL)  # type: ignore[return-value]


def full_optimizer_state(net: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, on rank 0 (``{}`` elsewhere). A collective."""
    return dict(get_optimizer_state_dict(net, opt, options=FULL))


def load_full_state(
    net: torch.nn.Module, opt: torch.optim.Optimizer, model_state: dict[str, torch.Tensor], opt_state: dict[str, Any]
) -> None:
    """Load rank 0's full state dicts into every rank's (sharded or replicated) model and optimizer (with a
    frozen base, ``model_state`` holds the trainable parameters only)."""
    frozen = has_frozen(net)
    set_model_state_dict(net, dict(model_state), options=TRAINABLE_FROM_RANK0 if frozen else FROM_RANK0)
    set_optimizer_state_dict(net, opt, opt_state, options=FROM_RANK0)


def cast(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating-point tensors in the published ``model.dtype`` (the rollout engine loads that dtype)."""
    dt = DTYPES[dtype]
    return {k: v.to(dt) if v.is_floating_point() else v for k, v in state.items()}
