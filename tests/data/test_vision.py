"""torchvision data sets read from tiny files written in each set's real on-disk format."""

from __future__ import annotations

import bz2
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ddray.data import vision
from ddray.data import DATASETS, load_dataset

N_TRAIN, N_TEST = 20, 10


def _images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _labels(n: int, offset: int = 0) -> np.ndarray:
    return ((np.arange(n) + offset) % 10).astype(np.uint8)


def _check(ds, name: str, chw: tuple[int, int, int], y_train: np.ndarray, y_test: np.ndarray) -> None:
    assert ds.name == name
    assert ds.num_classes == 10
    assert ds.x_train.shape == (len(y_train), *chw) and ds.x_test.shape == (len(y_test), *chw)
    assert ds.x_train.dtype == torch.float32 and ds.x_test.dtype == torch.float32
    assert ds.y_train.dtype == torch.int64 and ds.y_test.dtype == torch.int64
    assert ds.y_train.tolist() == y_train.tolist() and ds.y_test.tolist() == y_test.tolist()
    assert len(ds.mean) == len(ds.std) == chw[0]


def _unnormalise(value: torch.Tensor, mean: float, std: float) -> float:
    return float(value) * std + mean


def _assert_pixel(ds, split: str, idx: tuple[int, int, int, int], expected_01: float) -> None:
    x = getattr(ds, f"x_{split}")
    c = idx[1]
    want = (expected_01 - ds.mean[c]) / ds.std[c]
    assert abs(float(x[idx]) - want) < 1e-6
    assert abs(_unnormalise(x[idx], ds.mean[c], ds.std[c]) - expected_01) < 1e-6


# ----------------------------------------------------------------------------- writers

def _write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> None:
    magic = 2051 if arr.ndim == 3 else 2049
    payload = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _write_mnist(root: Path, folder: str, gz: bool = False) -> tuple[np.ndarray, ...]:
    xtr, xte = _images(N_TRAIN, (28, 28), 0), _images(N_TEST, (28, 28), 1)
    ytr, yte = _labels(N_TRAIN), _labels(N_TEST, 3)
    raw = root / folder / "raw"
    _write_idx(raw / "train-images-idx3-ubyte", xtr, gz)
    _write_idx(raw / "train-labels-idx1-ubyte", ytr, gz)
    _write_idx(raw / "t10k-images-idx3-ubyte", xte, gz)
    _write_idx(raw / "t10k-labels-idx1-ubyte", yte, gz)
    return xtr, ytr, xte, yte


def _write_cifar(root: Path) -> tuple[np.ndarray, ...]:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = _images(4, (3, 32, 32), 10 + i)
        y = [int(v) for v in _labels(4, i)]
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"batch_label": b"x", b"data": x.reshape(4, 3072), b"labels": y,
                         b"filenames": [b"f"] * 4}, f, protocol=2)
        xs.append(x)
        ys.append(y)
    xte, yte = _images(N_TEST, (3, 32, 32), 20), _labels(N_TEST, 7)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": xte.reshape(N_TEST, 3072), b"labels": [int(v) for v in yte]}, f, protocol=2)
    return np.concatenate(xs), np.concatenate(ys), xte, yte


def _write_svhn(root: Path) -> tuple[np.ndarray, ...]:
    from scipy.io import savemat

    out = []
    for fname, n, seed in (("train_32x32.mat", N_TRAIN, 30), ("test_32x32.mat", N_TEST, 31)):
        x = _images(n, (3, 32, 32), seed)  # (N, C, H, W)
        digits = _labels(n, seed)
        y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)  # SVHN: 10 means 0
        savemat(str(root / fname), {"X": np.transpose(x, (2, 3, 1, 0)), "y": y})  # → (H, W, C, N)
        out += [x, digits]
    return tuple(out)


def _write_usps(root: Path) -> tuple[np.ndarray, ...]:
    out = []
    for fname, n, seed in (("usps.bz2", N_TRAIN, 40), ("usps.t.bz2", N_TEST, 41)):
        # pixel values in [-1, 1] on a 1/128 grid (exact in float32), 16×16 row-major
        v = np.random.default_rng(seed).integers(-128, 129, size=(n, 256)) / 128.0
        digits = _labels(n, seed)
        lines = [f"{d + 1} " + " ".join(f"{j + 1}:{val:.8g}" for j, val in enumerate(row))
                 for d, row in zip(digits, v)]
        with bz2.open(root / fname, "wt") as f:
            f.write("\n".join(lines) + "\n")
        out += [((v + 1) / 2).reshape(n, 1, 16, 16), digits]
    return tuple(out)


# ----------------------------------------------------------------------------- tests

def test_all_registered() -> None:
    for name in ("mnist", "fashion_mnist", "cifar10", "svhn", "usps"):
        assert name in DATASETS


@pytest.mark.parametrize("name,folder,gz", [("mnist", "MNIST", False), ("mnist", "MNIST", True),
                                            ("fashion_mnist", "FashionMNIST", False)])
def test_idx_sets(tmp_path: Path, name: str, folder: str, gz: bool) -> None:
    xtr, ytr, xte, yte = _write_mnist(tmp_path, folder, gz)
    ds = load_dataset(name, root=tmp_path)
    _check(ds, name, (1, 28, 28), ytr, yte)
    _assert_pixel(ds, "train", (3, 0, 5, 7), xtr[3, 5, 7] / 255.0)
    _assert_pixel(ds, "test", (9, 0, 27, 0), xte[9, 27, 0] / 255.0)
    expected = np.asarray(xtr, np.float32)[:, None] / np.float32(255.0)
    restored = ds.x_train.all().numpy() * ds.std[0] + ds.mean[0]
    assert np.abs(restored - expected).max() < 1e-6
    assert ds.mean == ((0.1307,) if name == "mnist" else (0.2860,))


