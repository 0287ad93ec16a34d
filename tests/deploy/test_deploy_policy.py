"""Security and consistency policies of the rendered overlays.

Every container (init containers, Ray heads and workers, KubeRay job submitters
and autoscaler included) runs unprivileged with a read-only root file system
and bounded resources; images are pinned; credentials come only from Secrets;
nothing is exposed outside the cluster; the NetworkPolicies admit exactly the
traffic docs/kubernetes.md describes; versions agree with pyproject.toml.
"""

from __future__ import annotations

import base64
import json
import re
from urllib.parse import urlparse

import pytest

from deploy_support import (
    Doc, PodSpec, base_name, by_kind, configmap_data, container_env, cpu_cores,
    mem_bytes, mount_for, one, pod_specs, pyproject, ray_cluster_specs, ray_version, selector_matches, split_image,
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
    """Head and workers share one image (one Ray, one ddray), the one deploy/Dockerfile builds
    for the project's version; the job submitters run the small submitter image of the same Ray."""
    version = pyproject()["project"]["version"]
    images = {c["image"] for pod, c in containers(docs) if pod.role in ("head", "worker")}
    assert len(images) == 1, images
    name, tag, _ = split_image(images.pop())
    assert name.rsplit("/", 1)[-1] == "ddray" and tag and tag.startswith(version + "-"), (name, tag)
    submitters = {c["image"] for pod, c in containers(docs) if pod.role == "submitter"}
    assert len(submitters) == 1, submitters
    name, tag, _ = split_image(submitters.pop())
    assert name.rsplit("/", 1)[-1] == "ddray-submitter" and tag == ray_version(), (name, tag)


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


def _ray_pods(docs: list[Doc]) -> set[str]:
    return {p.where for p in _workloads(docs) if p.role in ("head", "worker")}


@pytest.mark.parametrize("store, port, allowed", [
    ("mlflow-postgres", 5432, lambda docs: {"Deployment/mlflow"}),
    # MLflow (its artifacts) and the Ray pods (bucket ddray), each with its own MinIO user
    ("mlflow-minio", 9000, lambda docs: {"Deployment/mlflow", "Job/mlflow-minio-bucket"} | _ray_pods(docs)),
])
def test_stores_admit_only_their_clients(docs: list[Doc], store: str, port: int, allowed) -> None:
    target = _pod(docs, "StatefulSet", store)
    assert _admitted(docs, target) == allowed(docs)
    for peer, rule in _peers(docs, target):
        assert "namespaceSelector" not in peer, f"{store}: admits other namespaces"
        assert [p["port"] for p in rule.get("ports", [])] == [port], f"{store}: ports {rule.get('ports')}"
    # and the stores open no connections themselves
    assert any("Egress" in p["spec"]["policyTypes"] and not p["spec"].get("egress")
               for p in _policies_for(docs, target)), f"{store}: egress not denied"


MONITORING_NS = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}


def test_mlflow_admits_ray_pods_its_users_job_and_prometheus(docs: list[Doc]) -> None:
    target = _pod(docs, "Deployment", "mlflow")
    assert _admitted(docs, target) == _ray_pods(docs) | {"Job/mlflow-users"}
    for peer, rule in _peers(docs, target):
        assert [p["port"] for p in rule.get("ports", [])] == [5000]
        if "namespaceSelector" in peer:  # Prometheus, for /metrics (behind the login too)
            assert peer == {"namespaceSelector": MONITORING_NS}, peer


def test_ray_pods_admit_ray_pods_submitters_the_operator_and_prometheus(docs: list[Doc]) -> None:
    """Ray pods talk to each other on any port; the job API (8265) takes the submitters and the
    KubeRay operator; Prometheus gets the metrics port (8080) only; nothing else gets in."""
    for pod in _workloads(docs):
        if pod.role not in ("head", "worker"):
            continue
        assert _admitted(docs, pod) == _ray_pods(docs) | {p.where for p in _workloads(docs) if p.role == "submitter"}
        metrics = {p["containerPort"] for p in pod.spec["containers"][0].get("ports", []) if p["name"] == "metrics"}
        assert metrics == {8080}, f"{pod.where}: metrics port {metrics}"
        for peer, rule in _peers(docs, pod):
            ports = [p["port"] for p in rule.get("ports", [])]
            if "namespaceSelector" not in peer:
                assert ports in ([], [8265]), (pod.where, peer, ports)
                assert ports == [8265] or peer["podSelector"] == {"matchLabels": {"ray.io/is-ray-node": "yes"}}
            elif peer.get("podSelector"):
                assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
                assert ports == [8265], pod.where
            else:
                assert peer == {"namespaceSelector": MONITORING_NS} and ports == [8080], (pod.where, peer)


