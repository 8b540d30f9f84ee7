"""Check deploy/kubernetes/ (a kustomize base and its GPU overlay) against Kubernetes and podsrl, no cluster.

    python tests/deploy/k8s_check.py                       # base and gpu
    python tests/deploy/k8s_check.py deploy/kubernetes/gpu

1. Render what ``kubectl apply -k DIR`` applies. :func:`render` is a small kustomize of the features these
   files use: ``resources`` (files and folders), ``images`` (name -> newName:newTag) and ``patches``
   (strategic merge, lists merged by their Kubernetes merge key: containers, volumes, env by ``name``,
   volumeMounts by ``mountPath``, ports by ``containerPort`` or ``port``, the patch's items first as
   kustomize orders them; other lists replaced), so the
   check needs no kustomize binary; where ``kubectl`` is installed the tests compare it with
   ``kubectl kustomize``.
2. Validate every object against the OpenAPI schema of a current Kubernetes (PyPI ``kubernetes-validate``,
   strict: unknown fields are errors).
3. podsrl's own checks, as for docker compose (``tests/docker/compose_check.py``, whose parser and
   tables are reused): every podsrl container's command parses with podsrl's CLI and its config (the
   ConfigMap's run file, ``$(VAR)`` expanded per pod as Kubernetes does) loads; one selector, a learner
   of ``learner.nnodes`` pods; Services and DNS names agree with the hosts and ports of the config;
   volumes and Secrets cover what each process reads; probes run ``podsrl health``; GPUs match ranks.

Every problem is a :class:`K8sError` whose message names the object (``Kind/name``) and the fix.
"""

from __future__ import annotations

import argparse
import copy
import posixpath
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "docker"))

from compose_check import HOSTS, LINKS, PER_PROCESS, ComposeError, _flat, parse_podsrl  # noqa: E402

from protocol.auth import auth_enabled, is_loopback  # noqa: E402
from protocol.config import Config, load_config  # noqa: E402

KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = (KUBERNETES / "base", KUBERNETES / "gpu")
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name"}
MERGE_KEYS |= {"volumeMounts": "mountPath", "ports": ("containerPort", "port")}  # type: ignore[dict-item]
WORKLOADS = ("Deployment", "StatefulSet", "Job")
INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
GPU = "nvidia.com/gpu"
PER_POD = (*PER_PROCESS, "learner.node_rank")  # keys a pod may set for itself
KEY_FILES = {  # what each role reads from net.keys_dir (protocol/auth.py); {id}: the rollout server's id
    "selector": ("selector.key_secret", "learner.key", "rollout/"),
    "learner": ("learner.key_secret", "selector.key", "rollout/"),
    "rollout": ("selector.key", "learner.key", "rollout/{id}.key_secret"),
}


class K8sError(ValueError):
    """The manifests would not run as one podsrl run; the message names the object and the fix."""


