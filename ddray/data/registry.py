"""Data-set registry: name → loader, and the class names pictures label their columns with.

Registered at import: the embedded sets (``mnist5k``, ``digits``; :mod:`ddray.data.embedded`)
and the torchvision sets read from ``data_root`` in their standard on-disk format
(``mnist``, ``fashion_mnist``, ``cifar10``, ``svhn``, ``usps``; :mod:`ddray.data.vision`).
Custom sets plug in with :func:`register_dataset`.

Every loader returns a :class:`~ddray.data.base.Dataset` of normalised float32 tensors:
``x_train`` (N, C, H, W), ``y_train`` (N,) int64, the same for the test split, the class
count and the per-channel mean/std used to normalise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from ddray.data.base import Dataset
from ddray.data.embedded import EMBEDDED_SETS
from ddray.data.vision import register_all

Loader = Callable[[Path | None, bool], Dataset]

#: name → loader(root, download). Embedded sets ignore ``root``/``download``.
DATASETS: dict[str, Loader] = {}
EMBEDDED = tuple(EMBEDDED_SETS)
#: name → the class names in label order (pictures label their columns with them).
CLASS_NAMES: dict[str, tuple[str, ...]] = {}


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


for _name, (_loader, _classes) in EMBEDDED_SETS.items():
    register_dataset(_name, _loader, _classes)
register_all(register_dataset)  # the torchvision sets
