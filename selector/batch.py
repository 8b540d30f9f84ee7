"""Pure glue between groups and batches: down-sample one group, concatenate kept groups into a batch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protocol.config import SelectorConfig
from protocol.messages import BatchRequest, ScoredGroup, TrainBatch
from selector.rules import process_group


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


def keep_group(group: ScoredGroup, cfg: SelectorConfig, m: int, rng: np.random.Generator) -> KeptGroup | None:
    """Apply the configured rule; None when the zero-variance rule drops the group."""
    decision = process_group(group.rewards, m, cfg.rule, cfg.zero_variance, cfg.adv_norm, rng)
    if decision.dropped:
        return None
    ends = np.cumsum(group.completion_lens)
    starts = ends - group.completion_lens
    kept = decision.kept
    return KeptGroup(
        server_id=group.server_id, version=group.version, prompt_ids=group.prompt_ids,
        completions=[group.completion_ids[starts[i]:ends[i]] for i in kept],
        logprobs=[group.logprobs[starts[i]:ends[i]] for i in kept],
        rewards=group.rewards[kept], advantages=decision.advantages,
        group_reward_mean=float(group.rewards.mean()), zero_variance=decision.zero_variance)


def build_batch(groups: list[KeptGroup], req: BatchRequest, stats: dict[str, float]) -> TrainBatch:
    """One row per kept completion; ``stats`` gains the batch's reward summaries."""
    servers = sorted({g.server_id for g in groups})
    index = {s: i for i, s in enumerate(servers)}
    rows = [(gi, g, j) for gi, g in enumerate(groups) for j in range(len(g.completions))]
    stats = {**stats, "reward/mean": float(np.mean([g.group_reward_mean for g in groups])),
             "reward/kept_std": float(np.mean([g.rewards.std() for g in groups]))}
    return TrainBatch(
        request_id=req.request_id, version=req.version, servers=servers, stats=stats,
        prompt_ids=np.concatenate([g.prompt_ids for _, g, _ in rows]).astype(np.int32),
        prompt_lens=np.array([len(g.prompt_ids) for _, g, _ in rows], np.int32),
        completion_ids=np.concatenate([g.completions[j] for _, g, j in rows]).astype(np.int32),
        completion_lens=np.array([len(g.completions[j]) for _, g, j in rows], np.int32),
        logprobs=np.concatenate([g.logprobs[j] for _, g, j in rows]).astype(np.float32),
        advantages=np.array([g.advantages[j] for _, g, j in rows], np.float32),
        rewards=np.array([g.rewards[j] for _, g, j in rows], np.float32),
        versions=np.array([g.version for _, g, _ in rows], np.int64),
        group_index=np.array([gi for gi, _, _ in rows], np.int32),
        server_index=np.array([index[g.server_id] for _, g, _ in rows], np.int32))
