"""DSA augmentation: parsing, siamese sharing, exact per-op semantics, determinism, float64 gradcheck."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from ddray.core.augment import (DEFAULT_STRATEGY, FIELDS, OPS, AugParams, apply_aug, apply_aug_select, augment,
                                parse_strategy, sample_aug, stack_aug)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _params(op: str, **draws: list[float] | list[list[float]]) -> AugParams:
    """Hand-made parameters for one op."""
    return {"op": torch.tensor(OPS.index(op)), **{k: torch.tensor(v) for k, v in draws.items()}}


# One fixed, non-trivial parameter set per op (n = 1).
FIXED: dict[str, AugParams] = {
    "color": _params("color", brightness=[0.7], saturation=[0.3], contrast=[0.8]),
    "crop": _params("crop", crop=[[0.9, 0.1]]),
    "cutout": _params("cutout", cutout=[[0.3, 0.6]]),
    "flip": _params("flip", flip=[1.0]),
    "scale": _params("scale", scale=[[0.9, 1.15]]),
    "rotate": _params("rotate", rotate=[0.2]),
}


def test_parse_strategy() -> None:
    assert parse_strategy(DEFAULT_STRATEGY) == OPS
    assert parse_strategy("flip") == ("flip",)
    assert parse_strategy("crop_flip") == ("crop", "flip")
    for bad in ["", "colour", "color__flip", "color_flip_", "Color"]:
        with pytest.raises(ValueError, match=rf"--dsa-strategy: invalid value {bad!r}.*color, crop, cutout"):
            parse_strategy(bad)
    with pytest.raises(ValueError, match="--dsa-strategy"):
        sample_aug("color_blur", 1, _g(0))


def test_sample_shapes_and_pickle() -> None:
    for op in OPS:
        p = sample_aug(op, 5, _g(0))
        assert OPS[int(p["op"])] == op
        assert all(v.shape[0] == 5 for k, v in p.items() if k != "op")
        q = pickle.loads(pickle.dumps(p))
        assert q.keys() == p.keys() and all(torch.equal(q[k], p[k]) for k in p)
    with pytest.raises(ValueError, match="n must be >= 1"):
        sample_aug("flip", 0, _g(0))


def test_one_op_per_call_uniformly() -> None:
    g = _g(0)
    counts = torch.bincount(torch.stack([sample_aug(DEFAULT_STRATEGY, 1, g)["op"] for _ in range(1200)]),
                            minlength=len(OPS))
    assert counts.min() > 150 and counts.max() < 250  # 200 expected each
    assert {OPS[int(sample_aug("crop_flip", 1, g)["op"])] for _ in range(50)} == {"crop", "flip"}


@pytest.mark.parametrize("op", OPS)
def test_shape_dtype_preserved(op: str) -> None:
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(3, 3, 8, 10, generator=_g(1), dtype=dtype)
        y = apply_aug(x, FIXED[op])
        assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
        assert not torch.allclose(y, x)  # every fixed set really changes the images


def test_same_params_transform_two_batches_identically() -> None:
    x = torch.randn(4, 3, 12, 12, generator=_g(2))
    for seed in range(12):  # covers every op
        p = sample_aug(DEFAULT_STRATEGY, 4, _g(seed))
        torch.testing.assert_close(apply_aug(x, p), apply_aug(x.clone(), p), rtol=0, atol=0)


def test_siamese_params_shared_across_real_and_synthetic() -> None:
    real, syn = torch.randn(5, 3, 8, 8, generator=_g(3)), torch.randn(2, 3, 8, 8, generator=_g(4))
    g = _g(5)
    for _ in range(20):
        p = sample_aug("flip", 1, g)
        by_hand = (lambda t: t.flip(3)) if p["flip"].item() == 1 else (lambda t: t)
        torch.testing.assert_close(apply_aug(real, p), by_hand(real), rtol=0, atol=0)
        torch.testing.assert_close(apply_aug(syn, p), by_hand(syn), rtol=0, atol=0)
    # a shared draw on a batch equals that draw applied image by image, for every op
    for op in OPS:
        p = sample_aug(op, 1, _g(6))
        torch.testing.assert_close(apply_aug(real, p), torch.cat([apply_aug(r[None], p) for r in real]))


def test_flip() -> None:
    x = torch.randn(3, 2, 5, 7, generator=_g(7))
    torch.testing.assert_close(apply_aug(x, FIXED["flip"]), x.flip(3), rtol=0, atol=0)
    torch.testing.assert_close(apply_aug(x, _params("flip", flip=[0.0])), x, rtol=0, atol=0)
    per_image = apply_aug(x, _params("flip", flip=[1.0, 0.0, 1.0]))
    torch.testing.assert_close(per_image, torch.stack([x[0].flip(2), x[1], x[2].flip(2)]), rtol=0, atol=0)


def test_color_formula() -> None:
    x = torch.randn(2, 3, 4, 4, generator=_g(8), dtype=torch.float64)
    b, s, c = 0.7, 0.3, 0.8
    e = x + (b - 0.5) * 1.0
    e = (e - e.mean(1, keepdim=True)) * (s * 2.0) + e.mean(1, keepdim=True)
    e = (e - e.mean((1, 2, 3), keepdim=True)) * (c + 0.5) + e.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(apply_aug(x, FIXED["color"]), e)


def test_crop_is_whole_pixel_translation_with_zero_padding() -> None:
    x = torch.arange(1.0, 1 + 16 * 16).reshape(1, 1, 16, 16)  # shift = round(0.125·16) = 2: t ∈ {−2..2}
    y = apply_aug(x, _params("crop", crop=[[0.9, 0.1]]))  # +2 rows, −2 cols
    expected = torch.zeros_like(x)
    expected[..., :14, 2:] = x[..., 2:, :14]  # output (i, j) reads input (i + 2, j − 2)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-3)
    torch.testing.assert_close(apply_aug(x, _params("crop", crop=[[0.5, 0.5]])), x, rtol=0, atol=1e-3)


def test_cutout_zeroes_a_half_size_square() -> None:
    x = torch.ones(2, 3, 8, 8)
    y = apply_aug(x, _params("cutout", cutout=[[0.5, 0.5], [0.0, 0.99]]))  # side 4; 9 possible centres
    # image 0: centre (4, 4) → rows/cols 2..5; image 1: centre (0, 8) → clipped to rows 0..1, cols 6..7
    expected = torch.ones_like(x)
    expected[0, :, 2:6, 2:6] = 0
    expected[1, :, 0:2, 6:8] = 0
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_scale_and_rotate_geometry() -> None:
    x = torch.randn(2, 1, 9, 9, generator=_g(9))
    one = _params("scale", scale=[[1.0, 1.0]])
    torch.testing.assert_close(apply_aug(x, one), x, rtol=0, atol=1e-5)
    torch.testing.assert_close(apply_aug(x, _params("rotate", rotate=[0.0])), x, rtol=0, atol=1e-5)
    # sx scales columns (affine_grid's x), sy rows: on a ramp along one axis, the output is the ramp zoomed
    ramp = torch.arange(9.0).expand(1, 1, 9, 9)  # value = column index
    zoomed = 4 + 0.9 * (ramp - 4)  # output column j reads input column 4 + 0.9 (j − 4), interpolated
    torch.testing.assert_close(apply_aug(ramp, _params("scale", scale=[[0.9, 1.0]])), zoomed)
    torch.testing.assert_close(apply_aug(ramp.transpose(2, 3), _params("scale", scale=[[1.0, 0.9]])),
                               zoomed.transpose(2, 3))
    # a 90° rotation of an odd-sized image is an exact pixel permutation (DSA draws ≤ 15°; this checks the map)
    quarter = apply_aug(x, _params("rotate", rotate=[math.pi / 2]))
    torch.testing.assert_close(quarter, torch.rot90(x, 1, (2, 3)), rtol=0, atol=1e-5)
    # scale ranges and angle ranges as DSA's ParamDiffAug
    s, r = sample_aug("scale", 2000, _g(10))["scale"], sample_aug("rotate", 2000, _g(10))["rotate"]
    assert 1 / 1.2 <= s.min() < 0.85 and 1.18 < s.max() <= 1.2
    assert -math.pi / 12 <= r.min() < -0.25 and 0.25 < r.max() <= math.pi / 12


@pytest.mark.parametrize("op", OPS)
def test_gradcheck(op: str) -> None:
    x = torch.randn(1, 1, 6, 6, generator=_g(11), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_aug(t, FIXED[op]), (x,))


def test_determinism_in_the_generator() -> None:
    x = torch.randn(6, 3, 10, 10, generator=_g(12))
    for siamese in (False, True):
        a = augment(x, DEFAULT_STRATEGY, _g(13), siamese)
        torch.testing.assert_close(a, augment(x, DEFAULT_STRATEGY, _g(13), siamese), rtol=0, atol=0)
    torch.manual_seed(0)
    p = sample_aug(DEFAULT_STRATEGY, 6, _g(14))
    torch.manual_seed(1)  # the global RNG plays no part
    q = sample_aug(DEFAULT_STRATEGY, 6, _g(14))
    assert all(torch.equal(p[k], q[k]) for k in p)
    outs = [augment(x, DEFAULT_STRATEGY, _g(seed)) for seed in range(5)]
    assert all(not torch.equal(outs[0], o) for o in outs[1:])


def test_per_image_params_differ() -> None:
    x = torch.randn(1, 3, 10, 10, generator=_g(15)).expand(8, 3, 10, 10)  # 8 copies of one image
    for op in OPS:
        p = sample_aug(op, 8, _g(16))
        y = apply_aug(x, p)
        if op == "flip":
            assert 0 < p["flip"].sum() < 8
        assert len({tuple(t.flatten().tolist()) for t in y}) > 1, op
    shared = augment(x, "color_scale_rotate", _g(17), siamese=True)
    assert all(torch.equal(shared[0], t) for t in shared)


def test_bad_params() -> None:
    x = torch.randn(4, 1, 6, 6)
    with pytest.raises(ValueError, match=r"params\['flip'\] are drawn for 3 images; allowed: 1 .* 4"):
        apply_aug(x, sample_aug("flip", 3, _g(0)))
    with pytest.raises(ValueError, match="params\\['op'\\]"):
        apply_aug(x, {"op": torch.tensor(6)})
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        apply_aug(x[0], FIXED["flip"])


# ----------------------------------------------------------------------------- without a branch (DC's, DM's graphs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("strategy", [DEFAULT_STRATEGY, "crop_flip", "rotate"])
def test_select_without_a_branch_equals_each_blocks_own_draw(dtype: torch.dtype, strategy: str) -> None:
    """stack_aug + apply_aug_select give, bit for bit, the values and the gradient of applying each
    block's draw with apply_aug: the captured DC and DM matching augment as the eager ones do."""
    g = _g(21)
    sizes = [3, 1, 4, 2] * 6  # 24 blocks (classes) of different sizes
    draws = [sample_aug(strategy, 1, g) for _ in sizes]
    assert {OPS[int(d["op"])] for d in draws} == set(parse_strategy(strategy))  # every op drawn somewhere
    x = torch.randn(sum(sizes), 3, 10, 12, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    want = torch.cat([apply_aug(block, d) for block, d in zip(x.split(sizes), draws)])
    got = apply_aug_select(x, stack_aug(draws, sizes, strategy, x), strategy)
    assert torch.equal(got, want)
    (g_got,), (g_want,) = (torch.autograd.grad((y * w).sum(), x) for y in (got, want))
    assert torch.equal(g_got, g_want)


def test_stacked_draws_have_the_same_fields_and_shapes_whatever_was_drawn() -> None:
    """A CUDA graph reads the draws from static buffers: every draw must fill the same ones."""
    like = torch.empty(0, dtype=torch.float64)
    layouts, ops = set(), set()
    for seed in range(12):
        draws = [sample_aug(DEFAULT_STRATEGY, 1, _g(100 + 3 * seed + i)) for i in range(3)]
        st = stack_aug(draws, [2, 1, 3], DEFAULT_STRATEGY, like)
        layouts.add(tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(st.items())))
        assert st["op"].tolist() == [int(draws[0]["op"])] * 2 + [int(draws[1]["op"])] + [int(draws[2]["op"])] * 3
        ops |= set(st["op"].tolist())
    fields = {name for op in OPS for name, _, _ in FIELDS[op]}
    assert len(layouts) == 1 and ops == set(range(len(OPS)))
    assert {k for k, _, _ in next(iter(layouts))} == fields | {"op"}
    assert dict((k, d) for k, _, d in next(iter(layouts)))["crop"] == torch.float64
    only = stack_aug([sample_aug("flip", 1, _g(1))], [4], "flip", like)
    assert set(only) == {"op", "flip"} and only["flip"].shape == (4,)
    with pytest.raises(ValueError, match="2 draws for 3 blocks"):
        stack_aug(draws[:2], [1, 1, 1], DEFAULT_STRATEGY, like)
    with pytest.raises(ValueError, match=r"a draw for \[3\] images in a block of 2"):
        stack_aug([sample_aug("flip", 3, _g(2))], [2], "flip", like)


