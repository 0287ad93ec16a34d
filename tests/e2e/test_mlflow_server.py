"""The MLflow server exactly as the rendered Deployment runs it, with real PostgreSQL and S3.

ddray logs through it with the login of Secret ddray-mlflow-credentials (the
user Job/mlflow-users created) and no S3 credentials at all: its artifacts reach
the bucket through the server's artifact proxy. The Host check, the login and
/metrics are those of the real server; ``--storage s3://…`` checkpoints land in
the ddray bucket and ``--resume`` reads them back; wrong credentials fail in
seconds with one line naming the Secret or the endpoint.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Platform, secret_values
from servers import S3_CLIENT_COMPAT

pytestmark = pytest.mark.e2e

# a few seconds of work: the point is where things go, not the distilled set
DISTILL = ["distill", "--steps", "2", "--epochs", "1", "--nets", "1", "--batch-size", "64", "--eval-nets", "2",
           "--checkpoint-every", "2", "--no-progress", "--no-scores"]
LOCAL = ["--local"]  # in-process; the Ray driver (which writes --storage URIs) where storage matters


def ddray(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``ddray …`` as a user runs it, with exactly ``env`` (plus what Python needs to run)."""
    base = {k: os.environ[k] for k in ("PATH", "HOME", "PYTHONPATH", "RAY_USAGE_STATS_ENABLED") if k in os.environ}
    return subprocess.run([sys.executable, "-m", "ddray.cli", *args], env={**base, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def login(plat: Platform) -> dict[str, str]:
    return dict(secret_values(plat.docs)["ddray-mlflow-credentials"])


def s3_env(plat: Platform) -> dict[str, str]:
    """What ddray-env and Secret ddray-s3-credentials give a Ray pod for the bucket ddray."""
    from deploy_support import configmap_data

    env = configmap_data(plat.docs, "ddray-env")
    return {**{k: plat.local(env[k]) for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "DDRAY_S3_KEYS_FROM")},
            **secret_values(plat.docs)["ddray-s3-credentials"], **S3_CLIENT_COMPAT}


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, f"expected a ddray error (exit 2), got {proc.returncode}:\n{proc.stderr[-2000:]}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ddray ")]
    assert lines and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[-1]


