"""docs/kubernetes.md and deploy/README.md name files and objects that exist."""

from __future__ import annotations

import re

from deploy_support import REPO, Doc, by_kind, pyproject

GUIDE = REPO / "docs" / "kubernetes.md"
IMAGES = REPO / "deploy" / "README.md"


def test_guide_paths_exist() -> None:
    for doc in (GUIDE, IMAGES):
        text = doc.read_text()
        paths = set(re.findall(r"(?<![\w/.-])((?:k8s|deploy|docs|tests)/[\w./-]*[\w/])", text))
        assert paths, doc
        missing = sorted(p for p in paths if not (REPO / p).exists())
        assert not missing, f"{doc.relative_to(REPO)} names missing paths: {missing}"


def test_guide_walks_through_every_step() -> None:
    text = GUIDE.read_text()
    for needle in ("helm install kuberay-operator", "docker build", "kind load docker-image",
                   "kubectl apply -k k8s/overlays/cpu-dev -l '!ddray.io/workload'",
                   "-l ddray.io/workload=distill", "-l ddray.io/workload=tune",
                   "port-forward svc/mlflow 5000:5000", "create secret generic",
                   "k8s/overlays/gpu", "deploy/preflight.sh k8s/overlays/cpu-dev",
                   "deploy/preflight.sh k8s/overlays/gpu"):
        assert needle in text, f"docs/kubernetes.md lacks {needle!r}"


def test_guide_answers_what_stops_a_cloud_user() -> None:
    """The prerequisites and the GPU section name what a cloud cluster needs (issue 18)."""
    text = GUIDE.read_text()
    prerequisites = text[text.index("## 1. What you need"):text.index("## 2.")]
    for needle in ("`kustomize` binary", "imagePullSecrets", "node autoscaler", "525.60.13"):
        assert needle in prerequisites, f"the prerequisites lack {needle!r}"
    gpu = text[text.index("## GPU nodes"):text.index("## Data")]
    for needle in ("g5.2xlarge", "g2-standard-8", "Standard_NC8as_T4_v3", "7 CPU and 26 GiB",
                   "k8s.io/cluster-autoscaler/node-template/resources/nvidia.com/gpu",
                   "k8s.io/cluster-autoscaler/node-template/label/", "min-nodes 0", "min-count 0"):
        assert needle in gpu, f"docs/kubernetes.md, GPU nodes, lacks {needle!r}"


def test_guide_loads_every_image_into_minikube_and_tells_the_truth_about_pull_failures() -> None:
    """An unloaded submitter image is not caught by preRunningDeadlineSeconds: the RayJob is Running once
    KubeRay created the submitter Job, and waits until activeDeadlineSeconds."""
    text = GUIDE.read_text()
    for image in ("ddray:0.1.0-cpu", "ddray-submitter:2.60.0", "ddray-mlflow:3.17.2"):
        assert f"minikube image load {image}" in text, image
    waits = text[text.index("**What you see while it waits.**"):]
    waits = waits[:waits.index("\n- ") if "\n- " in waits else len(waits)]
    assert "ImagePullBackOff" in waits and "activeDeadlineSeconds" in waits and "preflight" in waits
    assert not re.search(r"image that cannot be pulled[^.]*15 minutes", text)


def test_guide_port_forwards_to_rendered_services(renders: dict[str, tuple[list[Doc], str]]) -> None:
    docs = renders["cpu-dev"][0]
    services = {s["metadata"]["name"] for s in by_kind(docs, "Service")}
    # KubeRay names a RayCluster's head Service <cluster>-head-svc
    services |= {f"{c['metadata']['name']}-head-svc" for c in by_kind(docs, "RayCluster")}
    for name in re.findall(r"port-forward svc/([\w-]+)", GUIDE.read_text()):
        assert name in services, f"docs/kubernetes.md port-forwards to unknown Service {name}"


def test_guide_image_tags_match_the_project() -> None:
    version = pyproject()["project"]["version"]
    mlflow = re.search(r"^mlflow==(\S+)", (REPO / "deploy/mlflow/requirements.txt").read_text(), re.M)
    assert mlflow
    for doc in (GUIDE,):
        for tag in re.findall(r"\bddray:([\w.-]+)", doc.read_text()):
            assert tag.startswith(version + "-"), f"{doc.name}: ddray:{tag} is not version {version}"
        for tag in re.findall(r"ddray-mlflow:([\w.-]+)", doc.read_text()):
            assert tag == mlflow.group(1), f"{doc.name}: ddray-mlflow:{tag}"
