"""What the current kube context lacks for a ddray overlay, said before anything hangs.

    deploy/preflight.sh [OVERLAY]                     # default k8s/overlays/gpu, rendered by `kubectl kustomize`
    kustomize build k8s/overlays/gpu | deploy/preflight.sh -f -

It reads the rendered manifests, asks the cluster through ``kubectl`` (the current context; $KUBECTL
names another binary) and prints one line per problem on stdout, notes and a summary on stderr. Exit
status: 0 no problem, 1 problems, 2 it could not run. Checks, each line starting with its name:

kuberay   the CRDs know every field the manifests set (an API server drops unknown fields silently:
          authOptions needs KubeRay >= v1.5.1, preRunningDeadlineSeconds >= v1.6.0, and without them a
          job runs without auth or hangs); the operator runs >= v1.6.0; the other custom kinds'
          CRDs (PodMonitor) exist.
secrets   every Secret the objects read exists in the namespace, with the keys they name (Secrets the
          overlay generates itself excepted).
storage   every claim gets a storage class (its own or the cluster's default), one that can provide
          ReadWriteMany where the claim asks for it (k8s/components/data-rwx, pvc-storage).
gpu       a node with nvidia.com/gpu that fits a GPU pod, or a node autoscaler (Cluster Autoscaler,
          Karpenter, a cloud's managed one) to add one.
images    every image can be pulled: pods of the namespace that failed to pull one, and a short probe
          pod per image, with the pods' pull policy and pull Secrets (--no-pull-probe skips those).

Needs Python 3 with PyYAML (ddray's own environment has it) and kubectl.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets as random_ids
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import yaml
except ImportError:  # pragma: no cover - depends on the user's Python
    sys.exit("preflight: needs PyYAML (pip install pyyaml), e.g. ddray's own environment: "
             "PYTHON=.venv/bin/python deploy/preflight.sh")

REPO = Path(__file__).resolve().parents[1]
GUIDE = "docs/kubernetes.md"
Doc = dict[str, Any]

# The custom kinds the manifests use → their CRD.
CRDS = {"RayCluster": "rayclusters.ray.io", "RayJob": "rayjobs.ray.io",
        "PodMonitor": "podmonitors.monitoring.coreos.com"}
# Fields the manifests set, and the KubeRay release whose CRDs first have them.
FIELD_SINCE = {"authOptions": "v1.5.1", "preRunningDeadlineSeconds": "v1.6.0"}
MIN_OPERATOR = (1, 6, 0)
OPERATOR_LABEL = "app.kubernetes.io/name=kuberay-operator"

# Storage provisioners that can give ReadWriteMany, and ones that cannot (block devices, node-local
# paths). A provisioner in neither list is trusted.
RWX_PROVISIONERS = ("efs.csi.aws.com", "filestore.csi.storage.gke.io", "file.csi.azure.com",
                    "kubernetes.io/azure-file", "nfs.csi.k8s.io", "nfs-subdir-external-provisioner",
                    "cephfs.csi.ceph.com", "driver.longhorn.io", "k8s.io/minikube-hostpath")
RWO_PROVISIONERS = ("ebs.csi.aws.com", "kubernetes.io/aws-ebs", "pd.csi.storage.gke.io", "kubernetes.io/gce-pd",
                    "disk.csi.azure.com", "kubernetes.io/azure-disk", "rancher.io/local-path", "openebs.io/local",
                    "cinder.csi.openstack.org", "dobs.csi.digitalocean.com", "kubernetes.io/no-provisioner")
DEFAULT_CLASS = ("storageclass.kubernetes.io/is-default-class", "storageclass.beta.kubernetes.io/is-default-class")

GPU = "nvidia.com/gpu"
PULL_FAILURES = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "RegistryUnavailable"}


# --------------------------------------------------------------------------- kubectl


class KubectlError(RuntimeError):
    pass


def kubectl(*args: str, stdin: str | None = None) -> str:
    """Run kubectl with ``args``; its stdout, or KubectlError with its first line of stderr."""
    cmd = [os.environ.get("KUBECTL", "kubectl"), *args]
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise KubectlError(f"{cmd[0]} not found") from None
    if proc.returncode != 0:
        first = next((ln for ln in proc.stderr.splitlines() if ln.strip()), f"exit status {proc.returncode}")
        raise KubectlError(first.strip())
    return proc.stdout


def get(*args: str) -> Doc | None:
    """``kubectl get … -o json`` as a dict; None when the object does not exist."""
    try:
        found: Doc = json.loads(kubectl("get", *args, "-o", "json"))
    except KubectlError as e:
        if "NotFound" in str(e) or "not found" in str(e):
            return None
        raise
    return found


def items(*args: str) -> list[Doc]:
    found = get(*args)
    return list(found.get("items", [])) if found else []


# --------------------------------------------------------------------------- the rendered objects


@dataclass
class Pod:
    """A pod template of the rendered objects."""

    owner: str  # e.g. "RayJob/ddray-distill"
    spec: Doc
    extra_containers: list[Doc] = field(default_factory=list)  # KubeRay's autoscaler sidecar on a head

    @property
    def containers(self) -> list[Doc]:
        return list(self.spec.get("initContainers", [])) + list(self.spec.get("containers", []))


def _ray_pods(owner: str, spec: Doc) -> Iterator[Pod]:
    sidecar = []
    if spec.get("enableInTreeAutoscaling"):
        opts = spec.get("autoscalerOptions", {})
        sidecar = [{"name": "autoscaler", "resources": opts.get("resources", {}), **({"image": opts["image"]}
                                                                                      if opts.get("image") else {})}]
    yield Pod(owner, spec["headGroupSpec"]["template"]["spec"], sidecar)
    for group in spec.get("workerGroupSpecs", []):
        yield Pod(owner, group["template"]["spec"])


def pods(docs: list[Doc]) -> Iterator[Pod]:
    for d in docs:
        kind, spec, owner = d.get("kind"), d.get("spec", {}), f"{d.get('kind')}/{d['metadata']['name']}"
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield Pod(owner, spec["template"]["spec"])
        elif kind == "RayCluster":
            yield from _ray_pods(owner, spec)
        elif kind == "RayJob":
            if "rayClusterSpec" in spec:
                yield from _ray_pods(owner, spec["rayClusterSpec"])
            if "submitterPodTemplate" in spec:
                yield Pod(owner, spec["submitterPodTemplate"]["spec"])


def namespace_of(docs: list[Doc]) -> str:
    names = {d["metadata"]["name"] for d in docs if d.get("kind") == "Namespace"}
    names |= {d["metadata"]["namespace"] for d in docs if d.get("metadata", {}).get("namespace")}
    if len(names) != 1:
        raise SystemExit(f"preflight: expected the objects in one namespace, found {sorted(names) or 'none'}")
    return str(names.pop())


# --------------------------------------------------------------------------- checks


def unknown_fields(value: Any, schema: Doc, path: str) -> set[str]:
    """Paths in ``value`` that ``schema`` (a CRD's openAPIV3Schema) does not know."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return set()
    if isinstance(value, dict):
        props = schema.get("properties")
        if props is None:
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict):
                return set().union(*(unknown_fields(v, extra, f"{path}.{k}") for k, v in value.items()))
            return set()
        out: set[str] = set()
        for key, sub in value.items():
            out |= unknown_fields(sub, props[key], f"{path}.{key}") if key in props else {f"{path}.{key}"}
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return set().union(*(unknown_fields(v, schema["items"], f"{path}[]") for v in value))
    return set()


