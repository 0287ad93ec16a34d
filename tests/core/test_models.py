"""Models: the original LeNet layout, forward shapes, deterministic init schemes."""

from __future__ import annotations

import pytest
import torch

from ddray.core.models import build_model, init_params, stack_params, unstack_params


def test_lenet_has_the_original_layers_and_names() -> None:
    m = build_model("lenet", (1, 28, 28), 10)
    shapes = {k: tuple(v.shape) for k, v in m.named_parameters()}
    assert shapes == {
        "conv1.weight": (6, 1, 5, 5), "conv1.bias": (6,), "conv2.weight": (16, 6, 5, 5), "conv2.bias": (16,),
        "fc1.weight": (120, 400), "fc1.bias": (120,), "fc2.weight": (84, 120), "fc2.bias": (84,),
        "fc3.weight": (10, 84), "fc3.bias": (10,)}
    assert m.conv1.padding == (2, 2)
    assert build_model("lenet", (3, 32, 32), 10).conv1.padding == (0, 0)


def test_lenet_pool_then_relu_equals_the_original_relu_then_pool() -> None:
    m = build_model("lenet", (1, 28, 28), 10)
    x = torch.randn(8, 1, 28, 28)
    F = torch.nn.functional
    h = F.max_pool2d(F.relu(m.conv1(x)), 2)
    h = F.max_pool2d(F.relu(m.conv2(h)), 2).flatten(1)
    ref = m.fc3(F.relu(m.fc2(F.relu(m.fc1(h)))))
    torch.testing.assert_close(m(x), ref)


@pytest.mark.parametrize("name,shape", [("lenet", (1, 28, 28)), ("lenet", (1, 16, 16)),
                                        ("alexcifarnet", (3, 32, 32)), ("convnet", (1, 28, 28)),
                                        ("convnet", (3, 32, 32))])
def test_forward_shapes(name: str, shape: tuple[int, int, int]) -> None:
    m = build_model(name, shape, 7)
    assert m(torch.randn(2, *shape)).shape == (2, 7)
    assert not list(m.buffers()), "models must be pure functions of their parameters"


def test_bad_model_and_sizes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="--model: unknown model 'vgg'"):
        build_model("vgg", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="alexcifarnet: needs 32×32"):
        build_model("alexcifarnet", (1, 28, 28), 10)


@pytest.mark.parametrize("scheme", ["xavier", "kaiming", "normal", "orthogonal", "default"])
def test_init_schemes_are_deterministic_in_the_generator(scheme: str) -> None:
    m = build_model("lenet", (1, 28, 28), 10)
    a = init_params(m, scheme, torch.Generator().manual_seed(5))
    b = init_params(m, scheme, torch.Generator().manual_seed(5))
    c = init_params(m, scheme, torch.Generator().manual_seed(6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc1.weight"], c["fc1.weight"])


def test_xavier_is_normal_with_gain_one_and_zero_bias() -> None:
    m = build_model("lenet", (1, 28, 28), 10)
    p = init_params(m, "xavier", torch.Generator().manual_seed(0))
    w = p["fc1.weight"]  # fan_in 400, fan_out 120 → std sqrt(2/520)
    assert w.std().item() == pytest.approx((2 / 520) ** 0.5, rel=0.05)
    assert all(torch.count_nonzero(p[k]) == 0 for k in p if k.endswith("bias"))


def test_stack_unstack_roundtrip() -> None:
    m = build_model("lenet", (1, 28, 28), 10)
    ps = [init_params(m, "xavier", torch.Generator().manual_seed(i)) for i in range(3)]
    back = unstack_params(stack_params(ps))
    assert all(torch.equal(back[i][k], ps[i][k]) for i in range(3) for k in ps[0])
