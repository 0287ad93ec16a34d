"""What elasticity costs: a node lost mid-run, a node joining, evaluation on 1 vs 2 workers.

Runs on a Ray cluster it starts on 127.0.0.1 (ray.cluster_utils.Cluster: a head with 0 CPUs, KubeRay's
shape, and 1-CPU worker nodes), through :func:`ddray.distributed.driver.distill_ray` — the code path of
`ddray distill --address` — with the default MNIST-5k config cut to ``--iterations`` meta-steps:

* **node loss**: ``--workers 1:2``; at meta-step ``--kill-at`` the node holding worker 0 *and* the
  parameter server is removed without warning, and a replacement node is added at once. Reports
  the meta-steps redone (the server restores its last checkpoint), the seconds from the kill to
  the next applied meta-step, and to the first step again at 2 workers ("full speed"), next to
  the seconds per meta-step before the kill.
* **join**: ``--workers 1:2`` on one node; a second node is added mid-run. Reports the seconds from
  ``add_node`` returning to the worker's first chunks (placement + actor start + data load).
* **evaluation**: the final evaluation of the distilled set (``--eval-nets`` held-out networks,
  protocol dd, schedule order) on 1 and on 2 one-CPU workers, the pool already up.

Each elastic run (node loss, join) is then run again with ``--local`` (one process, one torch thread as
each 1-CPU worker) and must give the same synthetic set bit for bit; the benchmark fails if it does not,
and fails if a log line that a figure is read from is missing.

Prints a Markdown table (copy it into bench/RESULTS.md) with the machine's load.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


class Lines(logging.Handler):
    """Keeps ddray's log records with their times."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def first(self, text: str, after: float = 0.0) -> logging.LogRecord:
        """The first record since ``after`` whose message contains ``text``; fails without one."""
        found = next((r for r in self.records if text in r.getMessage() and r.created >= after), None)
        if found is None:
            raise RuntimeError(f"bench_elastic: no ddray log line {text!r} in this run; its figure cannot be "
                               f"measured")
        return found


def start_cluster(nodes: int) -> Any:
    import ray
    import ray._common.utils
    import ray._private.ray_constants
    import ray._private.utils
    from ray.cluster_utils import Cluster

    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False  # stay on loopback, advertise nothing
    ray._private.utils.write_ray_address = lambda *a, **k: None
    ray._common.utils.reset_ray_address = lambda *a, **k: None
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                      "node_ip_address": "127.0.0.1"})
    for _ in range(nodes):
        c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, _node_ip_address="127.0.0.1")
    return c


def config(out: Path, iterations: int, **kw: Any) -> Any:
    from ddray.config import Config

    return Config.from_dict({"iterations": iterations, "workers": "1:2", "cpus_per_worker": 1, "eval_nets": 2,
                             "checkpoint_every": 10, "tracking": False, "scores": False, "out": str(out), **kw})


def in_background(run: Any) -> threading.Thread:
    """Run the distillation in a thread: cluster_utils adds nodes from the main thread only."""
    errors: list[BaseException] = []
    results: list[Any] = []

    def target() -> None:
        try:
            results.append(run())
        except BaseException as e:  # re-raised by the caller after join()
            errors.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.results = results  # type: ignore[attr-defined]
    thread.start()
    return thread


def check_local_bits(cfg: Any, result: Any, what: str) -> None:
    """Fail unless the ``--local`` run of ``cfg`` (one process, one torch thread as a 1-CPU worker, the same
    chunks) gives ``result``'s synthetic set bit for bit."""
    import torch

    from ddray.run.loop import distill

    threads = torch.get_num_threads()
    try:
        local = distill(cfg.override(out=str(Path(cfg.run.out).with_name(Path(cfg.run.out).name + "-local"))),
                        progress=False)
    finally:
        torch.set_num_threads(threads)
    a, b = result.distilled, local.distilled
    if not (torch.equal(a.images, b.images) and torch.equal(a.lrs, b.lrs)):
        raise RuntimeError(f"bench_elastic: the {what} run's synthetic set differs from --local's "
                           f"(max |Δ| {float((a.images - b.images).abs().max()):.3g})")


@contextmanager
def running(nodes: int, cfg: Any, step: int, what: str) -> Iterator[tuple[Any, list[tuple[int, float, float]]]]:
    """A cluster with ``nodes`` 1-CPU worker nodes, running ``cfg`` in the background, at meta-step ``step`` →
    (the cluster, every applied meta-step as (step, time, workers alive), redone ones included, as they
    come). On exit: the run is waited for (its error raised), everything shut down, and the run's set
    compared with ``--local``'s (:func:`check_local_bits`)."""
    import ray

    from ddray.distributed.driver import distill_ray

    steps: list[tuple[int, float, float]] = []

    def on_step(s: int, metrics: dict[str, float]) -> None:
        steps.append((s, time.time(), metrics["workers_alive"]))

    cluster = start_cluster(nodes)
    try:
        thread = in_background(lambda: distill_ray(cfg, progress=False, on_step=on_step))
        while not any(s == step for s, _, _ in steps):
            if not thread.is_alive():
                raise RuntimeError(f"the run ended before meta-step {step}: {thread.errors}")  # type: ignore[attr-defined]
            time.sleep(0.05)
        yield cluster, steps
        thread.join()
        if thread.errors:  # type: ignore[attr-defined]
            raise thread.errors[0]  # type: ignore[attr-defined]
    finally:
        ray.shutdown()
        cluster.shutdown()
    check_local_bits(cfg, thread.results[0], what)  # type: ignore[attr-defined]


