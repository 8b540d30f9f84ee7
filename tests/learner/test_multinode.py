"""A learner across two "nodes": two ``podsrl learner`` processes with ``learner.nnodes=2``, each a torchrun
agent with one gloo rank, joined by torchrun's c10d rendezvous over loopback (docs/DEPLOY.md).

One fixture runs the scenario once (each torchrun start imports torch twice, which dominates on 2 cores:
about 70 s in all), and each test (marked slow) checks one part of it:

1. the reference: ``podsrl learner`` on one node with 2 ranks, 4 steps, a checkpoint at version 3;
2. the same batches on 2 nodes x 1 rank: the same losses and the same version-3 checkpoint; then node 1
   is killed (SIGKILL to its torchrun agent; its worker dies with it) and node 0 must end with a clear
   error within ``DEATH_BOUND_S``, far below ``learner.dist_timeout_s``;
3. the 2-node job's checkpoint resumed by one node with one rank: version 4, the reference's step.

Two nodes given the same node rank, and the pure parts (the torchrun line, config checks, health), are
tested on their own.

Batches come from :class:`Feeder`, a real ROUTER on the batches port (the selector's side of the link),
which answers each request once with a fixed batch for the version asked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import zmq
from helpers import ROOT, child_env, free_ports, line_matching, wait_for
from safetensors.numpy import load_file

from launcher.tiny import build_tiny_model
from protocol.config import Config, load_config
from protocol.messages import BatchRequest, ProtocolError, TrainBatch
from protocol.sockets import batch_server, close, recv, send

STEPS = 3  # compared step by step; the checkpoint is written at this version
DIST_TIMEOUT_S = 60  # learner.dist_timeout_s of the 2-node job: a frozen node would fail it after this
DEATH_BOUND_S = 30  # a node that dies (its connections close) ends the job well before that timeout
JOB_S = 240  # the most one learner job may take here (2 shared cores)


def batch_for(version: int, vocab: int, request_id: int = 0) -> TrainBatch:
    """The fixed batch for ``version``: 4 groups of 2 rows, ragged, staleness 0, unique group identities."""
    gen = np.random.default_rng(100 + version)
    groups, per = 4, 2
    rows = groups * per
    plens = gen.integers(2, 6, rows).astype(np.int32)
    clens = gen.integers(1, 6, rows).astype(np.int32)
    return TrainBatch(
        request_id=request_id,
        version=version,
        servers=["feeder"],
        stats={},
        prompt_ids=gen.integers(1, vocab, int(plens.sum())).astype(np.int32),
        prompt_lens=plens,
        completion_ids=gen.integers(1, vocab, int(clens.sum())).astype(np.int32),
        completion_lens=clens,
        logprobs=-gen.uniform(0.5, 3.0, int(clens.sum())).astype(np.float32),
        advantages=gen.normal(0, 1, rows).astype(np.float32),
        rewards=gen.uniform(0, 1, rows).astype(np.float32),
        versions=np.full(rows, version, np.int64),
        group_index=np.repeat(np.arange(groups), per).astype(np.int32),
        server_index=np.zeros(rows, np.int32),
        group_sessions=np.ones(groups, np.int64),
        group_seqs=np.arange(version * groups, (version + 1) * groups, dtype=np.int64),
    )


@dataclass
class Feeder:
    """The selector's side of the batches link for a learner under test, on its own thread and socket:
    each request is answered once (torchrun's rank 0 repeats an unanswered one every second) with
    ``batch_for(version)``, for versions below ``limit`` only, so the test decides when a step may run."""

    cfg: Config
    vocab: int
    limit: int = 1 << 30
    answered: set[tuple[bytes, int]] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        ctx = zmq.Context()
        sock = batch_server(ctx, self.cfg.net)
        pending: dict[bytes, BatchRequest] = {}  # the latest request of each learner (identity)
        try:
            while not self.stop.is_set():
                if sock.poll(50):
                    try:
                        route, req = recv(sock, BatchRequest, routed=True)
                    except ProtocolError:
                        continue
                    pending[bytes(route[0])] = req
                for ident, req in list(pending.items()):
                    if req.version < self.limit and (ident, req.request_id) not in self.answered:
                        self.answered.add((ident, req.request_id))
                        send(sock, batch_for(req.version, self.vocab, req.request_id), ident)
                        del pending[ident]
        finally:
            close(sock)
            ctx.term()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


def start_learner(log: Path, overrides: list[str]) -> subprocess.Popen:
    """``podsrl learner`` as a user types it, in a session of its own (so a kill reaches torchrun's group)."""
    return subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "learner", *overrides],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=child_env(),
        cwd=ROOT,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, log: Path, timeout: float = JOB_S) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"{log.name} did not end in {timeout:g}s:\n{log.read_text()[-3000:]}") from None


