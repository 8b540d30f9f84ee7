"""Start-up checks: everything that can be wrong with a run's files is found before any process starts.

``podsrl run``, ``podsrl learner`` and ``podsrl check`` call :func:`preflight`. It builds the embedded
tiny model and tokenizer when the run uses one, then checks the model directory (config, weights,
tokenizer, vocabulary), the dataset (every row), the prompt template or chat template, and every
reward function (imports, signature, and its values on a few rows: within ``selector.max_abs_reward``,
finite). Each failure is a :class:`PreflightError` whose message names
the config key and the fix.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from protocol.config import Config


class PreflightError(ValueError):
    """A run that cannot start as configured."""


def _model_files(path: Path) -> None:
    if not (path / "config.json").exists():
        raise PreflightError(
            f"model.path={str(path)!r} has no config.json: point it at a local transformers model "
            "directory (save_pretrained), or leave it empty with model.init='tiny'"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise PreflightError(f"model.path={str(path)!r} has no weights (*.safetensors or *.bin)")


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((path / n).exists() for n in names):
        raise PreflightError(
            f"model.path={str(path)!r} has no tokenizer files ({', '.join(names)}): the tokenizer "
            "travels with the model; save it there with tokenizer.save_pretrained(model_dir)"
        )
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise PreflightError(
            f"model.path={str(path)!r}: its tokenizer does not load ({type(e).__name__}: {e})"
        ) from None


def _lora_targets(cfg: Config, path: Path) -> str:
    """learner.lora: every target module name matches linear weights of the model (shapes from its config)."""
    from protocol.lora import base_shapes

    shapes = base_shapes((path / "config.json").read_text())
    modules = {name.removesuffix(".weight").rpartition(".")[2] for name, s in shapes.items() if len(s) == 2}
    missing = [t for t in cfg.learner.lora.target_modules if t not in modules]
    if missing:
        raise PreflightError(
            f"learner.lora.target_modules: the model has no linear module named {missing}; its linear modules "
            f"are {sorted(modules)}"
        )
    lora = cfg.learner.lora
    return f"LoRA rank {lora.rank}, alpha {lora.alpha} on {', '.join(lora.target_modules)}: versions are adapters"


def preflight(cfg: Config) -> str:
    """Run every check (building the tiny model first if needed); return a short report."""
    from rollout_server.tasks import TaskError, alphabet_of, validate_task, words_of

    lines = []
    path = cfg.model_dir
    try:
        if cfg.model.init == "tiny" and not path.exists():
            if cfg.model.path:
                raise PreflightError(
                    f"model.path={cfg.model.path!r} does not exist; with model.init='tiny' leave "
                    "model.path empty to build the tiny model in <run.dir>/model"
                )
            from launcher.tiny import build_tiny_model

            alphabet = cfg.model.tiny.alphabet or alphabet_of(cfg.task)
            n = build_tiny_model(cfg, path, alphabet, words_of(cfg.task))
            lines.append(f"built the tiny model ({n} parameters, {len(alphabet)} characters) at {path}")
        elif not path.exists():
            raise PreflightError(f"model.path={str(path)!r} does not exist: give a local transformers model directory")
        _model_files(path)
        tokenizer = _tokenizer(path)
        vocab = json.loads((path / "config.json").read_text()).get("vocab_size")
        if isinstance(vocab, int) and len(tokenizer) > vocab:
            raise PreflightError(
                f"model.path={str(path)!r}: the tokenizer has {len(tokenizer)} tokens but the "
                f"model's vocab_size is {vocab}; they must come from the same model"
            )
        lines.append(f"model {path} (vocabulary {len(tokenizer)}, dtype {cfg.model.dtype})")
        if cfg.learner.lora.rank:
            lines.append(_lora_targets(cfg, path))
        lines.append(validate_task(cfg, tokenizer, trial=True))
    except TaskError as e:
        raise PreflightError(str(e)) from None
    from protocol.auth import AuthError, check

    try:  # keys: every process would fail on its own, with a traceback in its log
        check(cfg.net)
    except AuthError as e:
        raise PreflightError(str(e)) from None
    if cfg.rollout.engine.type == "vllm" and cfg.rollout.servers and importlib.util.find_spec("vllm") is None:
        raise PreflightError(
            "rollout.engine.type='vllm' but vLLM is not installed here: install it in its own "
            "environment (docs/TASKS.md), or use rollout.engine.type='torch'"
        )
    return "\n".join(f"  {line}" for line in lines)
