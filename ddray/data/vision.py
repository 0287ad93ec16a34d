"""torchvision data sets read from a local root in their standard on-disk format.

Five sets are registered (by :func:`register_all`, called from :mod:`ddray.data.registry`):
``mnist``, ``fashion_mnist``, ``cifar10``, ``svhn`` and ``usps``. Each is read from
``root`` (the CLI's ``--data-root``) in exactly the layout torchvision itself
downloads to, so an existing torchvision root works as is::

    <root>/MNIST/raw/train-images-idx3-ubyte       mnist (IDX; each file may
    <root>/MNIST/raw/train-labels-idx1-ubyte         instead be the ``.gz``
    <root>/MNIST/raw/t10k-images-idx3-ubyte          version torchvision
    <root>/MNIST/raw/t10k-labels-idx1-ubyte          downloads next to it)
    <root>/FashionMNIST/raw/...                    fashion_mnist (same four IDX names)
    <root>/cifar-10-batches-py/data_batch_1..5     cifar10 (pickles: b"data" uint8
    <root>/cifar-10-batches-py/test_batch            (N, 3072) CHW-planar, b"labels")
    <root>/train_32x32.mat                         svhn (MATLAB v5: "X" uint8
    <root>/test_32x32.mat                            (32, 32, 3, N), "y" (N, 1), 10 = digit 0)
    <root>/usps.bz2                                usps (bzip2 libsvm lines
    <root>/usps.t.bz2                                "label idx:val ...", labels 1..10,
                                                     256 values in [-1, 1], 16×16)

The files are parsed here with numpy / pickle / scipy / bz2 / gzip, not through
torchvision's data-set classes: those verify MD5 sums, so they reject the tiny
fixture files the tests use (and any re-packed copy). torchvision is only used to
*fetch* missing files when ``download=True``; afterwards the files are read by the
code below. CIFAR batches are Python pickles, read with ``pickle`` exactly as
torchvision does — only point ``root`` at files you trust.

Pixels are held as read (uint8; USPS's [-1, 1] floats mapped to [0, 1] by (v + 1) / 2 and
kept as float32 rather than quantised to uint8 as torchvision does) and normalised per
batch (:class:`~ddray.core.images.Images`) with fixed per-channel constants:

===============  ==========================  ==========================
set              mean                        std
===============  ==========================  ==========================
mnist            (0.1307,)                   (0.3081,)
fashion_mnist    (0.2860,)                   (0.3530,)
cifar10          (0.4914, 0.4822, 0.4465)    (0.2470, 0.2435, 0.2616)
svhn             (0.4377, 0.4438, 0.4728)    (0.1980, 0.2010, 0.1970)
usps             (0.2469,)                   (0.2989,)
===============  ==========================  ==========================

USPS uses the fixed, commonly quoted constants (those of the full USPS training
split), *not* statistics recomputed from whatever files are at ``root``, so a
subset or a re-packed copy is normalised the same way as the full set.

Labels are int64 in 0..9 and every set has 10 classes, registered with their names
(digits ``0``–``9``; FashionMNIST's and CIFAR-10's as torchvision names them). Missing files raise a
one-line :class:`ValueError` naming the set, the exact expected path and how to
get the files (``--download`` or ``--data-root``).
"""

from __future__ import annotations

import bz2
import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ddray.core.images import Images
from ddray.data.base import DIGIT_NAMES, Dataset, as_tensor

#: ``(x_train, y_train, x_test, y_test)``: uint8 (N, C, H, W) images (USPS: float32 in [0, 1]), int64 labels.
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
_SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")
_USPS_FILES = ("usps.bz2", "usps.t.bz2")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# --------------------------------------------------------------------------- file formats

def _open_maybe_gzip(path: Path) -> Any:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), optionally gzip-compressed (``.gz``).

    The header is two zero bytes, a type code (0x08 = uint8, ...), the number of
    dimensions, then one big-endian uint32 per dimension (so ``2051`` = uint8 3-D
    images, ``2049`` = uint8 1-D labels); the data follows in C order.

    Raises:
        ValueError: bad magic number or a size that does not match the header.
    """
    path = Path(path)
    with _open_maybe_gzip(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f"{path}: IDX header says {dims} ({expected} bytes) "
                         f"but {len(data) - offset} bytes follow")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims)


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch → ((N, 3, 32, 32) uint8, (N,) int64 labels).

    Batches are pickles (written by Python 2) holding ``b"data"`` uint8 (N, 3072),
    channel-planar R, G, B, and ``b"labels"``; loaded with ``encoding="bytes"``.
    """
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")

    def get(key: str) -> Any:
        for k in (key.encode(), key):
            if k in d:
                return d[k]
        raise ValueError(f"{path}: CIFAR batch has no {key!r} entry")

    x = np.asarray(get("data"), dtype=np.uint8).reshape(-1, 3, 32, 32)
    y = np.asarray(get("labels"), dtype=np.int64).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
    return x, y