def test_only_the_monitoring_component_admits_prometheus(variants: dict[str, tuple[list[Doc], str]]) -> None:
    """The namespace `monitoring` gets in through the NetworkPolicies that components/monitoring adds
    (and its kustomization.yaml names), nowhere else."""
    from deploy_support import K8S

    named = set(re.findall(r"monitoring-scrape[\w-]*", (K8S / "components/monitoring/kustomization.yaml").read_text()))
    for name, (docs, _) in variants.items():
        admitting = {p["metadata"]["name"] for p in by_kind(docs, "NetworkPolicy")
                     if any(peer.get("namespaceSelector") == MONITORING_NS
                            for rule in p["spec"].get("ingress", []) for peer in rule.get("from", []))}
        monitored = bool(by_kind(docs, "PodMonitor"))
        assert admitting == (named if monitored else set()), f"{name}: {admitting}, the component names {named}"


def test_ray_token_authentication_is_on(docs: list[Doc]) -> None:
    """KubeRay's authOptions: a generated token, required by the GCS, the dashboard and the job API."""
    for where, spec in ray_cluster_specs(docs):
        assert spec.get("authOptions", {}).get("mode") == "token", where
        assert not spec["authOptions"].get("enableK8sTokenAuth"), f"{where}: unsupported for RayJobs"


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
    from mlflow.server.security_utils import is_allowed_host_header  # the server's own check

    return bool(is_allowed_host_header(allowed, host))


def test_mlflow_server_flags(docs: list[Doc]) -> None:
    flags = _flags(_mlflow_container(docs))
    assert "--serve-artifacts" in flags
    assert flags.get("--app-name") == "basic-auth", "MLflow must require a login"
    assert flags.get("--expose-prometheus"), "no /metrics"
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


def test_metrics_user_is_no_admin(docs: list[Doc]) -> None:
    """Job/mlflow-users, run against a stand-in for MLflow's user API that records the calls: ddray and
    metrics are created (metrics existing already: it gets its password again) and both are left
    without admin rights, an earlier admin metrics user included. The server lets such a user read
    /metrics (MLFLOW_BASIC_AUTH_FAIL_CLOSED false; tests/e2e scrape it as that user for real)."""
    import http.server
    import subprocess
    import sys
    import threading

    calls: list[tuple[str, str, Doc]] = []

    class MlflowStandIn(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            calls.append((self.command, self.path, body))
            exists = self.path.endswith("/users/create") and body.get("username") == "metrics"
            self.send_response(400 if exists else 200)
            self.end_headers()
            self.wfile.write(b'{"error_code": "RESOURCE_ALREADY_EXISTS"}' if exists else b"{}")

        do_GET = do_POST = do_PATCH = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MlflowStandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        job = one(docs, "Job", "mlflow-users")["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value", "x") for e in job["env"]}
        env.update(MLFLOW_URL=f"http://127.0.0.1:{server.server_address[1]}", DDRAY_USERNAME="ddray",
                   METRICS_USERNAME="metrics", PATH="/usr/bin:/bin")
        assert job["command"][:2] == ["python", "-c"]
        proc = subprocess.run([sys.executable, "-c", job["command"][2]], env=env, capture_output=True, text=True,
                              timeout=60)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    admin = {body["username"]: body["is_admin"] for method, path, body in calls if path.endswith("/update-admin")}
    assert admin == {"ddray": False, "metrics": False}, calls
    assert ("PATCH", "/api/2.0/mlflow/users/update-password", {"username": "metrics", "password": "x"}) in calls
    server_env = container_env(_mlflow_container(docs), docs)
    assert server_env.get("MLFLOW_BASIC_AUTH_FAIL_CLOSED") == "false", "only admins could read /metrics"


