"""DC's matching and DM's iteration captured as CUDA graphs (ddray/core/matching.py's ``static_dc``
and ``static_dm``, ddray/core/capture.py).

Here (CPU): the functions a graph captures equal the eager per-class DC and DM gradients; on the
``meta`` device at CIFAR-10's shapes (ConvNet-128, 10 images per class, the papers' DSA) they read
nothing back to the host and make no tensor from host data; and an objective whose graphs replay
(``record`` replaced by the CPU stand-in of tests/core/test_capture.py, because a CUDA graph cannot
run on this machine) gives the eager objective's results with one capture for every step, network
and augmentation draw. The tests marked ``cuda`` run the real graphs (``make gpu-check``).
"""

from __future__ import annotations

import pytest
import torch

from ddray.core.augment import DEFAULT_STRATEGY, sample_aug, stack_aug
from ddray.core.capture import Graphs
from ddray.core.inits import RandomInit
from ddray.core.matching import ClassBatches, DistributionMatching, GradientMatching, static_dc, static_dm
from ddray.core.models import ConvNet

from test_capture import HostData, StandIn, stand_in  # noqa: F401  (stand_in: the fixture)

C, IPC, SIDE = 3, 2, 8
STATIC = {"dc": static_dc, "dm": static_dm}


def _objective(kind: str, strategy: str | None, dtype: torch.dtype = torch.float64,
               cuda_graphs: bool = True) -> tuple[GradientMatching | DistributionMatching, torch.Tensor, torch.Tensor]:
    """A small DC (2 outer steps, 1 inner epoch) or DM problem; class 1 has fewer real images than are
    drawn per class, so the classes' sizes differ."""
    g = torch.Generator().manual_seed(3)
    model = ConvNet(1, SIDE, C, width=4).to(dtype)
    x = torch.randn(31, 1, SIDE, SIDE, generator=g, dtype=torch.float64).to(dtype)
    y = torch.tensor([0] * 12 + [1] * 4 + [2] * 15)
    real = ClassBatches(x, y, C, 6, 0)
    sampler = RandomInit(model, "kaiming", 0)
    obj: GradientMatching | DistributionMatching
    if kind == "dc":
        obj = GradientMatching(model, sampler, real, IPC, 0, strategy, (2, 1), 0.05, cuda_graphs=cuda_graphs)
    else:
        obj = DistributionMatching(model, sampler, real, IPC, 0, strategy, cuda_graphs)
    images = torch.randn(1, C * IPC, 1, SIDE, SIDE, generator=g, dtype=torch.float64).to(dtype)
    return obj, images, torch.zeros(1, dtype=dtype)


def _eager(obj: GradientMatching | DistributionMatching, theta: dict, x_syn: torch.Tensor,
           real: list[torch.Tensor], step: int, net: int) -> tuple[torch.Tensor, float]:
    if isinstance(obj, DistributionMatching):
        return obj.eager(theta, x_syn, real, step, net)
    loss, gx = obj.match(theta, x_syn, real, step, net)  # no graphs: eager
    return gx, loss


@pytest.mark.parametrize("kind", ["dc", "dm"])
@pytest.mark.parametrize("strategy", [None, DEFAULT_STRATEGY])
@pytest.mark.parametrize("chunk", [None, 5])
def test_the_captured_function_equals_the_eager_gradient(kind: str, strategy: str | None,
                                                         chunk: int | None) -> None:
    obj, images, _ = _objective(kind, strategy)
    obj.chunk = chunk
    x_syn = images[0]
    for step in range(4):  # new DSA ops per class at each step; DC: networks trained between outer steps
        real = obj.real.draw(step)
        sizes = tuple(len(r) for r in real)
        assert sizes == (6, 4, 6)
        for net in (0, 3):
            theta = obj.network(step, net, x_syn) if isinstance(obj, GradientMatching) else \
                obj.fresh(step, net, x_syn.device)
            want, want_loss = _eager(obj, theta, x_syn, real, step, net)
            aug = {}
            if strategy is not None:
                draws = [obj.draw(step, net, c) for c in range(C)]
                aug = {"aug_real": stack_aug(draws, list(sizes), strategy, x_syn),
                       "aug_syn": stack_aug(draws, [IPC] * C, strategy, x_syn)}
            gx, loss = STATIC[kind](obj.model, theta, x_syn, torch.cat(real), sizes, IPC, strategy, chunk=chunk,
                                    **aug)
            assert isinstance(loss, torch.Tensor)  # nothing read back inside a graph
            torch.testing.assert_close(gx, want, rtol=1e-12, atol=1e-14)
            assert float(loss) == pytest.approx(want_loss, rel=1e-12)


