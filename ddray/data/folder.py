"""Users' own images in class folders, or an archive of them → :class:`~ddray.data.base.RawSplits`.

Two layouts are read from ``root`` (the CLI's ``--data-root``)::

    root/train/<class>/*   root/test/<class>/*    given splits (the same classes in both)
    root/<class>/*                                one pool, split per class by --test-fraction

Class names are the folder names, sorted; their order gives the labels 0‥C−1.
Images may sit deeper inside a class folder; within a class they are taken in order
of their names. A ``.tar``, ``.tar.gz``/``.tgz`` or ``.zip`` file of such a tree works
in place of the folder and is read in place (nothing is unpacked to disk). When every
file sits under one top-level folder that is neither ``train`` nor ``test`` (as in
``cifar10-jpeg/train/cat/0000.jpg``), that folder is the root. Only ``train/`` and
``test/`` are read in the first layout; loose files directly beneath the root (a
README) are ignored in both; hidden files, ``__MACOSX/``, ``Thumbs.db`` and
``desktop.ini`` are skipped everywhere.

Images are PNG, JPEG, BMP or WebP, recognised by their content (PIL), not their
names. 16-bit greyscale keeps its top 8 bits; palette, RGBA and CMYK images become
RGB (alpha dropped), LA becomes greyscale. A set whose images are all greyscale
has one channel; otherwise three, with greyscale images repeated into R, G and B.
Images of different sizes are refused (the message gives each size as width×height,
with its count and an example) unless ``image_size`` is given, in which case every
image is resized to ``image_size``×``image_size`` (PIL bilinear).

The pool split (:func:`seeded_split`) is seeded: for each class (in label order) one
``numpy.random.default_rng(split_seed)`` draws a permutation of its files and the
first ``round(test_fraction × n)`` go to test — at least one to each side when the
class has two images or more; a class with one image goes to train.

Every bad input is a one-line :class:`ValueError` that starts with ``--data-root:``
and names the path and what is wrong. :func:`decode_images`, :func:`stack_pixels`,
:func:`seeded_split` and :func:`check_options` are shared with :mod:`ddray.data.parquet`.
"""

from __future__ import annotations

import io
import os
import posixpath
import tarfile
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ddray.data.base import RawSplits
from ddray.data.cache import cached, folder_key

OPTION = "--data-root"
#: What PIL may identify an image as (its JPEG reader also takes cameras' multi-picture JPEGs, MPO).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")
FORMATS_SHOWN = "PNG, JPEG, BMP, WebP"
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N"})
JUNK = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
SPLITS = ("train", "test")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


# ----------------------------------------------------------------------------- options and splits


def check_options(test_fraction: float, image_size: int | None) -> None:
    """Refuse a ``--test-fraction`` outside (0, 1) and an ``--image-size`` that is not a positive integer."""
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or not 0 < test_fraction < 1:
        raise ValueError(f"--test-fraction: invalid value {test_fraction!r}; expected a number between 0 and 1, "
                         "both excluded")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer))
                                   or image_size < 1):
        raise ValueError(f"--image-size: invalid value {image_size!r}; expected a positive integer")


def seeded_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) of a per-class random split of ``labels`` (N,) — see the module docstring.

    Both index arrays are grouped by class (in label order) and ascending within a class.
    """
    rng = np.random.default_rng(seed)
    train, test = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = len(idx)
        k = min(max(round(test_fraction * n), 1), n - 1) if n >= 2 else 0
        perm = rng.permutation(n)
        test.append(np.sort(idx[perm[:k]]))
        train.append(np.sort(idx[perm[k:]]))
    return np.concatenate(train), np.concatenate(test)


# ----------------------------------------------------------------------------- decoding


def _open(blob: bytes, name: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(blob), formats=IMAGE_FORMATS)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ValueError(f"{OPTION}: {name} is not an image ({FORMATS_SHOWN})") from None


def _eight_bit(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit greyscale (mode L) or RGB."""
    if img.mode in ("L", "RGB"):
        return img
    if img.mode == "I" or img.mode.startswith("I;16"):  # 16-bit greyscale: keep the top 8 bits
        wide = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
        return Image.fromarray((wide >> 8).astype(np.uint8))
    return img.convert("L" if img.mode in GREY_MODES else "RGB")