def test_ddray_logs_through_the_server_with_basic_auth_and_no_s3_keys(platform: Platform, tmp_path: Path) -> None:
    env = {"MLFLOW_TRACKING_URI": platform.mlflow.url, **login(platform)}
    assert not any(k.startswith("AWS_") for k in env)
    proc = ddray([*DISTILL, *LOCAL, "--iterations", "2", "--out", str(tmp_path / "run"), "--experiment", "e2e-proxy"],
                 env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the run, in PostgreSQL through the server, as the user ddray
    from mlflow import MlflowClient

    os.environ.update(env)  # MlflowClient reads the login from the environment
    try:
        client = MlflowClient(platform.mlflow.url)
        exp = client.get_experiment_by_name("e2e-proxy")
        [run] = client.search_runs([exp.experiment_id])
        assert run.info.status == "FINISHED" and run.data.params["distill.iterations"] == "2"
    finally:
        for k in env:
            os.environ.pop(k, None)
    # …and its artifacts in the bucket behind --artifacts-destination, written by the server's proxy
    objects = platform.s3.objects("mlflow-artifacts")
    assert any(o.endswith(f"{run.info.run_id}/artifacts/distilled/data.parquet") for o in objects), objects


def test_login_is_required_and_checked(platform: Platform, tmp_path: Path) -> None:
    server = platform.mlflow
    assert server.get("/health")[0] == 200  # the probes' path stays open
    assert server.get("/api/2.0/mlflow/experiments/search?max_results=1")[0] == 401
    creds = login(platform)
    ok = server.auth(creds["MLFLOW_TRACKING_USERNAME"], creds["MLFLOW_TRACKING_PASSWORD"])
    assert server.get("/api/2.0/mlflow/experiments/search?max_results=1", ok)[0] == 200
    # a wrong password, and a missing Secret, stop ddray at once with one line naming the Secret
    for login_env in ({**creds, "MLFLOW_TRACKING_PASSWORD": "wrong"}, {}):
        proc = ddray([*DISTILL, *LOCAL, "--iterations", "1", "--out", str(tmp_path / "x")],
                     {"MLFLOW_TRACKING_URI": server.url, "DDRAY_MLFLOW_LOGIN_FROM": "ddray-mlflow-credentials",
                      **login_env}, tmp_path)
        line = one_line_error(proc)
        assert "ddray-mlflow-credentials" in line and server.url in line, line
        assert "wrong" not in line
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_metrics_are_exposed_to_the_metrics_user(platform: Platform) -> None:
    metrics = secret_values(platform.docs)["mlflow-metrics-credentials"]
    assert platform.mlflow.get("/metrics")[0] == 401
    status, text = platform.mlflow.get("/metrics", platform.mlflow.auth(metrics["username"], metrics["password"]))
    assert status == 200 and "mlflow_http_request_total" in text, text[:500]


@pytest.mark.parametrize("host, accepted", [
    ("mlflow:5000", True), ("mlflow.ddray.svc.cluster.local:5000", True), ("localhost:5000", True),
    ("10.244.1.7:5000", True),  # a pod address: the kubelet's probes, Prometheus
    ("evil.example.com", False), ("mlflow.evil.example.com:5000", False), ("attacker:5000", False),
])
def test_host_header_check_of_the_real_server(platform: Platform, host: str, accepted: bool) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", platform.mlflow.port, timeout=30)
    conn.request("GET", "/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host})
    response = conn.getresponse()
    status, body = response.status, response.read().decode()
    conn.close()
    # accepted: the request reaches the login check (401); rejected: the Host check answers first (403)
    assert status == (401 if accepted else 403), f"Host: {host} → HTTP {status}: {body[:200]}"
    if not accepted:
        assert body == "Invalid Host header - possible DNS rebinding attack detected"


@pytest.mark.slow  # two Ray runs
def test_checkpoints_on_s3_and_resume_reads_them_back(platform: Platform, tmp_path: Path) -> None:
    env = {"MLFLOW_TRACKING_URI": platform.mlflow.url, **login(platform), **s3_env(platform)}
    out, storage = tmp_path / "run", "s3://ddray/e2e/resume"
    proc = ddray([*DISTILL, "--workers", "1", "--iterations", "2", "--out", str(out), "--storage", storage], env,
                 tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    finished = [f"e2e/resume/run/{f}" for f in ("config.yaml", "data.parquet", "eval.json", "grid.png", "lrs.png",
                                                 "meta.json")]  # a URI --storage also holds the finished run
    assert platform.s3.objects("ddray", "e2e/resume") == [*finished, "e2e/resume/step-00000002.pt",
                                                          "e2e/resume/step-00000002.pt.sha256"]
    proc = ddray(["distill", "--resume", str(out), "--iterations", "4", "--no-progress"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "e2e/resume/step-00000004.pt" in platform.s3.objects("ddray", "e2e/resume")
    # a wrong key, a missing Secret and a wrong endpoint: one line naming the Secret or the endpoint
    for bad, needle in (({"AWS_SECRET_ACCESS_KEY": "wrong"}, "ddray-s3-credentials"),
                        ({"AWS_SECRET_ACCESS_KEY": ""}, "ddray-s3-credentials"),
                        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "http://127.0.0.1:9")):
        proc = ddray([*DISTILL, "--iterations", "2", "--out", str(tmp_path / "bad"), "--storage",
                      "s3://ddray/e2e/bad", "--no-tracking"], {**env, **bad}, tmp_path, timeout=60)
        line = one_line_error(proc)
        assert needle in line and "s3://ddray/e2e/bad" in line, line
        assert "wrong" not in line
