"""The real data sets ddray distils: what a data set is, where each comes from, and the registry.

* :mod:`ddray.data.base` — :class:`Dataset` (normalised tensors) and :func:`normalise`;
* :mod:`ddray.data.embedded` — ``mnist5k`` and ``digits``, shipped inside PyPI packages;
* :mod:`ddray.data.vision` — the torchvision sets read from ``--data-root``;
* :mod:`ddray.data.registry` — name → loader, class names, :func:`load_dataset`.

This package imports nothing else of ddray.
"""

from ddray.data.base import DIGIT_NAMES, Dataset, normalise, per_class_split
from ddray.data.embedded import MNIST_MEAN, MNIST_STD
from ddray.data.registry import (CLASS_NAMES, DATASETS, EMBEDDED, Loader, class_names, load_dataset,
                                 register_dataset)

__all__ = ["Dataset", "normalise", "per_class_split", "DIGIT_NAMES", "MNIST_MEAN", "MNIST_STD", "CLASS_NAMES",
           "DATASETS", "EMBEDDED", "Loader", "class_names", "load_dataset", "register_dataset"]
