"""What crosses the Ray boundary between the driver, the parameter servers and the workers.

Every payload is a frozen dataclass of numpy arrays / tensors and plain numbers:

* :class:`Version` — what a worker reads: a parameter-server shard's block of x̃ and
  (shard 0) ρ — and learned labels z̃ — after ``step`` updates;
* :class:`GradShare` — what a worker sends back: the meta-gradient of one *chunk* of a
  meta-step's networks for one shard; the server sums the chunks in chunk order;
* :class:`ShardState` — what a shard checkpoints and restores: its part of a
  :class:`ddray.run.state.RunState`;
* :class:`StepStats` — what a shard reports for each update it applies;
* :class:`ServerInfo`, :class:`WorkerInfo` — who answers a health check: its process and node.

Shards: with J shards, shard j owns a contiguous block of classes, i.e. the image
columns ``images[:, lo:hi]`` of x̃ (S, N, C, H, W) — ỹ is class-major — and the matching
moments of the outer optimiser; shard 0 also owns ρ (T,) and learned label logits z̃ (N, classes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ddray.config import Config
from ddray.distributed.shards import Shard
from ddray.run.state import RunState

if TYPE_CHECKING:  # imported where states are sliced, so that simulated workers never load torch
    import torch

    from ddray.core.synthetic import SyntheticSet
    from ddray.inputs.problem import Problem


@dataclass(frozen=True)
class Version:
    """A shard's published state: x̃[:, lo:hi] (S, hi−lo, C, H, W) and, on shard 0, ρ (T,)."""

    step: int  # updates applied so far
    images: np.ndarray
    raw_lrs: np.ndarray | None
    labels: np.ndarray | None = None  # shard 0 with learned labels: z̃ (N, classes)


@dataclass(frozen=True)
class GradShare:
    """Σ over one chunk's networks of ∂ℓ/∂(x̃[:, lo:hi], ρ), computed at version ``step``.

    ``chunk`` is the chunk's index within the meta-step (:func:`ddray.core.net_chunks.net_chunks`);
    the server adds the chunks in that order, so the sum does not depend on which
    worker computed which chunk. ``loss`` is Σ of the outer loss over the chunk's
    ``nets`` networks (divide by K to average).
    """

    step: int
    chunk: int
    images: np.ndarray
    raw_lrs: np.ndarray | None
    loss: float
    nets: int
    labels: np.ndarray | None = None  # shard 0 with learned labels: ∂/∂z̃


@dataclass(frozen=True)
class ShardState:
    """One shard's part of a :class:`~ddray.run.state.RunState` (tensors are copies)."""

    step: int
    images: torch.Tensor  # (S, hi−lo, C, H, W)
    raw_lrs: torch.Tensor | None  # (T,) on shard 0
    optimizer: dict[str, Any]
    labels: torch.Tensor | None = None  # z̃ (N, classes) on shard 0, with learned labels


@dataclass(frozen=True)
class StepStats:
    """One applied update of a shard: the step it reached, the outer loss and optimiser, the step sizes (shard 0,
    which owns ρ), where the server's time went (sync) and how stale its gradients were (async)."""

    step: int  # updates applied, this one included
    outer_loss: float  # mean over the update's networks
    outer_lr: float
    nets: int  # networks whose gradients it averaged
    lr_min: float | None = None
    lr_mean: float | None = None
    lr_max: float | None = None
    t_average: float = 0.0  # seconds: summing the chunks
    t_adam: float = 0.0  # the optimiser step
    t_wait: float | None = None  # sync: waiting for the shares
    t_receive: float | None = None  # sync: fetching them
    staleness_mean: float | None = None  # async
    staleness_max: float | None = None
    dropped: float | None = None  # async: gradients dropped as too stale, so far

    LOGGED = ("outer_loss", "lr_min", "lr_mean", "lr_max", "outer_lr", "staleness_mean", "staleness_max", "dropped")

    def metrics(self) -> dict[str, float]:
        """What the driver logs of it: the fields of :attr:`LOGGED` that are set, and the server's milliseconds
        per update (``ps_ms``: receive + sum + optimiser) in sync mode."""
        values = asdict(self)
        out = {k: float(values[k]) for k in self.LOGGED if values[k] is not None}
        if self.t_receive is not None:
            out["ps_ms"] = 1e3 * (self.t_receive + self.t_average + self.t_adam)
        return out


