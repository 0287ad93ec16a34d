"""Test-wide settings: no Ray usage stats; MLflow runs go to a temporary store, never ./mlflow.db."""

from __future__ import annotations

import os
import tempfile

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


def pytest_collection_modifyitems(config: object, items: list) -> None:
    """Tests marked ``cuda`` need a CUDA GPU; without one they are skipped (``make gpu-check`` runs them)."""
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by `make gpu-check`)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
