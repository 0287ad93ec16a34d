"""The differentiable unroll: equals torch.optim.SGD, meta-gradient equals finite differences (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddray.core.inits import RandomInit
from ddray.core.models import LeNet, init_params, unstack_params
from ddray.core.unroll import meta_gradient, step_schedule, unroll


class Tiny(nn.Module):
    """A small conv net (so finite differences stay cheap) with a ReLU and a pool, like LeNet."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.fc1 = nn.Linear(3 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        return self.fc1(x.flatten(1))


def _problem(k: int, steps: int = 2, epochs: int = 2, seed: int = 0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    model = Tiny().to(dtype)
    sampler = RandomInit(model, "xavier", seed)
    params0 = {n: v.to(dtype) for n, v in sampler.sample([(0, 0, i) for i in range(k)]).items()}
    images = torch.randn(steps, 6, 1, 6, 6, generator=g, dtype=dtype)
    labels = torch.arange(3).repeat(2)
    raw = torch.randn(steps * epochs, generator=g, dtype=dtype) * 0.3 - 1.0
    x_real = torch.randn(16, 1, 6, 6, generator=g, dtype=dtype)
    y_real = torch.randint(3, (16,), generator=g)
    return model, params0, images, labels, raw, x_real, y_real


def test_unroll_matches_torch_optim_sgd_step_for_step() -> None:
    model = LeNet(1, 28, 10).double()
    g = torch.Generator().manual_seed(1)
    theta0 = {k: v.double() for k, v in init_params(model, "xavier", g).items()}
    images = torch.randn(3, 10, 1, 28, 28, generator=g, dtype=torch.float64)
    labels = torch.arange(10)
    lrs = torch.tensor([0.1, 0.05, 0.2, 0.01, 0.3, 0.02], dtype=torch.float64)

    ref = LeNet(1, 28, 10).double()
    ref.load_state_dict(theta0)
    opt = torch.optim.SGD(ref.parameters(), lr=1.0)
    params = {k: v.unsqueeze(0) for k, v in theta0.items()}
    for t, b in enumerate(step_schedule(3, 2)):
        # one step of ours ...
        params = unroll(model, params, images[b:b + 1], labels, lrs[t:t + 1])
        # ... and one of torch.optim.SGD with the same step size
        for group in opt.param_groups:
            group["lr"] = float(lrs[t])
        opt.zero_grad()
        F.cross_entropy(ref(images[b]), labels).backward()
        opt.step()
        for name, p in ref.named_parameters():
            torch.testing.assert_close(params[name][0], p.detach(), rtol=1e-10, atol=1e-12,
                                       msg=f"step {t}: {name} differs from torch.optim.SGD")


def _loss(model, params0, images, labels, raw, x_real, y_real) -> torch.Tensor:
    p_t = unroll(model, params0, images, labels, F.softplus(raw))
    return sum(F.cross_entropy(torch.func.functional_call(model, p, (x_real,)), y_real)
               for p in unstack_params(p_t))


@pytest.mark.parametrize("memory", ["full", "recompute"])
def test_meta_gradient_matches_central_finite_differences(memory: str) -> None:
    model, params0, images, labels, raw, x_real, y_real = _problem(k=2)
    g = meta_gradient(model, params0, images, labels, raw, x_real, y_real, memory)
    assert g.nets == 2
    eps = 1e-6
    gen = torch.Generator().manual_seed(3)
    coords = torch.randint(images.numel(), (12,), generator=gen).tolist()
    with torch.no_grad():
        for i in coords:
            plus, minus = images.clone(), images.clone()
            plus.view(-1)[i] += eps
            minus.view(-1)[i] -= eps
            num = (_loss(model, params0, plus, labels, raw, x_real, y_real)
                   - _loss(model, params0, minus, labels, raw, x_real, y_real)) / (2 * eps)
            ana = g.images.view(-1)[i]
            assert torch.isclose(ana, num, rtol=1e-5, atol=1e-8), \
                f"d/dimage[{i}]: analytic {float(ana):.10g} vs numeric {float(num):.10g}"
        for t in range(raw.numel()):
            plus, minus = raw.clone(), raw.clone()
            plus[t] += eps
            minus[t] -= eps
            num = (_loss(model, params0, images, labels, plus, x_real, y_real)
                   - _loss(model, params0, images, labels, minus, x_real, y_real)) / (2 * eps)
            assert torch.isclose(g.raw_lrs[t], num, rtol=1e-5, atol=1e-8), \
                f"d/draw_lr[{t}]: analytic {float(g.raw_lrs[t]):.10g} vs numeric {float(num):.10g}"


def test_recompute_equals_full_backprop_on_lenet() -> None:
    model = LeNet(1, 28, 10)
    sampler = RandomInit(model, "xavier", 0)
    params0 = sampler.sample([(0, 0, 0), (0, 0, 1)])
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 10, 1, 28, 28, generator=g)
    raw = torch.full((12,), -3.0)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(10, (64,), generator=g)
    full = meta_gradient(model, params0, images, torch.arange(10), raw, x, y, "full")
    rec = meta_gradient(model, params0, images, torch.arange(10), raw, x, y, "recompute")
    torch.testing.assert_close(rec.images, full.images, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rec.raw_lrs, full.raw_lrs, rtol=1e-4, atol=1e-6)
    assert rec.loss == pytest.approx(full.loss, rel=1e-6)


def test_meta_gradient_leaves_theta0_and_inputs_untouched() -> None:
    model, params0, images, labels, raw, x_real, y_real = _problem(k=2)
    before = {k: v.clone() for k, v in params0.items()}
    img_before, raw_before = images.clone(), raw.clone()
    for memory in ("full", "recompute"):
        meta_gradient(model, params0, images, labels, raw, x_real, y_real, memory)
    for k in before:
        assert torch.equal(params0[k], before[k]), f"θ₀[{k}] was modified"
        assert not params0[k].requires_grad
    assert torch.equal(images, img_before) and torch.equal(raw, raw_before)
    assert not images.requires_grad and not raw.requires_grad


def test_k_networks_sum_equals_sum_of_single_networks() -> None:
    model, params0, images, labels, raw, x_real, y_real = _problem(k=3)
    both = meta_gradient(model, params0, images, labels, raw, x_real, y_real)
    parts = [meta_gradient(model, {n: v[i:i + 1] for n, v in params0.items()}, images, labels, raw,
                           x_real, y_real) for i in range(3)]
    torch.testing.assert_close(both.images, sum(p.images for p in parts))
    torch.testing.assert_close(both.raw_lrs, sum(p.raw_lrs for p in parts))
