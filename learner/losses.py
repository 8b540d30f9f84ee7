"""Policy-gradient losses for asynchronous off-policy RL on language models.
docs/LOSSES.md repeats the rest of this docstring word for word (tests/test_docs.py checks).

Every loss is a pure function ``(LossInputs, LossSettings) -> (per-token loss (B, T), metrics)``;
``LossSettings`` is the run config's ``[learner.loss]``, whose knobs, defaults and bounds are listed
in docs/CONFIG.md. Notation: ``logp`` is log π_θ of the sampled tokens under the policy being trained, ``behav_logp``
the log-probs reported by the rollout engine (behaviour policy μ, possibly several versions stale
and computed by a different kernel), ``prox_logp`` the log-probs of a proximal policy π_prox that the
learner recomputes at the start of the step, and ``A`` the (group-relative) advantage broadcast to
(B, T). All ratios are formed in log space and then exponentiated; anything not differentiated is
detached. Positions where ``mask == 0`` are zeroed before any arithmetic, so padding may hold
garbage (even ±inf) without producing NaNs.

**grpo_is** — PPO-clip (Schulman et al. 2017, "Proximal Policy Optimization Algorithms") with the
importance ratio taken directly against the behaviour policy, as in GRPO (Shao et al. 2024,
"DeepSeekMath"): r = π_θ/μ, loss = −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A). The asymmetric
ε_high > ε_low is DAPO's clip-higher (Yu et al. 2025, "DAPO").

**decoupled_ppo** — decoupled PPO (Hilton et al. 2022, "Batch size-invariance for policy
optimization"; used for asynchronous RL by AReaL, Fu et al. 2025): the trust region is centred on
the proximal policy, r = π_θ/π_prox, and the staleness correction is a separate, detached,
capped weight w = min(π_prox/μ, behav_cap): loss = −w·min(r·A, clip(r, 1−ε_low, 1+ε_high)·A).

**tis** — truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly
brings you off-policy RL training"; cf. V-trace truncation in Espeholt et al. 2018, "IMPALA"):
with π_old = π_prox if given, else the current policy detached, w = min(π_old/μ, C) corrects the
rollout/learner mismatch and PPO-clip runs on r = π_θ/π_old: loss = −w·min(r·A, clip(r)·A).

**m2po** — second-moment trust region (Zheng et al. 2025, "Prosperity before Collapse: How Far
Can Off-Policy RL Reach with Stale Data on LLMs?"): with d = log(π_θ/μ), tokens are masked
greedily in decreasing d² until the mean d² (M2) of the remaining tokens of the batch is ≤ τ; the
rest get the unclipped importance-weighted gradient, loss = −(π_θ/μ)·A. M2 is computed over the
tokens of the call (the local micro-batch), not across ranks. In the learner one call is one
micro-batch (``learner.micro_batch_tokens``), so with several micro-batches per rank each masks
against its own M2: the only loss whose update is not independent of the micro-batch split (set
``learner.micro_batch_tokens=0`` for M2 over each rank's whole shard).

**rec_oneside** — REC with one-sided clipping (Yao et al. 2025, "Group-relative REINFORCE is
secretly an off-policy algorithm"): plain REINFORCE, loss = −A·log π_θ, with no importance weight
in the gradient; a token is dropped when its ratio r = π_θ/μ has already moved past the clip edge
in the direction the advantage pushes (A > 0 and r > 1+ε_high, or A < 0 and r < 1−ε_low).

**Aggregation** — ``token_mean`` divides the masked sum by the token count (DAPO);
``seq_mean_token_mean`` averages tokens within each sequence and then sequences (GRPO);
``constant`` divides by total_seqs·max_len (Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like
Training: A Critical Perspective"), which removes the length bias. ``total_tokens``/``total_seqs``
default to the local counts; a data-parallel caller passes the *global* counts (all-reduced over
ranks and gradient-accumulation micro-batches) so that summing gradients gives the loss of the
whole batch.

**Covariance remedies** (``cov_remedy``; Cui et al. 2025, "The Entropy Mechanism of Reinforcement
Learning for Reasoning Language Models") act on the per-token loss of any loss above. Per completion
token, Cov = (log π_θ − mean log π_θ)·(A − mean A), both means over the completion tokens of the call
(log π_θ detached): tokens of high covariance are those whose update lowers the entropy most.
**clip_cov** detaches the gradient of ⌊clip_cov_ratio·N⌋ tokens (at least one) drawn uniformly, by a
seeded generator, from those with clip_cov_low < Cov < clip_cov_high (their loss value stays; fewer
tokens in the band: all of them). **kl_cov** adds kl_cov_coef·|log π_θ − log μ| (the paper's
|log-ratio| form, against the behaviour policy, which is the paper's π_old in its synchronous setting)
to the ⌊kl_cov_ratio·N⌋ tokens (at least one) of largest Cov (ties broken by position). Like M2, the
covariance and N are those of the call (one micro-batch in the learner). The paper pairs them with an
unclipped −r·A; here they compose with the clip of the chosen loss.

**Diagnostics** — over completion tokens, with r_b = π_θ/μ: mean and max ratio, normalised
effective sample size (Σr_b)²/(N·Σr_b²) ∈ (0, 1], M2 = mean (log r_b)², the k3 estimator of
KL(μ‖π_θ) = mean(r_b − 1 − log r_b), and ``entropy_proxy`` = mean(−log π_θ), the NLL of the sampled
tokens, which estimates the policy entropy only under on-policy sampling. Given ``prox_logp``,
``prox_drift`` = mean |log π_θ − log π_prox|: 0 on an update's first optimizer step, how far later
ones (``learner.ppo_epochs``, ``learner.minibatches``) have moved from the proximal policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from protocol.config import LossSettings

__all__ = [
    "AGGREGATIONS",
    "LOSSES",
    "REMEDIES",
    "LossFn",
    "LossInputs",
    "aggregate",
    "build_loss",
    "compute_loss",
    "diagnostics",
]

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "constant")  # aggregate()'s modes; learner.loss.aggregation
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LossInputs:
    logp: Tensor  # (B, T) current policy log-prob of the taken tokens, requires grad
    behav_logp: Tensor  # (B, T) rollout engine log-probs (behaviour policy), no grad
    advantages: Tensor  # (B,) per sequence, or (B, T) per token
    mask: Tensor  # (B, T) float {0,1}: completion tokens
    prox_logp: Tensor | None = None  # (B, T) proximal policy log-probs recomputed at step start (no grad)

    def __post_init__(self) -> None:
        shape = tuple(self.logp.shape)
        if len(shape) != 2:
            raise ValueError(f"logp must have shape (B, T), got {shape}")
        for name in ("behav_logp", "mask", "prox_logp"):
            x = getattr(self, name)
            if x is not None and tuple(x.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {shape} (the shape of logp)")
        if tuple(self.advantages.shape) not in (shape[:1], shape):
            got = tuple(self.advantages.shape)
            raise ValueError(f"advantages has shape {got}, expected {shape[:1]} or {shape}")
        if not self.mask.is_floating_point():
            raise ValueError(f"mask must be a floating-point tensor of 0/1, got dtype {self.mask.dtype}")


LossFn = Callable[[LossInputs, LossSettings], tuple[Tensor, dict[str, Tensor]]]


MAX_LOG_RATIO = 20.0  # |log(π/μ)| beyond this (a ratio of 5e8) is clamped: one absurd behaviour log-prob
# must not turn the loss into inf/NaN; such tokens get no gradient through the ratio


def _ratio(log_r: Tensor) -> Tensor:
    return torch.exp(log_r.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))


def _prep(inp: LossInputs) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
    """(logp, behav, prox, A, valid): upcast from 16-bit, A broadcast to (B, T), padding zeroed."""
    valid = inp.mask > 0
    dtype = torch.float32 if inp.logp.dtype in _LOW_PRECISION else inp.logp.dtype

    def clean(x: Tensor) -> Tensor:
        return torch.where(valid, x.to(dtype), 0.0)

    adv = inp.advantages.detach()
    adv = adv[:, None].expand_as(inp.logp) if adv.dim() == 1 else adv
    prox = None if inp.prox_logp is None else clean(inp.prox_logp.detach())
    return clean(inp.logp), clean(inp.behav_logp.detach()), prox, clean(adv), valid


def _frac(flags: Tensor, valid: Tensor, dtype: torch.dtype) -> Tensor:
    return (flags & valid).sum().to(dtype) / valid.sum().clamp(min=1).to(dtype)


def _ppo_clip(logp: Tensor, old: Tensor, adv: Tensor, cfg: LossSettings) -> tuple[Tensor, Tensor, Tensor]:
    """PPO-clip (Schulman et al. 2017): −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A), r = exp(logp − old)."""
    r = _ratio(logp - old)
    tok = -torch.minimum(r * adv, r.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high) * adv)
    rd = r.detach()  # the clip is active (zero gradient) only on the side the advantage pushes towards
    low = (adv < 0) & (rd < 1.0 - cfg.clip_low)
    high = (adv > 0) & (rd > 1.0 + cfg.clip_high)
    return tok, low, high


def _clip_metrics(lo: Tensor, hi: Tensor, drop: Tensor, valid: Tensor, dt: torch.dtype) -> dict[str, Tensor]:
    return {
        "loss/clipfrac_low": _frac(lo, valid, dt),
        "loss/clipfrac_high": _frac(hi, valid, dt),
        "loss/masked_frac": _frac(drop, valid, dt),
    }


def _capped_weight(log_w: Tensor, cap: float, valid: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """min(exp(log_w), cap), taken in log space so it cannot overflow; detached."""
    w = torch.exp(log_w.clamp(max=math.log(cap))).detach()
    return w, {
        "loss/is_weight_mean": (w * valid).sum() / valid.sum().clamp(min=1),
        "loss/is_capped_frac": _frac(log_w >= math.log(cap), valid, w.dtype),
    }


def grpo_is(inp: LossInputs, cfg: LossSettings) -> tuple[Tensor, dict[str, Tensor]]:
    logp, behav, _, adv, valid = _prep(inp)
    # GRPO / PPO-clip against the behaviour policy (Shao et al. 2024; Schulman et al. 2017; DAPO clip-higher)
    tok, low, high = _ppo_clip(logp, behav, adv, cfg)
    return tok, _clip_metrics(low, high, torch.zeros_like(valid), valid, tok.dtype)


def decoupled_ppo(inp: LossInputs, cfg: LossSettings) -> tuple[Tensor, dict[str, Tensor]]:
    if inp.prox_logp is None:
        raise ValueError("decoupled_ppo needs prox_logp (proximal log-probs recomputed by the learner)")
    logp, behav, prox, adv, valid = _prep(inp)
    assert prox is not None
    # Hilton et al. 2022 / AReaL: w = min(π_prox/μ, behav_cap) (detached), r = π_θ/π_prox inside the clip
    w, wm = _capped_weight(prox - behav, cfg.behav_cap, valid)
    tok, low, high = _ppo_clip(logp, prox, adv, cfg)
    return w * tok, {**_clip_metrics(low, high, torch.zeros_like(valid), valid, tok.dtype), **wm}


def tis(inp: LossInputs, cfg: LossSettings) -> tuple[Tensor, dict[str, Tensor]]:
    logp, behav, prox, adv, valid = _prep(inp)
    old = prox if prox is not None else logp.detach()
    # Yao et al. 2025 (TIS) / IMPALA truncation: w = min(π_old/μ, C) (detached), PPO-clip on r = π_θ/π_old
    w, wm = _capped_weight(old - behav, cfg.tis_cap, valid)
    tok, low, high = _ppo_clip(logp, old, adv, cfg)
    return w * tok, {**_clip_metrics(low, high, torch.zeros_like(valid), valid, tok.dtype), **wm}


def _m2_keep(d2: Tensor, valid: Tensor, tau: float) -> Tensor:
    """Keep-mask of M2PO: drop the largest d² one by one until mean(d² of the rest) <= tau."""
    vals = d2[valid]
    n = vals.numel()
    if n == 0:
        return valid.clone()
    s, order = torch.sort(vals, descending=True, stable=True)
    suffix = torch.flip(torch.cumsum(torch.flip(s, [0]), 0), [0])  # suffix[k] = Σ of the n−k smallest
    ok = suffix / torch.arange(n, 0, -1, device=s.device, dtype=s.dtype) <= tau  # mean after dropping k
    k = torch.where(ok.any(), ok.int().argmax(), n)  # first k that satisfies the bound (n: drop all)
    drop = torch.empty_like(ok)
    drop[order] = torch.arange(n, device=s.device) < k
    keep = valid.clone()
    keep[valid] = ~drop
    return keep


def m2po(inp: LossInputs, cfg: LossSettings) -> tuple[Tensor, dict[str, Tensor]]:
    logp, behav, _, adv, valid = _prep(inp)
    # Zheng et al. 2025 (M2PO): d = log(π_θ/μ), M2 = mean d², greedy masking of the largest d² until M2 <= τ
    d2 = (logp.detach() - behav).square()
    keep = _m2_keep(d2, valid, cfg.m2_tau)
    log_r = torch.where(keep, logp - behav, 0.0)  # dropped tokens never reach exp(): no inf·0 in backward
    tok = torch.where(keep, -_ratio(log_r) * adv, 0.0)  # unclipped −r·A on the kept tokens
    dropped = valid & ~keep
    m = _clip_metrics(torch.zeros_like(valid), torch.zeros_like(valid), dropped, valid, tok.dtype)
    m["loss/m2"] = (d2 * valid).sum() / valid.sum().clamp(min=1)
    m["loss/m2_masked_frac"] = m["loss/masked_frac"]
    return tok, m


def rec_oneside(inp: LossInputs, cfg: LossSettings) -> tuple[Tensor, dict[str, Tensor]]:
    logp, behav, _, adv, valid = _prep(inp)
    # REC (Yao et al. 2025): REINFORCE −A·log π_θ with a one-sided clip mask on r = π_θ/μ, no IS weight
    r = _ratio(logp.detach() - behav)
    low = (adv < 0) & (r < 1.0 - cfg.clip_low)
    high = (adv > 0) & (r > 1.0 + cfg.clip_high)
    tok = torch.where(low | high, 0.0, -adv * logp)
    return tok, _clip_metrics(low, high, low | high, valid, tok.dtype)


LOSSES: dict[str, LossFn] = {
    "grpo_is": grpo_is,
    "decoupled_ppo": decoupled_ppo,
    "tis": tis,
    "m2po": m2po,
    "rec_oneside": rec_oneside,
}


Remedy = Callable[[Tensor, LossInputs, LossSettings, int], tuple[Tensor, dict[str, Tensor]]]


def _token_cov(inp: LossInputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(Cov, log π_θ, log μ, valid): Cov = (logp − mean logp)·(A − mean A) over the completion tokens
    (Cui et al. 2025), logp detached, −inf on padding (never chosen)."""
    logp, behav, _, adv, valid = _prep(inp)
    m = valid.to(logp.dtype)
    n = m.sum().clamp(min=1)
    lp = logp.detach()
    centred = (lp - (lp * m).sum() / n) * (adv - (adv * m).sum() / n)
    return torch.where(valid, centred, -math.inf), logp, behav, valid


