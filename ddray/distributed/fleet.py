"""The actors of one run — elastic workers and parameter-server shards — and how to keep them working.

A :class:`Fleet` has MAX worker slots (:mod:`.slots`) with a worker actor in each
placed one (:mod:`.pool`), and J parameter-server shards riding, with no resources
of their own, in the bundles of alive workers (so they never land on a head node
that has no CPUs). A synchronous meta-step (a :class:`Round`) hands the step's chunks
(:mod:`ddray.core.net_chunks`) to the workers alive at that moment, in contiguous runs, and
never fetches a gradient on the driver. When a worker is lost, the chunks it held
are recomputed by the others (the ones that finished are kept); a worker that joins
takes chunks from the next meta-step on. A parameter server that died — restarted
by Ray, or lost with its node and replaced on another — restores the last
checkpoint, and all shards roll back to it.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import ray
from ray import ObjectRef
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

from ddray.config import Config
from ddray.core.net_chunks import assign, net_chunks
from ddray.distributed.messages import GradShare, ServerInfo, StepStats, Version, merge_states
from ddray.distributed.param_server import ParamServerActor
from ddray.distributed.placement import TrialLayout, WorkerResources
from ddray.distributed.pool import Job, RemoteWorker, WorkerPool, actor_options, cause, is_loss
from ddray.distributed.shards import Shard
from ddray.distributed.slots import Slots
from ddray.distributed.worker import InStore
from ddray.run.state import RunState
from ddray.threads import worker_env

log = logging.getLogger("ddray")
RECOVERY_TIMEOUT_S = 300.0  # a worker's share of a failed round has this long to finish
SERVER_GRACE_S = 20.0  # a parameter server that does not answer for this long is rebuilt elsewhere (a crashed
# one on a live node is back within seconds; one whose node died would wait for Ray's health checks to say so)

RemoteParamServer = ray.remote(max_restarts=-1, max_task_retries=0)(ParamServerActor)


@dataclass
class Share:
    """One worker's part of a meta-step: its chunks and the refs of their GradShares for shard 0, 1, …"""

    worker: int
    chunks: list[int]
    refs: list[ObjectRef[list[GradShare]]]  # per shard


@dataclass
class Round:
    """The tasks of one synchronous meta-step ``step`` (0-based)."""

    step: int
    inputs: list[ObjectRef[Version]]  # per shard: the version the shares read
    shares: list[Share]
    outputs: list[ObjectRef[Version]] = field(default_factory=list)  # per shard: the next version
    stats: list[ObjectRef[StepStats]] = field(default_factory=list)
    checkpoint: ObjectRef[str | None] | None = None


