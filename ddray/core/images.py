"""Real images held raw and normalised per batch: :class:`Images`, and ZCA whitening (:class:`Zca`).

A data set's images stay in the form they were decoded to — uint8 (0‥255), or float32
in [0, 1] for sets that are not 8-bit (scikit-learn's digits, USPS) — and become the
network's input only when a batch is taken::

    x = (raw / 255 − mean) / std            per channel; float raw: (raw − mean) / std
    x = ((x.flatten(1) − μ) · W).view(…)     when the set is ZCA-whitened (Zca)

so a CIFAR-10 training split costs 153 MB instead of 614 MB, a GPU holds it as uint8,
and Ray workers on one node can share one read-only copy (numpy arrays in the object
store). ``images[idx]`` accepts whatever a tensor index accepts and returns the
normalised float32 batch on the raw data's device, so code written for a float tensor
(``x[idx]``, ``x[y == c]``, ``len(x)``, ``x.shape``, ``x.to(device)``) reads the same.

The raw rows may also come from a *row source* instead of a tensor — any object with
``shape``, ``dtype`` and ``take(indices) -> torch.Tensor`` (``ddray.data.rows`` reads
them from a Parquet file with a bounded cache) — which is how a set larger than a
worker's memory is read.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, Union

import torch


class RowSource(Protocol):
    """Raw image rows read on demand (a file-backed store): shape (N, C, H, W) and ``take``."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` (any shape of int64) → raw images of shape (*indices.shape, C, H, W), CPU."""
        ...

    def select(self, rows: torch.Tensor) -> "RowSource":
        """Rows ``rows`` (1-D) as a source of their own, nothing read."""
        ...


