"""Dataset distillation on Ray: worker actors, parameter servers and the driver loop.

* :mod:`.messages` — the typed payloads that cross the Ray boundary (versions, gradient chunks, shard states);
* :mod:`.worker` — meta-gradient workers (and simulated ones for benchmarks);
* :mod:`.param_server` — x̃, ρ and the outer optimiser, sync/async/sharded;
* :mod:`.placement` — connecting to Ray, each worker's CPUs/GPU share and threads;
* :mod:`.slots` — one placement group per worker slot, placed as capacity appears;
* :mod:`.pool` — actors in the slots: joins, losses, jobs spread over whoever is alive;
* :mod:`.recovery` — what to do when a meta-step fails or the fleet is below MIN: go on, shrink, wait,
  stop, restart, raise or give up (:class:`~.recovery.RecoveryPolicy`, from a frozen snapshot of facts);
* :mod:`.supervision` — the parameter-server shards: started, watched, replaced and restored;
* :mod:`.fleet` — the run's workers and parameter servers, and the work handed to them;
* :mod:`.compiled` — the experimental compiled-graph transport;
* :mod:`.driver` — :func:`distill_ray`, the outer loop.

Imports are lazy, so a simulated worker process does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["distill_ray"]


def __getattr__(name: str) -> Any:
    if name == "distill_ray":
        from ddray.distributed.driver import distill_ray

        return distill_ray
    raise AttributeError(f"module 'ddray.distributed' has no attribute {name!r}")
