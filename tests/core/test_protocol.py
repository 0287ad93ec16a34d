"""The DC/DSA/DM/MTT evaluation protocol: validation, lr schedule, determinism, learning on real MNIST."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ddray.core.models import ConvNet, build_model
import ddray.core.protocol_dc as protocol_module
from ddray.core.protocol_dc import ProtocolDC, evaluate_protocol_dc, lr_at, train_one
from ddray.data import Dataset, load_dataset


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_dataset("mnist5k")


@pytest.fixture(scope="module")
def ten_per_class(mnist: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """10 random real training images per class: (100, 1, 28, 28), (100,)."""
    g = torch.Generator().manual_seed(0)
    idx = torch.cat([torch.nonzero(mnist.y_train == c).flatten()[torch.randperm(400, generator=g)[:10]]
                     for c in range(10)])
    return mnist.x_train[idx], mnist.y_train[idx]


def _tiny() -> tuple[ConvNet, torch.Tensor, torch.Tensor]:
    """A small ConvNet and 12 random 8×8 images of 3 classes — cheap enough for exact comparisons."""
    g = torch.Generator().manual_seed(0)
    return ConvNet(1, 8, 3, width=4, depth=1), torch.randn(12, 1, 8, 8, generator=g), torch.arange(3).repeat(4)


def test_defaults_and_validation() -> None:
    p = ProtocolDC()
    assert (p.epochs, p.nets, p.lr, p.momentum, p.weight_decay, p.batch_size) == (300, 5, 0.01, 0.9, 5e-4, 256)
    assert p.dsa_strategy == "color_crop_cutout_flip_scale_rotate"
    assert ProtocolDC(dsa_strategy=None).dsa_strategy is None
    bad: list[tuple[dict[str, Any], str]] = [
        ({"epochs": 0}, "--eval-epochs"), ({"epochs": 2.5}, "--eval-epochs"), ({"nets": 0}, "--eval-nets"),
        ({"batch_size": -1}, "--eval-batch-size"), ({"lr": 0.0}, "--eval-lr"), ({"lr": float("nan")}, "--eval-lr"),
        ({"lr": -0.1}, "--eval-lr"), ({"momentum": 1.0}, "momentum"), ({"weight_decay": -1e-4}, "weight_decay"),
        ({"dsa_strategy": "color_blur"}, "--dsa-strategy"), ({"dsa_strategy": ""}, "--dsa-strategy"),
    ]
    for kwargs, option in bad:
        value = next(iter(kwargs.values()))
        with pytest.raises(ValueError, match=rf"{option}: invalid value {value!r}"):
            ProtocolDC(**kwargs)
    model, x, y = _tiny()
    with pytest.raises(ValueError, match="lr: invalid value"):
        evaluate_protocol_dc(model, x, y, x, y, ProtocolDC(epochs=1, nets=1), seed=0, lr=-1.0)
    with pytest.raises(ValueError, match=r"labels \(N,\)"):
        evaluate_protocol_dc(model, x, y[:5], x, y, ProtocolDC(epochs=1, nets=1), seed=0)


def test_lr_at_decays_at_half_and_lr_overrides() -> None:
    p = ProtocolDC(epochs=10)
    assert [lr_at(e, p) for e in range(10)] == [0.01] * 5 + [0.01 * 0.1] * 5
    assert [lr_at(e, p, 0.5) for e in (0, 4, 5, 9)] == [0.5, 0.5, 0.05, 0.05]
    assert lr_at(0, ProtocolDC(epochs=1)) == pytest.approx(0.001)  # 1 // 2 = 0: decayed throughout


def test_optimizer_lr_follows_the_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float] = []
    step = torch.optim.SGD.step

    def spy(self: torch.optim.SGD, *args: object, **kwargs: object) -> object:
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    model, x, y = _tiny()
    train_one(model, x, y, ProtocolDC(epochs=4, batch_size=5, dsa_strategy=None), seed=0, index=0, lr=0.3)
    assert seen == pytest.approx([0.3] * 6 + [0.03] * 6)  # 3 minibatches (5, 5, 2) per epoch


def test_lr_argument_replaces_protocol_lr() -> None:
    model, x, y = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def trained(protocol: ProtocolDC, lr: float | None) -> dict[str, torch.Tensor]:
        return train_one(model, x, y, protocol, seed=3, index=1, lr=lr).state_dict()

    base = ProtocolDC(epochs=3, batch_size=4)
    a, b = trained(base, 0.05), trained(ProtocolDC(epochs=3, batch_size=4, lr=0.05), None)
    c = trained(base, None)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # template untouched


def test_steps_are_pooled(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = _tiny()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_train_one = protocol_module.train_one

    def spy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
            *args: object, **kwargs: object) -> torch.nn.Module:
        seen.append((images, labels))
        return real_train_one(model, images, labels, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(protocol_module, "train_one", spy)
    p = ProtocolDC(epochs=2, nets=2, batch_size=5)
    steps = x.reshape(2, 6, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])  # per image of one step
    pooled = evaluate_protocol_dc(model, steps, labels, x, y, p, seed=1)
    flat = evaluate_protocol_dc(model, x, labels.repeat(2), x, y, p, seed=1)
    assert pooled.accuracies == flat.accuracies and pooled.n == 2
    images, got = seen[0]
    assert torch.equal(images, x) and torch.equal(got, torch.tensor([0, 1, 2, 2, 1, 0] * 2))
    assert torch.equal(seen[2][1], got)  # the flat call saw the same labels


def test_deterministic_in_the_seed(mnist: Dataset, ten_per_class: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = ten_per_class
    model = build_model("convnet", (1, 28, 28), 10)
    p = ProtocolDC(epochs=2, nets=1, batch_size=50)  # with DSA, so the augmentation draws are seeded too
    x_test, y_test = mnist.x_test[:300], mnist.y_test[:300]
    torch.manual_seed(0)
    a = evaluate_protocol_dc(model, x, y, x_test, y_test, p, seed=7)
    torch.manual_seed(1)  # the global RNG plays no part
    b = evaluate_protocol_dc(model, x, y, x_test, y_test, p, seed=7)
    c = evaluate_protocol_dc(model, x, y, x_test, y_test, p, seed=8)
    assert a.accuracies == b.accuracies
    assert a.accuracies != c.accuracies


def test_learns_from_ten_real_images_per_class(mnist: Dataset,
                                                ten_per_class: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = ten_per_class
    model = build_model("convnet", (1, 28, 28), 10)
    result = evaluate_protocol_dc(model, x, y, mnist.x_test, mnist.y_test,
                                  ProtocolDC(epochs=30, nets=2, dsa_strategy=None), seed=0)
    assert result.n == 2 and len(result.accuracies) == 2
    assert result.mean > 0.5, result  # measured: 86.0 ± 0.4 %


def test_no_learning_signal_stays_near_chance(mnist: Dataset,
                                               ten_per_class: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = ten_per_class
    model = build_model("convnet", (1, 28, 28), 10)
    result = evaluate_protocol_dc(model, x, y, mnist.x_test, mnist.y_test,
                                  ProtocolDC(epochs=3, nets=2, dsa_strategy=None), seed=0, lr=1e-9)
    assert result.mean <= 0.2, result  # measured: ~10 %
