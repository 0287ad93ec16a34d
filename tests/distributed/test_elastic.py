"""The cluster path as users meet it: `ddray distill --address …` on a multi-node Ray cluster on 127.0.0.1
whose head has no CPUs (KubeRay's `num-cpus: "0"`), with 1-CPU worker nodes that join and leave mid-run.

Every run's synthetic set must be bitwise the one an uninterrupted `--local` run of the same config makes
(same chunks, one torch thread per 1-CPU worker), whatever joined or left. Nodes are added and killed
with ray.cluster_utils.Cluster; each test adds the nodes it needs and removes them at its end.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from dist_support import NO_FORWARD_HERE

from ddray.store.artifact import read_distilled

pytestmark = pytest.mark.slow

FLAGS = ["--dataset", "mnist5k", "--steps", "2", "--epochs", "1", "--ipc", "1", "--batch-size", "64",
         "--nets", "2", "--eval-nets", "2", "--seed", "0", "--cpus-per-worker", "1", "--no-progress", "--no-scores"]
# RAY_AUTH_MODE pinned for this module's cluster and its drivers alike: a local Ray started earlier in the
# same pytest process (another module's) turns token authentication on in os.environ for what follows
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
       "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """This module's Ray cluster on 127.0.0.1: a head with 0 CPUs (and the dashboard, which serves
    ray.util.state on loopback); tests add 1-CPU worker nodes."""
    import ray
    import ray._common.utils
    import ray._private.ray_constants
    import ray._private.utils
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as mp:
        # keep the driver on loopback (Ray would swap 127.0.0.1 for the machine's address) and do not
        # advertise this test cluster in /tmp/ray to other `ray.init()` calls on the machine
        mp.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
        mp.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
        mp.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
        mp.setenv("RAY_AUTH_MODE", ENV["RAY_AUTH_MODE"])
        port = free_port()
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
            "node_ip_address": "127.0.0.1"})
        ray.init(address=c.address, log_to_driver=False, _node_ip_address="127.0.0.1")
        c.state_api = f"http://127.0.0.1:{port}"
        yield c
        ray.shutdown()
        c.shutdown()


@pytest.fixture
def nodes(cluster: Any) -> Iterator[Callable[[int], list[Any]]]:
    """``add(n)`` adds n 1-CPU worker nodes; the test's nodes are removed at its end."""
    added: list[Any] = []

    def add(n: int = 1) -> list[Any]:
        new = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(n)]
        added.extend(new)
        return new

    yield add
    import ray

    gone = set()
    for node in added:
        if node in cluster.worker_nodes:
            # gracefully: a raylet stopped by SIGTERM tells the GCS it is leaving, where a killed one is
            # found dead by the health checks only after ~15 s (the tests' own kills stay ungraceful)
            cluster.remove_node(node, allow_graceful=True)
            gone.add(node.node_id)
    # the next test counts the cluster's nodes (and its error messages name them): wait until Ray has
    # noticed that these are gone
    wait_for("the removed nodes to be reported dead",
             lambda: not any(n["NodeID"] in gone and n["Alive"] for n in ray.nodes()))


def start(cluster: Any, tmp: Path, *argv: str, name: str = "run", progress: bool = False,
          no_forward_here: bool = False, **env: str) -> subprocess.Popen[str]:
    """`ddray distill --address <cluster>` as a user's process; stderr (ddray's log lines, and with
    ``progress`` its progress bar) goes to a file. ``no_forward_here``: every network's forward raises
    in that process (not in the workers), so the run succeeds only if it trained nothing there."""
    err = open(tmp / f"{name}.stderr", "w")
    flags = [f for f in FLAGS if not (progress and f == "--no-progress")]
    cli = ["-c", f"{NO_FORWARD_HERE}\nimport sys\nfrom ddray.cli import main\nsys.exit(main(sys.argv[1:]))"] \
        if no_forward_here else ["-m", "ddray.cli"]
    return subprocess.Popen([sys.executable, *cli, "distill", *flags, *argv, "--address",
                             cluster.address, "--tracking-uri", f"sqlite:///{tmp}/mlflow.db"],
                            env={**ENV, **env}, cwd=tmp, stdout=subprocess.DEVNULL, stderr=err, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def wait_for(what: str, ok: Callable[[], bool], proc: subprocess.Popen[str] | None = None,
             timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert proc is None or proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name[5:13]) for p in (out / "checkpoints").glob("step-*.pt"))


