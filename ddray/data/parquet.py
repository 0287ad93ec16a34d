"""Images in Parquet tables, as the Hugging Face hub and pyarrow write them → :class:`~ddray.data.base.RawSplits`.

``root`` is one ``.parquet`` file or a folder of them (searched recursively; names
starting with ``.`` or ``_`` skipped), on the local disk or on any pyarrow filesystem
(S3: ``root`` is ``bucket/prefix``). Each file needs two columns:

* ``image`` (or ``img``, as in HF's CIFAR-10) — encoded images (PNG, JPEG, BMP, WebP) as
  ``binary``; or HF's Image feature, a struct ``{bytes, path}`` (the bytes are read); or
  pixels as ``uint8`` lists: nested H×W, H×W×C (C 1 or 3; 4: alpha dropped) or C×H×W
  (H×W×C wins where both fit), or flat — a flat list of length L is a √L × √L greyscale
  image or a √(L/3) × √(L/3) RGB one in H×W×C order;
* ``label`` — integers (class names from HF's metadata: the schema key ``huggingface``
  with ``info.features.label.names``; else ``"0"``‥``"max"``) or strings (classes sorted).

Splits come from the files: a ``train``/``test`` folder on the path, else a file name
starting ``train``/``test`` (``train-00000-of-00001.parquet``, HF's
``data/test-….parquet``). With both present only they are read; otherwise every file
is pooled and split per class by ``test_fraction`` (:func:`ddray.data.folder.seeded_split`).
Pixels, channels, sizes and ``image_size`` behave as for image folders
(:mod:`ddray.data.folder`). Columns are read whole with pyarrow; Python touches rows
only to hand each encoded image to PIL.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from math import isqrt
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ddray.data.base import RawSplits
from ddray.data.cache import cached, parquet_key
from ddray.data.folder import OPTION, check_options, decode_images, seeded_split, stack_pixels

IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMN = "label"
_SPLIT_NAME = re.compile(r"(train|test)(?:[-_.]|$)")


@dataclass
class _Part:
    """One file's rows: encoded images or (C, H, W) pixel arrays, labels (ints or strs), class names from HF."""

    path: str
    split: str | None
    images: list[bytes] | list[np.ndarray]
    labels: np.ndarray
    names: tuple[str, ...] | None

    def row(self, i: int) -> str:
        return f"{self.path} row {i}"


def _split_of(rel: str) -> str | None:
    parts = rel.split("/")
    for p in parts[:-1]:
        if p in ("train", "test"):
            return p
    m = _SPLIT_NAME.match(parts[-1])
    return m.group(1) if m else None


def _files(fs: Any, root: str) -> list[Any]:
    """The Parquet files (pyarrow FileInfo) of ``root``, sorted by path."""
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"{OPTION}: {root} does not exist")
    if info.type == pafs.FileType.File:
        return [info]
    found = [f for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
             if f.type == pafs.FileType.File and f.path.endswith(".parquet")
             and not any(p.startswith((".", "_")) for p in f.path[len(root):].split("/"))]
    if not found:
        raise ValueError(f"{OPTION}: {root} holds no .parquet files")
    return sorted(found, key=lambda f: f.path)


