"""Fixtures of the deployment tests: a real kustomize and the rendered overlays."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy_support import (
    K8S, MIN_KUSTOMIZE, NO_KUSTOMIZE, OVERLAYS, VARIANTS, Doc, Kustomize, find_kustomize, render, render_variant,
)


@pytest.fixture(scope="session")
def kustomize() -> Kustomize:
    kz, tried = find_kustomize()
    if kz is None:
        # A missing tool must not turn these tests into silent skips.
        pytest.fail(NO_KUSTOMIZE.format(min=".".join(map(str, MIN_KUSTOMIZE)), tried=tried), pytrace=False)
    return kz


@pytest.fixture(scope="session")
def renders(kustomize: Kustomize) -> dict[str, tuple[list[Doc], str]]:
    """overlay name → (rendered documents, kustomize's stderr): the overlays exactly as shipped."""
    return {o: render(kustomize, K8S / "overlays" / o) for o in OVERLAYS}


@pytest.fixture(scope="session")
def variants(kustomize: Kustomize, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[Doc], str]]:
    """VARIANTS name → (rendered documents, kustomize's stderr): the overlays as a user deploys them."""
    workdir: Path = tmp_path_factory.mktemp("variants")
    return {name: render_variant(kustomize, v, workdir) for name, v in VARIANTS.items()}


@pytest.fixture(params=list(VARIANTS))
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def docs(variants: dict[str, tuple[list[Doc], str]], overlay: str) -> list[Doc]:
    return variants[overlay][0]
