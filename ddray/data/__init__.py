"""The real data sets ddray distils: what a data set is, where each comes from, and the registry.

* :mod:`ddray.data.base` — :class:`Dataset` (normalised tensors) and :func:`normalise`;
* :mod:`ddray.data.embedded` — ``mnist5k`` and ``digits``, shipped inside PyPI packages;
* :mod:`ddray.data.vision` — the torchvision sets read from ``--data-root``;
* :mod:`ddray.data.folder`, :mod:`ddray.data.parquet` — the user's own images: image folders
  (or archives of them) and Parquet tables, decoded once into :mod:`ddray.data.cache`;
* :mod:`ddray.data.rows` — a training split read from a class-partitioned Parquet copy with a
  bounded cache (``--data-cache-mb``);
* :mod:`ddray.data.registry` — name → loader, class names, :func:`load_dataset`.

Images are held raw (uint8) and normalised per batch by :class:`ddray.core.images.Images`.
This package imports nothing else of ddray but :mod:`ddray.core`.
"""

from ddray.core.images import Images, Zca
from ddray.data.base import DIGIT_NAMES, Dataset, RawSplits, normalise, per_class_split
from ddray.data.embedded import MNIST_MEAN, MNIST_STD
from ddray.data.registry import (CLASS_NAMES, DATASETS, EMBEDDED, FILE_FORMATS, Loader, class_names, dataset_names,
                                 load_dataset, register_dataset)

__all__ = ["Dataset", "RawSplits", "Images", "Zca", "normalise", "per_class_split", "DIGIT_NAMES", "MNIST_MEAN",
           "MNIST_STD", "CLASS_NAMES", "DATASETS", "EMBEDDED", "FILE_FORMATS", "Loader", "class_names",
           "dataset_names", "load_dataset", "register_dataset"]
