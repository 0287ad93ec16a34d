"""CUDA-only checks (marked ``cuda``; skipped without a GPU, run by ``make gpu-check``):
the same meta-gradients on the GPU as on the CPU, compiled or not, for DD, DM and MTT."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ddray.config import Config
from ddray.core.kernels import Kernels, compile_unavailable
from ddray.core.unroll import meta_gradient
from ddray.inputs.problem import build_problem

sys.path.insert(0, str(Path(__file__).parent / "core"))
from test_methods import _mtt  # noqa: E402
from test_unroll import _problem  # noqa: E402

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def _to(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(CUDA) for k, v in d.items()}


@pytest.mark.parametrize("memory", ["full", "recompute"])
def test_meta_gradient_on_the_gpu_equals_the_cpu_in_float64(memory: str) -> None:
    model, params0, images, labels, raw, x, y = _problem(k=3)
    want = meta_gradient(model, params0, images, labels, raw, x, y, memory)
    model = model.to(CUDA)
    got = meta_gradient(model, _to(params0), images.to(CUDA), labels.to(CUDA), raw.to(CUDA), x.to(CUDA),
                        y.to(CUDA), memory)
    torch.testing.assert_close(got.images.cpu(), want.images, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.raw_lrs.cpu(), want.raw_lrs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("memory,strategy", [("full", None), ("recompute", "color_crop_flip")])
def test_mtt_meta_gradient_on_the_gpu_equals_the_cpu_in_float64(memory: str, strategy: str | None) -> None:
    """MTT as a GPU worker runs it (``.to(cuda)``: the experts stay on the CPU, each call moves its
    two snapshots), DSA on the student steps included."""
    cpu, images, raw = _mtt(memory, strategy)
    want = cpu(images, raw, 2, [0, 1])
    gpu, _, _ = _mtt(memory, strategy)
    gpu.model.to(CUDA)
    got = gpu.to(CUDA)(images.to(CUDA), raw.to(CUDA), 2, [0, 1])
    assert got.images.device.type == "cuda"
    torch.testing.assert_close(got.images.cpu(), want.images, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.raw_lrs.cpu(), want.raw_lrs, rtol=1e-9, atol=1e-12)
    assert got.loss == pytest.approx(want.loss, rel=1e-9)


@pytest.mark.skipif(compile_unavailable("cuda") is not None, reason="torch.compile unavailable on CUDA")
def test_compiled_kernels_on_the_gpu_equal_eager_in_float64() -> None:
    model, params0, images, labels, raw, x, y = _problem(k=2)
    model = model.to(CUDA)
    args = (_to(params0), images.to(CUDA), labels.to(CUDA), raw.to(CUDA), x.to(CUDA), y.to(CUDA))
    kern = Kernels(model, compile=True, device="cuda")
    got = meta_gradient(model, *args, "full", kern)
    assert kern.compiled
    want = meta_gradient(model, *args, "full")
    torch.testing.assert_close(got.images, want.images, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.raw_lrs, want.raw_lrs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["dd", "dm", "dc"])
def test_objectives_on_the_gpu_match_the_cpu(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The objective a GPU worker runs (``.to(cuda)``) gives the CPU's meta-gradient to float32 tolerance.

    With TF32 off: cuDNN convolutions use TF32 by default on Ampere and later (10-bit mantissa), which
    moves DC's and DM's matching gradients by up to ~1e-3 (seen on an H100); the math is what is compared.
    """
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    over = {"nets": 2, "tracking": False, "method": method, "steps": 2, "epochs": 1, "batch_size": 128}
    if method != "dd":
        over = {"nets": 2, "tracking": False, "method": method, "model": "convnet", "width": 8,
                "real_per_class": 16, "dsa": False}
    problem = build_problem(Config().override(**over))
    syn = problem.initial_synthetic()
    want = problem.objective()(syn.images, syn.raw_lrs, 0, [0, 1])
    got = problem.objective().to(CUDA)(syn.images.to(CUDA), syn.raw_lrs.to(CUDA), 0, [0, 1])
    torch.testing.assert_close(got.images.cpu(), want.images, rtol=1e-3, atol=1e-5)
    assert got.loss == pytest.approx(want.loss, rel=1e-3)


def test_a_worker_on_the_gpu_says_which_card() -> None:
    from ddray.distributed.worker import describe_device

    assert describe_device(torch.device("cuda")) == f"cuda:0 ({torch.cuda.get_device_name(0)})"
