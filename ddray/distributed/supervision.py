"""The parameter-server shards of a run: started, watched, and brought back when lost.

:class:`Servers` owns the J shard actors. Each rides, with no resources of its own, in
the bundle of an alive worker (:mod:`.pool`; so it never lands on a head node that has
no CPUs), or takes its own bundle in a Ray Tune trial's group. A shard that dies on a
live node is restarted by Ray (``max_restarts=-1``) within seconds; one lost with its
node, or silent for :data:`SERVER_GRACE_S`, is rebuilt in another alive worker's slot.
Either way it comes back from the last checkpoint, and :meth:`Servers.restore` rolls
every shard back to it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray import ObjectRef
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

from ddray.config import Config
from ddray.distributed.messages import ServerInfo, ShardState, Version
from ddray.distributed.param_server import ParamServerActor
from ddray.distributed.placement import TrialLayout
from ddray.distributed.pool import WorkerPool
from ddray.distributed.shards import Shard
from ddray.run.state import RunState
from ddray.threads import worker_env

log = logging.getLogger("ddray")
SERVER_GRACE_S = 20.0  # a parameter server that does not answer for this long is rebuilt elsewhere (a crashed
# one on a live node is back within seconds; one whose node died would wait for Ray's health checks to say so)

RemoteParamServer = ray.remote(max_restarts=-1, max_task_retries=0)(ParamServerActor)


class Servers:
    """The parameter-server shards of one run, riding in ``pool``'s worker slots (or a trial's bundles).

    Args:
        pool: the workers whose slots the shards ride in.
        layout: the shards.
        config: the run config.
        storage: checkpoint location (local absolute path or URI).
        start: the meta-step the run starts from.
        name: the run's actor-name prefix.
        trial: a Ray Tune trial's (group, layout): the shards use its bundles.

    Attributes:
        handles: shard j's actor.
        pids: shard j's process, as last seen.
        hosts: the worker slot shard j rides in (−1: a trial's own bundle).
        restarts: shards that died and came back (or were replaced) so far.
    """

    def __init__(self, pool: WorkerPool, layout: list[Shard], config: Config, storage: str, start: int, name: str,
                 trial: tuple[Any, TrialLayout] | None = None) -> None:
        self.pool, self.layout, self.config, self.storage, self.start = pool, layout, config, storage, start
        self.name, self.trial = name, trial
        self.generation = 0
        self.handles: list[Any] = []
        self.pids: list[int] = []
        self.hosts: list[int] = []
        self.restarts = 0

    def launch(self, state: RunState) -> None:
        """Start every shard on its slice of ``state`` and wait until they answer (RayActorError if one cannot)."""
        self.handles = [self._server(j) for j in range(len(self.layout))]
        full = ray.put(state)  # once; each shard takes its slice
        ray.get([s.load.remote(full) for s in self.handles])
        self.pids = [i.pid for i in self.infos()]

    def _server(self, j: int, restore: bool = False, avoid: set[int] | None = None) -> Any:
        """Shard ``j`` in a Tune trial's own bundle, else riding (0 CPUs) in an alive worker's slot."""
        self.generation += 1
        if self.trial is not None:
            group, layout = self.trial
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            host, cpus = -1, layout.ps_cpus
            where = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=layout.ps_bundle(j))
        else:
            alive = [w for w in self.pool.alive() if w not in (avoid or set())] or self.pool.alive()
            host, cpus = alive[j % len(alive)], 0.0
            where = self.pool.slots.strategy(host)
        if j < len(self.hosts):
            self.hosts[j] = host
        else:
            self.hosts.append(host)
        return RemoteParamServer.options(num_cpus=cpus, name=f"{self.name}/ps-{j}.{self.generation}",
                                         runtime_env={"env_vars": worker_env(1)},  # one thread
                                         scheduling_strategy=where).remote(
            self.layout[j], self.storage, self.config, self.start, restore)

    # -- loss and repair -------------------------------------------------------------------------

    def lost(self) -> bool:
        """True if a shard died; it is back (restored from the last checkpoint) on return.

        A shard whose node is gone, or that does not answer within :data:`SERVER_GRACE_S`,
        is replaced in the slot of an alive worker (from the last checkpoint, like a restart).
        """
        lost = False
        for j in range(len(self.handles)):
            info = self._info(j)
            replaced = info is None
            if info is None:
                info = self._replace(j)
            if info.pid != self.pids[j]:
                self.pids[j], lost = info.pid, True
                self.restarts += 1
                if not replaced:
                    log.warning("parameter-server shard %d died; back (pid %s) from the last checkpoint", j,
                                info.pid)
        return lost

    def _replace(self, j: int) -> ServerInfo:
        """Rebuild shard ``j`` (from the last checkpoint) in an alive worker's slot → its info once it answers.

        Ray may not yet know that a node is gone, so a slot that looks alive can be on it: a
        replacement that does not answer within :data:`SERVER_GRACE_S` is moved to the next worker.
        """
        tried: set[int] = set()
        for _ in range(2 * len(self.pool.members) + 1):
            self.pool.drop_dead_nodes()
            self.pool.ensure()
            ray.kill(self.handles[j], no_restart=True)
            if set(self.pool.alive()) <= tried:
                tried.clear()  # every alive slot was tried once: they may have settled since
            self.handles[j] = self._server(j, restore=True, avoid=tried)
            log.warning("parameter-server shard %d lost (its node is gone, or it did not answer for %g s); "
                        "rebuilt in worker %d's slot", j, SERVER_GRACE_S, self.hosts[j])
            info = self._info(j)
            if info is not None:
                return info
            tried.add(self.hosts[j])
        raise RuntimeError(f"parameter-server shard {j} could not be rebuilt in any worker's slot")

    def _info(self, j: int) -> ServerInfo | None:
        """Shard ``j``'s info once it answers; None if it is gone (dead, its node gone, or silent too long)."""
        deadline = time.monotonic() + SERVER_GRACE_S
        host = self.hosts[j]
        while time.monotonic() < deadline:
            try:
                return ray.get(self.handles[j].info.remote(),  # type: ignore[no-any-return]
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
        versions, steps = zip(*[s.restore.options(num_returns=2).remote() for s in self.handles])
        found = set(ray.get(list(steps)))
        if len(found) != 1:
            raise RuntimeError(f"parameter-server shards restored to different steps {sorted(found)}")
        step = found.pop()
        log.warning("parameter servers rolled back to the checkpoint of meta-step %d; continuing from there", step)
        return step, list(versions)

    # -- what they hold ------------------------------------------------------------------------

    def infos(self) -> list[ServerInfo]:
        """Every shard's info (waits for them to answer)."""
        return ray.get([s.info.remote() for s in self.handles])  # type: ignore[no-any-return]

    def versions(self) -> list[ObjectRef[Version]]:
        """Per shard, a ref of the current version."""
        return [s.latest.remote() for s in self.handles]

    def checkpoint(self, expected_step: int | None) -> ObjectRef[str | None]:
        """Shard 0 writes all shards' state (queued behind their pending updates)."""
        return self.handles[0].checkpoint.remote(expected_step, *[s.state.remote() for s in self.handles[1:]])

    def states(self) -> list[ShardState]:
        """Every shard's state (waits for their pending updates)."""
        return ray.get([s.state.remote() for s in self.handles])  # type: ignore[no-any-return]

    def shutdown(self) -> None:
        for s in self.handles:
            ray.kill(s)
