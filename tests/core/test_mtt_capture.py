"""MTT's meta-step captured as CUDA graphs (ddray/core/trajectory.py's ``static_mtt``, ddray/core/capture.py).

Here (CPU): the function a graph captures equals the eager MTT meta-gradient (both memory modes,
DSA on and off, ``batch_syn`` on and off, learned labels); on the ``meta`` device at CIFAR-10's
shapes (ConvNet-128, 10 images per class, the papers' DSA) it reads nothing back to the host and
makes no tensor from host data; and an objective whose graphs replay (``record`` replaced by the CPU
stand-in of tests/core/test_capture.py, because a CUDA graph cannot run on this machine) gives the
eager objective's results with one capture for every meta-step. The test marked ``cuda`` runs the
real graphs (``make gpu-check``).
"""

from __future__ import annotations

import pytest
import torch

from ddray.core.augment import DEFAULT_STRATEGY, sample_aug, stack_aug
from ddray.core.capture import Graphs
from ddray.core.models import ConvNet
from ddray.core.trajectory import TrajectoryMatching, static_mtt

from test_capture import HostData, StandIn, stand_in  # noqa: F401  (stand_in: the fixture)
from test_matching_capture import cuda_replays
from test_methods import C, IPC, _experts, _setup


def _mtt(memory: str, strategy: str | None, batch_syn: int | None,
         cuda_graphs: bool = True) -> tuple[TrajectoryMatching, torch.Tensor, torch.Tensor]:
    model, _, _, images, _ = _setup()
    labels = torch.arange(C).repeat_interleave(IPC)
    obj = TrajectoryMatching(model, _experts(model, 2, 4), labels, syn_steps=4, expert_epochs=2, max_start_epoch=3,
                             seed=0, strategy=strategy, memory=memory, batch_syn=batch_syn, cuda_graphs=cuda_graphs)
    return obj, images, torch.tensor([-3.0], dtype=torch.float64)


CASES = [("full", None, None), ("recompute", None, None), ("full", DEFAULT_STRATEGY, 4),
         ("recompute", DEFAULT_STRATEGY, 4), ("full", "crop_flip", None)]


@pytest.mark.parametrize("memory,strategy,batch_syn", CASES)
@pytest.mark.parametrize("learned", [False, True])
def test_an_objective_replaying_its_graphs_equals_the_eager_one(stand_in: type[StandIn], memory: str,
                                                                strategy: str | None, batch_syn: int | None,
                                                                learned: bool) -> None:
    """The captured function (through the objective's static buffers) gives the eager meta-gradient;
    one capture serves every meta-step: its expert segments, batches B_n and augmentation draws
    differ, their shapes do not."""
    obj, images, raw = _mtt(memory, strategy, batch_syn)
    eager, _, _ = _mtt(memory, strategy, batch_syn, cuda_graphs=False)
    obj.graphs = Graphs(obj.static, "MTT's meta-step")  # what to(cuda) makes
    labels = torch.randn(C * IPC, C, generator=torch.Generator().manual_seed(2), dtype=torch.float64) \
        if learned else None
    for step in range(3):
        got, want = obj(images, raw, step, [0, 1], labels), eager(images, raw, step, [0, 1], labels)
        torch.testing.assert_close(got.images, want.images, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got.raw_lrs, want.raw_lrs, rtol=1e-12, atol=1e-14)
        assert got.loss == pytest.approx(want.loss, rel=1e-12) and got.nets == want.nets == 2
        if learned:
            torch.testing.assert_close(got.labels, want.labels, rtol=1e-12, atol=1e-14)
        else:
            assert got.labels is None and want.labels is None
        images = images + 0.1 * got.images  # the next meta-step reads new synthetic images
    assert stand_in.captures == 1 and len(obj.graphs.graphs) == 1 and not obj.graphs.refused


@pytest.mark.parametrize("memory", ["full", "recompute"])
def test_the_captured_function_reads_nothing_back_at_cifar10_shapes(memory: str) -> None:
    """ConvNet-128 on 3×32×32, 100 synthetic images, 2 students, 5 student steps on batches of 50
    under the papers' DSA: on the ``meta`` device (no values: a read-back raises) and with no tensor
    made from host data (:class:`HostData`), through to the gradients."""
    meta = torch.device("meta")
    model = ConvNet(3, 32, 10).to(meta)
    theta0 = {n: torch.empty(2, *p.shape, device=meta) for n, p in model.named_parameters()}
    target = {n: torch.empty_like(v) for n, v in theta0.items()}
    images = torch.empty(1, 100, 3, 32, 32, device=meta)
    labels, raw = torch.arange(10, device=meta).repeat_interleave(10), torch.empty(5, device=meta)
    g = torch.Generator().manual_seed(0)
    augs = stack_aug([sample_aug(DEFAULT_STRATEGY, 50, g) for _ in range(5)], [50] * 5, DEFAULT_STRATEGY, images)
    rows = [torch.empty(50, dtype=torch.long, device=meta) for _ in range(5)]
    with HostData() as seen:
        g_img, g_raw, g_lab, loss = static_mtt(model, theta0, target, torch.empty(2, device=meta), images, labels,
                                               raw, memory, DEFAULT_STRATEGY, augs, rows)
    assert not seen.calls and g_img.shape == images.shape and g_raw.shape == raw.shape and loss.shape == ()
    assert g_lab is None


def test_a_cpu_objective_never_captures() -> None:
    obj, _, _ = _mtt("full", DEFAULT_STRATEGY, None)
    assert obj.cuda_graphs and obj.to(torch.device("cpu")).graphs is None


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.cuda
@pytest.mark.parametrize("memory,strategy,batch_syn", CASES)
def test_cuda_replays_equal_eager(memory: str, strategy: str | None, batch_syn: int | None) -> None:
    obj, images, raw = _mtt(memory, strategy, batch_syn)
    eager, _, _ = _mtt(memory, strategy, batch_syn, cuda_graphs=False)
    for got, want in cuda_replays(obj, eager, images, raw):
        torch.testing.assert_close(got.images, want.images, rtol=1e-9, atol=1e-12)  # float64 on the GPU
        torch.testing.assert_close(got.raw_lrs, want.raw_lrs, rtol=1e-9, atol=1e-12)
        assert got.loss == pytest.approx(want.loss, rel=1e-9)
