"""DC, DM and MTT on the Ray workers and parameter server(s): the same sets as in one process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_support import tiny

from ddray.cli import main
from ddray.config import Config
from ddray.distributed.driver import distill_ray
from ddray.run.loop import distill

# DD-only options (steps, epochs, batch_size) back at their defaults
METHOD = dict(model="convnet", width=8, real_per_class=16, eval_nets=1, eval_epochs=5, steps=10, epochs=3,
              batch_size=1024, ipc=2, nets=2, iterations=4, checkpoint_every=2, scores=False)


def _cfg(out: Path, method: str, **overrides: Any) -> Config:
    return tiny(out, **{**METHOD, "method": method, **overrides})


@pytest.mark.parametrize("method,extra", [
    ("dc", {"outer_loop": 2, "inner_loop": 1}),  # iteration 0 = steps 0, 1: the net carries over on its worker
    ("dm", {"shards": 2}),  # classes are independent: two servers own half the classes each
])
def test_matching_methods_on_two_workers_equal_one_process(ray_local: Any, tmp_path: Path, method: str,
                                                          extra: dict[str, Any], one_thread: None) -> None:
    """DM: bit for bit (one torch thread, as each 1-CPU worker). DC: a network kept on a worker between
    outer steps is rebuilt when its chunk moves (README), so DC is compared to float32 tolerance."""
    ray_run = distill_ray(_cfg(tmp_path / "ray", method, workers=2, **extra), progress=False)
    local = distill(_cfg(tmp_path / "local", method, **extra), progress=False)
    if method == "dm":
        assert torch.equal(ray_run.distilled.images, local.distilled.images)
        assert torch.equal(ray_run.distilled.lrs, local.distilled.lrs)
    else:
        torch.testing.assert_close(ray_run.distilled.images, local.distilled.images, rtol=1e-4, atol=1e-5)
    meta = json.loads((ray_run.out / "meta.json").read_text())
    assert meta["method"] == method and meta["eval_protocol"] == "dc"
    assert meta["dsa_strategy"] == ("color_crop_cutout_flip_scale_rotate" if method == "dm" else None)
    report = json.loads((ray_run.out / "eval.json").read_text())
    assert report["protocol"] == "dc" and report["shuffled_order"] is None and report["test"]["n"] == 1
    # the images moved away from the real images they started from
    start = distill(_cfg(tmp_path / "zero", method, iterations=1, **extra), progress=False)
    assert not torch.allclose(start.distilled.images, local.distilled.images)


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny ConvNet experts on digits (3 epochs each), made by the command a user runs."""
    out = tmp_path_factory.mktemp("experts")
    assert main(["experts", "--dataset", "digits", "--model", "convnet", "--width", "8", "--num-experts", "2",
                 "--train-epochs", "3", "--expert-lr", "0.05", "--out", str(out), "--no-progress",
                 "--no-tracking"]) == 0
    return out


def _mtt(out: Path, experts: Path, **overrides: Any) -> Config:
    return tiny(out, **{**MTT, "experts": str(experts), **overrides})


MTT = dict(dataset="digits", model="convnet", width=8, steps=10, epochs=3, batch_size=1024, method="mtt", max_start_epoch=2, syn_steps=3, ipc=2,
           nets=2, iterations=4, checkpoint_every=2, eval_nets=1, eval_epochs=2, batch_syn=8)


def test_mtt_on_two_workers_and_sharded_servers_equals_one_process(ray_local: Any, tmp_path: Path, experts: Path,
                                                                    one_thread: None) -> None:
    """MTT through Ray (each worker draws its networks' expert segments, two servers own five classes each)
    gives the --local set bit for bit; so does a run stopped after step 2 and resumed on Ray."""
    ray_run = distill_ray(_mtt(tmp_path / "ray", experts, shards=2), progress=False)
    local = distill(_mtt(tmp_path / "local", experts), progress=False)
    assert torch.equal(ray_run.distilled.images, local.distilled.images)
    assert torch.equal(ray_run.distilled.lrs, local.distilled.lrs)
    distill(_mtt(tmp_path / "cut", experts, iterations=2), progress=False)
    resumed = distill_ray(_mtt(tmp_path / "cut", experts, shards=2), progress=False, resume=tmp_path / "cut")
    assert torch.equal(resumed.distilled.images, local.distilled.images)
    assert torch.equal(resumed.distilled.lrs, local.distilled.lrs)
    meta = json.loads((ray_run.out / "meta.json").read_text())
    assert meta["method"] == "mtt" and meta["iterations"] == 4
    # the images moved away from the real images they started from
    start = distill(_mtt(tmp_path / "zero", experts, iterations=1), progress=False)
    assert not torch.equal(start.distilled.images, local.distilled.images)


@pytest.mark.parametrize("method,extra", [("dm", {"shards": 2}), ("dsa", {})])
def test_interrupted_run_resumes_bitwise_with_the_sgd_momentum(ray_local: Any, tmp_path: Path, method: str,
                                                               extra: dict[str, Any]) -> None:
    """The SGD momentum buffers travel in the checkpoints (sharded too): stop after step 3, resume from 2."""
    straight = distill_ray(_cfg(tmp_path / "straight", method, workers=2, **extra), progress=False)

    def die(step: int, metrics: dict[str, float]) -> None:
        if step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        distill_ray(_cfg(out, method, workers=2, **extra), progress=False, on_step=die)
    resumed = distill_ray(_cfg(out, method, workers=2, **extra), progress=False, resume=out)
    assert torch.equal(resumed.distilled.images, straight.distilled.images)
    saved = torch.load(out / "checkpoints" / "step-00000004.pt", weights_only=False)
    assert "momentum_buffer" in saved["optimizer"]["opt"]["state"][0]
