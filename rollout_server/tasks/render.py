"""Prompt rows to text to token ids, with the model's own tokenizer.

A string (or number) prompt goes through ``task.template`` (a format string over the row's columns;
empty = the prompt as it is); with
``task.chat_template`` it becomes a user message (after ``task.system_prompt``) rendered by the
tokenizer's chat template with the generation prompt. A prompt that is a list of chat messages is
always rendered by the chat template. Completions are decoded only for the reward; their sampled ids
stay the training truth (DESIGN.md: never re-tokenized).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from protocol.config import TaskConfig
from rollout_server.tasks.data import TaskError


def render(row: dict[str, Any], cfg: TaskConfig, tokenizer: Any) -> tuple[str, bool]:
    """The prompt's text, and whether the chat template produced it (it then holds its own specials)."""
    value = row[cfg.prompt_field]
    if isinstance(value, list):
        messages = list(value)
    else:
        try:
            text = cfg.template.format_map(row) if cfg.template else str(value)
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
            raise TaskError(
                f"task.template={cfg.template!r} cannot be filled from a row with columns "
                f"{sorted(row)[:10]} ({type(e).__name__}: {e})"
            ) from None
        if not cfg.chat_template:
            return text, False
        messages = [{"role": "user", "content": text}]
    if cfg.system_prompt and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
    if getattr(tokenizer, "chat_template", None) is None:
        raise TaskError(
            "prompts are chat messages (task.chat_template=true or a list-valued prompt column) but the "
            "model's tokenizer has no chat template: use a tokenizer that has one, or string prompts "
            "with task.chat_template=false"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True


def tokenize(text: str, chat: bool, tokenizer: Any) -> np.ndarray:
    """Token ids of a rendered prompt (int32). A chat-rendered prompt already holds its special tokens."""
    ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
    return np.asarray(ids, dtype=np.int32)


def prompt_lengths(rows: Sequence[dict[str, Any]], cfg: TaskConfig, tokenizer: Any, batch: int = 256) -> list[int]:
    """The token count of each row's prompt, built as a rollout server builds it (:func:`render`, then
    :func:`tokenize`), tokenized a batch at a time: a fast tokenizer encodes a batch in parallel, 3x
    faster than row by row at 256 (1 and 4096 were slower; docs/TASKS.md has the measurement)."""
    counts: list[int] = []
    for start in range(0, len(rows), batch):
        rendered = [render(row, cfg, tokenizer) for row in rows[start : start + batch]]
        part = [0] * len(rendered)
        for chat in (False, True):
            at = [i for i, (_, c) in enumerate(rendered) if c == chat]
            if at:
                texts = [rendered[i][0] for i in at]
                ids = tokenizer(texts, add_special_tokens=not chat, return_attention_mask=False)["input_ids"]
                for i, one in zip(at, ids, strict=True):
                    part[i] = len(one)
        counts += part
    return counts


def stop_ids(tokenizer: Any, model_config: dict[str, Any]) -> tuple[int, ...]:
    """Token ids that end a completion: the tokenizer's EOS and the model config's ``eos_token_id``
    (an int or a list: chat models often end a turn with a token other than the tokenizer's EOS)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = model_config.get("eos_token_id")
    ids |= set(extra) if isinstance(extra, list) else {extra} if isinstance(extra, int) else set()
    if not ids:
        raise TaskError(
            "the model has no EOS token: set eos_token in its tokenizer_config.json or eos_token_id in its config.json"
        )
    return tuple(sorted(ids))
