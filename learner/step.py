"""One update: the learning-rate schedule, PPO epochs and minibatches, micro-batching by a token budget.

``train_step`` is the whole update for one rank's shard of a batch: ``learner.ppo_epochs`` passes
over the batch, each cut into ``learner.minibatches`` minibatches, one optimizer step per minibatch
(1 x 1 by default: one optimizer step per batch). One update makes one version, whatever its number
of optimizer steps (``docs/LOSSES.md``, "PPO epochs and minibatches").

Minibatches are cut from the *whole* batch, not from each rank's shard: every pass draws a
permutation of the batch's global row ids from a generator seeded by (``run.seed``, version, epoch)
and cuts it into ``minibatches`` contiguous parts of near-equal size (``minibatch_rows``); each rank
trains the rows of each part that its shard holds. So R ranks take the same optimizer steps as one
process (up to float summation order), and a rerun the same ones. With more than one optimizer step
the proximal policy of decoupled PPO (and tis) is the policy at the start of the update: its
log-probs are computed once, before the first step, in a forward pass without gradient; with one
step it is the current policy, i.e. exactly the trained log-probs without gradient (no extra pass).

Within an optimizer step, the loss normalisers (global completion-token and sequence counts of the
minibatch, summed over ranks) are fixed before any forward pass, so each micro-batch's loss is exactly
its share of the mean over the minibatch and the accumulated gradient equals the one big batch's (up
to float summation order; ``tests/learner/test_step.py``).

Micro-batches (``learner.micro_batch_tokens``): rows are sorted by prompt+completion length,
longest first, and cut greedily so that rows x longest row of each micro-batch stays within the
budget; a row longer than the budget is a micro-batch of its own. Every rank runs the same number
of micro-batches (FSDP's per-layer all-gathers and DDP's all-reduce are collectives): a rank with
fewer splits its largest ones, and a rank with too few rows (none, in a small minibatch) repeats one
with weight 0. m2po's M2 and the covariance of Clip-Cov / KL-Cov are computed per forward pass, i.e.
per micro-batch (``docs/LOSSES.md``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from learner.losses import LossInputs, compute_loss
from learner.model import completion_logprobs
from learner.parallel import autocast, sync_gradients
from protocol.config import Config

log = logging.getLogger("podsrl.learner")

# prompts/completions/behav: lists of 1-D tensors; advantages: (B,) tensor; optional index: (B,) global
# row ids in the batch (learner.train.shard; default rank + world * i, the layout shard uses); the step
# adds prox (lists of 1-D tensors) when it has more than one optimizer step
Shard = dict[str, Any]
ROW_KEYS = ("prompts", "completions", "behav", "prox", "masks")  # per-row lists _take selects from (masks: episodes)


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate of the update that makes version ``step + 1`` (a function of the version
    only, so a resumed run continues the schedule; every optimizer step of the update uses it). Linear
    warm-up reaches ``lr`` at step ``warmup_steps - 1``; cosine then decays to ``lr * min_lr_ratio`` at
    ``run.steps``."""
    lc = cfg.learner
    if step < lc.warmup_steps:
        return lc.lr * (step + 1) / lc.warmup_steps
    if lc.lr_schedule == "constant":
        return lc.lr
    progress = min(1.0, (step - lc.warmup_steps) / max(1, cfg.run.steps - lc.warmup_steps))
    low = lc.lr * lc.min_lr_ratio
    return low + (lc.lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def minibatch_rows(total: int, minibatches: int, seed: tuple[int, int, int]) -> list[list[int]]:
    """Global row ids of each minibatch of one pass over a batch of ``total`` rows: a permutation drawn
    from ``seed`` = (run.seed, version, epoch), cut into ``minibatches`` contiguous parts whose sizes
    differ by at most one (the first ``total % minibatches`` one row larger). One minibatch: every row,
    in order (no permutation is drawn, so the default update is the one before minibatches existed)."""
    if minibatches < 1 or minibatches > total:
        raise ValueError(f"cannot cut {total} rows into {minibatches} minibatches: need 1 <= minibatches <= rows")
    if minibatches == 1:
        return [list(range(total))]
    run_seed, version, epoch = seed
    perm = np.random.default_rng([run_seed % 2**32, version, epoch]).permutation(total).tolist()
    size, extra = divmod(total, minibatches)
    bounds = [j * size + min(j, extra) for j in range(minibatches + 1)]
    return [perm[bounds[j] : bounds[j + 1]] for j in range(minibatches)]


def plan_micro_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Row indices per micro-batch: longest first, each within ``budget`` padded tokens (0 = one)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if budget <= 0:
        return [order] if order else []
    plan: list[list[int]] = []
    for i in order:  # descending, so a micro-batch's first row is its longest
        if plan and (len(plan[-1]) + 1) * lengths[plan[-1][0]] <= budget:
            plan[-1].append(i)
        else:
            plan.append([i])
    return plan


def even_out(plan: list[list[int]], count: int) -> list[tuple[list[int], float]]:
    """``plan`` as exactly ``count`` (rows, weight) micro-batches: halve the largest while one has two
    rows or more, then repeat the first with weight 0 (a pass that adds nothing to the gradient). An
    empty plan (this rank holds no row of the minibatch) is ``count`` weight-0 passes over row 0 of
    the caller's choosing."""
    if not plan:
        return [([0], 0.0)] * count
    parts = [list(p) for p in plan]
    while len(parts) < count and max(len(p) for p in parts) > 1:
        big = max(range(len(parts)), key=lambda j: len(parts[j]))
        half = len(parts[big]) // 2
        parts[big : big + 1] = [parts[big][:half], parts[big][half:]]
    return [(p, 1.0) for p in parts] + [(parts[0], 0.0)] * (count - len(parts))


def merge_metrics(parts: list[tuple[float, dict[str, float]]], shares: bool = True) -> dict[str, float]:
    """Metrics of several passes weighted by completion tokens: means stay means, maxima stay maxima,
    ``loss/tokens`` adds up, and so does ``loss/pg_loss`` where the parts are ``shares`` of one loss
    (micro-batches of a step); else it is averaged (the optimizer steps of an update)."""
    total = sum(w for w, _ in parts)
    out: dict[str, float] = {}
    for key in parts[0][1]:
        vals = [(w, m[key]) for w, m in parts]
        if key == "loss/tokens" or (key == "loss/pg_loss" and shares):
            out[key] = sum(v for _, v in vals)
        elif key == "loss/pg_loss":
            out[key] = sum(v for _, v in vals) / len(vals)
        elif key == "loss/ratio_max":
            out[key] = max(v for _, v in vals)
        elif total > 0:
            out[key] = sum(w * v for w, v in vals) / total
        else:
            out[key] = sum(v for _, v in vals) / len(vals)
    return out


def _take(data: Shard, rows: list[int]) -> Shard:
    out = {k: [data[k][i] for i in rows] for k in ROW_KEYS if data.get(k) is not None}
    return {**out, "advantages": data["advantages"][rows]}


def model_tokens(data: Shard) -> int:
    """Completion tokens that enter the loss: all of them, or an episode's model tokens only."""
    masks = data.get("masks")
    if masks is None:
        return sum(len(c) for c in data["completions"])
    return int(sum(float(m.sum()) for m in masks))


def episode_mask(mask: torch.Tensor, masks: list[torch.Tensor] | None) -> torch.Tensor:
    """The completion mask (B, T) times the episodes' loss masks (1 model token, 0 environment token), so
    that environment tokens never enter a loss, a KL, an entropy or a token count (DESIGN.md, "Groups").
    ``masks`` None: single-turn rows, the completion mask as it is."""
    if masks is None:
        return mask
    return mask * pad(masks, mask.shape[1]).to(mask.device, mask.dtype)


def pad(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.zeros((len(rows), width), dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def micro_batch_loss(
    net: torch.nn.Module,
    data: Shard,
    cfg: Config,
    totals: tuple[float, float],
    device: torch.device,
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """This micro-batch's share of the global loss (``totals``: global tokens, sequences), and its metrics;
    ``seed`` draws the tokens of Clip-Cov."""
    with autocast(net, cfg.model.dtype, device):
        bonus = cfg.learner.loss.entropy_coef
        logp, mask, entropy = completion_logprobs(
            net, data["prompts"], data["completions"], cfg.rollout.temperature, device, entropy_grad=bonus > 0
        )
    if data.get("masks") is not None:  # episodes: environment tokens out of the mask and the entropy
        mask = episode_mask(mask, data["masks"])
        logp, entropy = logp * mask, entropy * mask
    behav = pad(data["behav"], mask.shape[1]).to(device)
    # The proximal policy is the one at the start of the update: with one optimizer step that is the
    # current one, exactly logp without gradient; with several, the log-probs computed before the first.
    prox = pad(data["prox"], mask.shape[1]).to(device) if "prox" in data else logp.detach()
    inputs = LossInputs(
        logp=logp, behav_logp=behav, advantages=data["advantages"].to(device), mask=mask, prox_logp=prox
    )
    loss, metrics = compute_loss(
        inputs,
        cfg.learner.loss,
        max_len=cfg.max_completion_tokens,
        total_tokens=totals[0],
        total_seqs=totals[1],
        seed=seed,
    )
    if bonus > 0:  # this micro-batch's share of the batch's token-mean entropy, as the loss is
        loss = loss - bonus * entropy.sum() / max(totals[0], 1.0)
    metrics["loss/entropy"] = float(entropy.detach().sum() / mask.sum().clamp(min=1))
    return loss, metrics


def _pass_count(plan: list[list[int]]) -> int:
    """The most micro-batches any rank needs (every rank runs that many: they are collectives)."""
    count = torch.tensor([len(plan)])
    if dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count)


@torch.no_grad()
def proximal_logprobs(net: torch.nn.Module, data: Shard, cfg: Config, device: torch.device) -> list[torch.Tensor]:
    """Per row, the log-probs of its completion under the current weights (the proximal policy of the
    update about to start), micro-batched as training is, computed once and kept on the CPU."""
    lengths = [len(p) + len(c) for p, c in zip(data["prompts"], data["completions"], strict=True)]
    plan = plan_micro_batches(lengths, cfg.learner.micro_batch_tokens)
    out: list[torch.Tensor | None] = [None] * len(lengths)
    for rows, weight in even_out(plan, _pass_count(plan)):
        with autocast(net, cfg.model.dtype, device):
            logp, _, _ = completion_logprobs(
                net,
                [data["prompts"][i] for i in rows],
                [data["completions"][i] for i in rows],
                cfg.rollout.temperature,
                device,
            )
        if weight:
            for j, i in enumerate(rows):
                out[i] = logp[j, : len(data["completions"][i])].detach().float().cpu()
    assert all(t is not None for t in out)
    return [t for t in out if t is not None]


def optimizer_step(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    data: Shard,
    rows: list[int],
    cfg: Config,
    world: int,
    device: torch.device,
    seed: tuple[int, ...],
) -> dict[str, float]:
    """Accumulate this rank's ``rows`` of the shard (its part of one minibatch; possibly none) in
    micro-batches and take one optimizer step, skipped when its gradient is not finite. ``seed``:
    (run.seed, version, epoch, minibatch, rank)."""
    part = _take(data, rows)
    lengths = [len(p) + len(c) for p, c in zip(part["prompts"], part["completions"], strict=True)]
    plan = plan_micro_batches(lengths, cfg.learner.micro_batch_tokens)
    totals = torch.tensor([model_tokens(part), len(rows)], dtype=torch.float64)
    if dist.is_initialized():  # global counts make every rank's loss a share of the whole minibatch's mean
        dist.all_reduce(totals)
    opt.zero_grad(set_to_none=True)
    parts, spare = [], _take(data, [0])
    micro = even_out(plan, _pass_count(plan))
    for j, (mb, weight) in enumerate(micro):
        with sync_gradients(net, sync=j == len(micro) - 1):
            source = _take(part, mb) if rows else spare  # none of the minibatch here: any row, weight 0
            mb_seed = hash((*seed, j)) % 2**63  # a distinct Clip-Cov draw per micro-batch, rank and step
            loss, metrics = micro_batch_loss(net, source, cfg, (float(totals[0]), float(totals[1])), device, mb_seed)
            # DDP and FSDP average gradients over ranks; the loss is already a share of the global mean.
            (loss * (world * weight)).backward()
        parts.append((metrics["loss/tokens"], metrics) if weight else (0.0, {k: 0.0 for k in metrics}))
    out = merge_metrics([p for p in parts if p[0] > 0] or parts[:1])
    # The total norm is global (DDP's gradients are all-reduced, FSDP2's norm is reduced over shards), so
    # every rank takes the same decision: a step whose gradient is not finite is skipped, never applied.
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.learner.grad_clip or math.inf)
    full = getattr(norm, "full_tensor", None)  # FSDP2: a DTensor
    grad_norm = float(full() if full is not None else norm)
    out["train/grad_norm"] = grad_norm
    skipped = not math.isfinite(grad_norm) or not all(math.isfinite(v) for v in out.values())
    if skipped:
        opt.zero_grad(set_to_none=True)
        log.warning(
            "an optimizer step of the update to version %d was skipped: its loss or gradient is not finite "
            "(grad norm %s)",
            seed[1] + 1,
            grad_norm,
        )
    else:
        opt.step()
    out["train/micro_batches"] = len(micro)
    out["train/skipped_nonfinite"] = float(skipped)
    return {k: v if math.isfinite(v) else 0.0 for k, v in out.items()}


def train_step(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    data: Shard,
    cfg: Config,
    world: int,
    device: torch.device,
    step: int,
) -> dict[str, float]:
    """The update that makes version ``step + 1`` from this rank's shard: ``ppo_epochs`` x ``minibatches``
    optimizer steps. Metrics: the steps' token-weighted means (``loss/pg_loss`` and ``train/grad_norm``
    their plain means, ``loss/tokens`` the shard's, ``train/micro_batches`` and ``train/skipped_nonfinite``
    their sums)."""
    lc = cfg.learner
    lr = lr_at(step, cfg)
    for group in opt.param_groups:
        group["lr"] = lr
    rank = dist.get_rank() if dist.is_initialized() else 0
    n = len(data["completions"])
    index = data.get("index")
    ids = [rank + world * i for i in range(n)] if index is None else [int(i) for i in index]
    total = torch.tensor([n])
    if dist.is_initialized():
        dist.all_reduce(total)
    if lc.ppo_epochs * lc.minibatches > 1:
        data = {**data, "prox": proximal_logprobs(net, data, cfg, device)}
    where = {g: i for i, g in enumerate(ids)}
    steps: list[dict[str, float]] = []
    for epoch in range(lc.ppo_epochs):
        for j, part in enumerate(minibatch_rows(int(total), lc.minibatches, (cfg.run.seed, step, epoch))):
            rows = [where[g] for g in part if g in where]
            steps.append(optimizer_step(net, opt, data, rows, cfg, world, device, (cfg.run.seed, step, epoch, j, rank)))
    out = merge_metrics([(m["loss/tokens"], m) for m in steps], shares=False)
    out["loss/tokens"] /= lc.ppo_epochs
    out["train/grad_norm"] = sum(m["train/grad_norm"] for m in steps) / len(steps)  # the same on every rank
    for key in ("train/micro_batches", "train/skipped_nonfinite"):
        out[key] = sum(m[key] for m in steps)
    return {**out, "train/lr": lr, "train/optimizer_steps": float(len(steps))}
