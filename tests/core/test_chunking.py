"""Cache-sized chunks: the same gradients and embeddings as one pass over the batch, sizes by the cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from ddray.core.batch_chunks import CACHE_BYTES, chunk_size, chunked_embed, chunked_grad, largest_activation_bytes
from ddray.core.kernels import Kernels
from ddray.core.models import ConvNet, LeNet, init_params
from ddray.core.unroll import meta_gradient

from test_unroll import _problem


def test_chunked_gradient_and_embedding_equal_one_pass_in_float64() -> None:
    model = ConvNet(1, 8, 3, width=4).double()
    p = {k: v.requires_grad_() for k, v in init_params(model, "kaiming", torch.Generator().manual_seed(0)).items()}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(23, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(3, (23,), generator=g)
    loss = F.cross_entropy(functional_call(model, p, (x,)), y)
    want = torch.autograd.grad(loss, list(p.values()))
    for chunk in (1, 5, 23, 64):
        got, got_loss = chunked_grad(model, p, x, y, chunk)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        assert float(got_loss) == pytest.approx(float(loss.detach()), rel=1e-12)
        torch.testing.assert_close(chunked_embed(model, p, x, chunk),
                                   functional_call(model, p, (x,), {"embed": True}).detach(), rtol=1e-12, atol=1e-14)


def test_chunks_are_sized_by_the_largest_activation() -> None:
    lenet, convnet = LeNet(1, 28, 10), ConvNet(1, 28, 10, width=32)
    assert largest_activation_bytes(lenet, (1, 28, 28)) == 6 * 28 * 28 * 4  # conv1's output
    assert largest_activation_bytes(convnet, (1, 28, 28)) == 32 * 28 * 28 * 4
    x = torch.zeros(1024, 1, 28, 28)
    assert chunk_size(lenet, x) == 256 and chunk_size(convnet, x) == 64  # ≈ CACHE_BYTES per chunk
    assert 256 * 6 * 28 * 28 * 4 <= 2 * CACHE_BYTES and chunk_size(lenet, x[:100]) == 100  # never above B
    assert chunk_size(LeNet(1, 28, 10), torch.zeros(5, 1, 28, 28)) == 5


def test_meta_gradient_does_not_depend_on_the_real_batch_chunks() -> None:
    model, params0, images, labels, raw, x_real, y_real = _problem(k=2)
    whole = meta_gradient(model, params0, images, labels, raw, x_real, y_real, "full", Kernels(model, chunk=16))
    parts = meta_gradient(model, params0, images, labels, raw, x_real, y_real, "full", Kernels(model, chunk=3))
    torch.testing.assert_close(parts.images, whole.images, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(parts.raw_lrs, whole.raw_lrs, rtol=1e-12, atol=1e-15)
    assert parts.loss == pytest.approx(whole.loss, rel=1e-12)
