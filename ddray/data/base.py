"""What every data set is: a :class:`Dataset` of normalised tensors, and how images get normalised.

Loaders (:mod:`ddray.data.embedded`, :mod:`ddray.data.vision`, or your own through
:func:`ddray.data.register_dataset`) build one from numpy arrays with :func:`normalise`
and, for sets that ship without a test split, :func:`per_class_split`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_NAMES = tuple(str(i) for i in range(10))  # the class names of the digit sets (MNIST, USPS, …)


@dataclass(frozen=True)
class RawSplits:
    """A data set as decoded from its files, before normalisation: what file loaders return.

    Attributes:
        x_train: (N, C, H, W) uint8 images.
        y_train: (N,) int64 class indices 0‥C−1.
        x_test: (M, C, H, W) uint8.
        y_test: (M,) int64.
        classes: the C class names in label order.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]


@dataclass(frozen=True)
class Dataset:
    """A normalised image-classification data set held in memory.

    Attributes:
        name: registry name.
        x_train: (N, C, H, W) float32, normalised.
        y_train: (N,) int64 class indices.
        x_test: (M, C, H, W) float32, normalised.
        y_test: (M,) int64.
        num_classes: C.
        mean, std: per-channel statistics used for normalisation.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Image shape (C, H, W)."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    def resized(self, size: int) -> "Dataset":
        """The same data bilinearly resized to ``size``×``size`` (for adaptation)."""
        if self.shape[1:] == (size, size):
            return self

        def rs(x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)

        return Dataset(self.name, rs(self.x_train), self.y_train, rs(self.x_test), self.y_test,
                       self.num_classes, self.mean, self.std)


def normalise(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8/float images in [0, 1] as (N, C, H, W) → normalised float32 tensor."""
    x = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float32)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


def per_class_split(y: np.ndarray, train_fraction: float | None = None,
                    n_train: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split in file order: indices of (train, test)."""
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = n_train if n_train is not None else int(len(idx) * float(train_fraction or 0.8))
        train.append(idx[:k])
        test.append(idx[k:])
    return np.concatenate(train), np.concatenate(test)