def test_cifar10(tmp_path: Path) -> None:
    xtr, ytr, xte, yte = _write_cifar(tmp_path)
    ds = load_dataset("cifar10", root=tmp_path)
    _check(ds, "cifar10", (3, 32, 32), ytr, yte)
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2470, 0.2435, 0.2616)
    for idx in [(0, 0, 0, 0), (7, 1, 3, 30), (19, 2, 31, 31)]:  # sample 7 lives in data_batch_2
        _assert_pixel(ds, "train", idx, xtr[idx] / 255.0)
    _assert_pixel(ds, "test", (4, 2, 10, 20), xte[4, 2, 10, 20] / 255.0)


def test_svhn(tmp_path: Path) -> None:
    xtr, ytr, xte, yte = _write_svhn(tmp_path)
    assert 0 in ytr  # a stored label 10 must come back as 0
    ds = load_dataset("svhn", root=tmp_path)
    _check(ds, "svhn", (3, 32, 32), ytr, yte)
    assert ds.y_train.min() >= 0 and ds.y_train.max() <= 9
    _assert_pixel(ds, "train", (2, 0, 1, 30), xtr[2, 0, 1, 30] / 255.0)  # H/W not swapped
    _assert_pixel(ds, "test", (5, 2, 31, 0), xte[5, 2, 31, 0] / 255.0)


def test_usps(tmp_path: Path) -> None:
    xtr, ytr, xte, yte = _write_usps(tmp_path)
    ds = load_dataset("usps", root=tmp_path)
    _check(ds, "usps", (1, 16, 16), ytr, yte)  # file labels 1..10 → 0..9
    assert ds.mean == (0.2469,) and ds.std == (0.2989,)
    _assert_pixel(ds, "train", (1, 0, 2, 13), float(xtr[1, 0, 2, 13]))
    _assert_pixel(ds, "test", (9, 0, 15, 15), float(xte[9, 0, 15, 15]))
    restored = ds.x_test.all().numpy() * ds.std[0] + ds.mean[0]
    assert np.abs(restored - xte).max() < 1e-6


def test_usps_resized(tmp_path: Path) -> None:
    _write_usps(tmp_path)
    ds = load_dataset("usps", root=tmp_path, image_size=28)
    assert ds.shape == (1, 28, 28)
    assert ds.x_train.shape == (N_TRAIN, 1, 28, 28) and ds.x_test.shape == (N_TEST, 1, 28, 28)


def test_usps_sparse_line(tmp_path: Path) -> None:
    """libsvm may omit indices: they take the implicit value 0 (→ 0.5 after mapping)."""
    with bz2.open(tmp_path / "u.bz2", "wt") as f:
        f.write("10 1:-1 256:1\n")
    x, y = vision.read_usps_bz2(tmp_path / "u.bz2")
    assert y.tolist() == [9] and x.shape == (1, 1, 16, 16)
    assert x[0, 0, 0, 0] == 0.0 and x[0, 0, 15, 15] == 1.0 and x[0, 0, 8, 8] == 0.5


@pytest.mark.parametrize("name,rel", [
    ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
    ("fashion_mnist", "FashionMNIST/raw/train-images-idx3-ubyte"),
    ("cifar10", "cifar-10-batches-py/data_batch_1"),
    ("svhn", "train_32x32.mat"),
    ("usps", "usps.bz2"),
])
def test_missing_files(tmp_path: Path, name: str, rel: str) -> None:
    with pytest.raises(ValueError) as err:
        load_dataset(name, root=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert name in msg and str(tmp_path / rel) in msg and "--download" in msg
    assert vision.expected_files(name, tmp_path)[0] == tmp_path / rel


def test_missing_names_first_absent_file(tmp_path: Path) -> None:
    _write_usps(tmp_path)
    (tmp_path / "usps.t.bz2").unlink()
    with pytest.raises(ValueError, match="usps.t.bz2"):
        load_dataset("usps", root=tmp_path)


def test_no_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--data-root") as err:
        load_dataset("cifar10", root=None)
    assert "cifar-10-batches-py/data_batch_1" in str(err.value) and "\n" not in str(err.value)


def test_download_calls_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """download=True with missing files fetches through torchvision, then reads with our parser."""
    import torchvision.datasets as tvd

    calls = []

    def fake_usps(root: str, train: bool, download: bool) -> None:
        calls.append((root, train, download))
        if len(calls) == 2:
            _write_usps(Path(root))

    monkeypatch.setattr(tvd, "USPS", fake_usps)
    ds = load_dataset("usps", root=tmp_path / "new", download=True)
    assert calls == [(str(tmp_path / "new"), True, True), (str(tmp_path / "new"), False, True)]
    assert ds.x_train.shape == (N_TRAIN, 1, 16, 16)


def test_download_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets as tvd

    def offline(**kwargs: object) -> None:
        raise RuntimeError("Error downloading\nno network")

    monkeypatch.setattr(tvd, "SVHN", offline)
    with pytest.raises(ValueError) as err:
        load_dataset("svhn", root=tmp_path, download=True)
    msg = str(err.value)
    assert "\n" not in msg and "svhn" in msg and str(tmp_path / "train_32x32.mat") in msg


def test_bad_idx_magic(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(ValueError, match="IDX"):
        vision.read_idx(tmp_path / "bad")
