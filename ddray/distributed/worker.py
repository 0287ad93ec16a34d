"""Meta-gradient workers: each computes the chunks of a meta-step it is given, and evaluation chunks.

:class:`MetaGradWorker` maps the real data from the object store — the driver puts it
there once, and every worker of a node reads that node's one read-only copy without
copying it (uint8, normalised per batch) — or, without it (``--data-cache-mb``), loads
the data itself; it calls the core objective once per chunk (:mod:`ddray.core.net_chunks`): all
randomness of a chunk is derived from (run seed, step, net index, chunk), so a chunk
gives the same gradient on any worker and a recomputed chunk equals the lost one.
It also trains held-out networks on a version of the synthetic set
(:meth:`MetaGradWorker.predict`), so evaluation runs where the workers are.

:class:`SimulatedWorker` returns a precomputed gradient without computing it (the
benchmarks use it to isolate orchestration cost); it does not import torch, so
dozens of them fit on a small machine.

:class:`WorkerActor` is the Ray shell (``ray.remote`` is applied in :mod:`.fleet`);
``kind="plain"`` is a worker with no run of its own, for :meth:`WorkerActor.call` jobs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ddray.distributed.messages import GradShare, Version, WorkerInfo, synthetic_of
from ddray.distributed.shards import Shard

if TYPE_CHECKING:
    from ddray.config import Config
    from ddray.evaluation.held_out import EvalJob

Chunk = tuple[int, list[int]]  # (chunk index, the net indices in it)


def slice_grads(step: int, chunk: int, g_images: np.ndarray, g_raw: np.ndarray, loss: float, nets: int,
                layout: list[Shard], g_labels: np.ndarray | None = None) -> list[GradShare]:
    """One chunk's gradient as one :class:`GradShare` per shard: its block of image columns (ρ, and learned
    labels' ∂/∂z̃, for shard 0)."""
    return [GradShare(step, chunk, np.ascontiguousarray(g_images[:, s.lo:s.hi]), g_raw if s.owns_lrs else None,
                      loss, nets, g_labels if s.owns_lrs else None) for s in layout]



def describe_device(device: Any) -> str:
    """Where a worker computes, for the log: ``"cpu"``, or ``"cuda:0 (NVIDIA H100 80GB HBM3)"``."""
    import torch

    d = torch.device(device or "cpu")
    if d.type != "cuda":
        return d.type
    index = d.index if d.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def mapping_of(address: int) -> str | None:
    """What the memory at ``address`` of this process is: the file of its mapping (the object store's shared
    memory, e.g. ``/dev/shm/plasma…``), ``""`` for anonymous memory (a private copy), None off Linux."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                if lo <= address < hi:
                    return parts[5].strip() if len(parts) > 5 else ""
    except OSError:
        return None
    return None


class MetaGradWorker:
    """Computes meta-gradients of chunks of meta-steps, and evaluation chunks (plain class; no Ray needed).

    Args:
        config: the run config.
        index: this worker's slot (for logs).
        threads: torch intra-op threads — ``round`` of the CPUs Ray assigned this worker.
        layout: the parameter-server shards (where to send which slice).
        device: ``"cpu"`` or ``"cuda"``.
        data: :meth:`ddray.data.Dataset.to_shared`'s arrays (from the object store: zero-copy views), or None to
            load the data here.
    """

    def __init__(self, config: "Config", index: int, threads: int, layout: list[Shard], device: str = "cpu",
                 data: dict[str, Any] | None = None) -> None:
        import torch

        from ddray.data import Dataset
        from ddray.inputs.problem import build_problem
        from ddray.threads import apply_threads

        apply_threads(max(1, threads))  # intra-op = the CPUs Ray assigned, one inter-op thread
        self.index, self.layout, self.device = index, layout, torch.device(device)
        self.config = config
        self.problem = build_problem(config, None if data is None else Dataset.from_shared(data))
        self._objective: Any = None

    def data_info(self) -> dict[str, Any]:
        """How this worker holds its training images: their bytes and where they live (:func:`mapping_of`: the
        object store's shared memory, or this process's own), or that they are read from the Parquet copy."""
        import torch

        raw = self.problem.data.x_train.raw
        if not isinstance(raw, torch.Tensor):  # read from the Parquet copy (--data-cache-mb)
            return {"bytes": 0, "dtype": str(raw.dtype), "mapping": None, "rows": True}
        return {"bytes": int(raw.nbytes), "dtype": str(raw.dtype), "mapping": mapping_of(raw.data_ptr()), "rows": False}

    @property
    def objective(self) -> Any:
        """The method's meta-gradient (:data:`ddray.inputs.problem.OBJECTIVES`), built on first use."""
        if self._objective is None:
            objective = self.problem.objective()
            self._objective = objective.to(self.device) if self.device.type != "cpu" else objective
        return self._objective

    def compute(self, step: int, chunks: list[Chunk], versions: list[Version]) -> list[list[GradShare]]:
        """Each chunk's Σ of ∂ℓ/∂(x̃, ρ) at ``versions`` (one per shard) → per shard, one GradShare per chunk."""
        import torch

        from ddray.core.net_chunks import chunk_gradient

        if any(v.step != step for v in versions):
            raise RuntimeError(f"worker {self.index}: meta-step {step} was given versions "
                               f"{[v.step for v in versions]}")
        syn = synthetic_of(versions, self.problem)
        images, raw = syn.images.to(self.device), syn.raw_lrs.to(self.device)
        labels = syn.labels.to(self.device) if syn.learns_labels else None
        per_shard: list[list[GradShare]] = [[] for _ in self.layout]
        for c, nets in chunks:
            g = chunk_gradient(self.objective, images, raw, step, c, nets, self.config.run.seed, labels)
            parts = slice_grads(step, c, g.images.detach().cpu().numpy(), g.raw_lrs.detach().cpu().numpy(), g.loss,
                                g.nets, self.layout, None if g.labels is None else g.labels.detach().cpu().numpy())
            for j, part in enumerate(parts):
                per_shard[j].append(part)
        return per_shard

    def predict(self, job: "EvalJob", ids: list[int], versions: list[Version]) -> np.ndarray:
        """Held-out networks ``ids`` trained on the set of ``versions`` → test predictions (len(ids), M)."""
        from ddray.evaluation.held_out import predict_nets
        from ddray.inputs.problem import to_distilled

        d = to_distilled(self.problem, synthetic_of(versions, self.problem), versions[0].step)
        return predict_nets(self.problem, d, job, ids).cpu().numpy()