@pytest.mark.parametrize("op", OPS)
def test_select_of_one_draw_per_image_equals_apply_aug(op: str) -> None:
    """MTT's student steps draw per-image parameters (one op per step): stacked as one block, the
    branchless form gives apply_aug's values and gradient bit for bit."""
    seed = next(s for s in range(300, 400) if OPS[int(sample_aug(DEFAULT_STRATEGY, 6, _g(s))["op"])] == op)
    g = _g(seed)
    draw = sample_aug(DEFAULT_STRATEGY, 6, g)
    x = torch.randn(6, 3, 9, 11, generator=g, dtype=torch.float64, requires_grad=True)
    got = apply_aug_select(x, stack_aug([draw], [6], DEFAULT_STRATEGY, x), DEFAULT_STRATEGY)
    want = apply_aug(x, draw)
    assert torch.equal(got, want)
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    (g_got,), (g_want,) = (torch.autograd.grad((y * w).sum(), x) for y in (got, want))
    assert torch.equal(g_got, g_want)


def test_select_on_the_meta_device_reads_nothing_back_and_copies_nothing_from_the_host() -> None:
    """What a CUDA graph can capture: no read-back (the ``meta`` device has no values) and no tensor
    made from host data — crop's pixel shifts once came from a Python list copied to the device."""
    from test_capture import HostData

    meta = torch.device("meta")
    draws = [sample_aug(DEFAULT_STRATEGY, 1, _g(7 + i)) for i in range(24)]
    x = torch.empty(48, 3, 32, 32, device=meta)
    params = stack_aug(draws, [2] * 24, DEFAULT_STRATEGY, x)
    with HostData() as seen:
        out = apply_aug_select(x.requires_grad_(), params, DEFAULT_STRATEGY)
        (grad,) = torch.autograd.grad(out.sum(), x)
    assert not seen.calls and out.shape == grad.shape == x.shape


@pytest.mark.cuda
def test_cuda() -> None:
    x = torch.randn(4, 3, 8, 8, generator=_g(18))
    for op in OPS:
        torch.testing.assert_close(apply_aug(x.cuda(), FIXED[op]).cpu(), apply_aug(x, FIXED[op]),
                                   rtol=1e-5, atol=1e-5)
