"""deploy/kubernetes/ (kustomize base + GPU overlay) rendered as `kubectl apply -k` would, validated against a
current Kubernetes schema and against podsrl's own parsers and config (k8s_check.py); every broken variant
fails with a message that names the object."""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from k8s_check import KUBERNETES, OVERLAYS, K8sError, check, main, render, validate_schema

Objs = list[dict[str, Any]]


def find(objs: Objs, kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def container(objs: Objs, kind: str, name: str) -> dict[str, Any]:
    return find(objs, kind, name)["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_every_object_is_valid_for_a_current_kubernetes(overlay):
    objs = render(overlay)
    assert validate_schema(objs).split(".")[:2] >= ["1", "35"]
    assert Counter(o["kind"] for o in objs)["Service"] == 4


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_render_is_what_kubectl_kustomize_applies(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=True).stdout

    def key(o: dict[str, Any]) -> str:
        return f"{o['kind']}/{o['metadata']['name']}"

    theirs = sorted((o for o in yaml.safe_load_all(out) if o), key=key)
    assert sorted(render(overlay), key=key) == theirs


def test_base_is_one_cpu_run():
    procs = check(render(KUBERNETES / "base"))
    assert Counter(p.role for p in procs) == {"selector": 1, "learner": 1, "rollout": 2}
    assert [p.args.server_id for p in procs if p.role == "rollout"] == ["rollout-0", "rollout-1"]
    for p in procs:
        assert (p.cfg.net.selector_host, p.cfg.net.learner_host, p.cfg.net.auth) == ("selector", "learner-lead", "on")
        assert p.cfg.learner.device == "cpu" and p.container["image"] == "podsrl:cpu"


def test_gpu_overlay_runs_the_learner_on_two_nodes_with_their_gpus():
    objs = render(KUBERNETES / "gpu")
    procs = check(objs)
    learners = [p for p in procs if p.role == "learner"]
    assert [p.cfg.learner.node_rank for p in learners] == [0, 1]
    assert all(p.cfg.learner.nnodes == 2 and p.cfg.learner.rdzv_endpoint == "learner-0.learner:29400" for p in learners)
    assert container(objs, "Job", "learner")["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert [p.args.server_id for p in procs if p.role == "rollout"] == ["rollout-0", "rollout-1", "rollout-2"]
    assert {p.container["image"] for p in procs} == {"podsrl:gpu"}
    assert all(p.cfg.rollout.engine.type == "vllm" for p in procs)
    # the patches kept the base's mounts and added the models volume
    mounts = [m["mountPath"] for m in container(objs, "Job", "learner")["volumeMounts"]]
    assert sorted(mounts) == sorted(
        ["/podsrl/run.toml", "/podsrl/runs", "/podsrl/keys", "/podsrl/keys/rollout", "/dev/shm", "/podsrl/models"]
    )


def _wrong_port(objs: Objs) -> None:
    find(objs, "Service", "selector")["spec"]["ports"][1]["targetPort"] = 5656


def _missing_secret(objs: Objs) -> None:
    c = container(objs, "Job", "learner")
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "keys"]


def _bad_command(objs: Objs) -> None:
    container(objs, "StatefulSet", "rollout")["args"][2] = "--srv-id"


def _schema_error(objs: Objs) -> None:
    find(objs, "Deployment", "selector")["spec"]["replicas"] = "one"


def _lead_selects_every_node(objs: Objs) -> None:
    del find(objs, "Service", "learner-lead")["spec"]["selector"]["batch.kubernetes.io/job-completion-index"]


def _dns_hidden_until_ready(objs: Objs) -> None:
    del find(objs, "Service", "learner")["spec"]["publishNotReadyAddresses"]


def _gpus_not_ranks(objs: Objs) -> None:
    container(objs, "Job", "learner")["resources"]["limits"]["nvidia.com/gpu"] = 1


def _no_probe(objs: Objs) -> None:
    del container(objs, "Deployment", "selector")["livenessProbe"]


def _fixed_node_rank(objs: Objs) -> None:
    container(objs, "Job", "learner")["args"][-1] = "learner.node_rank=0"


def _rendezvous_elsewhere(objs: Objs) -> None:
    cm = find(objs, "ConfigMap", "podsrl-run")["data"]
    cm["run.toml"] = cm["run.toml"].replace("learner-0.learner:29400", "learner.default.svc:29400")


def _too_few_learner_pods(objs: Objs) -> None:
    find(objs, "Job", "learner")["spec"]["parallelism"] = 1


def _checkpoints_vanish(objs: Objs) -> None:
    job = find(objs, "Job", "learner")["spec"]["template"]["spec"]
    next(v for v in job["volumes"] if v["name"] == "runs").update(persistentVolumeClaim=None, emptyDir={})
    next(v for v in job["volumes"] if v["name"] == "runs").pop("persistentVolumeClaim")


def _own_run_dir(objs: Objs) -> None:
    rollout = find(objs, "StatefulSet", "rollout")["spec"]["template"]["spec"]
    next(v for v in rollout["volumes"] if v["name"] == "runs")["persistentVolumeClaim"]["claimName"] = "other"


BROKEN: list[tuple[str, Callable[[Objs], None], str]] = [
    ("wrong port", _wrong_port, r"Service/selector: the selector binds 5556 .* maps 5556 to 5656"),
    (
        "missing secret",
        _missing_secret,
        r"Job/learner \(pod 0, container learner\): authentication .*learner.key_secret",
    ),
    (
        "bad command",
        _bad_command,
        r"StatefulSet/rollout: `podsrl rollout --config /podsrl/run.toml --srv-id rollout-0` does not",
    ),
    ("schema error", _schema_error, r"Deployment/selector: not a valid Kubernetes 1\.\d+\.\d+ object at spec/replicas"),
    ("lead selects every node", _lead_selects_every_node, r"Service/learner-lead: selects \['Job/learner \(pod 0"),
    ("dns hidden until ready", _dns_hidden_until_ready, r"Service/learner: .*publishNotReadyAddresses: true"),
    ("gpus are not ranks", _gpus_not_ranks, r"Job/learner \(pod 0.*learner.nproc=2 but it asks for 1 GPU"),
    ("no probe", _no_probe, r"Deployment/selector \(pod 0.*livenessProbe must run \[podsrl, health\]"),
    ("fixed node rank", _fixed_node_rank, r"Job/learner \(pod 1.*learner.node_rank=0: pass \$\(NODE_RANK\)"),
    ("rendezvous elsewhere", _rendezvous_elsewhere, r"Job/learner: learner.rdzv_endpoint host 'learner.default.svc'"),
    (
        "too few learner pods",
        _too_few_learner_pods,
        r"Job/learner: the learner is an Indexed Job with completions = parallel",
    ),
    ("own run dir", _own_run_dir, r"different claims .*'StatefulSet/rollout \(pod 0, container rollout\)': 'other'"),
    (
        "checkpoints vanish",
        _checkpoints_vanish,
        r"Job/learner \(pod 0.*run.dir=\S+ is on no writable PersistentVolumeClaim",
    ),
]


@pytest.mark.parametrize("why, breaks, message", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_variants_fail_naming_the_object(why, breaks, message):
    objs = copy.deepcopy(render(KUBERNETES / "gpu"))
    breaks(objs)
    with pytest.raises(K8sError, match=message):
        validate_schema(objs)
        check(objs)


def test_cli_checks_both(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "base: 9 objects valid" in out and "gpu: 10 objects valid" in out and out.endswith("k8s_check: ok\n")
