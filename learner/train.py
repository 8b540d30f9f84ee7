"""The learner: a transformers causal LM under DDP or FSDP2, off-policy-aware loss, versioned weights.

Start (one machine, R ranks; gloo on CPU, nccl on GPU)::

    torchrun --standalone --nproc-per-node 2 -m learner.train --config configs/tiny.toml

On N machines, ``podsrl learner`` on each with ``learner.nnodes=N learner.node_rank=i
learner.rdzv_endpoint=NODE0:29400`` runs torchrun's c10d rendezvous (``launcher.launch.torchrun_command``).

Version ``V`` = updates taken (DESIGN.md): one update per batch, one optimizer step by default.
Each step rank 0 asks the selector for the batch built for ``V`` (so every row has staleness
``V - v <= max_staleness``), broadcasts it, every rank trains on its shard (``learner/step.py``:
``learner.ppo_epochs`` x ``learner.minibatches`` optimizer steps, each accumulated over micro-batches
within ``learner.micro_batch_tokens``, lr from ``lr_at(V)``), and rank 0 publishes version ``V + 1``. Checkpoints store
the version, so a restarted learner continues the count and the rollout servers' versions stay
meaningful.

``main`` is the loop; ``Training`` is every rank's state (model, optimizer, version, checkpoints)
and ``Lead`` rank 0's duties (batches in, versions out through the publisher, metrics, the audit trail).

Precision (``model.dtype``): the learner keeps fp32 master weights and fp32 AdamW state; with
``bfloat16`` the forward computes in bf16 (autocast under DDP, FSDP2's ``MixedPrecisionPolicy``,
gradients reduced in fp32) and log-probs are taken in fp32 from the logits. Published weights are
cast to ``model.dtype``, the dtype the rollout engine loads. Strategies and state dicts:
``learner/parallel.py``. With ``learner.lora`` the base is frozen, the optimizer holds the adapters
alone, and a published version is the adapter (``learner/lora.py``, ``protocol/lora.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import zmq

from learner.nodes import claim_rank, global_rank, peers_watched
from protocol.auth import load_auth
from protocol.config import Config
from protocol.messages import BatchRequest, ProtocolError, TrainBatch, Weights
from protocol.metrics import Monitor, RateLimitedLog
from protocol.sockets import batch_client, close, recv, send
from protocol.weights import pack_weights, read_tokenizer_files, unpack_weights

log = logging.getLogger("podsrl.learner")


class BatchSource:
    """Rank 0's side of the batches link: one request per step, repeated every ``RESEND_S`` until
    answered, so a restarted selector hears it within a second of coming back (the selector keeps
    one pending request; a repeat replaces it). Each request carries ``session``, the one the learner's
    publisher announces: the selector serves no other (``selector/requests.py``)."""

    RESEND_S = 1.0

    def __init__(self, ctx: zmq.Context, cfg: Config, vocab_size: int, session: int) -> None:
        self.cfg, self.vocab_size, self.session = cfg, vocab_size, session
        self.sock = batch_client(ctx, cfg.net, load_auth(cfg.net, "learner"))
        self.request_id = 0
        self.rejected = 0
        self.warn = RateLimitedLog(log)  # a flood of bad replies costs a line per 10 s per reason
        self.stale_rows = 0

    def get(self, version: int, idle: Callable[[], None] | None = None) -> tuple[TrainBatch, float]:
        """The batch for learner version ``version`` and the seconds spent waiting for it; ``idle`` is
        called about every 0.1 s of waiting (the training thread's chance to re-pack a version)."""
        t0 = time.monotonic()
        self.request_id += 1
        request = BatchRequest(
            request_id=self.request_id,
            version=version,
            num_groups=self.cfg.learner.groups_per_step,
            session=self.session,
        )
        next_log = t0 + self.cfg.learner.batch_timeout_s
        while True:
            send(self.sock, request)
            resend = time.monotonic() + self.RESEND_S
            while time.monotonic() < resend:
                if not self.sock.poll(max(1, min(100, int((resend - time.monotonic()) * 1000)))):
                    if idle is not None:
                        idle()
                    continue
                try:
                    _, batch = recv(self.sock, TrainBatch)
                except ProtocolError as e:
                    self.rejected += 1
                    self.warn(e.reason, "rejected a batch: %s", e)
                    continue
                fresh = self._fresh(batch, version)
                if fresh is not None:
                    return fresh, time.monotonic() - t0
            if time.monotonic() > next_log:
                next_log = time.monotonic() + self.cfg.learner.batch_timeout_s
                log.info(
                    "no batch for version %d after %.0fs; still asking the selector at %s:%d",
                    version,
                    time.monotonic() - t0,
                    self.cfg.net.selector_host,
                    self.cfg.net.batch_port,
                )

    def _fresh(self, batch: TrainBatch, version: int) -> TrainBatch | None:
        """Check the bounds here too: a late reply to an old request may hold stale rows, and the learner
        never trains a row from the future or a token outside its vocabulary, whatever the selector sent."""
        stale = self.cfg.too_stale(version, batch.versions)
        if stale.any():
            self.stale_rows += int(stale.sum())
            self.warn(
                "stale",
                "dropping a batch with %d rows staler than K=%d (late reply)",
                stale.sum(),
                self.cfg.max_staleness,
            )
            return None
        ids = (batch.prompt_ids, batch.completion_ids)
        problem = (
            "rows from a future version"
            if batch.size and int(batch.versions.max()) > version
            else "token ids outside the vocabulary"
            if any(a.size and (int(a.min()) < 0 or int(a.max()) >= self.vocab_size) for a in ids)
            else "fewer rows than ranks"
            if batch.size < self.cfg.learner.world_size
            else ""
        )
        if problem:
            self.rejected += 1
            self.warn(problem, "rejected a batch for version %d: %s", version, problem)
            return None
        return batch


def trained_groups(batch: TrainBatch) -> list[list]:
    """``[server, session, seq, version]`` of each group of ``batch``: the audit trail of what was trained
    (``metrics/trained_groups.jsonl``; no identity may appear twice in a run, docs/RELIABILITY.md)."""
    first = np.unique(batch.group_index, return_index=True)[1]  # one row of each group, in group order
    return [
        [
            batch.servers[int(batch.server_index[r])],
            int(batch.group_sessions[g]),
            int(batch.group_seqs[g]),
            int(batch.versions[r]),
        ]
        for g, r in enumerate(first.tolist())
    ]


def die_with_agent() -> None:
    """In a torchrun worker: be killed (SIGKILL) when the torchrun agent that started it dies.

    torch starts each worker in a session of its own (``start_new_session=True``), so killing torchrun's
    process group does not reach the workers: a torchrun killed by SIGKILL (the OOM killer, ``kill -9``)
    would leave them training on and holding the learner's ports, and a restarted learner could not
    bind. Linux only (``prctl(PR_SET_PDEATHSIG)``); it covers an agent that dies after this call (an
    agent already gone leaves the worker with init, pid 1, as its parent: it exits then too).
    """
    from protocol.cli import die_with_parent

    if "TORCHELASTIC_RUN_ID" in os.environ and die_with_parent(signal.SIGKILL) and os.getppid() == 1:
        os._exit(1)


def setup_distributed(cfg: Config, rank: int) -> tuple[int, int, torch.device]:
    if not dist.is_initialized():
        use_cuda = cfg.learner.device == "cuda" or (cfg.learner.device == "auto" and torch.cuda.is_available())
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world != cfg.learner.world_size:
            raise RuntimeError(
                f"torchrun started {world} rank(s), but learner.nproc={cfg.learner.nproc} x learner.nnodes="
                f"{cfg.learner.nnodes} = {cfg.learner.world_size}: start every node with `podsrl learner` and "
                "the same learner.nproc and learner.nnodes"
            )
        if cfg.learner.nnodes > 1:
            claim_rank(rank, world, cfg.learner.rdzv_timeout_s)
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=cfg.learner.dist_timeout_s),
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.learner.device == "cpu" or not torch.cuda.is_available():
        return rank, world, torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    return rank, world, torch.device("cuda", local)


