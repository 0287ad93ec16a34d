"""DC/DSA, DM and MTT objectives: gradients equal finite differences (float64), shares add up, state."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from ddray.core.inits import RandomInit
from ddray.core.matching import ClassBatches, DistributionMatching, GradientMatching, layer_distance
from ddray.core.models import ConvNet, Params
from ddray.core.synthetic import OuterOptimizer, SyntheticSet
from ddray.core.trajectory import TrajectoryMatching
from ddray.core.unroll import unroll

C, IPC, SIDE = 3, 2, 8


def _setup(seed: int = 0) -> tuple[ConvNet, RandomInit, ClassBatches, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = ConvNet(1, SIDE, C, width=4).double()
    x = torch.randn(30, 1, SIDE, SIDE, generator=g, dtype=torch.float64)
    y = torch.arange(C).repeat(10)
    real = ClassBatches(x, y, C, 5, seed)
    images = torch.randn(1, C * IPC, 1, SIDE, SIDE, generator=g, dtype=torch.float64)
    return model, RandomInit(model, "kaiming", seed), real, images, torch.zeros(1, dtype=torch.float64)


def _double(sampler: RandomInit) -> RandomInit:
    class Double(RandomInit):
        def sample(self, keys: list[tuple[int, ...]]) -> Params:
            return {k: v.double() for k, v in super().sample(keys).items()}

    return Double(sampler.model, sampler.scheme, sampler.seed)


def _finite_differences(f, images: torch.Tensor, coords: list[int], eps: float = 1e-6) -> list[float]:
    out = []
    for i in coords:
        plus, minus = images.clone(), images.clone()
        plus.view(-1)[i] += eps
        minus.view(-1)[i] -= eps
        out.append((f(plus) - f(minus)) / (2 * eps))
    return out


def test_layer_distance_is_the_papers_per_row_cosine_distance() -> None:
    a, b = torch.randn(4, 3, 3, 3, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)
    rows = [1 - F.cosine_similarity(a[i].flatten(), b[i].flatten(), dim=0, eps=0) for i in range(4)]
    torch.testing.assert_close(layer_distance(a, b), torch.stack(rows).sum(), rtol=1e-5, atol=1e-6)
    assert float(layer_distance(a, a)) == pytest.approx(0, abs=1e-6)
    assert float(layer_distance(torch.randn(5), torch.randn(5))) == 0.0  # biases / norm scales


@pytest.mark.parametrize("strategy", [None, "flip_scale_rotate"])
def test_gradient_matching_gradient_equals_finite_differences(strategy: str | None) -> None:
    model, sampler, real, images, raw = _setup()
    obj = GradientMatching(model, _double(sampler), real, IPC, 0, strategy, loops=(1, 1), net_lr=0.01)
    g = obj(images, raw, step=0, nets=[0])
    assert g.nets == 1 and torch.equal(g.raw_lrs, torch.zeros(1, dtype=torch.float64))
    assert g.loss == pytest.approx(obj(images, raw, 0, [0]).loss)

    def loss(x: torch.Tensor) -> float:
        return GradientMatching(model, _double(sampler), real, IPC, 0, strategy, (1, 1), 0.01)(x, raw, 0, [0]).loss

    coords = torch.randint(images.numel(), (6,), generator=torch.Generator().manual_seed(1)).tolist()
    for i, fd in zip(coords, _finite_differences(loss, images, coords)):
        assert float(g.images.view(-1)[i]) == pytest.approx(fd, rel=1e-4, abs=1e-7)


def test_distribution_matching_gradient_equals_finite_differences_and_formula() -> None:
    model, sampler, real, images, raw = _setup()
    obj = DistributionMatching(model, _double(sampler), real, IPC, 0, None)
    g = obj(images, raw, step=3, nets=[0, 1])
    # the loss by hand: Σ_k Σ_c ‖mean ψ(x_c) − mean ψ(x̃_c)‖²
    batches, want = real.draw(3), 0.0
    for k in (0, 1):
        theta = {n: v[0] for n, v in _double(sampler).sample([(0, 3, k)]).items()}
        for c in range(C):
            er = functional_call(model, theta, (batches[c],), {"embed": True}).mean(0)
            es = functional_call(model, theta, (images[0, c * IPC:(c + 1) * IPC],), {"embed": True}).mean(0)
            want += float(((er - es) ** 2).sum())
    assert g.loss == pytest.approx(want, rel=1e-10)
    coords = torch.randint(images.numel(), (6,), generator=torch.Generator().manual_seed(2)).tolist()
    fds = _finite_differences(lambda x: obj(x, raw, 3, [0, 1]).loss, images, coords)
    for i, fd in zip(coords, fds):
        assert float(g.images.view(-1)[i]) == pytest.approx(fd, rel=1e-5, abs=1e-8)


def _dm_class_by_class(obj: DistributionMatching, images: torch.Tensor, step: int,
                      nets: list[int]) -> tuple[torch.Tensor, float]:
    """DM as the paper's code runs it: two forwards per class (the reference for the batched one)."""
    x_syn, real = images[0].detach(), obj.real.draw(step)
    g, loss = torch.zeros_like(images), 0.0
    for k in nets:
        theta = obj.fresh(step, k, x_syn.device)
        x = x_syn.clone().requires_grad_()
        total = x.new_zeros(())
        for c, x_c in enumerate(real):
            xr, xs = obj.pair(x_c, x[c * obj.ipc:(c + 1) * obj.ipc], step, k, c)
            with torch.no_grad():
                mean_real = functional_call(obj.model, theta, (xr,), {"embed": True}).mean(0)
            mean_syn = functional_call(obj.model, theta, (xs,), {"embed": True}).mean(0)
            total = total + ((mean_real - mean_syn) ** 2).sum()
        g[0] += torch.autograd.grad(total, [x])[0]
        loss += float(total.detach())
    return g, loss


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", [None, 7])
def test_dm_one_forward_for_all_classes_equals_class_by_class(dtype: torch.dtype, chunk: int) -> None:
    model, sampler, _, images, raw = _setup()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(31, 1, SIDE, SIDE, generator=g, dtype=torch.float64)
    y = torch.tensor([0] * 12 + [1] * 4 + [2] * 15)  # class 1 has fewer images than real_per_class
    real = ClassBatches(x.to(dtype), y, C, 6, 0)
    model, images = model.to(dtype), images.to(dtype)
    smp = _double(sampler) if dtype == torch.float64 else sampler
    obj = DistributionMatching(model, smp, real, IPC, 0, "color_crop_cutout_flip_scale_rotate")
    obj.chunk = chunk  # None: one chunk here (small images); 7: several forwards per network
    for step in (0, 1, 2):  # different DSA ops per class
        got = obj(images, raw.to(dtype), step, [0, 2])
        want, want_loss = _dm_class_by_class(obj, images, step, [0, 2])
        tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}
        torch.testing.assert_close(got.images, want, **tol)
        assert got.loss == pytest.approx(want_loss, rel=tol["rtol"])