class Zca:
    """ZCA whitening of normalised images, fitted on a training split (as MTT and DATM use on CIFAR).

    With X the (N, D) flattened training images, μ their mean, Σ = (X − μ)ᵀ(X − μ)/(N − 1)
    = U diag(s) Uᵀ: W = U diag((s + eps)^−½) Uᵀ whitens, W⁻¹ = U diag((s + eps)^½) Uᵀ
    undoes it (for pictures). ``eps`` regularises the small eigenvalues (the papers: 0.1).

    Attributes:
        mean: μ, (D,) float32.
        matrix: W, (D, D) float32.
        inverse: W⁻¹, (D, D) float32.
        eps: the regularisation it was fitted with.
    """

    def __init__(self, mean: torch.Tensor, matrix: torch.Tensor, inverse: torch.Tensor, eps: float) -> None:
        self.mean, self.matrix, self.inverse, self.eps = mean, matrix, inverse, float(eps)

    @classmethod
    def fit(cls, images: "Images | torch.Tensor", eps: float = 0.1, chunk: int = 4096) -> "Zca":
        """Fit on (N, C, H, W) normalised images (an :class:`Images` is read in chunks), in float64."""
        n = len(images)
        if n < 2:
            raise ValueError(f"--zca: needs at least 2 training images, got {n}")
        total: torch.Tensor | None = None
        gram: torch.Tensor | None = None
        for lo in range(0, n, chunk):
            x = images[lo:lo + chunk].detach().to("cpu", torch.float64).flatten(1)
            total = x.sum(0) if total is None else total + x.sum(0)
            gram = x.T @ x if gram is None else gram + x.T @ x
        assert total is not None and gram is not None
        mean = total / n
        cov = (gram - n * torch.outer(mean, mean)) / (n - 1)
        s, u = torch.linalg.eigh(cov)  # Σ is symmetric: eigh = its SVD, cheaper and exact up to order
        s = s.clamp_min(0)
        w = (u * (s + eps).rsqrt()) @ u.T
        w_inv = (u * (s + eps).sqrt()) @ u.T
        return cls(mean.float(), w.float(), w_inv.float(), eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Whiten normalised images (..., C, H, W)."""
        shape = x.shape
        flat = x.reshape(-1, self.mean.numel())
        return ((flat - self.mean.to(x.device)) @ self.matrix.to(x.device)).view(shape)

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`__call__` (whitened → normalised images), e.g. to draw a whitened set."""
        shape = x.shape
        flat = x.reshape(-1, self.mean.numel())
        return (flat @ self.inverse.to(x.device) + self.mean.to(x.device)).view(shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The transform as named tensors (stored in artifacts and caches)."""
        return {"zca.mean": self.mean, "zca.matrix": self.matrix, "zca.inverse": self.inverse,
                "zca.eps": torch.tensor(self.eps, dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "Zca":
        return cls(t["zca.mean"], t["zca.matrix"], t["zca.inverse"], float(t["zca.eps"]))


class Images:
    """(N, C, H, W) real images held raw and normalised per batch (see the module docstring).

    Args:
        raw: uint8 images (0‥255), float32 images in [0, 1], or a :class:`RowSource`.
        mean, std: per-channel normalisation of the [0, 1] values; None for raw that is
            already normalised (a float tensor used as is, e.g. in tests).
        zca: whitening applied after normalisation, or None.
    """

    def __init__(self, raw: Union[torch.Tensor, RowSource], mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, zca: Zca | None = None,
                 device: torch.device | None = None, rows: torch.Tensor | None = None) -> None:
        self.raw, self.zca = raw, zca
        self._device = device  # where batches of a row source go (a tensor's own device otherwise)
        self.rows = rows  # a subset: these rows of a tensor ``raw`` (a view: nothing copied), else all
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = None if std is None else tuple(float(s) for s in std)
        self._bytes = raw.dtype == torch.uint8

    # -- what a tensor offers -------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.raw.shape[1:]))

    @property
    def device(self) -> torch.device:
        if isinstance(self.raw, torch.Tensor):
            return self.raw.device
        return self._device or torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """What a batch comes out as (float32)."""
        return torch.float32

    def __len__(self) -> int:
        return int(self.raw.shape[0]) if self.rows is None else len(self.rows)

    def __getitem__(self, index: Any) -> torch.Tensor:
        """The normalised (and whitened) float32 images at ``index`` (anything a tensor index takes)."""
        if isinstance(index, tuple) and len(index) > 1:  # into the pixels: normalise whole images first
            rows = self[index[0]]
            rest = index[1:] if isinstance(index[0], int) else (slice(None), *index[1:])
            return rows[rest]
        return self.normalise(self.take_raw(index))

    def to(self, device: torch.device | str) -> "Images":
        """The same images with their raw data on ``device`` (uint8 stays uint8; a row source's batches go there)."""
        if self.device == torch.device(device):
            return self
        if not isinstance(self.raw, torch.Tensor):
            return Images(self.raw, self.mean, self.std, self.zca, torch.device(device))
        rows = None if self.rows is None else self.rows.to(device)
        return Images(self.raw.to(device), self.mean, self.std, self.zca, rows=rows)

    def all(self) -> torch.Tensor:
        """Every image normalised: (N, C, H, W) float32 (4 bytes a pixel: for small sets and tests)."""
        return self[:]

    # -- raw access -----------------------------------------------------------------------------
    def take_raw(self, index: Any) -> torch.Tensor:
        """The raw images at ``index``, untouched."""
        if isinstance(self.raw, torch.Tensor):
            if self.rows is None:
                return self.raw[index]
            return self.raw[self.rows[index.to(self.rows.device) if isinstance(index, torch.Tensor) else index]]
        rows = torch.arange(len(self))[index.cpu() if isinstance(index, torch.Tensor) else index]
        return self.raw.take(rows).to(self.device)

    def subset(self, index: Any) -> "Images":
        """The images at ``index`` as another :class:`Images` (raw, not normalised; a row source is not read)."""
        if isinstance(self.raw, torch.Tensor):  # a view through row indices: a class's pool copies no pixels
            base = self.rows if self.rows is not None else torch.arange(len(self), device=self.raw.device)
            sel = base[index.to(base.device) if isinstance(index, torch.Tensor) else index].reshape(-1)
            return Images(self.raw, self.mean, self.std, self.zca, rows=sel)
        return Images(self.raw.select(torch.arange(len(self))[index]), self.mean, self.std, self.zca, self._device)

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw images (..., C, H, W) → the network's input, float32 on their device."""
        x = raw.to(torch.float32)
        if self.mean is not None and self.std is not None:
            shape = (len(self.mean), 1, 1)
            m = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(shape)
            s = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(shape)
            x = ((x / 255.0) - m) / s if self._bytes else (x - m) / s
        return self.zca(x) if self.zca is not None else x

    def with_zca(self, zca: Zca | None) -> "Images":
        return Images(self.raw, self.mean, self.std, zca, self._device, self.rows)


#: What the core's functions take as real images: a normalised tensor, or :class:`Images`.
ImageSource = Union[torch.Tensor, Images]


def subset(x: ImageSource, index: Any) -> ImageSource:
    """The images of ``x`` at ``index``, in the form ``x`` holds them (raw for :class:`Images`)."""
    return x.subset(index) if isinstance(x, Images) else x[index]
