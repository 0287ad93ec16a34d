"""The cpu-dev RayJob ``ddray-distill`` run the way KubeRay runs it, on a local Ray cluster.

From ``kubectl kustomize k8s/overlays/cpu-dev``: the head and worker groups become
``ray start`` lines exactly as KubeRay derives them (group resources, rayStartParams,
container limits; ports moved to free ones), with the pods' environment (ConfigMap
ddray-env, the Secrets, the Ray token KubeRay injects) and the mounted config; the
submitter runs KubeRay's own K8sJobMode shell command (``ray job status || ray job
submit --no-wait …; ray job logs --follow``) with the submitter container's
environment. Only ``--iterations`` and the evaluation (``--eval-nets``, which the
scores' held-out networks follow too) are shortened. The platform (MLflow, PostgreSQL,
S3) is the one of ``conftest.platform``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Platform, resolved_env
from deploy_support import one
from servers import BIN, S3_CLIENT_COMPAT, ray_cluster, ray_start_line

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ITERATIONS = 3
EVAL_NETS = 2  # of 20: the job's evaluation and DD-Ranking's scores took 4 of this test's 6.5 minutes
JOB = "ddray-distill"


def submit_command(job: dict, address: str, iterations: int) -> str:
    """KubeRay v1.7's BuildJobSubmitCommand for K8sJobMode (ray-operator/controllers/ray/common/job.go)."""
    spec = job["spec"]
    health = ("python -c \"import urllib.request; r=urllib.request.urlopen('%s/api/gcs_healthz', timeout=10); "
              "exit(0 if b'success' in r.read() else 1)\"" % address)
    cmd = ["until", health, ">/dev/null", "2>&1", ";", "do", "echo", '"Waiting for Ray Dashboard GCS"', ";",
           "sleep", "2", ";", "done", ";",
           "if", "!", "ray", "job", "status", "--address", address, "$RAY_JOB_SUBMISSION_ID", ">/dev/null", "2>&1",
           ";", "then", "ray", "job", "submit", "--address", address, "--no-wait"]
    if spec.get("runtimeEnvYAML"):
        import yaml

        cmd += ["--runtime-env-json", json.dumps(json.dumps(yaml.safe_load(spec["runtimeEnvYAML"]),
                                                            separators=(",", ":")))]
    cmd += ["--submission-id", "$RAY_JOB_SUBMISSION_ID"]
    if spec.get("entrypointNumCpus"):
        cmd += ["--entrypoint-num-cpus", f"{spec['entrypointNumCpus']:f}"]
    if spec.get("entrypointResources"):
        cmd += ["--entrypoint-resources", json.dumps(spec["entrypointResources"])]
    cmd += ["--", spec["entrypoint"].strip() + f" --iterations {iterations} --eval-nets {EVAL_NETS}", ";", "fi", ";",
            "ray", "job", "logs", "--address", address, "--follow", "$RAY_JOB_SUBMISSION_ID"]
    return " ".join(cmd)


def group_flags(group: dict, node_type: str) -> list[str]:
    c = group["template"]["spec"]["containers"][0]
    return ray_start_line(node_type, group.get("rayStartParams", {}), group.get("resources", {}),
                          c.get("resources", {}).get("limits", {}))


