"""Experimental sync transport: the meta-step as one Ray Compiled Graph (``DDRAY_TRANSPORT=compiled``).

The default transport (:meth:`Fleet.submit`) submits a task per worker per meta-step
and moves versions and gradients as object-store entries; on a small machine the
per-task and per-object cost dominates once there are dozens of workers. This one
compiles the meta-step — server version → shares → server apply — once into a
graph whose actors exchange data through reusable shared-memory channels, and then
only feeds it ``(step, checkpoint?)``: no task submission, no object-store entries,
no reference counting per step. Same actors, same plain classes, same arithmetic
(bitwise equal to the default transport).

Limits: one parameter-server shard (the server checkpoints itself inside the
graph). A lost actor shuts the graph down; the driver repairs the fleet exactly as
for the default transport, redoes the interrupted meta-step(s) from the server's
step (after a server loss: from the last checkpoint) and compiles again over the
workers alive then. A worker that joins, and every evaluation (which runs on the
workers outside the graph), also tears the graph down; it is compiled again after.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable

from ray.exceptions import RayActorError, RayError

from ddray.distributed.fleet import Fleet  # one way: the fleet knows the graph only as its holder
from ddray.distributed.recovery import Action

log = logging.getLogger("ddray.distributed")
LOOKAHEAD = 2  # executions in flight: step s+1's version read queues behind step s's apply


class CompiledStep:
    """The fleet's meta-step compiled into one graph, owned here (the fleet knows only how to make it let go:
    :attr:`Fleet.holder` is :meth:`teardown`).

    Attributes:
        graph: the compiled graph while it is up, else None.
        members: the alive workers it was compiled for.
    """

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.graph: Any = None
        self.members: tuple[int, ...] = ()
        fleet.holder = self.teardown

    def compile(self) -> Any:
        """The graph of one meta-step over the workers alive now (compiled if it is not up); its input is
        ``(step, checkpoint after it?)``."""
        if self.graph is not None:
            return self.graph
        from ray.dag import InputNode

        from ddray.core.net_chunks import assign

        fleet = self.fleet
        ps = fleet.single_server("DDRAY_TRANSPORT=compiled")
        alive = fleet.alive()
        with InputNode() as job:
            version = ps.dag_version.bind(job)
            grads = [fleet.worker_handle(w).dag_compute.bind(job, [(c, fleet.chunks[c]) for c in cs], version)
                     for w, cs in assign(len(fleet.chunks), alive).items()]
            dag = ps.dag_apply.bind(job, *grads)
        self.graph, self.members = dag.experimental_compile(_max_inflight_executions=LOOKAHEAD), tuple(alive)
        return self.graph

    def teardown(self) -> None:
        """Shut the graph down (if it is up), so its actors take ordinary tasks again."""
        graph, self.graph = self.graph, None
        if graph is not None:
            try:
                graph.teardown()
            except Exception as e:  # already shut down by the failure that brought us here
                log.debug("compiled graph teardown: %s", e)


def compiled_rounds(fleet: Fleet, start: int, stop: int, due: Callable[[int], bool],
                    report: Callable[..., None], barrier: Callable[[int], bool] = lambda done: False) -> None:
    """Meta-steps ``start`` … ``stop``−1 through the fleet's compiled graph (compiled on first use, and again
    after every repair, join, or evaluation — the graph's actors take no other calls while it is up;
    :meth:`Fleet.release` and :meth:`Fleet.shutdown` tear it down). ``barrier(done)``: feed nothing past
    ``done`` until it is reported."""
    step, recoveries = start, 0
    compiled = CompiledStep(fleet)
    while step < stop:
        pending: deque[Any] = deque()
        nxt = step
        try:
            fleet.poll_joins()
            fleet.ensure_capacity()
            if compiled.graph is not None and tuple(fleet.alive()) != compiled.members:
                compiled.teardown()  # workers joined: hand them chunks from this step on
            graph = compiled.compile()
            draining = False  # workers joined: finish what is in flight, then compile again for them
            while pending or (nxt < stop and not draining):
                while (not draining and nxt < stop and len(pending) < LOOKAHEAD
                       and not (pending and barrier(nxt))):
                    pending.append(graph.execute((nxt, due(nxt + 1))))
                    nxt += 1
                stats = pending.popleft().get(timeout=-1)  # a real meta-step may take minutes
                step, recoveries = step + 1, 0
                draining = draining or bool(fleet.poll_joins())
                if not pending and (draining or barrier(step)) and step < stop:
                    compiled.teardown()  # evaluation runs on the workers, outside the graph
                    report(stats)
                    break
                report(stats)
        except RayError as e:
            # repair: the graph shut itself down; redo from where the server is
            pending.clear()
            compiled.teardown()
            recoveries += 1

            def lose() -> int:  # a graph failure does not say which actor died: ask each
                gone = [w for w in compiled.members if not fleet.answers(w)]
                for w in gone:
                    fleet.lose_worker(w, e)
                return len(gone)

            decision = fleet.recover(recoveries, isinstance(e, RayActorError), lose)
            if decision.action is Action.GIVE_UP:
                raise RuntimeError(f"meta-step {step + 1}: {decision.why}") from e
            if decision.action is Action.RESTART:
                step, _ = fleet.restore()
                continue
            if decision.action is Action.RAISE:
                raise
            step = fleet.server_steps()[0]  # SHRINK or WAIT: redo from where the server is
