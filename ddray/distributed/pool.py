"""Worker actors in slots: who is alive, joins and losses, and jobs spread over whoever is alive.

A :class:`WorkerPool` puts one actor into every placed slot (:mod:`.slots`) and keeps
a view of which ones answer. Nothing here blocks on a missing worker: an actor whose
node died is restarted by Ray once its slot is placed again (``max_restarts=-1``), and
the pool notices when it answers a probe; a slot placed late (an autoscaled node)
gets its actor then. Every join and loss is one log line. While fewer than MIN
answer, :meth:`WorkerPool.ensure` waits or stops, as the :mod:`.recovery` policy
decides. :meth:`WorkerPool.run` spreads independent jobs (evaluation chunks,
baselines, experts) over the alive workers and redoes the jobs of a worker that was
lost.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import ray
from ray.exceptions import (ActorDiedError, NodeDiedError, ObjectLostError, RayActorError, RayTaskError,
                            WorkerCrashedError)

from ddray.distributed.messages import WorkerInfo
from ddray.distributed.placement import (CapacityError, WorkerResources, alive_nodes, cluster_summary, connect,
                                        worker_resources)
from ddray.distributed.recovery import Action, Facts, RecoveryPolicy
from ddray.distributed.slots import NOTICE_AFTER_S, Slots
from ddray.distributed.worker import WorkerActor
from ddray.threads import worker_env

if TYPE_CHECKING:
    from ddray.config import ClusterConfig

log = logging.getLogger("ddray")
LOSSES = (RayActorError, ObjectLostError, NodeDiedError, WorkerCrashedError)
PROBE_EVERY_S = 1.0  # how often an absent worker is asked whether it is back

RemoteWorker = ray.remote(max_restarts=-1, max_task_retries=0)(WorkerActor)


def actor_options(resources: WorkerResources) -> dict[str, Any]:
    """A worker actor's resources, and its threads set before it imports torch (:func:`ddray.threads.worker_env`:
    OpenMP pools sized to its CPUs, idle threads asleep, the driver's CPU priority)."""
    return {"num_cpus": resources.cpus, "num_gpus": resources.gpus,
            "runtime_env": {"env_vars": worker_env(resources.threads)}}


def is_loss(error: BaseException) -> bool:
    """Whether ``error`` means a worker (or what it computed) was lost, rather than a bug in the job."""
    cause = error.cause if isinstance(error, RayTaskError) else error
    return isinstance(cause, LOSSES) or isinstance(error, LOSSES)


def cause(error: BaseException) -> str:
    """The last ``SomeError: message`` line of a Ray error (the actor's own exception), else its first line."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    found = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception"))]
    return found[-1] if found else (lines[0] if lines else type(error).__name__)


@dataclass
class Member:
    """Slot ``slot``'s actor and what the pool knows of it."""

    slot: int
    handle: Any = None
    pid: int | None = None
    node: str | None = None
    alive: bool = False
    probe: Any = None  # ref of a ping in flight
    probe_at: float = 0.0


