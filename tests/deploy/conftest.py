"""Fixtures of the deployment tests: a real kustomize and the rendered overlays."""

from __future__ import annotations

import pytest

from deploy_support import K8S, MIN_KUSTOMIZE, NO_KUSTOMIZE, OVERLAYS, Doc, Kustomize, find_kustomize, render


@pytest.fixture(scope="session")
def kustomize() -> Kustomize:
    kz, tried = find_kustomize()
    if kz is None:
        # A missing tool must not turn these tests into silent skips.
        pytest.fail(NO_KUSTOMIZE.format(min=".".join(map(str, MIN_KUSTOMIZE)), tried=tried), pytrace=False)
    return kz


@pytest.fixture(scope="session")
def renders(kustomize: Kustomize) -> dict[str, tuple[list[Doc], str]]:
    """overlay name → (rendered documents, kustomize's stderr)."""
    return {o: render(kustomize, K8S / "overlays" / o) for o in OVERLAYS}


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def docs(renders: dict[str, tuple[list[Doc], str]], overlay: str) -> list[Doc]:
    return renders[overlay][0]