def _hf_names(schema: Any, column: str) -> tuple[str, ...] | None:
    """The ClassLabel names HF's ``datasets`` wrote into the schema metadata, if any."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw is None:
        return None
    try:
        names = json.loads(raw)["info"]["features"][column]["names"]
    except (TypeError, ValueError, KeyError):
        return None
    return tuple(str(n) for n in names) if isinstance(names, list) else None


def _is_list(kind: Any) -> bool:
    return bool(pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind))


def _chw(x: np.ndarray, where: str) -> np.ndarray:
    """Pixels (n, *dims) of one shape, values checked → (n, C, H, W) uint8."""
    if x.size and (x.min() < 0 or x.max() > 255):
        raise ValueError(f"{OPTION}: {where} holds pixel values from {x.min()} to {x.max()}; expected 0‥255")
    n, dims = x.shape[0], x.shape[1:]
    x = x.astype(np.uint8, copy=False)
    if len(dims) == 1:  # flat: √L × √L greyscale or √(L/3) × √(L/3) × 3
        side = isqrt(dims[0])
        if side * side == dims[0]:
            return x.reshape(n, 1, side, side)
        side = isqrt(dims[0] // 3)
        if 3 * side * side == dims[0]:
            return x.reshape(n, side, side, 3).transpose(0, 3, 1, 2)
        raise ValueError(f"{OPTION}: {where} holds flat pixel lists of length {dims[0]}, neither a square "
                         "greyscale image (side²) nor a square RGB one (3 × side²)")
    if len(dims) == 2:
        return x[:, None]
    if len(dims) == 3 and dims[2] in (1, 3):
        return x.transpose(0, 3, 1, 2)
    if len(dims) == 3 and dims[0] in (1, 3):
        return x
    if len(dims) == 3 and dims[2] == 4:  # H×W×4: RGBA, alpha dropped
        return x[..., :3].transpose(0, 3, 1, 2)
    raise ValueError(f"{OPTION}: {where} holds pixel arrays of shape {tuple(dims)}; expected H×W, H×W×C or "
                     "C×H×W with C 1 or 3")


def _pixel_rows(values: Any, where: str) -> list[np.ndarray]:
    """A list column of integer pixels (nested or flat) → one (C, H, W) uint8 array per row."""
    n, dims, flat = len(values), [], values
    while _is_list(flat.type):
        if flat.null_count:
            row = int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"{OPTION}: {where} has an empty image (null) in row {row}" if flat is values
                             else f"{OPTION}: {where} has a null inside its pixel lists")
        lengths = np.unique(pc.list_value_length(flat).to_numpy(zero_copy_only=False))
        if len(lengths) != 1:  # images of different shapes: row by row
            return [_chw(np.asarray(values[i].as_py())[None], where)[0] for i in range(n)]
        dims.append(int(lengths[0]))
        flat = flat.flatten()
    if not pa.types.is_integer(flat.type):
        raise ValueError(f"{OPTION}: {where} holds pixels of type {flat.type}; expected uint8")
    return list(_chw(flat.to_numpy(zero_copy_only=False).reshape(n, *dims), where))


def _images(column: Any, where: str) -> list[bytes] | list[np.ndarray]:
    """The image column → encoded images, or one (C, H, W) array per row."""
    chunks = column.chunks
    if chunks and pa.types.is_struct(column.type):
        fields = [column.type.field(i).name for i in range(column.type.num_fields)]
        if "bytes" not in fields:
            raise ValueError(f"{OPTION}: {where}: the image column is a struct of {', '.join(fields)}; "
                             "expected a bytes field (HF's Image feature)")
        chunks = [c.field("bytes") for c in chunks]
    kind = chunks[0].type if chunks else pa.binary()
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
        blobs: list[bytes | None] = [b for c in chunks for b in c.to_pylist()]
        if None in blobs:
            raise ValueError(f"{OPTION}: {where} row {blobs.index(None)} has no image bytes (a path only?); "
                             "expected the images inside the file")
        return blobs  # type: ignore[return-value]  # no None left
    if _is_list(kind):
        return _pixel_rows(pa.concat_arrays(chunks), where)
    raise ValueError(f"{OPTION}: {where}: the image column holds {kind}; expected encoded images (binary), "
                     "HF's {bytes, path} struct or uint8 pixel lists")


def _labels(column: Any, where: str) -> np.ndarray:
    """The label column → (N,) int64, or (N,) object array of str."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if column.null_count:
        first = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"{OPTION}: {where} row {first} has no label")
    if pa.types.is_integer(column.type):
        y = column.to_numpy().astype(np.int64)
        if len(y) and y.min() < 0:
            raise ValueError(f"{OPTION}: {where} row {int(np.argmin(y))} has label {y.min()}; expected class "
                             "indices from 0 (HF writes -1 for 'no label')")
        return y
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return np.array(column.to_pylist(), dtype=object)
    raise ValueError(f"{OPTION}: {where}: the label column holds {column.type}; expected integers or strings")


def _read(fs: Any, info: Any, split: str | None) -> _Part:
    with fs.open_input_file(info.path) as f:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        image = next((c for c in IMAGE_COLUMNS if c in schema.names), None)
        if image is None or LABEL_COLUMN not in schema.names:
            missing = "image (or img)" if image is None else LABEL_COLUMN
            raise ValueError(f"{OPTION}: {info.path} has no {missing} column (columns: {', '.join(schema.names)})")
        table = pf.read(columns=[image, LABEL_COLUMN])
    return _Part(info.path, split, _images(table.column(image), info.path), _labels(table.column(LABEL_COLUMN),
                 info.path), _hf_names(schema, LABEL_COLUMN))