def pod_env(plat: Platform, container: dict, token: str, config_dir: Path) -> dict[str, str]:
    env = plat.local_env(resolved_env(container, plat.docs))
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,  # KubeRay's authOptions: mode token
               PATH=f"{BIN}:{os.environ['PATH']}", HOME=str(config_dir), **S3_CLIENT_COMPAT)
    if os.environ.get("PYTHONPATH"):  # this checkout's ddray, where it is not installed
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def test_cpu_dev_rayjob_runs_like_kuberay_runs_it(platform: Platform, tmp_path: Path) -> None:
    job = one(platform.docs, "RayJob", JOB)
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    head_c = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    [workers] = cluster["workerGroupSpecs"]
    worker_c = workers["template"]["spec"]["containers"][0]
    submitter_c = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    # the ConfigMap volume at /etc/ddray, here a directory; the entrypoint's path follows it
    mount = next(m for m in head_c["volumeMounts"] if m["name"] == "ddray-config")
    config_dir = tmp_path / "etc-ddray"
    config_dir.mkdir()
    from deploy_support import configmap_data

    for key, text in configmap_data(platform.docs, "ddray-distill-config").items():
        (config_dir / key).write_text(text)
    job = json.loads(json.dumps(job).replace(mount["mountPath"] + "/", f"{config_dir}/"))
    # the head's emptyDir at /tmp (the driver's --out), here a directory of this test
    scratch = tmp_path / "head-tmp"
    scratch.mkdir()
    assert any(m["mountPath"] == "/tmp" for m in head_c["volumeMounts"])
    job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace('"/tmp/', f'"{scratch}/')

    token = secrets.token_urlsafe(32)
    head_env = pod_env(platform, head_c, token, config_dir)
    worker_env = pod_env(platform, worker_c, token, config_dir)
    with ray_cluster(group_flags(cluster["headGroupSpec"], "head"),
                     [group_flags(workers, "worker")] * max(1, workers.get("replicas", 1)),
                     head_env, worker_env) as ray:
        address = f"http://{ray.dashboard}"
        sub_env = pod_env(platform, submitter_c, token, config_dir)
        # the job API wants the token: a client without it, or with another one, is refused by the real server
        for auth, refusal in (({}, "Authentication required: Unauthorized: Missing authentication token"),
                              ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-" + token},
                               "Authentication failed: Forbidden: Invalid authentication token")):
            proc = subprocess.run(["ray", "job", "list", "--address", address],
                                  env={**{k: v for k, v in sub_env.items() if not k.startswith("RAY_AUTH")}, **auth},
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 1 and f"ray.exceptions.AuthenticationError: {refusal}" in proc.stderr, (
                proc.stdout, proc.stderr[-2000:])

        def attempt(n: int, iterations: int) -> str:
            sid = f"{JOB}-attempt{n}"
            env = {**sub_env, "RAY_DASHBOARD_ADDRESS": ray.dashboard, "RAY_JOB_SUBMISSION_ID": sid,
                   "PYTHONUNBUFFERED": "1"}
            proc = subprocess.run(["/bin/bash", "-ce", "--", submit_command(job, address, iterations)], env=env,
                                  capture_output=True, text=True, timeout=900)
            status = subprocess.run(  # the job's status, as the operator polls it (with the token)
                [sys.executable, "-c", "import sys; from ray.job_submission import JobSubmissionClient as C; "
                 "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)", address, sid],
                env=env, capture_output=True, text=True, timeout=120)
            assert status.stdout.strip() == "SUCCEEDED", (
                f"attempt {n}: {status.stdout}{status.stderr}\n--- logs\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}")
            return proc.stdout + proc.stderr  # `ray job logs --follow`: the driver's log lines

        logs = attempt(1, ITERATIONS)
        run = resolved_env(submitter_c, platform.docs)["DDRAY_RUN"]
        prefix = f"{JOB}/{run}"
        assert re.search(rf"--resume auto: no checkpoint in \S+/{prefix}; starting a fresh run", logs), logs[-3000:]
        ckpts = [o for o in platform.s3.objects("ddray", prefix) if o.endswith(".pt")]
        assert ckpts == [f"{prefix}/step-{ITERATIONS:08d}.pt"], platform.s3.objects("ddray")
        stored = platform.s3.objects("ddray", f"{prefix}/run")  # the finished run's files beside its checkpoints
        assert {f"{prefix}/run/{n}" for n in ("data.parquet", "meta.json", "eval.json", "config.yaml")} <= set(stored)
        # a retry of the RayJob (backoffLimit), or a re-apply with the same DDRAY_RUN: continues, 2 steps more
        logs = attempt(2, ITERATIONS + 2)
        assert re.search(rf"continuing the run in \S+/{prefix} from its checkpoint at meta-step {ITERATIONS} of "
                         rf"{ITERATIONS + 2}\n", logs), logs[-3000:]  # not a fresh start, which also ends at step 5
        assert "starting a fresh run" not in logs
        assert f"step-{ITERATIONS + 2:08d}.pt" in " ".join(platform.s3.objects("ddray", prefix)), logs[-3000:]

    # the runs in MLflow, with their distilled sets in the artifact bucket
    from mlflow import MlflowClient

    login = {k: head_env[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(login)
    try:
        client = MlflowClient(platform.mlflow.url)
        exp = client.get_experiment_by_name(shlex.split(job["spec"]["entrypoint"])[
            shlex.split(job["spec"]["entrypoint"]).index("--experiment") + 1])
        runs = client.search_runs([exp.experiment_id])
        assert runs and all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    finally:
        for k in login:
            os.environ.pop(k, None)
    artifacts = platform.s3.objects("mlflow-artifacts")
    for r in runs:
        assert any(o.endswith(f"{r.info.run_id}/artifacts/distilled/data.parquet") for o in artifacts), artifacts