def read_svhn_mat(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an SVHN ``*_32x32.mat`` → ((N, 3, 32, 32) uint8, (N,) int64 labels 0..9).

    ``X`` is stored as (H, W, C, N) and ``y`` as (N, 1) with label 10 for digit 0.
    """
    from scipy.io import loadmat

    m = loadmat(str(path))
    x = np.transpose(np.asarray(m["X"], dtype=np.uint8), (3, 2, 0, 1))  # (H,W,C,N) → (N,C,H,W)
    y = np.asarray(m["y"]).astype(np.int64).reshape(-1)
    y = np.where(y == 10, 0, y)
    if len(x) != len(y):
        raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
    return x, y


def read_usps_bz2(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a USPS libsvm ``.bz2`` file → ((N, 1, 16, 16) float32 in [0, 1], (N,) int64 0..9).

    Each line is ``label idx:val ...`` with labels 1..10 (→ 0..9) and 256 pixel
    values in [-1, 1] (1-based indices, row-major 16×16), mapped by (v + 1) / 2.
    Omitted indices take libsvm's implicit value 0.
    """
    labels: list[int] = []
    rows: list[np.ndarray] = []
    with bz2.open(path, "rt", encoding="ascii") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            labels.append(int(float(parts[0])))
            pairs = [tok.partition(":") for tok in parts[1:]]
            values = np.asarray([v for _, _, v in pairs], dtype=np.float32)
            index = np.asarray([i for i, _, _ in pairs], dtype=np.int64) - 1
            if len(index) == 256 and np.array_equal(index, np.arange(256)):
                rows.append(values)
                continue
            if len(index) and (index.min() < 0 or index.max() >= 256):
                raise ValueError(f"{path}:{lineno}: feature index outside 1..256")
            row = np.zeros(256, dtype=np.float32)
            row[index] = values
            rows.append(row)
    y = np.asarray(labels, dtype=np.int64) - 1
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise ValueError(f"{path}: labels must be 1..10, found {y.min() + 1}..{y.max() + 1}")
    x = np.stack(rows) if rows else np.zeros((0, 256), dtype=np.float32)
    x = np.clip((x + 1.0) / 2.0, 0.0, 1.0).astype(np.float32).reshape(-1, 1, 16, 16)
    return x, y


# --------------------------------------------------------------------------- data-set specs

@dataclass(frozen=True)
class _Spec:
    """How to find, fetch and read one torchvision data set."""

    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: required files relative to root; each entry lists accepted alternatives, preferred first.
    files: tuple[tuple[str, ...], ...]
    #: ``fetch(root, missing_indices)``: download the missing entries of ``files`` via torchvision.
    fetch: Callable[[Path, list[int]], None]
    #: ``read(paths)``: the resolved path of each entry of ``files`` → :data:`Arrays`.
    read: Callable[[list[Path]], Arrays]
    #: the class names in label order.
    classes: tuple[str, ...] = DIGIT_NAMES


def _find(root: Path, alternatives: Sequence[str]) -> Path | None:
    for rel in alternatives:
        if (root / rel).is_file():
            return root / rel
    return None


def _describe(root: Path | str, alternatives: Sequence[str]) -> str:
    first = Path(root) / alternatives[0]
    return f"{first} (or {first.name}.gz)" if len(alternatives) > 1 else str(first)


def _resolve(spec: _Spec, root: Path | None, download: bool) -> list[Path]:
    """Paths of every required file, fetching missing ones if allowed; else a one-line ValueError."""
    how = "pass --download to fetch it or --data-root DIR pointing at a torchvision root"
    if root is None:
        raise ValueError(f"--dataset {spec.name}: no data root given (expected "
                         f"{_describe('DIR', spec.files[0])}); pass --data-root DIR pointing at a "
                         f"torchvision root (add --download to fetch the files into it)")
    found = [_find(root, alts) for alts in spec.files]
    missing = [i for i, p in enumerate(found) if p is None]
    if missing and download:
        try:
            root.mkdir(parents=True, exist_ok=True)
            spec.fetch(root, missing)
        except Exception as exc:  # network/IO/checksum errors from torchvision
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise ValueError(f"--dataset {spec.name}: downloading into {root} failed ({detail}); "
                             f"place {_describe(root, spec.files[missing[0]])} there by hand or "
                             f"retry with network access") from exc
        found = [_find(root, alts) for alts in spec.files]
        missing = [i for i, p in enumerate(found) if p is None]
        how = "the torchvision download did not produce it; place it there by hand"
    if missing:
        raise ValueError(f"--dataset {spec.name}: missing {_describe(root, spec.files[missing[0]])}; "
                         f"{how}")
    return [p for p in found if p is not None]


def _load(spec: _Spec, root: Path | None, download: bool) -> Dataset:
    import torch

    x_train, y_train, x_test, y_test = spec.read(_resolve(spec, root, download))
    return Dataset(spec.name,
                   Images(as_tensor(x_train), spec.mean, spec.std), torch.as_tensor(y_train, dtype=torch.int64),
                   Images(as_tensor(x_test), spec.mean, spec.std), torch.as_tensor(y_test, dtype=torch.int64),
                   10, spec.mean, spec.std, spec.classes)


def _as_bytes(x: np.ndarray) -> np.ndarray:
    """uint8 (N, C, H, W), held as it is (normalised per batch: :class:`~ddray.core.images.Images`)."""
    return np.ascontiguousarray(x, dtype=np.uint8)


# mnist / fashion_mnist -------------------------------------------------------------------

def _idx_spec(name: str, folder: str, tv_class: str, mean: tuple[float, ...], std: tuple[float, ...],
              classes: tuple[str, ...] = DIGIT_NAMES) -> _Spec:
    files = tuple((f"{folder}/raw/{f}", f"{folder}/raw/{f}.gz") for f in _MNIST_FILES)

    def fetch(root: Path, missing: list[int]) -> None:
        import torchvision.datasets as tvd

        getattr(tvd, tv_class)(root=str(root), train=True, download=True)  # fetches both splits

    def read(paths: list[Path]) -> Arrays:
        xs, ys = [], []
        for img_path, lbl_path in ((paths[0], paths[1]), (paths[2], paths[3])):
            x, y = read_idx(img_path), read_idx(lbl_path)
            if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
                raise ValueError(f"{img_path}: expected (N, H, W) images and (N,) labels, "
                                 f"got {x.shape} and {y.shape}")
            xs.append(_as_bytes(np.asarray(x, dtype=np.uint8)[:, None]))
            ys.append(y.astype(np.int64))
        return xs[0], ys[0], xs[1], ys[1]

    return _Spec(name, mean, std, files, fetch, read, classes)


# cifar10 ---------------------------------------------------------------------------------

def _cifar_fetch(root: Path, missing: list[int]) -> None:
    import torchvision.datasets as tvd

    tvd.CIFAR10(root=str(root), train=True, download=True)  # one archive holds both splits


def _cifar_read(paths: list[Path]) -> Arrays:
    batches = [read_cifar_batch(p) for p in paths]
    x_train = np.concatenate([b[0] for b in batches[:-1]])
    y_train = np.concatenate([b[1] for b in batches[:-1]])
    x_test, y_test = batches[-1]
    return _as_bytes(x_train), y_train, _as_bytes(x_test), y_test


# svhn ------------------------------------------------------------------------------------

def _svhn_fetch(root: Path, missing: list[int]) -> None:
    import torchvision.datasets as tvd

    for i in missing:
        tvd.SVHN(root=str(root), split=("train", "test")[i], download=True)


def _svhn_read(paths: list[Path]) -> Arrays:
    x_train, y_train = read_svhn_mat(paths[0])
    x_test, y_test = read_svhn_mat(paths[1])
    return _as_bytes(x_train), y_train, _as_bytes(x_test), y_test


# usps ------------------------------------------------------------------------------------

def _usps_fetch(root: Path, missing: list[int]) -> None:
    import torchvision.datasets as tvd

    for i in missing:
        tvd.USPS(root=str(root), train=(i == 0), download=True)


def _usps_read(paths: list[Path]) -> Arrays:
    x_train, y_train = read_usps_bz2(paths[0])
    x_test, y_test = read_usps_bz2(paths[1])
    return x_train, y_train, x_test, y_test


SPECS: dict[str, _Spec] = {
    "mnist": _idx_spec("mnist", "MNIST", "MNIST", (0.1307,), (0.3081,)),
    "fashion_mnist": _idx_spec("fashion_mnist", "FashionMNIST", "FashionMNIST", (0.2860,), (0.3530,),
                               FASHION_MNIST_CLASSES),
    "cifar10": _Spec("cifar10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                     tuple((f"{_CIFAR_DIR}/{f}",) for f in (*_CIFAR_TRAIN, _CIFAR_TEST)),
                     _cifar_fetch, _cifar_read, CIFAR10_CLASSES),
    "svhn": _Spec("svhn", (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                  tuple((f,) for f in _SVHN_FILES), _svhn_fetch, _svhn_read),
    "usps": _Spec("usps", (0.2469,), (0.2989,),
                  tuple((f,) for f in _USPS_FILES), _usps_fetch, _usps_read),
}


def expected_files(name: str, root: str | Path) -> list[Path]:
    """The files data set ``name`` needs under ``root`` (preferred names, e.g. without ``.gz``)."""
    return [Path(root) / alts[0] for alts in SPECS[name].files]


def make_loader(name: str) -> Callable[[Path | None, bool], Dataset]:
    """A ``loader(root, download) -> Dataset`` for the torchvision set ``name`` (a key of SPECS)."""
    spec = SPECS[name]

    def loader(root: Path | None, download: bool) -> Dataset:
        return _load(spec, root, download)

    loader.__name__ = f"load_{name}"
    loader.__doc__ = f"Load {name!r} from a torchvision root (see ddray.data.vision)."
    return loader


def register_all(register: Callable[..., None]) -> None:
    """Register every torchvision data set with ``register(name, loader, class_names)``."""
    for name, spec in SPECS.items():
        register(name, make_loader(name), spec.classes)