def _classes(parts: list[_Part]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Every row's class index (N,) and the class names, over all parts."""
    kinds = {p.labels.dtype == object for p in parts}
    if len(kinds) > 1:
        raise ValueError(f"{OPTION}: some files label with strings, others with integers "
                         f"(e.g. {parts[0].path}); expected one kind")
    labels = np.concatenate([p.labels for p in parts])
    if kinds == {True}:
        names, y = np.unique(labels, return_inverse=True)
        return y.astype(np.int64), tuple(str(n) for n in names)
    top = int(labels.max()) if len(labels) else -1
    named = next(((p.path, p.names) for p in parts if p.names is not None), None)
    if named is None:
        return labels, tuple(str(i) for i in range(top + 1))
    if top >= len(named[1]):
        raise ValueError(f"{OPTION}: label {top} is beyond the {len(named[1])} class names in {named[0]}'s "
                         "Hugging Face metadata")
    return labels, named[1]


def _load(fs: Any, root: str, files: list[Any], test_fraction: float, image_size: int | None,
          split_seed: int) -> RawSplits:
    splits = {f.path: _split_of(f.path[len(root):].lstrip("/")) for f in files}
    given = {"train", "test"} <= set(splits.values())
    parts = [_read(fs, f, splits[f.path] if given else None) for f in files if not given or splits[f.path]]
    y, classes = _classes(parts)
    images = [im for p in parts for im in p.images]
    names = [p.row(i) for p in parts for i in range(len(p.labels))]
    if not names:
        raise ValueError(f"{OPTION}: {root} holds no rows")
    if given:
        is_test = np.concatenate([np.full(len(p.labels), p.split == "test") for p in parts])
        tr, te = np.flatnonzero(~is_test), np.flatnonzero(is_test)
        for c in sorted(set(y[tr].tolist()) ^ set(y[te].tolist())):
            has, lacks = ("train", "test") if c in y[tr] else ("test", "train")
            raise ValueError(f"{OPTION}: class {classes[c]!r} is in {root}'s {has} files but not in its {lacks} "
                             "files (train and test need the same classes)")
    else:
        tr, te = seeded_split(y, test_fraction, split_seed)
    encoded = {isinstance(p.images[0], bytes) for p in parts if p.images}
    if len(encoded) > 1:
        raise ValueError(f"{OPTION}: some files hold encoded images, others pixel arrays (e.g. {parts[0].path}); "
                         "expected one kind")
    order = np.concatenate([tr, te])
    names, picked = [names[i] for i in order], [images[i] for i in order]
    if encoded == {True}:
        x = decode_images(cast(list[bytes], picked), names, image_size, unit="rows")
    else:
        x = stack_pixels(cast(list[np.ndarray], picked), names, image_size, unit="rows")
    y = y[order]
    return RawSplits(x[:len(tr)], y[:len(tr)], x[len(tr):], y[len(tr):], classes)


def _local(root: str | Path, filesystem: Any | None) -> tuple[Any, str]:
    if filesystem is None:
        return pafs.LocalFileSystem(), Path(root).expanduser().resolve().as_posix()
    return filesystem, str(root).rstrip("/")


def load_parquet(root: str | Path, *, filesystem: Any | None = None, test_fraction: float = 0.2,
                 image_size: int | None = None, split_seed: int = 0) -> RawSplits:
    """Read a Parquet file or a folder of them — columns and splits in the module docstring.

    Args:
        root: a file or folder; with ``filesystem``, a path inside it (S3: ``bucket/prefix``).
        filesystem: a pyarrow filesystem (e.g. ``pyarrow.fs.S3FileSystem``); None: the local disk.
        test_fraction: the share of each class that goes to test when the files give no split.
        image_size: resize every image to this square size; None: all images must have one size.
        split_seed: seeds that split.

    Returns:
        :class:`RawSplits`: x (N, C, H, W) uint8, y (N,) int64 for train and test, the class names.

    Raises:
        ValueError: one line starting ``--data-root:`` (or the option at fault) for every bad input.
    """
    check_options(test_fraction, image_size)
    fs, path = _local(root, filesystem)
    return _load(fs, path, _files(fs, path), test_fraction, image_size, split_seed)


def load_parquet_cached(root: str | Path, *, filesystem: Any | None = None, test_fraction: float = 0.2,
                        image_size: int | None = None, split_seed: int = 0,
                        cache_dir: Path | None = None) -> RawSplits:
    """:func:`load_parquet`, decoded once: later calls read the arrays from ``cache_dir``.

    The cache entry is keyed by each file's path, size and modification time, the
    filesystem's type and the options; a changed file decodes again. ``cache_dir`` None:
    :func:`ddray.data.cache.default_cache_dir`.
    """
    check_options(test_fraction, image_size)
    fs, path = _local(root, filesystem)
    files = _files(fs, path)
    key = parquet_key([(f.path, f.size, f.mtime_ns) for f in files],
                      {"filesystem": fs.type_name, "test_fraction": test_fraction, "image_size": image_size,
                       "split_seed": split_seed})
    return cached(key, lambda: _load(fs, path, files, test_fraction, image_size, split_seed), cache_dir)
