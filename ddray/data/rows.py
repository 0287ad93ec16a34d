"""A data set larger than a process's memory: rows read from a class-partitioned Parquet copy (``--data-cache-mb``).

:func:`bounded` writes each split once to ``<cache>/rows/<key>/{train,test}.parquet`` (or, on a
cluster whose nodes share a ``--storage`` URI, to ``STORAGE/data-rows/<key>/``, read from there): the
images as fixed-size binary rows (C·H·W bytes, the uint8 images as decoded), sorted by
class so that every row group holds one class only (at most :data:`GROUP_ROWS` rows).
Per-class sampling (DC, DM) then reads only its class's row groups, a random batch
(DD) the groups its rows fall in. A :class:`RowStore` answers ``take(indices)`` from an
LRU cache of decoded row groups holding at most ``--data-cache-mb`` MB for both splits
together, and reads the missing groups from the file. The bytes are those of the set in
memory, so every result is bit for bit the same — only slower where groups are re-read.

The labels (8 bytes an image) stay in memory.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ddray.core.images import Images
from ddray.data.base import Dataset

GROUP_ROWS = 256  # rows per row group (CIFAR-10: 768 KiB a group)
FORMAT = "rows-v1"


class GroupCache:
    """Decoded row groups of one or more files, least recently used evicted beyond ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used = int(budget), 0
        self.groups: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self.reads = 0  # row groups read from disk (for benchmarks and tests)

    def get(self, file: "pq.ParquetFile", name: str, group: int, row_shape: tuple[int, ...]) -> np.ndarray:
        key = (name, group)
        hit = self.groups.get(key)
        if hit is not None:
            self.groups.move_to_end(key)
            return hit
        col = file.read_row_group(group, columns=["image"]).column(0).combine_chunks()
        width = int(np.prod(row_shape))
        data = np.frombuffer(col.buffers()[1], dtype=np.uint8)[col.offset * width:(col.offset + len(col)) * width]
        rows = data.reshape(len(col), *row_shape).copy()  # our own bytes: Arrow's buffer goes back to its pool
        del col, data
        self.reads += 1
        while self.groups and self.used + rows.nbytes > self.budget:
            _, old = self.groups.popitem(last=False)
            self.used -= old.nbytes
        if rows.nbytes <= self.budget:
            self.groups[key] = rows
            self.used += rows.nbytes
        return rows


class RowStore:
    """(N, C, H, W) uint8 images of one split, read on demand from its Parquet copy (a :class:`RowSource`).

    Args:
        path: the split's file (written by :func:`write_rows`).
        position: (N,) the file row of each image (images are in class order in the file).
        shape: (C, H, W).
        cache: the decoded row groups, shared with the other split.
    """

    def __init__(self, path: Path | str, position: np.ndarray, shape: tuple[int, int, int], cache: GroupCache,
                 file: "pq.ParquetFile | None" = None, filesystem: Any | None = None) -> None:
        self.path, self.position, self.row_shape, self.cache = path, position, shape, cache
        self.filesystem = filesystem  # a pyarrow filesystem the file lives on (--storage), None: local disk
        if file is None:  # a class's view (select) shares its parent's open file
            file = pq.ParquetFile(str(path) if filesystem is None else filesystem.open_input_file(str(path)),
                                  pre_buffer=False)
        self.file = file
        sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.position), *self.row_shape)

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        """Images ``indices`` (any shape) → uint8 (*indices.shape, C, H, W), reading only the row groups they need."""
        flat = indices.reshape(-1).numpy()
        pos = self.position[flat]
        group = np.searchsorted(self.starts, pos, side="right") - 1
        out = np.empty((len(flat), *self.row_shape), dtype=np.uint8)
        for g in np.unique(group):
            sel = np.flatnonzero(group == g)
            rows = self.cache.get(self.file, str(self.path), int(g), self.row_shape)
            out[sel] = rows[pos[sel] - self.starts[g]]
        return torch.from_numpy(out).view(*indices.shape, *self.row_shape)

    def select(self, rows: torch.Tensor) -> "RowStore":
        """The images ``rows`` (1-D) as a store of their own (a class's pool: no pixels are read)."""
        return RowStore(self.path, self.position[rows.reshape(-1).numpy()], self.row_shape, self.cache, self.file,
                        self.filesystem)

    def __reduce__(self) -> Any:  # a store travels as its file and positions; the cache stays behind
        return (_reopen, (str(self.path), self.position, self.row_shape, self.cache.budget, self.filesystem))


def _reopen(path: str, position: np.ndarray, shape: tuple[int, int, int], budget: int,
            filesystem: Any | None) -> RowStore:
    return RowStore(path if filesystem is not None else Path(path), position, shape, GroupCache(budget),
                    filesystem=filesystem)