def _version(image: str) -> tuple[int, ...] | None:
    m = re.search(r":v?(\d+)\.(\d+)\.(\d+)(?:@|$)", image)
    return tuple(map(int, m.groups())) if m else None


def check_kuberay(docs: list[Doc]) -> list[str]:
    problems = []
    for kind in sorted({d["kind"] for d in docs if d.get("kind") in CRDS}):
        name = CRDS[kind]
        objs = [d for d in docs if d["kind"] == kind]
        check = "kuberay" if name.endswith(".ray.io") else "monitoring"
        crd = get("customresourcedefinition", name)
        if crd is None:
            hint = (f"install the KubeRay operator v1.7.0 ({GUIDE}, step 2)" if check == "kuberay" else
                    "install the Prometheus Operator (kube-prometheus-stack), or remove components/monitoring "
                    "from the overlay")
            problems.append(f"{check}: no CRD {name}, needed by {kind}/{objs[0]['metadata']['name']}: {hint}")
            continue
        version = objs[0]["apiVersion"].rsplit("/", 1)[-1]
        served = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served", True)]
        if not served:
            problems.append(f"{check}: CRD {name} does not serve {objs[0]['apiVersion']}: upgrade it")
            continue
        schema = served[0].get("schema", {}).get("openAPIV3Schema", {})
        missing: dict[str, str] = {}
        for d in objs:
            for path in unknown_fields(d.get("spec", {}), schema.get("properties", {}).get("spec", {}), "spec"):
                missing.setdefault(path, f"{kind}/{d['metadata']['name']}")
        for path, who in sorted(missing.items()):
            since = FIELD_SINCE.get(path.rsplit(".", 1)[-1])
            problems.append(f"{check}: CRD {name} has no field {path}, which {who} sets"
                            f"{f' (KubeRay >= {since})' if since else ''}: the API server would drop it "
                            f"silently. Upgrade the CRDs (helm upgrade leaves them as they are; {GUIDE}, step 2)")
    if any(d.get("kind") in ("RayCluster", "RayJob") for d in docs):
        operators = items("deployments", "--all-namespaces", "-l", OPERATOR_LABEL)
        if not operators:
            problems.append(f"kuberay: no Deployment labelled {OPERATOR_LABEL} in any namespace: install the "
                            f"KubeRay operator ({GUIDE}, step 2); the NetworkPolicy `ray` admits it by that label")
        for dep in operators:
            for c in dep["spec"]["template"]["spec"]["containers"]:
                v = _version(c["image"])
                if v is not None and v < MIN_OPERATOR:
                    problems.append(f"kuberay: Deployment {dep['metadata']['namespace']}/{dep['metadata']['name']} "
                                    f"runs {c['image']}, the manifests need KubeRay >= v1.6.0 (written for v1.7.0)")
    return problems


