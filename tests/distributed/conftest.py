"""One Ray instance per test module (module-scoped fixture), usage stats off."""

from __future__ import annotations

import os
from typing import Any, Iterator

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    """A local Ray for the whole module: 2 CPUs, no dashboard, bound to 127.0.0.1."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()
