"""k8s/ renders with a real kustomize, and what it renders is valid: core kinds
against Kubernetes' OpenAPI schemas (kubernetes-validate), RayCluster/RayJob
against KubeRay's v1 CRD schemas, plus the checks the KubeRay operator makes."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from deploy_support import (
    CRD_SCHEMAS, K8S, KUBERNETES_VERSION, Doc, Kustomize, base_name, by_kind, crd_errors, mount_for, one,
    pod_specs, ray_cluster_specs, render,
)

CORE_KINDS = {"Namespace", "ConfigMap", "Secret", "Service", "PersistentVolumeClaim", "Deployment",
              "StatefulSet", "Job", "NetworkPolicy"}
RAY_KINDS = {"RayCluster", "RayJob"}
MONITORING_KINDS = {"PodMonitor"}  # k8s/components/monitoring, in the gpu overlay


def test_every_yaml_under_k8s_parses() -> None:
    files = sorted(K8S.rglob("*.yaml")) + sorted(K8S.rglob("*.yml"))
    assert files, "no YAML under k8s/"
    for f in files:
        docs = list(yaml.safe_load_all(f.read_text()))
        assert any(d is not None for d in docs), f"{f}: empty"


def test_overlays_render_cleanly(renders: dict[str, tuple[list[Doc], str]],
                                 variants: dict[str, tuple[list[Doc], str]]) -> None:
    # Secrets and volume claims may come from outside the overlay (the user, opt-in components)
    required = CORE_KINDS - {"Secret", "PersistentVolumeClaim"} | RAY_KINDS
    rendered = {**renders, **{f"{name} (with its opt-in components)": r for name, r in variants.items()}}
    for overlay, (docs, stderr) in rendered.items():
        # deprecated fields (patchesStrategicMerge, commonLabels, bases, …) make kustomize warn
        assert "warning" not in stderr.lower(), f"{overlay}: kustomize warned:\n{stderr}"
        kinds = {d["kind"] for d in docs}
        assert required <= kinds, f"{overlay}: missing kinds {required - kinds}"
        extra = kinds - CORE_KINDS - RAY_KINDS - MONITORING_KINDS
        assert not extra, f"{overlay}: unexpected kinds {extra}"


def test_base_renders_on_its_own(kustomize: Kustomize) -> None:
    docs, stderr = render(kustomize, K8S / "base")
    assert "warning" not in stderr.lower(), stderr
    assert {d["kind"] for d in docs} >= RAY_KINDS


def test_everything_lives_in_the_namespace(docs: list[Doc]) -> None:
    [ns] = by_kind(docs, "Namespace")
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == ns["metadata"]["name"], f"{d['kind']}/{d['metadata']['name']}"


def test_core_objects_validate_against_kubernetes_schemas(docs: list[Doc]) -> None:
    import kubernetes_validate

    errors = []
    for d in docs:
        if d["kind"] in RAY_KINDS | MONITORING_KINDS:
            continue
        try:
            kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{d['kind']}/{d['metadata']['name']}: {'/'.join(map(str, e.path))}: {e.message}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("strict", [False, True], ids=["schema", "strict"])
def test_ray_objects_validate_against_kuberay_crd_schemas(docs: list[Doc], strict: bool) -> None:
    for kind, path in CRD_SCHEMAS.items():
        assert path.is_file(), f"KubeRay CRD schema missing: {path}"
    errors = []
    for d in docs:
        if d["kind"] in RAY_KINDS:
            errors += [f"{d['kind']}/{d['metadata']['name']}: {e}" for e in crd_errors(d, strict=strict)]
    assert not errors, "\n".join(errors)


def test_strict_crd_check_rejects_unknown_fields(docs: list[Doc]) -> None:
    """The strict pass is not vacuous: a misspelt field is reported."""
    job = dict(one(docs, "RayJob", "ddray-distill"))
    job = {**job, "spec": {**job["spec"], "shutdownAfterJobFinish": True}}
    assert crd_errors(job) == []
    assert any("shutdownAfterJobFinish" in e for e in crd_errors(job, strict=True))


DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def test_kuberay_operator_validation(docs: list[Doc]) -> None:
    """The checks of KubeRay's ValidateRayClusterSpec / ValidateRayJobSpec that a
    CRD schema cannot express (ray-operator/controllers/ray/utils/validation.go)."""
    for d in by_kind(docs, "RayCluster"):
        name = d["metadata"]["name"]
        assert len(name) <= 53 and DNS1035.match(name), f"RayCluster name {name!r}"
    for d in by_kind(docs, "RayJob"):
        name, spec = d["metadata"]["name"], d["spec"]
        assert len(name) <= 47 and DNS1035.match(name), f"RayJob name {name!r}"
        assert "rayClusterSpec" in spec or spec.get("clusterSelector"), name
        assert spec.get("ttlSecondsAfterFinished", 0) >= 0, name
        if not spec.get("shutdownAfterJobFinishes"):
            assert spec.get("ttlSecondsAfterFinished", 0) == 0, name
        assert spec.get("activeDeadlineSeconds", 1) > 0, name
        assert spec.get("backoffLimit", 0) >= 0, name
        assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode", f"{name}: submitterPodTemplate needs K8sJobMode"
        assert isinstance(yaml.safe_load(spec.get("runtimeEnvYAML", "{}")), dict), f"{name}: runtimeEnvYAML"
        if "entrypointResources" in spec:  # `ray job submit --entrypoint-resources` takes a JSON object
            res = json.loads(spec["entrypointResources"])
            assert isinstance(res, dict) and all(isinstance(v, (int, float)) for v in res.values()), name
        assert spec["submitterPodTemplate"]["spec"].get("restartPolicy") == "Never", name
    for where, spec in ray_cluster_specs(docs):
        groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
        for gname, g in groups:
            assert g["template"]["spec"]["containers"], f"{where} {gname}: no container"
            params = g.get("rayStartParams", {})
            assert "labels" not in params, f"{where} {gname}: use the group's labels field"
            if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
                assert not g.get("resources"), f"{where} {gname}: resources in rayStartParams and resources"
        for g in spec.get("workerGroupSpecs", []):
            assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], where


def test_every_rayjob_cluster_is_the_raycluster(docs: list[Doc]) -> None:
    """replacements copied the overlay's (patched) RayCluster spec into each RayJob."""
    cluster = one(docs, "RayCluster", "ddray")["spec"]
    jobs = by_kind(docs, "RayJob")
    assert {j["metadata"]["name"] for j in jobs} == {"ddray-distill", "ddray-tune"}
    for j in jobs:
        assert j["spec"]["rayClusterSpec"] == cluster, j["metadata"]["name"]


