"""The actors of one run — elastic workers and parameter-server shards — and the work handed to them.

A :class:`Fleet` has MAX worker slots (:mod:`.slots`) with a worker actor in each
placed one (:mod:`.pool`), and J parameter-server shards (:mod:`.supervision`, which
also brings a lost shard back). A synchronous meta-step (a :class:`Round`) hands the
step's chunks (:mod:`ddray.core.net_chunks`) to the workers alive at that moment, in contiguous
runs, and never fetches a gradient on the driver. When a meta-step fails, the fleet
gathers the facts and its :class:`~.recovery.RecoveryPolicy` decides: the chunks a lost
worker held are recomputed by the others (the ones that finished are kept); a shard
that died rolls all shards back to the last checkpoint; below MIN the fleet waits for
capacity, then stops. A worker that joins takes chunks from the next meta-step on.
The loops (:mod:`.driver`, :mod:`.compiled`) talk to the fleet only, never to its pool
or servers.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, cast

import numpy as np
import ray
from ray import ObjectRef
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from ddray.config import Config
from ddray.core.net_chunks import assign, net_chunks
from ddray.distributed.messages import GradShare, StepStats, Version, merge_states
from ddray.distributed.placement import TrialLayout, WorkerResources
from ddray.distributed.pool import Job, Mapper, RemoteWorker, WorkerPool, actor_options, call_mapper, cause, is_loss
from ddray.distributed.recovery import Decision, RecoveryPolicy
from ddray.distributed.shards import Shard
from ddray.distributed.slots import Slots
from ddray.distributed.supervision import Servers
from ddray.distributed.worker import InStore
from ddray.run.state import RunState

log = logging.getLogger("ddray")
RECOVERY_TIMEOUT_S = 300.0  # a worker's share of a failed round has this long to finish


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
        policy: decides what a failure or a shortage of workers leads to (:mod:`.recovery`).
    """

    def __init__(self, config: Config, layout: list[Shard], state: RunState, storage: str,
                 resources: WorkerResources, trial: tuple[Any, TrialLayout] | None = None, kind: str = "meta",
                 data: Any = None, policy: RecoveryPolicy | None = None) -> None:
        c = config.cluster
        self.config, self.layout, self.storage, self.resources, self.kind = config, layout, storage, resources, kind
        self.data = data
        self.trial = trial
        self.policy = policy or RecoveryPolicy()
        self.name = f"ddray-{uuid.uuid4().hex[:8]}"
        self.generation = 0
        # lets go of the actors when something holds them exclusively (a compiled graph: distributed/compiled.py)
        self.holder: Callable[[], None] | None = None
        self.loop_starts: dict[int, int] = {}
        self.chunks = net_chunks(config.distill.nets, c.max_workers)
        self.served: set[int] = set()  # workers that have been handed chunks since they (re)joined
        count = trial[1].workers if trial else c.max_workers
        slots = Slots(resources, count, c.placement, (trial[0], trial[1].first_worker_bundle) if trial else None)
        self.pool = WorkerPool(slots, self._worker, min(c.min_workers, count), c.placement_timeout,
                               policy=self.policy)
        self.pool.on_lost = self.served.discard
        self.servers = Servers(self.pool, layout, config, storage, state.step, self.name, trial)
        try:
            self.pool.start()  # MIN workers placed and answering, or CapacityError
            self.servers.launch(state)
        except BaseException as e:
            self.shutdown()
            if isinstance(e, RayActorError):
                raise ValueError(f"a parameter server could not start: {cause(e)}") from None
            raise
        if len(self.chunks) < c.max_workers:
            log.warning("--nets %d < --workers %s: at most %d worker(s) have work", config.distill.nets,
                        c.workers, len(self.chunks))

    # -- workers -------------------------------------------------------------------------------

    @property
    def restarts(self) -> int:
        """Workers and parameter servers that died and came back (or were replaced) so far."""
        return self.pool.restarts + self.servers.restarts

    def alive(self) -> list[int]:
        """The worker slots whose actor answers, in slot order."""
        return self.pool.alive()

    def poll_joins(self) -> list[int]:
        """Follow joins and losses without blocking → the workers that joined (or came back) since the last call."""
        return self.pool.poll()

    def ensure_capacity(self) -> None:
        """Return once MIN workers answer; below MIN wait for capacity (CapacityError at ``--placement-timeout``)."""
        self.pool.ensure()

    def lose_worker(self, slot: int, error: BaseException | str) -> None:
        """Mark worker ``slot`` lost (one log line); its work moves to the others, and it is probed until it is back."""
        self.pool.lost(slot, error)

    def worker_handle(self, slot: int) -> Any:
        """Worker ``slot``'s actor."""
        return self.pool.handle(slot)

    def answers(self, slot: int) -> bool:
        """Whether worker ``slot`` answers now as the same process (one that Ray restarted meanwhile answers from
        a new process and has lost what it held)."""
        try:
            info = ray.get(self.worker_handle(slot).ping.remote(), timeout=30)
        except (RayError, GetTimeoutError):
            return False
        known = self.pool.members[slot].pid
        return known is None or info.pid == known

    def mapper(self) -> Mapper:
        """``fn(*args)`` for each argument tuple, spread over the alive workers (evaluation, baselines)."""
        return call_mapper(self.pool)

    def _worker(self, slot: int, strategy: Any) -> Any:
        self.generation += 1
        data = None if self.data is None else InStore(self.data)
        args = ((self.config, slot, self.resources.threads, self.layout, self.resources.device, data)
                if self.kind == "meta" else ())
        return RemoteWorker.options(**actor_options(self.resources), name=f"{self.name}/worker-{slot}.{self.generation}",
                                    scheduling_strategy=strategy).remote(self.kind, *args)

    # -- parameter servers ---------------------------------------------------------------------

    def single_server(self, needed_by: str) -> Any:
        """The parameter server's actor, when there is one shard (ValueError naming ``needed_by`` otherwise)."""
        if len(self.servers.handles) != 1:
            raise ValueError(f"{needed_by} needs --shards 1; this run has {len(self.servers.handles)} shards")
        return self.servers.handles[0]

    def server_steps(self) -> list[int]:
        """Per shard, the meta-steps it has applied."""
        steps = [info.step for info in self.servers.infos()]
        assert None not in steps, "every shard took a state at launch"
        return cast("list[int]", steps)

    def drain(self) -> list[StepStats]:
        """Async mode: the statistics of the updates applied since the last call (RayActorError if a shard is lost)."""
        return ray.get(self.servers.handles[0].drain.remote())  # type: ignore[no-any-return]

    def restore(self) -> tuple[int, list[ObjectRef[Version]]]:
        """Roll every shard back to the newest valid checkpoint → (step, version refs)."""
        return self.servers.restore()

    def versions(self) -> list[ObjectRef[Version]]:
        """Per shard, a ref of the current version."""
        return self.servers.versions()

    # -- recovery ------------------------------------------------------------------------------

    def recover(self, recoveries: int = 1, loss: bool = True, lose: Callable[[], int] = lambda: 0) -> Decision:
        """What to do after a failure, decided by the policy on facts gathered in its order of precedence.

        First the retry budget (``recoveries`` in a row without progress, this one included;
        async mode counts none in a row), then the servers (a lost shard is back when this
        returns: on RESTART the caller rolls back), then the workers: ``lose()`` marks the
        lost ones and says how many; ``loss``: whether the failure's error says an actor was
        lost. Facts of lower precedence are not gathered once the decision is final (giving
        up waits for nothing).
        """
        facts = self.pool.facts(recoveries=recoveries)
        decision = self.policy.decide(facts)
        if not decision.final:
            facts = replace(facts, servers_lost=self.servers.lost())
            decision = self.policy.decide(facts)
        if not decision.final:
            lost = lose()
            facts = replace(facts, workers_lost=lost, loss=loss, alive=len(self.alive()))
            decision = self.policy.decide(facts)
        log.debug("recovery %d: %s (%s)", recoveries, decision.action.value, decision.why)
        return decision

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
            refs = self.worker_handle(w).compute.options(num_returns=n).remote(
                step, [(c, self.chunks[c]) for c in cs], *inputs)
            shares.append(Share(w, cs, [refs] if n == 1 else list(refs)))
        r = Round(step, inputs, shares)
        for j, s in enumerate(self.servers.handles):
            out, stats = s.apply.options(num_returns=2).remote([sh.refs[j] for sh in shares])
            r.outputs.append(out)
            r.stats.append(stats)
        if checkpoint:
            r.checkpoint = self.checkpoint(step + 1)
        return r

    def checkpoint(self, expected_step: int | None) -> ObjectRef[str | None]:
        """Shard 0 writes all shards' state (queued behind their pending updates)."""
        return self.servers.checkpoint(expected_step)

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
                self.lose_worker(sh.worker, e if not isinstance(e, GetTimeoutError) else "no answer")
        return ok

    # -- async mode ----------------------------------------------------------------------------

    def start_loop(self, slot: int) -> ObjectRef[int]:
        """Async mode: worker ``slot``'s pull–compute–push loop (fresh net indices after each start)."""
        self.loop_starts[slot] = self.loop_starts.get(slot, -1) + 1
        return self.worker_handle(slot).run_async.remote(self.servers.handles, slot, self.pool.slots.count,
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
        return merge_states(self.servers.states(), self.config)

    def release(self) -> None:
        """Make the actors take ordinary calls again: whoever holds them (:attr:`holder`) lets them go."""
        if self.holder is not None:
            self.holder()

    def shutdown(self) -> None:
        self.release()
        self.servers.shutdown()
        self.pool.shutdown()