def _count(ratio: float, valid: Tensor) -> int:
    n = int(valid.sum())
    return max(1, int(ratio * n)) if n else 0


def no_remedy(tok: Tensor, inp: LossInputs, cfg: LossSettings, seed: int) -> tuple[Tensor, dict[str, Tensor]]:
    return tok, {}


def clip_cov(tok: Tensor, inp: LossInputs, cfg: LossSettings, seed: int) -> tuple[Tensor, dict[str, Tensor]]:
    # Cui et al. 2025, Clip-Cov: detach a random clip_cov_ratio of the tokens with Cov in the band
    cov, _, _, valid = _token_cov(inp)
    band = (valid & (cov > cfg.clip_cov_low) & (cov < cfg.clip_cov_high)).flatten().nonzero()[:, 0]
    draw = torch.randperm(band.numel(), generator=torch.Generator().manual_seed(seed))[
        : _count(cfg.clip_cov_ratio, valid)
    ]
    hit = torch.zeros(valid.numel(), dtype=torch.bool, device=valid.device)
    hit[band[draw.to(band.device)]] = True
    hit = hit.view_as(valid)
    return torch.where(hit, tok.detach(), tok), {
        "loss/clip_cov_frac": _frac(hit, valid, tok.dtype),
        "loss/cov_band_frac": band.numel() / valid.sum().clamp(min=1).to(tok.dtype),
    }


