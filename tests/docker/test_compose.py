"""docker/docker-compose.yml as the real Docker Compose resolves it, checked against podsrl's own parsers
and config (compose_check.py); every broken variant fails with a message that names the service."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_check import COMPOSE_FILE, ENV_EXAMPLE, ComposeError, check, main, resolve


def test_gpu_profile_is_one_run_of_selector_learner_and_rollout_servers_on_their_own_gpus():
    project = resolve("gpu")
    procs = check(project)
    assert Counter(p.role for p in procs) == {"selector": 1, "learner": 1, "rollout": 3}
    rollouts = [p for p in procs if p.role == "rollout"]
    assert [p.args.server_id for p in rollouts] == ["rollout-0", "rollout-1", "rollout-2"]
    for p in procs:
        net = p.cfg.net
        assert (net.selector_host, net.learner_host, net.bind_host) == ("selector", "learner", "0.0.0.0")
        assert p.cfg.rollout.engine.type == "vllm" and p.cfg.net.keys_dir == "keys"
        assert p.host_path(p.cfg.run.dir) == COMPOSE_FILE.parents[1] / "runs" / "gsm8k-qwen2.5-0.5b"
    services = project["services"]
    learner_gpus = services["learner"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
    assert learner_gpus == ["0"] and next(p for p in procs if p.role == "learner").cfg.learner.nproc == 1
    ports = {(s, port["host_ip"], port["target"]) for s in services for port in services[s].get("ports", [])}
    assert ports == {("selector", "127.0.0.1", 5555), ("learner", "127.0.0.1", 5557), ("learner", "127.0.0.1", 5558)}


def test_cpu_profile_is_the_tiny_run_without_gpu_download_or_published_port():
    project = resolve("cpu")
    procs = check(project)
    assert Counter(p.role for p in procs) == {"selector": 1, "learner": 1, "rollout": 2}
    for p in procs:
        assert p.cfg.model.init == "tiny" and not p.cfg.model.path and p.cfg.task.type == "copy"
        assert p.cfg.rollout.engine.device == "cpu" and p.cfg.learner.device == "cpu" and p.cfg.net.auth == "off"
        assert p.image.path.name == "Dockerfile.cpu"
    for name, spec in project["services"].items():
        assert not (spec.get("deploy") or {}).get("resources"), f"{name} reserves a device"
        assert not spec.get("ports"), f"{name} publishes a port"


def test_gpu_is_the_default_profile_and_cpu_replaces_it():
    assert set(resolve(None)["services"]) == {"selector", "learner", "rollout"}
    assert set(resolve("cpu")["services"]) == {"selector-cpu", "learner-cpu", "rollout-cpu"}


def test_env_example_lists_every_knob_with_the_compose_default():
    text = "\n".join(
        line.split(" #")[0] for line in COMPOSE_FILE.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    pairs = set(re.findall(r"\$\{(\w+):-([^}]*)\}", text))
    used = dict(pairs)
    assert len(used) == len(pairs), f"a knob with two defaults: {sorted(pairs)}"
    example = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line.strip() and not line.startswith("#")
    )
    assert {k: v for k, v in example.items() if k != "COMPOSE_PROFILES"} == used
    assert not re.search(r"\$\{\w+\}", text), "a knob without a default"


def test_checker_command_line_passes_on_the_shipped_files(capsys):
    assert main([]) == 0
    assert capsys.readouterr().out.strip().endswith("compose_check: ok")


# -- broken variants ---------------------------------------------------------------------------------
def _volumes_without(target: str) -> Callable[[dict[str, Any]], None]:
    def mutate(service: dict[str, Any]) -> None:
        service["volumes"] = [v for v in service["volumes"] if v["target"] != target]

    return mutate


def _append(args: str) -> Callable[[dict[str, Any]], None]:
    def mutate(service: dict[str, Any]) -> None:
        service["command"] += f" {args}"

    return mutate


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(service: dict[str, Any]) -> None:
        service[key] = value

    return mutate


# (profile, service to edit, edit, knobs, the error expected)
BROKEN = {
    "wrong flag": (
        "gpu",
        "selector",
        _set("entrypoint", ["podsrl", "selector", "--verbose"]),
        {},
        r"service selector: `podsrl selector --verbose .*` does not parse: .*unrecognized arguments: --verbose",
    ),
    "unknown subcommand": (
        "cpu",
        "learner-cpu",
        _set("entrypoint", ["podsrl", "lerner"]),
        {},
        r"service learner-cpu: `podsrl lerner` is not a process a service runs",
    ),
    "not a process": (
        "cpu",
        "learner-cpu",
        _set("entrypoint", ["podsrl", "run"]),
        {},
        r"service learner-cpu: `podsrl run` is not a process",
    ),
    "not podsrl": (
        "cpu",
        "selector-cpu",
        _set("entrypoint", ["python", "-m", "selector.server"]),
        {},
        r"service selector-cpu: runs \['python'\], not podsrl",
    ),
    "unknown key in one service": (
        "cpu",
        "rollout-cpu",
        _append("selector.kep=3"),
        {},
        r"service rollout-cpu: invalid config:\n  selector.kep: Extra inputs",
    ),
    "unknown key from a knob": (
        "gpu",
        None,
        None,
        {"EXTRA_OVERRIDES": "learner.lrr=1"},
        r"service learner: invalid config .*\n  learner.lrr: Extra inputs",
    ),
    "out-of-range knob": (
        "gpu",
        None,
        None,
        {"MAX_STALENESS": "-1"},
        r"service learner: invalid config .*\n  max_staleness: Input should be greater",
    ),
    "port the selector does not bind": (
        "gpu",
        "learner",
        _append("net.batch_port=6000"),
        {},
        r"service learner: net.batch_port=6000 but service selector \(the selector\) "
        r"binds 5556",
    ),
    "published port that is not bound": (
        "gpu",
        "selector",
        _set("ports", ["127.0.0.1:5555:5999"]),
        {},
        r"service selector: publishes container port 5999, but the selector binds",
    ),
    "published as another host port": (
        "gpu",
        "selector",
        _set("ports", ["127.0.0.1:6555:5555"]),
        {},
        r"service selector: publishes container port 5555 as host port 6555",
    ),
    "a rollout port left unpublished": (
        "gpu",
        "learner",
        _set("ports", ["127.0.0.1:5557:5557"]),
        {},
        r"service learner: does not publish net.weights_port=5558",
    ),
    "wrong hostname": (
        "cpu",
        "rollout-cpu",
        _append("net.selector_host=selektor"),
        {},
        r"service rollout-cpu: net.selector_host='selektor' is not the selector's service name",
    ),
    "loopback bind": (
        "cpu",
        "learner-cpu",
        _append("net.bind_host=127.0.0.1"),
        {},
        r"service learner-cpu: net.bind_host='127.0.0.1' binds loopback",
    ),
    "processes disagree": (
        "cpu",
        "rollout-cpu",
        _append("max_staleness=3"),
        {},
        r"service rollout-cpu: max_staleness=3 but service learner-cpu has 2",
    ),
    "run dir on no volume": (
        "cpu",
        "learner-cpu",
        _set("volumes", []),
        {},
        r"service learner-cpu: run.dir=runs/tiny-compose \(/podsrl/runs/tiny-compose\) is on no "
        r"writable volume",
    ),
    "run file not mounted": (
        "gpu",
        "selector",
        _volumes_without("/podsrl/run.toml"),
        {},
        r"service selector: --config run.toml \(/podsrl/run.toml in the container\) is on no bind",
    ),
    "dataset not mounted": (
        "gpu",
        "learner",
        _volumes_without("/podsrl/data"),
        {},
        r"service learner: task.dataset=data/gsm8k/train.jsonl .* is on no volume",
    ),
    "model not mounted": (
        "gpu",
        "learner",
        _volumes_without("/podsrl/models"),
        {},
        r"service learner: model.path=models/qwen2.5-0.5b-instruct .* is on no volume",
    ),
    "keys not mounted": (
        "gpu",
        "rollout",
        _volumes_without("/podsrl/keys"),
        {},
        r"service rollout: authentication is on .* net.keys_dir='keys' is on no volume",
    ),
    "slots and replicas differ": (
        "cpu",
        "rollout-cpu",
        _set("environment", {"PODSRL_SLOTS": "3", "PODSRL_SLOT_DIR": "/podsrl/runs/s"}),
        {},
        r"service rollout-cpu: PODSRL_SLOTS=3 but deploy.replicas=2",
    ),
    "learner ranks and GPUs differ": (
        "gpu",
        None,
        None,
        {"LEARNER_GPUS": "0,4"},
        r"service learner: learner.nproc=1 but it reserves 2 GPU\(s\)",
    ),
    "a GPU reserved twice": (
        "gpu",
        None,
        None,
        {"ROLLOUT_GPUS": "0,1,2"},
        r"service rollout: GPU 0 is also reserved by service learner",
    ),
    "more rollout replicas than GPUs": (
        "gpu",
        None,
        None,
        {"ROLLOUT_SERVERS": "4"},
        r"service rollout: 4 replicas but 3 GPU\(s\)",
    ),
    "vllm without a GPU": (
        "gpu",
        "rollout",
        _set("deploy", {"replicas": "${ROLLOUT_SERVERS:-3}"}),
        {},
        r"service rollout: rollout.engine.type='vllm' needs a GPU",
    ),
    "restart forever": (
        "gpu",
        None,
        None,
        {"RESTART_POLICY": "unless-stopped"},
        r"service learner: restart: unless-stopped starts a finished process again",
    ),
    "compose itself rejects it": (
        "gpu",
        "selector",
        _set("comand", ["selector"]),
        {},
        r"docker compose config rejects .*comand",
    ),
}


def _write(tmp_path: Path, service: str | None = None, mutate: Callable | None = None) -> Path:
    """The compose file as PyYAML reads it (anchors expanded), with one service edited."""
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    if mutate is not None:
        mutate(data["services"][service])
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_unedited_round_trip_passes(tmp_path: Path):
    """The broken variants below differ from a passing file by their one edit only."""
    path = _write(tmp_path)
    for profile in ("gpu", "cpu"):
        check(resolve(profile, compose_file=path))


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_compose_file_fails_naming_the_service(case: str, tmp_path: Path):
    profile, service, mutate, knobs, expected = BROKEN[case]
    path = _write(tmp_path, service, mutate) if mutate else COMPOSE_FILE
    with pytest.raises(ComposeError, match=expected):
        check(resolve(profile, env=knobs, compose_file=path))
