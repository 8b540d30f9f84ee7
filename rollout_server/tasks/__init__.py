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
from rollout_server.tasks.data import RowSource, TaskError, alphabet_of, numbered_rows
from rollout_server.tasks.environments import TOOL_TAGS, load_environment
from rollout_server.tasks.render import prompt_lengths, render, stop_ids, tokenize
from rollout_server.tasks.rewards import RewardScores, RewardWorker, check_signature, load_reward

__all__ = [
    "Prompt",
    "RewardScores",
    "Task",
    "TaskError",
    "alphabet_of",
    "task_name",
    "try_rewards",
    "validate_task",
    "words_of",
]

TRIAL_ROWS = 4  # rows ``try_rewards`` scores: enough to catch a function whose scale is wrong, and fast
# a value the selector rejects (its group is dropped) or one that cannot be a reward at all
TRIAL_FATAL = ("out_of_range", "non_finite", "not_a_number", "wrong_length")


@dataclass(frozen=True)
class Prompt:
    row: dict[str, Any]
    text: str
    ids: np.ndarray  # int32 token ids


def task_name(cfg: TaskConfig) -> str:
    return cfg.name


def words_of(cfg: TaskConfig) -> tuple[str, ...]:
    """Whole tokens a tiny tokenizer needs besides its characters: the tool tags when episodes have an environment."""
    return TOOL_TAGS if cfg.environment else ()


def reward_worker(cfg: Config, max_failures: int | None = None) -> RewardWorker:
    """The run's reward functions, bounded by the selector's ``selector.max_abs_reward``."""
    tc = cfg.task
    limit = tc.max_reward_failures if max_failures is None else max_failures
    return RewardWorker(
        tc.rewards,
        tc.weights,
        tc.reward_timeout_s,
        cfg.selector.max_abs_reward,
        limit,
        env=tc.environment,
        env_timeout_s=tc.env_timeout_s,
        max_env_chars=tc.max_env_chars,
    )


class Task:
    def __init__(self, cfg: Config, tokenizer: Any, model_config: dict[str, Any], seed: int) -> None:
        self.cfg = cfg.task
        self.name = task_name(cfg.task)
        self.tokenizer = tokenizer
        self.source = RowSource(cfg.task, seed, cfg.run.seed, cfg.eval.prompts)
        self.stop_ids = stop_ids(tokenizer, model_config)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.rewards = reward_worker(cfg)
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
        scores = self.rewards.score(
            *_split(rows, self.cfg.prompt_field, texts, [c.tolist() for c in completions]), on_wait
        )
        return scores, texts

    def close(self) -> None:
        self.rewards.close()


def _split(
    rows: list[dict[str, Any]], prompt_field: str, texts: list[str], ids: list[list[int]]
) -> tuple[list[Any], list[str], list[list[int]], dict[str, list[Any]]]:
    """A reward call's arguments: prompts, completions, completion_ids and every other column as a list."""
    keys = sorted({k for r in rows for k in r} - {prompt_field})
    return [r[prompt_field] for r in rows], texts, ids, {k: [r.get(k) for r in rows] for k in keys}


