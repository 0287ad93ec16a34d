"""Parquet tables as the Hugging Face hub and pyarrow write them, written here and read back pixel for pixel."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ddray.data.parquet import load_parquet, load_parquet_cached

RNG = np.random.default_rng(1)
NAMES = ["airplane", "bird", "cat"]


def _pixels(n: int, h: int = 4, w: int = 4, grey: bool = False) -> np.ndarray:
    """(n, H, W[, 3]) uint8."""
    return RNG.integers(0, 256, size=(n, h, w) if grey else (n, h, w, 3), dtype=np.uint8)


def _encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _chw(pixels: np.ndarray) -> np.ndarray:
    """(n, H, W[, 3]) → (n, C, H, W)."""
    return pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2)


def _hf_table(pixels: np.ndarray, labels: list[int], fmt: str = "PNG") -> pa.Table:
    """As HF's ``datasets`` writes an Image + ClassLabel data set: a {bytes, path} struct and the metadata."""
    image = pa.array([{"bytes": _encode(p, fmt), "path": f"{i}.png"} for i, p in enumerate(pixels)],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    features = {"image": {"_type": "Image"}, "label": {"names": NAMES, "_type": "ClassLabel"}}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    table = pa.table({"image": image, "label": pa.array(labels, pa.int64())})
    return table.replace_schema_metadata(meta)


def _write(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def test_hugging_face_layout_struct_images_and_class_label_names(tmp_path: Path) -> None:
    train, test = _pixels(6), _pixels(3)
    y_train, y_test = [2, 0, 1, 1, 0, 2], [1, 2, 0]
    _write(tmp_path / "data" / "train-00000-of-00001.parquet", _hf_table(train, y_train))
    _write(tmp_path / "data" / "test-00000-of-00001.parquet", _hf_table(test, y_test))
    data = load_parquet(tmp_path)
    assert data.classes == tuple(NAMES)
    np.testing.assert_array_equal(data.x_train, _chw(train))
    np.testing.assert_array_equal(data.x_test, _chw(test))
    assert data.y_train.dtype == np.int64 and data.y_train.tolist() == y_train and data.y_test.tolist() == y_test


def test_train_files_split_over_several_files_keep_their_order(tmp_path: Path) -> None:
    a, b, t = _pixels(2, grey=True), _pixels(2, grey=True), _pixels(3, grey=True)
    _write(tmp_path / "train-00000-of-00002.parquet", _hf_table(a, [0, 1]))
    _write(tmp_path / "train-00001-of-00002.parquet", _hf_table(b, [2, 2]))
    _write(tmp_path / "test-00000-of-00001.parquet", _hf_table(t, [0, 1, 2]))
    _write(tmp_path / "validation-00000-of-00001.parquet", pa.table({"other": [1]}))  # not read
    data = load_parquet(tmp_path)
    assert data.x_train.shape == (4, 1, 4, 4)
    np.testing.assert_array_equal(data.x_train, _chw(np.concatenate([a, b])))
    assert data.y_train.tolist() == [0, 1, 2, 2]


def test_split_by_sub_folder_with_string_labels_and_jpeg(tmp_path: Path) -> None:
    train, test = _pixels(4, 8, 8), _pixels(2, 8, 8)
    for split, pixels, labels in (("train", train, ["dog", "cat", "dog", "cat"]), ("test", test, ["cat", "dog"])):
        table = pa.table({"image": pa.array([_encode(p, "JPEG") for p in pixels], pa.binary()),
                          "label": labels, "id": list(range(len(labels)))})
        _write(tmp_path / split / "part-0.parquet", table)
    data = load_parquet(tmp_path)
    assert data.classes == ("cat", "dog")
    assert data.y_train.tolist() == [1, 0, 1, 0] and data.y_test.tolist() == [0, 1]
    for got, pixels in ((data.x_train, train), (data.x_test, test)):
        decoded = np.stack([np.asarray(Image.open(io.BytesIO(_encode(p, "JPEG")))) for p in pixels])
        np.testing.assert_array_equal(got, _chw(decoded))


@pytest.mark.parametrize("layout", ["flat grey", "flat rgb", "HxW", "HxWxC", "CxHxW", "fixed size"])
def test_uint8_pixel_arrays_with_their_shape_inferred(tmp_path: Path, layout: str) -> None:
    grey = layout in ("flat grey", "HxW")
    pixels = _pixels(10, grey=grey)  # (n, 4, 4[, 3])
    if layout in ("flat grey", "flat rgb"):
        column = pa.array([p.reshape(-1) for p in pixels], pa.list_(pa.uint8()))
    elif layout == "CxHxW":
        column = pa.array([p.transpose(2, 0, 1).tolist() for p in pixels], pa.list_(pa.list_(pa.list_(pa.uint8()))))
    elif layout == "fixed size":
        column = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1), pa.uint8()), 48)
    else:
        column = pa.array([p.tolist() for p in pixels], pa.list_(pa.list_(pa.uint8())) if grey
                          else pa.list_(pa.list_(pa.list_(pa.uint8()))))
    labels = [i % 2 for i in range(10)]
    _write(tmp_path / "pixels.parquet", pa.table({"image": column, "label": pa.array(labels, pa.int32())}))
    data = load_parquet(tmp_path / "pixels.parquet", test_fraction=0.4, split_seed=3)
    assert data.classes == ("0", "1")
    x = np.concatenate([data.x_train, data.x_test])
    assert x.shape == (10, 1 if grey else 3, 4, 4)
    # the documented split: per class, default_rng(seed) permutations, round(0.4 × 5) = 2 to test
    rng, test = np.random.default_rng(3), []
    for c in (0, 1):
        idx = np.flatnonzero(np.array(labels) == c)
        test += sorted(idx[rng.permutation(5)[:2]].tolist())
    train = [i for c in (0, 1) for i in range(10) if labels[i] == c and i not in test]
    np.testing.assert_array_equal(data.x_test, _chw(pixels)[test])
    np.testing.assert_array_equal(data.x_train, _chw(pixels)[train])
    assert data.y_test.tolist() == [labels[i] for i in test]