def kl_cov(tok: Tensor, inp: LossInputs, cfg: LossSettings, seed: int) -> tuple[Tensor, dict[str, Tensor]]:
    # Cui et al. 2025, KL-Cov: + coef·|log π_θ − log μ| on the kl_cov_ratio of tokens of largest Cov
    cov, logp, behav, valid = _token_cov(inp)
    order = torch.sort(cov.flatten(), descending=True, stable=True).indices[: _count(cfg.kl_cov_ratio, valid)]
    hit = torch.zeros(valid.numel(), dtype=torch.bool, device=valid.device)
    hit[order] = True
    hit = hit.view_as(valid) & valid
    penalty = torch.where(hit, cfg.kl_cov_coef * (logp - behav).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).abs(), 0.0)
    return tok + penalty, {
        "loss/kl_cov_frac": _frac(hit, valid, tok.dtype),
        "loss/kl_cov_penalty": penalty.detach().sum() / valid.sum().clamp(min=1).to(tok.dtype),
    }


REMEDIES: dict[str, Remedy] = {"none": no_remedy, "clip_cov": clip_cov, "kl_cov": kl_cov}


def build_loss(name: str) -> LossFn:
    """The loss registered as ``name``; ValueError listing the valid names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss type {name!r}; valid types: {sorted(LOSSES)}") from None


def aggregate(
    tok_loss: Tensor,
    mask: Tensor,
    mode: str,
    *,
    total_tokens: float | None = None,
    total_seqs: float | None = None,
    max_len: int | None = None,
) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar.

    ``total_tokens`` / ``total_seqs`` default to this call's counts (``mask.sum()`` clamped to >= 1,
    and B). Under data parallelism or gradient accumulation pass the global counts instead, so the
    per-rank losses sum (rather than average) to the loss of the whole batch.
    """
    if tok_loss.shape != mask.shape:
        raise ValueError(f"tok_loss has shape {tuple(tok_loss.shape)} but mask has {tuple(mask.shape)}")
    m = mask.to(tok_loss.dtype)
    masked = torch.where(m > 0, tok_loss * m, 0.0)
    n_seqs = float(tok_loss.shape[0]) if total_seqs is None else total_seqs
    if mode == "token_mean":  # DAPO token-level mean
        return masked.sum() / (m.sum().clamp(min=1) if total_tokens is None else total_tokens)
    if mode == "seq_mean_token_mean":  # GRPO: mean over tokens of a sequence, then over sequences
        return (masked.sum(-1) / m.sum(-1).clamp(min=1)).sum() / n_seqs
    if mode == "constant":  # Dr. GRPO (Liu et al. 2025): a constant normaliser, no length bias
        if max_len is None or max_len <= 0:
            raise ValueError(f"aggregation 'constant' (Dr. GRPO) needs a positive max_len, got {max_len!r}")
        return masked.sum() / (n_seqs * max_len)
    raise ValueError(f"unknown aggregation {mode!r}; valid: {list(AGGREGATIONS)}")


