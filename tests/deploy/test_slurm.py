"""deploy/slurm/podsrl.sbatch: checked statically everywhere, run on a real one-node Slurm where one answers.

Static: ``bash -n``, then the script itself runs with stand-ins for the three Slurm commands it calls
(``scontrol show hostnames`` splits the node list; ``srun`` runs its command once per task with
``SLURM_PROCID`` set; ``podsrl`` records its argv instead of running), so every podsrl command line it
would start is parsed with podsrl's own CLI (the compose checker's ``parse_podsrl``) and its config loads.
The live test needs ``sinfo`` to answer (CI has no Slurm): it submits the script with ``sbatch --wait``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, child_env, free_ports

sys.path.insert(0, str(ROOT / "tests" / "docker"))
from compose_check import PER_PROCESS, _flat, parse_podsrl  # noqa: E402

from protocol.config import Config, load_config  # noqa: E402

SBATCH = ROOT / "deploy" / "slurm" / "podsrl.sbatch"
STUBS = {
    "scontrol": '[ "$1 $2" = "show hostnames" ] && echo "$3" | tr , "\\n"',
    "srun": 'n=1; while [ "${1#-}" != "$1" ]; do case $1 in --ntasks=*) n=${1#--ntasks=};; esac; shift; done\n'
    'for k in $(seq 0 $((n - 1))); do SLURM_PROCID=$k "$@"; done',
    "podsrl": 'printf "%s\\0" "$@" > "$(mktemp "$PODSRL_CALLS/call.XXXXXX")"',
}


def dry_run(tmp: Path, nodes: str, **knobs: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run the script with the stand-ins; its output and the argv of every podsrl process it starts."""
    bin_dir, calls = tmp / "bin", tmp / "calls"
    bin_dir.mkdir(parents=True)
    calls.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": nodes,
        "PODSRL_CALLS": str(calls),
        "RUN_DIR": str(tmp / "run"),
        **knobs,
    }
    res = subprocess.run(["bash", str(SBATCH)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    argvs = [p.read_bytes().decode().rstrip("\0").split("\0") for p in sorted(calls.iterdir())]
    return res, argvs


def parsed(argvs: list[list[str]]) -> list[tuple[str, argparse.Namespace, Config]]:
    out = []
    for argv in argvs:
        args = parse_podsrl("podsrl.sbatch", argv)
        out.append((argv[0], args, load_config(args.config, args.overrides)))
    return out


def test_the_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


def test_learner_on_the_first_nodes_rollout_servers_and_selector_on_the_rest(tmp_path):
    res, argvs = dry_run(tmp_path, "n1,n2,n3,n4", LEARNER_NODES="2", LEARNER_NPROC="4", ROLLOUT_PER_NODE="2")
    assert res.returncode == 0, res.stderr
    procs = parsed(argvs)
    learners = sorted((c for role, _, c in procs if role == "learner"), key=lambda c: c.learner.node_rank)
    assert [c.learner.node_rank for c in learners] == [0, 1]
    for c in learners:
        assert (c.learner.nnodes, c.learner.nproc, c.learner.rdzv_endpoint) == (2, 4, "n1:29400")
    assert sorted(a.server_id for role, a, _ in procs if role == "rollout") == ["n3-0", "n3-1", "n4-0", "n4-1"]
    assert [role for role, _, _ in procs].count("selector") == 1
    ref = _flat(learners[0])
    for _, _, c in procs:  # one run: the same config apart from per-process keys and the node rank
        assert c.net.selector_host == "n3" and c.net.learner_host == "n1" and c.net.auth == "on"
        assert c.net.keys_dir == "keys" and c.run.dir == str(tmp_path / "run")
        assert {k for k, v in _flat(c).items() if v != ref[k]} <= {"learner.node_rank"} | {
            k for k in ref if k.startswith(PER_PROCESS)
        }
    assert "learner on n1 n2 (rendezvous n1:29400), selector on n3, rollout servers on n3 n4" in res.stdout


def test_one_node_shares_it_and_too_few_nodes_fail(tmp_path):
    res, argvs = dry_run(tmp_path / "a", "solo", KEYS_DIR="off")
    assert res.returncode == 0, res.stderr
    procs = parsed(argvs)
    assert sorted(role for role, _, _ in procs) == ["learner", "rollout", "rollout", "selector"]
    assert all(c.net.selector_host == c.net.learner_host == "solo" and c.net.auth == "off" for _, _, c in procs)
    res, argvs = dry_run(tmp_path / "b", "n1", LEARNER_NODES="2")
    assert res.returncode == 2 and "LEARNER_NODES=2 but the job has 1 node(s)" in res.stderr and not argvs


def test_a_run_file_that_does_not_load_is_caught(tmp_path):
    res, argvs = dry_run(tmp_path, "n1,n2", EXTRA="learner.nproc=0")
    assert res.returncode == 0  # the script does not load configs: the processes (and this check) do
    with pytest.raises(ValueError, match="learner.nproc"):
        parsed(argvs)


def _slurm_answers() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0


@pytest.mark.slurm
@pytest.mark.skipif(not _slurm_answers(), reason="no Slurm controller answers here (CI has none: docs/DEPLOY.md)")
def test_sbatch_runs_a_tiny_run_on_a_one_node_slurm(tmp_path):
    node = subprocess.run(["sinfo", "-h", "-o", "%N"], capture_output=True, text=True).stdout.split()[0]
    keys, run_dir = tmp_path / "keys", tmp_path / "run"
    *net, rdzv = free_ports(5)
    ports = " ".join(
        f"net.{k}={p}" for k, p in zip(("group_port", "batch_port", "announce_port", "weights_port"), net, strict=True)
    )
    python = [sys.executable, "-m", "launcher.cli"]
    subprocess.run([*python, "keys", str(keys), "--rollout", f"{node}-0"], check=True, env=child_env(), cwd=ROOT)
    env = {
        **child_env(),
        "RUN_FILE": "configs/tiny.toml",
        "RUN_DIR": str(run_dir),
        "KEYS_DIR": str(keys),
        "ROLLOUT_PER_NODE": "1",
        "PODSRL": " ".join(python),
        "RDZV_PORT": str(rdzv),
        "EXTRA": f"run.steps=4 learner.groups_per_step=2 learner.checkpoint_every=0 {ports}",
    }
    sbatch = ["sbatch", "--parsable", "--wait", "--nodes=1", f"--output={tmp_path}/job.out", str(SBATCH)]
    job = subprocess.Popen(sbatch, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = job.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        job.kill()
        stdout, stderr = job.communicate()
    finally:
        job_id = (stdout or "").strip().split(";")[0] if job.returncode is not None else ""
        if job_id:
            subprocess.run(["scancel", job_id], check=False)  # no-op for a finished job
    res = subprocess.CompletedProcess(sbatch, job.returncode, stdout, stderr)
    out = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    logs = "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in sorted((run_dir / "logs").glob("*.log")))
    assert res.returncode == 0, f"{res.stdout}{res.stderr}\n{out}\n{logs}"
    assert (run_dir / "checkpoints" / "v000004").is_dir(), logs
    assert "learner done at version 4" in (run_dir / "logs" / "learner-0.log").read_text()
