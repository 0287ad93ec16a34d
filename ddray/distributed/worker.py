"""Meta-gradient workers: each computes Σ over its share of a meta-step's K networks.

:class:`MetaGradWorker` loads its own copy of the real data through the data
registry (``build_problem`` inside the worker process — nothing is pickled from
the driver) and calls the core objective. All randomness of a meta-step is
derived from (run seed, step, net index) (core/inits.py), so a share gives the
same sum on any worker and a recomputed share equals the lost one; each worker
also seeds torch's global generator from (run seed, worker index, step) so that
any unkeyed draw is independent of scheduling too.

:class:`SimulatedWorker` returns a precomputed gradient without computing it (the
benchmarks use it to isolate orchestration cost); it does not import torch, so
dozens of them fit on a small machine.

:class:`WorkerActor` is the Ray shell (``ray.remote`` is applied in :mod:`.fleet`).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np

from ddray.distributed.shards import Payload, Shard

WORKER_STREAM = 100  # seed purpose of a worker's own stream (core/inits.py uses 0…6)


def split_nets(nets: int, workers: int) -> list[list[int]]:
    """The K = ``nets`` net indices of a meta-step in contiguous shares, one per worker (some may be empty)."""
    return [[int(i) for i in part] for part in np.array_split(np.arange(nets), workers)]


def slice_grads(g_images: np.ndarray, g_raw: np.ndarray, loss: float, nets: int, layout: list[Shard],
                versions: list[Payload]) -> list[Payload]:
    """One gradient payload per shard: its block of image columns (ρ for shard 0)."""
    return [{"images": np.ascontiguousarray(g_images[:, s.lo:s.hi]),
             "raw_lrs": g_raw if s.owns_lrs else None, "loss": loss, "nets": nets,
             "version": int(versions[s.index]["step"])} for s in layout]


class MetaGradWorker:
    """Computes meta-gradients for shares of meta-steps (plain class; unit-testable without Ray).

    Args:
        config: the run config as a dict (``Config.to_dict()``).
        index: this worker's index (for its own seed stream and logs).
        threads: torch intra-op threads — the CPUs Ray assigned this worker.
        layout: the parameter-server shards (where to send which slice).
        device: ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, config: dict[str, Any], index: int, threads: int, layout: list[Shard],
                 device: str = "cpu") -> None:
        import torch

        from ddray.config import Config
        from ddray.problem import build_problem
        from ddray.threads import apply_threads

        apply_threads(max(1, threads))  # intra-op = the CPUs Ray assigned, one inter-op thread
        self.index, self.layout, self.device = index, layout, torch.device(device)
        self.config = Config.from_dict(config)
        problem = build_problem(self.config)  # loads the real data in this process
        self.objective = problem.objective()  # the method's (ddray.problem.OBJECTIVES)
        if self.device.type != "cpu":
            self.objective = self.objective.to(self.device)

    def compute(self, step: int, nets: list[int], versions: list[Payload]) -> tuple[dict[str, Any], list[Payload]]:
        """Σ over ``nets`` of ∂ℓ/∂(x̃, ρ) at the given versions (one per shard) → (meta, per-shard grads)."""
        import torch

        from ddray.core.inits import derive_seed

        t0 = time.perf_counter()
        images = torch.from_numpy(np.concatenate([v["images"] for v in versions], axis=1))
        raw = torch.from_numpy(np.array(versions[0]["raw_lrs"], dtype=np.float32))
        torch.manual_seed(derive_seed(self.config.run.seed, WORKER_STREAM, self.index, step))
        g = self.objective(images.to(self.device), raw.to(self.device), step, nets)
        grads = slice_grads(g.images.detach().cpu().numpy(), g.raw_lrs.detach().cpu().numpy(), g.loss, g.nets,
                            self.layout, versions)
        meta = {"worker": self.index, "nets": g.nets, "loss": g.loss, "seconds": time.perf_counter() - t0}
        return meta, grads


class SimulatedWorker:
    """Returns a fixed, precomputed gradient shaped like the versions it is given (no data, no torch).

    The gradient for a shape is drawn once and then returned on every call, so a
    benchmark measures only the orchestration: receiving the version, shipping the
    gradient, averaging and applying it.
    """

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.cache: dict[tuple[int, ...], np.ndarray] = {}
        self.index = 0

    def _fixed(self, shape: tuple[int, ...]) -> np.ndarray:
        if shape not in self.cache:
            self.cache[shape] = (1e-3 * self.rng.standard_normal(shape)).astype(np.float32)
        return self.cache[shape]

    def compute(self, step: int, nets: list[int], versions: list[Payload]) -> tuple[dict[str, Any], list[Payload]]:
        grads = [{"images": self._fixed(v["images"].shape),
                  "raw_lrs": None if v["raw_lrs"] is None else self._fixed(v["raw_lrs"].shape),
                  "loss": 1.0 * len(nets), "nets": len(nets), "version": int(v["step"])} for v in versions]
        return {"worker": self.index, "nets": len(nets), "loss": 1.0 * len(nets), "seconds": 0.0}, grads


WORKER_KINDS: dict[str, Callable[..., Any]] = {"meta": MetaGradWorker, "simulated": SimulatedWorker}


def async_loop(worker: Any, index: int, workers: int, nets: int, pull: Callable[[], list[Payload] | None],
               push: Callable[[list[Payload]], bool], offset: int = 0) -> int:
    """Async mode: pull the latest version, compute a share, push it; repeat until the run is complete.

    Each push covers ``len(split_nets(nets, workers)[index])`` fresh networks whose
    indices are unique over (push, worker), so no θ₀ draw is reused. ``pull`` returns
    None and ``push`` True once the parameter servers have all their meta-steps.
    Returns the number of pushes.
    """
    share = len(split_nets(nets, workers)[index]) or 1
    n = offset
    while (versions := pull()) is not None:
        ids = [(n * workers + index) * nets + j for j in range(share)]
        _, grads = worker.compute(int(versions[0]["step"]), ids, versions)
        n += 1
        if push(grads):
            break
    return n - offset


class WorkerActor:
    """Ray shell around a worker kind; ``ray.remote`` is applied in :mod:`.fleet`."""

    def __init__(self, kind: str, *args: Any) -> None:
        from ddray.distributed.placement import reconstructed

        self.impl = WORKER_KINDS[kind](*args)
        self.restarted = reconstructed()

    def ping(self) -> dict[str, Any]:
        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "restarted": self.restarted}

    def compute(self, step: int, nets: list[int], *versions: Payload) -> Any:
        """``versions``: the shards' current versions → the gradient for shard 0, …, shard J−1."""
        _, grads = self.impl.compute(step, nets, list(versions))
        return grads[0] if len(grads) == 1 else tuple(grads)

    def dag_compute(self, job: tuple[int, bool], nets: list[int], *versions: Payload) -> Any:
        """Compiled-graph transport: :meth:`compute` for meta-step ``job[0]``."""
        return self.compute(job[0], nets, *versions)

    def run_async(self, servers: list[Any], index: int, workers: int, nets: int, offset: int) -> int:
        import ray

        def pull() -> list[Payload] | None:
            latest = ray.get([s.pull.remote() for s in servers])
            return None if all(done for _, done in latest) else ray.get([ref for ref, _ in latest])

        def push(grads: list[Payload]) -> bool:
            return all(ray.get([s.push.remote(g) for s, g in zip(servers, grads)]))

        return async_loop(self.impl, index, workers, nets, pull, push, offset)
