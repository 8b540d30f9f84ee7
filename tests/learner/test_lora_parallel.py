"""LoRA (learner.lora, peft) on two real gloo ranks: DDP and FSDP2 give the same losses (with
micro-batches, gradient checkpointing and bf16 too), the optimizer holds only the adapters, what rank 0
publishes and checkpoints is the adapter alone, and a resumed run continues at the next version.

One spawn runs every scenario, as tests/learner/test_parallel.py does (start-up dominates on 2 cores).
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
from test_parallel import CPU, STEPS, WORLD, _shard
from test_step import ragged_rows

from launcher.tiny import build_tiny_model
from learner.checkpoint import load_latest, save_checkpoint
from learner.lora import apply_lora, published, trainable
from learner.model import load_model
from learner.parallel import full_model_state, full_optimizer_state, wrap
from learner.step import train_step
from protocol.config import load_config

LORA = ("learner.lora.rank=4", "learner.lora.alpha=8", "learner.lora.target_modules=['q_proj','v_proj','down_proj']")


def _worker(rank: int, port: int, model_dir: Path, tmp: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    batches = [ragged_rows(7, vocab=17, seed=10 + s) for s in range(STEPS)]
    out: dict = {}

    def build(name: str, *overrides: str):
        cfg = load_config(
            None,
            [f"model.path={model_dir}", "model.init=pretrained", f"run.dir={tmp / name}", "learner.lr=1e-2"]
            + [*LORA, *overrides],
        )
        torch.manual_seed(0)  # peft's lora_A initialisation: the same on every rank and in every build
        net = wrap(apply_lora(load_model(model_dir, CPU), cfg.learner.lora), cfg, CPU)
        return cfg, net, torch.optim.AdamW(trainable(net), lr=cfg.learner.lr)

    def step(cfg, net, opt, version: int) -> dict[str, float]:
        m = train_step(net, opt, _shard(batches[version % STEPS], rank), cfg, WORLD, CPU, version)
        share = torch.tensor([m["loss/pg_loss"]], dtype=torch.float64)
        dist.all_reduce(share)
        return {**m, "loss": float(share)}

    def train(name: str, *overrides: str, steps: int = STEPS):
        cfg, net, opt = build(name, *overrides)
        out[name] = [step(cfg, net, opt, v) for v in range(steps)]
        return cfg, net, opt

    _, ddp, ddp_opt = train("ddp")
    train("ddp_micro", "learner.micro_batch_tokens=24")
    cfg, fsdp, opt = train(
        "fsdp", "learner.strategy=fsdp", "learner.micro_batch_tokens=24", "learner.grad_checkpointing=true"
    )
    train("ddp_bf16", "model.dtype=bfloat16", steps=1)
    train("fsdp_bf16", "learner.strategy=fsdp", "model.dtype=bfloat16", steps=1)
    out["trainable"] = [n for n, p in ddp.module.named_parameters() if p.requires_grad]
    out["opt_params"] = sum(len(g["params"]) for g in ddp_opt.param_groups)
    out["opt_keys"] = sorted(full_optimizer_state(fsdp, opt).get("state", {}))  # rank 0 receives it
    state = full_model_state(fsdp)
    out["published"] = {k: v.clone() for k, v in published(state).items()}
    save_checkpoint(cfg, fsdp, opt, STEPS, rank, state)
    out["checkpoint"] = sorted(p.name for p in (tmp / "fsdp" / "checkpoints" / f"v{STEPS:06d}").iterdir())
    resumed_cfg, resumed, resumed_opt = build("fsdp", "learner.strategy=fsdp")
    out["resumed_version"] = load_latest(resumed_cfg, resumed, resumed_opt, rank).version
    out["resumed"] = {k: v.clone() for k, v in published(full_model_state(resumed)).items()}
    ddp_cfg, ddp2, ddp2_opt = build("fsdp")  # the FSDP checkpoint loaded by DDP ranks
    out["ddp_version"] = load_latest(ddp_cfg, ddp2, ddp2_opt, rank).version
    out["next"] = [
        step(*run, STEPS)["loss"]
        for run in ((cfg, fsdp, opt), (resumed_cfg, resumed, resumed_opt), (ddp_cfg, ddp2, ddp2_opt))
    ]
    if rank == 0:
        torch.save(out, tmp / "out.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def seen(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("lora_parallel")
    build_tiny_model(load_config(None, []), tmp / "model", alphabet="abcdefghijkl:")
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["torch", "peft", "transformers.models.llama.modeling_llama", "test_lora_parallel"]
    )
    ctx = mp.start_processes(
        _worker, args=(free_port(), tmp / "model", tmp), nprocs=WORLD, join=False, start_method="forkserver"
    )
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks did not finish in 240 s (a collective out of step?)")
    return torch.load(tmp / "out.pt", weights_only=False)


def test_ddp_and_fsdp2_give_equal_losses_with_lora(seen):
    for name in ("ddp_micro", "fsdp"):
        for ref, got in zip(seen["ddp"], seen[name], strict=True):
            assert got["train/micro_batches"] > 1
            assert abs(got["loss"] - ref["loss"]) < 1e-4, (name, got["loss"], ref["loss"])
            assert abs(got["train/grad_norm"] - ref["train/grad_norm"]) < 1e-4, name
    assert len({round(m["loss"], 4) for m in seen["ddp"]}) == STEPS  # the adapter does train
    for name in ("ddp_bf16", "fsdp_bf16"):
        assert math.isfinite(seen[name][0]["loss"]) and abs(seen[name][0]["loss"] - seen["ddp"][0]["loss"]) < 5e-2


def test_the_optimizer_holds_only_adapter_tensors(seen):
    names = seen["trainable"]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 3 * 2  # 2 layers x 3 target modules x (A, B)
    assert seen["opt_params"] == len(names)
    assert seen["opt_keys"] == sorted(names)  # FSDP2's gathered AdamW state: the same names, nothing else


def test_rank0_publishes_and_checkpoints_the_adapter_alone(seen):
    pub = seen["published"]
    names = [n.removeprefix("base_model.model.").replace(".default.", ".") for n in seen["trainable"]]
    assert sorted(pub) == sorted(names)
    assert all(v.shape[0] == 4 for k, v in pub.items() if ".lora_A." in k)
    assert any(bool(v.abs().sum() > 0) for k, v in pub.items() if ".lora_B." in k)  # B starts at zero: it trained
    assert seen["checkpoint"] == ["adapter", "trainer.pt"]


def test_a_resumed_lora_run_continues_at_the_next_version(seen):
    assert seen["resumed_version"] == STEPS and seen["ddp_version"] == STEPS
    assert all(torch.equal(seen["resumed"][k], v) for k, v in seen["published"].items())
    original, fsdp, ddp = seen["next"]  # the step after the restart is the step without one (AdamW moments too)
    assert abs(fsdp - original) < 1e-6 and abs(ddp - original) < 1e-4
