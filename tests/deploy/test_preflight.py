"""deploy/preflight.sh against recorded cluster answers.

No cluster can run here, so ``kubectl`` is a stand-in (preflight_fixtures/kubectl_stand_in.py, put
first on PATH) that answers from JSON in kubectl's own output format: a cluster that is fine
(preflight_fixtures/fine/: an EKS-like cluster with a g5.2xlarge GPU node, the gp3 and efs-sc storage
classes, the KubeRay v1.7.0 operator, Cluster Autoscaler and the seven Secrets; the KubeRay CRDs are
v1.7.0's published schemas, tests/deploy/schemas/), and one change to it per problem. Each problem
must give exactly one line, and the fine cluster none.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from deploy_support import CRD_SCHEMAS, REPO, Doc, Kustomize, by_kind, load_crd_schema, one

FIXTURES = Path(__file__).resolve().parent / "preflight_fixtures"
PREFLIGHT = REPO / "deploy" / "preflight.sh"


def crd(kind: str, plural: str, schema: Doc) -> Doc:
    """A ray.io CRD as `kubectl get crd … -o json` shows it, around its v1 openAPIV3Schema."""
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.ray.io"},
            "spec": {"group": "ray.io", "scope": "Namespaced",
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                     "versions": [{"name": "v1", "served": True, "storage": True,
                                   "schema": {"openAPIV3Schema": schema}}]}}


def fine_cluster() -> Doc:
    def listed(name: str) -> list[Doc]:
        return list(json.loads((FIXTURES / "fine" / f"{name}.json").read_text())["items"])

    crds = [crd(kind, f"{kind.lower()}s", load_crd_schema(kind)) for kind in CRD_SCHEMAS]
    crds.append(json.loads((FIXTURES / "fine" / "crd-podmonitors.json").read_text()))
    return {"context": "arn:aws:eks:us-east-1:111122223333:cluster/ddray",
            "objects": {"customresourcedefinitions": crds, "nodes": listed("nodes"),
                        "storageclasses": listed("storageclasses"), "secrets": listed("secrets"),
                        "deployments": listed("deployments"), "namespaces": listed("namespaces"),
                        "configmaps": [], "pods": []},
            "pull": {}}


@dataclass
class Result:
    code: int
    problems: list[str]  # stdout, one line per problem
    stderr: str
    calls: list[Doc]  # kubectl's calls: {"argv": [...], "stdin": ...}
    state: Doc  # the stand-in cluster afterwards


@pytest.fixture
def preflight(kustomize: Kustomize, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Run deploy/preflight.sh against ``cluster`` (the stand-in's state) with ``args``; ``docs``, when
    given, are the rendered manifests (-f), else preflight renders the overlay itself."""

    def run(cluster: Doc, *args: str, docs: list[Doc] | None = None) -> Result:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        (bin_dir / "kubectl").write_text(f"#!/bin/sh\nexec {sys.executable} {FIXTURES / 'kubectl_stand_in.py'} \"$@\"\n")
        (bin_dir / "kubectl").chmod(0o755)
        state, log = tmp_path / "cluster.json", tmp_path / "calls.jsonl"
        state.write_text(json.dumps(cluster))
        log.write_text("")
        if docs is not None:
            (tmp_path / "rendered.yaml").write_text(yaml.safe_dump_all(docs))
            args = ("-f", str(tmp_path / "rendered.yaml"), *args)
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
               "KUBECTL_STAND_IN_STATE": str(state), "KUBECTL_STAND_IN_LOG": str(log),
               "KUBECTL_STAND_IN_KUSTOMIZE": json.dumps(kustomize.build_cmd(Path("."))[:-1])}
        env.pop("KUBECTL", None)
        proc = subprocess.run(["bash", str(PREFLIGHT), *args, "--pull-timeout", "5"], env=env, capture_output=True,
                              text=True, timeout=120, cwd=REPO)
        return Result(proc.returncode, proc.stdout.splitlines(), proc.stderr,
                      [json.loads(ln) for ln in log.read_text().splitlines()], json.loads(state.read_text()))

    return run