@pytest.mark.parametrize("kind", ["dc", "dm"])
def test_shares_of_a_meta_step_add_up_to_the_whole(kind: str) -> None:
    model, sampler, real, images, raw = _setup()

    def make():
        if kind == "dc":
            return GradientMatching(model, _double(sampler), real, IPC, 0, "color_crop", (2, 1), 0.05)
        return DistributionMatching(model, _double(sampler), real, IPC, 0, "color_crop")

    whole = make()(images, raw, 0, [0, 1, 2])
    a, b = make()(images, raw, 0, [0]), make()(images, raw, 0, [1, 2])
    torch.testing.assert_close(whole.images, a.images + b.images)
    assert whole.loss == pytest.approx(a.loss + b.loss)


def test_dc_network_is_trained_on_the_synthetic_set_between_outer_steps() -> None:
    model, sampler, real, images, raw = _setup()
    obj = GradientMatching(model, _double(sampler), real, IPC, 0, None, loops=(2, 3), net_lr=0.1)
    obj(images, raw, 0, [0])
    fresh = obj.nets[0][2]
    obj(images, raw, 1, [0])  # outer step 1 of iteration 0: the net was trained for 3 epochs first
    trained = obj.nets[0][2]
    labels = torch.arange(C).repeat_interleave(IPC)

    def syn_loss(p: Params) -> float:
        return float(F.cross_entropy(functional_call(model, p, (images[0],)), labels))

    assert syn_loss(trained) < syn_loss(fresh)
    obj(images, raw, 2, [0])  # iteration 1: a fresh network again, from its own θ₀
    assert not torch.equal(obj.nets[0][2]["classifier.weight"], trained["classifier.weight"])
    # a worker without the network (restarted) rebuilds it, same θ₀, trained on the current set
    rebuilt = GradientMatching(model, _double(sampler), real, IPC, 0, None, loops=(2, 3), net_lr=0.1)
    rebuilt(images, raw, 1, [0])
    torch.testing.assert_close(syn_loss(rebuilt.nets[0][2]), syn_loss(trained), rtol=0.2, atol=0.0)


@dataclass
class FakeExpert:
    params: dict[str, torch.Tensor]

    @property
    def epochs(self) -> int:
        return next(iter(self.params.values())).shape[0] - 1

    def at(self, epoch: int) -> Params:
        return {n: v[epoch] for n, v in self.params.items()}


