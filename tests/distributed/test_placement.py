"""Resource planning and connecting, without starting Ray."""

from __future__ import annotations

import socket
import time

import pytest

from ddray.distributed.placement import check_reachable, plan_resources


def test_two_workers_on_two_cpus_one_thread_each() -> None:
    plan = plan_resources([{"CPU": 2.0}], workers=2, shards=1, placement="spread")
    assert plan.bundles == [{"CPU": 1.0}, {"CPU": 1.0}] and plan.strategy == "SPREAD"
    assert [plan.threads(i) for i in range(2)] == [1, 1]
    assert plan.worker_cpus[0] + plan.ps_cpus == 1.0  # the PS shard rides in worker 0's bundle


def test_threads_never_exceed_the_cpus_of_a_node() -> None:
    plan = plan_resources([{"CPU": 16.0}], workers=4, shards=2, placement="pack")
    assert plan.bundles == [{"CPU": 4.0}] * 4 and plan.strategy == "PACK"
    assert sum(plan.threads(i) for i in range(4)) <= 16
    assert [plan.threads(i) for i in range(4)] == [4, 4, 4, 4]  # the PS slivers (0.05 CPU) round away


def test_one_worker_on_two_cpus_uses_both() -> None:
    plan = plan_resources([{"CPU": 2.0}], workers=1, shards=1, placement="spread")
    assert plan.threads(0) == 2


def test_strict_spread_needs_a_node_per_worker() -> None:
    nodes = [{"CPU": 0.0}, {"CPU": 2.0}, {"CPU": 2.0}]  # a head without CPUs for workers
    assert plan_resources(nodes, 2, 1, "strict-spread").strategy == "STRICT_SPREAD"
    with pytest.raises(ValueError, match="cannot place 3 worker"):
        plan_resources(nodes, 3, 1, "strict-spread")


def test_more_workers_than_cpus_get_fractions_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="oversubscribed"):
        plan = plan_resources([{"CPU": 2.0}], workers=8, shards=1, placement="spread")
    assert 8 * plan.bundles[0]["CPU"] <= 2.0 and plan.threads(3) == 1


def test_gpus_one_per_worker() -> None:
    plan = plan_resources([{"CPU": 8.0, "GPU": 2.0}], workers=2, shards=1, placement="spread")
    assert plan.device == "cuda" and all(b["GPU"] == 1.0 for b in plan.bundles)
    with pytest.raises(ValueError, match="--workers: invalid value 3; the cluster has 2 GPUs"):
        plan_resources([{"CPU": 8.0, "GPU": 2.0}], workers=3, shards=1, placement="spread")


def test_unreachable_address_fails_fast_naming_it() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=f"--address 127.0.0.1:{port}: no Ray cluster reachable"):
        check_reachable(f"127.0.0.1:{port}", timeout=3)
    assert time.monotonic() - t0 < 5
    with pytest.raises(ValueError, match="--address: invalid value"):
        check_reachable("ray://:x")
    check_reachable("auto")  # resolved by ray.init itself


def test_a_tune_trials_group_is_used_as_laid_out() -> None:
    """[driver, PS × J, worker × W] (ddray.tune_config's trial bundles) → workers and shards in their bundles."""
    from ddray.distributed.placement import plan_in_group

    bundles = [{"CPU": 1.0}, {"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 3.0}, {"CPU": 3.0}, {"CPU": 3.0}]
    plan = plan_in_group(bundles, workers=3, shards=2)
    assert plan is not None and plan.device == "cpu"
    assert [plan.worker_bundle(i) for i in range(3)] == [3, 4, 5] and [plan.ps_bundle(j) for j in range(2)] == [1, 2]
    assert plan.threads(0) == 3 and plan.ps_cpus == 0.5
    assert plan_in_group(bundles, workers=2, shards=2) is None  # another shape: the fleet makes its own group
    gpu = plan_in_group([{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}], workers=1, shards=1)
    assert gpu is not None and gpu.device == "cuda"
