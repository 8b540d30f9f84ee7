"""Checkpoints: ``<run>/checkpoints/v000120/{model/, trainer.pt}`` and a ``latest`` pointer.

``model/`` is a normal ``save_pretrained`` directory (load it with ``from_pretrained``);
``trainer.pt`` holds the optimizer state and the policy version, which survives restarts. A
checkpoint is written to a temporary name and renamed, then ``latest`` is replaced atomically, so a
crash never leaves a half-written checkpoint that a restart would load.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from protocol.config import Config

log = logging.getLogger("podsrl.learner")


def _root(cfg: Config) -> Path:
    return Path(cfg.run.dir) / "checkpoints"


def save_checkpoint(cfg: Config, model: torch.nn.Module, opt: torch.optim.Optimizer, version: int, rank: int) -> None:
    if rank == 0:
        root = _root(cfg)
        final = root / f"v{version:06d}"
        tmp = root / f".v{version:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp / "model")  # type: ignore[operator]
        torch.save({"optimizer": opt.state_dict(), "version": version}, tmp / "trainer.pt")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")
        log.info("checkpoint v%d written to %s", version, final)
    if dist.is_initialized():
        dist.barrier()


def load_latest(cfg: Config, model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Load the newest checkpoint into ``model`` and ``opt``; return its version (0 if none)."""
    pointer = _root(cfg) / "latest"
    if not pointer.exists():
        return 0
    path = _root(cfg) / pointer.read_text().strip()
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(path / "model", dtype=torch.float32)
    model.load_state_dict(saved.state_dict())
    state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    log.info("resumed from %s at version %d", path, state["version"])
    return int(state["version"])