def test_stores_keep_their_data_in_volume_claims(docs: list[Doc]) -> None:
    for name, path in (("mlflow-postgres", "/var/lib/postgresql/data"), ("mlflow-minio", "/data")):
        sts = one(docs, "StatefulSet", name)
        claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
        mounts = {m["mountPath"]: m["name"] for m in sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert mounts.get(path) in claims, f"{name}: {path} is not on a PersistentVolumeClaim"


# --------------------------------------------------------------------------- Ray wiring


def test_head_runs_no_tasks_and_one_driver(docs: list[Doc]) -> None:
    """The head advertises no CPU (KubeRay: group resources → --num-cpus=0) but one ddray_driver slot,
    which every RayJob's entrypoint takes."""
    for where, spec in ray_cluster_specs(docs):
        head = spec["headGroupSpec"]
        assert head.get("resources", {}).get("CPU") == "0" and "num-cpus" not in head["rayStartParams"], where
        assert head["resources"].get("ddray_driver") == "1", where
    for job in by_kind(docs, "RayJob"):
        assert json.loads(job["spec"]["entrypointResources"]) == {"ddray_driver": 1}, job["metadata"]["name"]
        assert not job["spec"].get("entrypointNumCpus"), "a CPU would push the driver off the head"
        assert 0 < job["spec"]["preRunningDeadlineSeconds"] < job["spec"]["activeDeadlineSeconds"]


def test_ray_pods_reach_tracking_and_storage_with_their_own_credentials(docs: list[Doc]) -> None:
    """Head and workers get MLflow's address and login, and $DDRAY_STORAGE: the bucket the bucket Job
    creates for the Ray pods, at the MinIO Service, with that bucket's MinIO user from its Secret.
    The Secrets are optional in the pod, so that ddray reports a missing one by name
    ($DDRAY_S3_KEYS_FROM, $DDRAY_MLFLOW_LOGIN_FROM) instead of the pod never starting."""
    services = {s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]} for s in by_kind(docs, "Service")}
    job = container_env(one(docs, "Job", "mlflow-minio-bucket")["spec"]["template"]["spec"]["containers"][0], docs)
    for pod in pod_specs(docs):
        if pod.role not in ("head", "worker", "submitter"):
            continue
        c = pod.spec["containers"][0]
        env = container_env(c, docs)
        tracking = urlparse(env.get("MLFLOW_TRACKING_URI", ""))
        assert tracking.scheme == "http" and tracking.port in services.get(tracking.hostname or "", ()), pod.where
        storage = urlparse(env["DDRAY_STORAGE"])
        if pod.role == "submitter":
            continue
        if storage.scheme == "s3":
            assert storage.netloc == job["DDRAY_BUCKET"], f"{pod.where}: bucket {storage.netloc}"
            endpoint = urlparse(env["AWS_ENDPOINT_URL"])
            assert endpoint.port in services.get(endpoint.hostname or "", ()), f"{pod.where}: {endpoint}"
            assert env["AWS_ACCESS_KEY_ID"] == job["DDRAY_ACCESS_KEY_ID"], f"{pod.where}: not the bucket's user"
        else:  # k8s/components/pvc-storage
            found = mount_for(env["DDRAY_STORAGE"], c, pod.spec)
            assert found and "persistentVolumeClaim" in found[1], f"{pod.where}: $DDRAY_STORAGE is not shared"
        refs = {s["secretRef"]["name"]: s["secretRef"].get("optional") for s in c.get("envFrom", []) if "secretRef" in s}
        for var, key in (("DDRAY_S3_KEYS_FROM", "AWS_SECRET_ACCESS_KEY"),
                         ("DDRAY_MLFLOW_LOGIN_FROM", "MLFLOW_TRACKING_PASSWORD")):
            assert refs.get(env[var]) is True, f"{pod.where}: Secret {env[var]} ({var}) not optional envFrom"
            assert env[key] == f"<secret:{env[var]}/{key}>", f"{pod.where}: {key}"


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


