"""What every method's objective is to the loops that call it: a meta-gradient per chunk of networks.

The implementations are DD's unrolled objective (:mod:`ddray.core.dd_objective`), gradient and
distribution matching (:mod:`ddray.core.matching`: DC, DSA, DM) and trajectory matching
(:mod:`ddray.core.trajectory`: MTT). The single-process loop and every Ray worker call one through
this interface only, so they never branch on the method.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ddray.core.unroll import MetaGrad


class Objective(Protocol):
    """What workers call: Σ over ``nets`` (indices within meta-step ``step``) of ∂L/∂(x̃, ρ) (and ∂L/∂z̃ for
    learned ``labels``: DD and MTT)."""

    def __call__(self, images: torch.Tensor, raw_lrs: torch.Tensor, step: int, nets: list[int],
                 labels: torch.Tensor | None = None) -> MetaGrad: ...

    def to(self, device: torch.device) -> "Objective": ...
