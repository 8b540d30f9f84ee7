"""A learner across several machines: which rank each worker is, and failures that name their cause.

``podsrl learner`` on each node runs torchrun with its c10d rendezvous (``launcher.launch.torchrun_command``);
torchrun joins the nodes, and the learner then creates its process group with the ranks set here, so
global rank 0 (the selector's client and the weights publisher) is always on ``learner.node_rank`` 0.
docs/DEPLOY.md has the whole picture.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from datetime import timedelta

import torch.distributed as dist

from protocol.config import Config, load_config

log = logging.getLogger("podsrl.learner")


def global_rank(args: argparse.Namespace) -> int:
    """This worker's rank in the learner job. One node: torchrun's ``RANK``. Several: ``learner.node_rank``
    x ranks per node + ``LOCAL_RANK``, so global rank 0 (the one that talks to the selector and publishes
    weights) is always on node 0, the address rollout servers are given as ``net.learner_host``; torch's
    c10d rendezvous orders nodes by host name and pid instead, and ignores ``--node-rank``."""
    try:
        learner = load_config(args.config, args.overrides).learner
    except ValueError:  # configure() reports it
        return int(os.environ.get("RANK", 0))
    if learner.nnodes == 1:
        return int(os.environ.get("RANK", 0))
    return learner.node_rank * int(os.environ.get("LOCAL_WORLD_SIZE", 1)) + int(os.environ.get("LOCAL_RANK", 0))


@contextlib.contextmanager
def peers_watched(cfg: Config, rank: int, world: int) -> Iterator[None]:
    """Say what a failed collective means before it ends this rank: another rank of the job died (its
    connections closed: at once) or stopped answering (after ``learner.dist_timeout_s``). torchrun then
    ends the job on every node (``--max-restarts=0``); starting it again resumes the last checkpoint."""
    try:
        yield
    except RuntimeError as e:  # NCCL raises DistError; gloo a RuntimeError naming its own source file
        if world > 1 and (isinstance(e, dist.DistError) or "gloo" in str(e)):
            log.error(
                "learner rank %d of %d: a collective failed, so another rank of the job died or stopped "
                "answering (learner.dist_timeout_s=%g); the job ends. Start `podsrl learner` again on every node "
                "(learner.nnodes=%d): it resumes from the last checkpoint. (%s)",
                rank,
                world,
                cfg.learner.dist_timeout_s,
                cfg.learner.nnodes,
                str(e).splitlines()[0] if str(e) else type(e).__name__,
            )
        raise


def claim_rank(rank: int, world: int, timeout_s: float) -> None:
    """Before the process group: fail at once, on every node, when two nodes were given the same
    ``learner.node_rank`` (the group would otherwise wait for the missing rank until ``learner.dist_timeout_s``).

    Each worker claims its rank in the store of torchrun's rendezvous (``MASTER_ADDR:MASTER_PORT``, the
    agents' store), then waits until every rank is claimed or a duplicate is reported."""
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=timeout_s)
    )
    prefix = f"podsrl/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/"
    if store.add(f"{prefix}rank{rank}", 1) > 1:
        store.set(f"{prefix}duplicate", str(rank))
    else:
        store.add(f"{prefix}claimed", 1)
    deadline = time.monotonic() + timeout_s
    while store.add(f"{prefix}claimed", 0) < world:
        if store.check([f"{prefix}duplicate"]):
            dup = int(store.get(f"{prefix}duplicate")) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            raise RuntimeError(
                f"two nodes of the learner have learner.node_rank={dup}: give each node its own rank in "
                "0..learner.nnodes-1 and start every node again"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"not every rank of the learner started within learner.rdzv_timeout_s={timeout_s:g}")
        time.sleep(0.05)  # the store has no wait-for-count; its ranks arrive within a second of each other