def _experts(model: ConvNet, n: int, epochs: int) -> list[FakeExpert]:
    out = []
    for i in range(n):
        p0 = {k: v.double()[0] for k, v in RandomInit(model, "kaiming", i).sample([(0, 0, 0)]).items()}
        g = torch.Generator().manual_seed(10 + i)
        out.append(FakeExpert({k: torch.stack([v + 0.05 * e * torch.randn(v.shape, generator=g, dtype=v.dtype)
                                               for e in range(epochs + 1)]) for k, v in p0.items()}))
    return out


def _mtt(memory: str = "full", strategy: str | None = None) -> tuple[TrajectoryMatching, torch.Tensor, torch.Tensor]:
    model, _, _, images, _ = _setup()
    labels = torch.arange(C).repeat_interleave(IPC)
    obj = TrajectoryMatching(model, _experts(model, 2, 4), labels, syn_steps=3, expert_epochs=2, max_start_epoch=3,
                             seed=0, strategy=strategy, memory=memory)
    return obj, images, torch.tensor([-3.0], dtype=torch.float64)


def test_mtt_loss_is_the_normalised_distance_to_the_expert() -> None:
    obj, images, raw = _mtt()
    g = obj(images, raw, step=5, nets=[0])
    start, target = obj.segment(5, 0)
    theta = unroll(obj.model, {k: v.unsqueeze(0) for k, v in start.items()}, images, obj.labels,
                   F.softplus(raw).repeat(3))
    num = sum(((theta[k][0] - target[k]) ** 2).sum() for k in theta)
    den = sum(((start[k] - target[k]) ** 2).sum() for k in theta)
    assert g.loss == pytest.approx(float(num / den), rel=1e-10)


@pytest.mark.parametrize("memory,strategy", [("full", None), ("recompute", None), ("recompute", "crop_flip")])
def test_mtt_gradient_equals_finite_differences(memory: str, strategy: str | None) -> None:
    obj, images, raw = _mtt(memory, strategy)
    g = obj(images, raw, step=1, nets=[0, 1])
    assert g.raw_lrs.shape == (1,)
    coords = torch.randint(images.numel(), (5,), generator=torch.Generator().manual_seed(4)).tolist()
    for i, fd in zip(coords, _finite_differences(lambda x: obj(x, raw, 1, [0, 1]).loss, images, coords)):
        assert float(g.images.view(-1)[i]) == pytest.approx(fd, rel=1e-4, abs=1e-8)
    [fd_raw] = _finite_differences(lambda r: obj(images, r, 1, [0, 1]).loss, raw, [0])
    assert float(g.raw_lrs[0]) == pytest.approx(fd_raw, rel=1e-4, abs=1e-8)


def test_mtt_recompute_equals_full() -> None:
    full, images, raw = _mtt("full", "color_crop_flip")
    rec, _, _ = _mtt("recompute", "color_crop_flip")
    a, b = full(images, raw, 2, [0, 1]), rec(images, raw, 2, [0, 1])
    torch.testing.assert_close(a.images, b.images, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a.raw_lrs, b.raw_lrs, rtol=1e-9, atol=1e-12)


def test_mtt_refuses_experts_too_short_for_the_window() -> None:
    model, _, _, _, _ = _setup()
    with pytest.raises(ValueError, match="--max-start-epoch 4 \\+ --expert-epochs 2: expert 0 has only 4 epochs"):
        TrajectoryMatching(model, _experts(model, 1, 4), torch.arange(C), 2, 2, 4, 0, None)


def test_sgd_outer_optimizer_equals_torch_optim_sgd_with_its_own_step_size_rate() -> None:
    syn = SyntheticSet(torch.randn(1, 4, 1, 3, 3), torch.arange(4), torch.zeros(1), 1)
    ref_x, ref_r = syn.images.clone().requires_grad_(), syn.raw_lrs.clone().requires_grad_()
    ref = torch.optim.SGD([{"params": [ref_x]}, {"params": [ref_r], "lr": 1e-3}], lr=0.5, momentum=0.5)
    opt = OuterOptimizer(syn, 0.5, 1.0, 100, kind="sgd", momentum=0.5, lr_lrs=1e-3)
    for _ in range(3):
        gx, gr = torch.randn(1, 4, 1, 3, 3), torch.randn(1)
        opt.apply(gx, gr)
        ref_x.grad, ref_r.grad = gx, gr
        ref.step()
    torch.testing.assert_close(syn.images, ref_x.detach(), rtol=0, atol=0)
    torch.testing.assert_close(syn.raw_lrs, ref_r.detach(), rtol=0, atol=0)