class SimulatedWorker:
    """Returns a fixed, precomputed gradient shaped like the versions it is given (no data, no torch).

    The gradient for a shape is drawn once and then returned on every call, so a
    benchmark measures only the orchestration: receiving the version, shipping the
    gradient, averaging and applying it.
    """

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.cache: dict[tuple[int, ...], np.ndarray] = {}

    def _fixed(self, shape: tuple[int, ...]) -> np.ndarray:
        if shape not in self.cache:
            self.cache[shape] = (1e-3 * self.rng.standard_normal(shape)).astype(np.float32)
        return self.cache[shape]

    def compute(self, step: int, chunks: list[Chunk], versions: list[Version]) -> list[list[GradShare]]:
        return [[GradShare(v.step, c, self._fixed(v.images.shape),
                           None if v.raw_lrs is None else self._fixed(v.raw_lrs.shape), 1.0 * len(nets), len(nets))
                 for c, nets in chunks] for v in versions]


class PlainWorker:
    """A worker with no run of its own: it runs :meth:`WorkerActor.call` jobs with ``threads`` torch threads."""

    def __init__(self, threads: int) -> None:
        from ddray.threads import apply_threads

        apply_threads(max(1, threads))


WORKER_KINDS: dict[str, Callable[..., Any]] = {"meta": MetaGradWorker, "simulated": SimulatedWorker,
                                               "plain": PlainWorker}


def async_loop(worker: Any, index: int, slots: int, nets: int, pull: Callable[[], list[Version] | None],
               push: Callable[[list[list[GradShare]]], bool], offset: int = 0) -> int:
    """Async mode: pull the latest version, compute a share, push it; repeat until the run is complete.

    Each push covers ``ceil(nets / slots)`` fresh networks whose indices are unique over
    (push, slot), so no θ₀ draw is reused. ``pull`` returns None and ``push`` True once the
    parameter servers have all their meta-steps. Returns the number of pushes.
    """
    share = -(-nets // slots)
    n = offset
    while (versions := pull()) is not None:
        ids = [(n * slots + index) * nets + j for j in range(share)]
        grads = worker.compute(versions[0].step, [(0, ids)], versions)
        n += 1
        if push(grads):
            break
    return n - offset


@dataclass(frozen=True)
class InStore:
    """An object in the object store handed to an actor unresolved: the actor fetches it (:class:`WorkerActor`).

    Ray resolves a top-level reference argument itself and then warns that a restarted actor
    could find it gone; the fleet keeps the reference alive for the run, so a restarted
    worker fetches the same object again.
    """

    ref: Any


class WorkerActor:
    """Ray shell around a worker kind; ``ray.remote`` is applied in :mod:`.fleet`."""

    def __init__(self, kind: str, *args: Any) -> None:
        import ray

        from ddray.distributed.placement import reconstructed

        args = tuple(ray.get(a.ref) if isinstance(a, InStore) else a for a in args)
        self.impl = WORKER_KINDS[kind](*args)
        self.restarted = reconstructed()
        self.device = describe_device(getattr(self.impl, "device", None))  # once: ping answers every probe

    def ping(self) -> WorkerInfo:
        import ray

        return WorkerInfo(os.getpid(), ray.get_runtime_context().get_node_id(), self.restarted, self.device)

    def compute(self, step: int, chunks: list[Chunk], *versions: Version) -> Any:
        """``versions``: the shards' current versions → the chunks' GradShares for shard 0, …, shard J−1."""
        per_shard = self.impl.compute(step, chunks, list(versions))
        return per_shard[0] if len(per_shard) == 1 else tuple(per_shard)

    def data_info(self) -> dict[str, Any]:
        return self.impl.data_info()  # type: ignore[no-any-return]

    def dag_compute(self, job: tuple[int, bool], chunks: list[Chunk], *versions: Version) -> Any:
        """Compiled-graph transport: :meth:`compute` for meta-step ``job[0]``."""
        return self.compute(job[0], chunks, *versions)

    def predict(self, job: "EvalJob", ids: list[int], *versions: Version) -> np.ndarray:
        return self.impl.predict(job, ids, list(versions))  # type: ignore[no-any-return]

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` here (a job of :meth:`ddray.distributed.pool.WorkerPool.run`)."""
        return fn(*args)

    def run_async(self, servers: list[Any], index: int, slots: int, nets: int, offset: int) -> int:
        import ray

        def pull() -> list[Version] | None:
            latest = ray.get([s.pull.remote() for s in servers])
            return None if all(done for _, done in latest) else ray.get([ref for ref, _ in latest])

        def push(grads: list[list[GradShare]]) -> bool:
            return all(ray.get([s.push.remote(g) for s, g in zip(servers, grads)]))

        return async_loop(self.impl, index, slots, nets, pull, push, offset)
