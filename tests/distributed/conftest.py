"""One Ray instance per test module (module-scoped fixture), usage stats off; torch threads of the
single-process references."""

from __future__ import annotations

import os
from typing import Any, Iterator

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    """A local Ray for the whole module: 2 CPUs, no dashboard, bound to 127.0.0.1."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def one_worker_threads() -> Iterator[None]:
    """The single-process reference runs as many torch threads as one worker on this 2-CPU Ray
    (2: the parameter server's sliver rounds away), so both do the same reductions."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The single-process reference computes as a 1-CPU worker does: one torch thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
