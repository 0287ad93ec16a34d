"""Where a run's real data comes from: the config's ``data`` section → a :class:`~ddray.data.Dataset`.

Every process that needs the real data — the local loop, the Ray driver and workers,
``evaluate``, ``pretrain``, ``experts`` — loads it through :func:`load_data`, so all of them
see the same images:

* Parquet under ``s3://bucket/prefix`` is read through :func:`ddray.store.storage.filesystem`
  (the credentials and endpoint of ``--storage``);
* the user's files are decoded once into the uint8 cache (``--cache-dir``);
* ``--zca`` fits the whitening on the training split once and keeps it in the cache,
  keyed by the training images' bytes and ``--zca-eps`` (a second run reads it back);
* ``--data-cache-mb`` swaps the images for a class-partitioned Parquet copy read through a
  bounded cache (:mod:`ddray.data.rows`), under the cache directory or a ``--storage`` URI.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ddray.config import DataConfig
from ddray.data import Dataset, Zca, load_dataset


def load_data(data: DataConfig, storage: str | None = None) -> Dataset:
    """The real data set of ``data`` (see the module docstring); one-line ValueErrors for bad input.

    ``storage``: the run's ``--storage``; when it is a URI, the ``--data-cache-mb`` copy lives there (one copy
    for all nodes) instead of under each node's cache directory.
    """
    from ddray.store.storage import filesystem, is_uri

    root, fs = data.data_root, None
    if root is not None and is_uri(root):
        if data.dataset != "parquet":
            raise ValueError(f"--data-root {root}: a URI is read by --dataset parquet only; "
                             f"--dataset {data.dataset} needs a local path")
        fs, root = filesystem(root, "--data-root")
    ds = load_dataset(data.dataset, root, data.download, data.image_size, test_fraction=data.test_fraction,
                      cache_dir=data.cache_dir, filesystem=fs)
    if data.zca:
        ds = ds.with_zca(fitted_zca(ds, data.zca_eps, data.cache_dir))
    if data.data_cache_mb is not None:
        from ddray.data.rows import bounded

        shared = filesystem(storage, "--storage") if storage is not None and is_uri(storage) else None
        ds = bounded(ds, data.data_cache_mb, _cache_root(data.cache_dir), shared)
    return ds


def _cache_root(cache_dir: str | None) -> Path:
    from ddray.data.cache import default_cache_dir

    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def fitted_zca(ds: Dataset, eps: float, cache_dir: str | None = None) -> Zca:
    """The ZCA transform of ``ds``'s training split (``--zca-eps`` ``eps``), read from the cache when fitted before."""
    from safetensors.torch import load_file, save

    from ddray.store.storage import write_atomic

    h = hashlib.sha256(f"zca-v1 eps={eps!r} mean={ds.mean} std={ds.std}".encode())
    raw = ds.x_train.take_raw(slice(None))
    h.update(str(tuple(raw.shape)).encode() + str(raw.dtype).encode())
    h.update(raw.contiguous().numpy().data)  # hashed in place: no copy of the set
    path = _cache_root(cache_dir) / "zca" / f"{h.hexdigest()[:32]}.safetensors"
    if path.is_file():
        return Zca.from_tensors(load_file(str(path)))
    zca = Zca.fit(ds.x_train.with_zca(None), eps)
    write_atomic(path, save({k: v.contiguous() for k, v in zca.tensors().items()}))
    return zca