def log(tmp: Path, name: str = "run") -> str:
    return (tmp / f"{name}.stderr").read_text()


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Any]:
    """The `--local` run of a config (cached): one process, one torch thread, the same chunks."""
    cache: dict[tuple[str, ...], Any] = {}

    def run(*argv: str) -> Any:
        if argv not in cache:
            out = tmp_path_factory.mktemp("local") / "run"
            from ddray.cli import main

            n = torch.get_num_threads()
            try:
                assert main(["distill", *FLAGS, *argv, "--local", "--out", str(out), "--no-tracking"]) == 0
            finally:
                torch.set_num_threads(n)
            cache[argv] = read_distilled(out)
        return cache[argv]

    return run


def same(a: Any, b: Any) -> bool:
    return torch.equal(a.images, b.images) and torch.equal(a.lrs, b.lrs)


def test_a_node_killed_mid_run_the_run_finishes_with_the_local_bits(
        cluster: Any, nodes: Callable[[int], list[Any]], tmp_path: Path, local_reference: Callable[..., Any]) -> None:
    """`--workers 1:2`, the node of worker 0 and the parameter server killed without warning: the fleet
    shrinks to one worker, the server is rebuilt from its checkpoint on the other node, the run finishes."""
    run = ["--workers", "1:2", "--iterations", "60", "--checkpoint-every", "10"]
    two = nodes(2)
    out = tmp_path / "out"
    proc = start(cluster, tmp_path, *run, "--out", str(out))
    wait_for("two workers and a checkpoint", lambda: "2 alive" in log(tmp_path) and checkpoints(out), proc)
    victim = next(n for n in two if n.node_id == ps_node(cluster))
    killed_at = max(checkpoints(out))
    cluster.remove_node(victim, allow_graceful=False)
    assert finish(proc) == 0, log(tmp_path)
    text = log(tmp_path)
    assert "parameter-server shard 0 lost" in text
    assert re.search(r"ddray: worker \d lost \([^\n]*\); 1 alive, its work moves to the others", text)
    rolled = [int(m) for m in re.findall(r"rolled back to the checkpoint of meta-step (\d+)", text)]
    assert len(rolled) == 1 and rolled[0] >= killed_at and rolled[0] % 10 == 0  # the newest one at the kill
    assert same(read_distilled(out), local_reference(*run))


def ps_node(cluster: Any) -> str:
    """The node of the run's (one) parameter server."""
    from ray.util.state import list_actors

    return next(a.node_id for a in list_actors(address=cluster.state_api, filters=[
        ("class_name", "=", "ParamServerActor"), ("state", "=", "ALIVE")]))


def bars(text: str, total: int) -> list[tuple[int, dict[str, str]]]:
    """(meta-steps done, postfix) of each progress-bar frame that tqdm wrote into ``text``."""
    frames = re.finditer(rf"distill \(ray\):[^\r\n]*?\| *(\d+)/{total} \[[^\]\r\n]*?, ([a-z_]+=[^\]\r\n]*)\]", text)
    return [(int(m[1]), dict(kv.split("=", 1) for kv in m[2].split(", "))) for m in frames]


def test_a_lost_node_replaced_the_fleet_grows_back_to_max_with_the_local_bits(
        cluster: Any, nodes: Callable[[int], list[Any]], tmp_path: Path, local_reference: Callable[..., Any]) -> None:
    """`--workers 1:2`: the node of a worker (not the server's) dies, the fleet shrinks to one worker; a new
    node joins, Ray restarts the lost worker there and the fleet is back at MAX; the progress bar shows
    alive=1 after the loss and alive=2, restarts=1 at the end."""
    total = 1000  # ~20 steps/s here, and a worker needs ~15 s to come back on a new node
    run = ["--workers", "1:2", "--iterations", str(total), "--checkpoint-every", "250"]
    two = nodes(2)
    out = tmp_path / "out"
    proc = start(cluster, tmp_path, *run, "--out", str(out), progress=True)
    wait_for("two workers at work", lambda: "2 alive" in log(tmp_path) and bool(bars(log(tmp_path), total)), proc)
    victim = next(n for n in two if n.node_id != ps_node(cluster))
    cluster.remove_node(victim, allow_graceful=False)
    lost = r"ddray: worker (\d) lost \([^\n]*\); 1 alive, its work moves to the others"
    wait_for("the loss", lambda: re.search(lost, log(tmp_path)) is not None, proc)
    nodes(1)
    assert finish(proc) == 0, log(tmp_path)
    text = log(tmp_path)
    loss = re.search(lost, text)
    assert loss and re.search(rf"ddray: worker {loss[1]} is back on node \w+ \(pid \d+, cpu\); 2 alive",
                              text[loss.end():]), text
    frames = [(n, p["alive"], p["restarts"]) for n, p in bars(text, total)]
    assert ("1", "0") in {f[1:] for f in frames} and frames[-1] == (total, "2", "1"), frames
    assert same(read_distilled(out), local_reference(*run))


