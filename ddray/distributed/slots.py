"""Where workers go: one placement group per worker slot, requested up front, placed as capacity appears.

A run asks for MAX worker slots at once, each a one-bundle placement group of the
worker's resources. Ray places those it can; the others stay pending, which is what
an autoscaler (KubeRay's included) watches to add nodes — so a run starts as soon as
MIN slots are placed and grows as nodes join. A slot whose node dies is rescheduled
by Ray onto another node when one has room; meanwhile its worker is simply absent.

``--placement``: ``spread`` (default) hints each slot to a different node while nodes
with room remain, ``pack`` fills nodes one after another (both are soft: a slot goes
wherever there is room), ``strict-spread`` never puts two slots on one node (slots are
then requested one at a time, each excluding the nodes already used).

Inside a Ray Tune trial the slots are the trial group's worker bundles, all placed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ddray.distributed.placement import CapacityError, WorkerResources, alive_nodes, cluster_summary, missing
from ddray.distributed.recovery import Action, Facts, RecoveryPolicy

log = logging.getLogger("ddray")
NODE_LABEL = "ray.io/node-id"
NOTICE_AFTER_S = 3.0  # waiting longer than this for placement prints what is pending, once


@dataclass
class Slot:
    """Slot ``index``: bundle ``bundle`` of ``group``; ``ready`` is the pending ``group.ready()`` ref."""

    index: int
    group: Any
    bundle: int = 0
    ready: Any = None
    placed: bool = False


def _free_per_node() -> dict[str, dict[str, float]]:
    """Resources available now on each alive node (empty if Ray does not say)."""
    try:
        from ray._private.state import available_resources_per_node

        return dict(available_resources_per_node())
    except Exception:  # a private API: without it there are simply no hints
        return {}


def _hints(resources: WorkerResources, count: int, placement: str) -> list[str | None]:
    """A node per slot where one has room now (``spread``: round-robin over nodes, ``pack``: fill each)."""
    room: dict[str, int] = {}
    for node, free in _free_per_node().items():
        n = min(int(free.get(k, 0.0) / v + 1e-9) for k, v in resources.bundle().items() if v > 0)
        if n > 0:
            room[node] = n
    order = sorted(room, key=lambda n: -room[n])
    hints: list[str | None] = []
    while len(hints) < count and any(room.values()):
        for node in order:
            while room[node] and len(hints) < count:
                hints.append(node)
                room[node] -= 1
                if placement == "spread":
                    break
    return hints + [None] * (count - len(hints))


class Slots:
    """``count`` worker slots of ``resources`` each (see the module docstring).

    Args:
        resources: one worker's reservation.
        count: MAX, the slots requested.
        placement: ``spread``, ``pack`` or ``strict-spread``.
        trial: (group, first worker bundle) of a Ray Tune trial: its bundles are the slots.
    """

    def __init__(self, resources: WorkerResources, count: int, placement: str = "spread",
                 trial: tuple[Any, int] | None = None) -> None:
        self.resources, self.count, self.placement = resources, count, placement
        self.own = trial is None
        self.slots: list[Slot] = []
        if trial is not None:
            group, first = trial
            self.slots = [Slot(i, group, first + i, placed=True) for i in range(count)]
        elif placement == "strict-spread":
            self._request(0, None)
        else:
            for i, node in enumerate(_hints(resources, count, placement)):
                self._request(i, node)

    def _request(self, index: int, node: str | None) -> None:
        kwargs: dict[str, Any] = {}
        if self.placement == "strict-spread":
            used = sorted({n for s in self.slots if s.placed and (n := self.node(s.index))})
            if used:
                kwargs["bundle_label_selector"] = [{NODE_LABEL: f"!in({','.join(used)})"}]
        elif node is not None:
            kwargs["_soft_target_node_id"] = node
        group = placement_group([self.resources.bundle()], strategy="STRICT_PACK", **kwargs)
        self.slots.append(Slot(index, group, 0, group.ready()))

    # -- state ---------------------------------------------------------------------------------

    def poll(self) -> list[int]:
        """Slots placed since the last call (their indices)."""
        waiting = [s for s in self.slots if not s.placed]
        if not waiting:
            return []
        ready, _ = ray.wait([s.ready for s in waiting], num_returns=len(waiting), timeout=0)
        new = [s for s in waiting if s.ready in ready]
        for s in new:
            s.placed = True
        if self.placement == "strict-spread" and new and len(self.slots) < self.count:
            self._request(len(self.slots), None)
        return [s.index for s in new]

    def placed(self) -> list[int]:
        return [s.index for s in self.slots if s.placed]

    def pending(self) -> int:
        return self.count - len(self.placed())

    def node(self, index: int) -> str | None:
        """The node slot ``index``'s bundle is on now (None while pending)."""
        s = self.slots[index]
        table = placement_group_table(s.group)
        return table.get("bundles_to_node_id", {}).get(s.bundle) if table.get("state") == "CREATED" else None

    def strategy(self, index: int) -> PlacementGroupSchedulingStrategy:
        """Schedule an actor or task into slot ``index``'s bundle."""
        s = self.slots[index]
        return PlacementGroupSchedulingStrategy(s.group, placement_group_bundle_index=s.bundle)

    def wait(self, placed: int, timeout: float, what: str = "worker") -> None:
        """Block until ``placed`` slots are placed; print once what is pending; CapacityError at ``timeout``
        (the recovery policy decides: go on, wait, or stop)."""
        t0, noticed, policy = time.monotonic(), False, RecoveryPolicy()
        while True:
            self.poll()
            have = len(self.placed())
            waited = time.monotonic() - t0
            decision = policy.decide(Facts(alive=have, min_alive=placed, waited=waited, timeout=timeout))
            if decision.action is Action.GO_ON:
                return
            if decision.action is Action.STOP:
                nodes = alive_nodes()
                why = missing(self.resources, nodes)
                raise CapacityError(
                    f"--placement-timeout {timeout:g}: {placed - have} more {what}(s) of {{{self.resources}}} each "
                    f"could not be placed in {timeout:g} s ({have} placed); the cluster has "
                    f"{cluster_summary(nodes)}{'; ' + why if why else ''}")
            if not noticed and waited >= NOTICE_AFTER_S:
                noticed = True
                log.warning("waiting for %d more %s(s) of {%s} each to be placed (%d of %d requested are pending); "
                            "the cluster has %s; an autoscaler sees the pending requests. Giving up after %g s "
                            "(--placement-timeout)", placed - have, what, self.resources, self.pending(), self.count,
                            cluster_summary(), timeout)
            time.sleep(0.2)

    def remove(self) -> None:
        """Give the slots' groups back (a Tune trial's group is left to Tune)."""
        if self.own:
            for s in self.slots:
                remove_placement_group(s.group)