def test_the_img_column_of_hf_cifar10_and_labels_without_names(tmp_path: Path) -> None:
    pixels = _pixels(4)
    table = pa.table({"img": pa.array([_encode(p) for p in pixels]), "label": pa.array([0, 3, 3, 0], pa.int64())})
    _write(tmp_path / "train.parquet", table)
    _write(tmp_path / "test.parquet", table)
    data = load_parquet(tmp_path)
    assert data.classes == ("0", "1", "2", "3")
    np.testing.assert_array_equal(data.x_test, _chw(pixels))


def test_mixed_sizes_refused_then_resized_with_image_size(tmp_path: Path) -> None:
    big, small = _pixels(3, 8, 8), _pixels(1, 6, 6)
    blobs = [_encode(p) for p in big] + [_encode(small[0])]
    path = _write(tmp_path / "x.parquet", pa.table({"image": blobs, "label": ["a", "a", "b", "b"]}))
    with pytest.raises(ValueError) as e:
        load_parquet_cached(path, cache_dir=tmp_path / "cache")
    assert str(e.value) == (f"--data-root: images of different sizes: found 8×8 (3 rows) and 6×6 (1 row, e.g. "
                            f"{path} row 3); give --image-size N to resize every image to N×N")
    assert not (tmp_path / "cache").exists()
    data = load_parquet(path, image_size=4, test_fraction=0.5)
    x = np.concatenate([data.x_train, data.x_test])
    want = [np.asarray(Image.fromarray(p).resize((4, 4), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
            for p in [*big, small[0]]]
    assert sorted(a.tobytes() for a in x) == sorted(w.tobytes() for w in want)


def test_mixed_pixel_array_shapes_are_resized_too(tmp_path: Path) -> None:
    a, b = _pixels(1, 4, 4, grey=True)[0], _pixels(1, 6, 6, grey=True)[0]
    column = pa.array([a.reshape(-1), b.reshape(-1)], pa.list_(pa.uint8()))
    path = _write(tmp_path / "train-0.parquet", pa.table({"image": column, "label": [0, 0]}))
    _write(tmp_path / "test-0.parquet", pa.table({"image": column, "label": [0, 0]}))
    sizes = r"found 4×4 \(2 rows\) and 6×6 \(2 rows, e\.g\. .*/train-0\.parquet row 1\)"
    with pytest.raises(ValueError, match=sizes):
        load_parquet(tmp_path)
    data = load_parquet(tmp_path, image_size=6)
    np.testing.assert_array_equal(data.x_train[1, 0], b)
    resized = np.asarray(Image.fromarray(a).resize((6, 6), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(data.x_train[0, 0], resized)
    assert path.exists()


def _bad(tmp_path: Path, case: str) -> tuple[Path, str]:
    ok = _hf_table(_pixels(2), [0, 1])
    if case == "missing":
        return tmp_path / "nope", f"--data-root: {tmp_path / 'nope'} does not exist"
    if case == "no parquet files":
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "notes.txt").write_text("x")
        return tmp_path / "d", f"--data-root: {tmp_path / 'd'} holds no .parquet files"
    if case == "no image column":
        path = _write(tmp_path / "x.parquet", pa.table({"picture": [b"x"], "label": [0], "id": [1]}))
        return path, f"--data-root: {path} has no image (or img) column (columns: picture, label, id)"
    if case == "no label column":
        path = _write(tmp_path / "x.parquet", pa.table({"image": [b"x"], "target": [0]}))
        return path, f"--data-root: {path} has no label column (columns: image, target)"
    if case == "not an image":
        path = _write(tmp_path / "x.parquet", pa.table({"image": [_encode(_pixels(1)[0]), b"text"], "label": [0, 0]}))
        return path, f"--data-root: {path} row 1 is not an image (PNG, JPEG, BMP, WebP)"
    if case == "class only in train":
        _write(tmp_path / "train" / "a.parquet", ok)
        _write(tmp_path / "test" / "a.parquet", _hf_table(_pixels(1), [0]))
        return tmp_path, (f"--data-root: class 'bird' is in {tmp_path}'s train files but not in its test files "
                          "(train and test need the same classes)")
    if case == "float pixels":
        path = _write(tmp_path / "x.parquet", pa.table({"image": [[0.5] * 16], "label": [0]}))
        return path, f"--data-root: {path} holds pixels of type double; expected uint8"
    if case == "bad flat length":
        path = _write(tmp_path / "x.parquet", pa.table({"image": pa.array([[1] * 10], pa.list_(pa.uint8())),
                                                        "label": [0]}))
        return path, (f"--data-root: {path} holds flat pixel lists of length 10, neither a square greyscale image "
                      "(side²) nor a square RGB one (3 × side²)")
    if case == "path only":
        image = pa.array([{"bytes": None, "path": "/elsewhere/0.png"}],
                         pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        path = _write(tmp_path / "x.parquet", pa.table({"image": image, "label": [0]}))
        return path, f"--data-root: {path} row 0 has no image bytes (a path only?); expected the images inside the file"
    if case == "negative label":
        path = _write(tmp_path / "x.parquet", pa.table({"image": [_encode(_pixels(1)[0])] * 2, "label": [0, -1]}))
        return path, (f"--data-root: {path} row 1 has label -1; expected class indices from 0 (HF writes -1 for "
                      "'no label')")
    if case == "mixed kinds":
        _write(tmp_path / "train.parquet", ok)
        column = pa.array([[0] * 16, [1] * 16], pa.list_(pa.uint8()))
        _write(tmp_path / "test.parquet", pa.table({"image": column, "label": [0, 1]}))
        return tmp_path, (f"--data-root: some files hold encoded images, others pixel arrays "
                          f"(e.g. {tmp_path}/test.parquet); expected one kind")
    raise AssertionError(case)


CASES = ["missing", "no parquet files", "no image column", "no label column", "not an image", "class only in train",
         "float pixels", "bad flat length", "path only", "negative label", "mixed kinds"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_naming_the_option_and_path(tmp_path: Path, case: str) -> None:
    root, message = _bad(tmp_path, case)
    with pytest.raises(ValueError) as e:
        load_parquet_cached(root, cache_dir=tmp_path / "cache")
    assert str(e.value) == message
    assert not (tmp_path / "cache").exists()