def shard(batch: TrainBatch, rank: int, world: int) -> dict[str, Any]:
    """Rows ``rank::world`` of a batch as tensors (ragged rows as lists), and their row ids in the batch
    (``index``: minibatches are cut from the whole batch, learner/step.py)."""
    rows = np.arange(rank, batch.size, world)
    pe = np.cumsum(batch.prompt_lens)
    ce = np.cumsum(batch.completion_lens)
    ps, cs = pe - batch.prompt_lens, ce - batch.completion_lens
    t = torch.from_numpy
    mask = batch.loss_mask
    return {
        "prompts": [t(batch.prompt_ids[ps[i] : pe[i]].astype(np.int64)) for i in rows],
        "completions": [t(batch.completion_ids[cs[i] : ce[i]].astype(np.int64)) for i in rows],
        "behav": [t(batch.logprobs[cs[i] : ce[i]].copy()) for i in rows],
        "advantages": t(batch.advantages[rows].copy()),
        "index": t(rows.astype(np.int64)),
        # episodes: 1 model token, 0 environment token (learner/step.py multiplies it into the completion mask)
        "masks": [t(mask[cs[i] : ce[i]].astype(np.float32)) for i in rows] if mask.size else None,
    }


class Training:
    """Every rank's side of the run: the wrapped model, its optimizer and the version count (DESIGN.md)."""

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device) -> None:
        from learner.checkpoint import load_latest
        from learner.lora import apply_lora, enabled, spec, trainable
        from learner.model import load_model
        from learner.parallel import cast, full_model_state, wrap
        from protocol.lora import LoraSpec, state_digest

        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        base = load_model(cfg.model_dir, device)
        self.model_config, self.vocab_size = base.config.to_json_string(), int(base.config.vocab_size)
        # LoRA, rank 0 (the publisher's): a version is the adapter, for the base of this spec's digest, and
        # the base is packed once (in model.dtype) for rollout servers that lack it (docs/LORA.md)
        self.lora: LoraSpec | None = None
        self.base: Weights | None = None
        model: torch.nn.Module = base
        if enabled(cfg.learner.lora):
            if rank == 0:
                self.base = pack_weights(cast(base.state_dict(), cfg.model.dtype), 0, self.model_config)
                self.lora = spec(cfg.learner.lora, state_digest(unpack_weights(self.base, verified=True)))
            model = apply_lora(base, cfg.learner.lora)
        self.net = wrap(model, cfg, device)
        self.opt = torch.optim.AdamW(trainable(self.net), lr=cfg.learner.lr, weight_decay=cfg.learner.weight_decay)
        lineage = load_latest(cfg, self.net, self.opt, rank)
        self.version, self.step, self.floor = lineage.version, lineage.step, lineage.floor
        self.nonfinite = 0  # steps skipped for a non-finite gradient
        self.saved: int | None = None  # the version last checkpointed by this process
        self.state = full_model_state(self.net)  # a collective: every rank gathers, rank 0 receives

    def train(self, batch: TrainBatch) -> dict[str, Any]:
        """One update (``ppo_epochs`` x ``minibatches`` optimizer steps) on this rank's shard of ``batch``,
        which makes the next version."""
        from learner.parallel import full_model_state
        from learner.step import train_step

        rows = shard(batch, self.rank, self.world)
        metrics = train_step(self.net, self.opt, rows, self.cfg, self.world, self.device, self.step)
        self.version, self.step = self.version + 1, self.step + 1
        self.nonfinite += int(metrics.get("train/skipped_nonfinite", 0))
        self.state = full_model_state(self.net)
        return metrics

    def checkpoint_due(self) -> bool:
        every = self.cfg.learner.checkpoint_every
        return bool(every) and self.step % every == 0

    def save(self) -> None:
        from learner.checkpoint import save_checkpoint

        save_checkpoint(self.cfg, self.net, self.opt, self.version, self.rank, self.state, self.step, self.floor)
        self.saved = self.version


