"""Multi-turn episodes: the model's turns and an environment's answers, stitched into one token sequence.

``run_episodes`` plays ``n`` episodes of each prompt (``task.environment``, docs/TASKS.md): every turn is
one engine call for all live episodes (the first samples n per prompt, later ones continue each
episode's own context). A model turn ends at a stop token, at the end of a tool call (``</tool>``) or at
``max_new_tokens``; its decoded text goes to the environment's ``step`` in the reward worker (killable:
``task.env_timeout_s``), whose new messages are tokenized and appended with loss mask 0 and log-prob 0.
The sequence is the model's own sampled ids and the environment's tokens: the model's text is decoded
for the environment only, never re-tokenized (DESIGN.md, "Text and tokens").

An episode ends when ``step`` says so (its reward, or the task's reward functions on the model's last
turn when it gives none), after ``task.max_turns`` turns, or when the next turn would not fit in
``max_completion_tokens`` (then scored by the reward functions too). An environment that raises, hangs,
dies or answers with something that is not messages (or more than ``task.max_env_chars``) ends its
episode with reward 0, counted by reason; the other episodes and the run go on.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol.config import Config
from rollout_server.sampling import Engine, SamplingSpec
from rollout_server.tasks.environments import TOOL_CLOSE, Messages

ENV_ERRORS = ("raised", "timeout", "worker_died", "too_long", "bad_output", "bad_reward")  # env/errors/<reason>


@dataclass
class Episode:
    """One episode under way: its token pieces in order (model turns and environment answers)."""

    prompt: Any  # rollout_server.tasks.Prompt
    ids: list[np.ndarray] = field(default_factory=list)
    logprobs: list[np.ndarray] = field(default_factory=list)
    mask: list[np.ndarray] = field(default_factory=list)
    turns: int = 0
    length: int = 0  # tokens after the prompt so far
    messages: Messages = field(default_factory=list)  # since reset: the model's turns and the environment's
    last_turn: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    reward: float | None = None  # the environment's, 0.0 on its failure; None: the reward functions score it
    done: bool = False

    def add(self, ids: np.ndarray, logprobs: np.ndarray, model: bool) -> None:
        self.ids.append(ids.astype(np.int32, copy=False))
        self.logprobs.append(logprobs.astype(np.float32, copy=False))
        self.mask.append(np.full(len(ids), 1 if model else 0, np.uint8))
        self.length += len(ids)


@dataclass
class EpisodeStats:
    """What one call's episodes did, for the metrics (docs/METRICS.md, ``env/*``)."""

    tool_calls: int = 0
    tool_errors: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    env_s: float = 0.0


def episode_spec(spec: SamplingSpec, decode: Any) -> SamplingSpec:
    """A model turn also ends after the token that closes a tool call."""
    stops = spec.stop_strings if TOOL_CLOSE in spec.stop_strings else (*spec.stop_strings, TOOL_CLOSE)
    return SamplingSpec(spec.max_new_tokens, spec.temperature, spec.stop_ids, spec.pad_id, stops, decode)


def env_tokens(messages: Messages, tokenizer: Any) -> np.ndarray:
    """The environment's answer as tokens: its messages' text, in order, tokenized without special tokens."""
    text = "".join(m["content"] for m in messages)
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)


def run_episodes(
    engine: Engine, task: Any, cfg: Config, prompts: list[Any], n: int, spec: SamplingSpec, seed: int
) -> tuple[list[Episode], EpisodeStats]:
    """``n`` episodes of each prompt, prompt-major, each ended and (but for the reward functions' part)
    scored; see the module docstring."""
    spec = episode_spec(spec, task.tokenizer.decode)
    episodes = [Episode(p) for p in prompts for _ in range(n)]
    stats = EpisodeStats()
    cap, live = cfg.max_completion_tokens, list(episodes)
    while live:
        if not live[0].turns:
            samples = engine.generate([p.ids for p in prompts], n, spec, seed)
        else:
            contexts = [np.concatenate([e.prompt.ids, *e.ids]) for e in live]
            samples = engine.generate(contexts, 1, spec, seed + live[0].turns)
        for e, ids, lps in zip(live, samples.ids, samples.logprobs, strict=True):
            room = cap - e.length
            e.add(ids[:room], lps[:room], model=True)
            e.turns += 1
            e.last_turn = ids[:room]
            e.done = len(ids) >= room or e.turns >= cfg.max_turns
        texts = task.decode([e.last_turn for e in live])
        for e, text in zip(live, texts, strict=True):
            e.messages.append({"role": "assistant", "content": text})
            if not e.done:
                _step(e, task, cap, stats)
        live = [e for e in live if not e.done]
    return episodes, stats


