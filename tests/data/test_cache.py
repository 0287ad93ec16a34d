"""Decode once: an entry is written whole on the first load, read on the next, and replaced when a file changes."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ddray.data import folder, parquet
from ddray.data.base import RawSplits
from ddray.data.cache import ARRAYS, cached, default_cache_dir, folder_key, key_digest


def _data(seed: int = 0) -> RawSplits:
    rng = np.random.default_rng(seed)
    return RawSplits(rng.integers(0, 256, (4, 3, 2, 2), dtype=np.uint8), np.array([0, 1, 0, 1], np.int64),
                     rng.integers(0, 256, (2, 3, 2, 2), dtype=np.uint8), np.array([1, 0], np.int64), ("a", "b"))


def _same(a: RawSplits, b: RawSplits) -> None:
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert getattr(a, name).dtype == getattr(b, name).dtype
    assert a.classes == b.classes


class Counting:
    def __init__(self, build):
        self.build, self.calls = build, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.build(*args, **kwargs)


def test_the_second_load_reads_the_entry_without_building(tmp_path: Path) -> None:
    build = Counting(_data)
    key = {"source": "x", "n": 1}
    first = cached(key, build, tmp_path)
    second = cached(key, build, tmp_path)
    assert build.calls == 1
    _same(first, second)
    entry = tmp_path / key_digest(key)
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry.name]  # no temporary folder left
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", *sorted(f"{a}.npy" for a in ARRAYS)]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["classes"] == ["a", "b"] and meta["key"] == key
    cached({"source": "x", "n": 2}, build, tmp_path)  # another key, another entry
    assert build.calls == 2


def test_nothing_is_written_when_the_build_fails(tmp_path: Path) -> None:
    def broken() -> RawSplits:
        raise ValueError("--data-root: train/cat/x.txt is not an image (PNG, JPEG, BMP, WebP)")

    with pytest.raises(ValueError, match="not an image"):
        cached({"k": 1}, broken, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_broken_entry_is_built_again(tmp_path: Path) -> None:
    build = Counting(_data)
    cached({"k": 1}, build, tmp_path)
    (tmp_path / key_digest({"k": 1}) / "x_train.npy").write_bytes(b"not numpy")
    _same(cached({"k": 1}, build, tmp_path), _data())
    assert build.calls == 2
    _same(cached({"k": 1}, build, tmp_path), _data())
    assert build.calls == 2


def test_an_unwritable_cache_warns_and_still_returns_the_data(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="--cache-dir: could not keep the decoded data"):
        _same(cached({"k": 1}, _data, tmp_path / "file" / "cache"), _data())


def test_the_default_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DDRAY_CACHE_DIR", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "own"
    monkeypatch.delenv("DDRAY_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "ddray"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "ddray"
    monkeypatch.setenv("DDRAY_CACHE_DIR", str(tmp_path / "env"))
    cached({"k": 1}, _data, None)
    assert (tmp_path / "env" / key_digest({"k": 1}) / "meta.json").is_file()


def _image_tree(root: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name in ["train/cat/a.png", "train/dog/b.png", "test/cat/c.png", "test/dog/d.png"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(root / name)


def _touch_later(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_an_image_folder_decodes_again_after_a_file_changes(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    build = Counting(folder.load_imagefolder)
    monkeypatch.setattr(folder, "load_imagefolder", build)
    root, cache = tmp_path / "images", tmp_path / "cache"
    _image_tree(root)
    first = folder.load_imagefolder_cached(root, cache_dir=cache)
    _same(folder.load_imagefolder_cached(root, cache_dir=cache), first)
    assert build.calls == 1
    new = np.full((4, 4, 3), 9, np.uint8)
    Image.fromarray(new).save(root / "train" / "dog" / "b.png")
    _touch_later(root / "train" / "dog" / "b.png")
    again = folder.load_imagefolder_cached(root, cache_dir=cache)
    assert build.calls == 2
    np.testing.assert_array_equal(again.x_train[1], new.transpose(2, 0, 1))
    folder.load_imagefolder_cached(root, cache_dir=cache, image_size=2)  # other options: another entry
    assert build.calls == 3
    assert len(list(cache.iterdir())) == 3


def test_an_archive_is_keyed_by_its_own_size_and_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build = Counting(folder.load_imagefolder)
    monkeypatch.setattr(folder, "load_imagefolder", build)
    _image_tree(tmp_path / "a", seed=1)
    _image_tree(tmp_path / "b", seed=2)
    archive, cache = tmp_path / "set.tar", tmp_path / "cache"

    def pack(src: Path) -> None:
        with tarfile.open(archive, "w") as t:
            t.add(src, arcname="set")
        _touch_later(archive)

    pack(tmp_path / "a")
    key = folder_key(archive, {})
    assert key["size"] == archive.stat().st_size and "listing" not in key
    _same(folder.load_imagefolder_cached(archive, cache_dir=cache), folder.load_imagefolder(tmp_path / "a"))
    folder.load_imagefolder_cached(archive, cache_dir=cache)
    assert build.calls == 2  # the one above, then only the first cached load
    pack(tmp_path / "b")
    _same(folder.load_imagefolder_cached(archive, cache_dir=cache), folder.load_imagefolder(tmp_path / "b"))


def test_parquet_decodes_again_after_a_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build = Counting(parquet._load)
    monkeypatch.setattr(parquet, "_load", build)
    path, cache = tmp_path / "x.parquet", tmp_path / "cache"

    def write(value: int) -> None:
        column = pa.array([[value] * 16, [value + 1] * 16], pa.list_(pa.uint8()))
        pq.write_table(pa.table({"image": column, "label": [0, 0]}), path)

    write(5)
    first = parquet.load_parquet_cached(path, cache_dir=cache, test_fraction=0.5)
    parquet.load_parquet_cached(path, cache_dir=cache, test_fraction=0.5)
    assert build.calls == 1
    write(7)
    _touch_later(path)
    second = parquet.load_parquet_cached(path, cache_dir=cache, test_fraction=0.5)
    assert build.calls == 2
    assert sorted(np.concatenate([first.x_train, first.x_test])[:, 0, 0, 0].tolist()) == [5, 6]
    assert sorted(np.concatenate([second.x_train, second.x_test])[:, 0, 0, 0].tolist()) == [7, 8]


def test_the_entry_keeps_the_channel_statistics(tmp_path: Path) -> None:
    """A cached load reads the training split's mean/std from the entry instead of going over every byte."""
    import numpy as np

    from ddray.data.base import RawSplits, channel_stats
    from ddray.data.cache import cached

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 3, 4, 4), dtype=np.uint8)
    raw = RawSplits(x, np.arange(6) % 2, x[:2], np.array([0, 1]), ("a", "b"))
    first = cached({"k": 1}, lambda: raw, tmp_path)
    again = cached({"k": 1}, lambda: raw, tmp_path)
    assert first.stats == again.stats and again.stats is not None
    assert np.allclose(again.stats, channel_stats(x))