@dataclass(frozen=True)
class ServerInfo:
    """A parameter-server shard's answer to a health check."""

    pid: int
    step: int | None  # updates applied (None before it took a state)
    shard: int
    node: str  # Ray node id


@dataclass(frozen=True)
class WorkerInfo:
    """A worker's answer to a health check."""

    pid: int
    node: str  # Ray node id
    restarted: bool  # Ray rebuilt this actor after its process died
    device: str = "cpu"  # where it computes: "cpu", or "cuda:0 (<the card's name>)"


def synthetic_of(versions: list[Version], problem: "Problem") -> "SyntheticSet":
    """The synthetic set the shards' ``versions`` of one step hold (copies, on the CPU): x̃ from every shard's
    columns, ρ and learned labels z̃ from shard 0 (hard labels: the run's class labels)."""
    import torch

    from ddray.core.synthetic import SyntheticSet, class_labels

    d = problem.config.distill
    images = torch.from_numpy(np.concatenate([v.images for v in versions], axis=1))
    raw = torch.from_numpy(np.array(versions[0].raw_lrs, dtype=np.float32))
    z = versions[0].labels
    labels = (torch.from_numpy(np.array(z, dtype=np.float32)) if z is not None
              else class_labels(problem.data.num_classes, d.ipc))
    return SyntheticSet(images, labels, raw, d.layout[1])


def _moments(optimizer: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return optimizer["opt"]["state"]  # type: ignore[no-any-return]


def _empty_like(optimizer: dict[str, Any]) -> dict[str, Any]:
    return {"opt": {"state": {}, "param_groups": optimizer["opt"]["param_groups"]}, "sched": optimizer["sched"]}


def slice_state(full: RunState, shard: Shard) -> ShardState:
    """The part of ``full`` that ``shard`` owns: its image columns and their moments (and ρ's on shard 0)."""
    import torch

    dims = full.images.dim()
    opt = _empty_like(full.optimizer)
    for pid, st in _moments(full.optimizer).items():
        if pid == 0:  # x̃'s moments: the same columns as x̃
            opt["opt"]["state"][0] = {k: (v[:, shard.lo:shard.hi].clone() if torch.is_tensor(v) and v.dim() == dims
                                          else v) for k, v in st.items()}
        elif shard.owns_lrs:
            opt["opt"]["state"][pid] = st
    labels = full.labels.clone() if shard.owns_lrs and full.labels is not None else None
    return ShardState(full.step, full.images[:, shard.lo:shard.hi].clone(),
                      full.raw_lrs.clone() if shard.owns_lrs else None, opt, labels)


def merge_states(parts: list[ShardState], config: Config) -> RunState:
    """Inverse of :func:`slice_state`: the shards' states in shard order → the run's state."""
    import torch

    first = parts[0]
    steps = {p.step for p in parts}
    if len(steps) != 1:
        raise RuntimeError(f"merge_states: shards are at different meta-steps {sorted(steps)}")
    opt = _empty_like(first.optimizer)
    state0 = [_moments(p.optimizer).get(0, {}) for p in parts]
    dims = first.images.dim()
    if state0[0]:
        opt["opt"]["state"][0] = {k: (torch.cat([s[k] for s in state0], dim=1)
                                      if torch.is_tensor(v) and v.dim() == dims else v)
                                  for k, v in state0[0].items()}
    for pid, st in _moments(first.optimizer).items():
        if pid != 0:
            opt["opt"]["state"][pid] = st
    assert first.raw_lrs is not None, "merge_states: shard 0 owns ρ"
    return RunState(first.step, torch.cat([p.images for p in parts], dim=1), first.raw_lrs, opt, config,
                    first.labels)