def test_gpu_overlay_can_place_what_its_distillation_asks_for(renders: dict[str, tuple[list[Doc], str]]) -> None:
    """The run's workers (config: workers × gpus/cpus_per_worker) fit the GPU group at maxReplicas, the
    autoscaler is on to bring them up from minReplicas, and the run waits for them (placement_timeout)
    for less than the RayJob's deadline. (The bug this replaces: a cluster at 1 GPU, a run of 4.)"""
    import math

    import yaml

    docs = renders["gpu"][0]
    cfg = yaml.safe_load(configmap_data(docs, "ddray-distill-config")["distill.yaml"])["cluster"]
    job = one(docs, "RayJob", "ddray-distill")["spec"]
    spec = job["rayClusterSpec"]
    assert spec.get("enableInTreeAutoscaling") is True
    [group] = spec["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus, cpus = float(limits["nvidia.com/gpu"]), cpu_cores(limits["cpu"])
    per_pod = min(math.floor(gpus / cfg["gpus_per_worker"]), math.floor(cpus / cfg["cpus_per_worker"]))
    assert per_pod >= 1, f"a worker ({cfg}) does not fit a pod ({limits})"
    assert cfg["workers"] <= per_pod * group["maxReplicas"], f"{cfg['workers']} workers > {per_pod} × maxReplicas"
    assert group["minReplicas"] < group["maxReplicas"]
    assert cfg["placement_timeout"] < job["activeDeadlineSeconds"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert not any("gpu" in r for r in head.get("limits", {})), "GPU on the head"


# What the GPU pods must fit: the allocatable resources of the common 8-vCPU/32-GiB GPU nodes
# (g5.2xlarge, g6.2xlarge, g2-standard-8, …; docs/kubernetes.md, "GPU nodes") after their DaemonSets.
GPU_NODE_ALLOCATABLE = {"cpu": 7.5, "memory": 29 * 2**30}


def _pod_requests(pod: PodSpec, extra: list[Doc] = []) -> dict[str, float]:  # noqa: B006
    """What the scheduler reserves for a pod: the sum over its containers (plus ``extra``, containers
    KubeRay adds), or its largest init container, whichever is larger — per resource."""
    out: dict[str, float] = {}
    for r, q in (("cpu", cpu_cores), ("memory", mem_bytes)):
        main = sum(q(c.get("resources", {}).get("requests", {}).get(r, 0)) for c in pod.spec["containers"] + extra)
        init = max((q(c.get("resources", {}).get("requests", {}).get(r, 0))
                    for c in pod.spec.get("initContainers", [])), default=0.0)
        out[r] = max(main, init)
    return out


def test_gpu_pods_fit_the_common_gpu_nodes(variants: dict[str, tuple[list[Doc], str]]) -> None:
    """Every Ray pod of the gpu overlay — a GPU worker, or the head with its autoscaler sidecar — fits
    GPU_NODE_ALLOCATABLE (the bug this replaces: 8 CPU / 32 GiB requested, which no such node has)."""
    docs = variants["gpu"][0]
    gpu_pods = 0
    for where, spec in ray_cluster_specs(docs):
        sidecar = [{"resources": spec.get("autoscalerOptions", {}).get("resources", {})}] \
            if spec.get("enableInTreeAutoscaling") else []
        for pod in pod_specs([{"kind": "RayCluster", "metadata": {"name": where}, "spec": spec}]):
            req = _pod_requests(pod, sidecar if pod.role == "head" else [])
            for r, room in GPU_NODE_ALLOCATABLE.items():
                assert req[r] <= room, f"{where} {pod.role}: requests {req[r]:.3g} {r}, a GPU node has {room:.3g}"
            gpus = pod.spec["containers"][0]["resources"].get("limits", {}).get("nvidia.com/gpu")
            gpu_pods += bool(gpus)
    assert gpu_pods == 3, "one GPU group in RayCluster/ddray and in each RayJob"


def test_no_read_write_many_claim_unless_a_component_adds_it(renders: dict[str, tuple[list[Doc], str]],
                                                            variants: dict[str, tuple[list[Doc], str]]) -> None:
    """ReadWriteMany (which the clouds' default storage classes lack) only with components/data-rwx."""
    for name, (docs, _) in {**renders, **variants}.items():
        rwx = {d["metadata"]["name"] for d in by_kind(docs, "PersistentVolumeClaim")
               if "ReadWriteMany" in d["spec"]["accessModes"]}
        rwx |= {t["metadata"]["name"] for s in by_kind(docs, "StatefulSet")
                for t in s["spec"].get("volumeClaimTemplates", []) if "ReadWriteMany" in t["spec"]["accessModes"]}
        assert rwx == ({"ddray-data"} if name == "gpu+data" else set()), f"{name}: {rwx}"


def test_pod_monitors_scrape_ports_that_exist_and_are_admitted(variants: dict[str, tuple[list[Doc], str]]) -> None:
    docs = variants["gpu"][0]
    monitors = by_kind(docs, "PodMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"ddray-ray", "ddray-mlflow"}
    for m in monitors:  # kube-prometheus-stack's default podMonitorSelector: release=<its Helm release>
        assert m["metadata"]["labels"].get("release") == "kube-prometheus-stack", m["metadata"]["name"]
    secrets = {base_name(s): s for s in by_kind(docs, "Secret")}
    for m in monitors:
        pods = [p for p in _workloads(docs) if selector_matches(m["spec"]["selector"], p.labels)]
        assert pods, f"PodMonitor/{m['metadata']['name']} selects no pod"
        for ep in m["spec"]["podMetricsEndpoints"]:
            for pod in pods:
                ports = {p["name"]: p["containerPort"] for p in pod.spec["containers"][0].get("ports", [])}
                assert ep["port"] in ports, f"{pod.where}: no port {ep['port']}"
                admitted = [rule for peer, rule in _peers(docs, pod) if peer.get("namespaceSelector") == MONITORING_NS]
                assert any(ports[ep["port"]] in [p["port"] for p in r.get("ports", [])] for r in admitted), pod.where
            for part in ep.get("basicAuth", {}).values():
                assert part["key"] in secrets[part["name"]]["data"], part
