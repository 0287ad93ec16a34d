"""Evaluation: train fresh networks on a distilled set with its schedule, test on real data.

Held-out networks are drawn from the EVAL seed stream (never the DISTILL one);
fixed-init sets use their own θ₀. Besides the schedule's own order, the S
batches can be applied in a shuffled order (a fresh permutation per epoch) to
measure how order-sensitive the distilled data is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.func import functional_call

from ddray.core.images import ImageSource
from ddray.core.inits import EVAL, InitSampler, generator
from ddray.core.models import Params
from ddray.core.unroll import step_schedule, unroll


@dataclass(frozen=True)
class EvalResult:
    """Test accuracy (in [0, 1]) over ``n`` held-out networks, and the attack rate if any."""

    mean: float
    std: float
    n: int
    accuracies: list[float]
    attack_rate_mean: float | None = None
    attack_rate_std: float | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def __str__(self) -> str:
        s = f"{100 * self.mean:.1f} ± {100 * self.std:.1f} % (n={self.n})"
        if self.attack_rate_mean is not None:
            s += f", attack success {100 * self.attack_rate_mean:.1f} ± {100 * (self.attack_rate_std or 0):.1f} %"
        return s


def shuffled_order(steps: int, epochs: int, seed: int) -> list[int]:
    """A fresh permutation of the S batches in every epoch."""
    g = generator(seed, EVAL, 1_000_003)
    return [int(b) for _ in range(epochs) for b in torch.randperm(steps, generator=g)]


@torch.no_grad()
def predict(model: nn.Module, params: Params, x: ImageSource, chunk: int = 2048) -> torch.Tensor:
    """Class predictions (K, M) of K networks on images x (M, C, H, W)."""
    k = next(iter(params.values())).shape[0]
    out = []
    for i in range(k):
        p = {n: v[i] for n, v in params.items()}
        out.append(torch.cat([functional_call(model, p, (x[j:j + chunk],)).argmax(1)
                              for j in range(0, len(x), chunk)]))
    return torch.stack(out)


def summarise(pred: torch.Tensor, y_test: torch.Tensor,
              attack: tuple[int, int] | None = None) -> EvalResult:
    """Accuracy statistics of predictions (K, M) against true labels."""
    acc = (pred == y_test).float().mean(1)
    rate_mean = rate_std = None
    if attack is not None:
        a, b = attack
        sel = y_test == a
        rates = (pred[:, sel] == b).float().mean(1)
        rate_mean, rate_std = float(rates.mean()), float(rates.std(unbiased=False))
    return EvalResult(float(acc.mean()), float(acc.std(unbiased=False)), len(acc),
                      [float(a) for a in acc], rate_mean, rate_std)


def train_predict(model: nn.Module, sampler: InitSampler, images: torch.Tensor, labels: torch.Tensor,
                  lrs: torch.Tensor, x_test: ImageSource, ids: list[int],
                  order: list[int] | None = None) -> torch.Tensor:
    """Held-out networks ``ids`` (keys (EVAL, 0, i)) trained at once (vmapped) on the set → predictions (len(ids), M).

    The unit of evaluation work: a chunk of networks gives the same predictions in any
    process, so a split of the networks over workers changes nothing.
    """
    order = order if order is not None else step_schedule(images.shape[0], len(lrs) // images.shape[0])
    with torch.no_grad():
        params = unroll(model, sampler.sample([(EVAL, 0, i) for i in ids]), images, labels, lrs, order)
        return predict(model, params, x_test)


def evaluate_set(model: nn.Module, sampler: InitSampler, images: torch.Tensor, labels: torch.Tensor,
                 lrs: torch.Tensor, x_test: ImageSource, y_test: torch.Tensor, nets: int = 20,
                 attack: tuple[int, int] | None = None, order: list[int] | None = None,
                 batch: int = 20) -> EvalResult:
    """Train ``nets`` held-out networks for T = len(lrs) steps on (images, labels) and test them.

    Args:
        images: (S, N, C, H, W) synthetic (or baseline) batches.
        lrs: (T,) positive step sizes in order of application.
        order: batch index per step (default t mod S).
        batch: networks trained at once (vmap width).
    """
    preds = [train_predict(model, sampler, images, labels, lrs, x_test, list(range(lo, min(nets, lo + batch))),
                           order) for lo in range(0, nets, batch)]
    return summarise(torch.cat(preds), y_test, attack)
