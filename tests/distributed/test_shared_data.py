"""The real data once per node: the driver puts the uint8 set into the object store, and every worker of the node
maps that one read-only copy (zero-copy numpy) instead of loading one of its own; a run from an image folder through
Ray equals the same run in one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dist_support import tiny

from ddray.data import load_dataset
from ddray.distributed.driver import distill_ray
from ddray.distributed.pool import RemoteWorker
from ddray.distributed.shards import shard_layout
from ddray.distributed.worker import InStore
from ddray.run.loop import distill


def test_two_workers_map_the_one_copy_in_the_object_store(ray_local: Any) -> None:
    ds = load_dataset("mnist5k")
    ref = ray_local.put(ds.to_shared())
    cfg = tiny(None)
    layout = shard_layout(10, 1, 1)
    workers = [RemoteWorker.options(num_cpus=0).remote("meta", cfg, i, 1, layout, "cpu", InStore(ref))
               for i in range(2)]
    infos = ray_local.get([w.data_info.remote() for w in workers])
    for info in infos:  # views of the store's shared memory, not copies
        assert info["bytes"] == 4000 * 784 and info["dtype"] == "torch.uint8" and not info["rows"]
        assert "plasma" in info["mapping"] or info["mapping"].startswith("/dev/shm"), info
    alone = RemoteWorker.options(num_cpus=0).remote("meta", cfg, 2, 1, layout, "cpu", None)
    assert ray_local.get(alone.data_info.remote())["mapping"] in ("", "[heap]")  # loaded by itself: its own copy
    for w in (*workers, alone):
        ray_local.kill(w)


def _tree(root: Path) -> Path:
    """3 classes of 8×8 RGB PNGs: 12 train and 4 test images each."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for c, name in enumerate(("cat", "dog", "emu")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                px = np.clip(rng.normal(60 + 70 * c, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(root / split / name / f"{i:03d}.png")
    return root


def test_an_image_folder_run_through_ray_equals_one_process(ray_local: Any, tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree")
    over = dict(dataset="imagefolder", data_root=str(root), cache_dir=str(tmp_path / "cache"), model="convnet",
                width=8, batch_size=24, iterations=4, checkpoint_every=4, nets=2, scores=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each 1-CPU worker computes
    try:
        local = distill(tiny(tmp_path / "local", **over), progress=False)  # chunks as 2 workers cut them
    finally:
        torch.set_num_threads(threads)
    ray_run = distill_ray(tiny(tmp_path / "ray", **over), progress=False)
    assert torch.equal(local.distilled.images, ray_run.distilled.images)
    assert torch.equal(local.distilled.lrs, ray_run.distilled.lrs)
    assert ray_run.distilled.meta["class_names"] == ["cat", "dog", "emu"]
    assert ray_run.result == local.result
