"""The DD outer objective for one meta-step: sample θ₀s and a real batch, return the meta-gradient.

:class:`DDObjective` is what a single process and every Ray worker call: it owns
its own copy of the real training data and derives all randomness from
(run seed, meta-step, net index), so splitting a meta-step's K networks over
any number of workers yields the same sum of gradients.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ddray.core.capture import MetaStepGraphs
from ddray.core.images import ImageSource
from ddray.core.inits import DISTILL, REAL_BATCH, DeviceSampler, InitSampler, generator
from ddray.core.kernels import Kernels
from ddray.core.unroll import MetaGrad, meta_gradient


def attack_targets(y: torch.Tensor, attack: tuple[int, int] | None) -> torch.Tensor:
    """Labels the outer loss trains towards: class a relabelled as b under ``--attack a:b``."""
    if attack is None:
        return y
    a, b = attack
    return torch.where(y == a, torch.full_like(y, b), y)


class DDObjective:
    """Meta-gradient of the DD outer loss for a share of a meta-step's networks.

    Args:
        model: template module.
        sampler: draws θ₀ for keys (DISTILL, step, net index).
        x_train, y_train: this process's copy of the real training split.
        labels: ỹ, (N,).
        batch_size: real images per meta-step (shared by the step's K networks).
        seed: run seed.
        attack: (a, b) for the malicious-data objective, else None.
        memory: ``full`` or ``recompute``.
        compile: compile the inner step and the real-batch gradient (:mod:`ddray.core.kernels`).
        cuda_graphs: on a CUDA device (:meth:`to`), replay each meta-step from a CUDA graph captured
            once per shape (:mod:`ddray.core.capture`; eager kernels inside the graph, so ``compile``
            applies only where a shape cannot be captured). No effect on CPU.
    """

    def __init__(self, model: nn.Module, sampler: InitSampler, x_train: ImageSource,
                 y_train: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                 attack: tuple[int, int] | None = None, memory: str = "full", compile: bool = False,
                 cuda_graphs: bool = True) -> None:
        self.model, self.sampler = model, sampler
        self.x_train, self.y_train = x_train, y_train
        self.labels, self.seed, self.attack, self.memory = labels, seed, attack, memory
        self.batch_size = min(batch_size, len(x_train))
        self.kernels = Kernels(model, compile)
        self.cuda_graphs = cuda_graphs
        self.graphs: MetaStepGraphs | None = None  # made by to(a CUDA device)

    def real_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The real batch of meta-step ``step`` (same on every worker), targets relabelled for attacks."""
        idx = torch.randperm(len(self.x_train), generator=generator(self.seed, REAL_BATCH, step))
        idx = idx[: self.batch_size]
        return self.x_train[idx], attack_targets(self.y_train[idx], self.attack)

    def __call__(self, images: torch.Tensor, raw_lrs: torch.Tensor, step: int,
                 nets: list[int], labels: torch.Tensor | None = None) -> MetaGrad:
        """Σ over ``nets`` (indices within the meta-step) of ∂ℓ(x_real; θ_T)/∂(x̃, ρ) — and ∂/∂z̃ when
        ``labels`` are learned label logits z̃ (N, classes); None: the fixed hard labels."""
        params0 = self.sampler.sample([(DISTILL, step, k) for k in nets])
        x, y = self.real_batch(step)
        labels = self.labels if labels is None else labels
        if self.graphs is not None:
            replayed = self.graphs(params0, images, labels, raw_lrs, x, y)
            if replayed is not None:
                return replayed
        return meta_gradient(self.model, params0, images, labels, raw_lrs, x, y, self.memory, self.kernels)

    def to(self, device: torch.device) -> "DDObjective":
        """Keep the real data on ``device`` and hand θ₀ draws over there."""
        self.x_train, self.y_train = self.x_train.to(device), self.y_train.to(device)
        self.labels, self.sampler = self.labels.to(device), DeviceSampler(self.sampler, device)
        self.kernels = Kernels(self.model, self.kernels.compiled, device)
        self.graphs = MetaStepGraphs(self.model, self.memory) if self.cuda_graphs and device.type == "cuda" else None
        return self