def check_sizes(sizes: Sequence[tuple[int, int]], names: Sequence[str], unit: str) -> None:
    """Refuse images of different sizes (W, H), naming each size, its count and an example of the rarer ones."""
    counts = Counter(sizes)
    if len(counts) <= 1:
        return
    found = []
    for i, (size, n) in enumerate(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))):
        what = f"{size[0]}×{size[1]} ({n} {unit if n > 1 else unit.rstrip('s')}"
        found.append(what + (")" if i == 0 else f", e.g. {names[sizes.index(size)]})"))
    listed = ", ".join(found[:-1]) + " and " + found[-1]
    raise ValueError(f"{OPTION}: images of different sizes: found {listed}; give --image-size N to resize "
                     "every image to N×N")


def _pixels(blob: bytes, name: str, image_size: int | None) -> np.ndarray:
    """One encoded image → (H, W) or (H, W, 3) uint8, resized to image_size² if given."""
    with _open(blob, name) as img:
        try:
            img.load()
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"{OPTION}: {name} is a damaged image ({e})") from None
        pic = _eight_bit(img)
        if image_size is not None:
            pic = pic.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(pic)


def _sizes(blobs: Sequence[bytes], names: Sequence[str]) -> list[tuple[int, int]]:
    """Every image's (W, H), from its header."""
    sizes = []
    for blob, name in zip(blobs, names):
        with _open(blob, name) as img:
            sizes.append(img.size)
    return sizes


def decode_images(blobs: Sequence[bytes], names: Sequence[str], image_size: int | None = None,
                  unit: str = "files") -> np.ndarray:
    """Encoded images → (N, C, H, W) uint8, C = 1 when all are greyscale, else 3.

    One pass into one preallocated array: sized by the first image, widened to RGB at
    the first colour image (the greyscale ones before it repeated into R, G and B).

    Args:
        blobs: the N encoded images (PNG, JPEG, BMP, WebP).
        names: what to call each in messages (a file name, ``x.parquet row 7``).
        image_size: resize every image to this square size (PIL bilinear); None: all must have one size.
        unit: what ``names`` are, in the mixed-size message (``files``, ``rows``).

    Raises:
        ValueError: a blob that is not an image or is damaged, or mixed sizes without ``image_size``.
    """
    n = len(blobs)
    out = np.zeros((n, 1, image_size or 0, image_size or 0), np.uint8)
    for i, (blob, name) in enumerate(zip(blobs, names)):
        a = _pixels(blob, name, image_size)
        if i == 0:
            out = np.empty((n, 1 if a.ndim == 2 else 3, *a.shape[:2]), np.uint8)
        elif a.shape[:2] != out.shape[2:]:
            check_sizes(_sizes(blobs, names), names, unit)  # raises, naming every size found
        elif a.ndim == 3 and out.shape[1] == 1:
            wider = np.empty((n, 3, *out.shape[2:]), np.uint8)
            wider[:i] = out[:i]
            out = wider
        out[i] = a if a.ndim == 2 else a.transpose(2, 0, 1)  # (H, W) broadcasts over the channels
    return out


def _resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """(C, H, W) uint8 → (C, size, size), PIL bilinear."""
    img = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    a = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def stack_pixels(rows: Sequence[np.ndarray], names: Sequence[str], image_size: int | None = None,
                 unit: str = "rows") -> np.ndarray:
    """Decoded images, each (C, H, W) uint8 with C 1 or 3 → (N, C, H, W), as :func:`decode_images` does."""
    sizes = [(int(r.shape[2]), int(r.shape[1])) for r in rows]
    if image_size is None:
        check_sizes(sizes, names, unit)
    w, h = (image_size, image_size) if image_size else (sizes[0] if sizes else (0, 0))
    grey = all(r.shape[0] == 1 for r in rows)
    out = np.empty((len(rows), 1 if grey else 3, h, w), np.uint8)
    for i, r in enumerate(rows):
        out[i] = _resize(r, image_size) if image_size is not None else r
    return out


# ----------------------------------------------------------------------------- trees: folder, tar, zip


