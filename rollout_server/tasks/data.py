"""Where prompts come from: dataset files, the built-in generated tasks, and each server's walk.

A *row* is a dict: the prompt column (``task.prompt_field``: a string, or a list of chat messages)
plus any other columns, which reach the reward functions. Rows come from a local JSONL or Parquet
file, a ``datasets`` ``save_to_disk`` directory, or a built-in generator (copy / reverse). Each
rollout server walks its own seeded permutation of the training rows, epoch after epoch; the
held-out eval rows are the same on every server.
"""

from __future__ import annotations

import json
import math
import string
from pathlib import Path
from typing import Any

import numpy as np

from protocol.config import BUILTIN_TASKS, TaskConfig


class TaskError(ValueError):
    """A task that cannot run as configured; the message names the key and the fix."""


def load_rows(path: str, prompt_field: str, key: str = "task.dataset") -> list[dict[str, Any]]:
    """Every row of a JSONL / Parquet file or a ``datasets`` directory, each checked for its prompt."""
    return numbered_rows(path, prompt_field, key)[0]


def numbered_rows(path: str, prompt_field: str, key: str = "task.dataset") -> tuple[list[dict[str, Any]], list[str]]:
    """:func:`load_rows`, and where each row is, as the user counts: ``"line 7"`` of a JSONL file (blank
    lines count), ``"row 7"`` of Parquet or a ``datasets`` directory; 1-based everywhere."""
    p = Path(path)
    lines: list[int] | None = None
    if not p.exists():
        raise TaskError(
            f"{key}={path!r} does not exist (relative paths are from {Path.cwd()}); give a local "
            ".jsonl or .parquet file or a datasets save_to_disk directory"
        )
    if p.is_dir():
        rows = _load_datasets_dir(p, key)
    elif p.suffix in (".jsonl", ".json"):
        try:
            rows, lines = _load_jsonl(p, key)
        except UnicodeDecodeError as e:
            raise TaskError(f"{key}={path!r} is not UTF-8 text ({e})") from None
    elif p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise TaskError(f"{key}={path!r} is Parquet: pip install pyarrow") from None
        try:
            rows = pq.read_table(p).to_pylist()
        except Exception as e:  # pyarrow.ArrowInvalid: not Parquet, or corrupt
            raise TaskError(f"{key}={path!r} is not a readable Parquet file ({type(e).__name__}: {e})") from None
    else:
        raise TaskError(f"{key}={path!r}: unknown format {p.suffix!r}; use .jsonl, .parquet or a datasets directory")
    if not rows:
        raise TaskError(f"{key}={path!r} has no rows")
    where = [f"line {n}" for n in lines] if lines is not None else [f"row {i}" for i in range(1, len(rows) + 1)]
    for row, at in zip(rows, where, strict=True):
        check_prompt(row, prompt_field, f"{key}={path!r} {at}")
    return rows, where


def _load_jsonl(p: Path, key: str) -> tuple[list[dict[str, Any]], list[int]]:
    """The rows of a JSONL file and their 1-based line numbers (blank lines are skipped, and counted)."""
    rows, lines = [], []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{key}={str(p)!r} line {lineno} is not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise TaskError(f"{key}={str(p)!r} line {lineno} is not a JSON object")
            rows.append(row)
            lines.append(lineno)
    return rows, lines


def _load_datasets_dir(p: Path, key: str) -> list[dict[str, Any]]:
    try:
        from datasets import load_from_disk
    except ImportError:
        raise TaskError(
            f"{key}={str(p)!r} is a directory: reading a datasets save_to_disk directory needs "
            "`pip install datasets` (or export the rows to .jsonl)"
        ) from None
    ds = load_from_disk(str(p))
    if hasattr(ds, "keys"):  # a DatasetDict: take its train split (or its only one)
        splits = list(ds.keys())
        ds = ds["train"] if "train" in splits else ds[splits[0]] if len(splits) == 1 else None
        if ds is None:
            raise TaskError(f"{key}={str(p)!r} holds splits {splits} and no 'train': point at one split's directory")
    return [dict(r) for r in ds]


def check_prompt(row: dict[str, Any], prompt_field: str, where: str) -> None:
    if prompt_field not in row:
        raise TaskError(
            f"{where} has no {prompt_field!r} column (columns: {sorted(row)[:10]}); set "
            "task.prompt_field to the prompt's column"
        )
    value = row[prompt_field]
    if isinstance(value, str | int | float) and not isinstance(value, bool):  # scalars fill task.template
        return
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    ):
        return
    raise TaskError(
        f"{where}: {prompt_field!r} must be a string (or a number for task.template) or a list of "
        f"chat messages {{'role': ..., 'content': ...}}, got {type(value).__name__}"
    )