def _secret_references(docs: list[Doc]) -> dict[str, dict[str, set[str]]]:
    """Secret name → {"keys": the keys named, "readers": who reads it}."""
    refs: dict[str, dict[str, set[str]]] = {}

    def add(name: str, reader: str, key: str | None = None) -> None:
        ref = refs.setdefault(name, {"keys": set(), "readers": set()})
        ref["readers"].add(reader)
        if key:
            ref["keys"].add(key)

    for pod in pods(docs):
        for v in pod.spec.get("volumes", []):
            if "secret" in v:
                add(v["secret"]["secretName"], pod.owner)
        for s in pod.spec.get("imagePullSecrets", []):
            add(s["name"], pod.owner)
        for c in pod.containers:
            for src in c.get("envFrom", []):
                if "secretRef" in src:
                    add(src["secretRef"]["name"], pod.owner)
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    add(ref["name"], pod.owner, ref["key"])
    for m in (d for d in docs if d.get("kind") == "PodMonitor"):
        for ep in m["spec"].get("podMetricsEndpoints", []):
            for part in ep.get("basicAuth", {}).values():
                add(part["name"], f"PodMonitor/{m['metadata']['name']}", part["key"])
    return refs


def _readers(readers: set[str]) -> str:
    shown = sorted(readers)
    return ", ".join(shown[:3]) + (f" and {len(shown) - 3} more" if len(shown) > 3 else "")


def check_secrets(docs: list[Doc], namespace: str) -> list[str]:
    generated = {d["metadata"]["name"] for d in docs if d.get("kind") == "Secret"}
    present = {s["metadata"]["name"]: set(s.get("data") or {}) | set(s.get("stringData") or {})
               for s in items("secrets", "-n", namespace)}
    problems = []
    for name, ref in sorted(_secret_references(docs).items()):
        if name in generated:
            continue
        keys = f" (keys {', '.join(sorted(ref['keys']))})" if ref["keys"] else ""
        if name not in present:
            problems.append(f"secrets: Secret {namespace}/{name}{keys}, read by {_readers(ref['readers'])}, "
                            f"does not exist: create it ({GUIDE}, step 4)")
            continue
        for key in sorted(ref["keys"] - present[name]):
            problems.append(f"secrets: Secret {namespace}/{name} has no key {key}, read by "
                            f"{_readers(ref['readers'])}")
    return problems


