"""Connecting to Ray, and what each worker gets: CPUs, a GPU or a share of one, torch threads.

A worker's resources come from the config (``--cpus-per-worker``, ``--gpus-per-worker``)
or, where unset, from the cluster when the run starts (:func:`worker_resources`): one
GPU each where the cluster has GPUs, else the largest whole number of CPUs such that
MIN workers fit on the alive nodes now (a fraction when there are fewer CPUs than
workers, with a warning), else one CPU — a cluster with no worker nodes yet (an
autoscaler at ``minReplicas: 0``) gets a request it can answer. Every worker runs
``round(cpus)`` torch threads (at least one), so the threads on a node never exceed
the CPUs Ray assigned there. Where the workers go is :mod:`.slots`.
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

from ddray.config import ClusterConfig

STRATEGIES = {"spread": "SPREAD", "strict-spread": "STRICT_SPREAD", "pack": "PACK"}
CONNECT_TIMEOUT_S = 10.0


class CapacityError(RuntimeError):
    """The cluster did not provide what the run asked for within ``--placement-timeout`` (one-line message)."""


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


def check_ray_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
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


RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def _quiet_auth_default(record: logging.LogRecord) -> bool:
    """Drops Ray's warning that a new local cluster has token authentication on by default."""
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def connect(address: str | None) -> bool:
    """Connect to ``address`` / $RAY_ADDRESS, or start a local Ray. True if this call initialised Ray."""
    import ray

    if ray.is_initialized():
        return False
    addr = address or os.environ.get("RAY_ADDRESS") or None
    if addr:
        check_ray_reachable(addr)
    elif "RAY_AUTH_MODE" not in os.environ:
        # ddray's own private cluster keeps Ray's default, token authentication; ddray says so once in its
        # words instead of Ray's warning about it
        logging.getLogger(RAY_AUTH_LOGGER).addFilter(_quiet_auth_default)
        logging.getLogger("ddray").info("starting a private local Ray for this run (token authentication on, "
                                        "Ray's default; RAY_AUTH_MODE=disabled turns it off)")
    try:  # "local": never attach to another cluster this machine happens to run
        ray.init(address=addr or "local", logging_level=logging.WARNING, log_to_driver=True,
                 include_dashboard=None if addr else False)  # a private local Ray needs no dashboard
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        where = f"--address {addr}" if addr else "local Ray"
        raise ValueError(f"{where}: could not connect ({str(e).splitlines()[0]})") from None
    return True


@dataclass(frozen=True)
class WorkerResources:
    """What one worker (and one pool task) reserves: ``cpus`` CPUs and ``gpus`` GPUs (a fraction shares a card)."""

    cpus: float
    gpus: float = 0.0

    @property
    def threads(self) -> int:
        """torch intra-op threads: the whole CPUs of the reservation (at least one)."""
        return max(1, round(self.cpus))

    @property
    def device(self) -> str:
        return "cuda" if self.gpus > 0 else "cpu"

    def bundle(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in self.bundle().items())


def _fits(capacities: list[float], size: float, count: int, strict: bool) -> bool:
    """Whether ``count`` bundles of ``size`` CPUs fit on nodes with ``capacities`` CPUs."""
    per_node = [int(c / size + 1e-9) for c in capacities]
    return sum(min(1, n) if strict else n for n in per_node) >= count


def worker_resources(cluster: ClusterConfig, nodes: list[dict[str, float]]) -> WorkerResources:
    """Each worker's resources: the config's, else derived from the alive nodes' resources
    (``ray.nodes()[i]["Resources"]``) as the module docstring says."""
    gpus = cluster.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if any(n.get("GPU", 0.0) >= 1 for n in nodes) else 0.0
    if cluster.cpus_per_worker is not None:
        return WorkerResources(float(cluster.cpus_per_worker), float(gpus))
    if gpus:
        return WorkerResources(1.0, float(gpus))
    caps = [n.get("CPU", 0.0) for n in nodes if n.get("CPU", 0.0) > 0]
    want, strict = cluster.min_workers, cluster.placement == "strict-spread"
    whole = [float(c) for c in range(int(max(caps, default=0)), 0, -1) if _fits(caps, c, want, strict)]
    if whole:
        return WorkerResources(whole[0])
    if not caps or strict:
        return WorkerResources(1.0)  # nothing fits now: ask for one CPU each and wait for nodes
    lo, hi = 0.0, 1.0  # fewer CPUs than workers: the largest fraction that fits (bisection)
    for _ in range(30):
        lo, hi = ((lo + hi) / 2, hi) if _fits(caps, (lo + hi) / 2, want, strict) else (lo, (lo + hi) / 2)
    c = max(0.001, math.floor(1000 * lo) / 1000)
    warnings.warn(f"{want} workers on {sum(caps):g} CPUs: each gets {c:g} CPU but runs one thread; the CPUs are "
                  f"oversubscribed (set --cpus-per-worker to choose)", stacklevel=2)
    return WorkerResources(c)


def alive_nodes() -> list[dict[str, float]]:
    """Resources of the alive nodes of the connected cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def cluster_summary(nodes: list[dict[str, float]] | None = None) -> str:
    """``"3 alive nodes with CPU 2, GPU 0 in all"`` (for waiting messages and errors)."""
    nodes = alive_nodes() if nodes is None else nodes
    cpu, gpu = sum(n.get("CPU", 0.0) for n in nodes), sum(n.get("GPU", 0.0) for n in nodes)
    return f"{len(nodes)} alive node{'s' * (len(nodes) != 1)} with CPU {cpu:g}, GPU {gpu:g} in all"


def missing(resources: WorkerResources, nodes: list[dict[str, float]]) -> str:
    """What no alive node offers for one worker, e.g. ``"no node has a GPU"`` (empty if one could host it)."""
    if resources.gpus and not any(n.get("GPU", 0.0) > 0 for n in nodes):
        return "no node has a GPU"
    if not any(all(n.get(k, 0.0) >= v for k, v in resources.bundle().items()) for n in nodes):
        return f"no node has {resources} free for a worker"
    return ""


@dataclass(frozen=True)
class TrialLayout:
    """Inside a Ray Tune trial's group — bundle 0 the trial driver, then one bundle per
    parameter-server shard, then one per worker — where each actor goes."""

    resources: WorkerResources
    workers: int
    first_worker_bundle: int
    ps_cpus: float

    def ps_bundle(self, shard: int) -> int:
        return 1 + shard


def trial_layout(bundles: list[dict[str, float]], workers: int, shards: int) -> TrialLayout | None:
    """The layout of a Tune trial's group (:meth:`ddray.tune.spec.TuneSpec.placement`), or None if
    ``bundles`` does not have that shape."""
    if len(bundles) != 1 + shards + workers:
        return None
    ws = bundles[1 + shards:]
    if any(b != ws[0] for b in ws):
        return None
    return TrialLayout(WorkerResources(float(ws[0].get("CPU", 0.0)), float(ws[0].get("GPU", 0.0))), workers,
                       1 + shards, float(bundles[1].get("CPU", 0.0)))


def current_group() -> Any:
    """The placement group this process runs in (a Ray Tune trial's), or None."""
    from ray.util import get_current_placement_group

    return get_current_placement_group()
