"""Episodes driven over HTTP: the book of open episode groups, stitched turn by turn at token level.

A client opens a group with one request of ``n`` choices (``rollout.group_size`` <= n <= the largest
group size): each choice starts one episode, whose first model turn is that choice's sampled tokens. Each
later request names one episode (``X-Podsrl-Episode: <id>``, ``rollout_server/http.py``); its prompt, as the
server tokenized it, must start with the episode's tokens so far (the first prompt, every model turn and
every piece in between): only the rest is appended, as environment tokens (loss mask 0, log-prob 0). A
prompt that does not start so (the client re-templated or edited the text) would train the model on a
context it never saw: the group is dropped and counted (``env/errors/prefix_mismatch``), never
re-tokenized. When every episode of a group has its reward the group is one ``ScoredEpisodes``, built by
``rollout_server/episodes.py``'s ``group_arrays`` as the server's own episodes are.

Bounds: episodes open per client (``rollout.http_max_open_episodes``), turns (``task.max_turns``), tokens
after the first prompt (``max_completion_tokens``), the first prompt (``task.max_prompt_tokens``), and a
group without a request for ``rollout.http_episode_timeout_s`` is dropped (``idle``). All state lives in
the event loop's thread; a group with a turn in flight (``busy``) is never dropped under it.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rollout_server.episodes import Episode, group_arrays

DROP_REASONS = ("prefix_mismatch", "idle", "abandoned")  # http/episodes_dropped/<reason>


class BookError(Exception):
    """A request the book refuses: an HTTP status and a message that names the fix."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class Group:
    """n episodes of one first prompt, opened by one client."""

    client: str
    prompt_ids: np.ndarray
    episodes: list[Episode]
    ids: list[str]
    version: int  # the oldest version any of its turns was sampled with (its staleness is never understated)
    gen_s: float = 0.0
    rewards: list[float | None] = field(default_factory=list)
    busy: set[int] = field(default_factory=set)  # episodes with a turn in flight
    last: float = 0.0  # monotonic time of the last request


@dataclass(frozen=True)
class Limits:
    max_open: int  # episodes open per client
    max_turns: int
    max_tokens: int  # after the first prompt
    max_prompt_tokens: int
    timeout_s: float
    max_abs_reward: float
    min_n: int
    max_n: int