@pytest.fixture(scope="module")
def gpu(kustomize: Kustomize, renders: dict[str, tuple[list[Doc], str]],
        tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Doc]]:
    """The gpu overlay as shipped (no Secrets: the user creates them), and with the data component."""
    from deploy_support import TUNE_MNIST_PAPER, Variant, render_variant

    with_data = Variant("gpu", ("data-rwx",), (TUNE_MNIST_PAPER,))
    return {"shipped": renders["gpu"][0],
            "with data": render_variant(kustomize, with_data, tmp_path_factory.mktemp("gpu-data"))[0]}


def _objects(cluster: Doc, resource: str) -> list[Doc]:
    return list(cluster["objects"][resource])


# --------------------------------------------------------------------------- a fine cluster


def test_a_fine_cluster_has_no_problems(preflight) -> None:  # type: ignore[no-untyped-def]
    """The gpu overlay as shipped, rendered by preflight itself (`kubectl kustomize`), on a cluster that has
    everything: no line, exit 0; every image pulled by a probe pod, and the probe pods deleted again."""
    r = preflight(fine_cluster(), "k8s/overlays/gpu")
    assert (r.code, r.problems) == (0, []), r.stderr
    assert "no problems found" in r.stderr
    assert ["kustomize", "k8s/overlays/gpu"] in [c["argv"] for c in r.calls]
    [create] = [c["argv"] for c in r.calls if c["argv"][0] == "create"]
    assert create[create.index("-n") + 1] == "ddray"
    assert not [p for p in r.state["objects"]["pods"] if p["metadata"]["name"].startswith("ddray-preflight-pull-")]


def test_probe_pods_pull_every_image_as_the_pods_do(preflight, gpu) -> None:  # type: ignore[no-untyped-def]
    """One probe pod per image of the overlay, with the pods' pull policy and pull Secrets, and allowed by
    Pod Security `restricted` (the namespace's level)."""
    from deploy_support import pod_specs

    docs = gpu["shipped"]
    r = preflight(fine_cluster(), docs=docs)
    assert r.code == 0, r.problems
    [create] = [c for c in r.calls if c["argv"][0] == "create"]
    probes = json.loads(create["stdin"])["items"]
    policies = {c["image"]: c.get("imagePullPolicy") for p in pod_specs(docs) for c in p.all_containers}
    assert {p["spec"]["containers"][0]["image"] for p in probes} == set(policies)
    for pod in probes:
        spec, c = pod["spec"], pod["spec"]["containers"][0]
        assert c["imagePullPolicy"] == policies[c["image"]] == "IfNotPresent"
        assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                        "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    delete = [c["argv"] for c in r.calls if c["argv"][0] == "delete"]
    label = probes[0]["metadata"]["labels"]["ddray.io/preflight"]
    assert delete and f"ddray.io/preflight={label}" in delete[0]


@pytest.mark.parametrize("change", ["data component with an RWX class", "GPU nodes only through the autoscaler"])
def test_fine_variants(preflight, gpu, change: str) -> None:  # type: ignore[no-untyped-def]
    cluster = fine_cluster()
    docs = gpu["shipped"]
    if change == "data component with an RWX class":
        docs = _with_storage_class(gpu["with data"], "efs-sc")
    else:
        cluster["objects"]["nodes"] = [n for n in _objects(cluster, "nodes")
                                       if "nvidia.com/gpu" not in n["status"]["allocatable"]]
    r = preflight(cluster, docs=docs)
    assert (r.code, r.problems) == (0, []), r.stderr


def _with_storage_class(docs: list[Doc], name: str) -> list[Doc]:
    """The data claim with storageClassName set, as k8s/components/data-rwx/data.yaml tells the user to."""
    docs = copy.deepcopy(docs)
    one(docs, "PersistentVolumeClaim", "ddray-data")["spec"]["storageClassName"] = name
    return docs


# --------------------------------------------------------------------------- one problem each


def _one_problem(r: Result, check: str, *words: str) -> str:
    assert r.code == 1, (r.code, r.problems, r.stderr)
    assert len(r.problems) == 1, r.problems
    line = r.problems[0]
    assert line.startswith(f"{check}: "), line
    for w in words:
        assert w in line, (w, line)
    return line


def _without(schema: Doc, *paths: str) -> Doc:
    schema = copy.deepcopy(schema)
    for path in paths:
        node = schema
        *parents, last = path.split(".")
        for p in parents:
            node = node["properties"][p]
        del node["properties"][last]
    return schema


