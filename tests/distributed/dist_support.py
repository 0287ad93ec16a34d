"""Helpers of the distributed tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from ddray.config import Config  # noqa: E402

TINY = dict(dataset="mnist5k", steps=2, epochs=1, ipc=1, batch_size=64, nets=2, iterations=6,
            eval_nets=2, checkpoint_every=3, seed=0, workers=2, cpus_per_worker=1, scores=False)


def tiny(out: Path | str | None, **overrides: Any) -> Config:
    """A config whose meta-step takes a fraction of a second on one CPU thread."""
    return Config.from_dict({**TINY, "out": None if out is None else str(out), **overrides})


def named_actor(kind: str) -> tuple[Any, str]:
    """The newest live actor of the current run whose name contains ``/<kind>`` (e.g. ``worker-1``)."""
    import ray

    names = sorted((n for n in ray.util.list_named_actors() if f"/{kind}." in n),
                   key=lambda n: int(n.rsplit(".", 1)[1]))
    return ray.get_actor(names[-1]), names[-1]
