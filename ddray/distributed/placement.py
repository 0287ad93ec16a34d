"""Connecting to Ray and placing the actors: one placement group for workers + parameter servers.

Bundle i holds worker i; the parameter-server shards (a fractional CPU each) ride
in the bundles of workers 0, 1, … and take their CPU out of that worker's share,
so the group needs no extra node under ``strict-spread``. Workers get one GPU each
where the cluster has GPUs; otherwise a CPU share and exactly
``threads = max(1, ⌊CPUs⌋)`` torch threads, so the threads of the workers on a node
never exceed the CPUs Ray assigned them (with more workers than CPUs each still
needs one thread; a warning says so).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import warnings
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

STRATEGIES = {"spread": "SPREAD", "strict-spread": "STRICT_SPREAD", "pack": "PACK"}
PS_CPUS = 0.05  # per parameter-server shard: it mostly waits on the object store
CONNECT_TIMEOUT_S = 10.0
PLACEMENT_TIMEOUT_S = float(os.environ.get("DDRAY_PLACEMENT_TIMEOUT_S", "300"))


def reconstructed() -> bool:
    """Whether Ray is re-creating the calling actor after it died."""
    import ray

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the flag's implementation warns about a deprecated API
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port``, ``ray://host:port`` or ``http://host:port`` → (host, port); None for auto/local."""
    if address in ("auto", "local"):
        return None
    url = urlparse(address if "://" in address else f"tcp://{address}")
    if not url.hostname:
        raise ValueError(f"--address: invalid value {address!r}; expected HOST:PORT, ray://HOST:PORT or auto")
    default = {"ray": 10001, "http": 8265, "https": 443}.get(url.scheme, 6379)
    try:
        port = url.port or default
    except ValueError:
        raise ValueError(f"--address: invalid value {address!r}; the port is not a number") from None
    return url.hostname, port


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """ValueError naming ``address`` unless a TCP connection to it succeeds within ``timeout`` s."""
    hp = _host_port(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout):
            pass
    except OSError as e:
        raise ValueError(f"--address {address}: no Ray cluster reachable at {hp[0]}:{hp[1]} "
                         f"({e.strerror or type(e).__name__}; gave up after at most {timeout:.0f} s)") from None


def connect(address: str | None) -> bool:
    """Connect to ``address`` / $RAY_ADDRESS, or start a local Ray. True if this call initialised Ray."""
    import ray

    if ray.is_initialized():
        return False
    addr = address or os.environ.get("RAY_ADDRESS") or None
    if addr:
        check_reachable(addr)
    try:  # "local": never attach to another cluster this machine happens to run
        ray.init(address=addr or "local", logging_level=logging.WARNING, log_to_driver=True,
                 include_dashboard=None if addr else False)  # a private local Ray needs no dashboard
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        where = f"--address {addr}" if addr else "local Ray"
        raise ValueError(f"{where}: could not connect ({str(e).splitlines()[0]})") from None
    return True


@dataclass(frozen=True)
class Plan:
    """The placement group: one bundle per worker; PS shard j rides in bundle j mod W.

    A worker's own request is its bundle minus the shards riding in it, and its torch
    threads are the whole CPUs of that request (at least one).
    """

    bundles: list[dict[str, float]]
    worker_cpus: list[float]
    worker_gpus: float
    ps_cpus: float
    strategy: str
    first_worker_bundle: int = 0  # > 0 in a Ray Tune trial's group: [driver, PS × J, worker × W]
    first_ps_bundle: int | None = None

    @property
    def device(self) -> str:
        return "cuda" if self.worker_gpus else "cpu"

    def threads(self, worker: int) -> int:
        # Rounded, not floored: a parameter-server shard riding in the bundle holds a 0.05-CPU
        # sliver and mostly waits, so one worker on a 2-CPU machine should still use both cores.
        return max(1, round(self.worker_cpus[worker]))

    def worker_bundle(self, worker: int) -> int:
        return self.first_worker_bundle + worker

    def ps_bundle(self, shard: int) -> int:
        if self.first_ps_bundle is not None:
            return self.first_ps_bundle + shard
        return shard % len(self.worker_cpus)


