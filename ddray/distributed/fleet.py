"""The actors of one run — workers and parameter-server shards — and how to keep them alive.

A :class:`Fleet` creates them in one placement group, submits the tasks of a
synchronous meta-step (a :class:`Round`) without ever fetching a gradient on the
driver, and repairs itself after a loss: a worker that Ray restarted (or that had
to be replaced) recomputes its share of the meta-step; a parameter server that
died is restarted from the last checkpoint and all shards roll back to it.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ddray.config import Config
from ddray.distributed.param_server import ParamServerActor, merge_states
from ddray.distributed.shards import Shard
from ddray.distributed.placement import Plan, create_group
from ddray.distributed.worker import WorkerActor, split_nets
from ddray.methods import optimizer_options
from ddray.threads import worker_env

log = logging.getLogger("ddray.distributed")
MAX_RESTARTS = 3  # by Ray, per actor; after that the fleet replaces the actor
RECOVERY_TIMEOUT_S = 300.0

RemoteWorker = ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=0)(WorkerActor)
RemoteParamServer = ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=0)(ParamServerActor)


@dataclass
class Share:
    """One worker's part of a meta-step: its nets and the refs of its gradient for shard 0, 1, …"""

    worker: int
    nets: list[int]
    refs: list[Any]


@dataclass
class Round:
    """The tasks of one synchronous meta-step ``step`` (0-based)."""

    step: int
    inputs: list[Any]  # per shard: ref of the version the shares read
    shares: list[Share]
    outputs: list[Any] = field(default_factory=list)  # per shard: ref of the next version
    stats: list[Any] = field(default_factory=list)
    checkpoint: Any = None