class WorkerPool:
    """Actors made by ``make(slot, strategy)`` in the slots of ``slots``; MIN of them must be alive to work.

    Args:
        slots: where the actors go.
        make: creates slot ``i``'s actor with the given scheduling strategy.
        min_alive: MIN; :meth:`ensure` waits (up to ``timeout``) while fewer answer.
        timeout: ``--placement-timeout`` in seconds.
        what: the actors' name in log lines and errors.
        policy: decides whether to go on, wait, or stop while fewer than MIN answer.
    """

    def __init__(self, slots: Slots, make: Callable[[int, Any], Any], min_alive: int, timeout: float,
                 what: str = "worker", policy: RecoveryPolicy | None = None) -> None:
        self.slots, self.make, self.min_alive, self.timeout, self.what = slots, make, min_alive, timeout, what
        self.policy = policy or RecoveryPolicy()
        self.members = [Member(i) for i in range(slots.count)]
        self.restarts = 0
        self.on_lost: Callable[[int], None] = lambda slot: None  # the fleet forgets what the slot held

    # -- membership ----------------------------------------------------------------------------

    def alive(self) -> list[int]:
        """Slots whose actor answers, in slot order."""
        return [m.slot for m in self.members if m.alive]

    def handle(self, slot: int) -> Any:
        return self.members[slot].handle

    def poll(self) -> list[int]:
        """Bring the view up to date without blocking → slots that joined (or came back) since the last call."""
        self.slots.poll()
        for m in self.members:  # a slot placed (now or while someone else polled the slots): its actor
            if m.handle is None and self.slots.slots[m.slot].placed:
                m.handle = self.make(m.slot, self.slots.strategy(m.slot))
                m.probe, m.probe_at = m.handle.ping.remote(), time.monotonic()
        now = time.monotonic()
        for m in self.members:  # ask the absent ones again, now and then
            if m.handle is not None and not m.alive and m.probe is None and now - m.probe_at >= PROBE_EVERY_S:
                m.probe, m.probe_at = m.handle.ping.remote(), now
        probing = [m for m in self.members if m.probe is not None]
        if not probing:
            return []
        done, _ = ray.wait([m.probe for m in probing], num_returns=len(probing), timeout=0)
        joined = []
        for m in probing:
            if m.probe not in done:
                continue
            ref, m.probe = m.probe, None
            try:
                info = ray.get(ref)
            except ActorDiedError as e:  # for good: its constructor failed, or it was killed
                if "creation task" in str(e):
                    raise ValueError(f"a {self.what} could not start: {cause(e)}") from None
                m.handle = self.make(m.slot, self.slots.strategy(m.slot))
                m.probe, m.probe_at = m.handle.ping.remote(), time.monotonic()
                continue
            except RayActorError:  # restarting, or waiting for its slot to be placed again
                continue
            self._joined(m, info)
            joined.append(m.slot)
        return joined

    def _joined(self, m: Member, info: WorkerInfo) -> None:
        again = m.pid is not None
        if again and info.pid != m.pid:
            self.restarts += 1
        m.alive, m.pid, m.node = True, info.pid, info.node
        log.info("%s %d %s on node %s (pid %s, %s); %d alive", self.what, m.slot,
                 "is back" if again else "joined", str(m.node)[:8], m.pid, info.device, len(self.alive()))

    def lost(self, slot: int, error: BaseException | str) -> None:
        """Mark slot ``slot``'s actor as absent (its work is redone elsewhere) and keep probing it."""
        m = self.members[slot]
        if not m.alive:
            return
        m.alive = False
        m.probe, m.probe_at = None, 0.0
        self.on_lost(slot)
        why = error if isinstance(error, str) else type(error).__name__
        log.warning("%s %d lost (%s); %d alive, its work moves to the others", self.what, slot, why,
                    len(self.alive()))

    def drop_dead_nodes(self) -> None:
        """Mark lost the actors whose node Ray reports dead (before their next call fails)."""
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        for m in self.members:
            if m.alive and m.node is not None and m.node not in alive:
                self.lost(m.slot, "its node is gone")

    def ensure(self) -> None:
        """Return once ≥ MIN actors answer; print once what is missing; CapacityError after ``timeout``
        (the policy decides: go on, wait, or stop)."""
        self.poll()
        t0, noticed = time.monotonic(), False
        while True:
            waited = time.monotonic() - t0
            decision = self.policy.decide(self.facts(waited=waited))
            if decision.action is Action.GO_ON:
                return
            if decision.action is Action.STOP:
                raise CapacityError(f"--placement-timeout {self.timeout:g}: only {len(self.alive())} of the "
                                    f"{self.min_alive} {self.what}(s) needed answered for {self.timeout:g} s; the "
                                    f"cluster has {cluster_summary()}")
            assert decision.action is Action.WAIT, decision
            placed = len(self.slots.placed()) >= self.min_alive  # then the actors are only starting up
            if not noticed and waited >= (60.0 if placed else NOTICE_AFTER_S):
                noticed = True
                log.warning("waiting for %d more %s(s) (%d alive, MIN %d; %d slot(s) pending placement); the "
                            "cluster has %s; giving up after %g s (--placement-timeout)",
                            self.min_alive - len(self.alive()), self.what, len(self.alive()), self.min_alive,
                            self.slots.pending(), cluster_summary(), self.timeout)
            time.sleep(0.2)
            self.poll()

    def facts(self, **failure: Any) -> Facts:
        """The pool's side of a :class:`Facts` snapshot (alive, MIN, ``--placement-timeout``) with ``failure``'s."""
        return Facts(alive=len(self.alive()), min_alive=self.min_alive, timeout=self.timeout, **failure)

    def start(self) -> None:
        """Wait for MIN placed slots and MIN answering actors (the run's start)."""
        self.slots.wait(self.min_alive, self.timeout, self.what)
        self.ensure()

    # -- jobs ----------------------------------------------------------------------------------

    def run(self, jobs: list[Callable[[Any], Any]], on_result: Callable[[int, Any], None] | None = None) -> list[Any]:
        """Each job maps an actor handle to an ObjectRef; run them all on alive actors, in parallel,
        redoing those whose actor was lost; results in job order (``on_result(k, result)`` as each
        arrives). A job's own error is raised."""
        results: list[Any] = [None] * len(jobs)
        todo, pending = list(range(len(jobs))), dict[Any, tuple[int, int]]()
        while todo or pending:
            self.ensure()
            alive = self.alive()
            busy = {slot: 0 for slot in alive}
            for _, slot in pending.values():
                busy[slot] = busy.get(slot, 0) + 1
            for k in todo:  # to the least busy alive actor
                slot = min(alive, key=lambda s: (busy[s], s))
                busy[slot] += 1
                pending[jobs[k](self.handle(slot))] = (k, slot)
            todo = []
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                k, slot = pending.pop(ref)
                try:
                    results[k] = ray.get(ref)
                except Exception as e:
                    if not is_loss(e):
                        raise
                    self.lost(slot, e)
                    todo.append(k)
                    continue
                if on_result is not None:
                    on_result(k, results[k])
            self.poll()
        return results

    def shutdown(self) -> None:
        for m in self.members:
            if m.handle is not None:
                ray.kill(m.handle)
        self.slots.remove()