def test_a_run_below_min_mid_run_stops_with_its_checkpoint_and_the_command_that_continues_it(
        cluster: Any, nodes: Callable[[int], list[Any]], tmp_path: Path, local_reference: Callable[..., Any]) -> None:
    """`--workers 2` (MIN = MAX = 2), the node of a worker (not the server's) killed mid-run: after
    --placement-timeout the run stops, writes a checkpoint of the step it reached and prints the command
    that continues it; that command, once a node has joined, finishes with the --local bits."""
    total = 400
    run = ["--workers", "2", "--iterations", str(total), "--checkpoint-every", "1000", "--placement-timeout", "30"]
    two = nodes(2)
    out = tmp_path / "out"
    proc = start(cluster, tmp_path, *run, "--out", str(out), progress=True)
    wait_for("a few meta-steps", lambda: any(n >= 5 for n, _ in bars(log(tmp_path), total)), proc)
    victim = next(n for n in two if n.node_id != ps_node(cluster))
    cluster.remove_node(victim, allow_graceful=False)
    assert finish(proc) == 1, log(tmp_path)
    text = log(tmp_path)
    stopped = re.search(r"ddray distill: error: --placement-timeout 30: only 1 of the 2 worker\(s\) needed answered "
                        r"for 30 s; the cluster has [^\n]*; the run stopped, its checkpoint is (\S+); when the cluster "
                        r"has room again continue it with `ddray distill --resume auto --out (\S+)` \(with the same "
                        r"flags\)\n", text)
    assert stopped and Path(stopped[2]) == out, text
    step = int(re.fullmatch(r"step-(\d{8})\.pt", Path(stopped[1]).name)[1])  # type: ignore[index]
    assert Path(stopped[1]).is_file() and checkpoints(out) == [step] and 5 <= step < total
    assert not (out / "meta.json").exists()

    nodes(1)
    again = start(cluster, tmp_path, *run, "--resume", "auto", "--out", stopped[2], name="again")
    assert finish(again) == 0, log(tmp_path, "again")
    assert f"from its checkpoint at meta-step {step} of {total}" in log(tmp_path, "again")
    assert same(read_distilled(out), local_reference(*run))


def test_nodes_added_mid_run_join_the_fleet_with_the_local_bits(
        cluster: Any, nodes: Callable[[int], list[Any]], tmp_path: Path, local_reference: Callable[..., Any]) -> None:
    """`--workers 1:3` on one node: it starts with one worker; two nodes join and take chunks.

    200 meta-steps leave the joins time: here the two new workers joined at meta-steps 23 and 25, but a
    CI run with 60 saw the third join only after the last one (its actor starts torch on a busy host)."""
    run = ["--workers", "1:3", "--nets", "3", "--iterations", "200", "--checkpoint-every", "50"]
    nodes(1)
    out = tmp_path / "out"
    proc = start(cluster, tmp_path, *run, "--out", str(out))
    wait_for("the first worker", lambda: "1 alive" in log(tmp_path), proc)
    nodes(2)
    assert finish(proc) == 0, log(tmp_path)
    text = log(tmp_path)
    assert "worker 1 joined" in text and "worker 2 joined" in text and "3 alive" in text
    assert "waiting for" not in text  # it started with MIN = 1 worker, nobody waited for MAX
    assert same(read_distilled(out), local_reference(*run))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run_info] = client.search_runs([client.get_experiment_by_name("ddray").experiment_id])
    alive = [m.value for m in client.get_metric_history(run_info.info.run_id, "workers_alive")]
    assert len(alive) == 200 and alive[0] == 1.0 and alive[-1] == 3.0 and alive == sorted(alive), alive


def test_the_driver_sigkilled_then_the_same_command_with_resume_auto_continues(
        cluster: Any, nodes: Callable[[int], list[Any]], tmp_path: Path, local_reference: Callable[..., Any]) -> None:
    """As a retried Ray job: the same command line, `--resume auto`, continues from the checkpoint."""
    run = ["--workers", "2", "--iterations", "60", "--checkpoint-every", "5"]
    nodes(2)
    out = tmp_path / "out"
    argv = [*run, "--out", str(out), "--resume", "auto"]
    proc = start(cluster, tmp_path, *argv, name="first")
    wait_for("a checkpoint", lambda: bool(checkpoints(out)), proc)
    proc.send_signal(signal.SIGKILL)  # no cleanup in the driver
    proc.wait()
    assert "starting a fresh run" in log(tmp_path, "first")
    done = max(checkpoints(out))
    assert 5 <= done < 60 and not (out / "meta.json").exists()
    assert finish(start(cluster, tmp_path, *argv, name="again")) == 0, log(tmp_path, "again")
    assert f"from its checkpoint at meta-step {done} of 60" in log(tmp_path, "again")
    assert same(read_distilled(out), local_reference(*run))


