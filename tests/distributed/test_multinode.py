"""Several Ray nodes on 127.0.0.1 (ray.cluster_utils.Cluster): workers land on different nodes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from dist_support import named_actor, tiny

from ddray.distributed.driver import distill_ray


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """This module's one Ray instance: a head with no CPUs for workers and two 1-CPU nodes, on 127.0.0.1."""
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
            c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False, _node_ip_address="127.0.0.1")
        yield c
        ray.shutdown()
        c.shutdown()


def test_workers_on_different_nodes_and_the_run_completes(cluster: Any, tmp_path: Path) -> None:
    import ray

    nodes: dict[str, str] = {}

    def where(step: int, metrics: dict) -> None:
        if step == 1:
            for i in range(2):
                actor, _ = named_actor(f"worker-{i}")
                nodes[f"worker-{i}"] = ray.get(actor.ping.remote())["node"]

    r = distill_ray(tiny(tmp_path / "mn", iterations=3, placement="strict-spread"), progress=False,
                    on_step=where)
    assert len(set(nodes.values())) == 2 and cluster.head_node.node_id not in nodes.values()
    assert json.loads((r.out / "meta.json").read_text())["iterations"] == 3