def records(run_dir: Path) -> dict[int, dict]:
    """The learner's metrics by version."""
    lines = (run_dir / "metrics" / "learner.jsonl").read_text().splitlines()
    return {int(m["version"]): m for m in map(json.loads, lines) if "version" in m}


def weights(run_dir: Path, version: int) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "checkpoints" / f"v{version:06d}" / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> dict:
    from rollout_server.tasks import alphabet_of

    tmp = tmp_path_factory.mktemp("multinode")
    base = load_config(None, [])
    build_tiny_model(base, tmp / "model", alphabet_of(base.task))
    vocab = json.loads((tmp / "model" / "config.json").read_text())["vocab_size"]
    batch_port, announce_port, weights_port, rdzv_port = free_ports(4)
    common = [
        f"model.path={tmp / 'model'}",
        "model.init=pretrained",
        "learner.device=cpu",
        "learner.threads=1",
        "learner.checkpoint_every=3",
        "net.selector_host=127.0.0.1",
        f"net.batch_port={batch_port}",
        f"net.announce_port={announce_port}",
        f"net.weights_port={weights_port}",
    ]
    feeder = Feeder(load_config(None, common), vocab)
    seen: dict = {"tmp": tmp}
    try:
        # 1. one node, two ranks: the reference
        log = tmp / "one.log"
        proc = start_learner(log, [*common, f"run.dir={tmp / 'one'}", "run.steps=4", "learner.nproc=2"])
        seen["one_rc"] = finish(proc, log)
        seen["one_log"] = log.read_text()

        # 2. two nodes, one rank each, up to the checkpoint of version 3; then node 1 dies
        feeder.limit = STEPS
        multi = [
            *common,
            "run.steps=100",
            "learner.nproc=1",
            "learner.nnodes=2",
            f"learner.rdzv_endpoint=127.0.0.1:{rdzv_port}",
            "learner.rdzv_timeout_s=120",
            f"learner.dist_timeout_s={DIST_TIMEOUT_S}",
        ]
        logs = [tmp / "node0.log", tmp / "node1.log"]
        nodes = [
            start_learner(logs[i], [*multi, f"learner.node_rank={i}", f"run.dir={tmp / f'node{i}'}"]) for i in (0, 1)
        ]
        try:
            latest = tmp / "node0" / "checkpoints" / "latest"

            def checkpointed() -> bool:
                for node, path in zip(nodes, logs, strict=True):
                    assert node.poll() is None, f"{path.name} ended early:\n{path.read_text()[-3000:]}"
                return latest.exists() and latest.read_text() == f"v{STEPS:06d}"

            wait_for(checkpointed, JOB_S, "the 2-node job's checkpoint of version 3", every_s=0.2)
            os.killpg(nodes[1].pid, signal.SIGKILL)  # torchrun's agent; its worker dies with it (PDEATHSIG)
            t_kill = time.monotonic()
            feeder.limit = STEPS + 1  # rank 0 gets its next batch and hands it to the dead rank
            seen["node0_rc"] = finish(nodes[0], logs[0], DIST_TIMEOUT_S * 2)
            seen["death_s"] = time.monotonic() - t_kill
        finally:
            for node in nodes:
                if node.poll() is None:
                    os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        seen["node0_log"] = logs[0].read_text()

        # 3. the 2-node job's checkpoint resumed by one node with one rank
        feeder.limit = 1 << 30
        log = tmp / "resume.log"
        proc = start_learner(log, [*common, f"run.dir={tmp / 'node0'}", "run.steps=4", "learner.nproc=1"])
        seen["resume_rc"] = finish(proc, log)
        seen["resume_log"] = log.read_text()
    finally:
        feeder.close()
    return seen


