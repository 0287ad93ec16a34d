"""Benchmarks of the Ray scale-out (issue 3): meta-step throughput and parameter-server overhead.

Part ``meta``: meta-steps/s and nets/s of the default MNIST-5k config (S=10, E=3,
ipc 1, K=4 nets, real batch 1024, LeNet) for the single-process core and for the
Ray driver with W = 1 and 2 workers, in the same run (every process runs one torch
thread; see the printed machine line).

Part ``ps``: orchestration cost with *simulated* workers (they return a precomputed
gradient shaped like the version they receive, so nothing is computed), for
synthetic sets of 10/100 MNIST images and 100/500 CIFAR-sized images and
W = 1, 8, 32, 64 workers (each worker one of K = W nets):

* ``server ms``: parameter-server time per update — receive (fetch the W gradients
  from the object store), sum, Adam (timed inside the server) and publish (the new
  version is the server task's return value, written to the object store once;
  timed as a ``ray.put`` of the same payload);
* ``round ms``: wall time per meta-step of the whole loop (driver → workers → server
  → next version), median over repetitions;
* ddray with its default transport (a task per worker per meta-step, versions and
  gradients as object-store entries, one step of lookahead) and with the
  experimental compiled-graph transport (``DDRAY_TRANSPORT=compiled``);
* the same for a *naive* Ray parameter server measured in this run: one actor that
  ``ray.get``s the W numpy gradients passed as ObjectRefs, averages them with
  ``np.mean``, runs Adam in numpy and returns the parameters; the driver waits on
  every round and passes the parameters by value to each worker.

Usage::

    nice -n 10 .venv/bin/python bench/bench_distributed.py            # both parts
    nice -n 10 .venv/bin/python bench/bench_distributed.py --part ps --workers 1 8 --rounds 10
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SETS = {"mnist 10": (1, 10, 1, 28, 28), "mnist 100": (10, 10, 1, 28, 28),
        "cifar 100": (10, 10, 3, 32, 32), "cifar 500": (10, 50, 3, 32, 32)}
EPOCHS = 3


def machine() -> str:
    load = os.getloadavg()
    return (f"{platform.node()}: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
            f"load avg {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at start, Python {platform.python_version()}")


# -- part 1: real meta-steps ------------------------------------------------------------------

def bench_meta(steps: int, warmup: int, out: Path) -> list[tuple[str, float, float]]:
    """(label, meta-steps/s, nets/s) for the single-process core and the Ray driver with W = 1, 2."""
    import torch

    from ddray.config import Config
    from ddray.core.synthetic import OuterOptimizer
    from ddray.distributed.driver import distill_ray
    from ddray.inputs.problem import build_problem

    cfg = Config.from_dict({"iterations": warmup + steps, "eval_nets": 1, "checkpoint_every": 10_000,
                            "cpus_per_worker": 1, "tracking": False})
    k = cfg.distill.nets
    rows = []
    torch.set_num_threads(1)
    problem = build_problem(cfg)
    syn, obj = problem.initial_synthetic(), problem.objective()
    opt = OuterOptimizer(syn, cfg.distill.outer_lr, cfg.distill.lr_decay, cfg.distill.lr_decay_every)
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        g = obj(syn.images, syn.raw_lrs, step, list(range(k)))
        opt.apply(g.images / g.nets, g.raw_lrs / g.nets)
        times.append(time.perf_counter() - t0)
    per = statistics.median(times[warmup:])
    rows.append(("single process (core, 1 thread)", 1 / per, k / per))
    for w in (1, 2):
        stamps: list[float] = []
        distill_ray(cfg.override(workers=w, out=str(out / f"w{w}")), progress=False,
                    on_step=lambda s, m: stamps.append(time.perf_counter()))
        per = statistics.median(np.diff(stamps[warmup - 1:]))
        rows.append((f"Ray, W = {w} worker{'s' if w > 1 else ''} (1 thread each)", 1 / per, k / per))
    return rows


# -- part 2: parameter-server overhead --------------------------------------------------------

class NaiveWorker:
    """Returns a precomputed numpy gradient shaped like the parameters it is sent."""

    def __init__(self) -> None:
        self.cache: dict[int, np.ndarray] = {}

    def grad(self, params: np.ndarray) -> np.ndarray:
        if params.size not in self.cache:
            self.cache[params.size] = (1e-3 * np.random.default_rng(0).standard_normal(params.size)).astype(
                np.float32)
        return self.cache[params.size]


class NaiveServer:
    """ray.get the gradients, np.mean, Adam in numpy, return the parameters."""

    def __init__(self, params: np.ndarray, lr: float = 0.01, betas: tuple[float, float] = (0.5, 0.999)) -> None:
        self.p, self.m, self.v = params.copy(), np.zeros_like(params), np.zeros_like(params)
        self.lr, self.b1, self.b2, self.t = lr, betas[0], betas[1], 0
        self.ms: list[float] = []

    def apply(self, grad_refs: list[Any]) -> np.ndarray:
        import ray

        t0 = time.perf_counter()
        g = np.mean(np.stack(ray.get(grad_refs)), axis=0)
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        mh, vh = self.m / (1 - self.b1 ** self.t), self.v / (1 - self.b2 ** self.t)
        self.p = self.p - self.lr * mh / (np.sqrt(vh) + 1e-8)
        self.ms.append(1e3 * (time.perf_counter() - t0))
        return self.p

    def overhead_ms(self) -> list[float]:
        out, self.ms = self.ms, []
        return out


def naive_rounds(pool: list[Any], shape: tuple[int, ...], rounds: int, reps: int) -> tuple[float, float]:
    """(median ms per round, median ms in the server per update) of the naive server."""
    import ray

    size = int(np.prod(shape)) + shape[0] * EPOCHS
    params = np.random.default_rng(1).standard_normal(size).astype(np.float32)
    server = ray.remote(NaiveServer).options(num_cpus=0).remote(params)
    per_round = []
    for rep in range(reps + 1):
        t0 = time.perf_counter()
        for _ in range(rounds):  # the driver waits on every round
            params = ray.get(server.apply.remote([w.grad.remote(params) for w in pool]))
        if rep:  # the first repetition warms up
            per_round.append(1e3 * (time.perf_counter() - t0) / rounds)
    ms = ray.get(server.overhead_ms.remote())[rounds:]
    ray.kill(server)
    return statistics.median(per_round), statistics.median(ms)


def simulated_fleet(workers: int, shape: tuple[int, ...]) -> Any:
    """A fleet of ``workers`` simulated workers (tiny CPU reservations: nothing is computed) and one server."""
    import torch

    from ddray.config import Config
    from ddray.core.synthetic import OuterOptimizer, SyntheticSet, class_labels
    from ddray.distributed.fleet import Fleet
    from ddray.distributed.placement import WorkerResources
    from ddray.distributed.shards import Shard
    from ddray.run.state import RunState

    s, n = shape[0], shape[1]
    cfg = Config.from_dict({"steps": s, "epochs": EPOCHS, "nets": workers, "iterations": 10 ** 6,
                            "checkpoint_every": 10 ** 6, "workers": workers, "placement": "pack"})
    syn = SyntheticSet(torch.randn(shape), class_labels(n, 1), torch.full((s * EPOCHS,), -3.9), EPOCHS)
    opt = OuterOptimizer(syn, 0.01, 0.5, 10 ** 6)
    state = RunState(0, syn.images, syn.raw_lrs, opt.state_dict(), cfg)
    storage = tempfile.mkdtemp(prefix="ddray-bench-")
    return Fleet(cfg, [Shard(0, 1, 0, n)], state, storage, WorkerResources(0.001), kind="simulated"), state


def ddray_rounds(workers: int, shape: tuple[int, ...], rounds: int, reps: int,
                 transport: str = "objects") -> tuple[float, float]:
    """(median ms per round, median ms in the server per update) of ddray's sync loop."""
    from ddray.distributed.compiled import compiled_rounds
    from ddray.distributed.driver import sync_rounds

    fleet, state = simulated_fleet(workers, shape)
    try:
        per_round, ps_ms = [], []
        for rep in range(reps + 1):
            stats: list[Any] = []
            t0 = time.perf_counter()
            loop = compiled_rounds if transport == "compiled" else sync_rounds
            loop(fleet, rep * rounds, (rep + 1) * rounds, lambda done: False, lambda st, *_: stats.append(st))
            if rep:
                per_round.append(1e3 * (time.perf_counter() - t0) / rounds)
                ps_ms += [st.metrics()["ps_ms"] for st in stats]
    finally:
        fleet.shutdown()
    return statistics.median(per_round), statistics.median(ps_ms) + publish_ms(state, shape[1])


