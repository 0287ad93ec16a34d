"""``ddray tune`` as the RayJob ddray-tune runs it: results in the S3 bucket, ``--resume auto``.

Tune's experiment state, the trial checkpoints, ddray's state file and the best
config go to ``--storage-path s3://ddray/…`` through ddray's S3 settings (the
endpoint of AWS_ENDPOINT_URL, path-style, keys of Secret ddray-s3-credentials);
the first ``--resume auto`` starts the search, the second continues it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import Platform
from test_mlflow_server import ddray, login, s3_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_tune_search_on_s3_with_resume_auto(platform: Platform, tmp_path: Path) -> None:
    spec = {
        "name": "tiny",
        "fixed": {"distill": {"steps": 2, "epochs": 1, "ipc": 1, "iterations": 2, "nets": 1, "batch_size": 64},
                  "run": {"eval_nets": 2, "checkpoint_every": 2, "scores": False}},
        "search": {"lr": {"choice": [0.01]}},
        "num_samples": 1,
        "scheduler": "fifo",
        "resources": {"driver_cpus": 0.5, "ps_cpus": 0.25, "cpus_per_worker": 0.25},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {"MLFLOW_TRACKING_URI": platform.mlflow.url, **login(platform), **s3_env(platform)}
    argv = ["tune", str(tmp_path / "spec.yaml"), "--storage-path", "s3://ddray/e2e-tune/run-1", "--resume", "auto",
            "--experiment", "e2e-tune"]
    first = ddray(argv, env, tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "--resume auto: continuing" not in first.stdout
    stored = platform.s3.objects("ddray", "e2e-tune/run-1/tiny")
    for name in ("ddray_tune.json", "best_config.yaml", "trials.txt"):
        assert f"e2e-tune/run-1/tiny/{name}" in stored, stored
    assert "best config:     s3://ddray/e2e-tune/run-1/tiny/best_config.yaml" in first.stdout, first.stdout[-2000:]
    again = ddray(argv, env, tmp_path, timeout=900)  # a retried RayJob: continues the finished search
    assert again.returncode == 0, again.stderr[-4000:]
    assert "--resume auto: continuing the Tune experiment in s3://ddray/e2e-tune/run-1/tiny" in again.stdout
