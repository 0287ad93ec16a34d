"""Image folders and archives of them, written here as tiny PNG / JPEG / BMP / WebP trees, read back pixel for pixel."""

from __future__ import annotations

import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddray.data.folder import load_imagefolder, load_imagefolder_cached, seeded_split

RNG = np.random.default_rng(0)


def _pixels(h: int = 4, w: int = 4, grey: bool = False) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w) if grey else (h, w, 3), dtype=np.uint8)


def _write(path: Path, pixels: np.ndarray, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def _chw(pixels: np.ndarray) -> np.ndarray:
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _tree(root: Path, files: dict[str, np.ndarray], fmt: str = "PNG") -> dict[str, np.ndarray]:
    for name, pixels in files.items():
        _write(root / name, pixels, fmt)
    return files


def _split_tree(root: Path, grey: bool = False) -> dict[str, np.ndarray]:
    """train: cat ×3, dog ×2; test: cat ×1, dog ×2; names out of order on purpose."""
    names = ["train/cat/b.png", "train/cat/a.png", "train/cat/c.png", "train/dog/z.png", "train/dog/y.png",
             "test/cat/k.png", "test/dog/m.png", "test/dog/l.png"]
    return _tree(root, {n: _pixels(grey=grey) for n in names})


def _expected(files: dict[str, np.ndarray], split: str) -> tuple[np.ndarray, list[int]]:
    names = sorted(n for n in files if n.startswith(split + "/"))
    classes = sorted({n.split("/")[1] for n in files})
    return np.stack([_chw(files[n]) for n in names]), [classes.index(n.split("/")[1]) for n in names]


def test_train_and_test_folders_read_every_pixel(tmp_path: Path) -> None:
    files = _split_tree(tmp_path)
    data = load_imagefolder(tmp_path)
    assert data.classes == ("cat", "dog")
    for split in ("train", "test"):
        x, y = _expected(files, split)
        got_x, got_y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        assert got_x.dtype == np.uint8 and got_x.shape == x.shape
        np.testing.assert_array_equal(got_x, x)
        assert got_y.dtype == np.int64 and got_y.tolist() == y


def test_a_greyscale_set_has_one_channel(tmp_path: Path) -> None:
    files = _split_tree(tmp_path, grey=True)
    data = load_imagefolder(tmp_path)
    assert data.x_train.shape == (5, 1, 4, 4)
    np.testing.assert_array_equal(data.x_train, _expected(files, "train")[0])
    np.testing.assert_array_equal(data.x_test, _expected(files, "test")[0])


def test_greyscale_images_in_a_colour_set_are_repeated_into_rgb(tmp_path: Path) -> None:
    grey, colour = _pixels(grey=True), _pixels()
    _tree(tmp_path, {"a/1.png": grey, "a/2.png": colour, "b/1.png": _pixels(grey=True), "b/2.png": _pixels()})
    data = load_imagefolder(tmp_path, test_fraction=0.5)
    x = np.concatenate([data.x_train, data.x_test])
    assert x.shape == (4, 3, 4, 4)
    every = [x[i] for i in range(4)]
    assert any(np.array_equal(e, np.repeat(grey[None], 3, axis=0)) for e in every)
    assert any(np.array_equal(e, colour.transpose(2, 0, 1)) for e in every)


def test_jpeg_gives_what_pil_decodes(tmp_path: Path) -> None:
    files = {"train/cat/a.jpg": _pixels(8, 8), "train/dog/b.jpg": _pixels(8, 8),
             "test/cat/c.jpg": _pixels(8, 8), "test/dog/d.jpg": _pixels(8, 8)}
    _tree(tmp_path, files, "JPEG")
    data = load_imagefolder(tmp_path)
    for i, name in enumerate(["train/cat/a.jpg", "train/dog/b.jpg"]):
        decoded = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        np.testing.assert_array_equal(data.x_train[i], decoded.transpose(2, 0, 1))
    assert not np.array_equal(data.x_train[0], files["train/cat/a.jpg"].transpose(2, 0, 1))  # JPEG is lossy


def test_formats_and_modes_are_recognised_by_content(tmp_path: Path) -> None:
    rgb, grey = _pixels(), _pixels(grey=True)
    rgba = np.concatenate([rgb, np.full((4, 4, 1), 7, np.uint8)], axis=2)
    deep = (grey.astype(np.uint16) << 8) | 0x5A  # 16-bit greyscale: the top 8 bits are `grey`
    _write(tmp_path / "a" / "bmp.bmp", rgb, "BMP")
    Image.fromarray(rgb).save(tmp_path / "a" / "lossless.webp", format="WEBP", lossless=True)
    Image.fromarray(rgb).save(tmp_path / "a" / "png-named.jpg", format="PNG")  # the name lies
    Image.fromarray(rgba).save(tmp_path / "a" / "rgba.png")
    _write(tmp_path / "b" / "deep.png", deep)
    Image.fromarray(rgb).convert("P").save(tmp_path / "b" / "palette.png")
    Image.fromarray(grey).convert("LA").save(tmp_path / "b" / "la.png")
    with open(tmp_path / "b" / "noext", "wb") as f:
        Image.fromarray(rgb).save(f, format="PNG")
    palette = np.asarray(Image.open(tmp_path / "b" / "palette.png").convert("RGB"))
    data = load_imagefolder(tmp_path, test_fraction=0.5)
    x = np.concatenate([data.x_train, data.x_test])
    assert x.shape == (8, 3, 4, 4) and data.classes == ("a", "b")
    found = [x[i].transpose(1, 2, 0) for i in range(8)]

    def has(pixels: np.ndarray) -> bool:
        return any(np.array_equal(f, pixels) for f in found)

    assert sum(np.array_equal(f, rgb) for f in found) == 5  # BMP, WebP, PNG named .jpg, no extension, RGBA
    assert sum(np.array_equal(f, np.repeat(grey[..., None], 3, axis=2)) for f in found) == 2  # 16-bit, LA
    assert has(palette)


def test_hidden_files_and_os_junk_are_skipped(tmp_path: Path) -> None:
    files = _split_tree(tmp_path)
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "train" / "cat" / "Thumbs.db").write_bytes(b"junk")
    (tmp_path / "__MACOSX" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "train" / "cat" / "._a.png").write_bytes(b"resource fork")
    (tmp_path / ".git").mkdir()
    (tmp_path / "README.md").write_text("loose files beside train/ and test/ are not read\n")
    data = load_imagefolder(tmp_path)
    np.testing.assert_array_equal(data.x_train, _expected(files, "train")[0])


