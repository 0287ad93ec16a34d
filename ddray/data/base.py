"""What every data set is: a :class:`Dataset` of raw images normalised per batch, and how it is built.

Loaders (:mod:`ddray.data.embedded`, :mod:`ddray.data.vision`, the file loaders
:mod:`ddray.data.folder` and :mod:`ddray.data.parquet`, or your own through
:func:`ddray.data.register_dataset`) decode to uint8 (:class:`RawSplits`) and build one with
:meth:`Dataset.from_raw`, or wrap raw tensors in :class:`~ddray.core.images.Images`; sets that
ship without a test split use :func:`per_class_split`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ddray.core.images import Images, Zca

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
        stats: the training split's per-channel (mean, std) on the [0, 1] scale, when known (the decode cache
            keeps them: computing them reads every byte).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None


@dataclass(frozen=True)
class Dataset:
    """An image-classification data set held in memory, raw, normalised per batch.

    Attributes:
        name: registry name.
        x_train: (N, C, H, W) :class:`~ddray.core.images.Images` — uint8 (or float32 in [0, 1]) held
            raw; ``x_train[idx]`` is the normalised float32 batch. A normalised float tensor given
            here is wrapped as is.
        y_train: (N,) int64 class indices.
        x_test: (M, C, H, W) Images, as ``x_train``.
        y_test: (M,) int64.
        num_classes: C.
        mean, std: per-channel statistics used for normalisation.
        classes: the class names in label order (None: the registry's, or the indices).
    """

    name: str
    x_train: Images
    y_train: torch.Tensor
    x_test: Images
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for split in ("x_train", "x_test"):
            x = getattr(self, split)
            if isinstance(x, torch.Tensor):
                object.__setattr__(self, split, Images(x))

    @classmethod
    def from_raw(cls, name: str, raw: RawSplits, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None) -> "Dataset":
        """A set decoded to uint8: normalised with ``mean``/``std`` (default: the train split's, per channel)."""
        if mean is None or std is None:
            mean, std = raw.stats if raw.stats is not None else channel_stats(raw.x_train)
        x_train, x_test = as_tensor(raw.x_train), as_tensor(raw.x_test)
        return cls(name, Images(x_train, mean, std), torch.as_tensor(raw.y_train, dtype=torch.int64),
                   Images(x_test, mean, std), torch.as_tensor(raw.y_test, dtype=torch.int64),
                   len(raw.classes), tuple(mean), tuple(std), tuple(raw.classes))

    def to_shared(self) -> dict[str, Any]:
        """The set as numpy arrays and plain values, for ``ray.put``: the object store then holds one read-only
        copy per node, which every process there maps without copying (:meth:`from_shared`)."""
        out: dict[str, Any] = {"name": self.name, "num_classes": self.num_classes, "mean": self.mean,
                               "std": self.std, "classes": self.classes}
        for split, x in (("train", self.x_train), ("test", self.x_test)):
            out[f"x_{split}"] = x.take_raw(slice(None)).cpu().numpy()
            out[f"norm_{split}"] = (x.mean, x.std)
        out["y_train"], out["y_test"] = self.y_train.numpy(), self.y_test.numpy()
        zca = self.zca
        out["zca"] = None if zca is None else {k: v.numpy() for k, v in zca.tensors().items()}
        return out

    @classmethod
    def from_shared(cls, d: dict[str, Any]) -> "Dataset":
        """The set of :meth:`to_shared`'s arrays, wrapped without a copy (read-only where they are)."""
        zca = None if d["zca"] is None else Zca.from_tensors({k: as_tensor(v) for k, v in d["zca"].items()})
        splits = {s: Images(as_tensor(d[f"x_{s}"]), d[f"norm_{s}"][0], d[f"norm_{s}"][1], zca) for s in ("train", "test")}
        return cls(d["name"], splits["train"], as_tensor(d["y_train"]), splits["test"], as_tensor(d["y_test"]),
                   d["num_classes"], tuple(d["mean"]), tuple(d["std"]), d["classes"])

    @property
    def shape(self) -> tuple[int, int, int]:
        """Image shape (C, H, W)."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    @property
    def zca(self) -> Zca | None:
        """The whitening applied after normalisation, or None."""
        return self.x_train.zca

    def with_zca(self, zca: Zca | None) -> "Dataset":
        """The same data whitened by ``zca`` (None: not whitened)."""
        return replace(self, x_train=self.x_train.with_zca(zca), x_test=self.x_test.with_zca(zca))

    def resized(self, size: int) -> "Dataset":
        """The same data bilinearly resized to ``size``×``size`` (for adaptation), held as float32 in [0, 1]."""
        if self.shape[1:] == (size, size):
            return self

        def rs(x: Images) -> Images:
            raw = x.take_raw(slice(None))
            unit = raw.to(torch.float32) / 255.0 if raw.dtype == torch.uint8 else raw.to(torch.float32)
            out = F.interpolate(unit, size=(size, size), mode="bilinear", align_corners=False)
            return Images(out, x.mean, x.std, None)

        return replace(self, x_train=rs(self.x_train), x_test=rs(self.x_test))


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W) on the [0, 1] scale, exact from each channel's
    histogram of byte values (a pass over the bytes, no float copy of the set)."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = np.bincount(np.ascontiguousarray(x[:, c]).reshape(-1), minlength=256).astype(np.float64)
        n = max(counts.sum(), 1.0)
        mean = float((counts * levels).sum() / n)
        var = float((counts * (levels - mean) ** 2).sum() / n)
        means.append(mean)
        stds.append(var ** 0.5 if var > 0 else 1.0)
    return tuple(means), tuple(stds)


def as_tensor(x: np.ndarray) -> torch.Tensor:
    """``x`` as a tensor without a copy; a read-only array (the object store's, a memory map) is wrapped all the
    same — torch only warns about those, and ddray never writes into real images."""
    if x.flags.writeable:
        return torch.from_numpy(np.ascontiguousarray(x))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(x)


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
