"""The run's bounds on a decoded group, and the identity of every group: checked where groups arrive.

The codec proves a message is well formed (:meth:`ScoredGroup.check`: types, shapes, finite numbers,
a printable server id). A well-formed group can still be hostile or absurd for *this* run; ``Bounds``
rejects, with a reason that becomes the counter ``rejected/<reason>``:

- ``version_future``: a version the learner has not announced (it would train with negative staleness).
  A rollout server may hear of version ``V+1`` before the selector does (the announcement reaches both
  over their own links), so a group of exactly the next version is held, not rejected (``Early``: a few
  per server, at most ``EARLY_WAIT_S``) and admitted once the announcement arrives; one further ahead,
  or one still unannounced after the wait, is rejected. A work request of the next version is answered
  once its announcement has arrived (``selector/pacing.py``).
  ``version_discarded``: a version below the announced floor (weights a restarted learner discarded).
- ``token_id``: a prompt or completion token id outside ``0..vocab_size-1`` (once the learner has
  announced the vocabulary size; the learner checks again before training).
- ``length``: a prompt over ``task.max_prompt_tokens`` or a completion over ``max_new_tokens`` (an
  episode of ``ScoredEpisodes``: over ``max_completion_tokens``, its model and environment tokens);
  ``turns``: an episode of more model turns than ``task.max_turns`` (a single-turn run: more than 1);
  ``group_size``: n other than ``rollout.group_size`` (or beyond ``rollout.max_group_size`` with
  ``rollout.surplus = "grow_n"``).
- ``logprob``: a behaviour log-prob below ``selector.min_logprob``; ``reward``: one outside
  ``+-selector.max_abs_reward``; ``task``: a task other than this run's.

``Identities`` gives every group a name, ``(server_id, session, seq)``: a session is one rollout
server process (a random 63-bit nonce), ``seq`` counts its groups. Over one connection groups arrive
in order, so a group at or below the last seq seen is a ``duplicate`` (dropped: nothing is trained
twice) and a jump counts ``identity/gaps``. A second live process with the same server id is refused
(``server_id_in_use``) until the first has been silent for ``takeover_s`` (three heartbeats): a
restarted server takes its id back once the old process has been silent that long. The refused
process is told (a ``Refusal``, which stops it: ``selector/server.py``) only once the holder has
spoken after the refused process first did (:meth:`Identities.holder_alive`): two live processes
share the id. A restart is never told: its killed predecessor never speaks again.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from protocol.config import Config
from protocol.messages import ProtocolError, ScoredEpisodes, ScoredGroup


@dataclass
class Bounds:
    cfg: Config
    version: int = 0  # newest version the learner announced
    floor: int = 0  # no row below this version is trained (a learner restart discarded those weights)
    vocab_size: int = 0  # 0 until the learner announces it

    def check_version(self, version: int, server_id: str, what: str = "group", ahead: int = 0) -> None:
        """Raise unless ``version`` was published (or is at most ``ahead`` beyond the newest announcement this
        process has read) and not discarded."""
        if version > self.version + ahead:
            raise ProtocolError(
                "version_future",
                f"{what} of version {version} from {server_id}, but the "
                f"learner has announced only up to {self.version}",
            )
        if version < self.floor:
            raise ProtocolError(
                "version_discarded",
                f"{what} of version {version} from {server_id}: the learner "
                f"restarted and discarded versions below {self.floor}",
            )

    def check(self, g: ScoredGroup, ahead: int = 0) -> None:
        """Raise ProtocolError(reason) if ``g`` breaks this run's bounds (its version may be up to ``ahead``
        beyond the newest announcement)."""
        self.check_version(g.version, g.server_id, ahead=ahead)
        if g.task != self.cfg.task.name:
            raise ProtocolError(
                "task", f"group of task {g.task[:64]!r} from {g.server_id}, this run trains {self.cfg.task.name!r}"
            )
        if not self.cfg.rollout.group_size <= g.n <= self.cfg.max_group_size:
            raise ProtocolError(
                "group_size",
                f"group of {g.n} completions from {g.server_id}, rollout.group_size is "
                f"{self.cfg.rollout.group_size} (at most {self.cfg.max_group_size} with "
                f"rollout.surplus='grow_n')",
            )
        if g.prompt_ids.shape[0] > self.cfg.task.max_prompt_tokens:
            raise ProtocolError(
                "length",
                f"prompt of {g.prompt_ids.shape[0]} tokens from {g.server_id} > "
                f"task.max_prompt_tokens={self.cfg.task.max_prompt_tokens}",
            )
        longest = int(g.completion_lens.max())
        if type(g) is ScoredGroup:  # the single-turn path: exactly the checks it always had
            if longest > self.cfg.max_new_tokens:
                raise ProtocolError(
                    "length",
                    f"completion of {longest} tokens from {g.server_id} > max_new_tokens={self.cfg.max_new_tokens}",
                )
        else:
            self.check_episodes(g, longest)  # type: ignore[arg-type]  # the codec knows two group types
        if self.vocab_size:
            low = min(int(g.prompt_ids.min()), int(g.completion_ids.min()) if g.completion_ids.size else 0)
            high = max(int(g.prompt_ids.max()), int(g.completion_ids.max()) if g.completion_ids.size else 0)
            if low < 0 or high >= self.vocab_size:
                raise ProtocolError(
                    "token_id",
                    f"token id {low if low < 0 else high} from {g.server_id} outside the "
                    f"vocabulary 0..{self.vocab_size - 1}",
                )
        if g.logprobs.size and float(g.logprobs.min()) < self.cfg.selector.min_logprob:
            raise ProtocolError(
                "logprob",
                f"behaviour log-prob {float(g.logprobs.min()):.4g} from {g.server_id} < "
                f"selector.min_logprob={self.cfg.selector.min_logprob}",
            )
        cap = self.cfg.selector.max_abs_reward
        if float(np.abs(g.rewards).max()) > cap:
            raise ProtocolError(
                "reward",
                f"reward {float(np.abs(g.rewards).max()):.4g} from {g.server_id} outside "
                f"+-selector.max_abs_reward={cap:g}",
            )

    def check_episodes(self, g: ScoredEpisodes, longest: int) -> None:
        """An episode's bounds: its tokens (model and environment) within ``max_completion_tokens``, its turns
        within ``task.max_turns`` (1 in a run without ``task.environment``)."""
        cap = self.cfg.max_completion_tokens
        if longest > cap:
            raise ProtocolError(
                "length",
                f"episode of {longest} tokens from {g.server_id} > {cap} (task.max_episode_tokens, or "
                "task.max_turns x max_new_tokens)",
            )
        turns = int(g.turns.max())
        if turns > self.cfg.max_turns:
            raise ProtocolError(
                "turns",
                f"episode of {turns} turns from {g.server_id} > {self.cfg.max_turns} (task.max_turns; 1 without "
                "task.environment)",
            )


EARLY_WAIT_S = 1.0  # an honest announcement trails a rollout server's by milliseconds
EARLY_PER_SERVER = 4  # a server generates one version's groups in a few bursts; a hostile one fills only its own


@dataclass
class Early:
    """Groups of the version after the newest announced one, held until its announcement arrives.

    Bounded: at most ``per_server`` per server id (the peer table is bounded too), each for at most
    ``wait_s``. :meth:`release` returns those now announced, and raises nothing: those whose wait ran
    out come back separately, to be rejected as ``version_future``."""

    wait_s: float = EARLY_WAIT_S
    per_server: int = EARLY_PER_SERVER
    held: deque[tuple[float, ScoredGroup]] = field(default_factory=deque)  # (deadline, group), oldest first
    per_id: Counter[str] = field(default_factory=Counter)

    def hold(self, g: ScoredGroup, now: float) -> None:
        """Hold ``g``; raise ``version_future`` when its server already has ``per_server`` groups waiting."""
        if self.per_id[g.server_id] >= self.per_server:
            raise ProtocolError(
                "version_future",
                f"group of version {g.version} from {g.server_id}: {self.per_server} of its groups "
                "already wait for that version's announcement",
            )
        self.per_id[g.server_id] += 1
        self.held.append((now + self.wait_s, g))

    def release(self, version: int, now: float) -> tuple[list[ScoredGroup], list[ScoredGroup]]:
        """``(groups of a version <= version, groups whose wait ran out)``, both removed; arrival order."""
        ready: list[ScoredGroup] = []
        expired: list[ScoredGroup] = []
        kept: deque[tuple[float, ScoredGroup]] = deque()
        for deadline, g in self.held:
            out = ready if g.version <= version else expired if now >= deadline else None
            if out is None:
                kept.append((deadline, g))
                continue
            out.append(g)
            self.per_id[g.server_id] -= 1
            if not self.per_id[g.server_id]:
                del self.per_id[g.server_id]
        self.held = kept
        return ready, expired

    def next_deadline(self) -> float | None:
        return self.held[0][0] if self.held else None

    def __len__(self) -> int:
        return len(self.held)


@dataclass
class Session:
    session: int
    last_seq: int | None = None  # None until this selector sees a group of the session (it may join late)
    last_seen: float = 0.0
    rival: int = -1  # the newest other session refused this server id
    rival_since: float = 0.0  # when that session was first refused


@dataclass
class Identities:
    """The newest session of each server id, and the last sequence number seen in it."""

    takeover_s: float  # a new session may replace a server id's session silent this long
    sessions: dict[str, Session] = field(default_factory=dict)
    gaps: int = 0

    def admit(self, server_id: str, session: int, now: float) -> Session:
        """The session a message of ``(server_id, session)`` belongs to; raise if another live process
        holds the server id."""
        known = self.sessions.get(server_id)
        if known is None or (known.session != session and now - known.last_seen >= self.takeover_s):
            known = self.sessions[server_id] = Session(session, last_seen=now)
        elif known.session != session:
            if known.rival != session:
                known.rival, known.rival_since = session, now
            raise ProtocolError(
                "server_id_in_use",
                f"a second process uses server id {server_id!r} while the first "
                f"is alive: give each rollout server its own --server-id",
            )
        known.last_seen = now
        return known

    def holder_alive(self, server_id: str) -> bool:
        """The session holding ``server_id`` spoke after its newest rival was first refused: a second
        live process uses the id, not a restart of the holder (whose predecessor is dead and silent, and
        which takes the id over after ``takeover_s``)."""
        s = self.sessions.get(server_id)
        return s is not None and s.rival >= 0 and s.last_seen > s.rival_since

    def check_group(self, g: ScoredGroup, now: float) -> None:
        """Raise ``duplicate`` for a group already seen; count a gap in the sequence."""
        s = self.admit(g.server_id, g.session, now)
        if s.last_seq is not None and g.group_id <= s.last_seq:
            raise ProtocolError(
                "duplicate", f"group {g.group_id} of {g.server_id} (session {g.session:x}) was received before"
            )
        if s.last_seq is not None and g.group_id > s.last_seq + 1:  # a restarted selector starts counting anew
            self.gaps += g.group_id - s.last_seq - 1
        s.last_seq = g.group_id

    def forget(self, server_id: str) -> None:
        self.sessions.pop(server_id, None)
