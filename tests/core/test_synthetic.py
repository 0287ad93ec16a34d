"""Synthetic-set init, step-size parametrisation, seeds and the objective's split invariance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ddray.config import load_config
from ddray.core.synthetic import SyntheticSet, class_labels, inverse_softplus
from ddray.inputs.problem import build_problem
from ddray.run.loop import distill


def test_inverse_softplus_gives_the_initial_step_size() -> None:
    for y in (0.001, 0.02, 1.0, 5.0):
        assert float(F.softplus(torch.tensor(inverse_softplus(y), dtype=torch.float64))) == pytest.approx(y)


def test_real_init_draws_real_images_of_each_class() -> None:
    x = torch.arange(20, dtype=torch.float32).view(20, 1, 1, 1).expand(20, 1, 2, 2).clone()
    y = torch.arange(20) % 2
    syn = SyntheticSet.initial(3, 2, 2, 2, (1, 2, 2), 0.02, torch.Generator().manual_seed(0), real=(x, y))
    assert torch.equal(syn.labels, class_labels(2, 2)) and syn.raw_lrs.shape == (6,)
    for s in range(3):
        for j, c in enumerate(syn.labels.tolist()):
            v = int(syn.images[s, j, 0, 0, 0])
            assert v % 2 == c, "image drawn from the wrong class"
    torch.testing.assert_close(syn.lrs, torch.full((6,), 0.02))


def test_objective_sum_does_not_depend_on_how_nets_are_split() -> None:
    cfg = load_config(None, steps=2, epochs=1, nets=3, batch_size=32, init="random")
    problem = build_problem(cfg)
    syn = problem.initial_synthetic()
    obj = problem.objective()
    whole = obj(syn.images, syn.raw_lrs, 5, [0, 1, 2])
    parts = [obj(syn.images, syn.raw_lrs, 5, [0, 2]), obj(syn.images, syn.raw_lrs, 5, [1])]
    torch.testing.assert_close(whole.images, parts[0].images + parts[1].images, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(whole.raw_lrs, parts[0].raw_lrs + parts[1].raw_lrs, rtol=1e-5, atol=1e-7)
    other_step = obj(syn.images, syn.raw_lrs, 6, [0, 1, 2])
    assert not torch.allclose(whole.images, other_step.images), "each meta-step must draw new θ₀ and data"


def test_same_seed_same_synthetic_set_and_different_seed_differs(tmp_path: Path) -> None:
    def run(seed: int, name: str) -> torch.Tensor:
        cfg = load_config(None, steps=2, epochs=1, nets=1, batch_size=32, iterations=2, eval_nets=1, seed=seed,
                          scores=False,
                          out=str(tmp_path / name), syn_init="real")
        return distill(cfg, progress=False).distilled.images

    a, b, c = run(0, "a"), run(0, "b"), run(1, "c")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
