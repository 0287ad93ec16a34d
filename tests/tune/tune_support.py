"""Helpers of the Tune tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[2]


def tiny_spec(tmp: Path, **changes: Any) -> dict[str, Any]:
    """Two trials of 4 meta-steps each, evaluated (2 nets) and checkpointed every 2."""
    spec: dict[str, Any] = {
        "name": "tiny",
        "storage_path": str(tmp / "ray"),
        "fixed": {"distill": {"steps": 2, "epochs": 1, "ipc": 1, "iterations": 4, "nets": 1, "batch_size": 64},
                  "run": {"eval_every": 2, "eval_nets": 2, "checkpoint_every": 2, "scores": False,
                          "tracking_uri": f"sqlite:///{tmp}/mlflow.db"}},
        "search": {"lr": {"loguniform": [0.005, 0.05]}},
        "reference": {"lr": 0.01},
        "num_samples": 2,
        "max_concurrent_trials": 2,
        "scheduler": {"type": "asha", "grace_period": 2},
        "resources": {"driver_cpus": 0.5, "ps_cpus": 0.25, "cpus_per_worker": 0.25},
    }
    spec.update(changes)
    return spec


def write(tmp: Path, spec: dict[str, Any], name: str = "spec.yaml") -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(spec))
    return p


def make_store(tmp: Path) -> str:
    """The test's MLflow store, with its artifacts in ``tmp`` too (not in ./mlruns, the SQLite store's default)."""
    uri = f"sqlite:///{tmp}/mlflow.db"
    MlflowClient(tracking_uri=uri).create_experiment("ddray", artifact_location=str(tmp / "artifacts"))
    return uri


def runs(uri: str) -> list[Any]:
    c = MlflowClient(tracking_uri=uri)
    return c.search_runs([c.get_experiment_by_name("ddray").experiment_id])