def _pool(root: Path, counts: dict[str, int]) -> dict[str, np.ndarray]:
    """Class folders only; image k of class c has every pixel set to a unique value, to trace it."""
    files, value = {}, 0
    for cls, n in counts.items():
        for k in range(n):
            files[f"{cls}/{k:02d}.png"] = np.full((2, 2), value, np.uint8)
            value += 1
    return _tree(root, files)


def test_class_folders_are_split_per_class_by_seed_and_fraction(tmp_path: Path) -> None:
    _pool(tmp_path, {"ant": 10, "bee": 5, "cow": 2, "dog": 1})
    data = load_imagefolder(tmp_path, test_fraction=0.3, split_seed=7)
    assert data.classes == ("ant", "bee", "cow", "dog")
    # round(0.3 n), at least one to each side from two images on; a single image goes to train
    assert np.bincount(data.y_test, minlength=4).tolist() == [3, 2, 1, 0]
    assert np.bincount(data.y_train, minlength=4).tolist() == [7, 3, 1, 1]
    ids = np.concatenate([data.x_train[:, 0, 0, 0], data.x_test[:, 0, 0, 0]])
    assert sorted(ids.tolist()) == list(range(18))  # every image exactly once
    labels = np.repeat(np.arange(4), [10, 5, 2, 1])
    assert (labels[data.x_train[:, 0, 0, 0]] == data.y_train).all()
    assert (labels[data.x_test[:, 0, 0, 0]] == data.y_test).all()
    # the documented draw: one default_rng(seed), a permutation per class in label order, the first k to test
    rng, want = np.random.default_rng(7), []
    for start, n, k in [(0, 10, 3), (10, 5, 2), (15, 2, 1), (17, 1, 0)]:
        want += sorted((start + rng.permutation(n)[:k]).tolist())
    assert data.x_test[:, 0, 0, 0].tolist() == want
    again = load_imagefolder(tmp_path, test_fraction=0.3, split_seed=7)
    np.testing.assert_array_equal(again.x_test, data.x_test)
    other = load_imagefolder(tmp_path, test_fraction=0.3, split_seed=8)
    assert other.x_test[:, 0, 0, 0].tolist() != want


