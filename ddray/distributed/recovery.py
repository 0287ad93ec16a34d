"""What a run does when its fleet is short of actors: one pure decision from a frozen snapshot of facts.

The loops (:mod:`.driver`, :mod:`.compiled`) and the pool (:mod:`.pool`) gather the facts —
how many workers answer against MIN, how long they have waited for MIN against
``--placement-timeout``, how many recoveries in a row have made no progress against the
budget, whether a parameter server or workers were lost, whether the failure was a lost
actor at all — and act on the :class:`Decision`; nothing here touches Ray.

In order of precedence:

* ``GIVE_UP``: the retry budget is spent (recoveries in a row without a finished meta-step) → RuntimeError;
* ``RESTART``: a parameter-server shard was lost → it is back (restarted or replaced), and every shard
  rolls back to the last checkpoint;
* ``RAISE``: the failure lost no actor → it is the job's own error (a bug, bad data), raised as it is;
* ``STOP``: fewer than MIN workers answer and ``--placement-timeout`` has passed → CapacityError:
  the run writes a checkpoint, stops, and says how to resume;
* ``WAIT``: fewer than MIN workers answer → wait for capacity (an autoscaler, a restarted actor);
* ``SHRINK``: a meta-step failed with MIN or more workers left → its lost work moves to the workers
  that answer (those that join later get work from the next meta-step on);
* ``GO_ON``: nothing failed and MIN or more workers answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

MAX_RECOVERIES = 20  # recoveries in a row without a finished meta-step before giving up


class Action(Enum):
    GO_ON = "go on"
    SHRINK = "shrink"
    WAIT = "wait"
    STOP = "stop"
    RESTART = "restart"
    RAISE = "raise"
    GIVE_UP = "give up"


@dataclass(frozen=True)
class Facts:
    """What the fleet knows when it asks (the defaults: nothing failed, nothing waited for).

    Attributes:
        alive: workers that answer.
        min_alive: MIN, the workers a meta-step needs.
        recoveries: recoveries in a row without a finished meta-step, the one being decided included
            (0: nothing failed).
        budget: the most recoveries in a row before giving up.
        servers_lost: a parameter-server shard died or was lost with its node (and is back now).
        workers_lost: workers the failure lost.
        loss: whether the failure's error says an actor (or what it computed) was lost.
        waited: seconds spent waiting for MIN so far.
        timeout: ``--placement-timeout`` in seconds.
    """

    alive: int
    min_alive: int
    recoveries: int = 0
    budget: int = MAX_RECOVERIES
    servers_lost: bool = False
    workers_lost: int = 0
    loss: bool = True
    waited: float = 0.0
    timeout: float = math.inf

    def __post_init__(self) -> None:
        if min(self.alive, self.min_alive, self.recoveries, self.budget, self.workers_lost) < 0 or self.waited < 0:
            raise ValueError(f"Facts: counts and times are never negative, got {self}")


@dataclass(frozen=True)
class Decision:
    """An :class:`Action` and why, in words (the message of a RuntimeError when the run gives up)."""

    action: Action
    why: str

    @property
    def final(self) -> bool:
        """Whether no fact of lower precedence could change it (the loops stop gathering facts)."""
        return self.action in (Action.GIVE_UP, Action.RESTART)


class RecoveryPolicy:
    """The decision for a snapshot of :class:`Facts` (see the module docstring for the order)."""

    def decide(self, facts: Facts) -> Decision:
        f = facts
        failed = f.recoveries > 0
        if f.recoveries > f.budget:
            return Decision(Action.GIVE_UP, f"gave up after {f.budget} recoveries")
        if f.servers_lost:
            return Decision(Action.RESTART, "a parameter-server shard was lost: roll back to the last checkpoint")
        if failed and not f.loss and f.workers_lost == 0:
            return Decision(Action.RAISE, "the failure lost no actor: it is the job's own error")
        if f.alive < f.min_alive:
            if f.waited >= f.timeout:
                return Decision(Action.STOP, f"{f.alive} of the {f.min_alive} workers needed answered for "
                                             f"{f.timeout:g} s")
            return Decision(Action.WAIT, f"{f.alive} of the {f.min_alive} workers needed answer")
        if failed:
            return Decision(Action.SHRINK, f"{f.workers_lost} worker(s) lost; {f.alive} go on")
        return Decision(Action.GO_ON, f"{f.alive} worker(s) answer, MIN {f.min_alive}")
