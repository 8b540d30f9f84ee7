"""The selector's buffer policy, without sockets: what enters the buffer, what a batch takes.

``selector/server.py`` moves messages; everything it decides about groups is here, so it is tested
without sockets (tests/selector/test_buffer.py):

- :meth:`Buffer.admit`: the staleness gate at arrival (DESIGN.md: no row with ``s > K`` is trained),
  PODS down-sampling of the fresh groups of a burst in one ``keep_groups`` call, the zero-variance
  rule, exact mode's surplus rule, the buffer's bound while the learner is silent.
- :meth:`Buffer.take`: the groups of one batch. The buffer is re-gated once per request version;
  bounded mode takes the oldest versions first (earliest deadline first: a group of version ``v`` can
  be trained until request ``v + K``, so a slow server's late group goes before newer ones and is not
  dropped), ties in arrival order; exact mode takes version ``max(0, V - K)`` only.

Counters go to a :class:`Tally`: ``counts`` since the last batch (a batch's ``stats``), ``totals``
since start (the selector's final ``total/*`` record). Per rollout server: ``groups/received/<s>``,
``groups/trained/<s>``, ``staleness/dropped/<s>``.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import islice

import numpy as np

from protocol.config import Config
from protocol.messages import BatchRequest, ScoredGroup
from selector.batch import KeptGroup, keep_groups


@dataclass
class Tally:
    counts: Counter[str] = field(default_factory=Counter)  # since the last batch; reset when one is sent
    totals: Counter[str] = field(default_factory=Counter)  # since start

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n
        self.totals[key] += n


@dataclass
class Buffer:
    cfg: Config
    rng: np.random.Generator
    tally: Tally = field(default_factory=Tally)
    groups: deque[KeptGroup] = field(default_factory=deque)
    scanned_version: int | None = None  # the request version the buffer was last gated for

    def __len__(self) -> int:
        return len(self.groups)

    def drop_stale(self, server_id: str) -> None:
        """Never train on s > K (DESIGN.md): drop and count, per rollout server too."""
        self.tally.add("staleness/dropped")
        self.tally.add(f"staleness/dropped/{server_id}")

    def admit(self, groups: list[ScoredGroup], version: int, learner_silent: bool = False) -> list[str]:
        """Gate ``groups`` (in arrival order) against the learner's ``version``, down-sample the fresh ones
        and buffer what is kept. Counters and the buffer change group by group; the draws from ``rng`` are
        those of one ``keep_group`` per fresh group. Returns the outcome of each group: ``kept``,
        ``stale``, ``zero_variance``, ``exact_surplus`` or ``full``."""
        cfg = self.cfg
        stale = [cfg.too_stale(version, g.version) for g in groups]
        fresh = [g for g, s in zip(groups, stale, strict=True) if not s]
        kept_groups = iter(keep_groups(fresh, cfg.selector, cfg.kept_per_group, self.rng))
        outcomes = []
        for group, is_stale in zip(groups, stale, strict=True):
            self.tally.add("groups/received")
            self.tally.add(f"groups/received/{group.server_id}")
            self.tally.add("length/received_completions", group.n)
            self.tally.add("length/received_tokens", int(group.completion_ids.shape[0]))
            outcomes.append(self._admit_one(group, None if is_stale else next(kept_groups), is_stale, learner_silent))
        return outcomes

    def _admit_one(self, group: ScoredGroup, kept: KeptGroup | None, stale: bool, learner_silent: bool) -> str:
        if stale:
            self.drop_stale(group.server_id)
            return "stale"
        if kept is not None and self.exact_surplus(kept.version):
            self.tally.add("staleness/exact_surplus")
            return "exact_surplus"
        if kept is None:
            self.tally.add("selector/zero_variance_dropped")
            return "zero_variance"
        if kept.zero_variance:
            self.tally.add("selector/zero_variance_kept")
        if len(self.groups) >= self.cfg.selector.buffer_groups:  # read on while the learner is silent
            self.tally.add("selector/dropped_learner_silent")
            return "full"
        self.groups.append(kept)
        return "kept"

    def exact_surplus(self, version: int) -> bool:
        """Exact mode: each version is trained once (version 0 by the first K+1 updates), so more than
        that many groups of a version can only wait until they are dropped, filling the buffer."""
        if self.cfg.run.staleness_mode != "exact":
            return False
        return self.count_version(version) >= exact_quota(self.cfg, version)

    def count_version(self, version: int) -> int:
        return sum(g.version == version for g in self.groups)

    def fresh(self, request_version: int) -> int:
        """Buffered groups that a batch for ``request_version`` may still train."""
        return sum(not self.cfg.too_stale(request_version, g.version) for g in self.groups)

    def regate(self, request_version: int) -> None:
        """Drop (and count) what is too stale for ``request_version``, once per new request version: a group
        admitted since passed the arrival gate with a learner version >= it, so it is fresh enough."""
        if request_version == self.scanned_version:
            return
        kept: deque[KeptGroup] = deque()
        for g in self.groups:
            if self.cfg.too_stale(request_version, g.version):
                self.drop_stale(g.server_id)
            else:
                kept.append(g)
        self.groups = kept
        self.scanned_version = request_version

    def take(self, req: BatchRequest) -> list[KeptGroup] | None:
        """The groups of the batch for ``req`` (removed from the buffer), or None until it can be filled."""
        self.regate(req.version)
        if self.cfg.run.staleness_mode == "exact":
            return self._take_exact(req)
        if len(self.groups) < req.num_groups:
            return None
        groups, num = self.groups, req.num_groups
        cut = max(g.version for g in islice(groups, num))
        if all(g.version >= cut for g in islice(groups, num, None)):  # the common case: already in deadline order
            return [groups.popleft() for _ in range(num)]
        order = sorted(range(len(groups)), key=lambda i: groups[i].version)[:num]  # stable: arrival order
        return self._remove(sorted(order))

    def _remove(self, rows: list[int]) -> list[KeptGroup]:
        chosen = set(rows)
        take = [self.groups[i] for i in rows]
        self.groups = deque(g for i, g in enumerate(self.groups) if i not in chosen)
        return take

    def _take_exact(self, req: BatchRequest) -> list[KeptGroup] | None:
        """The groups of version ``max(0, V - K)`` for request version V, once the buffer also holds all
        that version V must supply to later updates (one batch; K+1 batches for version 0): the rollout
        servers move on to V+1 as soon as it exists, so no version may be left short."""
        k = self.cfg.max_staleness
        want = max(0, req.version - k)
        rows = [i for i, g in enumerate(self.groups) if g.version == want][: req.num_groups]
        need = req.num_groups * (k + 1 if req.version == 0 else 1)
        if len(rows) < req.num_groups or (k and self.count_version(req.version) < need):
            return None
        return self._remove(rows)

    def put_back(self, take: list[KeptGroup]) -> None:
        """An undeliverable batch: its groups wait for whoever asks next."""
        self.groups.extendleft(reversed(take))

    def trained(self, take: list[KeptGroup]) -> None:
        """Count a delivered batch's groups, per server, and the length of all n completions of each."""
        self.tally.add("groups/trained", len(take))
        for g in take:
            self.tally.add(f"groups/trained/{g.server_id}")
            self.tally.add("length/trained_tokens", g.tokens)
        self.tally.add("length/trained_completions", sum(g.n for g in take))

    def discard_below(self, floor: int) -> int:
        """A restarted learner discarded the versions below ``floor``: drop their groups; returns how many."""
        before = len(self.groups)
        self.groups = deque(g for g in self.groups if g.version >= floor)
        self.tally.add("restart/discarded_groups", before - len(self.groups))
        return before - len(self.groups)


def exact_quota(cfg: Config, version: int) -> int:
    """Exact mode: the groups of ``version`` that updates will train (K+1 batches of version 0, one of any other)."""
    return cfg.learner.groups_per_step * (cfg.max_staleness + 1 if version == 0 else 1)