def node_loss(iterations: int, kill_at: int, tmp: Path, lines: Lines) -> dict[str, float]:
    import ray
    from ray.util import list_named_actors

    with running(2, config(tmp / "loss", iterations), kill_at, "node loss") as (cluster, steps):
        ps = next(n for n in list_named_actors() if "/ps-0." in n)
        info: Any = ray.get(ray.get_actor(ps).info.remote())
        node = info.node
        victim = next(n for n in cluster.worker_nodes if n.node_id == node)
        t = time.time()
        cluster.remove_node(victim, allow_graceful=False)
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    rollback = lines.first("rolled back to the checkpoint of meta-step", t)
    rolled_to = int(re.search(r"meta-step (\d+)", rollback.getMessage())[1])  # type: ignore[index]
    back = rollback.created  # steps applied after this are the recovered run's
    reached = max(s for s, when, _ in steps if when <= back)  # including one in flight at the kill
    before = [b[1] - a[1] for a, b in zip(steps, steps[1:]) if b[1] <= t][-10:]
    after = min(when for _, when, _ in steps if when > back)
    at_two = [when for _, when, alive in steps if when > back and alive >= 2]
    if not at_two:
        raise RuntimeError("bench_elastic: the fleet never came back to 2 workers after the node loss (no applied "
                           "meta-step with workers_alive 2); raise --iterations")
    full = min(at_two)
    return {"redone": float(reached - rolled_to), "to_next_step_s": after - t, "to_full_speed_s": full - t,
            "s_per_step": statistics.median(before)}


def join(iterations: int, join_at: int, tmp: Path, lines: Lines) -> dict[str, float]:
    with running(1, config(tmp / "join", iterations), join_at, "join") as (cluster, _):
        t0 = time.time()
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        added = time.time()  # the node is registered with the cluster
    joined = lines.first("worker 1 joined", t0)
    first = lines.first("worker 1: first chunks", t0)
    return {"node_start_s": added - t0, "to_joined_s": joined.created - added,
            "to_first_share_s": first.created - added}


def evaluation(nets: int, tmp: Path) -> dict[int, float]:
    import ray

    from ddray.config import ClusterConfig
    from ddray.distributed.pool import call_mapper, standalone_pool
    from ddray.evaluation.held_out import evaluate_distilled, predict_job, problem_for
    from ddray.run.loop import distill
    from ddray.store.artifact import read_distilled

    out = tmp / "set"
    distill(config(out, 20, workers=1), progress=False)
    d = read_distilled(out)
    problem = problem_for(d)
    cluster = start_cluster(2)
    seconds = {}
    try:
        for workers in (1, 2):
            with standalone_pool(ClusterConfig(workers=workers, cpus_per_worker=1), "evaluation worker") as pool:
                mapper = call_mapper(pool)
                t0 = time.perf_counter()
                evaluate_distilled(problem, d, nets, workers=workers, predictor=lambda job, chunks: mapper(
                    predict_job, [(d, None, job, ids) for ids in chunks]))
                seconds[workers] = time.perf_counter() - t0
    finally:
        ray.shutdown()
        cluster.shutdown()
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=80)
    p.add_argument("--kill-at", type=int, default=35, help="meta-step after which the node is killed")
    p.add_argument("--eval-nets", type=int, default=20)
    p.add_argument("--part", choices=["loss", "join", "eval", "all"], default="all")
    args = p.parse_args(argv)
    lines = Lines()
    log = logging.getLogger("ddray")
    log.addHandler(lines)
    log.setLevel(logging.DEBUG)
    load0 = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("loss", "all"):
            r = node_loss(args.iterations, args.kill_at, Path(tmp), lines)
            rows.append(f"| node holding worker 0 and the parameter server killed at step {args.kill_at}, "
                        f"replacement node added | {r['redone']:.0f} meta-steps redone | next step "
                        f"{r['to_next_step_s']:.1f} s after the kill, 2 workers again after "
                        f"{r['to_full_speed_s']:.1f} s (a meta-step takes {r['s_per_step']:.2f} s) |")
        if args.part in ("join", "all"):
            r = join(args.iterations, 10, Path(tmp), lines)
            rows.append(f"| a node joins a `--workers 1:2` run | — | the node registers in {r['node_start_s']:.1f} s; "
                        f"then its worker answers after {r['to_joined_s']:.1f} s and takes its first chunks after "
                        f"{r['to_first_share_s']:.1f} s |")
        if args.part in ("eval", "all"):
            s = evaluation(args.eval_nets, Path(tmp))
            rows.append(f"| final evaluation, {args.eval_nets} held-out nets | — | 1 worker {s[1]:.1f} s, "
                        f"2 workers {s[2]:.1f} s ({s[1] / s[2]:.2f}×) |")
    print(f"\nload average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end; {os.cpu_count()} CPUs\n")
    print("| event | work lost | time |")
    print("| --- | --- | --- |")
    print("\n".join(rows))
    if args.part in ("loss", "join", "all"):
        print("\nEach elastic run above gave the synthetic set of its `--local` run, bit for bit (checked).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