def test_references_resolve(docs: list[Doc]) -> None:
    """Every ConfigMap, Secret and PVC a pod uses is rendered (with its hashed name)."""
    names = {k: {d["metadata"]["name"] for d in by_kind(docs, k)}
             for k in ("ConfigMap", "Secret", "PersistentVolumeClaim")}
    missing = []
    for pod in pod_specs(docs):
        claim_templates = {t["metadata"]["name"] for t in pod.owner.get("spec", {}).get("volumeClaimTemplates", [])}
        for v in pod.spec.get("volumes", []):
            if "configMap" in v and v["configMap"]["name"] not in names["ConfigMap"]:
                missing.append(f"{pod.where}: ConfigMap {v['configMap']['name']}")
            if "secret" in v and v["secret"]["secretName"] not in names["Secret"]:
                missing.append(f"{pod.where}: Secret {v['secret']['secretName']}")
            if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] not in names["PersistentVolumeClaim"]:
                missing.append(f"{pod.where}: PVC {v['persistentVolumeClaim']['claimName']}")
        volumes = {v["name"] for v in pod.spec.get("volumes", [])} | claim_templates
        for c in pod.all_containers:
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    missing.append(f"{pod.where} {c['name']}: volume {m['name']}")
            for src in c.get("envFrom", []):
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if key in src and src[key]["name"] not in names[kind]:
                        missing.append(f"{pod.where} {c['name']}: {kind} {src[key]['name']}")
            for e in c.get("env", []):
                for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    ref = e.get("valueFrom", {}).get(key)
                    if ref is None:
                        continue
                    obj = next((d for d in by_kind(docs, kind) if d["metadata"]["name"] == ref["name"]), None)
                    if obj is None or ref["key"] not in {**obj.get("data", {}), **obj.get("stringData", {})}:
                        missing.append(f"{pod.where} {c['name']}: {kind} {ref['name']} key {ref['key']}")
    assert not missing, "\n".join(missing)


