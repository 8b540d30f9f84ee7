"""Checkpoints: ``<run>/checkpoints/v000120/{model/, trainer.pt}`` and a ``latest`` pointer.

``model/`` is a normal ``save_pretrained`` directory (load it with ``from_pretrained``); a LoRA run
(``learner.lora``) writes ``adapter/`` instead, a peft adapter directory of the base at ``model.path``;
``trainer.pt`` holds the optimizer state (keyed by parameter name) and the policy version, which
survives restarts. Both are full, unsharded state dicts gathered to rank 0 (``learner/parallel.py``),
so a checkpoint does not depend on the strategy or the number of ranks that wrote it. A checkpoint
is written to a temporary name and renamed, then ``latest`` is replaced atomically, so a crash
never leaves a half-written checkpoint that a restart would load.

Versions name one set of weights forever (DESIGN.md). Before a version is announced, rank 0 records
it in ``checkpoints/published.json`` (``{"version": h, "floor": f}``, replaced atomically). A learner
that resumes from checkpoint version ``c`` while ``h > c`` was published continues at ``h + 1`` (the
checkpoint's weights get that new name) and raises the floor to ``h + 1``: the selector drops every
row of a version below it, since versions ``c+1..h`` were discarded with the dead learner.
``trainer.pt`` keeps the optimizer step count apart from the version (they differ after such a
restart); the step drives ``run.steps`` and the learning-rate schedule.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from learner.parallel import full_model_state, full_optimizer_state, has_frozen, load_full_state, unwrap
from protocol.config import Config

log = logging.getLogger("podsrl.learner")


def _root(cfg: Config) -> Path:
    return Path(cfg.run.dir) / "checkpoints"


@dataclass(frozen=True)
class Lineage:
    """Where a (re)started learner stands: its version, optimizer steps taken, and the floor."""

    version: int = 0
    step: int = 0
    floor: int = 0


def record_published(cfg: Config, version: int, floor: int) -> None:
    """Rank 0, before announcing ``version``: no restart may ever reuse its number."""
    root = _root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / "published.json.tmp"
    tmp.write_text(json.dumps({"version": version, "floor": floor}))
    os.replace(tmp, root / "published.json")


def read_published(cfg: Config) -> tuple[int, int] | None:
    path = _root(cfg) / "published.json"
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    return int(d["version"]), int(d["floor"])


def resume_lineage(checkpoint: Lineage, published: tuple[int, int] | None) -> Lineage:
    """The version to continue from: the checkpoint's, or above every version ever published."""
    if published is None:
        return checkpoint
    highest, floor = published
    if highest > checkpoint.version:  # versions checkpoint.version+1 .. highest died with the old learner
        return Lineage(version=highest + 1, step=checkpoint.step, floor=highest + 1)
    return Lineage(checkpoint.version, checkpoint.step, max(floor, checkpoint.floor))


def save_checkpoint(
    cfg: Config,
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    version: int,
    rank: int,
    model_state: dict[str, torch.Tensor] | None = None,
    step: int | None = None,
    floor: int = 0,
) -> None:
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
        if has_frozen(net):  # LoRA: the adapter is all that trains
            from learner.lora import published, save_adapter

            save_adapter(tmp / "adapter", published(state), cfg.learner.lora, str(cfg.model_dir.resolve()))
        else:
            params = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
            # Tied weights (lm_head = embed_tokens) gather as two tensors; save each parameter once, as
            # save_pretrained does for the live model, and from_pretrained re-ties them.
            model.save_pretrained(tmp / "model", state_dict={k: v for k, v in state.items() if k in params})
        torch.save(
            {"optimizer": opt_state, "version": version, "step": version if step is None else step, "floor": floor},
            tmp / "trainer.pt",
        )
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")
        log.info("checkpoint v%d written to %s", version, final)
    if dist.is_initialized():
        dist.barrier()


def _read_model(path: Path, lora: bool) -> dict[str, torch.Tensor]:
    """A checkpoint's model state: the whole model, or (``lora``) the adapter under peft's live names."""
    if lora != (path / "adapter").is_dir():
        have, want = ("an adapter", "a full model") if not lora else ("a full model", "an adapter")
        raise ValueError(
            f"checkpoint {path} holds {have} but this run trains {want} (learner.lora.rank): resume with the "
            "learner.lora settings it was written with, or start a new run.dir (or run.resume=false)"
        )
    if lora:
        from learner.lora import live, load_adapter

        return live(load_adapter(path / "adapter"))
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path / "model", dtype=torch.float32).state_dict()


def load_latest(cfg: Config, net: torch.nn.Module, opt: torch.optim.Optimizer, rank: int) -> Lineage:
    """Load the newest checkpoint into ``net`` and ``opt`` on every rank (if ``run.resume`` and there is
    one) and return where to continue: see ``resume_lineage``.

    Call it after wrapping (``learner.parallel.wrap``) and on every rank: rank 0 reads the files and
    broadcasts them, so the other ranks need not see the run directory.
    """
    box: list[str | None] = [None]
    if rank == 0 and cfg.run.resume:
        pointer = _root(cfg) / "latest"
        box = [str(_root(cfg) / pointer.read_text().strip()) if pointer.exists() else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    checkpoint = Lineage()
    if box[0] is not None:
        path = Path(box[0])
        model_state: dict[str, torch.Tensor] = {}
        trainer: dict = {"optimizer": {}}
        if rank == 0:
            model_state = _read_model(path, lora=has_frozen(net))
            trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
            version = int(trainer["version"])
            checkpoint = Lineage(version, int(trainer.get("step", version)), int(trainer.get("floor", 0)))
            log.info("resumed from %s at version %d (step %d)", path, checkpoint.version, checkpoint.step)
        load_full_state(net, opt, model_state, trainer["optimizer"])
    out = [resume_lineage(checkpoint, read_published(cfg)) if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(out, src=0)
    lineage = out[0]
    assert lineage is not None
    if rank == 0 and lineage.version != checkpoint.version:
        log.warning(
            "versions %d..%d were published by a learner that died before checkpointing them: this "
            "learner continues at version %d, and rows of any version below it are discarded",
            checkpoint.version + 1,
            lineage.version - 1,
            lineage.version,
        )
    return lineage
