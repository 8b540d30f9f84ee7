"""``podsrl export RUN --merge OUT | --adapter OUT``: a run's latest checkpoint as a model others can load.

- ``--merge OUT``: a plain transformers directory (``from_pretrained`` loads it) with the tokenizer. For a
  LoRA run (``learner.lora``) the adapter is merged into the base, ``W + B @ A * alpha/rank`` in fp32 (the
  formula the torch engine merges with, ``protocol.lora.merged_weight``); the base is the directory the
  adapter names (``base_model_name_or_path``, the run's ``model.path``), or ``--base DIR``.
- ``--adapter OUT``: a LoRA run's adapter as a peft adapter directory (``PeftModel.from_pretrained``).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `podsrl --help` stays instant
    import torch


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a run's latest checkpoint as a transformers or peft directory")
    p.add_argument("run", help="the run directory (run.dir)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--merge", metavar="OUT", help="a plain transformers directory (LoRA merged into the base)")
    what.add_argument("--adapter", metavar="OUT", help="a LoRA run's adapter as a peft adapter directory")
    p.add_argument("--base", metavar="DIR", help="LoRA: the base model directory (default: the one the adapter names)")


def latest_checkpoint(run: Path) -> Path:
    pointer = run / "checkpoints" / "latest"
    if not pointer.exists():
        raise ValueError(f"{run} has no checkpoint ({pointer} is missing): is it a run directory?")
    return run / "checkpoints" / pointer.read_text().strip()


def export_command(args: argparse.Namespace) -> int:
    import sys

    try:
        out = export(Path(args.run), Path(args.merge or args.adapter), merge=bool(args.merge), base=args.base)
    except (ValueError, FileNotFoundError) as e:
        print(f"podsrl export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def export(run: Path, out: Path, merge: bool, base: str | None = None) -> Path:
    """Write ``run``'s latest checkpoint to ``out`` (see the module doc); ``out`` must not exist."""
    if out.exists():
        raise ValueError(f"{out} exists: name a new directory")
    ckpt = latest_checkpoint(run)
    adapter = ckpt / "adapter"
    if not merge:
        if not adapter.is_dir():
            raise ValueError(f"{ckpt} is a full fine-tuning checkpoint (no adapter/): use --merge OUT")
        shutil.copytree(adapter, out)
        return out
    if not adapter.is_dir():
        shutil.copytree(ckpt / "model", out)
        return out
    merge_adapter(adapter, Path(base) if base else None, out)
    return out


def merge_adapter(adapter: Path, base: Path | None, out: Path) -> None:
    """The base with the adapter merged in, saved with the base's tokenizer as a transformers directory."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from learner.lora import adapter_base, load_adapter
    from protocol.lora import merged_weight, parse_name

    base = base or adapter_base(adapter)
    if not (base / "config.json").exists():
        raise FileNotFoundError(f"no base model at {base} (named by {adapter}): pass --base DIR")
    settings = json.loads((adapter / "adapter_config.json").read_text())
    scale = float(settings["lora_alpha"]) / float(settings["r"])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    modules = dict(model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in load_adapter(adapter).items():
        parsed = parse_name(name)
        if parsed is None or parsed[0] not in modules:
            raise ValueError(f"{adapter}: {name} is not an adapter of a module of {base}")
        pairs.setdefault(parsed[0], {})[parsed[1]] = t
    with torch.no_grad():
        for module, ab in pairs.items():
            weight = modules[module].weight
            weight.copy_(merged_weight(weight, ab["lora_A"], ab["lora_B"], scale))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
