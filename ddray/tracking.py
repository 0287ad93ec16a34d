"""Tracking behind an interface: the math never calls a tracker directly.

:class:`Tracker` is what the drivers call; :class:`NullTracker` does nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    """What a run reports: params once, metrics per step, files as artifacts."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """A tracker that records nothing (``--no-tracking``)."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


def download_distilled(uri: str) -> Path:
    """Fetch the distilled-data directory of an MLflow run (``runs:/<run_id>``) to a local path."""
    import mlflow

    run_id = uri[len("runs:/"):].strip("/").split("/")[0]
    if not run_id:
        raise ValueError(f"{uri}: expected runs:/<run_id>")
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="distilled")
    except Exception as e:  # mlflow raises several exception types for missing runs/artifacts
        raise ValueError(f"{uri}: no distilled data found ({str(e).splitlines()[0]})") from None
    return Path(local)
