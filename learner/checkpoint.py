"""Checkpoints: ``<run>/checkpoints/v000120/{model/, trainer.pt}`` and a ``latest`` pointer.

``model/`` is a normal ``save_pretrained`` directory (load it with ``from_pretrained``);
``trainer.pt`` holds the optimizer state (keyed by parameter name) and the policy version, which
survives restarts. Both are full, unsharded state dicts gathered to rank 0 (``learner/parallel.py``),
so a checkpoint does not depend on the strategy or the number of ranks that wrote it. A checkpoint
is written to a temporary name and renamed, then ``latest`` is replaced atomically, so a crash
never leaves a half-written checkpoint that a restart would load.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from learner.parallel import full_model_state, full_optimizer_state, load_full_state, unwrap
from protocol.config import Config

log = logging.getLogger("podsrl.learner")


def _root(cfg: Config) -> Path:
    return Path(cfg.run.dir) / "checkpoints"


def save_checkpoint(cfg: Config, net: torch.nn.Module, opt: torch.optim.Optimizer, version: int, rank: int,
                    model_state: dict[str, torch.Tensor] | None = None) -> None:
    """Write version ``version``. Every rank calls it (gathering the state is a collective);
    ``model_state``: this step's ``full_model_state(net)`` if the caller already has it."""
    state = full_model_state(net) if model_state is None else model_state
    opt_state = full_optimizer_state(net, opt)
    if rank == 0:
        root = _root(cfg)
        final = root / f"v{version:06d}"
        tmp = root / f".v{version:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model = unwrap(net)
        params = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
        # Tied weights (lm_head = embed_tokens) gather as two tensors; save each parameter once, as
        # save_pretrained does for the live model, and from_pretrained re-ties them.
        model.save_pretrained(tmp / "model", state_dict={k: v for k, v in state.items() if k in params})
        torch.save({"optimizer": opt_state, "version": version}, tmp / "trainer.pt")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")
        log.info("checkpoint v%d written to %s", version, final)
    if dist.is_initialized():
        dist.barrier()


def load_latest(cfg: Config, net: torch.nn.Module, opt: torch.optim.Optimizer, rank: int) -> int:
    """Load the newest checkpoint into ``net`` and ``opt`` on every rank; return its version (0 if none).

    Call it after wrapping (``learner.parallel.wrap``) and on every rank: rank 0 reads the files and
    broadcasts them, so the other ranks need not see the run directory.
    """
    box: list[str | None] = [None]
    if rank == 0:
        pointer = _root(cfg) / "latest"
        box = [str(_root(cfg) / pointer.read_text().strip()) if pointer.exists() else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        return 0
    path = Path(box[0])
    model_state: dict[str, torch.Tensor] = {}
    trainer: dict = {"optimizer": {}, "version": 0}
    if rank == 0:
        from transformers import AutoModelForCausalLM

        model_state = AutoModelForCausalLM.from_pretrained(path / "model", dtype=torch.float32).state_dict()
        trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    load_full_state(net, opt, model_state, trainer["optimizer"])
    version = [int(trainer["version"])]
    if dist.is_initialized():
        dist.broadcast_object_list(version, src=0)
    if rank == 0:
        log.info("resumed from %s at version %d", path, version[0])
    return version[0]
