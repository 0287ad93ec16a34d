"""Security and consistency policies of the rendered overlays.

Every container (init containers, Ray heads and workers, KubeRay job submitters
and autoscaler included) runs unprivileged with a read-only root file system
and bounded resources; images are pinned; credentials come only from Secrets;
nothing is exposed outside the cluster; the NetworkPolicies admit exactly the
traffic docs/kubernetes.md describes; versions agree with pyproject.toml.
"""

from __future__ import annotations

import base64
import fnmatch
import re
from urllib.parse import urlparse

import pytest

from deploy_support import (
    Doc, PodSpec, base_name, by_kind, configmap_data, container_env, cpu_cores, mem_bytes, mount_for, one,
    pod_specs, pyproject, ray_cluster_specs, ray_version, selector_matches, split_image,
)

# Containers allowed a writable root file system, with the reason. Keep it empty.
WRITABLE_ROOT_OK: dict[str, str] = {}
# env/ConfigMap keys that name credentials (user names and key ids included)
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL", re.I)
# keys whose values are the secret part itself
SECRET_VALUE = re.compile(r"PASSWORD|SECRET|TOKEN", re.I)


def containers(docs: list[Doc]) -> list[tuple[PodSpec, Doc]]:
    return [(pod, c) for pod in pod_specs(docs) for c in pod.all_containers]


# --------------------------------------------------------------------------- pods


def test_every_container_runs_unprivileged(docs: list[Doc]) -> None:
    bad = []
    for pod, c in containers(docs):
        where = f"{pod.where} container {c['name']}"
        psc, csc = pod.spec.get("securityContext", {}), c.get("securityContext", {})
        if not csc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            bad.append(f"{where}: runAsNonRoot is not true")
        uid = csc.get("runAsUser", psc.get("runAsUser"))
        if not isinstance(uid, int) or uid == 0:
            bad.append(f"{where}: runAsUser {uid!r} (a non-zero uid must be set: several images default to root)")
        if csc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation is not false")
        if csc.get("privileged"):
            bad.append(f"{where}: privileged")
        caps = csc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or caps.get("add"):
            bad.append(f"{where}: capabilities must drop ALL and add none, got {caps}")
        seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{where}: seccompProfile {seccomp!r}")
        if not csc.get("readOnlyRootFilesystem") and c["name"] not in WRITABLE_ROOT_OK:
            bad.append(f"{where}: readOnlyRootFilesystem is not true")
    assert not bad, "\n".join(bad)


def test_read_only_containers_get_a_writable_tmp(docs: list[Doc]) -> None:
    for pod, c in containers(docs):
        found = mount_for("/tmp/x", c, pod.spec)
        assert found is not None and "emptyDir" in found[1], f"{pod.where} {c['name']}: no emptyDir at /tmp"


def test_every_container_has_requests_and_limits(docs: list[Doc]) -> None:
    bad = []
    for pod, c in containers(docs):
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(kind, {}):
                    bad.append(f"{pod.where} {c['name']}: no {kind}.{r}")
        for r in ("cpu", "memory"):
            if r in res.get("requests", {}) and r in res.get("limits", {}):
                q = cpu_cores if r == "cpu" else mem_bytes
                if q(res["requests"][r]) > q(res["limits"][r]):
                    bad.append(f"{pod.where} {c['name']}: {r} request above its limit")
    assert not bad, "\n".join(bad)


def test_autoscaler_sidecar_is_locked_down_too(docs: list[Doc]) -> None:
    for where, spec in ray_cluster_specs(docs):
        if not spec.get("enableInTreeAutoscaling"):
            continue
        opts = spec.get("autoscalerOptions", {})
        sc = opts.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False and "ALL" in sc.get("capabilities", {}).get("drop", []), where
        assert sc.get("readOnlyRootFilesystem") and sc.get("runAsNonRoot"), where
        assert {"cpu", "memory"} <= set(opts.get("resources", {}).get("requests", {})), where
        assert {"cpu", "memory"} <= set(opts.get("resources", {}).get("limits", {})), where
        assert any(m["mountPath"] == "/tmp" for m in opts.get("volumeMounts", [])), where


