"""ZCA whitening (``--zca``): the transform, its cache, the artifact round trip, every consumer using the set's
own transform, and the refusal of experts trained with another whitening."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ddray.config import Config
from ddray.core.images import Zca
from ddray.data import Dataset, load_dataset
from ddray.evaluation.viz import _pixels
from ddray.inputs.experts import ExpertSettings, load_experts, train_experts
from ddray.inputs.problem import build_problem, to_distilled
from ddray.inputs.sources import fitted_zca, load_data
from ddray.store.artifact import read_distilled, save_distilled


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def test_whitened_training_images_have_unit_covariance_and_invert(digits: Dataset) -> None:
    x = digits.x_train.all()
    zca = Zca.fit(digits.x_train, eps=1e-6)
    w = zca(x).flatten(1).double()
    cov = torch.cov(w.T)
    keep = torch.linalg.eigvalsh(torch.cov(x.flatten(1).double().T)) > 1e-3  # pixels that vary (digits has
    assert keep.sum() > 40                                                   # constant corners)
    eig = torch.linalg.eigvalsh(cov)
    assert torch.allclose(eig[-int(keep.sum()):], torch.ones(int(keep.sum()), dtype=torch.float64), atol=2e-2)
    assert torch.allclose(zca.invert(zca(x)), x, atol=1e-4)
    # the papers' eps = 0.1 regularises: inverse(ZCA(x)) is still x
    z = Zca.fit(digits.x_train, eps=0.1)
    assert torch.allclose(z.invert(z(x)), x, atol=1e-4)
    assert torch.allclose(z.matrix, z.matrix.T, atol=1e-5)  # ZCA: the symmetric whitening


def test_zca_fitted_in_chunks_equals_one_pass(digits: Dataset) -> None:
    a, b = Zca.fit(digits.x_train, 0.1, chunk=100), Zca.fit(digits.x_train, 0.1, chunk=10_000)
    assert torch.allclose(a.matrix, b.matrix, atol=1e-5) and torch.allclose(a.mean, b.mean, atol=1e-6)


def test_load_data_whitens_and_caches_the_transform(tmp_path: Path) -> None:
    cfg = Config.from_dict({"dataset": "digits", "zca": True, "zca_eps": 0.1, "cache_dir": str(tmp_path)})
    data = load_data(cfg.data)
    assert data.zca is not None and data.zca.eps == 0.1
    assert len(list((tmp_path / "zca").glob("*.safetensors"))) == 1
    again = fitted_zca(load_dataset("digits"), 0.1, str(tmp_path))
    assert torch.equal(again.matrix, data.zca.matrix)
    plain = load_dataset("digits")
    assert torch.allclose(data.x_test[:5], data.zca(plain.x_test[:5]))


def test_the_artifact_carries_the_transform_and_consumers_use_it(tmp_path: Path) -> None:
    cfg = Config.from_dict({"dataset": "digits", "model": "convnet", "width": 8, "method": "dm", "ipc": 1,
                            "zca": True, "cache_dir": str(tmp_path / "cache"), "real_per_class": 8})
    problem = build_problem(cfg)
    syn = problem.initial_synthetic()
    d = to_distilled(problem, syn, 0)
    assert d.meta["zca"] == {"eps": 0.1} and d.meta["class_names"] == [str(i) for i in range(10)]
    back = read_distilled(save_distilled(tmp_path / "set", d))
    assert back.zca is not None and torch.equal(back.zca.matrix, problem.data.zca.matrix)
    # the picture shows the images un-whitened: real-initialised images look like the real ones
    plain = load_dataset("digits")
    pix = _pixels(back)
    unit = plain.x_train.take_raw(slice(None))  # digits: float32 in [0, 1]
    assert pix.min() >= 0 and pix.max() <= 1
    assert abs(float(pix.mean()) - float(unit.mean())) < 0.1
    # evaluation uses the set's own transform, even when the data would now fit another one
    from ddray.evaluation.held_out import problem_for

    other = replace(back, zca=Zca(back.zca.mean, back.zca.matrix * 2, back.zca.inverse / 2, 0.1))
    assert torch.equal(problem_for(other).data.zca.matrix, other.zca.matrix)


def test_experts_trained_with_another_whitening_are_refused(digits: Dataset, tmp_path: Path) -> None:
    small = Dataset("digits", digits.x_train[:128], digits.y_train[:128], digits.x_test[:32], digits.y_test[:32],
                    10, digits.mean, digits.std)
    plain = train_experts(small, ExpertSettings(epochs=1, batch_size=64), 1, tmp_path / "plain", progress=False)
    whitened = small.with_zca(Zca.fit(digits.x_train, 0.1))
    zca = train_experts(whitened, ExpertSettings(epochs=1, batch_size=64), 1, tmp_path / "zca", progress=False)
    load_experts(plain, "convnet", (1, 8, 8), 10, zca=None)
    load_experts(zca, "convnet", (1, 8, 8), 10, zca=0.1)
    with pytest.raises(ValueError, match=r"^--experts .*plain: trained without ZCA whitening, but this run is with "
                                         r"ZCA whitening \(--zca-eps 0.1\).*`ddray experts --zca --zca-eps 0.1`"):
        load_experts(plain, "convnet", (1, 8, 8), 10, zca=0.1)
    with pytest.raises(ValueError, match=r"^--experts .*zca: trained with ZCA whitening \(--zca-eps 0.1\), but this "
                                         r"run is without ZCA whitening.*`ddray experts --no-zca`"):
        load_experts(zca, "convnet", (1, 8, 8), 10, zca=None)
    with pytest.raises(ValueError, match=r"trained with ZCA whitening \(--zca-eps 0.1\), but this run is with ZCA "
                                         r"whitening \(--zca-eps 0.01\)"):
        load_experts(zca, "convnet", (1, 8, 8), 10, zca=0.01)