@pytest.mark.parametrize("fraction, n, test", [(0.01, 2, 1), (0.99, 2, 1), (0.5, 9, 4), (0.2, 100, 20)])
def test_seeded_split_keeps_one_image_on_each_side(fraction: float, n: int, test: int) -> None:
    tr, te = seeded_split(np.zeros(n, np.int64), fraction, 0)
    assert (len(tr), len(te)) == (n - test, test)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(n))


def _archive(tmp_path: Path, src: Path, name: str, top: str) -> Path:
    path = tmp_path / name
    files = sorted(p for p in src.rglob("*") if p.is_file())
    if name.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as z:
            for p in files:
                z.write(p, top + p.relative_to(src).as_posix())
    else:
        mode = "w:gz" if name.endswith(("gz", "tgz")) else "w"
        with tarfile.open(path, mode) as t:
            t.add(src, arcname=top.rstrip("/") or ".")
    return path


@pytest.mark.parametrize("name", ["set.tar", "set.tar.gz", "set.tgz", "set.zip"])
@pytest.mark.parametrize("top", ["cifar-mini/", ""])
def test_archives_are_read_in_place(tmp_path: Path, name: str, top: str) -> None:
    files = _split_tree(tmp_path / "src")
    archive = _archive(tmp_path, tmp_path / "src", name, top)
    data = load_imagefolder(archive)
    assert data.classes == ("cat", "dog")
    np.testing.assert_array_equal(data.x_train, _expected(files, "train")[0])
    np.testing.assert_array_equal(data.x_test, _expected(files, "test")[0])
    assert data.y_train.tolist() == _expected(files, "train")[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", name])  # nothing unpacked


def test_a_pooled_archive_under_one_top_folder(tmp_path: Path) -> None:
    _pool(tmp_path / "src", {"ant": 3, "bee": 3})
    archive = _archive(tmp_path, tmp_path / "src", "pool.zip", "photos/")
    data = load_imagefolder(archive, test_fraction=0.34)
    assert data.classes == ("ant", "bee")
    np.testing.assert_array_equal(data.x_test, load_imagefolder(tmp_path / "src", test_fraction=0.34).x_test)


def test_mixed_sizes_are_refused_with_the_sizes_found(tmp_path: Path) -> None:
    _tree(tmp_path, {"train/cat/a.png": _pixels(8, 8), "train/cat/b.png": _pixels(8, 8),
                     "train/cat/c.png": _pixels(6, 5), "test/cat/d.png": _pixels(8, 8)})
    with pytest.raises(ValueError) as e:
        load_imagefolder_cached(tmp_path, cache_dir=tmp_path / "cache")
    assert str(e.value) == ("--data-root: images of different sizes: found 8×8 (3 files) and 5×6 (1 file, "
                            "e.g. train/cat/c.png); give --image-size N to resize every image to N×N")
    assert not (tmp_path / "cache").exists()


def test_image_size_resizes_every_image_bilinearly(tmp_path: Path) -> None:
    files = _tree(tmp_path, {"train/cat/a.png": _pixels(8, 8), "train/cat/b.png": _pixels(6, 5, grey=True),
                             "test/cat/c.png": _pixels(4, 4)})
    data = load_imagefolder(tmp_path, image_size=4)
    assert data.x_train.shape == (2, 3, 4, 4) and data.x_test.shape == (1, 3, 4, 4)

    def resized(name: str) -> np.ndarray:
        a = np.asarray(Image.fromarray(files[name]).resize((4, 4), Image.Resampling.BILINEAR))
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    np.testing.assert_array_equal(data.x_train[0], resized("train/cat/a.png"))
    np.testing.assert_array_equal(data.x_train[1], np.repeat(resized("train/cat/b.png"), 3, axis=0))
    np.testing.assert_array_equal(data.x_test[0], resized("test/cat/c.png"))


def _bad(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A bad root and its whole one-line message."""
    root = tmp_path / "root"
    if case == "missing":
        return root, f"--data-root: {root} does not exist"
    if case == "empty class":
        _split_tree(root)
        (root / "test" / "cow").mkdir()
        (root / "test" / "cow" / ".DS_Store").write_bytes(b"")
        return root, "--data-root: test/cow/ is an empty class folder (class 'cow' has no images)"
    if case == "class only in train":
        _split_tree(root)
        _write(root / "train" / "emu" / "e.png", _pixels())
        return root, ("--data-root: class 'emu' is in train/ but not in test/ (train and test need the same "
                      "classes)")
    if case == "not an image":
        _split_tree(root)
        (root / "train" / "cat" / "notes.txt").write_text("a note, not a picture")
        return root, "--data-root: train/cat/notes.txt is not an image (PNG, JPEG, BMP, WebP)"
    if case == "damaged image":
        _split_tree(root)
        good = (root / "train" / "dog" / "y.png").read_bytes()
        (root / "train" / "dog" / "y.png").write_bytes(good[:60])
        return root, "--data-root: train/dog/y.png is a damaged image"
    if case == "gif":
        _split_tree(root)
        Image.fromarray(_pixels()).save(root / "test" / "dog" / "anim.gif")
        return root, "--data-root: test/dog/anim.gif is not an image (PNG, JPEG, BMP, WebP)"
    if case == "tar.gz of text":
        path = tmp_path / "data.tar.gz"
        path.write_text("this is not an archive\n")
        return path, f"--data-root: {path} is not a readable tar archive"
    if case == "zip of text":
        path = tmp_path / "data.zip"
        path.write_text("this is not an archive\n")
        return path, f"--data-root: {path} is not a readable zip archive"
    if case == "other file":
        path = tmp_path / "data.csv"
        path.write_text("a,b\n")
        return path, f"--data-root: {path} is a file, not a folder or a .tar, .tar.gz, .tgz or .zip archive"
    if case == "no class folders":
        _write(root / "loose.png", _pixels())
        return root, (f"--data-root: {root} holds neither train/ and test/ folders nor class folders "
                      "(expected train/<class>/… and test/<class>/…, or <class>/…)")
    if case == "train without test":
        _write(root / "train" / "cat" / "a.png", _pixels())
        return root, (f"--data-root: {root} has train/ but no test/; give both, or put the class folders "
                      "directly beneath the root (split by --test-fraction)")
    if case == "broken link":
        _split_tree(root)
        os.symlink(tmp_path / "gone.png", root / "train" / "cat" / "gone.png")
        return root, "--data-root: train/cat/gone.png cannot be read"
    if case == "splits without classes":
        (root / "train").mkdir(parents=True)
        (root / "test").mkdir()
        return root, "--data-root: train/ holds no class folders (expected train/<class>/…)"
    if case == "loose file in a split":
        _split_tree(root)
        _write(root / "test" / "stray.png", _pixels())
        return root, "--data-root: test/stray.png is not in a class folder (expected test/<class>/…)"
    raise AssertionError(case)


CASES = ["missing", "empty class", "class only in train", "not an image", "damaged image", "gif",
         "tar.gz of text", "zip of text", "other file", "no class folders", "train without test",
         "broken link", "splits without classes", "loose file in a split"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_naming_the_option_and_path(tmp_path: Path, case: str) -> None:
    root, message = _bad(tmp_path, case)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError) as e:
        load_imagefolder_cached(root, cache_dir=cache)
    text = str(e.value)
    assert "\n" not in text
    assert text == message or (text.startswith(message + " (") and text.endswith(")"))  # + the reason
    assert not cache.exists()  # nothing written


@pytest.mark.parametrize("options, message", [
    ({"test_fraction": 0.0}, "--test-fraction: invalid value 0.0; expected a number between 0 and 1, both excluded"),
    ({"test_fraction": 1}, "--test-fraction: invalid value 1; expected a number between 0 and 1, both excluded"),
    ({"image_size": 0}, "--image-size: invalid value 0; expected a positive integer"),
])
def test_bad_options_are_refused(tmp_path: Path, options: dict, message: str) -> None:
    _split_tree(tmp_path)
    with pytest.raises(ValueError, match=f"^{message}$"):
        load_imagefolder(tmp_path, **options)


def test_symlinked_class_folders_are_followed(tmp_path: Path) -> None:
    files = _tree(tmp_path / "elsewhere", {"cat/a.png": _pixels(), "cat/b.png": _pixels()})
    (tmp_path / "root").mkdir()
    os.symlink(tmp_path / "elsewhere" / "cat", tmp_path / "root" / "cat")
    data = load_imagefolder(tmp_path / "root", test_fraction=0.5, split_seed=1)
    x = np.concatenate([data.x_train, data.x_test])
    assert sorted(a.tobytes() for a in x) == sorted(_chw(p).tobytes() for p in files.values())