def test_services_select_pods_and_name_their_ports(docs: list[Doc]) -> None:
    pods = list(pod_specs(docs))
    for svc in by_kind(docs, "Service"):
        sel = svc["spec"]["selector"]
        targets = [p for p in pods if all(p.labels.get(k) == v for k, v in sel.items())]
        assert len(targets) == 1, f"Service/{svc['metadata']['name']} selects {[p.where for p in targets]}"
        ports = {p.get("name") for c in targets[0].spec["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service/{svc['metadata']['name']}: targetPort {port['targetPort']}"


def test_staged_apply_labels(docs: list[Doc]) -> None:
    """docs/kubernetes.md applies the platform with -l '!ddray.io/workload' and each
    Ray workload with -l ddray.io/workload=<name>: only the Ray objects carry it."""
    labelled = {f"{d['kind']}/{base_name(d)}": d["metadata"].get("labels", {}).get("ddray.io/workload")
                for d in docs if "ddray.io/workload" in d["metadata"].get("labels", {})}
    expected = {"RayCluster/ddray": "raycluster", "RayJob/ddray-distill": "distill", "RayJob/ddray-tune": "tune"}
    if by_kind(docs, "Job") and any(j["metadata"]["name"] == "ddray-data-fill" for j in by_kind(docs, "Job")):
        expected["Job/ddray-data-fill"] = "data"  # k8s/components/data-rwx
    assert labelled == expected


def test_pvc_storage_component_puts_storage_on_the_shared_volume(kustomize: Kustomize, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """k8s/components/pvc-storage, added to an overlay as docs/kubernetes.md says: every Ray pod of every
    cluster mounts the ReadWriteMany claim where $DDRAY_STORAGE points."""
    import shutil

    from deploy_support import configmap_data, mount_for

    shutil.copytree(K8S, tmp_path / "k8s")
    kz = tmp_path / "k8s" / "overlays" / "cpu-dev" / "kustomization.yaml"
    doc = yaml.safe_load(kz.read_text())
    doc["components"].append("../../components/pvc-storage")
    kz.write_text(yaml.safe_dump(doc, sort_keys=False))
    docs, stderr = render(kustomize, kz.parent)
    assert "warning" not in stderr.lower(), stderr
    storage = configmap_data(docs, "ddray-env")["DDRAY_STORAGE"]
    assert storage == "/mnt/ddray"
    assert one(docs, "PersistentVolumeClaim", "ddray-storage")["spec"]["accessModes"] == ["ReadWriteMany"]
    pods = [p for p in pod_specs(docs) if p.role in ("head", "worker")]
    assert {p.where.split(" ")[0] for p in pods} == {"RayCluster/ddray", "RayJob/ddray-distill", "RayJob/ddray-tune"}
    for pod in pods:
        found = mount_for(storage + "/x", pod.spec["containers"][0], pod.spec)
        assert found and found[1].get("persistentVolumeClaim", {}).get("claimName") == "ddray-storage", pod.where


# --------------------------------------------------------------------------- opt-in components


def _claims(docs: list[Doc]) -> dict[str, list[str]]:
    """Every volume claim the objects create (PVCs and StatefulSet claim templates) → its access modes."""
    claims = {f"PersistentVolumeClaim/{d['metadata']['name']}": d["spec"]["accessModes"]
              for d in by_kind(docs, "PersistentVolumeClaim")}
    for sts in by_kind(docs, "StatefulSet"):
        for t in sts["spec"].get("volumeClaimTemplates", []):
            claims[f"StatefulSet/{sts['metadata']['name']} claim {t['metadata']['name']}"] = t["spec"]["accessModes"]
    return claims


def test_gpu_overlay_needs_no_read_write_many_volume(renders: dict[str, tuple[list[Doc], str]]) -> None:
    """The default classes of EKS, GKE and AKS cannot provide ReadWriteMany: as shipped, no claim asks
    for it and no Ray pod mounts the data volume, so a cluster with only those classes runs mnist5k."""
    for overlay, (docs, _) in renders.items():
        rwx = {name for name, modes in _claims(docs).items() if "ReadWriteMany" in modes}
        assert not rwx, f"{overlay}: ReadWriteMany claims {rwx}"
        for pod in pod_specs(docs):
            claims = {v["persistentVolumeClaim"]["claimName"] for v in pod.spec.get("volumes", [])
                      if "persistentVolumeClaim" in v}
            assert "ddray-data" not in claims, f"{overlay}: {pod.where} mounts ddray-data"


def test_data_component_mounts_the_shared_volume_in_every_ray_pod(variants: dict[str, tuple[list[Doc], str]]) -> None:
    """k8s/components/data-rwx: the ReadWriteMany claim, read-only at /data in every Ray pod of every
    cluster (the RayJobs' copies included), and the Job that fills it."""
    docs = variants["gpu+data"][0]
    assert _claims(docs)["PersistentVolumeClaim/ddray-data"] == ["ReadWriteMany"]
    one(docs, "Job", "ddray-data-fill")
    ray_pods = [p for p in pod_specs(docs) if p.role in ("head", "worker")]
    assert {p.where.split(" ")[0] for p in ray_pods} == {"RayCluster/ddray", "RayJob/ddray-distill", "RayJob/ddray-tune"}
    for pod in ray_pods:
        found = mount_for("/data/mnist", pod.spec["containers"][0], pod.spec)
        assert found and found[1].get("persistentVolumeClaim", {}).get("claimName") == "ddray-data", pod.where
        assert found[0].get("readOnly") and found[1]["persistentVolumeClaim"].get("readOnly"), pod.where


def test_gpu_overlay_ships_no_credentials(renders: dict[str, tuple[list[Doc], str]]) -> None:
    """The example Secrets are opt-in there (commented out); cpu-dev, for throw-away clusters, keeps them."""
    assert not by_kind(renders["gpu"][0], "Secret")
    assert {base_name(s) for s in by_kind(renders["cpu-dev"][0], "Secret")} == expected_secrets(renders["cpu-dev"][0])


def expected_secrets(docs: list[Doc]) -> set[str]:
    """The Secrets the objects read: pod volumes, env, envFrom, image pulls, PodMonitor logins."""
    names: set[str] = set()
    for pod in pod_specs(docs):
        names |= {v["secret"]["secretName"] for v in pod.spec.get("volumes", []) if "secret" in v}
        names |= {s["name"] for s in pod.spec.get("imagePullSecrets", [])}
        for c in pod.all_containers:
            names |= {s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s}
            names |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                      if "secretKeyRef" in e.get("valueFrom", {})}
    for m in by_kind(docs, "PodMonitor"):
        for ep in m["spec"]["podMetricsEndpoints"]:
            names |= {part["name"] for part in ep.get("basicAuth", {}).values()}
    return {re.sub(r"-[a-z0-9]{10}$", "", n) for n in names}


def test_example_secrets_stand_in_for_exactly_the_secrets_the_gpu_overlay_reads(
        renders: dict[str, tuple[list[Doc], str]], variants: dict[str, tuple[list[Doc], str]]) -> None:
    """What docs/kubernetes.md tells the user to create (step 4) is what the gpu overlay reads, and what
    components/example-secrets generates in the tests' stand-in for them."""
    from deploy_support import REPO

    wanted = expected_secrets(renders["gpu"][0])
    assert {base_name(s) for s in by_kind(variants["gpu"][0], "Secret")} == wanted
    guide = (REPO / "docs" / "kubernetes.md").read_text()
    created = set(re.findall(r"create secret generic ([\w-]+)", guide))
    assert created == wanted, f"docs/kubernetes.md creates {sorted(created)}, the overlay reads {sorted(wanted)}"


def test_image_pull_secret_component_reaches_every_pod(kustomize: Kustomize, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from deploy_support import Variant, render_variant

    docs, stderr = render_variant(kustomize, Variant("gpu", ("image-pull-secret",)), tmp_path)
    assert "warning" not in stderr.lower(), stderr
    pods = list(pod_specs(docs))
    assert {p.role for p in pods} == {"head", "worker", "submitter", "pod"}
    for pod in pods:
        assert pod.spec.get("imagePullSecrets") == [{"name": "ddray-registry"}], pod.where
