"""Episodes in the learner (issue 21): environment tokens (loss mask 0) never enter a loss, a KL, an entropy
or a token count. The mask multiplies into the completion mask where the step builds it (learner/step.py),
so every loss takes it unchanged."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from launcher.tiny import build_tiny_model
from learner.losses import AGGREGATIONS, LOSSES, LossInputs, compute_loss
from learner.model import completion_logprobs, load_model
from learner.step import episode_mask, micro_batch_loss, pad, train_step
from protocol.config import load_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(load_config(None, []), path, alphabet="abcdefghijkl:")
    return path


def episodes(n: int, vocab: int, seed: int) -> dict:
    """``n`` episodes: model tokens, environment tokens (log-prob 0) in the middle, model tokens again."""
    g = torch.Generator().manual_seed(seed)
    rows: dict = {"prompts": [], "completions": [], "behav": [], "masks": []}
    for _ in range(n):
        a, e, b = (int(x) for x in torch.randint(1, 6, (3,), generator=g))
        mask = torch.cat([torch.ones(a), torch.zeros(e), torch.ones(b)])
        rows["prompts"].append(torch.randint(4, vocab, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g))
        rows["completions"].append(torch.randint(4, vocab, (a + e + b,), generator=g))
        rows["behav"].append((-0.5 - 3 * torch.rand(a + e + b, generator=g)) * mask)
        rows["masks"].append(mask)
    rows["advantages"] = torch.randn(n, generator=g)
    return rows


def compact(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Each row's kept positions moved to the left, zeros after: the model tokens alone."""
    return pad([row[k] for row, k in zip(x, keep, strict=True)], x.shape[1])


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_a_loss_with_environment_tokens_masked_equals_the_loss_on_model_tokens_alone(tiny, loss, aggregation):
    """The loss on episodes with the environment's tokens masked, and the same loss on each episode's model
    tokens alone (the environment's positions cut out): every model token's loss bit for bit; the step's
    scalar loss and every diagnostic (KL, ratio, entropy proxy) to float32 rounding (a sum over a (B, T)
    tensor adds in another order when the zeros sit elsewhere); the token count exactly."""
    cfg = load_config(
        None,
        [
            f"model.path={tiny}",
            "model.init=pretrained",
            f"learner.loss.type={loss}",
            f"learner.loss.aggregation={aggregation}",
        ],
    )
    torch.manual_seed(0)
    net = load_model(tiny, CPU)
    data = episodes(6, 17, seed=1)
    model_tokens = float(sum(m.sum() for m in data["masks"]))
    totals = (model_tokens, 6.0)
    loss_masked, metrics = micro_batch_loss(net, data, cfg, totals, CPU)

    with torch.no_grad():
        logp, mask, _ = completion_logprobs(net, data["prompts"], data["completions"], cfg.rollout.temperature, CPU)
    masked = episode_mask(mask, data["masks"])  # what the step multiplies in
    keep = masked > 0
    behav = pad(data["behav"], mask.shape[1])
    adv = data["advantages"]
    with_env = LossInputs(logp=logp * masked, behav_logp=behav, advantages=adv, mask=masked, prox_logp=logp * masked)
    alone_logp = compact(logp, keep)
    alone = LossInputs(
        logp=alone_logp,
        behav_logp=compact(behav, keep),
        advantages=adv,
        mask=compact(torch.ones_like(mask), keep),
        prox_logp=alone_logp,
    )
    tok_env, _ = LOSSES[loss](with_env, cfg.learner.loss)
    tok_alone, _ = LOSSES[loss](alone, cfg.learner.loss)
    assert torch.equal(compact(tok_env, keep), tok_alone * alone.mask)

    loss_alone, metrics_alone = compute_loss(
        alone, cfg.learner.loss, max_len=cfg.max_completion_tokens, total_tokens=totals[0], total_seqs=totals[1]
    )
    assert float(loss_masked.detach()) == pytest.approx(float(loss_alone), rel=1e-6, abs=1e-7)
    assert metrics["loss/tokens"] == metrics_alone["loss/tokens"] == model_tokens
    for key, value in metrics_alone.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_environment_tokens_count_nowhere_in_a_step(tiny):
    """The step's token total is the model tokens; the entropy is theirs; a step on episodes is finite and
    its gradient does not depend on what the environment tokens' log-probs claim (they are masked)."""
    cfg = load_config(None, [f"model.path={tiny}", "model.init=pretrained", "learner.grad_clip=0"])
    data = episodes(5, 17, seed=2)
    model_tokens = float(sum(m.sum() for m in data["masks"]))

    def step(d: dict) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        torch.manual_seed(0)
        net = load_model(tiny, CPU)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.learner.lr)
        metrics = train_step(net, opt, copy.deepcopy(d), cfg, 1, CPU, 0)
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}, metrics

    grads, metrics = step(data)
    assert metrics["loss/tokens"] == model_tokens and metrics["train/skipped_nonfinite"] == 0.0
    other = copy.deepcopy(data)
    other["behav"] = [b - 7.0 * (1 - m) for b, m in zip(other["behav"], other["masks"], strict=True)]
    grads_other, _ = step(other)
    for name, g in grads.items():
        assert torch.equal(g, grads_other[name]), name


def test_a_shard_gives_each_row_its_episode_mask():
    import numpy as np

    from learner.train import shard
    from protocol.messages import TrainBatch

    lens = np.array([3, 2, 4], np.int32)
    mask = np.array([1, 0, 1, 1, 1, 1, 0, 0, 1], np.uint8)
    batch = TrainBatch(
        request_id=1,
        version=0,
        servers=["s"],
        stats={},
        prompt_ids=np.arange(6, dtype=np.int32),
        prompt_lens=np.array([2, 2, 2], np.int32),
        completion_ids=np.arange(9, dtype=np.int32),
        completion_lens=lens,
        logprobs=np.where(mask == 1, -0.5, 0.0).astype(np.float32),
        advantages=np.zeros(3, np.float32),
        rewards=np.zeros(3, np.float32),
        versions=np.zeros(3, np.int64),
        group_index=np.zeros(3, np.int32),
        server_index=np.zeros(3, np.int32),
        group_sessions=np.zeros(1, np.int64),
        group_seqs=np.zeros(1, np.int64),
        loss_mask=mask,
    )
    batch.check()
    assert [m.tolist() for m in shard(batch, 0, 2)["masks"]] == [[1, 0, 1], [1, 0, 0, 1]]  # rows 0 and 2
    assert [m.tolist() for m in shard(batch, 1, 2)["masks"]] == [[1, 1]]
    assert shard(dataclasses.replace(batch, loss_mask=np.empty(0, np.uint8)), 0, 1)["masks"] is None
