"""Worker slots on several Ray nodes on 127.0.0.1 (ray.cluster_utils.Cluster): --placement is honoured,
pending slots are placed when a node joins, waiting ends in a one-line CapacityError."""

from __future__ import annotations

import os
from typing import Any, Iterator

import pytest

from ddray.distributed.placement import CapacityError, WorkerResources
from ddray.distributed.slots import Slots


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """This module's one Ray instance: a head with no CPUs for workers and two 2-CPU nodes, on 127.0.0.1."""
    import ray
    import ray._common.utils
    import ray._private.ray_constants
    import ray._private.utils
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with pytest.MonkeyPatch.context() as mp:
        # keep the driver on loopback (Ray would swap 127.0.0.1 for the machine's address) and do not
        # advertise this test cluster in /tmp/ray to other `ray.init()` calls on the machine
        mp.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
        mp.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
        mp.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                          "node_ip_address": "127.0.0.1"})
        for _ in range(2):
            c.add_node(num_cpus=2, node_ip_address="127.0.0.1")
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False, _node_ip_address="127.0.0.1")
        yield c
        ray.shutdown()
        c.shutdown()


@pytest.fixture(autouse=True)
def all_cpus_free(cluster: Any) -> None:
    """Start each test when the last test's removed groups have given their CPUs back (hints use what is free)."""
    import time

    import ray

    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def placed_nodes(slots: Slots, count: int) -> list[str]:
    slots.wait(count, timeout=60)
    return [n for n in (slots.node(i) for i in slots.placed()) if n]


def test_spread_puts_slots_on_different_nodes_while_nodes_have_room(cluster: Any) -> None:
    slots = Slots(WorkerResources(1.0), 2, "spread")
    try:
        nodes = placed_nodes(slots, 2)
        assert len(set(nodes)) == 2 and cluster.head_node.node_id not in nodes
    finally:
        slots.remove()


def test_pack_fills_a_node_first(cluster: Any) -> None:
    slots = Slots(WorkerResources(1.0), 2, "pack")
    try:
        assert len(set(placed_nodes(slots, 2))) == 1
    finally:
        slots.remove()


def test_strict_spread_never_shares_a_node_and_waits_for_more_nodes(cluster: Any) -> None:
    """Three 1-CPU slots on two 2-CPU nodes: two are placed on distinct nodes, the third waits (a node
    would have room, but not one without a slot), and the wait ends in a one-line error."""
    slots = Slots(WorkerResources(1.0), 3, "strict-spread")
    try:
        nodes = placed_nodes(slots, 2)
        assert len(set(nodes)) == 2 and slots.pending() == 1
        with pytest.raises(CapacityError) as e:
            slots.wait(3, timeout=2)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("--placement-timeout 2: 1 more worker(s) of {CPU 1} each could "
                                                  "not be placed in 2 s (2 placed); the cluster has 3 alive nodes "
                                                  "with CPU 4, GPU 0 in all")
        node = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        try:
            assert len(set(placed_nodes(slots, 3))) == 3
        finally:
            slots.remove()
            cluster.remove_node(node)
    finally:
        slots.remove()
