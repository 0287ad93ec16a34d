"""Dataset distillation on Ray: worker actors, parameter servers and the driver loop.

* :mod:`.worker` — meta-gradient workers (and simulated ones for benchmarks);
* :mod:`.param_server` — x̃, ρ and the outer optimiser, sync/async/sharded;
* :mod:`.placement` — connecting to Ray, the placement group, CPU/GPU shares;
* :mod:`.fleet` — the run's actors, their rounds and their repair;
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