class Lead:
    """Rank 0's side of the run: batches in, versions out, the metrics and the audit trail. What it opens
    is closed by ``cleanup``, the caller's one place for clean-ups, even when it fails half-way."""

    def __init__(self, cfg: Config, run: Training, cleanup: contextlib.ExitStack) -> None:
        from learner.publisher import WeightPublisher

        self.cfg = cfg
        ctx = zmq.Context()
        cleanup.callback(ctx.term)  # (last: every socket is closed by then)
        self.publisher = WeightPublisher(
            ctx,
            cfg.net,
            files=read_tokenizer_files(cfg.model_dir),
            vocab_size=run.vocab_size,
            weights=cfg.weights,
            run_dir=cfg.run.dir,
            device=run.device,
            base=run.base,
        )
        cleanup.callback(self.publisher.close)
        self.publish(run)
        self.source = BatchSource(ctx, cfg, run.vocab_size, self.publisher.session)
        cleanup.callback(close, self.source.sock)
        self.monitor = Monitor(cfg.run.dir, "learner")
        cleanup.callback(self.monitor.close)
        self.audit = cleanup.enter_context((Path(cfg.run.dir) / "metrics" / "trained_groups.jsonl").open("a"))
        self.started = time.monotonic()
        log.info(
            "learner up: %d rank(s) on %s, %s, version %d; %s",
            run.world,
            run.device,
            cfg.learner.strategy,
            run.version,
            cfg.summary(),
        )

    def publish(self, run: Training, final: bool = False) -> None:
        """Record, then announce and serve ``run.version`` (never with a non-finite weight)."""
        from learner.checkpoint import record_published
        from learner.parallel import cast

        bad = [k for k, v in run.state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise RuntimeError(
                f"version {run.version} has non-finite weights ({bad[:3]}): not published. Resume "
                "from the last checkpoint with a lower learner.lr or learner.grad_clip"
            )
        record_published(self.cfg, run.version, run.floor)
        state, config = cast(run.state, self.cfg.model.dtype), run.model_config
        if run.lora is not None:  # the version is the adapter (protocol/lora.py)
            from learner.lora import published
            from protocol.lora import with_lora

            state, config = published(state), with_lora(config, run.lora)
        w = pack_weights(state, run.version, config, alloc=self.publisher.alloc)
        self.publisher.publish(w, run.floor, final)

    def batch(self, run: Training) -> tuple[TrainBatch | None, float]:
        """The batch for ``run.version`` and the seconds spent waiting for it; None once ``run.max_seconds``
        is spent. While it waits, the version is packed again when the publisher asks (a rollout server
        found its shared-memory segment corrupt: learner/publisher.py)."""
        limit = self.cfg.run.max_seconds
        if limit and time.monotonic() - self.started > limit:
            log.info("run.max_seconds=%s reached at version %d", limit, run.version)
            return None, 0.0
        return self.source.get(run.version, idle=lambda: self.repack(run))

    def repack(self, run: Training) -> None:
        """Publish ``run.version`` again, from the model's state into ordinary memory, when the publisher
        no longer trusts the bytes it has for it."""
        if self.publisher.repack_due(run.version):
            log.warning(
                "re-packing version %d from the model's state (its shared-memory copy was corrupt)", run.version
            )
            self.publish(run)

    def report(
        self, run: Training, batch: TrainBatch, metrics: dict[str, Any], wait_s: float, t0: float, t1: float
    ) -> None:
        """After the step that trained on ``batch`` (begun at ``t0``, training from ``t1``): publish the new
        version, log the step's metrics and add its groups to the audit trail."""
        t_pub = time.monotonic()
        self.publish(run)
        metrics.update({"time/publish": time.monotonic() - t_pub, **self.publisher.metrics()})
        stale = (run.version - 1) - batch.versions  # what this update trained on (a late reply may be
        # a batch cut for an older request version: the learner's own version is the truth)
        metrics.update(
            {
                **batch.stats,
                "version": run.version,
                "train/step": run.step,
                "time/wait_for_batch": wait_s,
                "time/train": time.monotonic() - t1,
                "time/step": time.monotonic() - t0,
                "train/samples": batch.size,
                "train/samples_per_s": batch.size / (time.monotonic() - t0),
                "staleness/mean": float(stale.mean()),
                "staleness/max": int(stale.max()),
                **{f"staleness/hist_{k}": int((stale == k).sum()) for k in range(self.cfg.max_staleness + 1)},
                "learner/batches_rejected": self.source.rejected,
                "learner/stale_rows_dropped": self.source.stale_rows,
                "learner/nonfinite_steps_skipped": run.nonfinite,
                "reward/kept_mean": float(batch.rewards.mean()),
            }
        )
        self.monitor.log(run.version, metrics)
        self.audit.write(json.dumps({"version": run.version, "groups": trained_groups(batch)}) + "\n")
        self.audit.flush()


def end_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    from protocol.cli import configure, process_parser

    die_with_agent()
    args = process_parser("learner.train", __doc__).parse_args(argv)
    rank = global_rank(args)
    cfg = configure(args, role=f"learner-{rank}", quiet=rank != 0)
    torch.set_num_threads(cfg.learner.threads)
    rank, world, device = setup_distributed(cfg, rank)
    with contextlib.ExitStack() as cleanup:  # every clean-up, last opened first, on success or error
        cleanup.callback(end_distributed)
        cleanup.enter_context(peers_watched(cfg, rank, world))
        run = Training(cfg, rank, world, device)
        lead = Lead(cfg, run, cleanup) if rank == 0 else None  # publishes the version it starts from
        while run.step < cfg.run.steps:
            t0 = time.monotonic()
            batch, wait_s = lead.batch(run) if lead is not None else (None, 0.0)
            box = [batch]
            dist.broadcast_object_list(box, src=0)  # None: every rank stops together
            if box[0] is None:
                break
            t1 = time.monotonic()
            metrics = run.train(box[0])
            if lead is not None:
                lead.report(run, box[0], metrics, wait_s, t0, t1)
            if run.checkpoint_due():
                run.save()
        if run.saved != run.version:  # the final version is always kept
            run.save()
        if lead is not None:
            lead.publish(run, final=True)
            log.info("learner done at version %d", run.version)
        if world > 1:  # every rank tears its process group down together, after rank 0's last publish (one
            dist.barrier()  # rank left alone tearing down gloo aborted once: "terminate called without ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
