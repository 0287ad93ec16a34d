"""Baselines with the same image budget as a distilled set (S × M images per class).

* ``random``: random real training images;
* ``optimized``: ``candidates`` random sets, each scored on training data; the best
  20 % are kept and evaluated (the best one is the written artifact);
* ``kmeans``: S·M k-means centroids of each class's training images;
* ``average``: the mean training image of each class, in every slot.

Every baseline is trained with one fixed step size for all T steps, picked from
:data:`LR_GRID` by the mean accuracy on (up to) 1,024 *training* images of a few
networks — the test split is never used to choose it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ddray.core.images import ImageSource
from ddray.core.inits import BASELINE, InitSampler, generator
from ddray.core.protocol_dd import EvalResult, evaluate_set, predict
from ddray.core.synthetic import class_labels
from ddray.core.unroll import unroll

METHODS = ("random", "optimized", "kmeans", "average")
LR_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass(frozen=True)
class Baseline:
    """A baseline set in the synthetic-set layout, its tuned step size and its evaluation."""

    method: str
    images: torch.Tensor  # (S, N, C, H, W)
    labels: torch.Tensor  # (N,)
    lr: float
    result: EvalResult


def _arrange(per_class: list[torch.Tensor], steps: int, ipc: int) -> torch.Tensor:
    """C tensors of (S·M, C, H, W) → (S, M·C, C, H, W), class-major within a step."""
    return torch.stack([torch.cat([pc[s * ipc:(s + 1) * ipc] for pc in per_class]) for s in range(steps)])


def random_real(x: ImageSource, y: torch.Tensor, steps: int, ipc: int, num_classes: int,
                g: torch.Generator) -> torch.Tensor:
    """Random real images of each class, without replacement where possible."""
    per_class = []
    for c in range(num_classes):
        pool = torch.nonzero(y == c).flatten()
        pick = pool[torch.randperm(len(pool), generator=g)[: steps * ipc]]
        if len(pick) < steps * ipc:
            pick = pool[torch.randint(len(pool), (steps * ipc,), generator=g)]
        per_class.append(x[pick])
    return _arrange(per_class, steps, ipc)


def kmeans_centroids(x: ImageSource, y: torch.Tensor, steps: int, ipc: int, num_classes: int,
                     seed: int) -> torch.Tensor:
    """S·M k-means centroids per class (scikit-learn, k-means++, fixed seed)."""
    from sklearn.cluster import KMeans

    per_class = []
    for c in range(num_classes):
        xc = x[y == c].flatten(1).numpy().astype(np.float64)
        km = KMeans(n_clusters=steps * ipc, n_init=3, random_state=seed % 2**31).fit(xc)
        per_class.append(torch.as_tensor(km.cluster_centers_, dtype=torch.float32).view(-1, *x.shape[1:]))
    return _arrange(per_class, steps, ipc)


def class_averages(x: ImageSource, y: torch.Tensor, steps: int, ipc: int,
                   num_classes: int) -> torch.Tensor:
    """The mean image of each class, repeated in all S·M slots."""
    per_class = [x[y == c].mean(0, keepdim=True).expand(steps * ipc, *x.shape[1:]) for c in range(num_classes)]
    return _arrange(per_class, steps, ipc)


def train_score(model: nn.Module, sampler: InitSampler, images: torch.Tensor, labels: torch.Tensor,
                lr: float, epochs: int, x: torch.Tensor, y: torch.Tensor, key: int, nets: int = 4) -> float:
    """Mean accuracy on (x, y) (training data) of ``nets`` networks trained with a constant step size."""
    lrs = torch.full((images.shape[0] * epochs,), lr)
    with torch.no_grad():
        params = unroll(model, sampler.sample([(BASELINE, key, i) for i in range(nets)]), images, labels, lrs)
    pred = predict(model, params, x)
    acc = (pred == y).float().mean()
    return float(acc) if torch.isfinite(acc) else 0.0


def tune_lr(model: nn.Module, sampler: InitSampler, images: torch.Tensor, labels: torch.Tensor,
            epochs: int, x: torch.Tensor, y: torch.Tensor) -> float:
    """The step size of :data:`LR_GRID` with the best training-data score."""
    scores = [train_score(model, sampler, images, labels, lr, epochs, x, y, key=0) for lr in LR_GRID]
    return LR_GRID[int(np.argmax(scores))]


def make_baseline(method: str, model: nn.Module, sampler: InitSampler, eval_sampler: InitSampler,
                  x_train: ImageSource, y_train: torch.Tensor, x_test: ImageSource, y_test: torch.Tensor,
                  steps: int, epochs: int, ipc: int, num_classes: int, seed: int, nets: int = 20,
                  candidates: int = 50, attack: tuple[int, int] | None = None) -> Baseline:
    """Build, tune and evaluate one baseline.

    Args:
        sampler: θ₀ draws used to tune the step size / score candidates (BASELINE stream).
        eval_sampler: held-out θ₀ draws for the reported test accuracy (EVAL stream).
        candidates: random sets drawn by ``optimized``.
    """
    if method not in METHODS:
        raise ValueError(f"--method: unknown baseline {method!r}; choose one of {', '.join(METHODS)}")
    g = generator(seed, BASELINE, METHODS.index(method))
    labels = class_labels(num_classes, ipc)
    score_idx = torch.randperm(len(x_train), generator=g)[:1024]
    xs, ys = x_train[score_idx], y_train[score_idx]
    if method == "random":
        images = random_real(x_train, y_train, steps, ipc, num_classes, g)
    elif method == "kmeans":
        images = kmeans_centroids(x_train, y_train, steps, ipc, num_classes, seed)
    elif method == "average":
        images = class_averages(x_train, y_train, steps, ipc, num_classes)
    else:
        return _optimized(model, sampler, eval_sampler, x_train, y_train, x_test, y_test, xs, ys, steps,
                          epochs, ipc, num_classes, g, nets, candidates, attack)
    lr = tune_lr(model, sampler, images, labels, epochs, xs, ys)
    lrs = torch.full((steps * epochs,), lr)
    result = evaluate_set(model, eval_sampler, images, labels, lrs, x_test, y_test, nets, attack)
    return Baseline(method, images, labels, lr, result)


def _optimized(model: nn.Module, sampler: InitSampler, eval_sampler: InitSampler, x_train: ImageSource,
               y_train: torch.Tensor, x_test: ImageSource, y_test: torch.Tensor, xs: torch.Tensor,
               ys: torch.Tensor, steps: int, epochs: int, ipc: int, num_classes: int, g: torch.Generator,
               nets: int, candidates: int, attack: tuple[int, int] | None) -> Baseline:
    labels = class_labels(num_classes, ipc)
    sets = [random_real(x_train, y_train, steps, ipc, num_classes, g) for _ in range(candidates)]
    lr = tune_lr(model, sampler, sets[0], labels, epochs, xs, ys)
    scores = [train_score(model, sampler, s, labels, lr, epochs, xs, ys, key=1 + i) for i, s in enumerate(sets)]
    top = [sets[i] for i in np.argsort(scores)[::-1][: max(1, candidates // 5)]]
    lrs = torch.full((steps * epochs,), lr)
    per_set = max(1, nets // len(top))
    preds: list[EvalResult] = [evaluate_set(model, eval_sampler, s, labels, lrs, x_test, y_test, per_set, attack)
                               for s in top]
    accs = [a for r in preds for a in r.accuracies]
    rates = [r.attack_rate_mean for r in preds if r.attack_rate_mean is not None]
    result = EvalResult(float(np.mean(accs)), float(np.std(accs)), len(accs), accs,
                        float(np.mean(rates)) if rates else None, float(np.std(rates)) if rates else None)
    return Baseline("optimized", top[0], labels, lr, result)
