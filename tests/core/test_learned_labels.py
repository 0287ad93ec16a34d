"""Learned soft labels in the core: the meta-gradient w.r.t. label logits against float64 finite differences,
the soft-label losses against torch's, the outer optimiser's third parameter against torch.optim."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ddray.core.protocol_dc import ProtocolDC, predict_protocol_dc, soft_label_loss
from ddray.core.synthetic import LABEL_CONFIDENCE, OuterOptimizer, SyntheticSet, label_logits
from ddray.core.unroll import meta_gradient, targets, unroll

from test_unroll import _loss, _problem  # noqa: E402  (tests/core is on sys.path)


def _logits(labels: torch.Tensor, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return label_logits(labels, 3).double() + 0.5 * torch.randn(len(labels), 3, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("memory", ["full", "recompute"])
def test_the_label_gradient_matches_central_finite_differences(memory: str) -> None:
    model, params0, images, hard, raw, x_real, y_real = _problem(k=2)
    z = _logits(hard)
    g = meta_gradient(model, params0, images, z, raw, x_real, y_real, memory)
    assert g.labels is not None and g.labels.shape == z.shape
    eps = 1e-6
    with torch.no_grad():
        for i in range(z.numel()):
            plus, minus = z.clone(), z.clone()
            plus.view(-1)[i] += eps
            minus.view(-1)[i] -= eps
            num = (_loss(model, params0, images, plus, raw, x_real, y_real)
                   - _loss(model, params0, images, minus, raw, x_real, y_real)) / (2 * eps)
            assert torch.isclose(g.labels.view(-1)[i], num, rtol=1e-5, atol=1e-8), \
                f"d/dz[{i}]: analytic {float(g.labels.view(-1)[i]):.10g} vs numeric {float(num):.10g}"
        # the images' gradient still holds with soft labels
        for i in torch.randint(images.numel(), (6,), generator=torch.Generator().manual_seed(1)).tolist():
            plus, minus = images.clone(), images.clone()
            plus.view(-1)[i] += eps
            minus.view(-1)[i] -= eps
            num = (_loss(model, params0, plus, z, raw, x_real, y_real)
                   - _loss(model, params0, minus, z, raw, x_real, y_real)) / (2 * eps)
            assert torch.isclose(g.images.view(-1)[i], num, rtol=1e-5, atol=1e-8)


def test_full_and_recompute_agree_and_hard_labels_bring_no_label_gradient() -> None:
    model, params0, images, hard, raw, x_real, y_real = _problem(k=3)
    z = _logits(hard)
    full = meta_gradient(model, params0, images, z, raw, x_real, y_real, "full")
    rec = meta_gradient(model, params0, images, z, raw, x_real, y_real, "recompute")
    assert full.labels is not None and rec.labels is not None
    torch.testing.assert_close(full.labels, rec.labels, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(full.images, rec.images, rtol=1e-9, atol=1e-12)
    assert meta_gradient(model, params0, images, hard, raw, x_real, y_real).labels is None


def test_one_hot_logits_train_like_hard_labels_in_the_limit() -> None:
    model, params0, images, hard, raw, *_ = _problem(k=1)
    sharp = label_logits(hard, 3, confidence=1 - 1e-12).double()
    a = unroll(model, params0, images, hard, F.softplus(raw))
    b = unroll(model, params0, images, sharp, F.softplus(raw))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-10)


def test_initial_label_logits_put_their_confidence_on_the_class() -> None:
    hard = torch.tensor([0, 3, 9])
    p = targets(label_logits(hard, 10))
    torch.testing.assert_close(p[torch.arange(3), hard], torch.full((3,), LABEL_CONFIDENCE))
    torch.testing.assert_close(p.sum(1), torch.ones(3))
    assert math.isclose(float(p[0, 1]), (1 - LABEL_CONFIDENCE) / 9, rel_tol=1e-5)


def test_the_soft_label_losses_against_torch() -> None:
    g = torch.Generator().manual_seed(0)
    out, z = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)
    p = F.softmax(z, 1)
    kl = soft_label_loss(out, z, "kl")
    torch.testing.assert_close(kl, F.kl_div(F.log_softmax(out, 1), p, reduction="batchmean"))
    torch.testing.assert_close(kl, (p * (p.log() - F.log_softmax(out, 1))).sum(1).mean())  # by hand
    ce = soft_label_loss(out, z, "ce")
    torch.testing.assert_close(ce, -(p * F.log_softmax(out, 1)).sum(1).mean())
    # they differ by the labels' entropy, so their gradients in the network's output are the same
    entropy = -(p * p.log()).sum(1).mean()
    torch.testing.assert_close(ce - kl, entropy)
    o1, o2 = out.clone().requires_grad_(), out.clone().requires_grad_()
    soft_label_loss(o1, z, "ce").backward()
    soft_label_loss(o2, z, "kl").backward()
    torch.testing.assert_close(o1.grad, o2.grad)
    hard = torch.randint(5, (8,), generator=g)
    torch.testing.assert_close(soft_label_loss(out, hard, "kl"), F.cross_entropy(out, hard))
    with pytest.raises(ValueError, match="--label-loss: invalid value 'mse'"):
        ProtocolDC(label_loss="mse")


def test_protocol_dc_trains_on_soft_labels() -> None:
    model, _, images, hard, *_ = _problem(k=1, dtype=torch.float32)
    x_test = torch.randn(10, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    protocol = ProtocolDC(epochs=3, nets=1, dsa_strategy=None)
    sharp = label_logits(hard, 3, confidence=1 - 1e-7)
    soft = torch.zeros(len(hard), 3)  # uniform targets: nothing to learn from the labels
    a = predict_protocol_dc(model, images, hard, x_test, protocol, 0, [0])
    b = predict_protocol_dc(model, images, sharp, x_test, protocol, 0, [0])
    assert torch.equal(a, b)  # near-one-hot soft labels give the same predictions as hard ones
    assert predict_protocol_dc(model, images, soft, x_test, protocol, 0, [0]).shape == (1, 10)


def test_the_outer_optimiser_learns_labels_with_their_own_rate_as_torch_adam() -> None:
    g = torch.Generator().manual_seed(0)
    syn = SyntheticSet(torch.randn(2, 6, 1, 4, 4, generator=g), label_logits(torch.arange(3).repeat(2), 3),
                       torch.zeros(4), 2)
    ref = [syn.images.clone().requires_grad_(), syn.raw_lrs.clone().requires_grad_(),
           syn.labels.clone().requires_grad_()]
    torch_opt = torch.optim.Adam([{"params": ref[:2]}, {"params": [ref[2]], "lr": 0.5}], lr=0.01, betas=(0.5, 0.999))
    opt = OuterOptimizer(syn, 0.01, 0.5, 100, lr_labels=0.5)
    for _ in range(3):
        grads = [torch.randn(t.shape, generator=g) for t in ref]
        for t, gr in zip(ref, grads):
            t.grad = gr.clone()
        torch_opt.step()
        opt.apply(*grads)
    for ours, theirs in zip((syn.images, syn.raw_lrs, syn.labels), ref):
        torch.testing.assert_close(ours, theirs.detach(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="label gradient"):
        opt.apply(grads[0], grads[1])
    with pytest.raises(ValueError, match="lr_labels"):
        OuterOptimizer(syn, 0.01, 0.5, 100)