def _claims(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    for d in docs:
        if d.get("kind") == "PersistentVolumeClaim":
            yield f"PersistentVolumeClaim/{d['metadata']['name']}", d["spec"]
        elif d.get("kind") == "StatefulSet":
            for t in d["spec"].get("volumeClaimTemplates", []):
                yield f"StatefulSet/{d['metadata']['name']} claim {t['metadata']['name']}", t["spec"]


def check_storage(docs: list[Doc]) -> list[str]:
    claims = list(_claims(docs))
    if not claims:
        return []
    classes = {c["metadata"]["name"]: c for c in items("storageclasses")}
    defaults = [n for n, c in classes.items()
                if any(c["metadata"].get("annotations", {}).get(a) == "true" for a in DEFAULT_CLASS)]
    rwx = sorted(n for n, c in classes.items() if c.get("provisioner", "").endswith(RWX_PROVISIONERS))
    problems = []
    for where, spec in claims:
        wanted = spec.get("storageClassName")
        if wanted == "":  # bound to a PersistentVolume by hand
            continue
        if wanted is None and not defaults:
            problems.append(f"storage: {where} names no storage class and the cluster has no default one: "
                            f"set storageClassName to one of {sorted(classes) or 'none (there are none)'}")
            continue
        name = wanted or defaults[0]
        if name not in classes:
            problems.append(f"storage: {where} asks for storage class {name}, which does not exist "
                            f"(the cluster has {', '.join(sorted(classes)) or 'none'})")
            continue
        provisioner = classes[name].get("provisioner", "")
        if "ReadWriteMany" in spec.get("accessModes", []) and provisioner.endswith(RWO_PROVISIONERS):
            how = (f"name one that can (here: {', '.join(rwx)})" if rwx else
                   "the cluster has none (NFS, Amazon EFS, GCP Filestore, Azure Files, CephFS …)")
            problems.append(f"storage: {where} needs ReadWriteMany, which storage class {name} ({provisioner}) "
                            f"cannot provide: {how}; or leave out the component that adds it and read data "
                            f"from S3 ({GUIDE}, \"Data\")")
    return problems


def _cpu(q: str | int | float) -> float:
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9,
          "T": 10**12}


def _bytes(q: str | int) -> float:
    s = str(q)
    for unit in sorted(_UNITS, key=len, reverse=True):
        if s.endswith(unit):
            return float(s[: -len(unit)]) * _UNITS[unit]
    return float(s)


def _requests(pod: Pod) -> dict[str, float]:
    """What the scheduler reserves for the pod: its containers' requests (or its largest init container's)."""
    out = {}
    for r, q in (("cpu", _cpu), ("memory", _bytes), (GPU, float)):
        def req(c: Doc) -> float:
            res = c.get("resources", {})
            return q(res.get("requests", {}).get(r, res.get("limits", {}).get(r, 0)))
        main = sum(req(c) for c in pod.spec.get("containers", []) + pod.extra_containers)
        out[r] = max([main] + [req(c) for c in pod.spec.get("initContainers", [])])
    return out


def node_autoscaler() -> str | None:
    """What adds nodes to the cluster, if anything visible does."""
    for dep in items("deployments", "--all-namespaces"):
        meta = dep["metadata"]
        names = [meta["name"], *meta.get("labels", {}).values()]
        for what in ("cluster-autoscaler", "karpenter"):
            if any(what in str(n) for n in names):
                return f"{what} (Deployment {meta['namespace']}/{meta['name']})"
    if get("configmap", "cluster-autoscaler-status", "-n", "kube-system") is not None:
        return "a cluster autoscaler (ConfigMap kube-system/cluster-autoscaler-status)"
    if get("customresourcedefinition", "nodepools.karpenter.sh") is not None:
        return "Karpenter (CRD nodepools.karpenter.sh)"
    return None


