"""One optimizer step: the learning-rate schedule, micro-batching by a token budget, accumulation.

``train_step`` is the whole update for one rank's shard of a batch. The loss normalisers (global
completion-token and sequence counts, summed over ranks) are fixed once before any forward pass, so
each micro-batch's loss is exactly its share of the mean over the whole batch and the accumulated
gradient equals the one big batch's (up to float summation order; ``tests/learner/test_step.py``).

Micro-batches (``learner.micro_batch_tokens``): rows are sorted by prompt+completion length,
longest first, and cut greedily so that rows x longest row of each micro-batch stays within the
budget; a row longer than the budget is a micro-batch of its own. Every rank runs the same number
of micro-batches (FSDP's per-layer all-gathers and DDP's all-reduce are collectives): a rank with
fewer splits its largest ones, and a rank with too few rows repeats one with weight 0.
m2po's second moment M2 is computed per forward pass, i.e. per micro-batch (``docs/LOSSES.md``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist

from learner.losses import LossInputs, compute_loss
from learner.model import completion_logprobs
from learner.parallel import autocast, sync_gradients
from protocol.config import Config

log = logging.getLogger("podsrl.learner")

Shard = dict[str, Any]  # prompts/completions/behav: lists of 1-D tensors; advantages: (B,) tensor


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate of the optimizer step that makes version ``step + 1`` (a function of the version
    only, so a resumed run continues the schedule). Linear warm-up reaches ``lr`` at step
    ``warmup_steps - 1``; cosine then decays to ``lr * min_lr_ratio`` at ``run.steps``."""
    lc = cfg.learner
    if step < lc.warmup_steps:
        return lc.lr * (step + 1) / lc.warmup_steps
    if lc.lr_schedule == "constant":
        return lc.lr
    progress = min(1.0, (step - lc.warmup_steps) / max(1, cfg.run.steps - lc.warmup_steps))
    low = lc.lr * lc.min_lr_ratio
    return low + (lc.lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


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
    rows or more, then repeat the first with weight 0 (a pass that adds nothing to the gradient)."""
    parts = [list(p) for p in plan]
    while len(parts) < count and max(len(p) for p in parts) > 1:
        big = max(range(len(parts)), key=lambda j: len(parts[j]))
        half = len(parts[big]) // 2
        parts[big : big + 1] = [parts[big][:half], parts[big][half:]]
    return [(p, 1.0) for p in parts] + [(parts[0], 0.0)] * (count - len(parts))


def merge_metrics(parts: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """Per-micro-batch metrics, weighted by completion tokens: means stay means, ``loss/pg_loss``
    (each micro-batch's share of the global loss) and ``loss/tokens`` add up, maxima stay maxima."""
    total = sum(w for w, _ in parts)
    out: dict[str, float] = {}
    for key in parts[0][1]:
        vals = [(w, m[key]) for w, m in parts]
        if key in ("loss/pg_loss", "loss/tokens"):
            out[key] = sum(v for _, v in vals)
        elif key == "loss/ratio_max":
            out[key] = max(v for _, v in vals)
        elif total > 0:
            out[key] = sum(w * v for w, v in vals) / total
        else:
            out[key] = sum(v for _, v in vals) / len(vals)
    return out


def _take(data: Shard, rows: list[int]) -> Shard:
    masks = data.get("masks")
    return {
        "prompts": [data["prompts"][i] for i in rows],
        "completions": [data["completions"][i] for i in rows],
        "behav": [data["behav"][i] for i in rows],
        "advantages": data["advantages"][rows],
        "masks": None if masks is None else [masks[i] for i in rows],
    }


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
    net: torch.nn.Module, data: Shard, cfg: Config, totals: tuple[float, float], device: torch.device
) -> tuple[torch.Tensor, dict[str, float]]:
    """This micro-batch's share of the global loss (``totals``: global tokens, sequences), and its metrics."""
    with autocast(net, cfg.model.dtype, device):
        bonus = cfg.learner.loss.entropy_coef
        logp, mask, entropy = completion_logprobs(
            net, data["prompts"], data["completions"], cfg.rollout.temperature, device, entropy_grad=bonus > 0
        )
    if data.get("masks") is not None:  # episodes: environment tokens out of the mask and the entropy
        mask = episode_mask(mask, data["masks"])
        logp, entropy = logp * mask, entropy * mask
    behav = pad(data["behav"], mask.shape[1]).to(device)
    # One optimizer step per batch: the proximal policy of decoupled PPO is the current one at step
    # start, i.e. exactly logp without gradient; no second forward pass is needed.
    inputs = LossInputs(
        logp=logp, behav_logp=behav, advantages=data["advantages"].to(device), mask=mask, prox_logp=logp.detach()
    )
    loss, metrics = compute_loss(
        inputs, cfg.learner.loss, max_len=cfg.max_completion_tokens, total_tokens=totals[0], total_seqs=totals[1]
    )
    if bonus > 0:  # this micro-batch's share of the batch's token-mean entropy, as the loss is
        loss = loss - bonus * entropy.sum() / max(totals[0], 1.0)
    metrics["loss/entropy"] = float(entropy.detach().sum() / mask.sum().clamp(min=1))
    return loss, metrics


def train_step(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    data: Shard,
    cfg: Config,
    world: int,
    device: torch.device,
    step: int,
) -> dict[str, float]:
    """Accumulate this rank's shard in micro-batches and take optimizer step ``step`` (= the version)."""
    lengths = [len(p) + len(c) for p, c in zip(data["prompts"], data["completions"], strict=True)]
    plan = plan_micro_batches(lengths, cfg.learner.micro_batch_tokens)
    totals = torch.tensor([model_tokens(data), len(lengths)], dtype=torch.float64)
    count = torch.tensor([len(plan)])
    if dist.is_initialized():  # global counts make every rank's loss a share of the whole batch's mean
        dist.all_reduce(totals)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    lr = lr_at(step, cfg)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    parts, micro = [], even_out(plan, int(count))
    for j, (rows, weight) in enumerate(micro):
        with sync_gradients(net, sync=j == len(micro) - 1):
            loss, metrics = micro_batch_loss(net, _take(data, rows), cfg, (float(totals[0]), float(totals[1])), device)
            # DDP and FSDP average gradients over ranks; the loss is already a share of the global mean.
            (loss * (world * weight)).backward()
        if weight:
            parts.append((metrics["loss/tokens"], metrics))
    out = merge_metrics(parts)
    # The total norm is global (DDP's gradients are all-reduced, FSDP2's norm is reduced over shards), so
    # every rank takes the same decision: a step whose gradient is not finite is skipped, never applied.
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.learner.grad_clip or math.inf)
    full = getattr(norm, "full_tensor", None)  # FSDP2: a DTensor
    grad_norm = float(full() if full is not None else norm)
    out["train/grad_norm"] = grad_norm
    skipped = not math.isfinite(grad_norm) or not all(math.isfinite(v) for v in out.values())
    if skipped:
        opt.zero_grad(set_to_none=True)
        log.warning("step %d skipped: its loss or gradient is not finite (grad norm %s)", step, grad_norm)
    else:
        opt.step()
    return {
        **{k: v if math.isfinite(v) else 0.0 for k, v in out.items()},
        "train/lr": lr,
        "train/micro_batches": len(micro),
        "train/skipped_nonfinite": float(skipped),
    }