@pytest.mark.slow
def test_two_nodes_train_the_same_losses_as_one_node_with_two_ranks(scenario):
    tmp = scenario["tmp"]
    assert scenario["one_rc"] == 0, scenario["one_log"][-3000:]
    one, two = records(tmp / "one"), records(tmp / "node0")
    assert [v for v in two if v <= STEPS] == list(range(1, STEPS + 1))
    keys = [k for k in one[1] if k.startswith("loss/")] + ["train/grad_norm"]
    assert "loss/pg_loss" in keys
    for v in range(1, STEPS + 1):
        for k in keys:
            assert abs(two[v][k] - one[v][k]) < 1e-5, (v, k, two[v][k], one[v][k])
    assert len({round(one[v]["loss/pg_loss"], 4) for v in range(1, STEPS + 1)}) == STEPS  # the batches differ
    a, b = weights(tmp / "one", STEPS), weights(tmp / "node0", STEPS)
    assert sorted(a) == sorted(b)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-5
    assert not (tmp / "node1" / "checkpoints").exists() or not any((tmp / "node1" / "checkpoints").glob("v*"))


@pytest.mark.slow
def test_rank0_is_on_node_0(scenario):
    """Global rank 0 (the selector's client, the publisher) is node_rank 0's, whatever order the rendezvous
    put the nodes in: only node 0 logged the 'learner up' line and wrote metrics."""
    tmp = scenario["tmp"]
    assert "learner up: 2 rank(s)" in scenario["node0_log"]
    assert "learner up" not in (tmp / "node1.log").read_text()
    assert not (tmp / "node1" / "metrics" / "learner.jsonl").exists()


@pytest.mark.slow
def test_a_node_that_dies_ends_the_job_with_a_clear_error(scenario):
    log = scenario["node0_log"]
    assert scenario["node0_rc"] != 0, log[-3000:]
    assert scenario["death_s"] < DEATH_BOUND_S, (scenario["death_s"], log[-3000:])
    assert "another rank of the job died or stopped answering" in log, log[-3000:]
    assert "Start `podsrl learner` again on every node" in log


@pytest.mark.slow
def test_the_two_node_checkpoint_resumes_on_one_node(scenario):
    tmp = scenario["tmp"]
    assert scenario["resume_rc"] == 0, scenario["resume_log"][-3000:]
    assert line_matching(tmp / "resume.log", r"learner up: 1 rank\(s\) .* version 3")
    one, resumed = records(tmp / "one"), records(tmp / "node0")
    assert max(resumed) == 4
    # one rank's loss is the whole batch's, two ranks' rank 0 logs its share: the gradient norm is global
    assert abs(resumed[4]["train/grad_norm"] - one[4]["train/grad_norm"]) < 1e-5
    a, b = weights(tmp / "one", 4), weights(tmp / "node0", 4)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-5


@pytest.mark.slow
def test_two_nodes_with_the_same_rank_fail_at_once(tmp_path):
    """A duplicate learner.node_rank ends both nodes with a message naming it, before any process group
    would wait for the missing rank (learner.dist_timeout_s is an hour here)."""
    base = load_config(None, [])
    from rollout_server.tasks import alphabet_of

    build_tiny_model(base, tmp_path / "model", alphabet_of(base.task))
    (rdzv,) = free_ports(1)
    common = [
        f"model.path={tmp_path / 'model'}",
        "model.init=pretrained",
        "learner.device=cpu",
        "learner.nnodes=2",
        "learner.node_rank=0",
        f"learner.rdzv_endpoint=127.0.0.1:{rdzv}",
        "learner.rdzv_timeout_s=120",
        "learner.dist_timeout_s=3600",
    ]
    logs = [tmp_path / f"dup{i}.log" for i in (0, 1)]
    nodes = [start_learner(log, [*common, f"run.dir={tmp_path / log.stem}"]) for log in logs]
    t0 = time.monotonic()
    rcs = [finish(node, log, JOB_S) for node, log in zip(nodes, logs, strict=True)]
    assert all(rc != 0 for rc in rcs) and time.monotonic() - t0 < JOB_S
    for log in logs:
        assert "two nodes of the learner have learner.node_rank=0" in log.read_text(), log.read_text()[-3000:]


