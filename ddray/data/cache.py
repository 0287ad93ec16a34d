"""Decode once: a loader's :class:`~ddray.data.base.RawSplits`, kept as ``.npy`` files and read back.

An entry lives in ``cache_dir/<sha256 of the key>/``::

    x_train.npy  y_train.npy  x_test.npy  y_test.npy   the arrays (np.save)
    meta.json                                          {"classes": [...], "key": {...}, "shapes": {...}}

The key (:func:`folder_key`, :func:`parquet_key`) says what was read and how: the source's
files with their sizes and modification times, the loader's options and
:data:`FORMAT_VERSION`, so a changed file or option decodes again. An entry is
written to a temporary folder beside it and renamed into place, so a reader sees a
whole entry or none; nothing is written when the build fails. A cache that cannot
be written costs a warning, not the run.

The default folder is ``$DDRAY_CACHE_DIR``, else ``$XDG_CACHE_HOME/ddray``, else ``~/.cache/ddray``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ddray.data.base import RawSplits, channel_stats

#: Bump when decoding changes what a source decodes to: old entries are then left unused.
FORMAT_VERSION = 1
ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def default_cache_dir() -> Path:
    """``$DDRAY_CACHE_DIR``, else ``$XDG_CACHE_HOME/ddray``, else ``~/.cache/ddray``."""
    if os.environ.get("DDRAY_CACHE_DIR"):
        return Path(os.environ["DDRAY_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "ddray"
    return Path.home() / ".cache" / "ddray"


def _canonical(key: Mapping[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def key_digest(key: Mapping[str, Any]) -> str:
    """The entry's folder name: the sha256 of the key as canonical JSON."""
    return hashlib.sha256(_canonical(key).encode()).hexdigest()


def folder_key(root: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """The key of an image folder: every file's relative name, size and mtime (an archive: its own), + options."""
    root = Path(root).expanduser().resolve()
    key: dict[str, Any] = {"loader": "imagefolder", "format": FORMAT_VERSION, "root": str(root), **options}
    if root.is_file():
        st = root.stat()
        return {**key, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    listing, count = hashlib.sha256(), 0
    for here, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        for f in sorted(files):
            path = Path(here, f)
            try:
                st = path.stat()
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:  # a broken link: the loader names it
                size = mtime = -1
            listing.update(f"{path.relative_to(root).as_posix()}\t{size}\t{mtime}\n".encode())
            count += 1
    return {**key, "files": count, "listing": listing.hexdigest()}


def parquet_key(files: Sequence[tuple[str, int | None, int | None]], options: Mapping[str, Any]) -> dict[str, Any]:
    """The key of a Parquet source: each file's (path, size, mtime in ns) + options (the filesystem's type too)."""
    return {"loader": "parquet", "format": FORMAT_VERSION, "files": [list(f) for f in files], **options}


def _read(entry: Path, key: Mapping[str, Any]) -> RawSplits | None:
    """The entry's data, or None when there is none (or it is not whole, or for another key)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if _canonical(meta["key"]) != _canonical(json.loads(_canonical(key))):
            return None
        x_train, y_train, x_test, y_test = (np.load(entry / f"{name}.npy", allow_pickle=False) for name in ARRAYS)
        stats = meta.get("stats")
        return RawSplits(x_train, y_train, x_test, y_test, tuple(meta["classes"]),
                         None if stats is None else (tuple(stats[0]), tuple(stats[1])))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(base: Path, entry: Path, data: RawSplits, key: Mapping[str, Any]) -> None:
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name[:16]}-", dir=base))
    try:
        shapes = {}
        for name in ARRAYS:
            array = np.ascontiguousarray(getattr(data, name))
            np.save(tmp / f"{name}.npy", array)
            shapes[name] = list(array.shape)
        assert data.stats is not None  # set by cached()
        mean, std = data.stats
        meta = {"classes": list(data.classes), "key": key, "shapes": shapes, "stats": [list(mean), list(std)]}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        if entry.exists():  # a broken or foreign entry under this name (a whole one was read before building)
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "meta.json").is_file():  # not another process's whole entry, written meanwhile
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached(source_key: Mapping[str, Any], build: Callable[[], RawSplits], cache_dir: Path | None = None) -> RawSplits:
    """``build()``'s data, read from the cache entry of ``source_key`` when there is one, else built and kept.

    Args:
        source_key: JSON-able description of the source and options (:func:`folder_key`, :func:`parquet_key`).
        build: decodes the source; its errors pass through and nothing is written.
        cache_dir: where entries live; None: :func:`default_cache_dir`.
    """
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    entry = base / key_digest(source_key)
    hit = _read(entry, source_key)
    if hit is not None:
        return hit
    data = build()
    if data.stats is None:  # kept with the entry: a cached load then reads no byte twice
        data = dataclasses.replace(data, stats=channel_stats(data.x_train))
    try:
        _write(base, entry, data, source_key)
    except OSError as e:
        warnings.warn(f"--cache-dir: could not keep the decoded data in {base} ({e}); it is decoded again "
                      "next time", stacklevel=2)
    return data
