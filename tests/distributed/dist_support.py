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



# Run in a process, this makes every ddray network's forward raise there (Ray's worker processes import
# ddray afresh and are untouched): a command that still succeeds trained and evaluated nothing in it.
NO_FORWARD_HERE = """
from ddray.core import models

def _forward(self, *args, **kwargs):
    raise AssertionError(f"{type(self).__name__}.forward ran in the driver process")

for _cls in (models.LeNet, models.AlexCifarNet, models.ConvNet):
    _cls.forward = _forward
"""


def no_forward_here(monkeypatch: Any, inference: bool = False) -> None:
    """:data:`NO_FORWARD_HERE` in this process, undone by ``monkeypatch`` at the end of the test; with
    ``inference``, forwards without autograd (predictions) may still run here, training may not."""
    import torch

    from ddray.core import models

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if inference and not torch.is_grad_enabled():
            return original[type(self)](self, *args, **kwargs)
        raise AssertionError(f"{type(self).__name__}.forward ran in the driver process")

    original = {cls: cls.forward for cls in (models.LeNet, models.AlexCifarNet, models.ConvNet)}
    for cls in original:
        monkeypatch.setattr(cls, "forward", forward)