def test_no_host_access(docs: list[Doc]) -> None:
    for pod in pod_specs(docs):
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.spec.get(key), f"{pod.where}: {key}"
        assert not any("hostPath" in v for v in pod.spec.get("volumes", [])), f"{pod.where}: hostPath volume"
        for c in pod.all_containers:
            assert not any("hostPort" in p for p in c.get("ports", [])), f"{pod.where} {c['name']}: hostPort"


def test_service_account_tokens_only_where_needed(docs: list[Doc]) -> None:
    """Only the head of an autoscaling Ray cluster talks to the Kubernetes API (the
    autoscaler sidecar); every other pod goes without a token."""
    autoscaling = {where for where, spec in ray_cluster_specs(docs) if spec.get("enableInTreeAutoscaling")}
    for pod in pod_specs(docs):
        needs = pod.role == "head" and any(pod.where.startswith(w + " ") for w in autoscaling)
        assert pod.spec.get("automountServiceAccountToken") is needs, pod.where


def test_namespace_enforces_restricted_pod_security(docs: list[Doc]) -> None:
    [ns] = by_kind(docs, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# --------------------------------------------------------------------------- images and versions


def test_images_are_pinned(docs: list[Doc]) -> None:
    images = [(pod.where, c["image"]) for pod, c in containers(docs)]
    images += [(w, s["autoscalerOptions"]["image"]) for w, s in ray_cluster_specs(docs)
               if s.get("autoscalerOptions", {}).get("image")]
    for where, ref in images:
        name, tag, digest = split_image(ref)
        assert tag or digest, f"{where}: image {ref!r} has no tag"
        assert tag != "latest", f"{where}: image {ref!r} uses latest"


def test_ray_version_matches_pyproject(docs: list[Doc]) -> None:
    want = ray_version()
    for where, spec in ray_cluster_specs(docs):
        assert spec["rayVersion"] == want, f"{where}: rayVersion {spec['rayVersion']} != ray=={want} in pyproject.toml"


def test_ray_containers_run_the_ddray_image(docs: list[Doc]) -> None:
    """Head, workers and submitter share one image (one Ray, one ddray), the one
    deploy/Dockerfile builds for the project's version."""
    version = pyproject()["project"]["version"]
    images = {c["image"] for pod, c in containers(docs) if pod.role in ("head", "worker", "submitter")}
    assert len(images) == 1, images
    name, tag, _ = split_image(images.pop())
    assert name.rsplit("/", 1)[-1] == "ddray" and tag and tag.startswith(version + "-"), (name, tag)


def test_mlflow_image_matches_its_requirements(docs: list[Doc]) -> None:
    from deploy_support import REPO

    reqs = (REPO / "deploy" / "mlflow" / "requirements.txt").read_text()
    pinned = re.search(r"^mlflow==(\S+)", reqs, re.M)
    assert pinned, "deploy/mlflow/requirements.txt must pin mlflow==X"
    mlflow = one(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]
    for c in mlflow.get("initContainers", []) + mlflow["containers"]:
        name, tag, _ = split_image(c["image"])
        assert name.rsplit("/", 1)[-1] == "ddray-mlflow" and tag == pinned.group(1), c["image"]


# --------------------------------------------------------------------------- exposure


def test_nothing_is_exposed_outside_the_cluster(docs: list[Doc]) -> None:
    for svc in by_kind(docs, "Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", f"Service/{svc['metadata']['name']}"
    for where, spec in ray_cluster_specs(docs):
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", where
        assert not head.get("enableIngress"), where
    assert not {d["kind"] for d in docs} & {"Ingress", "Route", "Gateway", "HTTPRoute"}


# --------------------------------------------------------------------------- credentials


def _secret_values(docs: list[Doc]) -> dict[str, str]:
    out = {}
    for s in by_kind(docs, "Secret"):
        for k, v in s.get("data", {}).items():
            out[f"{base_name(s)}/{k}"] = base64.b64decode(v).decode()
        for k, v in s.get("stringData", {}).items():
            out[f"{base_name(s)}/{k}"] = v
    return out


def test_credentials_come_only_from_secrets(docs: list[Doc]) -> None:
    bad = []
    for pod, c in containers(docs):
        for e in c.get("env", []):
            if SECRET_NAME.search(e["name"]) and "secretKeyRef" not in e.get("valueFrom", {}):
                bad.append(f"{pod.where} {c['name']}: env {e['name']} is not from a Secret")
    for cm in by_kind(docs, "ConfigMap"):
        bad += [f"ConfigMap/{cm['metadata']['name']}: key {k}" for k in cm.get("data", {}) if SECRET_NAME.search(k)]
    # no secret value is repeated anywhere outside its Secret
    values = {k: v for k, v in _secret_values(docs).items() if SECRET_VALUE.search(k.rsplit("/", 1)[1])}
    for d in docs:
        if d["kind"] == "Secret":
            continue
        text = repr(d)
        bad += [f"{d['kind']}/{d['metadata']['name']} contains the value of Secret {k}"
                for k, v in values.items() if v in text]
    assert not bad, "\n".join(bad)


def test_example_credentials_are_obviously_fake(docs: list[Doc]) -> None:
    for key, value in _secret_values(docs).items():
        if SECRET_VALUE.search(key.rsplit("/", 1)[1]):
            assert "INSECURE-EXAMPLE" in value, f"{key} does not look like an example value"


# --------------------------------------------------------------------------- network policies


def _workloads(docs: list[Doc]) -> list[PodSpec]:
    return list(pod_specs(docs))


def _policies_for(docs: list[Doc], pod: PodSpec) -> list[Doc]:
    return [p for p in by_kind(docs, "NetworkPolicy") if selector_matches(p["spec"]["podSelector"], pod.labels)]


def _pod(docs: list[Doc], kind: str, name: str) -> PodSpec:
    return next(p for p in _workloads(docs) if p.where == f"{kind}/{name}")


def _peers(docs: list[Doc], target: PodSpec) -> list[tuple[Doc, Doc]]:
    """(peer, rule) of every ingress rule that admits traffic to ``target``."""
    out = []
    for pol in _policies_for(docs, target):
        for rule in pol["spec"].get("ingress", []):
            assert rule.get("from"), f"NetworkPolicy/{pol['metadata']['name']} admits everyone"
            out += [(peer, rule) for peer in rule["from"]]
    return out


def _admitted(docs: list[Doc], target: PodSpec) -> set[str]:
    """Which rendered pods may open connections to ``target`` (same namespace)."""
    admitted = set()
    for peer, _ in _peers(docs, target):
        assert "ipBlock" not in peer, f"{target.where}: ipBlock peer"
        if "namespaceSelector" in peer:
            continue
        admitted |= {p.where for p in _workloads(docs) if selector_matches(peer["podSelector"], p.labels)}
    return admitted


def test_ingress_is_denied_by_default(docs: list[Doc]) -> None:
    deny = [p for p in by_kind(docs, "NetworkPolicy")
            if p["spec"]["podSelector"] == {} and "Ingress" in p["spec"]["policyTypes"]
            and not p["spec"].get("ingress")]
    assert deny, "no default-deny ingress NetworkPolicy"


@pytest.mark.parametrize("store, port, allowed", [
    ("mlflow-postgres", 5432, {"Deployment/mlflow"}),
    ("mlflow-minio", 9000, {"Deployment/mlflow", "Job/mlflow-minio-bucket"}),
])
def test_stores_admit_only_mlflow(docs: list[Doc], store: str, port: int, allowed: set[str]) -> None:
    target = _pod(docs, "StatefulSet", store)
    assert _admitted(docs, target) == allowed
    for peer, rule in _peers(docs, target):
        assert "namespaceSelector" not in peer, f"{store}: admits other namespaces"
        assert [p["port"] for p in rule.get("ports", [])] == [port], f"{store}: ports {rule.get('ports')}"
    # and the stores open no connections themselves
    assert any("Egress" in p["spec"]["policyTypes"] and not p["spec"].get("egress")
               for p in _policies_for(docs, target)), f"{store}: egress not denied"


def test_mlflow_admits_only_this_namespace(docs: list[Doc]) -> None:
    target = _pod(docs, "Deployment", "mlflow")
    assert _admitted(docs, target) == {p.where for p in _workloads(docs)}  # every pod of the namespace
    for peer, rule in _peers(docs, target):
        assert set(peer) == {"podSelector"}, f"mlflow: peer {peer} reaches beyond the namespace"
        assert [p["port"] for p in rule.get("ports", [])] == [5000]


def test_ray_job_api_is_closed_to_other_namespaces(docs: list[Doc]) -> None:
    """Only the KubeRay operator may reach Ray pods from outside the namespace, and only
    on the dashboard/job-API port it polls."""
    for pod in _workloads(docs):
        if pod.role not in ("head", "worker"):
            continue
        assert _policies_for(docs, pod), f"{pod.where}: no NetworkPolicy"
        for peer, rule in _peers(docs, pod):
            assert "ipBlock" not in peer, pod.where
            if "namespaceSelector" in peer:
                assert peer.get("podSelector", {}).get("matchLabels") == {"app.kubernetes.io/name": "kuberay-operator"}
                assert [p["port"] for p in rule.get("ports", [])] == [8265], pod.where


def test_every_pod_is_covered_by_an_ingress_policy(docs: list[Doc]) -> None:
    for pod in _workloads(docs):
        assert any("Ingress" in p["spec"]["policyTypes"] for p in _policies_for(docs, pod)), pod.where


# --------------------------------------------------------------------------- MLflow wiring


def _mlflow_container(docs: list[Doc]) -> Doc:
    spec = one(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == "mlflow")


def _flags(container: Doc) -> dict[str, str]:
    out = {}
    for a in container.get("args", []):
        if a.startswith("--"):
            k, _, v = a.partition("=")
            out[k] = v
    return out


def _host_allowed(allowed: list[str], host: str) -> bool:
    # mlflow.server.security_utils.is_allowed_host_header
    return "*" in allowed or any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)


def test_mlflow_server_flags(docs: list[Doc]) -> None:
    flags = _flags(_mlflow_container(docs))
    assert "--serve-artifacts" in flags
    assert flags.get("--port", "5000") == "5000" and flags.get("--host") == "0.0.0.0"
    assert flags["--backend-store-uri"].startswith("postgresql")
    assert flags["--artifacts-destination"].startswith("s3://")


def test_mlflow_allowed_hosts_cover_the_service_and_port_forwards(docs: list[Doc]) -> None:
    allowed = _flags(_mlflow_container(docs))["--allowed-hosts"].split(",")
    assert "*" not in allowed
    svc = one(docs, "Service", "mlflow")
    name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
    port = svc["spec"]["ports"][0]["port"]
    for host in (name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"):
        assert _host_allowed(allowed, f"{host}:{port}"), f"Host: {host}:{port} would be rejected"
    assert _host_allowed(allowed, "localhost:5000") and _host_allowed(allowed, "127.0.0.1:5000")
    for evil in ("evil.example.com", f"{name}.evil.example.com:5000", "attacker:5000"):
        assert not _host_allowed(allowed, evil), f"Host: {evil} would be accepted"


def test_mlflow_uris_point_at_the_rendered_services(docs: list[Doc]) -> None:
    mlflow = _mlflow_container(docs)
    flags, env = _flags(mlflow), container_env(mlflow, docs)
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}

    def service_port(host: str, port: int | None) -> None:
        assert host in services, f"no Service {host}"
        assert port in {p["port"] for p in services[host]["spec"]["ports"]}, f"Service {host} has no port {port}"

    db = urlparse(flags["--backend-store-uri"])
    service_port(db.hostname or "", db.port)
    assert db.username is None and db.password is None, "credentials in the backend store URI"
    assert {"PGUSER", "PGPASSWORD"} <= set(env), "libpq credentials missing"
    postgres = one(docs, "StatefulSet", "mlflow-postgres")["spec"]["template"]["spec"]["containers"][0]
    assert container_env(postgres, docs)["POSTGRES_DB"] == db.path.lstrip("/")

    s3 = urlparse(env["MLFLOW_S3_ENDPOINT_URL"])
    service_port(s3.hostname or "", s3.port)
    bucket = urlparse(flags["--artifacts-destination"]).netloc
    job = one(docs, "Job", "mlflow-minio-bucket")["spec"]["template"]["spec"]["containers"][0]
    assert container_env(job, docs)["BUCKET"] == bucket, "the Job creates another bucket"
    assert container_env(job, docs)["AWS_ACCESS_KEY_ID"] == env["AWS_ACCESS_KEY_ID"], "MLflow's MinIO user"

    tracking = urlparse(configmap_data(docs, "ddray-env")["MLFLOW_TRACKING_URI"])
    assert tracking.hostname == "mlflow"
    service_port("mlflow", tracking.port)


def test_stores_keep_their_data_in_volume_claims(docs: list[Doc]) -> None:
    for name, path in (("mlflow-postgres", "/var/lib/postgresql/data"), ("mlflow-minio", "/data")):
        sts = one(docs, "StatefulSet", name)
        claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
        mounts = {m["mountPath"]: m["name"] for m in sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert mounts.get(path) in claims, f"{name}: {path} is not on a PersistentVolumeClaim"


# --------------------------------------------------------------------------- Ray wiring


def test_head_runs_no_tasks(docs: list[Doc]) -> None:
    for where, spec in ray_cluster_specs(docs):
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", where


def test_ray_pods_get_tracking_uri_and_storage(docs: list[Doc]) -> None:
    """MLFLOW_TRACKING_URI and DDRAY_STORAGE reach head, workers and submitter, and
    DDRAY_STORAGE is the shared volume in every Ray pod."""
    for pod in pod_specs(docs):
        if pod.role not in ("head", "worker", "submitter"):
            continue
        c = pod.spec["containers"][0]
        env = container_env(c, docs)
        assert env.get("MLFLOW_TRACKING_URI", "").startswith("http://"), pod.where
        assert "DDRAY_STORAGE" in env, pod.where
        if pod.role in ("head", "worker"):
            found = mount_for(env["DDRAY_STORAGE"], c, pod.spec)
            assert found and "persistentVolumeClaim" in found[1], f"{pod.where}: $DDRAY_STORAGE is not the shared volume"


# --------------------------------------------------------------------------- overlay shapes


def _requests(pods: list[PodSpec]) -> tuple[float, float]:
    cpu = mem = 0.0
    for pod in pods:
        for c in pod.spec["containers"]:
            req = c.get("resources", {}).get("requests", {})
            cpu += cpu_cores(req.get("cpu", 0))
            mem += mem_bytes(req.get("memory", 0))
    return cpu, mem


def test_cpu_dev_fits_a_laptop(renders: dict[str, tuple[list[Doc], str]]) -> None:
    docs = renders["cpu-dev"][0]
    cluster = one(docs, "RayCluster", "ddray")["spec"]
    [group] = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 1
    assert not cluster.get("enableInTreeAutoscaling")
    for pod, c in containers(docs):
        for kind in ("requests", "limits"):
            assert not any("gpu" in r for r in c.get("resources", {}).get(kind, {})), pod.where
    # the platform plus one Ray cluster (a RayJob's) within 4 CPUs / 8 GiB of requests
    pods = [p for p in pod_specs(docs) if p.role == "pod" and p.owner["kind"] != "Job"]
    pods += [p for p in pod_specs(docs) if p.where.startswith("RayJob/ddray-distill")]
    cpu, mem = _requests(pods)
    assert cpu <= 4 and mem <= 8 * 2**30, f"requests {cpu} CPU, {mem / 2**30:.1f} GiB"


def test_gpu_overlay_scales_gpu_workers(renders: dict[str, tuple[list[Doc], str]]) -> None:
    docs = renders["gpu"][0]
    for where, spec in ray_cluster_specs(docs):
        assert spec.get("enableInTreeAutoscaling") is True, where
        gpu_groups = [g for g in spec["workerGroupSpecs"]
                      if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
        assert gpu_groups, f"{where}: no GPU worker group"
        for g in gpu_groups:
            res = g["template"]["spec"]["containers"][0]["resources"]
            assert str(res["limits"]["nvidia.com/gpu"]) == "1", f"{where}: one GPU per pod"
            assert str(res["requests"].get("nvidia.com/gpu")) == "1", f"{where}: GPU request must equal the limit"
            assert 0 <= g["minReplicas"] < g["maxReplicas"], f"{where}: no room to autoscale"
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
        assert not any("gpu" in r for r in head.get("limits", {})), f"{where}: GPU on the head"
    pvc = one(docs, "PersistentVolumeClaim", "ddray-storage")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "multi-node checkpoints need ReadWriteMany"