def test_a_run_asking_for_more_than_the_cluster_has_waits_and_starts_when_a_node_joins(
        cluster: Any, nodes: Callable[[int], list[Any]], tmp_path: Path) -> None:
    nodes(1)
    out = tmp_path / "out"
    proc = start(cluster, tmp_path, "--workers", "2", "--iterations", "3", "--out", str(out),
                 "--placement-timeout", "300")
    wait_for("the waiting notice", lambda: "waiting for 1 more worker(s)" in log(tmp_path), proc)
    assert not out.exists()  # nothing is written before the workers are placed
    nodes(1)
    assert finish(proc) == 0, log(tmp_path)
    assert (out / "meta.json").is_file()


def test_without_capacity_it_fails_at_the_timeout_naming_request_and_cluster(
        cluster: Any, nodes: Callable[[int], list[Any]], tmp_path: Path) -> None:
    nodes(1)
    for name, extra, expected in (
            ("cpus", ["--workers", "3"], "2 more worker(s) of {CPU 1} each could not be placed in 5 s "
                                         "(1 placed); the cluster has 2 alive nodes with CPU 1, GPU 0 in all"),
            ("gpus", ["--gpus-per-worker", "1"], "1 more worker(s) of {CPU 1, GPU 1} each could not be placed in "
                                                 "5 s (0 placed); the cluster has 2 alive nodes with CPU 1, GPU 0 in "
                                                 "all; no node has a GPU")):
        out = tmp_path / name
        rc = finish(start(cluster, tmp_path, *extra, "--iterations", "3", "--out", str(out),
                          "--placement-timeout", "5", name=name))
        err = log(tmp_path, name).strip().splitlines()
        assert rc == 1 and err[-1] == f"ddray distill: error: --placement-timeout 5: {expected}", err
        assert not out.exists()


def test_nothing_runs_on_the_head_and_mid_run_evaluation_matches_local(
        cluster: Any, nodes: Callable[[int], list[Any]], tmp_path: Path, local_reference: Callable[..., Any]) -> None:
    """Workers, servers and every evaluation (each --eval-every snapshot, the final one) off the head and
    off the driver (whose networks' forward raises); the eval_acc_mean history on Ray, on both transports,
    is the --local one: the predictions came back from the workers."""
    from mlflow.tracking import MlflowClient
    from ray.util.state import list_actors, list_tasks

    run = ["--workers", "2", "--iterations", "6", "--eval-every", "2", "--checkpoint-every", "3"]
    nodes(2)
    head = cluster.head_node.node_id
    histories = {}
    for transport in ("objects", "compiled"):
        out = tmp_path / transport
        proc = start(cluster, tmp_path, *run, "--out", str(out), "--experiment", transport, name=transport,
                     no_forward_here=True, DDRAY_TRANSPORT=transport)
        assert finish(proc) == 0, log(tmp_path, transport)
        assert same(read_distilled(out), local_reference(*run))
        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        [r] = client.search_runs([client.get_experiment_by_name(transport).experiment_id])
        histories[transport] = [(m.step, m.value) for m in client.get_metric_history(r.info.run_id,
                                                                                      "eval_acc_mean")]
    ours = [a for a in list_actors(address=cluster.state_api, limit=10_000)
            if a.class_name in ("WorkerActor", "ParamServerActor")]
    assert ours and all(a.node_id != head for a in ours)
    tasks = [t for t in list_tasks(address=cluster.state_api, limit=10_000)
             if t.name.startswith(("WorkerActor.", "ParamServerActor."))]
    assert any(t.name == "WorkerActor.predict" for t in tasks)
    assert all(t.node_id != head for t in tasks if t.node_id)
    local = _local_history(tmp_path, *run)
    assert histories["objects"] == histories["compiled"] == local and [s for s, _ in local] == [2, 4, 6]


def _local_history(tmp: Path, *run: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    from ddray.cli import main

    n = torch.get_num_threads()
    try:
        assert main(["distill", *FLAGS, *run, "--local", "--out", str(tmp / "local"), "--experiment", "local",
                     "--tracking-uri", f"sqlite:///{tmp}/mlflow.db"]) == 0
    finally:
        torch.set_num_threads(n)
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    [r] = client.search_runs([client.get_experiment_by_name("local").experiment_id])
    return [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "eval_acc_mean")]