def _step(e: Episode, task: Any, cap: int, stats: EpisodeStats) -> None:
    """The environment answers the model's last turn: the episode goes on, or ends."""
    t0 = time.monotonic()
    kind, payload = task.rewards.step_env(e.prompt.row, e.messages)
    stats.env_s += time.monotonic() - t0
    if kind != "ok":
        stats.errors[kind] += 1
        e.reward, e.done = 0.0, True
        return
    new, reward, calls, errors = payload
    stats.tool_calls += calls
    stats.tool_errors.update(errors)
    if new is None:
        e.reward, e.done = reward, True
        return
    ids = env_tokens(new, task.tokenizer)
    if e.length + len(ids) >= cap:  # no room left for the model to answer: the episode ends as it stands
        e.done = True
        return
    e.add(ids, np.zeros(len(ids), np.float32), model=False)
    e.messages.extend(new)


def score_episodes(task: Any, episodes: list[Episode], max_abs: float, stats: EpisodeStats) -> tuple[np.ndarray, Any]:
    """Each episode's reward: the environment's (0 when outside ``+-selector.max_abs_reward``, counted as
    ``env/errors/bad_reward``), or the task's reward functions on its last model turn. Returns the rewards
    and the reward functions' scores (None when no episode needed them)."""
    rewards = np.zeros(len(episodes), np.float32)
    todo = [i for i, e in enumerate(episodes) if e.reward is None]
    scores = None
    if todo:
        scores, _ = task.score([episodes[i].prompt for i in todo], [episodes[i].last_turn for i in todo], 1)
        rewards[todo] = scores.rewards
    for i, e in enumerate(episodes):
        if e.reward is not None:
            if abs(e.reward) <= max_abs:
                rewards[i] = e.reward
            else:
                stats.errors["bad_reward"] += 1
    return rewards, scores


def group_arrays(episodes: list[Episode]) -> dict[str, np.ndarray]:
    """The arrays of one group's ``ScoredEpisodes`` (rewards apart)."""
    return {
        "completion_ids": np.concatenate([i for e in episodes for i in e.ids]),
        "completion_lens": np.array([e.length for e in episodes], np.int32),
        "logprobs": np.concatenate([lp for e in episodes for lp in e.logprobs]),
        "loss_mask": np.concatenate([m for e in episodes for m in e.mask]),
        "turns": np.array([e.turns for e in episodes], np.int32),
    }


def episode_metrics(episodes: list[Episode], stats: EpisodeStats, totals: Counter[str]) -> dict[str, float]:
    """``env/*`` of one engine call's episodes; ``totals`` accumulates the counters over the server's life."""
    totals.update({f"tool_errors/{k}": v for k, v in stats.tool_errors.items()})
    totals.update({f"errors/{k}": v for k, v in stats.errors.items()})
    totals["tool_calls"] += stats.tool_calls
    tokens = sum(e.length for e in episodes)
    model = sum(int(m.sum()) for e in episodes for m in e.mask)
    return {
        "env/turns_mean": float(np.mean([e.turns for e in episodes])),
        "env/tool_calls_per_episode": stats.tool_calls / len(episodes),
        "env/masked_frac": (tokens - model) / max(tokens, 1),
        "time/env": stats.env_s,
        **{f"env/{k}": float(v) for k, v in totals.items()},
    }


def play(
    engine: Engine,
    task: Any,
    cfg: Config,
    prompts: list[Any],
    n: int,
    spec: SamplingSpec,
    seed: int,
    totals: Counter[str],
) -> tuple[list[dict[str, Any]], dict[str, Any], Counter[str]]:
    """One engine call's worth of episodes, played and scored: each group's ``ScoredEpisodes`` fields but its
    identity, the call's metrics, and the reward functions' error counts (to add to the server's)."""
    t0 = time.monotonic()
    episodes, stats = run_episodes(engine, task, cfg, prompts, n, spec, seed)
    gen_s = time.monotonic() - t0
    rewards, scores = score_episodes(task, episodes, cfg.selector.max_abs_reward, stats)
    parts = [
        {
            "gen_seconds": gen_s / len(prompts),
            "prompt_ids": prompt.ids,
            "rewards": rewards[i * n : (i + 1) * n],
            **group_arrays(episodes[i * n : (i + 1) * n]),
        }
        for i, prompt in enumerate(prompts)
    ]
    tokens = sum(e.length for e in episodes)
    metrics = {
        "rollout/tokens_per_s": tokens / gen_s,
        "rollout/reward_mean": float(rewards.mean()),
        "time/generate": gen_s - stats.env_s,
        "time/reward": time.monotonic() - t0 - gen_s,
        "rollout/completion_len_mean": tokens / len(episodes),
        "rollout/reward_restarts": task.rewards.restarts,
        **episode_metrics(episodes, stats, totals),
    }
    return parts, metrics, scores.errors if scores is not None else Counter()