def test_an_old_operator(preflight, gpu) -> None:  # type: ignore[no-untyped-def]
    """KubeRay v1.4's CRDs know neither authOptions (v1.5.1) nor preRunningDeadlineSeconds (v1.6.0): an API
    server with them would drop both silently (a job without auth, or one that hangs)."""
    cluster = fine_cluster()
    old = {"RayCluster": _without(load_crd_schema("RayCluster"), "spec.authOptions"),
           "RayJob": _without(load_crd_schema("RayJob"), "spec.preRunningDeadlineSeconds",
                              "spec.rayClusterSpec.authOptions")}
    cluster["objects"]["customresourcedefinitions"] = [
        crd(kind, f"{kind.lower()}s", schema) for kind, schema in old.items()
    ] + [c for c in _objects(cluster, "customresourcedefinitions") if not c["metadata"]["name"].endswith(".ray.io")]
    operator = next(d for d in _objects(cluster, "deployments") if d["metadata"]["name"] == "kuberay-operator")
    operator["spec"]["template"]["spec"]["containers"][0]["image"] = "quay.io/kuberay/operator:v1.4.2"
    r = preflight(cluster, docs=gpu["shipped"])
    assert r.code == 1 and all(line.startswith("kuberay: ") for line in r.problems), r.problems
    text = "\n".join(r.problems)
    assert len(r.problems) == 4, text
    assert "rayclusters.ray.io has no field spec.authOptions, which RayCluster/ddray sets (KubeRay >= v1.5.1)" in text
    assert "rayjobs.ray.io has no field spec.rayClusterSpec.authOptions" in text
    assert "rayjobs.ray.io has no field spec.preRunningDeadlineSeconds" in text and ">= v1.6.0" in text
    assert "operator:v1.4.2" in text


def test_no_kuberay_at_all(preflight, gpu) -> None:  # type: ignore[no-untyped-def]
    cluster = fine_cluster()
    cluster["objects"]["customresourcedefinitions"] = [c for c in _objects(cluster, "customresourcedefinitions")
                                                       if not c["metadata"]["name"].endswith(".ray.io")]
    cluster["objects"]["deployments"] = [d for d in _objects(cluster, "deployments")
                                         if d["metadata"]["name"] != "kuberay-operator"]
    r = preflight(cluster, docs=gpu["shipped"])
    assert r.code == 1 and len(r.problems) == 3, r.problems
    assert {line.split(",")[0] for line in r.problems} >= {"kuberay: no CRD rayclusters.ray.io",
                                                          "kuberay: no CRD rayjobs.ray.io"}


def test_a_missing_secret(preflight, gpu) -> None:  # type: ignore[no-untyped-def]
    cluster = fine_cluster()
    cluster["objects"]["secrets"] = [s for s in _objects(cluster, "secrets")
                                     if s["metadata"]["name"] != "ddray-mlflow-credentials"]
    r = preflight(cluster, docs=gpu["shipped"])
    _one_problem(r, "secrets", "Secret ddray/ddray-mlflow-credentials",
                 "MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_USERNAME", "Job/mlflow-users", "does not exist")


def test_a_secret_without_a_key(preflight, gpu) -> None:  # type: ignore[no-untyped-def]
    cluster = fine_cluster()
    auth = next(s for s in _objects(cluster, "secrets") if s["metadata"]["name"] == "mlflow-metrics-credentials")
    del auth["data"]["password"]
    r = preflight(cluster, docs=gpu["shipped"])
    _one_problem(r, "secrets", "mlflow-metrics-credentials has no key password", "PodMonitor/ddray-mlflow")


def test_no_read_write_many_class_while_the_data_component_is_on(preflight, gpu) -> None:  # type: ignore[no-untyped-def]
    """Only the clouds' default block-storage class: the data claim (k8s/components/data-rwx) would stay
    Pending, and every Ray pod with it."""
    cluster = fine_cluster()
    cluster["objects"]["storageclasses"] = [c for c in _objects(cluster, "storageclasses")
                                            if c["provisioner"] == "ebs.csi.aws.com"]
    r = preflight(cluster, docs=gpu["with data"])
    _one_problem(r, "storage", "PersistentVolumeClaim/ddray-data needs ReadWriteMany",
                 "gp3 (ebs.csi.aws.com) cannot provide", "the cluster has none")