@pytest.mark.parametrize("kind", ["dc", "dm"])
def test_the_captured_function_reads_nothing_back_at_cifar10_shapes(kind: str) -> None:
    """ConvNet-128 on 3×32×32, 10 classes × 10 synthetic images, 256 real images per class, the
    papers' DSA: on the ``meta`` device (no values: a read-back raises) and with no tensor made from
    host data (:class:`HostData`), through to the gradient."""
    meta = torch.device("meta")
    model = ConvNet(3, 32, 10).to(meta)
    theta = {n: torch.empty(p.shape, device=meta) for n, p in model.named_parameters()}
    x_syn, x_real = torch.empty(100, 3, 32, 32, device=meta), torch.empty(2560, 3, 32, 32, device=meta)
    g = torch.Generator().manual_seed(0)
    draws = [sample_aug(DEFAULT_STRATEGY, 1, g) for _ in range(10)]
    aug_real = stack_aug(draws, [256] * 10, DEFAULT_STRATEGY, x_syn)
    aug_syn = stack_aug(draws, [10] * 10, DEFAULT_STRATEGY, x_syn)
    with HostData() as seen:
        gx, loss = STATIC[kind](model, theta, x_syn, x_real, (256,) * 10, 10, DEFAULT_STRATEGY, aug_real, aug_syn)
    assert not seen.calls and gx.shape == x_syn.shape and loss.shape == ()


@pytest.mark.parametrize("kind", ["dc", "dm"])
@pytest.mark.parametrize("strategy", [None, DEFAULT_STRATEGY])
def test_an_objective_replaying_its_graphs_equals_the_eager_one(stand_in: type[StandIn], kind: str,
                                                                strategy: str | None) -> None:
    """One capture serves every step, network and draw (the draws sit in static buffers); each call
    reads its own inputs. Shapes change only with the real batch's class sizes."""
    obj, images, raw = _objective(kind, strategy)
    eager, _, _ = _objective(kind, strategy, cuda_graphs=False)
    obj.graphs = Graphs(obj.static, obj.what)  # what to(cuda) makes
    for step in range(4):
        got, want = obj(images, raw, step, [0, 2]), eager(images, raw, step, [0, 2])
        torch.testing.assert_close(got.images, want.images, rtol=1e-12, atol=1e-14)
        assert got.loss == pytest.approx(want.loss, rel=1e-12) and got.nets == want.nets == 2
        images = images + 0.1 * got.images  # the next step reads new synthetic images
    assert stand_in.captures == 1 and len(obj.graphs.graphs) == 1 and not obj.graphs.refused


@pytest.mark.parametrize("kind", ["dc", "dm"])
def test_a_cpu_objective_never_captures(kind: str) -> None:
    obj, _, _ = _objective(kind, DEFAULT_STRATEGY)
    assert obj.cuda_graphs and obj.to(torch.device("cpu")).graphs is None


# ----------------------------------------------------------------------------- on a GPU


def cuda_replays(obj, eager, images: torch.Tensor, raw: torch.Tensor, steps: int = 3) -> list[tuple]:
    """(replayed, eager) results of ``steps`` meta-steps of two networks on the GPU: ``obj`` with CUDA
    graphs, ``eager`` without; one graph must serve them all."""
    dev = torch.device("cuda")
    obj.model, eager.model = obj.model.to(dev), eager.model.to(dev)
    obj, eager = obj.to(dev), eager.to(dev)
    images, raw = images.to(dev), raw.to(dev)
    assert obj.graphs is not None and eager.graphs is None
    out = [(obj(images, raw, step, [0, 1]), eager(images, raw, step, [0, 1])) for step in range(steps)]
    assert len(obj.graphs.graphs) == 1 and not obj.graphs.refused
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["dc", "dm"])
@pytest.mark.parametrize("strategy", [None, DEFAULT_STRATEGY])
def test_cuda_replays_equal_eager(kind: str, strategy: str | None) -> None:
    obj, images, raw = _objective(kind, strategy, torch.float32)
    eager, _, _ = _objective(kind, strategy, torch.float32, cuda_graphs=False)
    for got, want in cuda_replays(obj, eager, images, raw):
        torch.testing.assert_close(got.images, want.images, rtol=1e-4, atol=1e-6)
        assert got.loss == pytest.approx(want.loss, rel=1e-4)