def plan_in_group(bundles: list[dict[str, float]], workers: int, shards: int) -> Plan | None:
    """A plan inside an existing group laid out as a Ray Tune trial reserves it — bundle 0 the
    trial's driver, then one per parameter-server shard, then one per worker — or None if
    ``bundles`` does not have that shape."""
    if len(bundles) != 1 + shards + workers:
        return None
    ws = bundles[1 + shards:]
    cpus = [float(b.get("CPU", 0.0)) for b in ws]
    gpus = float(ws[0].get("GPU", 0.0))
    if any(float(b.get("GPU", 0.0)) != gpus for b in ws):
        return None
    return Plan(bundles, cpus, gpus, float(bundles[1].get("CPU", 0.0)), "(the trial's group)",
                first_worker_bundle=1 + shards, first_ps_bundle=1)


def _fits(capacities: list[float], size: float, count: int, strict: bool) -> bool:
    """Whether ``count`` bundles of ``size`` CPUs fit on nodes with ``capacities`` CPUs."""
    per_node = [int(c / size + 1e-9) for c in capacities]
    return sum(min(1, n) if strict else n for n in per_node) >= count


def plan_resources(nodes: list[dict[str, float]], workers: int, shards: int, placement: str,
                   cpus_per_worker: float | None = None) -> Plan:
    """Decide each worker's CPUs/GPU from the alive nodes' resources (``ray.nodes()[i]["Resources"]``).

    CPU workers get the largest bundle (whole CPUs if possible) such that W bundles
    fit; ValueError if even a sliver per worker does not fit.
    """
    strategy = STRATEGIES[placement]
    strict = placement == "strict-spread"
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    if gpus >= 1:
        if gpus < workers:
            raise ValueError(f"--workers: invalid value {workers}; the cluster has {gpus:g} GPUs and each "
                             f"worker takes one")
        return Plan([{"CPU": 1.0, "GPU": 1.0}] * workers, [1.0 - PS_CPUS if i < shards else 1.0
                                                         for i in range(workers)], 1.0, PS_CPUS, strategy)
    caps = [n.get("CPU", 0.0) for n in nodes if n.get("CPU", 0.0) > 0]
    riders = [sum(1 for j in range(shards) if j % workers == i) for i in range(workers)]

    def ps_share(c: float) -> float:  # a PS shard never takes more than half a bundle
        return min(PS_CPUS, c / (2 * max(riders)))

    def ok(c: float) -> bool:
        return c > 0 and _fits(caps, c, workers, strict)

    c: float | None
    if cpus_per_worker is not None:
        want = cpus_per_worker + max(riders) * PS_CPUS
        c = want if ok(want) else None
    else:
        c = next((float(c) for c in range(int(max(caps, default=0)), 0, -1) if ok(c)), None)
        if c is None:  # fewer CPUs than workers: the largest fractional share that fits (bisection)
            lo, hi = 0.0, 1.0
            for _ in range(30):
                lo, hi = ((lo + hi) / 2, hi) if ok((lo + hi) / 2) else (lo, (lo + hi) / 2)
            c = math.floor(1000 * lo) / 1000 if ok(math.floor(1000 * lo) / 1000) else None
    if c is None:
        raise ValueError(f"--workers {workers} --placement {placement}: cannot place {workers} worker(s) "
                         f"(+{shards} parameter-server shard(s)) on nodes with CPUs {caps}")
    if c < 1 and workers > sum(caps):
        warnings.warn(f"{workers} workers on {sum(caps):g} CPUs: each gets {c:g} CPU but runs one thread; "
                      f"the CPUs are oversubscribed", stacklevel=2)
    ps = ps_share(c)
    return Plan([{"CPU": c}] * workers, [round(c - r * ps, 6) for r in riders], 0.0, ps, strategy)


def create_group(plan: Plan, timeout: float = PLACEMENT_TIMEOUT_S) -> Any:
    """The placement group of ``plan``, ready; ValueError naming the request if it cannot be placed in time."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(plan.bundles, strategy=plan.strategy)
    try:
        ray.get(pg.ready(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise ValueError(f"placement group {plan.bundles} ({plan.strategy}) could not be placed within "
                         f"{timeout:.0f} s; cluster resources: {ray.cluster_resources()}") from None
    return pg


def alive_nodes() -> list[dict[str, float]]:
    """Resources of the alive nodes of the connected cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
