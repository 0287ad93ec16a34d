"""tune_configs/cifar10_dd.yaml: DD on CIFAR-10 from the user's image folder (``--data-root``) — the file
is parsed as ``ddray tune FILE --data-root DIR`` parses it and its search space expanded; nothing is run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tune_support import REPO

from ddray.inputs.sources import load_data
from ddray.tune.spec import load_tune_spec

SPEC = REPO / "tune_configs" / "cifar10_dd.yaml"
CLASSES = ("airplane", "cat")


def image_folder(root: Path) -> Path:
    """A CIFAR-like tree: train/<class>/ with 3 and test/<class>/ with 2 32×32 RGB images per class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i:04d}.png")
    return root


def test_data_root_comes_from_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_tune_spec(SPEC).fixed.data.data_root is None  # the file names no path of its own
    root = image_folder(tmp_path / "cifar")
    monkeypatch.chdir(tmp_path)
    spec = load_tune_spec(SPEC, data_root="cifar")  # as `ddray tune FILE --data-root cifar` passes it
    data = spec.fixed.data
    assert data.dataset == "imagefolder" and data.data_root == str(root.resolve())  # absolute, for every trial
    cfg = spec.trial_config({"steps": 10, "epochs": 3}).override(cache_dir=str(tmp_path / "cache"))
    ds = load_data(cfg.data)  # what a trial reads: the user's folder
    assert ds.classes == CLASSES and ds.shape == (3, 32, 32) and (len(ds.y_train), len(ds.y_test)) == (6, 4)


def test_a_trial_without_a_data_root_is_refused(tmp_path: Path) -> None:
    cfg = load_tune_spec(SPEC).trial_config({})
    with pytest.raises(ValueError, match="--data-root: missing"):
        load_data(cfg.data)


def test_the_search_expands_to_16_dd_trials_around_the_paper(tmp_path: Path) -> None:
    from ray.tune.experiment import Experiment
    from ray.tune.search.basic_variant import BasicVariantGenerator

    spec = load_tune_spec(SPEC, data_root=str(image_folder(tmp_path / "cifar")))
    assert spec.scheduler.type == "asha" and spec.metric == "eval_acc_mean" and spec.mode == "max"
    assert spec.reference == {"steps": 10, "epochs": 3, "lr": 0.01, "init_lr": 0.02, "nets": 8}
    searcher = BasicVariantGenerator(points_to_evaluate=[dict(spec.reference)])
    searcher.add_configurations([Experiment("count", run=lambda c: None, config=spec.param_space(),
                                            num_samples=spec.num_samples)])
    params = []
    while (trial := searcher.next_trial()) is not None:
        params.append(trial.config)
    assert spec.trial_count() == len(params) == 16
    assert params[0] == spec.reference  # the original code's defaults run first
    for p in params:
        cfg = spec.trial_config(p, out=tmp_path / "trial")
        d = cfg.distill
        assert (d.method, d.init, d.ipc, cfg.model.model, cfg.protocol) == ("dd", "random", 1, "alexcifarnet", "dd")
        assert d.steps in (5, 10, 20) and d.epochs in (1, 3, 5) and d.nets in (4, 8, 16)
        assert 0.003 <= d.outer_lr <= 0.03 and 0.007 <= d.init_lr <= 0.06
        assert cfg.data.data_root == spec.fixed.data.data_root and cfg.run.out == str(tmp_path / "trial")