def test_a_claim_names_a_class_that_does_not_exist(preflight, gpu) -> None:  # type: ignore[no-untyped-def]
    r = preflight(fine_cluster(), docs=_with_storage_class(gpu["with data"], "nfs-client"))
    _one_problem(r, "storage", "PersistentVolumeClaim/ddray-data asks for storage class nfs-client",
                 "efs-sc, gp3")


def _without_autoscaler(cluster: dict) -> None:
    """No node autoscaler: nothing can add nodes the cluster lacks."""
    cluster["objects"]["deployments"] = [d for d in _objects(cluster, "deployments")
                                         if "autoscaler" not in d["metadata"]["name"]]


def test_no_gpu_nodes_and_no_autoscaler(preflight, gpu) -> None:  # type: ignore[no-untyped-def]
    cluster = fine_cluster()
    cluster["objects"]["nodes"] = [n for n in _objects(cluster, "nodes")
                                   if "nvidia.com/gpu" not in n["status"]["allocatable"]]
    _without_autoscaler(cluster)
    r = preflight(cluster, docs=gpu["shipped"])
    _one_problem(r, "gpu", "no node has nvidia.com/gpu allocatable and no node autoscaler",
                 "(7 CPU, 26 GiB, 1 GPU)")


def test_gpu_nodes_too_small_for_the_pods(preflight, gpu) -> None:  # type: ignore[no-untyped-def]
    """A GPU node whose allocatable memory is below the GPU pod's request, and nothing to add others."""
    cluster = fine_cluster()
    _without_autoscaler(cluster)
    node = next(n for n in _objects(cluster, "nodes") if "nvidia.com/gpu" in n["status"]["allocatable"])
    node["status"]["allocatable"].update(cpu="3920m", memory="15000000Ki")  # a g4dn.xlarge
    r = preflight(cluster, docs=gpu["shipped"])
    _one_problem(r, "gpu", "no GPU node fits a GPU pod", "14.3 GiB allocatable")


def test_an_image_that_cannot_be_pulled(preflight, gpu) -> None:  # type: ignore[no-untyped-def]
    """The probe pod for the submitter image fails to pull: the RayJob would hang Running until its
    activeDeadlineSeconds, which preflight says."""
    cluster = fine_cluster()
    image = "registry.example.com/ddray/ddray-submitter:2.60.0"
    cluster["pull"] = {image: {"reason": "ErrImagePull", "message": f'failed to pull and unpack image "{image}": '
                                                                   "not found"}}
    r = preflight(cluster, docs=gpu["shipped"])
    line = _one_problem(r, "images", image, "ErrImagePull", "RayJob/ddray-distill", "activeDeadlineSeconds")
    assert "probe pod" in line


def test_a_pod_already_stuck_on_a_pull(preflight, gpu) -> None:  # type: ignore[no-untyped-def]
    """Without probe pods: the submitter pod of a RayJob applied earlier waits in ImagePullBackOff."""
    cluster = fine_cluster()
    image = "ddray-submitter:2.60.0"
    docs = copy.deepcopy(gpu["shipped"])
    for job in by_kind(docs, "RayJob"):
        job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] = image
    cluster["objects"]["pods"] = [{
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "ddray-distill-x7k2p", "namespace": "ddray",
                     "labels": {"batch.kubernetes.io/job-name": "ddray-distill"}},
        "status": {"phase": "Pending", "containerStatuses": [{
            "name": "ray-job-submitter", "image": image, "ready": False,
            "state": {"waiting": {"reason": "ImagePullBackOff",
                                  "message": f'Back-off pulling image "{image}"'}}}]}}]
    r = preflight(cluster, "--no-pull-probe", docs=docs)
    _one_problem(r, "images", image, "pod ddray-distill-x7k2p: ImagePullBackOff", "minikube image load")
    assert not [c for c in r.calls if c["argv"][0] == "create"]


def test_no_kube_context(preflight) -> None:  # type: ignore[no-untyped-def]
    r = preflight({"context": None, "objects": {}})
    assert r.code != 0 and r.problems == []