@torch.no_grad()
def _diagnostic_tensors(inp: LossInputs) -> dict[str, Tensor]:
    logp, behav, prox, _, valid = _prep(inp)
    m = valid.to(logp.dtype)
    n = m.sum()
    nc = n.clamp(min=1)
    log_r = (logp - behav).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)  # zero on padding
    r = torch.exp(log_r)
    if valid.any():
        top = torch.where(valid, log_r, -math.inf).max()
        s = torch.exp(log_r - top) * m  # ESS is scale-free: normalise by the max ratio to avoid overflow
        ess, r_max = s.sum().square() / (n * s.square().sum()), torch.exp(top)
    else:
        ess, r_max = n.new_zeros(()), n.new_zeros(())
    return {
        "loss/ratio_mean": (r * m).sum() / nc,
        "loss/ratio_max": r_max,
        "loss/ess": ess,  # normalised effective sample size (Σr)²/(N·Σr²)
        "loss/m2": (log_r.square() * m).sum() / nc,  # M2PO second moment of the log ratio
        "loss/kl_behav": ((r - 1.0 - log_r) * m).sum() / nc,  # k3 estimator of KL(μ‖π_θ), samples from μ
        "loss/entropy_proxy": (-logp * m).sum() / nc,  # sampled-token NLL (entropy only when on-policy)
        "loss/tokens": n,
        **({} if prox is None else {"loss/prox_drift": ((logp - prox).abs() * m).sum() / nc}),
    }