def validate_task(cfg: Config, tokenizer: Any | None = None, trial: bool = False) -> str:
    """Every check that needs no process: rows, template, reward functions (and, given the model's
    tokenizer, every prompt rendered and tokenized as a rollout server does, against
    ``task.max_prompt_tokens``); with ``trial``, also :func:`try_rewards` (which may start the reward
    worker). Returns a one-paragraph summary; raises TaskError with the fix. Rows are named as the user
    counts them (``line 7`` of a JSONL file, 1-based)."""
    tc = cfg.task
    source = RowSource(tc, seed=0, run_seed=cfg.run.seed, eval_rows=cfg.eval.prompts)
    files: list[tuple[str, list[dict[str, Any]], list[str]]]  # (what, rows, where each row is)
    if tc.type in BUILTIN_TASKS:
        generated = [source.next_row(), *source.eval_rows]
        files = [(f"task.type={tc.type!r}", generated, [f"generated row {i}" for i in range(1, len(generated) + 1)])]
    else:
        paths = [(tc.dataset, "task.dataset")] + ([(tc.eval_dataset, "task.eval_dataset")] if tc.eval_dataset else [])
        files = [(f"{key}={path!r}", *numbered_rows(path, tc.prompt_field, key)) for path, key in paths]
    columns = set().union(*(r.keys() for _, rows, _ in files for r in rows)) - {tc.prompt_field}
    for name, rows, where in files:
        for row, at in zip(rows, where, strict=True):
            if tc.template and not isinstance(row[tc.prompt_field], list):
                try:
                    tc.template.format_map(row)
                except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
                    raise TaskError(
                        f"task.template={tc.template!r} cannot be filled from {name} {at} "
                        f"({type(e).__name__}: {e}); its columns are {sorted(row)[:10]}"
                    ) from None
    for spec in tc.rewards:
        check_signature(spec, load_reward(spec), columns)
    if tc.environment:
        load_environment(tc.environment)  # imports, and is a class with reset and step
    if tokenizer is not None:
        for name, rows, where in files:
            check_prompt_lengths(name, rows, where, tc, tokenizer)
    what = (
        f"{tc.type} (length {tc.length}, {tc.symbols} symbols)"
        if tc.type in BUILTIN_TASKS
        else f"{tc.dataset}: {len(source.rows)} training rows, {len(source.eval_rows)} eval rows, "
        f"columns {sorted(columns)}"
    )
    rewards = ", ".join(f"{s} x{w:g}" for s, w in zip(tc.rewards, tc.weights, strict=True))
    trial_rows = source.rows[:TRIAL_ROWS] or [source.next_row() for _ in range(TRIAL_ROWS)]
    tried = f"; {try_rewards(cfg, trial_rows, tokenizer)}" if trial else ""
    return f"task {what}; rewards {rewards}{tried}"


def try_rewards(cfg: Config, rows: list[dict[str, Any]], tokenizer: Any | None = None) -> str:
    """Score a few rows with every reward function, in the reward worker as a run does, each row's
    completion being its ``answer`` column (a plausible completion) or ``""``. Raises TaskError naming a
    function whose values the selector would reject (outside ``+-selector.max_abs_reward``, NaN/inf) or that
    returns no numbers: such a run would train on nothing. Returns a short summary."""
    tc = cfg.task
    texts = [str(r["answer"]) if isinstance(r.get("answer"), str | int | float) else "" for r in rows]
    ids = [tokenizer.encode(t, add_special_tokens=False) if tokenizer is not None else [] for t in texts]
    worker = reward_worker(cfg, max_failures=0)
    try:
        scores = worker.score(*_split(rows, tc.prompt_field, texts, ids))
    finally:
        worker.close()
    bound = cfg.selector.max_abs_reward
    for name, failure in scores.failures.items():
        if failure.split(":")[0] in TRIAL_FATAL:
            raise TaskError(
                f"reward function {name!r} ({failure}) on {len(rows)} trial rows (completion = the row's answer): "
                f"the selector rejects every group with a reward outside +-selector.max_abs_reward={bound:g} or "
                "NaN/inf, and a failed row scores 0, so the run would train on nothing. Fix the function, or "
                "raise selector.max_abs_reward if its scale is meant"
            )
    if scores.errors["out_of_range"]:
        raise TaskError(
            f"the weighted sum of task.reward {tc.rewards} x task.reward_weights {tc.weights} exceeds "
            f"+-selector.max_abs_reward={bound:g} on {len(rows)} trial rows: lower the weights, or raise "
            "selector.max_abs_reward"
        )
    means = ", ".join(f"{k} {v:.3g}" for k, v in scores.per_function.items()) or "none scored"
    other = "".join(f"; {k}: {v} (it scores 0 when it does)" for k, v in scores.failures.items())
    return f"rewards on {len(rows)} trial rows: {means}{other}"


def check_prompt_lengths(
    name: str, rows: list[dict[str, Any]], where: list[str], tc: TaskConfig, tokenizer: Any
) -> None:
    """Raise TaskError naming the rows whose prompt has more than ``task.max_prompt_tokens`` tokens. A
    rollout server would skip each one, but only after rendering and tokenizing it: a 5 MB prompt cost
    one 1.3 GB (issue 19)."""
    limit = tc.max_prompt_tokens
    long = [(at, n) for at, n in zip(where, prompt_lengths(rows, tc, tokenizer), strict=True) if n > limit]
    if long:
        shown = ", ".join(f"{at} ({n} tokens)" for at, n in long[:5])
        raise TaskError(
            f"{name}: {len(long)} of {len(rows)} prompts are longer than task.max_prompt_tokens={limit} "
            f"once rendered and tokenized as a rollout server does: {shown}{', ...' if len(long) > 5 else ''}. "
            "Raise task.max_prompt_tokens, or filter those rows out of the dataset"
        )