@dataclass
class _Tree:
    """The files of a root: relative POSIX name → a reader of its bytes, and every folder's name."""

    files: dict[str, Callable[[], bytes]] = field(default_factory=dict)
    folders: set[str] = field(default_factory=set)

    def add(self, name: str, read: Callable[[], bytes] | None = None) -> None:
        """Add file ``name`` (folder ``name`` when ``read`` is None) and the folders above it; skip junk."""
        name = posixpath.normpath(name).lstrip("/")
        parts = name.split("/")
        if name in ("", ".") or ".." in parts or any(p.startswith(".") or p in JUNK for p in parts):
            return
        if read is None:
            self.folders.add(name)
        else:
            self.files[name] = read
        self.folders.update("/".join(parts[:i]) for i in range(1, len(parts)))


def _folder_tree(root: Path) -> _Tree:
    tree = _Tree()
    for here, dirs, files in os.walk(root, followlinks=True):
        rel = Path(here).relative_to(root).as_posix()
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in JUNK]
        for d in dirs:
            tree.add(f"{rel}/{d}")
        for f in files:
            tree.add(f"{rel}/{f}", partial(Path(here, f).read_bytes))
    return tree


def _tar_tree(path: Path) -> _Tree:
    tree = _Tree()
    try:
        with tarfile.open(path, "r|*") as tar:  # a stream: each member's bytes are read as it passes
            for m in tar:
                if m.isdir():
                    tree.add(m.name)
                elif m.isfile():
                    f = tar.extractfile(m)
                    data = f.read() if f is not None else b""
                    tree.add(m.name, lambda data=data: data)  # type: ignore[misc]
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{OPTION}: {path} is not a readable tar archive ({reason})") from None
    return tree


def _zip_tree(path: Path) -> _Tree:
    tree = _Tree()
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.is_dir():
                    tree.add(info.filename)
                else:
                    data = z.read(info)
                    tree.add(info.filename, lambda data=data: data)  # type: ignore[misc]
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
        raise ValueError(f"{OPTION}: {path} is not a readable zip archive ({e})") from None
    return tree


def _tree(root: Path) -> _Tree:
    if not root.exists():
        raise ValueError(f"{OPTION}: {root} does not exist")
    if root.is_dir():
        return _folder_tree(root)
    name = root.name.lower()
    if name.endswith(".zip"):
        return _zip_tree(root)
    if name.endswith(TAR_SUFFIXES):
        return _tar_tree(root)
    raise ValueError(f"{OPTION}: {root} is a file, not a folder or a .tar, .tar.gz, .tgz or .zip archive")


def _read(tree: _Tree, name: str) -> bytes:
    try:
        return tree.files[name]()
    except OSError as e:
        raise ValueError(f"{OPTION}: {name} cannot be read ({e.strerror or e})") from None


# ----------------------------------------------------------------------------- layout


def _top(tree: _Tree) -> str:
    """The prefix of the tree's root: ``"name/"`` when every file sits in folders under one top folder."""
    tops = {n.split("/", 1)[0] for n in tree.files}
    if len(tops) == 1 and (top := tops.pop()) not in SPLITS and all(n.count("/") >= 2 for n in tree.files):
        return top + "/"
    return ""


def _classes(tree: _Tree, prefix: str) -> dict[str, list[str]]:
    """Class → its files (full names, sorted) for the class folders directly beneath ``prefix``."""
    found: dict[str, list[str]] = {}
    for folder in sorted(tree.folders):
        rel = folder[len(prefix):] if folder.startswith(prefix) else None
        if rel and "/" not in rel:
            found[rel] = []
    for name in sorted(tree.files):
        if name.startswith(prefix) and "/" in name[len(prefix):]:
            found[name[len(prefix):].split("/", 1)[0]].append(name)
        elif name.startswith(prefix) and prefix:  # a loose file in train/ or test/
            raise ValueError(f"{OPTION}: {name} is not in a class folder (expected {prefix}<class>/…)")
    for cls, files in found.items():
        if not files:
            raise ValueError(f"{OPTION}: {prefix}{cls}/ is an empty class folder (class {cls!r} has no images)")
    return found


