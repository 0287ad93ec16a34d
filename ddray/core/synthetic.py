"""The learned synthetic set (x̃, ỹ, ρ) and its outer optimiser.

Step sizes are parametrised as η̃ = softplus(ρ), so they stay positive; ρ is
initialised so that η̃ starts at ``init_lr`` (0.02 by default, as the original).
The outer optimiser is Adam (betas (0.5, 0.999)) on x̃ and ρ with a step decay.

Labels are hard class indices (N,), or — learned (``--labels learned``; Bohdal et al. 2020,
Sucholutsky & Schonlau 2021) — label logits z̃ (N, classes) whose softmax the networks
train towards. z̃ starts at its image's class with probability :data:`LABEL_CONFIDENCE`
(:func:`label_logits`) and has its own learning rate in the outer optimiser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ddray.core.images import ImageSource


def inverse_softplus(y: float) -> float:
    """ρ such that softplus(ρ) = y (y > 0)."""
    return y + math.log(-math.expm1(-y))


LABEL_CONFIDENCE = 0.9  # learned labels start at their class with this probability


def label_logits(hard: torch.Tensor, num_classes: int, confidence: float = LABEL_CONFIDENCE) -> torch.Tensor:
    """z̃ (N, classes) with softmax(z̃) = ``confidence`` on each image's class, the rest shared evenly."""
    z = torch.zeros(len(hard), num_classes)
    z[torch.arange(len(hard)), hard] = math.log(confidence * (num_classes - 1) / (1 - confidence))
    return z


def class_labels(num_classes: int, ipc: int) -> torch.Tensor:
    """ỹ for one step: ``ipc`` images of class 0, then of class 1, … — shape (ipc·C,)."""
    return torch.arange(num_classes).repeat_interleave(ipc)


@dataclass
class SyntheticSet:
    """x̃ (S, N, C, H, W), ỹ — hard (N,) or learned logits z̃ (N, classes) — and raw step sizes ρ (T,),
    T = S × epochs."""

    images: torch.Tensor
    labels: torch.Tensor
    raw_lrs: torch.Tensor
    epochs: int

    @property
    def steps(self) -> int:
        return int(self.images.shape[0])

    @property
    def learns_labels(self) -> bool:
        """Whether ỹ are learned label logits (float) rather than hard class indices."""
        return self.labels.is_floating_point()

    @property
    def lrs(self) -> torch.Tensor:
        """η̃ = softplus(ρ), (T,) in order of application."""
        return F.softplus(self.raw_lrs)

    @classmethod
    def initial(cls, steps: int, epochs: int, ipc: int, num_classes: int,
                shape: tuple[int, int, int], init_lr: float, generator: torch.Generator,
                real: tuple[ImageSource, torch.Tensor] | None = None) -> "SyntheticSet":
        """Noise images (N(0, 1) in normalised space, as the original) or, given
        ``real`` = (x_train, y_train), randomly drawn real images of each class."""
        labels = class_labels(num_classes, ipc)
        n = labels.numel()
        if real is None:
            images = torch.randn((steps, n, *shape), generator=generator)
        else:
            x, y = real
            images = torch.empty((steps, n, *shape))
            for c in range(num_classes):
                pool = torch.nonzero(y == c).flatten()
                if pool.numel() == 0:
                    raise ValueError(f"--syn-init real: class {c} has no training images")
                pick = pool[torch.randint(pool.numel(), (steps, ipc), generator=generator)]
                images[:, c * ipc:(c + 1) * ipc] = x[pick]
        raw = torch.full((steps * epochs,), inverse_softplus(init_lr))
        return cls(images, labels, raw, epochs)


class OuterOptimizer:
    """The outer optimiser on (x̃, ρ) with lr × ``decay`` every ``decay_every`` applied updates.

    ``kind`` ``adam`` (DD: betas (0.5, 0.999), one learning rate for x̃ and ρ) or
    ``sgd`` (DC/DSA/DM/MTT: momentum ``momentum``; ρ gets ``lr_lrs`` when given —
    MTT's separate learning rate of the step size). Learned labels z̃ are a third
    parameter (id 2) with learning rate ``lr_labels``. State is explicit and
    serialisable (:meth:`state_dict`), so a checkpointed run resumes bit for bit.
    """

    def __init__(self, syn: SyntheticSet, lr: float, decay: float, decay_every: int,
                 betas: tuple[float, float] = (0.5, 0.999), kind: str = "adam", momentum: float = 0.0,
                 lr_lrs: float | None = None, lr_labels: float | None = None) -> None:
        self.syn = syn
        syn.images.requires_grad_(False)
        syn.raw_lrs.requires_grad_(False)
        groups: list[dict[str, Any]] = [{"params": [syn.images, syn.raw_lrs]}]
        if lr_lrs is not None:
            groups = [{"params": [syn.images]}, {"params": [syn.raw_lrs], "lr": lr_lrs}]
        if syn.learns_labels:
            if lr_labels is None:
                raise ValueError("OuterOptimizer: learned labels need lr_labels (--lr-labels)")
            syn.labels.requires_grad_(False)
            groups.append({"params": [syn.labels], "lr": lr_labels})
        if kind == "adam":
            self.opt: torch.optim.Optimizer = torch.optim.Adam(groups, lr=lr, betas=betas)
        elif kind == "sgd":
            self.opt = torch.optim.SGD(groups, lr=lr, momentum=momentum)
        else:
            raise ValueError(f"OuterOptimizer: unknown kind {kind!r}; adam or sgd")
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=decay_every, gamma=decay)

    def apply(self, grad_images: torch.Tensor, grad_raw_lrs: torch.Tensor,
              grad_labels: torch.Tensor | None = None) -> None:
        """One step with the given (averaged) meta-gradients (``grad_labels``: with learned labels)."""
        if self.syn.learns_labels != (grad_labels is not None):
            raise ValueError("OuterOptimizer.apply: a label gradient goes with learned labels, and only with them")
        self.syn.images.grad = grad_images.to(self.syn.images.dtype)
        self.syn.raw_lrs.grad = grad_raw_lrs.to(self.syn.raw_lrs.dtype)
        if grad_labels is not None:
            self.syn.labels.grad = grad_labels.to(self.syn.labels.dtype)
        self.opt.step()
        self.sched.step()
        self.syn.images.grad = self.syn.raw_lrs.grad = self.syn.labels.grad = None

    @property
    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
