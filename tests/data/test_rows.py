"""Real images held raw and normalised per batch; a set read through a bounded cache (``--data-cache-mb``).

* the uint8 path gives the meta-gradient of the float path (the images normalised up front, as before);
* the class-partitioned Parquet copy returns the exact bytes, reads only a class's row groups for a
  class's pool, keeps its cache within the budget, and a run with ``--data-cache-mb`` distils the same
  synthetic set bit for bit as the whole set in memory (DD and DM), and scores it the same, the scores'
  full-data training read through the bounded cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ddray.config import Config
from ddray.core.images import Images
from ddray.data import Dataset, load_dataset
from ddray.data.rows import GROUP_ROWS, bounded
from ddray.inputs.problem import build_problem
from ddray.run.loop import distill


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_dataset("mnist5k")


def test_mnist5k_is_held_as_bytes_and_normalised_per_batch(mnist: Dataset) -> None:
    raw = mnist.x_train.take_raw(slice(None))
    assert raw.dtype == torch.uint8 and raw.shape == (4000, 1, 28, 28)
    idx = torch.tensor([0, 17, 3999])
    want = (raw[idx].double() / 255 - 0.1307) / 0.3081
    assert torch.allclose(mnist.x_train[idx].double(), want, atol=1e-6)
    assert mnist.x_train[idx].dtype == torch.float32


def test_uint8_meta_step_equals_the_float_meta_step(mnist: Dataset) -> None:
    """The objective on uint8 data normalised per batch = the objective on the set normalised up front."""
    cfg = Config.from_dict({"dataset": "mnist5k", "steps": 2, "epochs": 1, "batch_size": 128, "nets": 2})
    as_bytes = build_problem(cfg, mnist)
    as_floats = build_problem(cfg, Dataset("mnist5k", mnist.x_train.all(), mnist.y_train, mnist.x_test.all(),
                                           mnist.y_test, 10, mnist.mean, mnist.std))
    assert as_floats.data.x_train.raw.dtype == torch.float32
    syn = as_bytes.initial_synthetic()
    a = as_bytes.objective()(syn.images, syn.raw_lrs, 3, [0, 1])
    b = as_floats.objective()(syn.images, syn.raw_lrs, 3, [0, 1])
    assert torch.allclose(a.images, b.images, rtol=1e-5, atol=1e-7)
    assert torch.allclose(a.raw_lrs, b.raw_lrs, rtol=1e-5, atol=1e-7)


def test_the_parquet_copy_returns_the_same_bytes_within_its_budget(mnist: Dataset, tmp_path: Path) -> None:
    small = bounded(mnist, 1, tmp_path)  # 1 MB: 1,337 MNIST images, a third of the training split
    x, src = small.x_train, mnist.x_train
    idx = torch.randperm(4000, generator=torch.Generator().manual_seed(0))[:1500]
    assert torch.equal(x.take_raw(idx), src.take_raw(idx))
    assert torch.equal(x[idx], src[idx])
    cache = x.raw.cache
    assert cache.used <= 2 ** 20 and cache.reads > 0
    assert torch.equal(small.x_test[:], mnist.x_test[:])
    # a class's pool: a view that reads that class's row groups only
    cache.groups.clear(), setattr(cache, "used", 0), setattr(cache, "reads", 0)
    pool = x.subset(small.y_train == 3)
    assert cache.reads == 0 and len(pool) == int((mnist.y_train == 3).sum())
    assert torch.equal(pool.take_raw(slice(None)), src.take_raw(mnist.y_train == 3))
    assert cache.reads == -(-len(pool) // GROUP_ROWS)
    # a second bounded load reuses the copy written by the first
    again = bounded(mnist, 1, tmp_path)
    assert again.x_train.raw.path == x.raw.path
    assert torch.equal(again.x_train.take_raw(idx[:10]), src.take_raw(idx[:10]))


def test_float_sets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^--data-cache-mb: --dataset digits is held as float32"):
        bounded(load_dataset("digits"), 4, tmp_path)


@pytest.mark.parametrize("method", ["dd", "dm"])
def test_a_bounded_run_distils_the_same_set_bit_for_bit(method: str, tmp_path: Path) -> None:
    base = {"dataset": "mnist5k", "iterations": 4, "eval_nets": 2, "seed": 1, "cache_dir": str(tmp_path / "cache"),
            "checkpoint_every": 4, "scores": False}
    if method == "dd":
        base |= {"steps": 2, "epochs": 1, "batch_size": 256, "nets": 2}
    else:
        base |= {"method": "dm", "model": "convnet", "width": 8, "real_per_class": 16, "nets": 1, "eval_epochs": 2}
    whole = distill(Config.from_dict({**base, "out": str(tmp_path / "whole")}), progress=False)
    part = distill(Config.from_dict({**base, "data_cache_mb": 1, "out": str(tmp_path / "part")}), progress=False)
    assert torch.equal(whole.distilled.images, part.distilled.images)
    assert torch.equal(whole.distilled.lrs, part.distilled.lrs)
    assert part.result == whole.result  # the held-out networks score the same, test split read from the copy


def test_the_scores_full_data_training_reads_the_bounded_copy_within_its_budget(mnist: Dataset,
                                                                                tmp_path: Path) -> None:
    """DD-Ranking's scores train networks on the whole training split; with ``--data-cache-mb`` that split
    is read through the bounded cache, which stays within its MB, and the scores are those of the set in
    memory."""
    from ddray.evaluation.held_out import score_distilled
    from ddray.evaluation.scores import FullDataCache
    from ddray.inputs.problem import to_distilled

    cfg = Config.from_dict({"dataset": "mnist5k", "steps": 1, "epochs": 1, "eval_nets": 1, "eval_epochs": 1,
                            "full_epochs": 1, "score_lrs": "0.01", "seed": 2})
    whole = build_problem(cfg, mnist)
    part = build_problem(cfg, bounded(mnist, 1, tmp_path / "cache"))
    cache = part.data.x_train.raw.cache
    peak = 0
    get = cache.get

    def watched(*args: Any, **kwargs: Any) -> Any:  # the most the cache ever held, after each read
        nonlocal peak
        out = get(*args, **kwargs)
        peak = max(peak, cache.used)
        return out

    cache.get = watched
    d = to_distilled(whole, whole.initial_synthetic(), 0)
    want = score_distilled(whole, d, cache=FullDataCache(tmp_path / "whole"))
    reads = cache.reads
    got = score_distilled(part, d, cache=FullDataCache(tmp_path / "part"))
    assert got == want
    # 4,000 images of 784 bytes (3.1 MB) through 1 MB: the full split's epoch read every row group at least once
    assert cache.reads - reads >= part.data.x_train.raw.file.num_row_groups and 0 < peak <= 2 ** 20


def test_data_cache_mb_zero_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^--data-cache-mb: invalid value 0; expected a positive integer"):
        Config.from_dict({"data_cache_mb": 0})


def test_images_wrap_a_float_tensor_as_is() -> None:
    x = torch.randn(5, 1, 4, 4)
    img = Images(x)
    assert torch.equal(img[:], x) and img.shape == x.shape and len(img) == 5


def test_class_pools_are_views_of_the_shared_bytes(mnist: Dataset) -> None:
    """DC/DM draw per class from views of the one uint8 copy (a worker on the object store's copy adds none)."""
    from ddray.core.matching import ClassBatches

    batches = ClassBatches(mnist.x_train, mnist.y_train, 10, 8, seed=0)
    for c, pool in enumerate(batches.pools):
        assert isinstance(pool, Images) and pool.raw.data_ptr() == mnist.x_train.raw.data_ptr()
        assert torch.equal(pool[:], mnist.x_train[mnist.y_train == c])
    drawn = batches.draw(5)
    assert [len(x) for x in drawn] == [8] * 10 and drawn[0].dtype == torch.float32


def test_the_copy_on_a_storage_uri_serves_every_process(mnist: Dataset, tmp_path: Path) -> None:
    """With a --storage URI the copy is written there once (one for all nodes) and a store travels (pickled to a
    Ray worker) as its file and positions."""
    import pickle

    from ddray.store.storage import filesystem

    fs, base = filesystem(f"file://{tmp_path / 'bucket'}")
    small = bounded(mnist, 1, tmp_path / "unused", (fs, base))
    written = sorted(p.name for p in (tmp_path / "bucket" / "data-rows").rglob("*") if p.is_file())
    assert written == ["test.parquet", "test.position.npy", "train.parquet", "train.position.npy"]
    assert not (tmp_path / "unused").exists()
    idx = torch.arange(0, 4000, 7)
    assert torch.equal(small.x_train.take_raw(idx), mnist.x_train.take_raw(idx))
    moved = pickle.loads(pickle.dumps(small.x_train.raw))
    assert torch.equal(moved.take(idx), mnist.x_train.take_raw(idx)) and moved.cache.budget == 2 ** 20
    again = bounded(mnist, 1, tmp_path / "unused", (fs, base))  # found, not written again
    assert torch.equal(again.x_test[:], mnist.x_test[:])
