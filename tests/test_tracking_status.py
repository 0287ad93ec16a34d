"""How a run ends: the one status rule (tracking.exit_status / finishing) and end_run for runs whose own
process could not end them (a Tune trial stopped in its actor) — on a real SQLite MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from ddray.config import load_config
from ddray.tracking.tracker import MlflowTracker, end_run, exit_status, tracked


@pytest.mark.parametrize("error, status", [
    (None, "FINISHED"),
    (SystemExit(0), "FINISHED"),  # Ray Tune stops a trial early with sys.exit(0): a normal end
    (SystemExit(None), "FINISHED"),
    (SystemExit(2), "FAILED"),
    (KeyboardInterrupt(), "KILLED"),
    (RuntimeError("boom"), "FAILED"),
])
def test_exit_status(error: BaseException | None, status: str) -> None:
    assert exit_status(error) == status


@pytest.mark.parametrize("error, status", [(SystemExit(0), "FINISHED"), (SystemExit(3), "FAILED")])
def test_a_tracked_block_left_by_sys_exit_ends_by_its_code(tmp_path: Path, error: SystemExit, status: str) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(SystemExit):
        with tracked(load_config(None, tracking_uri=uri), "trial") as t:
            raise error
    assert MlflowClient(uri).get_run(t.run_id).info.status == status  # type: ignore[attr-defined]


def test_end_run_ends_a_running_run_once_with_its_tags(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = MlflowTracker(uri, "ddray", run_name="trial")  # left RUNNING, as by a trial Tune stopped
    assert end_run(uri, run.run_id, "FINISHED", {"ddray.stopped_early": "true"})
    got = MlflowClient(uri).get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.tags["ddray.stopped_early"] == "true"
    assert not end_run(uri, run.run_id, "FAILED")  # already ended: left as it is
    assert MlflowClient(uri).get_run(run.run_id).info.status == "FINISHED"