def check_gpu(docs: list[Doc], notes: list[str]) -> list[str]:
    gpu_pods = [(p, _requests(p)) for p in pods(docs) if _requests(p)[GPU] > 0]
    if not gpu_pods:
        return []
    pod, need = max(gpu_pods, key=lambda pr: (pr[1]["cpu"], pr[1]["memory"]))
    want = f"{need['cpu']:g} CPU, {need['memory'] / 2**30:g} GiB, {need[GPU]:g} GPU"
    nodes = [n for n in items("nodes") if float(n["status"].get("allocatable", {}).get(GPU, 0)) > 0]
    fits = [n for n in nodes
            if _cpu(n["status"]["allocatable"]["cpu"]) >= need["cpu"]
            and _bytes(n["status"]["allocatable"]["memory"]) >= need["memory"]
            and float(n["status"]["allocatable"][GPU]) >= need[GPU]]
    if fits:
        return []
    scaler = node_autoscaler()
    if scaler:
        notes.append(f"gpu: no node fits a GPU pod ({want}) now; {scaler} must add one from a GPU node pool that "
                     f"scales from zero ({GUIDE}, \"GPU nodes\")")
        return []
    if nodes:
        biggest = max(nodes, key=lambda n: _bytes(n["status"]["allocatable"]["memory"]))
        alloc = biggest["status"]["allocatable"]
        return [f"gpu: no GPU node fits a GPU pod of {pod.owner} ({want}): the largest, "
                f"{biggest['metadata']['name']}, has {_cpu(alloc['cpu']):g} CPU, "
                f"{_bytes(alloc['memory']) / 2**30:.1f} GiB allocatable, and no node autoscaler adds others "
                f"({GUIDE}, \"GPU nodes\")"]
    return [f"gpu: no node has {GPU} allocatable and no node autoscaler was found (Cluster Autoscaler, Karpenter, "
            f"a cloud's managed one): the GPU pods of {pod.owner} ({want}) would stay Pending. Add GPU nodes with "
            f"the NVIDIA device plugin, or a GPU node pool that an autoscaler scales from zero "
            f"({GUIDE}, \"GPU nodes\")"]


@dataclass
class Image:
    policy: str
    pull_secrets: list[Doc]
    users: set[str]


def _images(docs: list[Doc]) -> dict[str, Image]:
    images: dict[str, Image] = {}
    for pod in pods(docs):
        for c in pod.containers + pod.extra_containers:
            if "image" in c:
                img = images.setdefault(c["image"], Image(c.get("imagePullPolicy", "IfNotPresent"),
                                                          pod.spec.get("imagePullSecrets", []), set()))
                img.users.add(pod.owner)
    return images


def _pull_failure(pod: Doc) -> tuple[str, str] | None:
    """(image, "reason: message") when a container of ``pod`` waits on a failed pull."""
    status = pod.get("status", {})
    for cs in status.get("initContainerStatuses", []) + status.get("containerStatuses", []):
        waiting = cs.get("state", {}).get("waiting", {})
        if waiting.get("reason") in PULL_FAILURES:
            return cs["image"], f"{waiting['reason']}: {waiting.get('message', '')}".strip(": ")
    return None


def _pulled(pod: Doc) -> bool | None:
    """True once the probe's image is on its node, False when pulling failed, None while undecided."""
    if _pull_failure(pod):
        return False
    for cs in pod.get("status", {}).get("containerStatuses", []):
        state = cs.get("state", {})
        if "running" in state or "terminated" in state:
            return True
        if state.get("waiting", {}).get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            return True  # e.g. CreateContainerError: the image was there
    return None


