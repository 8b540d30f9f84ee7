"""One optimizer step on one process: the lr schedule, micro-batch plans, and accumulated gradients
that equal the one-big-batch gradients."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from launcher.tiny import build_tiny_model
from learner.model import load_model
from learner.parallel import cast, enable_grad_checkpointing
from learner.step import even_out, lr_at, minibatch_rows, plan_micro_batches, train_step
from protocol.config import Config, load_config

CPU = torch.device("cpu")


def ragged_rows(n: int, vocab: int, seed: int) -> dict:
    """``n`` rows of a shard with prompts of 2..12 and completions of 1..9 tokens."""
    g = torch.Generator().manual_seed(seed)
    plen = torch.randint(2, 13, (n,), generator=g).tolist()
    clen = torch.randint(1, 10, (n,), generator=g).tolist()
    return {
        "prompts": [torch.randint(4, vocab, (p,), generator=g) for p in plen],
        "completions": [torch.randint(4, vocab, (c,), generator=g) for c in clen],
        "behav": [-0.5 - 3 * torch.rand(c, generator=g) for c in clen],
        "advantages": torch.randn(n, generator=g),
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(load_config(None, []), path, alphabet="abcdefghijkl:")
    return path


def config(path, *overrides: str):
    return load_config(None, [f"model.path={path}", "model.init=pretrained", "learner.grad_clip=0", *overrides])


def grads_after_step(path, data: dict, *overrides: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    torch.manual_seed(0)
    cfg = config(path, *overrides)
    model = load_model(path, CPU)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learner.lr)
    metrics = train_step(model, opt, copy.deepcopy(data), cfg, 1, CPU, 0)
    return {n: grad(p).clone() for n, p in model.named_parameters()}, metrics


def grad(p: torch.Tensor) -> torch.Tensor:
    """The gradient of a parameter that took part in the step."""
    assert p.grad is not None
    return p.grad


def test_lr_at_exact_values():
    def at(step: int, *o: str) -> float:
        return lr_at(step, load_config(None, ["learner.lr=1.0", "run.steps=10", *o]))

    assert [at(s) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert [at(s, "learner.warmup_steps=4") for s in (0, 1, 2, 3, 4, 9)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = ("learner.lr_schedule=cosine", "learner.min_lr_ratio=0.1")
    assert at(0, *cos) == 1.0 and at(10, *cos) == pytest.approx(0.1, abs=1e-15)
    assert at(5, *cos) == pytest.approx(0.55, abs=1e-15)  # midpoint: halfway between lr and lr*min_lr_ratio
    assert at(20, *cos) == pytest.approx(0.1, abs=1e-15)  # past run.steps (a resumed, extended run): stays at the floor
    warm = (*cos, "learner.warmup_steps=2")
    assert [at(s, *warm) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert at(6, *warm) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), abs=1e-15)


def test_micro_batch_plan_respects_the_budget_and_covers_every_row_once():
    lengths = [5, 30, 7, 7, 2, 12, 9, 1]
    plan = plan_micro_batches(lengths, budget=20)
    assert sorted(i for mb in plan for i in mb) == list(range(len(lengths)))
    assert [1] in plan  # the row longer than the budget is alone
    for mb in plan:
        assert len(mb) == 1 or len(mb) * max(lengths[i] for i in mb) <= 20
    assert plan_micro_batches(lengths, 0) == [sorted(range(8), key=lambda i: -lengths[i])]
    assert len(plan_micro_batches(lengths, 10_000)) == 1


def test_even_out_splits_then_pads_with_zero_weight_passes():
    out = even_out([[0, 1, 2, 3], [4]], 3)
    assert [rows for rows, _ in out] == [[0, 1], [2, 3], [4]] and all(w == 1.0 for _, w in out)
    out = even_out([[0]], 3)
    assert out == [([0], 1.0), ([0], 0.0), ([0], 0.0)]
    assert even_out([], 2) == [([0], 0.0), ([0], 0.0)]  # a rank holding no row of a minibatch


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "constant"])
def test_micro_batched_gradients_equal_one_batch_gradients(tiny, aggregation):
    data = ragged_rows(9, vocab=17, seed=1)
    agg = f"learner.loss.aggregation={aggregation}"
    whole, m_whole = grads_after_step(tiny, data, agg, "learner.micro_batch_tokens=0")
    micro, m_micro = grads_after_step(tiny, data, agg, "learner.micro_batch_tokens=24")
    assert m_whole["train/micro_batches"] == 1 and m_micro["train/micro_batches"] >= 4
    worst = max(float((whole[n] - micro[n]).abs().max()) for n in whole)
    assert worst < 1e-6, f"largest gradient difference {worst:.2e}"
    assert any(float(g.abs().max()) > 1e-3 for g in whole.values())  # not vacuous: real gradients
    for key in ("loss/pg_loss", "loss/entropy", "loss/tokens", "loss/ratio_max", "loss/ratio_mean"):
        assert m_micro[key] == pytest.approx(m_whole[key], rel=1e-5, abs=1e-7), key


def test_gradient_checkpointing_keeps_the_gradients(tiny):
    data = ragged_rows(5, vocab=17, seed=2)
    plain, _ = grads_after_step(tiny, data)
    torch.manual_seed(0)
    cfg = config(tiny, "learner.grad_checkpointing=true")
    model = load_model(tiny, CPU)
    enable_grad_checkpointing(model)
    train_step(model, torch.optim.AdamW(model.parameters()), copy.deepcopy(data), cfg, 1, CPU, 0)
    assert max(float((plain[n] - grad(p)).abs().max()) for n, p in model.named_parameters()) < 1e-6


def test_bfloat16_computes_in_bf16_and_publishes_bf16(tiny):
    data = ragged_rows(6, vocab=17, seed=3)
    g32, m32 = grads_after_step(tiny, data)
    g16, m16 = grads_after_step(tiny, data, "model.dtype=bfloat16")
    assert all(g.dtype == torch.float32 for g in g16.values())  # fp32 master weights and gradients
    assert m16["loss/pg_loss"] == pytest.approx(m32["loss/pg_loss"], abs=2e-2)
    assert m16["loss/pg_loss"] != m32["loss/pg_loss"]  # the forward really ran in bf16
    state = cast(load_model(tiny, CPU).state_dict(), "bfloat16")
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


@pytest.mark.parametrize("loss", ["grpo_is", "decoupled_ppo", "tis", "m2po", "rec_oneside"])
def test_an_absurd_behaviour_logprob_cannot_poison_the_weights(tiny, loss):
    """A row whose behaviour log-prob is -1000 (issue 7): the ratio is clamped, the step stays finite."""
    data = ragged_rows(6, vocab=17, seed=3)
    data["behav"][0] = torch.full_like(data["behav"][0], -1000.0)
    data["advantages"][0] = -1.0  # a negative advantage is the unbounded side of PPO-clip
    cfg = config(tiny, f"learner.loss.type={loss}", "learner.grad_clip=1.0")
    model = load_model(tiny, CPU)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learner.lr)
    metrics = train_step(model, opt, data, cfg, 1, CPU, 0)
    assert metrics["train/skipped_nonfinite"] == 0.0, "the clamped ratio keeps the step itself finite"
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_a_step_with_a_non_finite_gradient_is_skipped_and_counted(tiny):
    cfg = config(tiny)
    model = load_model(tiny, CPU)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learner.lr)
    data = ragged_rows(4, vocab=17, seed=4)
    data["advantages"][1] = float("inf")  # what a broken batch statistic would hand the loss
    metrics = train_step(model, opt, data, cfg, 1, CPU, 0)
    assert metrics["train/skipped_nonfinite"] == 1.0
    assert all(math.isfinite(v) for v in metrics.values())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "a skipped step changed weights"
    metrics = train_step(model, opt, ragged_rows(4, vocab=17, seed=5), cfg, 1, CPU, 1)
    assert metrics["train/skipped_nonfinite"] == 0.0
    assert not all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_the_entropy_bonus_raises_entropy_and_is_off_by_default(tiny):
    """With zero advantages the policy loss has no gradient; the bonus alone then moves the policy
    towards higher entropy, and micro-batching leaves its gradient unchanged (it is a token mean)."""
    data = ragged_rows(12, 15, seed=3)
    data["advantages"] = torch.zeros(12)
    off, _ = grads_after_step(tiny, data)
    assert all(float(g.abs().max()) == 0.0 for g in off.values()), "no advantage, no bonus: no gradient"
    one, _ = grads_after_step(tiny, data, "learner.loss.entropy_coef=0.1", "learner.micro_batch_tokens=0")
    split, _ = grads_after_step(tiny, data, "learner.loss.entropy_coef=0.1", "learner.micro_batch_tokens=40")
    assert max(float(g.abs().max()) for g in one.values()) > 0
    for name in one:
        torch.testing.assert_close(split[name], one[name], atol=1e-6, rtol=1e-5)
    cfg = config(tiny, "learner.loss.entropy_coef=0.1", "learner.lr=1e-2")
    torch.manual_seed(0)
    model = load_model(tiny, CPU)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learner.lr)
    before = train_step(model, opt, copy.deepcopy(data), cfg, 1, CPU, 0)["loss/entropy"]
    for step in range(1, 4):
        after = train_step(model, opt, copy.deepcopy(data), cfg, 1, CPU, step)["loss/entropy"]
    assert after > before


# ----------------------------------------------------------------------------------------------
# PPO epochs and minibatches
# ----------------------------------------------------------------------------------------------


def test_minibatch_rows_partition_each_pass_and_are_seeded():
    assert minibatch_rows(7, 1, (0, 3, 1)) == [list(range(7))]  # one minibatch: every row, in order
    parts = minibatch_rows(7, 3, (0, 3, 1))
    assert sorted(i for p in parts for i in p) == list(range(7)) and [len(p) for p in parts] == [3, 2, 2]
    assert minibatch_rows(7, 3, (0, 3, 1)) == parts  # the same seed, the same cut (every rank agrees)
    others = [minibatch_rows(7, 3, s) for s in [(1, 3, 1), (0, 4, 1), (0, 3, 0)]]
    assert all(o != parts for o in others)  # run seed, version and epoch each change the shuffle
    assert minibatch_rows(4, 4, (0, 0, 0)) != [[0], [1], [2], [3]] or minibatch_rows(4, 4, (0, 0, 1)) != [
        [0],
        [1],
        [2],
        [3],
    ]
    with pytest.raises(ValueError, match="cannot cut 3 rows into 4 minibatches"):
        minibatch_rows(3, 4, (0, 0, 0))


def test_config_bounds_minibatches_by_the_rows_per_batch():
    assert load_config(None, ["learner.minibatches=32"]).learner.minibatches == 32  # 8 groups x keep 4
    with pytest.raises(ValueError, match=r"learner.minibatches=33 > 32 rows per batch"):
        load_config(None, ["learner.minibatches=33"])
    with pytest.raises(ValueError, match="ppo_epochs"):
        load_config(None, ["learner.ppo_epochs=0"])


class BiasPolicy(torch.nn.Module):
    """The tiniest policy: the same logits ``w`` at every position, whatever the input, so that
    log pi(k) = w_k - logsumexp(w) and d log pi(k) / dw = onehot(k) - softmax(w)."""

    def __init__(self, w: list[float]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool) -> SimpleNamespace:
        return SimpleNamespace(logits=self.w.expand(*input_ids.shape, -1))


def reference_update(w, rows, cfg, version, prox_each_epoch=False):
    """The update by hand, in Python floats: ``ppo_epochs`` passes over ``minibatch_rows``' cuts, each a
    plain SGD step on the token-mean PPO-clip loss, with the proximal log-probs (decoupled_ppo) those of the
    weights at the update's start (or, ``prox_each_epoch``, at each pass's: the mistake to tell apart).
    Returns the final weights and how many tokens were clipped."""
    lc, lo = cfg.learner, cfg.learner.loss

    def logp(w, k):
        return w[k] - math.log(sum(math.exp(x) for x in w))

    prox = [[logp(w, k) for k in comp] for _, comp, _, _ in rows]
    clipped = 0
    for epoch in range(lc.ppo_epochs):
        if prox_each_epoch:
            prox = [[logp(w, k) for k in comp] for _, comp, _, _ in rows]
        for part in minibatch_rows(len(rows), lc.minibatches, (cfg.run.seed, version, epoch)):
            n = sum(len(rows[i][1]) for i in part)
            probs = [math.exp(x) / sum(math.exp(y) for y in w) for x in w]
            grad = [0.0] * len(w)
            for i in part:
                _, comp, behav, a = rows[i]
                for t, k in enumerate(comp):
                    if lo.type == "decoupled_ppo":
                        anchor, weight = prox[i][t], min(math.exp(prox[i][t] - behav[t]), lo.behav_cap)
                    else:  # grpo_is: the ratio against the behaviour policy, no weight
                        anchor, weight = behav[t], 1.0
                    r = math.exp(logp(w, k) - anchor)
                    if (a > 0 and r > 1 + lo.clip_high) or (a < 0 and r < 1 - lo.clip_low):
                        clipped += 1
                        continue  # the clipped side: no gradient
                    dloss_dlogp = -weight * a * r / n
                    for j in range(len(w)):
                        grad[j] += dloss_dlogp * ((j == k) - probs[j])
            w = [x - lc.lr * g for x, g in zip(w, grad, strict=True)]
    return w, clipped


ROWS = [  # (prompt, completion, behaviour log-probs, advantage) for the linear policy's tests
    ([0], [1, 2], [-1.0, -1.3], 1.0),
    ([0], [2], [-0.9], -1.0),
    ([0], [0, 0, 1], [-1.2, -0.8, -1.1], 0.5),
    ([0], [1], [-1.5], -0.7),
    ([0], [2, 1], [-1.0, -1.0], 1.2),
]
W0 = [0.1, -0.2, 0.3]


def linear_update(loss: str, epochs: int, minibatches: int) -> tuple[list[float], dict[str, float], Config]:
    """One update of BiasPolicy(W0) on ROWS by train_step (plain SGD, lr 5, version 7): the weights, the
    metrics and the config."""
    cfg = load_config(
        None,
        [
            f"learner.ppo_epochs={epochs}",
            f"learner.minibatches={minibatches}",
            "learner.lr=5.0",
            "learner.grad_clip=0",
            "learner.micro_batch_tokens=0",
            f"learner.loss.type={loss}",
            "run.seed=3",
        ],
    )
    data = {
        "prompts": [torch.tensor(p) for p, _, _, _ in ROWS],
        "completions": [torch.tensor(c) for _, c, _, _ in ROWS],
        "behav": [torch.tensor(b, dtype=torch.float64) for _, _, b, _ in ROWS],
        "advantages": torch.tensor([a for *_, a in ROWS], dtype=torch.float64),
    }
    net = BiasPolicy(W0)
    metrics = train_step(net, torch.optim.SGD(net.parameters(), lr=1.0), data, cfg, 1, CPU, 7)
    return net.w.detach().tolist(), metrics, cfg


@pytest.mark.parametrize("loss", ["decoupled_ppo", "grpo_is"])
def test_two_epoch_update_matches_the_hand_computed_one(loss):
    """Two epochs x two minibatches on a linear policy: four SGD steps, the proximal policy fixed at the
    start, every step's ratio, clip and weight checked against the reference, to float32 rounding (the
    learner takes log-probs in fp32)."""
    got, metrics, cfg = linear_update(loss, 2, 2)
    expected, clipped = reference_update(W0, ROWS, cfg, version=7)
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-5, (got, expected)
    assert clipped > 0, "the later steps should move some ratio past a clip edge"
    assert metrics["train/optimizer_steps"] == 4 and metrics["loss/tokens"] == 9
    assert metrics["loss/prox_drift"] > 0  # later steps train away from the proximal policy
    one = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"ppo_epochs": 1, "minibatches": 1})})
    one_step, _ = reference_update(W0, ROWS, one, 7)
    assert max(abs(a - b) for a, b in zip(one_step, expected, strict=True)) > 1e-2  # not vacuous
    if loss == "decoupled_ppo":
        moving, _ = reference_update(W0, ROWS, cfg, 7, prox_each_epoch=True)
        assert max(abs(a - b) for a, b in zip(moving, expected, strict=True)) > 1e-3


@pytest.mark.parametrize(("epochs", "minibatches"), [(1, 1), (1, 5), (3, 1)])
def test_other_update_shapes_match_the_hand_computed_ones(epochs, minibatches):
    """One step (the default: no proximal pass, prox = the current policy), one row per minibatch, and
    three full-batch epochs."""
    got, metrics, cfg = linear_update("decoupled_ppo", epochs, minibatches)
    expected, _ = reference_update(W0, ROWS, cfg, version=7)
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-5, (got, expected)
    assert metrics["train/optimizer_steps"] == epochs * minibatches
    assert (metrics["loss/prox_drift"] == 0) == (epochs * minibatches == 1)