class EpisodeBook:
    def __init__(self, limits: Limits, totals: Counter[str], clock: Callable[[], float] = time.monotonic) -> None:
        self.limits, self.totals, self.clock = limits, totals, clock
        self.groups: dict[str, Group] = {}
        self.where: dict[str, tuple[str, int]] = {}  # episode id -> (group key, index)
        self.open_by_client: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()

    # -- opening -----------------------------------------------------------------------------------
    def check_open(self, client: str, n: int, prompt_len: int) -> None:
        lim = self.limits
        if not lim.min_n <= n <= lim.max_n:
            raise BookError(
                400,
                f"an episode group has n in {lim.min_n}..{lim.max_n} (rollout.group_size; the selector trains "
                f"groups of that size), got n={n}",
                "invalid_n",
            )
        if prompt_len > lim.max_prompt_tokens:
            raise BookError(
                400,
                f"the episode's first prompt has {prompt_len} tokens > task.max_prompt_tokens={lim.max_prompt_tokens}:"
                " shorten it",
                "context_length_exceeded",
            )
        if self.open_by_client[client] + n > lim.max_open:
            raise BookError(
                429,
                f"this client holds {self.open_by_client[client]} open episodes; {n} more exceed "
                f"rollout.http_max_open_episodes={lim.max_open}: send the rewards of open episodes first",
                "too_many_episodes",
            )

    def open(
        self, client: str, prompt_ids: np.ndarray, ids: list[np.ndarray], lps: list[np.ndarray], version: int, s: float
    ) -> list[str]:
        """A group of ``len(ids)`` episodes, each's first model turn sampled; returns their ids."""
        key = os.urandom(8).hex()
        names = [f"ep-{key}-{i}" for i in range(len(ids))]
        episodes = []
        for one, lp in zip(ids, lps, strict=True):
            e = Episode(prompt=None)
            e.add(one, lp, model=True)
            e.turns = 1
            episodes.append(e)
        self.groups[key] = Group(client, prompt_ids, episodes, names, version, s, [None] * len(ids), last=self.clock())
        self.where.update({name: (key, i) for i, name in enumerate(names)})
        self.open_by_client[client] += len(ids)
        self.counters["episodes_opened"] += len(ids)
        return names

    # -- turns -------------------------------------------------------------------------------------
    def find(self, eid: str, client: str) -> tuple[Group, int]:
        at = self.where.get(eid)
        if at is None or self.groups[at[0]].client != client:
            raise BookError(
                404,
                f"no open episode {eid[:80]!r} for this client: it was never opened, was dropped "
                "(http/episodes_dropped/*), or its group was sent; open one with 'X-Podsrl-Episode: new'",
                "episode_not_found",
            )
        return self.groups[at[0]], at[1]

    def begin(self, eid: str, client: str) -> tuple[np.ndarray, int]:
        """Start a turn of an episode: returns its tokens so far (the context a new prompt must start with)
        and the tokens it may still take. The episode is busy until :meth:`add_turn` or :meth:`end_turn`."""
        g, i = self.find(eid, client)
        e = g.episodes[i]
        if i in g.busy:
            raise BookError(409, f"episode {eid} has a turn in flight: wait for its answer", "episode_busy")
        if g.rewards[i] is not None:
            raise BookError(409, f"episode {eid} has its reward: it takes no more turns", "episode_closed")
        if e.turns >= self.limits.max_turns:
            raise BookError(
                400,
                f"episode {eid} has {e.turns} turns, task.max_turns={self.limits.max_turns}: send its reward "
                "(POST /podsrl/v1/episodes/{id}/reward)",
                "too_many_turns",
            )
        g.busy.add(i)
        g.last = self.clock()
        return np.concatenate([g.prompt_ids, *e.ids]), self.limits.max_tokens - e.length

    def end_turn(self, eid: str, client: str) -> None:
        """A turn that sampled nothing (refused, or failed): the episode is as it was."""
        at = self.where.get(eid)
        if at is not None:
            self.groups[at[0]].busy.discard(at[1])

    def add_turn(
        self, eid: str, client: str, env_ids: np.ndarray, ids: np.ndarray, lps: np.ndarray, version: int, s: float
    ) -> None:
        """The new prompt's tokens after the episode's (mask 0), then the model's sampled turn (mask 1)."""
        g, i = self.find(eid, client)
        e = g.episodes[i]
        if len(env_ids):
            e.add(env_ids, np.zeros(len(env_ids), np.float32), model=False)
        e.add(ids, lps, model=True)
        e.turns += 1
        g.version, g.gen_s = min(g.version, version), g.gen_s + s
        g.busy.discard(i)
        g.last = self.clock()

    # -- rewards and drops ---------------------------------------------------------------------------
    def reward(self, eid: str, client: str, value: Any) -> dict[str, Any] | None:
        """Record an episode's reward; when it completes its group, the group's ``ScoredEpisodes`` fields (but
        its identity and version: ``version`` is among them) and the group is closed."""
        bound = self.limits.max_abs_reward
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise BookError(422, f"'reward' must be a finite number, got {str(value)[:40]}", "invalid_reward")
        if abs(value) > bound:
            raise BookError(
                422,
                f"reward {value} is outside +-selector.max_abs_reward={bound:g}: the selector would drop the group",
                "invalid_reward",
            )
        g, i = self.find(eid, client)
        if i in g.busy:
            raise BookError(
                409, f"episode {eid} has a turn in flight: send its reward after the answer", "episode_busy"
            )
        if g.rewards[i] is not None:
            raise BookError(409, f"episode {eid} already has its reward {g.rewards[i]}", "episode_closed")
        g.rewards[i] = float(value)
        g.last = self.clock()
        if any(r is None for r in g.rewards):
            return None
        key = self.where[eid][0]
        self._close(key, g)
        self.counters["episodes_closed"] += len(g.episodes)
        return {
            "version": g.version,
            "gen_seconds": g.gen_s,
            "prompt_ids": g.prompt_ids,
            "rewards": np.asarray(g.rewards, np.float32),
            **group_arrays(g.episodes),
        }

    def drop(self, eid: str, client: str, reason: str) -> None:
        """Drop an episode's whole group (a group short of one episode is not a group), counted by reason."""
        g, _ = self.find(eid, client)
        self._drop(self.where[eid][0], g, reason)

    def _drop(self, key: str, g: Group, reason: str) -> None:
        self._close(key, g)
        self.counters[f"episodes_dropped/{reason}"] += len(g.episodes)
        if reason == "prefix_mismatch":
            self.totals["errors/prefix_mismatch"] += 1

    def _close(self, key: str, g: Group) -> None:
        del self.groups[key]
        for name in g.ids:
            del self.where[name]
        self.open_by_client[g.client] -= len(g.ids)
        if not self.open_by_client[g.client]:
            del self.open_by_client[g.client]

    def sweep(self) -> int:
        """Drop the groups idle for longer than the timeout (never one with a turn in flight); returns how many."""
        now = self.clock()
        idle = [(k, g) for k, g in self.groups.items() if not g.busy and now - g.last > self.limits.timeout_s]
        for key, g in idle:
            self._drop(key, g, "idle")
        return len(idle)

    def metrics(self) -> dict[str, float]:
        return {
            "http/episodes_open": float(sum(self.open_by_client.values())),
            **{f"http/{k}": float(v) for k, v in self.counters.items()},
        }


def stitch(context: np.ndarray, prompt_ids: np.ndarray) -> np.ndarray | None:
    """The tokens ``prompt_ids`` adds after ``context``, or None when it does not start with ``context``."""
    n = len(context)
    if len(prompt_ids) < n or not np.array_equal(prompt_ids[:n], context):
        return None
    return prompt_ids[n:]