def probe_pod(image: str, spec: Image, run: str, i: int) -> Doc:
    """A pod that only pulls ``image`` (its command need not exist: a start error still means pulled)."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"ddray-preflight-pull-{run}-{i}",
                     "labels": {"app.kubernetes.io/name": "ddray-preflight", "ddray.io/preflight": run}},
        "spec": {
            "restartPolicy": "Never", "automountServiceAccountToken": False, "activeDeadlineSeconds": 900,
            "imagePullSecrets": spec.pull_secrets,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "pull", "image": image, "imagePullPolicy": spec.policy, "command": ["sh", "-c", "exit 0"],
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                              "limits": {"cpu": "100m", "memory": "64Mi"}},
                "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }


def check_images(docs: list[Doc], namespace: str, probe: bool, timeout: float, notes: list[str]) -> list[str]:
    images = _images(docs)
    failed: dict[str, str] = {}
    for pod in items("pods", "-n", namespace):  # e.g. a RayJob's submitter that never started
        found = _pull_failure(pod)
        if found and found[0] in images:
            failed.setdefault(found[0], f"pod {pod['metadata']['name']}: {found[1]}")
    if probe:
        if get("namespace", namespace) is None:
            notes.append(f"images: namespace {namespace} does not exist yet, so no probe pods pulled the images; "
                         f"rerun after applying the platform (-l '!ddray.io/workload')")
        else:
            failed.update(_probe(images, set(failed), namespace, timeout, notes))
    lines = []
    for image, why in sorted(failed.items()):
        users = images[image].users
        stuck = " (a RayJob whose submitter cannot pull stays Running until its activeDeadlineSeconds)" \
            if any(u.startswith("RayJob/") for u in users) else ""
        lines.append(f"images: {image}, used by {_readers(users)}, cannot be pulled ({why}){stuck}: push it to "
                     f"the registry, or load it into the nodes (kind load / minikube image load; {GUIDE}, step 3)")
    return lines


def _probe(images: dict[str, Image], skip: set[str], namespace: str, timeout: float,
           notes: list[str]) -> dict[str, str]:
    run = random_ids.token_hex(3)
    wanted = {f"ddray-preflight-pull-{run}-{i}": image for i, image in enumerate(sorted(set(images) - skip))}
    if not wanted:
        return {}
    pod_list = {"apiVersion": "v1", "kind": "List",
                "items": [probe_pod(image, images[image], run, int(name.rsplit("-", 1)[1]))
                          for name, image in wanted.items()]}
    failed: dict[str, str] = {}
    try:
        kubectl("create", "-n", namespace, "-f", "-", stdin=json.dumps(pod_list))
        deadline = time.monotonic() + timeout
        undecided = dict(wanted)
        while undecided:
            for pod in items("pods", "-n", namespace, "-l", f"ddray.io/preflight={run}"):
                name = pod["metadata"]["name"]
                verdict = _pulled(pod) if name in undecided else None
                if verdict is False:
                    failed[undecided[name]] = f"probe pod: {(_pull_failure(pod) or ('', ''))[1]}"
                if verdict is not None:
                    undecided.pop(name)
            if not undecided or time.monotonic() > deadline:
                break
            time.sleep(3)
        for image in sorted(undecided.values()):
            notes.append(f"images: {image} still pulling after {timeout:g} s (a large image?): not checked")
    except KubectlError as e:
        notes.append(f"images: probe pods not run: {e}")
    finally:
        try:
            kubectl("delete", "pods", "-n", namespace, "-l", f"ddray.io/preflight={run}", "--wait=false",
                    "--ignore-not-found")
        except KubectlError as e:
            notes.append(f"images: could not delete the probe pods (label ddray.io/preflight={run}): {e}")
    return failed


# --------------------------------------------------------------------------- main


def render(overlay: Path) -> str:
    try:
        return kubectl("kustomize", str(overlay))
    except KubectlError as e:
        raise SystemExit(f"preflight: kubectl kustomize {overlay} failed: {e}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/preflight.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overlay", nargs="?", type=Path, default=REPO / "k8s" / "overlays" / "gpu",
                        help="kustomize directory to render with `kubectl kustomize` (default k8s/overlays/gpu)")
    parser.add_argument("-f", "--filename", help="rendered manifests instead of OVERLAY (- for stdin)")
    parser.add_argument("--no-pull-probe", action="store_true", help="start no probe pods to pull the images")
    parser.add_argument("--pull-timeout", type=float, default=180,
                        help="seconds to wait for the probe pods' pulls (default 180)")
    args = parser.parse_args(argv)
    try:
        context = kubectl("config", "current-context").strip()
    except KubectlError as e:
        print(f"preflight: no current kube context ({e})", file=sys.stderr)
        return 2
    if args.filename:
        text = sys.stdin.read() if args.filename == "-" else Path(args.filename).read_text()
    else:
        text = render(args.overlay)
    docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    namespace = namespace_of(docs)
    print(f"preflight: context {context}, namespace {namespace}, {args.filename or args.overlay}", file=sys.stderr)
    notes: list[str] = []
    problems: list[str] = []
    checks: list[tuple[str, Callable[[], list[str]]]] = [
        ("kuberay", lambda: check_kuberay(docs)),
        ("secrets", lambda: check_secrets(docs, namespace)),
        ("storage", lambda: check_storage(docs)),
        ("gpu", lambda: check_gpu(docs, notes)),
        ("images", lambda: check_images(docs, namespace, not args.no_pull_probe, args.pull_timeout, notes)),
    ]
    for name, check in checks:
        try:
            problems += check()
        except KubectlError as e:
            problems.append(f"{name}: could not ask the cluster: {e}")
    for line in problems:
        print(line)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"preflight: {len(problems)} problem{'s' * (len(problems) != 1)}" if problems else
          "preflight: no problems found", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
