"""Episodes through the selector (issue 21): down-sampled and batched like any group, their loss masks
sliced with their kept rows; single-turn groups beside them count every token."""

from __future__ import annotations

import numpy as np
from helpers import random_group

from protocol.config import SelectorConfig
from protocol.messages import BatchRequest, ScoredEpisodes
from selector.batch import build_batch, keep_groups


def as_episodes(rewards: list[float], gid: int) -> ScoredEpisodes:
    """``random_group`` with every completion of at least two tokens, its second one the environment's."""
    g = random_group(rewards, gid)
    lens = g.completion_lens + 2
    mask = np.concatenate([np.r_[1, 0, np.ones(n - 2)] for n in lens.tolist()]).astype(np.uint8)
    ids = np.random.default_rng(gid).integers(4, 99, int(lens.sum()), dtype=np.int32)
    return ScoredEpisodes(
        server_id=g.server_id,
        session=g.session,
        group_id=gid,
        version=g.version,
        task=g.task,
        gen_seconds=0.0,
        prompt_ids=g.prompt_ids,
        completion_ids=ids,
        completion_lens=lens.astype(np.int32),
        logprobs=np.where(mask == 1, -0.5, 0.0).astype(np.float32),
        rewards=g.rewards,
        loss_mask=mask,
        turns=np.full(len(rewards), 2, np.int32),
    )


def test_a_batch_of_episodes_and_completions_carries_one_mask_entry_per_token():
    rng = np.random.default_rng(0)
    groups = [as_episodes([0, 1, 0.5, 1], 1), random_group([1, 0, 0, 1], 2), as_episodes([0, 0, 1, 1], 3)]
    kept = [k for k in keep_groups(groups, SelectorConfig(), 2, rng) if k is not None]
    assert [type(k).__name__ for k in kept] == ["KeptEpisodes", "KeptGroup", "KeptEpisodes"]
    batch = build_batch(kept, BatchRequest(request_id=1, version=0, num_groups=3), {})
    batch.check()
    assert batch.loss_mask.shape == batch.completion_ids.shape
    ends = np.cumsum(batch.completion_lens)
    for row, (start, end) in enumerate(zip(ends - batch.completion_lens, ends, strict=True)):
        mask = batch.loss_mask[start:end]
        episode = batch.group_index[row] != 1
        assert mask.tolist() == ([1, 0] + [1] * (end - start - 2) if episode else [1] * (end - start))
        assert not np.any(batch.logprobs[start:end][mask == 0])  # environment tokens: log-prob 0


def test_single_turn_groups_make_a_batch_without_a_mask():
    kept = keep_groups([random_group([1, 0, 0, 1], 2)], SelectorConfig(), 2, np.random.default_rng(0))
    batch = build_batch([k for k in kept if k is not None], BatchRequest(request_id=1, version=0, num_groups=1), {})
    assert batch.loss_mask.size == 0