def write_rows(path: Path, images: Images, labels: np.ndarray) -> np.ndarray:
    """Write a split's raw images to ``path`` in class order, one class per row group; returns each image's file row."""
    order = np.argsort(labels, kind="stable")
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    width = int(np.prod(images.shape[1:]))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".parquet")
    os.close(fd)
    schema = pa.schema([("image", pa.binary(width)), ("label", pa.int64())])
    with pq.ParquetWriter(tmp, schema, compression="none") as writer:
        for c in np.unique(labels):
            rows = order[labels[order] == c]
            for lo in range(0, len(rows), GROUP_ROWS):
                part = rows[lo:lo + GROUP_ROWS]
                raw = images.take_raw(torch.from_numpy(part)).numpy()
                buf = pa.py_buffer(np.ascontiguousarray(raw, dtype=np.uint8).tobytes())
                col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(part), [None, buf])
                writer.write_table(pa.table({"image": col, "label": pa.array(labels[part], pa.int64())},
                                            schema=schema), row_group_size=GROUP_ROWS)
    os.replace(tmp, path)
    return position


def _key(ds: Dataset) -> str:
    h = hashlib.sha256(f"{FORMAT} {ds.name} {tuple(ds.x_train.shape)} {tuple(ds.x_test.shape)}".encode())
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        raw = x.take_raw(slice(None))
        h.update(np.ascontiguousarray(y.numpy()).data)
        h.update(np.ascontiguousarray(raw.numpy()).data)  # hashed in place: no copy of the set
    return h.hexdigest()[:32]


def _local_copy(folder: Path, ds: Dataset) -> dict[str, tuple[Path, np.ndarray]]:
    """Each split's Parquet copy and file positions under ``folder``, written unless there."""
    out = {}
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        path, pos_path = folder / f"{split}.parquet", folder / f"{split}.position.npy"
        if path.is_file() and pos_path.is_file():
            position = np.load(pos_path)
        else:
            position = write_rows(path, x, y.numpy())
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npy")
            with os.fdopen(fd, "wb") as f:
                np.save(f, position)
            os.replace(tmp, pos_path)
        out[split] = (path, position)
    return out


def _shared_copy(filesystem: Any, base: str, ds: Dataset) -> dict[str, tuple[str, np.ndarray]]:
    """Each split's copy under ``base`` on ``filesystem`` (``--storage``), uploaded by the first process that needs
    it (the positions last: their presence marks a whole copy)."""
    import io

    import pyarrow.fs as pafs

    out = {}
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        path, pos_path = f"{base}/{split}.parquet", f"{base}/{split}.position.npy"
        if filesystem.get_file_info(pos_path).type == pafs.FileType.NotFound:
            with tempfile.TemporaryDirectory(prefix="ddray-rows-") as tmp:
                position = write_rows(Path(tmp) / "rows.parquet", x, y.numpy())
                filesystem.create_dir(base, recursive=True)
                pafs.copy_files(str(Path(tmp) / "rows.parquet"), path, destination_filesystem=filesystem)
            buf = io.BytesIO()
            np.save(buf, position)
            with filesystem.open_output_stream(pos_path) as f:
                f.write(buf.getvalue())
        else:
            with filesystem.open_input_file(pos_path) as f:
                position = np.load(io.BytesIO(f.read()))
        out[split] = (path, position)
    return out


def bounded(ds: Dataset, mb: int, cache_root: Path, storage: tuple[Any, str] | None = None) -> Dataset:
    """``ds`` with both splits read from their Parquet copy through one cache of at most ``mb`` MB.

    The copy is written on first use (keyed by the images' bytes and labels) under ``cache_root``, or under
    ``storage`` = (pyarrow filesystem, base path) when given. Only uint8 sets qualify: float sets (digits,
    USPS) are small and stay in memory.
    """
    if ds.x_train.take_raw(slice(0, 1)).dtype != torch.uint8:
        raise ValueError(f"--data-cache-mb: --dataset {ds.name} is held as float32 (not 8-bit images) and is small; "
                         "drop --data-cache-mb")
    key = _key(ds)
    fs = None
    if storage is None:
        folder = cache_root / "rows" / key
        folder.mkdir(parents=True, exist_ok=True)
        copies: dict[str, tuple[Any, np.ndarray]] = dict(_local_copy(folder, ds))
    else:
        fs, base = storage
        copies = dict(_shared_copy(fs, f"{base.rstrip('/')}/data-rows/{key}", ds))
    cache = GroupCache(mb * 2 ** 20)
    splits: dict[str, Images] = {}
    for split, x in (("train", ds.x_train), ("test", ds.x_test)):
        path, position = copies[split]
        c, h, w = x.shape[1:]
        splits[split] = Images(RowStore(path, position, (int(c), int(h), int(w)), cache, filesystem=fs),
                               x.mean, x.std, x.zca)
    return Dataset(ds.name, splits["train"], ds.y_train, splits["test"], ds.y_test, ds.num_classes, ds.mean, ds.std,
                   ds.classes)