def _layout(tree: _Tree, root: Path) -> tuple[dict[str, list[str]], dict[str, list[str]] | None]:
    """(class → train files, class → test files), or (class → files, None) for the pooled layout."""
    base = _top(tree)
    tops = {f[len(base):] for f in tree.folders if f.startswith(base) and "/" not in f[len(base):]} - {""}
    given = [s for s in SPLITS if s in tops]
    if len(given) == 1:
        missing = next(s for s in SPLITS if s not in given)
        raise ValueError(f"{OPTION}: {root} has {base}{given[0]}/ but no {base}{missing}/; give both, or put "
                         "the class folders directly beneath the root (split by --test-fraction)")
    if given:
        train, test = _classes(tree, f"{base}train/"), _classes(tree, f"{base}test/")
        if not train:
            raise ValueError(f"{OPTION}: {base}train/ holds no class folders (expected {base}train/<class>/…)")
        for cls in sorted(set(train) ^ set(test)):
            has, lacks = ("train", "test") if cls in train else ("test", "train")
            raise ValueError(f"{OPTION}: class {cls!r} is in {base}{has}/ but not in {base}{lacks}/ "
                             "(train and test need the same classes)")
        return train, test
    pool = _classes(tree, base)
    if not pool:
        raise ValueError(f"{OPTION}: {root} holds neither train/ and test/ folders nor class folders "
                         "(expected train/<class>/… and test/<class>/…, or <class>/…)")
    return pool, None


# ----------------------------------------------------------------------------- loaders


def load_imagefolder(root: Path | str, *, test_fraction: float = 0.2, image_size: int | None = None,
                     split_seed: int = 0) -> RawSplits:
    """Read an image folder (or a .tar / .tar.gz / .tgz / .zip of one) — layouts in the module docstring.

    Args:
        root: the folder or archive.
        test_fraction: the share of each class that goes to test when the root has no train/test split.
        image_size: resize every image to this square size; None: all images must have one size.
        split_seed: seeds that split.

    Returns:
        :class:`RawSplits`: x (N, C, H, W) uint8, y (N,) int64 for train and test (given splits: in
        class order, files by name; pooled: the same, each side of the split), classes sorted.

    Raises:
        ValueError: one line starting ``--data-root:`` (or the option at fault) for every bad input.
    """
    check_options(test_fraction, image_size)
    root = Path(root).expanduser()
    tree = _tree(root)
    train, test = _layout(tree, root)
    classes = tuple(sorted(train))
    names = [f for cls in classes for f in train[cls]]
    labels = np.array([i for i, cls in enumerate(classes) for _ in train[cls]], np.int64)
    if test is None:
        tr, te = seeded_split(labels, test_fraction, split_seed)
        order = np.concatenate([tr, te])
        names, labels, n_train = [names[i] for i in order], labels[order], len(tr)
    else:
        n_train = len(names)
        names += [f for cls in classes for f in test[cls]]
        labels = np.concatenate([labels, np.array([i for i, cls in enumerate(classes) for _ in test[cls]],
                                                  np.int64)])
    x = decode_images([_read(tree, n) for n in names], names, image_size)
    return RawSplits(x[:n_train], labels[:n_train], x[n_train:], labels[n_train:], classes)


def load_imagefolder_cached(root: Path | str, *, test_fraction: float = 0.2, image_size: int | None = None,
                            split_seed: int = 0, cache_dir: Path | None = None) -> RawSplits:
    """:func:`load_imagefolder`, decoded once: later calls read the arrays from ``cache_dir``.

    The cache entry is keyed by every file's name, size and modification time (an archive's
    own), and by the options; a changed file decodes again. ``cache_dir`` None: the default of
    :func:`ddray.data.cache.default_cache_dir`.
    """
    check_options(test_fraction, image_size)
    root = Path(root).expanduser()
    if not root.exists():
        raise ValueError(f"{OPTION}: {root} does not exist")
    options = {"test_fraction": test_fraction, "image_size": image_size, "split_seed": split_seed}
    return cached(folder_key(root, options), lambda: load_imagefolder(
        root, test_fraction=test_fraction, image_size=image_size, split_seed=split_seed), cache_dir)