class Fleet:
    """Elastic workers + parameter-server shards of one run.

    Args:
        config: the run config (its ``cluster`` section sizes the fleet).
        layout: the parameter-server shards.
        state: the run state to start from.
        storage: checkpoint location (local absolute path or URI).
        resources: one worker's reservation.
        trial: a Ray Tune trial's (group, layout): the workers and servers use its bundles.
        kind: ``"meta"`` (real meta-gradients) or ``"simulated"`` (benchmarks).
        data: the real data set in the object store (``ray.put`` of :meth:`ddray.data.Dataset.to_shared`): every
            worker maps its node's one copy instead of loading its own; None: each worker loads the data itself.
    """

    def __init__(self, config: Config, layout: list[Shard], state: RunState, storage: str,
                 resources: WorkerResources, trial: tuple[Any, TrialLayout] | None = None, kind: str = "meta",
                 data: Any = None) -> None:
        c = config.cluster
        self.config, self.layout, self.storage, self.resources, self.kind = config, layout, storage, resources, kind
        self.data = data
        self.trial = trial
        self.name = f"ddray-{uuid.uuid4().hex[:8]}"
        self.generation = 0
        # lets go of the actors when something holds them exclusively (a compiled graph: distributed/compiled.py)
        self.holder: Callable[[], None] | None = None
        self.loop_starts: dict[int, int] = {}
        self.chunks = net_chunks(config.distill.nets, c.max_workers)
        self.served: set[int] = set()  # workers that have been handed chunks since they (re)joined
        self.start = state.step
        count = trial[1].workers if trial else c.max_workers
        slots = Slots(resources, count, c.placement, (trial[0], trial[1].first_worker_bundle) if trial else None)
        self.pool = WorkerPool(slots, self._worker, min(c.min_workers, count), c.placement_timeout)
        self.pool.on_lost = self.served.discard
        self.servers: list[Any] = []
        self.server_pids: list[int] = []
        self.server_hosts: list[int] = []
        self.server_restarts = 0
        try:
            self.pool.start()  # MIN workers placed and answering, or CapacityError
            self.servers = [self._server(j) for j in range(len(layout))]
            full = ray.put(state)  # once; each shard takes its slice
            ray.get([s.load.remote(full) for s in self.servers])
            self.server_pids = [i.pid for i in ray.get([s.info.remote() for s in self.servers])]
        except BaseException as e:
            self.shutdown()
            if isinstance(e, RayActorError):
                raise ValueError(f"a parameter server could not start: {cause(e)}") from None
            raise
        if len(self.chunks) < c.max_workers:
            log.warning("--nets %d < --workers %s: at most %d worker(s) have work", config.distill.nets,
                        c.workers, len(self.chunks))

    # -- actors -------------------------------------------------------------------------------

    @property
    def restarts(self) -> int:
        """Workers and parameter servers that died and came back (or were replaced) so far."""
        return self.pool.restarts + self.server_restarts

    def alive(self) -> list[int]:
        return self.pool.alive()

    def _worker(self, slot: int, strategy: Any) -> Any:
        self.generation += 1
        data = None if self.data is None else InStore(self.data)
        args = ((self.config, slot, self.resources.threads, self.layout, self.resources.device, data)
                if self.kind == "meta" else ())
        return RemoteWorker.options(**actor_options(self.resources), name=f"{self.name}/worker-{slot}.{self.generation}",
                                    scheduling_strategy=strategy).remote(self.kind, *args)

    def _server(self, j: int, restore: bool = False, avoid: set[int] | None = None) -> Any:
        """Shard ``j`` in a Tune trial's own bundle, else riding (0 CPUs) in an alive worker's slot."""
        self.generation += 1
        if self.trial is not None:
            group, layout = self.trial
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            host, cpus = -1, layout.ps_cpus
            where = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=layout.ps_bundle(j))
        else:
            alive = [w for w in self.alive() if w not in (avoid or set())] or self.alive()
            host, cpus = alive[j % len(alive)], 0.0
            where = self.pool.slots.strategy(host)
        if j < len(self.server_hosts):
            self.server_hosts[j] = host
        else:
            self.server_hosts.append(host)
        return RemoteParamServer.options(num_cpus=cpus, name=f"{self.name}/ps-{j}.{self.generation}",
                                         runtime_env={"env_vars": worker_env(1)},  # one thread, asleep when idle
                                         scheduling_strategy=where).remote(
            self.layout[j], self.storage, self.config, self.start, restore)

    def servers_lost(self) -> bool:
        """True if a parameter-server shard died; it is back (restored from the last checkpoint) on return.

        A shard whose node is gone, or that does not answer within :data:`SERVER_GRACE_S`,
        is replaced in the slot of an alive worker (from the last checkpoint, like a restart).
        """
        lost = False
        for j, s in enumerate(self.servers):
            info = self._server_info(j)
            replaced = info is None
            if info is None:
                info = self._replace_server(j)
            if info.pid != self.server_pids[j]:
                self.server_pids[j], lost = info.pid, True
                self.server_restarts += 1
                if not replaced:
                    log.warning("parameter-server shard %d died; back (pid %s) from the last checkpoint", j,
                                info.pid)
        return lost

    def _replace_server(self, j: int) -> ServerInfo:
        """Rebuild shard ``j`` (from the last checkpoint) in an alive worker's slot → its info once it answers.

        Ray may not yet know that a node is gone, so a slot that looks alive can be on it: a
        replacement that does not answer within :data:`SERVER_GRACE_S` is moved to the next worker.
        """
        tried: set[int] = set()
        for _ in range(2 * len(self.pool.members) + 1):
            self.pool.drop_dead_nodes()
            self.pool.ensure()
            ray.kill(self.servers[j], no_restart=True)
            if set(self.alive()) <= tried:
                tried.clear()  # every alive slot was tried once: they may have settled since
            self.servers[j] = self._server(j, restore=True, avoid=tried)
            log.warning("parameter-server shard %d lost (its node is gone, or it did not answer for %g s); "
                        "rebuilt in worker %d's slot", j, SERVER_GRACE_S, self.server_hosts[j])
            info = self._server_info(j)
            if info is not None:
                return info
            tried.add(self.server_hosts[j])
        raise RuntimeError(f"parameter-server shard {j} could not be rebuilt in any worker's slot")

    def _server_info(self, j: int) -> ServerInfo | None:
        """Shard ``j``'s info once it answers; None if it is gone (dead, its node gone, or silent too long)."""
        deadline = time.monotonic() + SERVER_GRACE_S
        host = self.server_hosts[j]
        while time.monotonic() < deadline:
            try:
                return ray.get(self.servers[j].info.remote(),  # type: ignore[no-any-return]
                               timeout=max(0.1, deadline - time.monotonic()))
            except ActorDiedError:
                return None
            except (RayActorError, GetTimeoutError):  # restarting, or waiting for its bundle
                if host >= 0 and self.pool.slots.node(host) is None:
                    return None  # its slot lost its node: no restart until capacity comes back
                time.sleep(0.2)
        return None

    def restore(self) -> tuple[int, list[ObjectRef[Version]]]:
        """Roll every shard back to the newest valid checkpoint → (step, version refs)."""
        versions, steps = zip(*[s.restore.options(num_returns=2).remote() for s in self.servers])
        found = set(ray.get(list(steps)))
        if len(found) != 1:
            raise RuntimeError(f"parameter-server shards restored to different steps {sorted(found)}")
        step = found.pop()
        log.warning("parameter servers rolled back to the checkpoint of meta-step %d; continuing from there", step)
        return step, list(versions)

    def versions(self) -> list[ObjectRef[Version]]:
        """Per shard, a ref of the current version."""
        return [s.latest.remote() for s in self.servers]

    # -- synchronous rounds ------------------------------------------------------------------

    def submit(self, step: int, inputs: list[ObjectRef[Version]], checkpoint: bool,
               reuse: list[Share] | None = None) -> Round:
        """Submit meta-step ``step``: chunks over the alive workers → per-shard apply (→ checkpoint).

        ``reuse``: shares of an earlier attempt that finished; only the other chunks are
        handed out. Nothing is fetched.
        """
        n = len(self.layout)
        kept = list(reuse or [])
        done = {c for sh in kept for c in sh.chunks}
        todo = [c for c in range(len(self.chunks)) if c not in done]
        shares = list(kept)
        for w, idx in assign(len(todo), self.alive()).items():
            cs = [todo[i] for i in idx]
            if w not in self.served:  # the first work of a worker that joined (for measurements)
                self.served.add(w)
                log.debug("worker %d: first chunks %s of meta-step %d", w, cs, step)
            refs = self.pool.handle(w).compute.options(num_returns=n).remote(
                step, [(c, self.chunks[c]) for c in cs], *inputs)
            shares.append(Share(w, cs, [refs] if n == 1 else list(refs)))
        r = Round(step, inputs, shares)
        for j, s in enumerate(self.servers):
            out, stats = s.apply.options(num_returns=2).remote([sh.refs[j] for sh in shares])
            r.outputs.append(out)
            r.stats.append(stats)
        if checkpoint:
            r.checkpoint = self.checkpoint(step + 1)
        return r

    def checkpoint(self, expected_step: int | None) -> ObjectRef[str | None]:
        """Shard 0 writes all shards' state (queued behind their pending updates)."""
        return self.servers[0].checkpoint.remote(expected_step, *[s.state.remote() for s in self.servers[1:]])

    def finished_shares(self, r: Round) -> list[Share]:
        """The shares of ``r`` that computed their chunks; the workers of the others are marked lost.

        Raises a share's error when it is not a loss (a bug in the objective, bad data).
        """
        refs = [ref for sh in r.shares for ref in sh.refs]
        ray.wait(refs, num_returns=len(refs), timeout=RECOVERY_TIMEOUT_S)
        ok = []
        for sh in r.shares:
            try:
                ray.get(sh.refs, timeout=0)
                ok.append(sh)
            except Exception as e:
                if not is_loss(e) and not isinstance(e, GetTimeoutError):
                    raise
                self.pool.lost(sh.worker, e if not isinstance(e, GetTimeoutError) else "no answer")
        return ok

    # -- async mode ----------------------------------------------------------------------------

    def start_loop(self, slot: int) -> ObjectRef[int]:
        """Async mode: worker ``slot``'s pull–compute–push loop (fresh net indices after each start)."""
        self.loop_starts[slot] = self.loop_starts.get(slot, -1) + 1
        return self.pool.handle(slot).run_async.remote(self.servers, slot, self.pool.slots.count,
                                                       self.config.distill.nets, self.loop_starts[slot] * 1_000_000)

    # -- evaluation and other jobs on the workers -----------------------------------------------

    def predict(self, job: Any, chunks: list[list[int]],
                versions: list[ObjectRef[Version]] | None = None) -> list[Any]:
        """Evaluation chunks on the alive workers, on ``versions`` (default: the servers' current ones)."""
        import torch

        refs = versions or self.versions()
        def on(ids: list[int]) -> Job:
            return lambda h: h.predict.remote(job, ids, *refs)

        preds = self.pool.run([on(ids) for ids in chunks])
        return [torch.from_numpy(np.array(p)) for p in preds]  # writable copies

    def state(self) -> RunState:
        """The servers' current state, merged (a compiled graph holding the actors lets them go first)."""
        self.release()
        return merge_states(ray.get([s.state.remote() for s in self.servers]), self.config)

    def release(self) -> None:
        """Make the actors take ordinary calls again: whoever holds them (:attr:`holder`) lets them go."""
        if self.holder is not None:
            self.holder()

    def shutdown(self) -> None:
        self.release()
        for s in self.servers:
            ray.kill(s)
        self.pool.shutdown()