def _to_floats(metrics: dict[str, Tensor]) -> dict[str, float]:
    """One device sync for the whole dict."""
    if not metrics:
        return {}
    dtype = torch.promote_types(torch.float32, next(iter(metrics.values())).dtype)
    vals = torch.stack([v.detach().to(dtype).reshape(()) for v in metrics.values()]).tolist()
    return dict(zip(metrics, vals, strict=True))


def diagnostics(inp: LossInputs) -> dict[str, float]:
    return _to_floats(_diagnostic_tensors(inp))


def compute_loss(
    inp: LossInputs,
    cfg: LossSettings,
    *,
    max_len: int | None = None,
    total_tokens: float | None = None,
    total_seqs: float | None = None,
    seed: int = 0,
) -> tuple[Tensor, dict[str, float]]:
    """LOSSES[cfg.type] → REMEDIES[cfg.cov_remedy] → aggregate → scalar loss; metrics: the loss's, the
    remedy's, diagnostics(), ``loss/pg_loss``.

    ``cfg`` is the run config's ``[learner.loss]`` (its bounds are checked there); ``max_len``, the
    normaliser of ``constant`` aggregation (Dr. GRPO), is a derived size (``Config.max_new_tokens``);
    ``seed`` seeds the draw of Clip-Cov (the same seed, the same tokens).
    """
    tok, metrics = build_loss(cfg.type)(inp, cfg)
    tok, remedy = REMEDIES[cfg.cov_remedy](tok, inp, cfg, seed)
    metrics.update(remedy)
    loss = aggregate(tok, inp.mask, cfg.aggregation, total_tokens=total_tokens, total_seqs=total_seqs, max_len=max_len)
    out = {**_diagnostic_tensors(inp), **metrics, "loss/pg_loss": loss.detach()}
    return loss, _to_floats(out)
