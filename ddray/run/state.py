"""A run's state: what a checkpoint holds and what a resumed or restarted run continues from.

:class:`RunState` is the one definition, used by the single-process loop
(:mod:`ddray.run.loop`), the parameter servers (:mod:`ddray.distributed.param_server`,
which own slices of it) and ``--resume``. On disk it is one ``torch.save`` dict
(:meth:`RunState.to_checkpoint`) written by :mod:`ddray.store.checkpoint`:

    images     x̃, (S, N, C, H, W) float32
    raw_lrs    ρ, (T,) float32 (η̃ = softplus(ρ))
    labels     learned label logits z̃ (N, classes) float32 — only with ``--labels learned``
    optimizer  the outer optimiser's state (:meth:`ddray.core.synthetic.OuterOptimizer.state_dict`)
    step       meta-steps applied
    config     the whole run config (:meth:`ddray.config.Config.to_dict`)
    rng        {"seed", "rule"}: there is no generator state to save — every draw is
               derived from (seed, purpose, step, net) (:mod:`ddray.core.inits`)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddray.config import Config

if TYPE_CHECKING:  # torch is imported by what builds a state, not by this module (simulated workers stay light)
    import torch

    from ddray.inputs.problem import Problem

RNG_RULE = "every draw is ddray.core.inits.derive_seed(seed, purpose, step, net)"


@dataclass(frozen=True)
class RunState:
    """The state of a run after ``step`` meta-steps (tensors are owned by the state; copy before mutating)."""

    step: int
    images: torch.Tensor  # x̃ (S, N, C, H, W)
    raw_lrs: torch.Tensor  # ρ (T,)
    optimizer: dict[str, Any]  # OuterOptimizer.state_dict()
    config: Config
    labels: torch.Tensor | None = None  # learned label logits z̃ (N, classes); None: hard labels

    @property
    def rng(self) -> dict[str, Any]:
        """The seed and the rule every random draw of the run follows."""
        return {"seed": self.config.run.seed, "rule": RNG_RULE}

    @classmethod
    def initial(cls, problem: "Problem") -> "RunState":
        """The state of a fresh run: x̃ and ρ as the method initialises them, a fresh optimiser."""
        syn = problem.initial_synthetic()
        opt = problem.outer_optimizer(syn)
        return cls(0, syn.images, syn.raw_lrs, opt.state_dict(), problem.config,
                   syn.labels if syn.learns_labels else None)

    def to_checkpoint(self) -> dict[str, Any]:
        """The dict :func:`ddray.store.checkpoint.save_checkpoint` writes (the step is its file name too)."""
        saved = {"images": self.images, "raw_lrs": self.raw_lrs, "optimizer": self.optimizer,
                 "step": self.step, "config": self.config.to_dict(), "rng": self.rng}
        if self.labels is not None:
            saved["labels"] = self.labels
        return saved

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> "RunState":
        """Inverse of :meth:`to_checkpoint` (also reads checkpoints written before ``rng`` was recorded)."""
        return cls(int(saved["step"]), saved["images"], saved["raw_lrs"], saved["optimizer"],
                   Config.from_dict(saved["config"]), saved.get("labels"))


def save_state(storage: str | Path, state: RunState) -> Path | str:
    """Write ``state`` as checkpoint ``step-<step>.pt`` in ``storage`` (atomic, verified on read)."""
    from ddray.store.checkpoint import save_checkpoint

    payload = state.to_checkpoint()
    return save_checkpoint(storage, payload.pop("step"), payload)


def load_state(storage: str | Path) -> RunState | None:
    """The newest valid checkpoint in ``storage`` as a :class:`RunState`, or None if there is none."""
    from ddray.store.checkpoint import load_latest

    saved = load_latest(storage)
    return None if saved is None else RunState.from_checkpoint(saved)


def resume_differences(saved: Config, config: Config) -> list[str]:
    """Flat keys (``distill.steps``, …) in which ``config`` may not differ from a checkpoint's to continue it.

    The data, the model, the method (``distill.*`` except ``iterations``, which may
    grow) and the seed must match; cluster, output and tracking settings may change.
    """
    diff = [f"{section}.{f.name}" for section in ("data", "model", "distill")
            for f in fields(getattr(saved, section))
            if f.name != "iterations" and getattr(getattr(saved, section), f.name)
            != getattr(getattr(config, section), f.name)]
    if saved.run.seed != config.run.seed:
        diff.append("run.seed")
    return diff