def label(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# -- rendering ------------------------------------------------------------------------------------------
def merge(base: Any, patch: Any, key: str = "") -> Any:
    """A strategic merge patch of the kinds these manifests use (see the module's docstring)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        names = MERGE_KEYS[key] if isinstance(MERGE_KEYS[key], tuple) else (MERGE_KEYS[key],)
        field = next((n for n in names if all(isinstance(i, dict) and n in i for i in base + patch)), None)
        if field is not None:  # the patch's items first, in its order (merged), then the base's others
            patched = {item[field] for item in patch}
            merged = [
                merge(next((b for b in base if b[field] == item[field]), {}), item) if item else item for item in patch
            ]
            return merged + [copy.deepcopy(b) for b in base if b[field] not in patched]
    return copy.deepcopy(patch)


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl apply -k directory`` applies (see the module's docstring for the subset)."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - {"apiVersion", "kind", "resources", "images", "patches"}
    if unknown:
        raise K8sError(f"{directory}/kustomization.yaml uses {sorted(unknown)}, which k8s_check.render does not do")
    objs: list[dict[str, Any]] = []
    for res in spec.get("resources", []):
        path = (directory / res).resolve()
        objs += render(path) if path.is_dir() else [o for o in yaml.safe_load_all(path.read_text()) if o]
    for p in spec.get("patches", []):
        patch = yaml.safe_load((directory / p["path"]).read_text())
        at = [i for i, o in enumerate(objs) if label(o) == label(patch)]
        if len(at) != 1:
            raise K8sError(f"{directory}/{p['path']}: patches {label(patch)}, which the resources do not hold once")
        objs[at[0]] = merge(objs[at[0]], patch)
    for image in spec.get("images", []):
        new = f"{image.get('newName', image['name'].split(':')[0])}:{image['newTag']}"
        for o in objs:
            for c in _pod(o).get("containers", []) if o.get("kind") in WORKLOADS else []:
                if c.get("image") in (image["name"], image["name"].split(":")[0]):
                    c["image"] = new
    return objs


# -- schema -------------------------------------------------------------------------------------------------
def validate_schema(objs: list[dict[str, Any]], version: str | None = None) -> str:
    """Every object against Kubernetes ``version``'s OpenAPI schema (default: the newest the package has)."""
    import kubernetes_validate

    version = version or kubernetes_validate.latest_version()
    for o in objs:
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = "/".join(str(p) for p in e.path)
            raise K8sError(f"{label(o)}: not a valid Kubernetes {version} object at {where}: {e.message}") from None
    return version


# -- podsrl's checks ----------------------------------------------------------------------------------------
def _pod(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


@dataclass
class Process:
    """One podsrl process of the manifests: one container of one pod (replica, or Job index)."""

    obj: dict[str, Any]
    index: int
    container: dict[str, Any]
    role: str
    argv: list[str]
    args: argparse.Namespace
    cfg: Config

    @property
    def name(self) -> str:
        return f"{label(self.obj)} (pod {self.index}, container {self.container['name']})"

    @property
    def pod_name(self) -> str:
        return f"{self.obj['metadata']['name']}-{self.index}"

    @property
    def labels(self) -> dict[str, str]:
        labels = dict(self.obj["spec"]["template"].get("metadata", {}).get("labels", {}))
        if self.obj["kind"] == "Job":
            labels |= {"job-name": self.obj["metadata"]["name"], INDEX_LABEL: str(self.index)}
        return labels

    def mount(self, path: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(volumeMount, volume) holding ``path``, the deepest one."""
        p = posixpath.normpath(path)
        hits = [
            m
            for m in self.container.get("volumeMounts", [])
            if p == m["mountPath"] or p.startswith(m["mountPath"].rstrip("/") + "/")
        ]
        if not hits:
            return None
        m = max(hits, key=lambda m: len(m["mountPath"]))
        volume = next((v for v in _pod(self.obj).get("volumes", []) if v["name"] == m["name"]), None)
        if volume is None:
            raise K8sError(f"{self.name}: mounts volume {m['name']!r}, which the pod does not define")
        return m, volume


def _expand(text: str, env: dict[str, str], where: str) -> str:
    def var(m: re.Match[str]) -> str:
        if m.group(1) not in env:
            raise K8sError(f"{where}: $({m.group(1)}) is no variable of the container: define it in env")
        return env[m.group(1)]

    return re.sub(r"\$\((\w+)\)", var, text)


def _env(obj: dict[str, Any], container: dict[str, Any], index: int) -> dict[str, str]:
    """The container's variables as Kubernetes sets them in pod ``index``."""
    out = {}
    for e in container.get("env", []):
        field = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if "value" in e:
            out[e["name"]] = str(e["value"])
        elif field == "metadata.name":
            out[e["name"]] = f"{obj['metadata']['name']}-{index}"
        elif field == INDEX_ANNOTATION and obj["spec"].get("completionMode") == "Indexed":
            out[e["name"]] = str(index)
        elif field is not None:
            raise K8sError(f"{label(obj)}: env {e['name']} reads {field}, which k8s_check cannot know")
    return out


def _config(objs: list[dict[str, Any]], proc: Process) -> Config:
    path = proc.args.config
    if not path:
        return load_config(None, proc.args.overrides)
    found = proc.mount(path)
    source = found[1].get("configMap") if found else None
    if found is None or source is None:
        raise K8sError(f"{proc.name}: --config {path} is on no ConfigMap volume: mount the run file's ConfigMap")
    m = found[0]
    key = m.get("subPath") or posixpath.relpath(path, m["mountPath"])
    cm = next((o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == source["name"]), None)
    if cm is None or key not in cm.get("data", {}):
        raise K8sError(f"{proc.name}: --config {path} is key {key!r} of ConfigMap {source['name']}, which is missing")
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(cm["data"][key])
        f.flush()
        try:
            return load_config(f.name, proc.args.overrides)
        except ValueError as e:
            raise K8sError(f"{proc.name}: ConfigMap/{source['name']} {key}: {e}") from None


def processes(objs: list[dict[str, Any]]) -> list[Process]:
    out = []
    for o in objs:
        if o.get("kind") not in WORKLOADS:
            continue
        spec = o["spec"]
        pods = spec.get("completions", 1) if o["kind"] == "Job" else spec.get("replicas", 1)
        for i in range(pods):
            for c in _pod(o)["containers"]:
                env = _env(o, c, i)
                argv = [_expand(a, env, label(o)) for a in [*c.get("command", []), *c.get("args", [])]]
                if argv[:1] != ["podsrl"]:
                    raise K8sError(f"{label(o)}: container {c['name']} runs {argv[:1]}, not podsrl")
                try:
                    args = parse_podsrl(label(o), argv[1:])
                except ComposeError as e:
                    raise K8sError(str(e).removeprefix("service ")) from None
                proc = Process(o, i, c, argv[1], argv[1:], args, Config())
                proc.cfg = _config(objs, proc)
                out.append(proc)
    return out


def _services(objs: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == name), None)


def _selects(service: dict[str, Any], proc: Process) -> bool:
    sel = service["spec"].get("selector") or {}
    return bool(sel) and all(proc.labels.get(k) == str(v) for k, v in sel.items())


def _check_links(objs: list[dict[str, Any]], procs: list[Process], binders: dict[str, Process]) -> None:
    """Clients find each binder by a Service that selects it (rank 0's pod alone, for the learner) and maps
    every port it binds to the same container port."""
    learners = [p for p in procs if p.role == "learner"]
    for role, binder in binders.items():
        if is_loopback(binder.cfg.net.bind_host):
            raise K8sError(f"{binder.name}: net.bind_host={binder.cfg.net.bind_host!r}: set 0.0.0.0")
        host = getattr(binder.cfg.net, HOSTS[role])
        service = _services(objs, host.split(".")[0])
        if service is None:
            raise K8sError(f"{label(binder.obj)}: net.{HOSTS[role]}={host!r} is no Service of the manifests")
        chosen = [p for p in procs if p.role == role and _selects(service, p)]
        if chosen != [binder]:
            what = f"global rank 0: select its pod 0 ({INDEX_LABEL})" if role == "learner" else "pod"
            raise K8sError(
                f"{label(service)}: selects {[p.name for p in chosen] or 'no pod'}, but net.{HOSTS[role]} must "
                f"reach the {role}'s {what}"
            )
        bound = {getattr(binder.cfg.net, k) for k, (r, _) in LINKS.items() if r == role}
        container_ports = {p.get("name"): p["containerPort"] for p in binder.container.get("ports", [])}
        for port in sorted(bound):
            entry = next((s for s in service["spec"].get("ports", []) if s["port"] == port), None)
            target = entry.get("targetPort", port) if entry else None
            target = container_ports.get(target, target) if isinstance(target, str) else target
            if target != port:
                raise K8sError(
                    f"{label(service)}: the {role} binds {port} (net.*_port), but the Service maps "
                    f"{'no port ' + str(port) if entry is None else f'{port} to {target}'}: map {port} to {port}"
                )
    if not learners:
        return
    n = learners[0].cfg.learner.nnodes
    job = learners[0].obj
    if len(learners) != n or {p.obj["metadata"]["name"] for p in learners} != {job["metadata"]["name"]}:
        raise K8sError(f"{label(job)}: learner.nnodes={n} but the manifests run {len(learners)} learner pod(s)")
    if job["kind"] != "Job" or job["spec"].get("completionMode") != "Indexed" or job["spec"].get("parallelism") != n:
        raise K8sError(f"{label(job)}: the learner is an Indexed Job with completions = parallelism = learner.nnodes")
    for p in learners:
        if p.cfg.learner.node_rank != p.index:
            raise K8sError(f"{p.name}: learner.node_rank={p.cfg.learner.node_rank}: pass $(NODE_RANK), its index")
    if n > 1:
        sub = _pod(job).get("subdomain")
        host = learners[0].cfg.learner.rdzv_endpoint.rpartition(":")[0]
        if not sub or host.split(".")[:2] != [f"{job['metadata']['name']}-0", sub]:
            raise K8sError(
                f"{label(job)}: learner.rdzv_endpoint host {host!r} is not pod 0's name "
                f"{job['metadata']['name']}-0.{sub}: set it so, with spec.template.spec.subdomain"
            )
        headless = _services(objs, sub)
        if (
            headless is None
            or headless["spec"].get("clusterIP") != "None"
            or not headless["spec"].get("publishNotReadyAddresses")
            or not all(_selects(headless, p) for p in learners)
        ):
            raise K8sError(
                f"Service/{sub}: the learner pods' subdomain needs a headless Service (clusterIP: None) that "
                "selects them with publishNotReadyAddresses: true (the rendezvous starts before any probe passes)"
            )


def _check_pod(p: Process) -> None:
    """Probes, volumes, keys and GPUs of one process."""
    for probe in ("startupProbe", "livenessProbe"):
        command = p.container.get(probe, {}).get("exec", {}).get("command")
        if command != ["podsrl", "health"] and (probe == "livenessProbe" or command is not None):
            raise K8sError(f"{p.name}: {probe} must run [podsrl, health], not {command}")
    found = p.mount(p.cfg.run.dir)
    if found is None or found[0].get("readOnly") or "persistentVolumeClaim" not in found[1]:
        raise K8sError(
            f"{p.name}: run.dir={p.cfg.run.dir} is on no writable PersistentVolumeClaim: mount podsrl-runs there"
        )
    reads = []
    if p.role == "learner" and p.cfg.model.init == "pretrained":
        reads.append(("model.path", str(p.cfg.model_dir)))
    if p.role in ("learner", "rollout"):
        reads += [
            (k, v)
            for k, v in (("task.dataset", p.cfg.task.dataset), ("task.eval_dataset", p.cfg.task.eval_dataset))
            if v
        ]
    for key, path in reads:
        if p.mount(path) is None:
            raise K8sError(f"{p.name}: {key}={path} is on no volume: mount the volume that holds it")
    if auth_enabled(p.cfg.net):
        for name in KEY_FILES[p.role]:
            path = posixpath.join(p.cfg.net.keys_dir, name.format(id=getattr(p.args, "server_id", "")))
            found = p.mount(path.rstrip("/"))
            secret = found[1].get("secret") if found else None
            rel = posixpath.relpath(path, found[0]["mountPath"]) if found else ""
            items = [i["path"] for i in (secret or {}).get("items", [])]
            if secret is None or (items and rel not in items):
                raise K8sError(
                    f"{p.name}: authentication is on (net.auth={p.cfg.net.auth}) and it reads {path}, which is "
                    "on no Secret volume: mount Secret podsrl-keys at net.keys_dir and podsrl-rollout-keys at "
                    "net.keys_dir/rollout (docs/DEPLOY.md)"
                )
    gpus = int((p.container.get("resources", {}).get("limits") or {}).get(GPU, 0))
    if p.role == "learner" and gpus and gpus != p.cfg.learner.nproc:
        raise K8sError(f"{p.name}: learner.nproc={p.cfg.learner.nproc} but it asks for {gpus} GPU(s): one rank per GPU")
    if p.role == "rollout" and p.cfg.rollout.engine.type == "vllm" and not gpus:
        raise K8sError(f"{p.name}: rollout.engine.type='vllm' needs a GPU: resources.limits {GPU}: 1")


def check(objs: list[dict[str, Any]]) -> list[Process]:
    """All checks of one rendered directory; returns its processes. Raises :class:`K8sError`."""
    for o in objs:
        if o.get("kind") in ("Deployment", "StatefulSet"):
            sel = o["spec"]["selector"]["matchLabels"]
            labels = o["spec"]["template"].get("metadata", {}).get("labels", {})
            if any(labels.get(k) != v for k, v in sel.items()):
                raise K8sError(f"{label(o)}: spec.selector.matchLabels {sel} do not match the template's labels")
    procs = processes(objs)
    binders = {}
    for role in ("selector", "learner"):
        mine = [p for p in procs if p.role == role]
        if not mine or (role == "selector" and len(mine) > 1):
            raise K8sError(f"{[p.name for p in mine] or 'no object'}: a run has exactly one {role}")
        binders[role] = next(p for p in mine if p.index == 0)
    if not any(p.role == "rollout" for p in procs):
        raise K8sError("no object runs a rollout server: add the StatefulSet rollout")
    _check_links(objs, procs, binders)
    ref = _flat(binders["learner"].cfg)
    for p in procs:
        for key, value in _flat(p.cfg).items():
            if value != ref[key] and not key.startswith(PER_POD):
                raise K8sError(f"{p.name}: {key}={value!r} but the learner has {ref[key]!r}: one run, one run file")
        _check_pod(p)
    claims = {}
    for p in procs:
        found = p.mount(p.cfg.run.dir)
        assert found is not None  # _check_pod checked it
        claims[p.name] = found[1]["persistentVolumeClaim"]["claimName"]
    if len(set(claims.values())) > 1:
        raise K8sError(f"the run directory is on different claims {claims}: every process shares one run directory")
    ids = [getattr(p.args, "server_id", "") for p in procs if p.role == "rollout"]
    if len(set(ids)) != len(ids):
        raise K8sError(f"rollout server ids {ids} repeat: --server-id $(POD_NAME) gives each pod its own")
    return procs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="*", type=Path, default=list(OVERLAYS))
    args = parser.parse_args(argv)
    try:
        for d in args.dirs:
            objs = render(d)
            version = validate_schema(objs)
            for p in check(objs):
                print(f"{d.name:5} {p.name:48} podsrl {' '.join(p.argv[:5])}")
            print(f"{d.name}: {len(objs)} objects valid for Kubernetes {version}")
    except K8sError as e:
        print(f"k8s_check: {e}", file=sys.stderr)
        return 1
    print("k8s_check: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