def publish_ms(state: Any, n: int) -> float:
    """The server publishes a version as its task's return value: Ray writes it to the object store
    once. Timed here as a ``ray.put`` of the same payload (median of 20)."""
    import ray

    from ddray.distributed.messages import Version

    version = Version(1, state.images.numpy(), state.raw_lrs.numpy())
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        ref = ray.put(version)
        times.append(1e3 * (time.perf_counter() - t0))
        del ref
    return statistics.median(times)


KINDS = ("naive", "objects", "compiled")  # the naive server; ddray's default and compiled-graph transports


def bench_ps(workers: list[int], sets: list[str], rounds: int, reps: int) -> list[dict[str, Any]]:
    import ray

    rows: list[dict[str, Any]] = [{"set": name, "W": w} for name in sets for w in workers]
    for kind in KINDS:
        pool: list[Any] = []
        if kind == "naive":  # one pool of naive workers; ddray's fleets bring their own (one at a time)
            pool = [ray.remote(NaiveWorker).options(num_cpus=0).remote() for _ in range(max(workers))]
            ray.get([w.grad.remote(np.zeros(1, np.float32)) for w in pool])
        for row in rows:
            try:
                if kind == "naive":
                    row[kind] = naive_rounds(pool[:row["W"]], SETS[row["set"]], rounds, reps)
                else:
                    row[kind] = ddray_rounds(row["W"], SETS[row["set"]], rounds, reps, kind)
            except Exception as e:  # e.g. Ray's memory monitor killing actors on a crowded machine
                print(f"  {kind:8s} {row['set']:9s} W={row['W']:<2d} FAILED: {str(e).splitlines()[0][:150]}")
                row[kind] = (float("nan"), float("nan"))
                continue
            print(f"  {kind:8s} {row['set']:9s} W={row['W']:<2d} round {row[kind][0]:7.2f} ms  "
                  f"server {row[kind][1]:6.2f} ms", flush=True)
        for w in pool:
            ray.kill(w)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["meta", "ps", "all"], default="all")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    p.add_argument("--rounds", type=int, default=20, help="meta-steps per repetition (part ps)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions after a warm-up one (part ps)")
    p.add_argument("--steps", type=int, default=8, help="timed meta-steps (part meta)")
    args = p.parse_args(argv)

    import ray

    print(machine(), flush=True)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        if args.part in ("meta", "all"):
            with tempfile.TemporaryDirectory() as tmp:
                rows = bench_meta(args.steps, 2, Path(tmp))
            print("\n| default MNIST-5k config (S=10, E=3, K=4, batch 1024) | meta-steps/s | nets/s |")
            print("| --- | ---: | ---: |")
            for label, sps, nps in rows:
                print(f"| {label} | {sps:.2f} | {nps:.2f} |")
        if args.part in ("ps", "all"):
            res = bench_ps(args.workers, args.sets, args.rounds, args.reps)
            print("\n| set | W | naive: server ms/update | naive: ms/round | ddray: server ms/update | "
                  "ddray: ms/round | speed-up | ddray compiled: server ms/update | compiled: ms/round | speed-up |")
            print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            for r in res:
                (nr, ns), (orr, os_), (cr, cs) = r["naive"], r["objects"], r["compiled"]
                print(f"| {r['set']} | {r['W']} | {ns:.2f} | {nr:.1f} | {os_:.2f} | {orr:.1f} | {nr / orr:.1f}× | "
                      f"{cs:.2f} | {cr:.1f} | {nr / cr:.1f}× |")
    finally:
        ray.shutdown()
    print(f"\nload avg at end: {os.getloadavg()[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
