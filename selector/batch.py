"""Pure glue between groups and batches: down-sample groups, concatenate kept groups into a batch."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from itertools import accumulate
from typing import cast

import numpy as np

from protocol.config import SelectorConfig
from protocol.messages import U8, BatchRequest, ScoredEpisodes, ScoredGroup, TrainBatch
from selector.rules import GroupDecision, process_group, process_groups


@dataclass(frozen=True, eq=False)
class KeptGroup:
    """The m kept completions of one group, with advantages computed on the kept subset only."""

    server_id: str
    version: int
    prompt_ids: np.ndarray
    completions: list[np.ndarray]
    logprobs: list[np.ndarray]
    rewards: np.ndarray
    advantages: np.ndarray
    group_reward_mean: float  # over all n sampled completions: the unbiased progress signal
    zero_variance: bool
    session: int = 0  # the group's identity (selector/bounds.py), carried into the batch for audits
    seq: int = 0
    tokens: int = 0  # completion tokens of all n sampled completions (length accounting: generated vs trained)
    n: int = 0  # completions sampled


@dataclass(frozen=True, eq=False)
class KeptEpisodes(KeptGroup):
    """The kept episodes of a ``ScoredEpisodes``: a ``KeptGroup`` and each one's loss mask (a subclass, so that
    a single-turn group's ``KeptGroup`` costs nothing more than it did)."""

    masks: list[np.ndarray] = field(default_factory=list)  # 1 model token, 0 environment token


def keep_group(group: ScoredGroup, cfg: SelectorConfig, m: int, rng: np.random.Generator) -> KeptGroup | None:
    """Apply the configured rule; None when the zero-variance rule drops the group."""
    decision = process_group(group.rewards, m, cfg.rule, cfg.zero_variance, cfg.adv_norm, rng)
    if decision.dropped:
        return None
    return _kept(group, decision, float(group.rewards.mean()))


def keep_groups(
    groups: list[ScoredGroup], cfg: SelectorConfig, m: int, rng: np.random.Generator
) -> list[KeptGroup | None]:
    """``[keep_group(g, cfg, m, rng) for g in groups]``: the same results, in order, from the same draws.

    When every group has the same n, the rewards are down-sampled in one ``process_groups`` call
    (vectorised for bursts of 8 or more) and their means taken row-wise (numpy adds each row in the
    same order as ``group.rewards.mean()`` does).
    """
    if len(groups) < 2:
        return [keep_group(g, cfg, m, rng) for g in groups]
    n = groups[0].rewards.shape[0]
    if any(g.rewards.shape[0] != n for g in groups):
        return [keep_group(g, cfg, m, rng) for g in groups]
    rewards = np.stack([g.rewards for g in groups])
    decisions = process_groups(rewards, m, cfg.rule, cfg.zero_variance, cfg.adv_norm, rng)
    means = rewards.mean(1).tolist()
    return [None if d.dropped else _kept(g, d, mean) for g, d, mean in zip(groups, decisions, means, strict=True)]


def _kept(group: ScoredGroup, decision: GroupDecision, reward_mean: float) -> KeptGroup:
    """Slice the kept completions (views of the group's arrays) out of the group."""
    kept = decision.kept
    lens = group.completion_lens.tolist()
    ends = list(accumulate(lens))  # Python ints: the codec checked lens >= 0 and sum(lens) == len(ids)
    cids, logprobs = group.completion_ids, group.logprobs
    completions, lps = [], []
    for i in kept.tolist():
        end = ends[i]
        start = end - lens[i]
        completions.append(cids[start:end])
        lps.append(logprobs[start:end])
    out = KeptGroup(
        group.server_id,
        group.version,
        group.prompt_ids,
        completions,
        lps,
        group.rewards[kept],
        decision.advantages,
        reward_mean,
        decision.zero_variance,
        group.session,
        group.group_id,
        ends[-1] if ends else 0,
        len(lens),
    )
    if type(group) is ScoredGroup:
        return out
    mask = cast(ScoredEpisodes, group).loss_mask  # episodes: their masks sliced as their tokens are
    masks = [mask[ends[i] - lens[i] : ends[i]] for i in kept.tolist()]
    return KeptEpisodes(**{f.name: getattr(out, f.name) for f in fields(KeptGroup)}, masks=masks)


def build_batch(groups: list[KeptGroup], req: BatchRequest, stats: dict[str, float]) -> TrainBatch:
    """One row per kept completion; ``stats`` gains the batch's reward summaries."""
    servers = sorted({g.server_id for g in groups})
    index = {s: i for i, s in enumerate(servers)}
    rows = [g for g in groups for _ in g.completions]  # the group of each row
    sizes = {len(g.completions) for g in groups}
    # one row-wise std over [G, m] when the groups are of one size (numpy reduces each row as alone)
    kept_std = np.stack([g.rewards for g in groups]).std(1) if len(sizes) == 1 else [g.rewards.std() for g in groups]
    stats = {
        **stats,
        "reward/mean": float(np.mean([g.group_reward_mean for g in groups])),
        "reward/kept_std": float(np.mean(kept_std)),
    }
    return TrainBatch(
        request_id=req.request_id,
        version=req.version,
        servers=servers,
        stats=stats,
        prompt_ids=np.concatenate([g.prompt_ids for g in rows]).astype(np.int32),
        prompt_lens=np.array([len(g.prompt_ids) for g in rows], np.int32),
        completion_ids=np.concatenate([c for g in groups for c in g.completions]).astype(np.int32),
        completion_lens=np.array([len(c) for g in groups for c in g.completions], np.int32),
        logprobs=np.concatenate([lp for g in groups for lp in g.logprobs]).astype(np.float32),
        advantages=np.concatenate([g.advantages for g in groups]).astype(np.float32),
        rewards=np.concatenate([g.rewards for g in groups]).astype(np.float32),
        versions=np.array([g.version for g in rows], np.int64),
        group_index=np.array([gi for gi, g in enumerate(groups) for _ in g.completions], np.int32),
        server_index=np.array([index[g.server_id] for g in rows], np.int32),
        group_sessions=np.array([g.session for g in groups], np.int64),
        group_seqs=np.array([g.seq for g in groups], np.int64),
        loss_mask=_loss_mask(groups),
    )


def _loss_mask(groups: list[KeptGroup]) -> np.ndarray:
    """The batch's loss mask: empty when no row is an episode (every token counts), else one entry per
    completion token (ones for the single-turn rows)."""
    if all(type(g) is KeptGroup for g in groups):
        return np.empty(0, U8)
    return np.concatenate(
        [
            m
            for g in groups
            for m in (g.masks if isinstance(g, KeptEpisodes) else [np.ones(len(c), U8) for c in g.completions])
        ]
    ).astype(U8)
