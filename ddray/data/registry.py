"""Data-set registry: name → loader, and the class names pictures label their columns with.

Registered at import: the embedded sets (``mnist5k``, ``digits``; :mod:`ddray.data.embedded`)
and the torchvision sets read from ``data_root`` in their standard on-disk format
(``mnist``, ``fashion_mnist``, ``cifar10``, ``svhn``, ``usps``; :mod:`ddray.data.vision`).
Custom sets plug in with :func:`register_dataset`. The user's own files need no code:
``imagefolder`` (a folder or archive of ``train/<class>/*``, ``test/<class>/*``;
:mod:`ddray.data.folder`) and ``parquet`` (tables as the Hugging Face hub exports them;
:mod:`ddray.data.parquet`), both decoded once into a uint8 cache (:mod:`ddray.data.cache`).

Every loader returns a :class:`~ddray.data.base.Dataset`: ``x_train`` (N, C, H, W) images held
raw and normalised per batch, ``y_train`` (N,) int64, the same for the test split, the class
count, the per-channel mean/std used to normalise and the class names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from ddray.data.base import Dataset
from ddray.data.embedded import EMBEDDED_SETS
from ddray.data.vision import register_all

Loader = Callable[[Path | None, bool], Dataset]

#: name → loader(root, download). Embedded sets ignore ``root``/``download``.
DATASETS: dict[str, Loader] = {}
EMBEDDED = tuple(EMBEDDED_SETS)
#: name → the class names in label order (pictures label their columns with them).
CLASS_NAMES: dict[str, tuple[str, ...]] = {}
#: the user's own files: their class names come from the files.
FILE_FORMATS = ("imagefolder", "parquet")


def dataset_names() -> list[str]:
    """Every name ``--dataset`` accepts."""
    return sorted({*DATASETS, *FILE_FORMATS})


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
                 image_size: int | None = None, *, test_fraction: float = 0.2, cache_dir: str | Path | None = None,
                 filesystem: Any | None = None) -> Dataset:
    """Load a registered data set, or the user's files (``imagefolder``, ``parquet``).

    Args:
        name: a key of :data:`DATASETS` or one of :data:`FILE_FORMATS`.
        root: directory holding a torchvision data set's files (ignored by embedded sets); for
            ``imagefolder`` a folder or a ``.tar``/``.tar.gz``/``.zip`` of one, for ``parquet`` a file or a
            directory of them (a ``bucket/prefix`` on ``filesystem``).
        download: let torchvision download missing files into ``root``.
        image_size: resize images to this square size (e.g. 28 to adapt USPS/digits nets to MNIST; the user's
            files are resized as they are decoded, which also admits mixed sizes).
        test_fraction: the user's files without a test split: the share of each class held out (seeded).
        cache_dir: where the user's files are decoded to once (default ``$DDRAY_CACHE_DIR``, else the user's
            cache directory).
        filesystem: a pyarrow filesystem ``root`` lives on (``parquet`` from S3), else None.

    Raises:
        ValueError: unknown name, or missing/invalid files (one line naming the path and what is wrong).
    """
    if name in FILE_FORMATS:
        return _load_files(name, root, image_size, test_fraction, cache_dir, filesystem)
    if name not in DATASETS:
        raise ValueError(f"--dataset: unknown data set {name!r}; choose one of {dataset_names()}")
    ds = DATASETS[name](Path(root).expanduser() if root else None, download)
    return ds.resized(image_size) if image_size else ds


def _load_files(name: str, root: str | Path | None, image_size: int | None, test_fraction: float,
                cache_dir: str | Path | None, filesystem: Any | None) -> Dataset:
    if root is None:
        what = "a folder (train/<class>/*, test/<class>/*) or an archive of one" if name == "imagefolder" \
            else "a Parquet file or a directory of them (local or s3://bucket/prefix)"
        raise ValueError(f"--data-root: missing; --dataset {name} reads {what}")
    cache = Path(cache_dir).expanduser() if cache_dir else None
    if name == "imagefolder":
        from ddray.data.folder import load_imagefolder_cached

        raw = load_imagefolder_cached(Path(root).expanduser(), test_fraction=test_fraction, image_size=image_size,
                                      split_seed=0, cache_dir=cache)
    else:
        from ddray.data.parquet import load_parquet_cached

        where = str(root) if filesystem is not None else str(Path(root).expanduser())
        raw = load_parquet_cached(where, filesystem=filesystem, test_fraction=test_fraction, image_size=image_size,
                                  split_seed=0, cache_dir=cache)
    return Dataset.from_raw(name, raw)


for _name, (_loader, _classes) in EMBEDDED_SETS.items():
    register_dataset(_name, _loader, _classes)
register_all(register_dataset)  # the torchvision sets