class Fleet:
    """Workers + parameter-server shards of one run in one placement group.

    Args:
        config: the run config as a dict.
        layout: the parameter-server shards.
        state: the full checkpoint-format state to start from (step included).
        storage: checkpoint location (local absolute path or URI).
        plan: resources (see :func:`placement.plan_resources`).
        worker_args: constructor args of each worker after (kind, …); ``index`` and
            ``threads`` are filled in for ``kind="meta"``.
        kind: ``"meta"`` (real meta-gradients) or ``"simulated"`` (benchmarks).
        workers: already running worker actors to use instead of creating them
            (benchmarks reuse one pool; the fleet does not kill them).
        group: an existing placement group laid out as ``plan`` says (a Ray Tune
            trial's); by default the fleet creates (and removes) its own.
    """

    def __init__(self, config: dict[str, Any], layout: list[Shard], state: dict[str, Any], storage: str,
                 plan: Plan, kind: str = "meta", worker_args: tuple[Any, ...] = (),
                 workers: list[Any] | None = None, group: Any = None) -> None:
        d = config["distill"]
        self.config, self.layout, self.storage, self.plan, self.kind = config, layout, storage, plan, kind
        self.worker_args = worker_args
        distill = Config.from_dict(config).distill
        self.settings = {"lr": distill.outer_lr, "lr_decay": d["lr_decay"], "lr_decay_every": d["lr_decay_every"],
                         "epochs": distill.layout[1], "nets": d["nets"], "iterations": d["iterations"],
                         "max_staleness": config["cluster"]["max_staleness"], **optimizer_options(distill)}
        self.name = f"ddray-{uuid.uuid4().hex[:8]}"
        self.restarts, self.generation = 0, 0
        self.graph: Any = None  # the compiled meta-step of DDRAY_TRANSPORT=compiled, while in use
        self.loop_starts: dict[int, int] = {}
        n_workers = len(workers) if workers is not None else len(plan.worker_cpus)
        self.shares = [(w, nets) for w, nets in enumerate(split_nets(d["nets"], n_workers)) if nets]
        self.own_pg = group is None
        self.pg = create_group(plan) if group is None else group
        self.start = int(state["step"])
        self.servers = [self._server(j) for j in range(len(layout))]
        self.own_workers = workers is None
        self.workers = list(workers) if workers is not None else [self._worker(i) for i in range(n_workers)]
        try:
            full = ray.put(state)  # once; each shard takes its slice
            ray.get([s.load.remote(full) for s in self.servers])
            self.server_pids = [i["pid"] for i in ray.get([s.info.remote() for s in self.servers])]
            self.worker_pids = [i["pid"] for i in ray.get([w.ping.remote() for w in self.workers])]
        except RayActorError as e:
            self.shutdown()
            raise ValueError(f"a worker or parameter server could not start: {_cause(e)}") from None
        if len(self.shares) < len(self.workers):
            log.warning("--nets %d < --workers %d: %d worker(s) stay idle", d["nets"], len(self.workers),
                        len(self.workers) - len(self.shares))
        self.alive = set(range(len(self.workers)))

    # -- actors -------------------------------------------------------------------------------

    def _where(self, bundle: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=bundle)

    def _server(self, j: int) -> Any:
        self.generation += 1
        return RemoteParamServer.options(
            num_cpus=self.plan.ps_cpus, name=f"{self.name}/ps-{j}.{self.generation}",
            scheduling_strategy=self._where(self.plan.ps_bundle(j)),
        ).remote(self.layout[j], self.settings, self.storage, self.config, self.start)

    def _worker(self, i: int) -> Any:
        self.generation += 1
        args = ((self.config, i, self.plan.threads(i), self.layout, self.plan.device) if self.kind == "meta"
                else self.worker_args)
        return RemoteWorker.options(
            num_cpus=self.plan.worker_cpus[i], num_gpus=self.plan.worker_gpus,
            name=f"{self.name}/worker-{i}.{self.generation}",
            scheduling_strategy=self._where(self.plan.worker_bundle(i)),
            runtime_env={"env_vars": worker_env(self.plan.threads(i))},  # ddray/threads.py: no spinning
        ).remote(self.kind, *args)

    def _ping(self, handle: Any, method: str = "ping") -> dict[str, Any] | None:
        """The actor's info once it answers (waiting through a Ray restart); None if it is dead."""
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                return ray.get(getattr(handle, method).remote(), timeout=max(1.0, deadline - time.monotonic()))
            except ActorUnavailableError:  # being restarted by Ray
                time.sleep(0.2)
            except (ActorDiedError, RayActorError, GetTimeoutError):
                return None
        return None

    def ensure_worker(self, i: int, why: str) -> bool:
        """Make sure worker ``i`` is up: wait through a Ray restart, or replace a dead one.

        Returns True (and logs and counts a restart) if it had died, False if it is the
        same process as before.
        """
        self.alive.discard(i)
        info = self._ping(self.workers[i])
        if info is None:
            self.workers[i] = self._worker(i)
            info = self._ping(self.workers[i])
            if info is None:
                raise RuntimeError(f"worker {i} could not be replaced")
            what = "replaced by a new actor"
        else:
            what = "restarted by Ray"
        self.alive.add(i)
        if info["pid"] == self.worker_pids[i]:
            return False
        self.worker_pids[i] = info["pid"]
        self.restarts += 1
        log.warning("worker %d died (%s); %s (pid %s); its share is recomputed", i, why, what, info["pid"])
        return True

    def servers_lost(self) -> bool:
        """True if a parameter-server shard died (restarted by Ray, or replaced here)."""
        lost = False
        for j, s in enumerate(self.servers):
            info = self._ping(s, "info")
            if info is None:
                self.servers[j] = self._server(j)
                info = self._ping(self.servers[j], "info")
                if info is None:
                    raise RuntimeError(f"parameter-server shard {j} could not be replaced")
            if info["pid"] != self.server_pids[j]:
                self.server_pids[j], lost = info["pid"], True
                self.restarts += 1
                log.warning("parameter-server shard %d died; restarted (pid %s)", j, info["pid"])
        return lost

    def restore(self) -> tuple[int, list[Any]]:
        """Roll every shard back to the newest valid checkpoint → (step, version refs)."""
        versions, steps = zip(*[s.restore.options(num_returns=2).remote() for s in self.servers])
        found = set(ray.get(list(steps)))
        if len(found) != 1:
            raise RuntimeError(f"parameter-server shards restored to different steps {sorted(found)}")
        step = found.pop()
        log.warning("parameter servers rolled back to the checkpoint of meta-step %d; continuing from there", step)
        return step, list(versions)

    def versions(self) -> list[Any]:
        """Per shard, a ref of the current version."""
        return [s.latest.remote() for s in self.servers]

    # -- synchronous rounds ------------------------------------------------------------------

    def submit(self, step: int, inputs: list[Any], checkpoint: bool, reuse: dict[int, Share] | None = None) -> Round:
        """Submit meta-step ``step``: shares → per-shard apply (→ checkpoint). Nothing is fetched."""
        n = len(self.layout)

        def share(w: int, nets: list[int]) -> Share:
            refs = self.workers[w].compute.options(num_returns=n).remote(step, nets, *inputs)
            return Share(w, nets, [refs] if n == 1 else list(refs))

        shares = [reuse[k] if reuse and k in reuse else share(w, nets) for k, (w, nets) in enumerate(self.shares)]
        r = Round(step, inputs, shares)
        for j, s in enumerate(self.servers):
            out, stats = s.apply.options(num_returns=2).remote([sh.refs[j] for sh in shares])
            r.outputs.append(out)
            r.stats.append(stats)
        if checkpoint:
            r.checkpoint = self.checkpoint(step + 1)
        return r

    def checkpoint(self, expected_step: int | None) -> Any:
        """Shard 0 writes all shards' state (queued behind their pending updates)."""
        return self.servers[0].checkpoint.remote(expected_step, *[s.state.remote() for s in self.servers[1:]])

    def failed_shares(self, r: Round, error: Exception) -> list[int]:
        """Indices of the shares of ``r`` lost with their worker; the workers are back when this returns.

        A share is lost when its worker died (Ray restarted it, or it was replaced);
        for an actor error with no dead worker (e.g. a dropped connection) all shares
        are redone. An empty list means the error is not an actor loss.
        """
        restarted = {w for w in {sh.worker for sh in r.shares} if self.ensure_worker(w, type(error).__name__)}
        if not restarted and isinstance(error, RayActorError):
            return list(range(len(r.shares)))
        return [k for k, sh in enumerate(r.shares) if sh.worker in restarted]

    def start_loop(self, i: int) -> Any:
        """Async mode: worker ``i``'s pull–compute–push loop (fresh net indices after each start)."""
        self.loop_starts[i] = self.loop_starts.get(i, -1) + 1
        return self.workers[i].run_async.remote(self.servers, i, len(self.workers), self.settings["nets"],
                                                self.loop_starts[i] * 1_000_000)

    def final_state(self) -> dict[str, Any]:
        if self.graph is not None:
            from ddray.distributed.compiled import teardown

            teardown(self)
        return merge_states(ray.get([s.state.remote() for s in self.servers]))

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if getattr(self, "graph", None) is not None:
            from ddray.distributed.compiled import teardown

            teardown(self)

        for a in [*(getattr(self, "workers", []) if getattr(self, "own_workers", True) else []),
                  *getattr(self, "servers", [])]:
            ray.kill(a)
        if getattr(self, "own_pg", False):
            remove_placement_group(self.pg)


def _cause(error: Exception) -> str:
    """The last ``SomeError: message`` line of a Ray error (the actor's own exception), else its first line."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    found = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception"))]
    return found[-1] if found else lines[0]