def test_torchrun_line_of_each_node():
    from launcher.launch import torchrun_command

    one = load_config(None, ["learner.nproc=2"]).learner
    assert "--standalone" in torchrun_command("run.toml", [], 2, one)
    node = load_config(
        None, ["learner.nnodes=3", "learner.node_rank=2", "learner.rdzv_endpoint=10.0.0.5:29400", "learner.nproc=4"]
    ).learner
    cmd = torchrun_command("run.toml", ["x=1"], node.nproc, node)
    assert "--standalone" not in cmd
    for flag in (
        "--nnodes=3",
        "--node-rank=2",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.0.0.5:29400",
        "--rdzv-id=podsrl",
        "--rdzv-conf=join_timeout=900",
        "--max-restarts=0",
        "--nproc-per-node=4",
    ):
        assert flag in cmd
    assert cmd[-5:] == ["-m", "learner.train", "--config", "run.toml", "x=1"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["learner.nnodes=2", "learner.node_rank=2", "learner.rdzv_endpoint=h:1"], r"node ranks are 0\.\.1"),
        (["learner.nnodes=2"], r"needs learner.rdzv_endpoint=HOST:PORT"),
        (["learner.nnodes=2", "learner.rdzv_endpoint=node0"], r"needs learner.rdzv_endpoint=HOST:PORT"),
        (
            ["learner.nnodes=4", "learner.nproc=4", "learner.groups_per_step=1", "learner.rdzv_endpoint=h:1"],
            r"learner.nproc=4 x learner.nnodes=4 ranks",
        ),
    ],
)
def test_bad_multinode_configs_name_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_podsrl_run_refuses_a_multinode_learner(capsys):
    from launcher.cli import main

    assert main(["run", "learner.nnodes=2", "learner.rdzv_endpoint=h:29400"]) == 2
    assert "run `podsrl learner` on each node" in capsys.readouterr().err


def test_health_of_a_node_other_than_0_needs_no_ports(tmp_path, capsys):
    """Only node 0 (global rank 0) binds the learner's ports: ``podsrl health`` (the probes) passes on the
    others while the process lives, and still checks node 0's ports."""
    from launcher.cli import main

    config = tmp_path / "run.toml"
    announce, weights = free_ports(2)
    config.write_text(f'[net]\nbind_host = "0.0.0.0"\nannounce_port = {announce}\nweights_port = {weights}\n')
    nodes = ["learner.nnodes=2", "learner.rdzv_endpoint=learner-0.learner:29400"]
    procs = []
    try:
        for rank in (1, 0):
            argv = [sys.executable, "-c", "import time; time.sleep(60)", "-m", "learner.train", "--config"]
            procs.append(subprocess.Popen([*argv, str(config), *nodes, f"learner.node_rank={rank}"]))

        def execed() -> bool:
            return all(b"\0learner.node_rank=" in Path(f"/proc/{p.pid}/cmdline").read_bytes() for p in procs)

        wait_for(execed, 10, "the stand-ins to exec")
        assert main(["health", "--pid", str(procs[0].pid)]) == 0
        assert "alive, node 1 of 2 (node 0 binds the learner's ports)" in capsys.readouterr().out
        assert main(["health", "--pid", str(procs[1].pid)]) == 1
        assert "(net.announce_port)" in capsys.readouterr().err
    finally:
        for p in procs:
            p.kill()
            p.wait()