Mapper = Callable[..., list[Any]]  # (fn, [args, …], on_result=None) → [fn(*args), …]
Job = Callable[[Any], Any]  # an actor handle → the ObjectRef of a call on it


def call_mapper(pool: WorkerPool) -> Mapper:
    """``fn(*args)`` for each argument tuple, run on the pool's actors (:meth:`WorkerActor.call`)."""
    def mapper(fn: Callable[..., Any], jobs: list[tuple[Any, ...]],
               on_result: Callable[[int, Any], None] | None = None) -> list[Any]:
        def on(args: tuple[Any, ...]) -> Job:
            return lambda h: h.call.remote(fn, *args)

        return pool.run([on(a) for a in jobs], on_result)

    return mapper


@contextmanager
def standalone_pool(cluster: "ClusterConfig", what: str = "worker") -> Iterator[WorkerPool]:
    """A pool of plain workers for a command's jobs (evaluation, baselines, experts, pretraining):
    ``--workers`` of them with ``--cpus-per-worker``/``--gpus-per-worker`` each, on ``--address``'s
    cluster (or a local Ray), placed as a distillation's workers are; removed at the end."""
    started = connect(cluster.address)
    try:
        resources = worker_resources(cluster, alive_nodes())

        def make(slot: int, where: Any) -> Any:
            return RemoteWorker.options(**actor_options(resources), scheduling_strategy=where).remote(
                "plain", resources.threads)

        pool = WorkerPool(Slots(resources, cluster.max_workers, cluster.placement), make, cluster.min_workers,
                          cluster.placement_timeout, what)
        try:
            pool.start()
            yield pool
        finally:
            pool.shutdown()
    finally:
        if started:
            ray.shutdown()
