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
                   "k8s/overlays/gpu"):
        assert needle in text, f"docs/kubernetes.md lacks {needle!r}"


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
