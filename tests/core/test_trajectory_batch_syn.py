"""MTT's ``batch_syn``: each student step trains on the next batch of a seeded permutation of the set.

The meta-gradient equals float64 central finite differences; ``full`` and ``recompute``
agree; ``batch_syn = N`` is the whole set; the same (seed, meta-step) draws the same
batches on a fresh object (a resumed run, another worker); images in no batch get a
zero gradient; bad values are refused.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from ddray.core.inits import RandomInit
from ddray.core.models import ConvNet
from ddray.core.trajectory import TrajectoryMatching
from ddray.core.unroll import sgd_step, unroll

from test_methods import _experts  # noqa: E402  (tests/core is on sys.path; fake expert trajectories)

C, IPC, SIDE, STEPS = 3, 2, 8, 3  # N = C·IPC = 6 synthetic images, 3 student steps


def _mtt(batch_syn: int | None, memory: str = "full", strategy: str | None = None,
         syn_steps: int = STEPS) -> tuple[TrajectoryMatching, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    model = ConvNet(1, SIDE, C, width=4).double()
    images = torch.randn(1, C * IPC, 1, SIDE, SIDE, generator=g, dtype=torch.float64)
    labels = torch.arange(C).repeat_interleave(IPC)
    obj = TrajectoryMatching(model, _experts(model, 2, 4), labels, syn_steps=syn_steps, expert_epochs=2,
                             max_start_epoch=3, seed=0, strategy=strategy, memory=memory, batch_syn=batch_syn)
    return obj, images, torch.tensor([-3.0], dtype=torch.float64)


def _finite_differences(f: Callable[[torch.Tensor], float], x: torch.Tensor, coords: list[int],
                        eps: float = 1e-6) -> list[float]:
    out = []
    for i in coords:
        plus, minus = x.clone(), x.clone()
        plus.view(-1)[i] += eps
        minus.view(-1)[i] -= eps
        out.append((f(plus) - f(minus)) / (2 * eps))
    return out


def test_unroll_trains_step_t_on_the_selected_rows_and_their_labels() -> None:
    model = ConvNet(1, SIDE, C, width=4).double()
    params0 = {k: v.double() for k, v in RandomInit(model, "kaiming", 0).sample([(0, 0, 0)]).items()}
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, C * IPC, 1, SIDE, SIDE, generator=g, dtype=torch.float64)
    labels = torch.arange(C).repeat_interleave(IPC)
    lrs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    chosen = [torch.tensor([0, 3]), torch.tensor([5]), torch.tensor([1, 2, 4]), torch.tensor([0, 5])]
    ours = unroll(model, params0, images, labels, lrs, rows=lambda t: chosen[t])
    ref = {k: v[0] for k, v in params0.items()}
    for t, r in enumerate(chosen):
        ref = sgd_step(model, ref, images[t % 2][r], labels[r], lrs[t])
    for k in ref:
        torch.testing.assert_close(ours[k][0], ref[k], rtol=1e-12, atol=1e-14)


def test_batches_cut_seeded_permutations_each_image_once_per_pass_as_mtt() -> None:
    obj, _, _ = _mtt(batch_syn=4)  # N = 6: batches of 4 and 2 from one permutation, then 4 of the next
    batches = obj.batches(7)
    assert batches is not None and [len(b) for b in batches] == [4, 2, 4]
    assert torch.equal(torch.cat(batches[:2]).sort().values, torch.arange(C * IPC))  # one pass: every image once
    for b in batches:
        assert b.dtype == torch.int64 and len(b.unique()) == len(b) and torch.equal(b, b.sort().values)
    assert any(not torch.equal(a, b) for a, b in zip(batches, obj.batches(8) or []))  # a fresh draw per meta-step
    assert all(torch.equal(a, b) for a, b in zip(batches, _mtt(batch_syn=4)[0].batches(7) or []))  # keyed, not drawn
    assert [len(b) for b in _mtt(batch_syn=3)[0].batches(0) or []] == [3, 3, 3]
    assert _mtt(batch_syn=None)[0].batches(7) is None


@pytest.mark.parametrize("memory,strategy", [("full", None), ("recompute", None), ("recompute", "crop_flip")])
def test_batch_syn_gradient_equals_finite_differences(memory: str, strategy: str | None) -> None:
    obj, images, raw = _mtt(2, memory, strategy)
    g = obj(images, raw, step=1, nets=[0, 1])
    # coordinates inside the images that some step trains on (the others are tested below)
    used = torch.cat(obj.batches(1) or []).unique()
    per_image = images[0, 0].numel()
    gen = torch.Generator().manual_seed(4)
    coords = [int(used[i]) * per_image + int(torch.randint(per_image, (1,), generator=gen))
              for i in torch.randint(len(used), (5,), generator=gen)]
    for i, fd in zip(coords, _finite_differences(lambda x: obj(x, raw, 1, [0, 1]).loss, images, coords)):
        assert float(g.images.view(-1)[i]) == pytest.approx(fd, rel=1e-4, abs=1e-8)
    [fd_raw] = _finite_differences(lambda r: obj(images, r, 1, [0, 1]).loss, raw, [0])
    assert float(g.raw_lrs[0]) == pytest.approx(fd_raw, rel=1e-4, abs=1e-8)


def test_batch_syn_recompute_equals_full() -> None:
    full, images, raw = _mtt(3, "full", "color_crop_flip")
    rec, _, _ = _mtt(3, "recompute", "color_crop_flip")
    a, b = full(images, raw, 2, [0, 1]), rec(images, raw, 2, [0, 1])
    torch.testing.assert_close(a.images, b.images, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a.raw_lrs, b.raw_lrs, rtol=1e-9, atol=1e-12)
    assert a.loss == pytest.approx(b.loss, rel=1e-12)


@pytest.mark.parametrize("memory", ["full", "recompute"])
def test_batch_syn_n_equals_all_images(memory: str) -> None:
    every, images, raw = _mtt(None, memory, "crop_flip")
    n, _, _ = _mtt(C * IPC, memory, "crop_flip")
    a, b = every(images, raw, 3, [0, 1]), n(images, raw, 3, [0, 1])
    torch.testing.assert_close(a.images, b.images, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(a.raw_lrs, b.raw_lrs, rtol=1e-12, atol=1e-15)
    assert a.loss == pytest.approx(b.loss, rel=1e-12)


@pytest.mark.parametrize("memory", ["full", "recompute"])
def test_same_seed_and_step_give_bitwise_the_same_result_on_fresh_objects(memory: str) -> None:
    """What a resumed run, or another worker, computes for the same meta-step."""
    first, images, raw = _mtt(2, memory, "crop_flip")
    second, _, _ = _mtt(2, memory, "crop_flip")
    a, b = first(images, raw, 4, [0, 1]), second(images, raw, 4, [0, 1])
    assert torch.equal(a.images, b.images) and torch.equal(a.raw_lrs, b.raw_lrs) and a.loss == b.loss
    assert not torch.equal(a.images, first(images, raw, 5, [0, 1]).images)


def test_shares_of_a_meta_step_add_up_to_the_whole() -> None:
    """Every student of a meta-step trains on the same batches, however the students are split."""
    obj, images, raw = _mtt(2, "recompute", "crop_flip")
    whole, one, two = obj(images, raw, 6, [0, 1, 2]), obj(images, raw, 6, [0, 2]), obj(images, raw, 6, [1])
    torch.testing.assert_close(one.images + two.images, whole.images, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(one.raw_lrs + two.raw_lrs, whole.raw_lrs, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("memory", ["full", "recompute"])
def test_images_in_no_batch_get_a_zero_gradient(memory: str) -> None:
    obj, images, raw = _mtt(2, memory, "crop_flip", syn_steps=2)  # at most 4 of the 6 images are used
    g = obj(images, raw, 0, [0, 1])
    used = set(torch.cat(obj.batches(0) or []).tolist())
    assert len(used) < C * IPC
    for i in range(C * IPC):
        norm = float(g.images[0, i].abs().sum())
        assert (norm > 0) if i in used else (norm == 0), (i, used, norm)


@pytest.mark.parametrize("batch_syn", [0, -1, C * IPC + 1])
def test_batch_syn_outside_1_to_n_is_refused(batch_syn: int) -> None:
    with pytest.raises(ValueError, match=f"--batch-syn {batch_syn}: must be between 1 and {C * IPC}"):
        _mtt(batch_syn)