def generated_row(
    kind: str, length: int, symbols: int, rng: np.random.Generator, min_length: int = 0
) -> dict[str, Any]:
    """One copy/reverse row: ``{"prompt": "cfa=", "answer": "cfa"}`` (reverse: ``"afc"``), or a product row.

    ``length`` symbols, or with ``0 < min_length < length`` a length drawn uniformly from
    ``min_length..length`` first; otherwise no extra draw, so a fixed length gives the same rows
    for the same generator state whatever ``min_length`` is.
    """
    if 0 < min_length < length:
        length = int(rng.integers(min_length, length + 1))
    if kind == "product":  # two ``length``-digit numbers: {"prompt": "123*456=", "answer": "56088"}
        a, b = (int(x) for x in rng.integers(10 ** (length - 1), 10**length, size=2))
        return {"prompt": f"{a}*{b}=", "answer": str(a * b)}
    body = "".join(string.ascii_lowercase[i] for i in rng.integers(0, symbols, size=length))
    return {"prompt": body + "=", "answer": body if kind == "copy" else body[::-1]}


def builtin_alphabet(cfg: TaskConfig) -> str:
    if cfg.type == "product":
        return string.digits + "*="
    return string.ascii_lowercase[: cfg.symbols] + "="


class RowSource:
    """One rollout server's stream of training rows, and the held-out eval rows.

    Dataset rows: a seeded permutation per server, reshuffled each epoch; eval rows are
    ``task.eval_dataset`` or the last ``task.eval_fraction`` of a permutation seeded by ``run_seed``
    alone (so no server ever trains on them). Built-in tasks generate rows; their eval rows come from
    a fixed seed.
    """

    def __init__(self, cfg: TaskConfig, seed: int, run_seed: int, eval_rows: int) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.epoch, self.index = 0, 0
        if cfg.type in BUILTIN_TASKS:
            self.rows: list[dict[str, Any]] = []
            eval_rng = np.random.default_rng([run_seed, 0xE7A1])
            self.eval_rows = [
                generated_row(cfg.type, cfg.length, cfg.symbols, eval_rng, cfg.min_length) for _ in range(eval_rows)
            ]
            return
        rows = load_rows(cfg.dataset, cfg.prompt_field)
        if cfg.eval_dataset:
            self.eval_rows = load_rows(cfg.eval_dataset, cfg.prompt_field, "task.eval_dataset")
        elif cfg.eval_fraction:
            held = np.random.default_rng([run_seed, 0xE7A1]).permutation(len(rows))
            cut = len(rows) - max(1, math.ceil(round(cfg.eval_fraction * len(rows), 9)))  # 0.07*100 is 7.000...1
            if cut < 1:
                raise TaskError(f"task.eval_fraction={cfg.eval_fraction} leaves no training rows of {len(rows)}")
            self.eval_rows = [rows[i] for i in sorted(held[cut:].tolist())]
            rows = [rows[i] for i in sorted(held[:cut].tolist())]
        else:
            self.eval_rows = []
        self.rows = rows
        self.order = self.rng.permutation(len(rows))

    def next_row(self) -> dict[str, Any]:
        if not self.rows:
            return generated_row(self.cfg.type, self.cfg.length, self.cfg.symbols, self.rng, self.cfg.min_length)
        if self.index == len(self.rows):
            self.epoch, self.index = self.epoch + 1, 0
            self.order = self.rng.permutation(len(self.rows))
        row = self.rows[int(self.order[self.index])]
        self.index += 1
        return row

    def position(self) -> dict[str, float]:
        if not self.rows:
            return {}
        return {
            "data/epoch": self.epoch,
            "data/index": self.index,
            "data/progress": self.epoch + self.index / len(self.rows),
        }


def alphabet_of(cfg: TaskConfig) -> str:
    """Every character a tiny character-level tokenizer needs for this task's rows (sorted)."""
    if cfg.type in BUILTIN_TASKS:
        return builtin_alphabet(cfg)
    literal = "".join(text for text, *_ in string.Formatter().parse(cfg.template))
    chars: set[str] = set(cfg.system_prompt) | set(literal)
    chat = cfg.chat_template or bool(cfg.system_prompt)
    paths = [(cfg.dataset, "task.dataset")] + ([(cfg.eval_dataset, "task.eval_dataset")] if cfg.eval_dataset else [])
    for path, key in paths:
        for row in load_rows(path, cfg.prompt_field, key):
            chat = chat or isinstance(row[cfg.prompt_field], list)  # chat messages: always the chat template
            for value in row.values():
                chars |= _chars(value)
    if chat:
        chars |= set("systemuserassistant: \n")
    return "".join(sorted(chars))


def _chars(value: Any) -> set[str]:
    if isinstance(value, str):
        return set(value)
    if isinstance(value, list | tuple):
        return set().union(*map(_chars, value)) if value else set()
    if isinstance(value, dict):
        return set().union(*map(_chars, value.values())) if value else set()
    return set(str(value))
