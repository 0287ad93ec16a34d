"""Test-wide settings: no Ray usage stats; MLflow runs go to a temporary store, never ./mlflow.db."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Tests that check tracking set their own store; every other tracked command lands here.
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp(prefix='ddray-tests-mlflow-')}/mlflow.db")


def pytest_sessionstart(session: object) -> None:
    """Create the default store up front, so MLflow's one-time "creating tables" log lines do not
    land in whichever test happens to track first (several tests read stderr line by line). Without
    MLflow (the GPU machine of ``make gpu-check``, whose CUDA tests track nothing) there is no store."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        return

    MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).search_experiments()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` need a CUDA GPU; without one they are skipped (``make gpu-check`` runs them).
    In a pytest-xdist worker (``make test``: ``-n 2 --dist loadfile``) the modules with slow tests come first:
    xdist hands out the test modules in collection order (with ``--no-loadscope-reorder``), so the long ones
    start at once on both workers and the many short ones fill the end."""
    import torch

    if hasattr(config, "workerinput"):  # a pytest-xdist worker
        modules: dict[str, list[pytest.Item]] = {}
        for item in items:
            modules.setdefault(_unit(item.nodeid), []).append(item)
        ordered = sorted(modules.values(), key=lambda tests: not any("slow" in t.keywords for t in tests))
        items[:] = [item for tests in ordered for item in tests]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by `make gpu-check`)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _unit(nodeid: str) -> str:
    """A test's unit of work under ``--dist loadfile``: its module, so that the module's fixtures (its one
    Ray, its cluster) start once on one worker; tests/e2e is one unit, its modules sharing the session's
    servers (PostgreSQL, S3, MLflow), which then start once."""
    path = nodeid.split("::", 1)[0]
    return "tests/e2e" if path.startswith("tests/e2e/") else path


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: unknown (and never called) without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile`` with tests/e2e as one unit (:func:`_unit`); other modes as xdist makes them."""
    from xdist.scheduler import LoadFileScheduling

    class Units(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    return Units(config, log) if config.getvalue("dist") == "loadfile" else None
