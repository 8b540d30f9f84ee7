"""A task: rows of prompts (a dataset or a built-in generator) and the reward functions that score them.

``Task`` is what a rollout server holds: it draws rows, renders and tokenizes their prompts with the
model's tokenizer, decodes completions and scores them in a reward worker process. ``validate_task``
runs the same checks before any process starts (``podsrl run`` and ``podsrl check`` call it), so a
missing file, a bad row or a reward function that does not import stops the run with the fix.
docs/TASKS.md is the user's guide.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.config import BUILTIN_TASKS, Config, TaskConfig
from rollout_server.tasks.data import RowSource, TaskError, alphabet_of
from rollout_server.tasks.render import render, stop_ids, tokenize
from rollout_server.tasks.rewards import RewardScores, RewardWorker, check_signature, load_reward

__all__ = ["Prompt", "RewardScores", "Task", "TaskError", "alphabet_of", "task_name", "validate_task"]


@dataclass(frozen=True)
class Prompt:
    row: dict[str, Any]
    text: str
    ids: np.ndarray  # int32 token ids


def task_name(cfg: TaskConfig) -> str:
    return cfg.name


class Task:
    def __init__(self, cfg: Config, tokenizer: Any, model_config: dict[str, Any], seed: int) -> None:
        self.cfg = cfg.task
        self.name = task_name(cfg.task)
        self.tokenizer = tokenizer
        self.source = RowSource(cfg.task, seed, cfg.run.seed, cfg.eval.prompts)
        self.stop_ids = stop_ids(tokenizer, model_config)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.rewards = RewardWorker(cfg.task.rewards, cfg.task.weights, cfg.task.reward_timeout_s)
        self.too_long = 0
        self._eval: list[Prompt] | None = None

    def prompt(self, row: dict[str, Any]) -> Prompt | None:
        """The rendered, tokenized prompt of a row; None (counted) when it has too many tokens."""
        text, chat = render(row, self.cfg, self.tokenizer)
        ids = tokenize(text, chat, self.tokenizer)
        if ids.shape[0] > self.cfg.max_prompt_tokens or ids.shape[0] == 0:
            self.too_long += 1
            return None
        return Prompt(row, text, ids)

    def next_prompts(self, k: int) -> list[Prompt]:
        out: list[Prompt] = []
        for _ in range(100 * k):  # a dataset of only over-long prompts must not spin forever
            p = self.prompt(self.source.next_row())
            if p is not None:
                out.append(p)
                if len(out) == k:
                    return out
        raise TaskError(
            f"{self.too_long} prompts were longer than task.max_prompt_tokens="
            f"{self.cfg.max_prompt_tokens}: raise it, or shorten the prompts"
        )

    def eval_prompts(self) -> list[Prompt]:
        if self._eval is None:
            prompts = (self.prompt(r) for r in self.source.eval_rows)
            self._eval = [p for p in prompts if p is not None]
        return self._eval

    def decode(self, completions: list[np.ndarray]) -> list[str]:
        return self.tokenizer.batch_decode([c.tolist() for c in completions], skip_special_tokens=True)

    def score(
        self, prompts: list[Prompt], completions: list[np.ndarray], n: int, on_wait: Callable[[], None] | None = None
    ) -> tuple[RewardScores, list[str]]:
        """Rewards of ``n`` completions per prompt (prompt-major), and their decoded texts."""
        texts = self.decode(completions)
        rows = [p.row for p in prompts for _ in range(n)]
        keys = sorted({k for p in prompts for k in p.row} - {self.cfg.prompt_field})
        columns = {k: [r.get(k) for r in rows] for k in keys}
        scores = self.rewards.score(
            [r[self.cfg.prompt_field] for r in rows], texts, [c.tolist() for c in completions], columns, on_wait
        )
        return scores, texts

    def close(self) -> None:
        self.rewards.close()


def validate_task(cfg: Config, tokenizer: Any | None = None) -> str:
    """Every check that needs no process: rows, template, reward functions (and, given the model's
    tokenizer, prompt rendering). Returns a one-paragraph summary; raises TaskError with the fix."""
    tc = cfg.task
    source = RowSource(tc, seed=0, run_seed=cfg.run.seed, eval_rows=cfg.eval.prompts)
    rows = source.rows or [source.next_row()]
    columns = set().union(*(r.keys() for r in rows)) - {tc.prompt_field}
    for i, row in enumerate(rows):
        if tc.template and not isinstance(row[tc.prompt_field], list):
            try:
                tc.template.format_map(row)
            except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
                raise TaskError(
                    f"task.template={tc.template!r} cannot be filled from row {i} "
                    f"({type(e).__name__}: {e}); its columns are {sorted(row)[:10]}"
                ) from None
    for spec in tc.rewards:
        check_signature(spec, load_reward(spec), columns)
    if tokenizer is not None:
        render(rows[0], tc, tokenizer)
    what = (
        f"{tc.type} (length {tc.length}, {tc.symbols} symbols)"
        if tc.type in BUILTIN_TASKS
        else f"{tc.dataset}: {len(source.rows)} training rows, {len(source.eval_rows)} eval rows, "
        f"columns {sorted(columns)}"
    )
    rewards = ", ".join(f"{s} x{w:g}" for s, w in zip(tc.rewards, tc.weights, strict=True))
    return f"task {what}; rewards {rewards}"
