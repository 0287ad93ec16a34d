"""What each worker gets, and connecting — without starting Ray."""

from __future__ import annotations

import socket
import time

import pytest

from ddray.config import ClusterConfig
from ddray.distributed.placement import (WorkerResources, check_ray_reachable, missing, trial_layout,
                                         worker_resources)


def test_the_config_decides_when_it_says() -> None:
    r = worker_resources(ClusterConfig(cpus_per_worker=3, gpus_per_worker=0.25), [{"CPU": 1.0}])
    assert (r.cpus, r.gpus, r.threads, r.device) == (3.0, 0.25, 3, "cuda")
    assert r.bundle() == {"CPU": 3.0, "GPU": 0.25} and str(r) == "CPU 3, GPU 0.25"
    assert WorkerResources(0.5).threads == 1 and WorkerResources(2.4).threads == 2


def test_derived_from_the_nodes_alive_now() -> None:
    assert worker_resources(ClusterConfig(workers=1), [{"CPU": 2.0}]) == WorkerResources(2.0)
    assert worker_resources(ClusterConfig(workers=2), [{"CPU": 2.0}]) == WorkerResources(1.0)
    assert worker_resources(ClusterConfig(workers=4), [{"CPU": 16.0}]) == WorkerResources(4.0)
    head_and_two = [{"CPU": 0.0}, {"CPU": 1.0}, {"CPU": 1.0}]
    assert worker_resources(ClusterConfig(workers="1:3"), head_and_two) == WorkerResources(1.0)  # MIN fits
    assert worker_resources(ClusterConfig(workers=2, placement="strict-spread"), [{"CPU": 4.0}, {"CPU": 1.0}]) \
        == WorkerResources(1.0)  # one per node


def test_gpus_one_per_worker_where_the_cluster_has_them() -> None:
    r = worker_resources(ClusterConfig(workers=3), [{"CPU": 8.0, "GPU": 2.0}])
    assert r == WorkerResources(1.0, 1.0)  # 3 workers, 2 GPUs now: the third waits for a node
    assert worker_resources(ClusterConfig(gpus_per_worker=0), [{"CPU": 8.0, "GPU": 2.0}]).gpus == 0.0


def test_an_empty_cluster_gets_a_request_an_autoscaler_can_answer() -> None:
    """A KubeRay head with num-cpus 0 and no workers yet: ask for one CPU each and wait."""
    assert worker_resources(ClusterConfig(workers=4), [{"CPU": 0.0}]) == WorkerResources(1.0)


def test_more_workers_than_cpus_get_fractions_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="oversubscribed"):
        r = worker_resources(ClusterConfig(workers=8), [{"CPU": 2.0}])
    assert 8 * r.cpus <= 2.0 and r.threads == 1


def test_missing_names_what_no_node_offers() -> None:
    assert missing(WorkerResources(1.0, 1.0), [{"CPU": 4.0}]) == "no node has a GPU"
    assert missing(WorkerResources(8.0), [{"CPU": 4.0}, {"CPU": 2.0}]) == "no node has CPU 8 free for a worker"
    assert missing(WorkerResources(2.0), [{"CPU": 4.0}]) == ""


def test_a_tune_trials_group_is_used_as_laid_out() -> None:
    """[driver, PS × J, worker × W] (ddray.tune_config's trial bundles) → workers and shards in their bundles."""
    bundles = [{"CPU": 1.0}, {"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 3.0}, {"CPU": 3.0}, {"CPU": 3.0}]
    layout = trial_layout(bundles, workers=3, shards=2)
    assert layout is not None and layout.resources == WorkerResources(3.0)
    assert layout.first_worker_bundle == 3 and [layout.ps_bundle(j) for j in range(2)] == [1, 2]
    assert layout.ps_cpus == 0.5
    assert trial_layout(bundles, workers=2, shards=2) is None  # another shape: the fleet makes its own slots
    gpu = trial_layout([{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}], workers=1, shards=1)
    assert gpu is not None and gpu.resources.device == "cuda"


def test_unreachable_address_fails_fast_naming_it() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=f"--address 127.0.0.1:{port}: no Ray cluster reachable"):
        check_ray_reachable(f"127.0.0.1:{port}", timeout=3)
    assert time.monotonic() - t0 < 5
    with pytest.raises(ValueError, match="--address: invalid value"):
        check_ray_reachable("ray://:x")
    check_ray_reachable("auto")  # resolved by ray.init itself
