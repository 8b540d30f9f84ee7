"""DDP and FSDP2 on two real gloo ranks: the same losses, the full state dict rank 0 publishes, and
checkpoints that round-trip (also across strategies).

One spawn runs every scenario (process start-up and imports dominate on 2 cores); rank 0 saves what
it saw, and each test below checks one part of it.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port
from test_step import ragged_rows

from launcher.tiny import build_tiny_model
from learner.checkpoint import load_latest, save_checkpoint
from learner.model import load_model
from learner.parallel import full_model_state, full_optimizer_state, wrap
from learner.step import minibatch_rows, plan_micro_batches, train_step
from protocol.config import load_config

CPU = torch.device("cpu")
WORLD, ROWS, STEPS = 2, 7, 3
EPOCHS = ("learner.ppo_epochs=2", "learner.minibatches=3", "learner.loss.type=decoupled_ppo")  # 6 steps an update


def _shard(data: dict, rank: int) -> dict:
    rows = list(range(rank, ROWS, WORLD))  # as learner.train.shard: rows rank::world
    return {
        "prompts": [data["prompts"][i] for i in rows],
        "completions": [data["completions"][i] for i in rows],
        "behav": [data["behav"][i] for i in rows],
        "advantages": data["advantages"][rows],
        "index": torch.tensor(rows),
    }


def _worker(rank: int, port: int, model_dir: Path, tmp: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    batches = [ragged_rows(ROWS, vocab=17, seed=10 + s) for s in range(STEPS)]
    out: dict = {}

    def build(name: str, *overrides: str):
        cfg = load_config(
            None,
            [
                f"model.path={model_dir}",
                "model.init=pretrained",
                f"run.dir={tmp / name}",
                f"run.steps={STEPS}",
                *overrides,
            ],
        )
        torch.manual_seed(0)
        net = wrap(load_model(model_dir, CPU), cfg, CPU)
        return cfg, net, torch.optim.AdamW(net.parameters(), lr=cfg.learner.lr)

    def step(cfg, net, opt, version: int) -> dict[str, float]:
        m = train_step(net, opt, _shard(batches[version % STEPS], rank), cfg, WORLD, CPU, version)
        share = torch.tensor([m["loss/pg_loss"]], dtype=torch.float64)
        dist.all_reduce(share)  # each rank's loss is its share of the global mean
        return {**m, "loss": float(share)}

    def train(name: str, *overrides: str, steps: int = STEPS):
        cfg, net, opt = build(name, *overrides)
        t0 = time.perf_counter()
        out[name] = [step(cfg, net, opt, v) for v in range(steps)]
        out[f"{name}/seconds_per_step"] = (time.perf_counter() - t0) / steps
        return cfg, net, opt

    _, ddp_net, _ = train("ddp")
    train("ddp_micro", "learner.micro_batch_tokens=24")
    cfg, fsdp, opt = train(
        "fsdp", "learner.strategy=fsdp", "learner.micro_batch_tokens=24", "learner.grad_checkpointing=true"
    )
    for name, strategy in (
        ("ddp_epochs", ()),
        ("fsdp_epochs", ("learner.strategy=fsdp", "learner.micro_batch_tokens=24")),
    ):
        out[f"{name}/state"] = {k: v.clone() for k, v in full_model_state(train(name, *EPOCHS, *strategy)[1]).items()}
    train("ddp_bf16", "model.dtype=bfloat16", steps=1)
    train("fsdp_bf16", "learner.strategy=fsdp", "model.dtype=bfloat16", steps=1)
    out["plans"] = [
        len(plan_micro_batches([len(p) + len(c) for p, c in zip(s["prompts"], s["completions"], strict=True)], 24))
        for s in (_shard(batches[0], r) for r in range(WORLD))
    ]

    state = full_model_state(fsdp)  # what rank 0 publishes
    out["published"] = {k: v.clone() for k, v in state.items()}
    out["ddp_state"] = {k: v.clone() for k, v in full_model_state(ddp_net).items()}
    saved_opt = full_optimizer_state(fsdp, opt)
    save_checkpoint(cfg, fsdp, opt, STEPS, rank, state)
    resumed_cfg, resumed, resumed_opt = build("fsdp", "learner.strategy=fsdp")
    out["resumed_version"] = load_latest(resumed_cfg, resumed, resumed_opt, rank).version
    out["resumed"] = {k: v.clone() for k, v in full_model_state(resumed).items()}
    resumed_opt_state = full_optimizer_state(resumed, resumed_opt)
    if rank == 0:
        out["opt_equal"] = all(
            torch.equal(saved_opt["state"][k][s], resumed_opt_state["state"][k][s])
            for k in saved_opt["state"]
            for s in saved_opt["state"][k]
        )
    ddp_cfg, ddp, ddp_opt = build("fsdp")  # the same checkpoint loaded by DDP ranks
    out["ddp_version"] = load_latest(ddp_cfg, ddp, ddp_opt, rank).version
    out["ddp_resumed"] = {k: v.clone() for k, v in full_model_state(ddp).items()}  # DDP on CPU: aliases
    # The loss after one more step depends on the restored AdamW moments, not only on the weights.
    out["next"] = [
        [step(*run, v)["loss"] for v in (STEPS, STEPS + 1)][-1]
        for run in ((cfg, fsdp, opt), (resumed_cfg, resumed, resumed_opt), (ddp_cfg, ddp, ddp_opt))
    ]
    if rank == 0:
        torch.save(out, tmp / "out.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def seen(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("parallel")
    build_tiny_model(load_config(None, []), tmp / "model", alphabet="abcdefghijkl:")
    # forkserver: the heavy imports (~7 s of CPU) happen once, in a fresh process both ranks fork from.
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["torch", "transformers.models.llama.modeling_llama", "test_parallel"]
    )
    ctx = mp.start_processes(
        _worker, args=(free_port(), tmp / "model", tmp), nprocs=WORLD, join=False, start_method="forkserver"
    )
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks did not finish in 180 s (a collective out of step?)")
    seen = torch.load(tmp / "out.pt", weights_only=False)
    # The same three steps on one process, no process group, the whole batch at once: the reference.
    cfg = load_config(
        None,
        [f"model.path={tmp / 'model'}", "model.init=pretrained", f"run.steps={STEPS}", "learner.micro_batch_tokens=0"],
    )
    torch.manual_seed(0)
    model = load_model(tmp / "model", CPU)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learner.lr)
    batches = [ragged_rows(ROWS, vocab=17, seed=10 + s) for s in range(STEPS)]
    seen["one_process"] = [train_step(model, opt, b, cfg, 1, CPU, v) for v, b in enumerate(batches)]
    cfg = cfg.model_copy(
        update={"learner": load_config(None, list(EPOCHS)).learner.model_copy(update={"micro_batch_tokens": 0})}
    )
    torch.manual_seed(0)
    model = load_model(tmp / "model", CPU)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learner.lr)
    seen["one_process_epochs"] = [train_step(model, opt, b, cfg, 1, CPU, v) for v, b in enumerate(batches)]
    seen["one_process_epochs/state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return seen


def test_fsdp_and_micro_batched_ddp_match_ddp_losses(seen):
    assert seen["plans"][0] != seen["plans"][1], "the ranks should need different micro-batch counts"
    for name in ("ddp_micro", "fsdp"):
        for ref, got in zip(seen["ddp"], seen[name], strict=True):
            assert got["train/micro_batches"] > 1
            assert abs(got["loss"] - ref["loss"]) < 1e-4, (name, got["loss"], ref["loss"])
            assert abs(got["train/grad_norm"] - ref["train/grad_norm"]) < 1e-4, name
    assert len({round(m["loss"], 3) for m in seen["ddp"]}) == STEPS  # the losses do change from step to step


def test_two_ranks_match_one_process(seen):
    for ref, got in zip(seen["one_process"], seen["ddp"], strict=True):
        assert abs(got["loss"] - ref["loss/pg_loss"]) < 1e-5
        assert abs(got["train/grad_norm"] - ref["train/grad_norm"]) < 1e-5


def test_ppo_epochs_and_minibatches_on_two_ranks_match_one_process(seen):
    """Minibatches are cut from the whole batch, so two DDP or FSDP ranks take the optimizer steps that
    one process takes, ranks holding no row of a minibatch included (weight-0 passes)."""
    cuts = [minibatch_rows(ROWS, 3, (0, v, e)) for v in range(STEPS) for e in range(2)]
    assert any(len({i % WORLD for i in part}) == 1 for parts in cuts for part in parts), "no rank ever sat one out"
    ref = seen["one_process_epochs"]
    for name in ("ddp_epochs", "fsdp_epochs"):
        for r, got in zip(ref, seen[name], strict=True):
            assert got["train/optimizer_steps"] == 6
            assert abs(got["loss"] - r["loss/pg_loss"]) < 1e-5, (name, got["loss"], r["loss/pg_loss"])
            assert abs(got["train/grad_norm"] - r["train/grad_norm"]) < 1e-5, name
        state, want = seen[f"{name}/state"], seen["one_process_epochs/state"]
        worst = max(float((state[k] - want[k]).abs().max()) for k in want)
        assert worst < 1e-5, (name, worst)
    assert max(float((seen["ddp_epochs/state"][k] - seen["ddp_state"][k]).abs().max()) for k in want) > 1e-3


def test_bf16_losses_are_close_to_fp32(seen):
    for name in ("ddp_bf16", "fsdp_bf16"):
        assert math.isfinite(seen[name][0]["loss"])
        assert abs(seen[name][0]["loss"] - seen["ddp"][0]["loss"]) < 5e-2, name


def test_rank0_publishes_the_full_state_dict(seen, tmp_path):
    build_tiny_model(load_config(None, []), tmp_path / "model", alphabet="abcdefghijkl:")
    own = load_model(tmp_path / "model", CPU).state_dict()
    for published in (seen["published"], seen["ddp_state"]):
        assert list(published) == list(own)
        assert all(published[k].shape == own[k].shape and published[k].dtype == torch.float32 for k in own)
        assert all(bool(torch.isfinite(v).all()) for v in published.values())
    assert torch.equal(seen["ddp_state"]["lm_head.weight"], seen["ddp_state"]["model.embed_tokens.weight"])
    assert torch.equal(seen["published"]["lm_head.weight"], seen["published"]["model.embed_tokens.weight"])
    assert not torch.equal(seen["published"]["lm_head.weight"], own["lm_head.weight"])  # it trained


def test_fsdp_checkpoint_round_trip_restores_weights_optimizer_and_version(seen):
    assert seen["resumed_version"] == STEPS and seen["ddp_version"] == STEPS
    for resumed in (seen["resumed"], seen["ddp_resumed"]):
        assert list(resumed) == list(seen["published"])
        assert all(torch.equal(resumed[k], seen["published"][k]) for k in resumed)
    assert seen["opt_equal"]
    original, fsdp, ddp = seen["next"]  # the step after the restart is the step without one
    assert abs(fsdp - original) < 1e-6 and abs(ddp - original) < 1e-4
