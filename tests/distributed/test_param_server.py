"""The parameter server without Ray: sync averaging, sharding, async staleness, state round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddray.core.synthetic import OuterOptimizer, SyntheticSet, class_labels
from ddray.distributed.param_server import ParamServer, merge_states, slice_state
from ddray.distributed.shards import shard_layout

S, C, IPC, E = 2, 4, 2, 2  # steps, classes, images per class, epochs → x̃ (2, 8, 1, 5, 5), ρ (4,)
SETTINGS = dict(lr=0.01, lr_decay=0.5, lr_decay_every=2, epochs=E, nets=4, iterations=10)


def fresh() -> tuple[SyntheticSet, OuterOptimizer]:
    g = torch.Generator().manual_seed(0)
    syn = SyntheticSet(torch.randn(S, C * IPC, 1, 5, 5, generator=g), class_labels(C, IPC),
                       torch.full((S * E,), -3.9), E)
    return syn, OuterOptimizer(syn, SETTINGS["lr"], SETTINGS["lr_decay"], SETTINGS["lr_decay_every"])


def state_of(syn: SyntheticSet, opt: OuterOptimizer, step: int = 0) -> dict:
    return {"images": syn.images.clone(), "raw_lrs": syn.raw_lrs.clone(), "optimizer": opt.state_dict(),
            "step": step}


def grad(seed: int, nets: int, version: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"images": rng.standard_normal((S, C * IPC, 1, 5, 5)).astype(np.float32),
            "raw_lrs": rng.standard_normal(S * E).astype(np.float32), "loss": 2.0 * nets, "nets": nets,
            "version": version}


def piece(g: dict, shard) -> dict:
    return {**g, "images": np.ascontiguousarray(g["images"][:, shard.lo:shard.hi]),
            "raw_lrs": g["raw_lrs"] if shard.owns_lrs else None}


def test_shard_layout_blocks_of_classes() -> None:
    lay = shard_layout(num_classes=10, ipc=2, shards=3)
    assert [(s.lo, s.hi) for s in lay] == [(0, 8), (8, 14), (14, 20)]
    assert [s.owns_lrs for s in lay] == [True, False, False]
    with pytest.raises(ValueError, match="--shards: invalid value 11"):
        shard_layout(10, 1, 11)


def test_sync_apply_matches_outer_optimizer_bitwise() -> None:
    """One share (W = 1): the server's update is the single-process update, bit for bit."""
    syn, opt = fresh()
    ps = ParamServer(state_of(*fresh()), shard_layout(C, IPC, 1)[0], **SETTINGS)
    for step in range(4):
        g = grad(step, nets=4)
        opt.apply(torch.from_numpy(g["images"]) / 4, torch.from_numpy(g["raw_lrs"]) / 4)
        stats = ps.apply([g])
        assert stats["step"] == step + 1 and stats["outer_loss"] == 2.0
    assert torch.equal(ps.syn.images, syn.images) and torch.equal(ps.syn.raw_lrs, syn.raw_lrs)
    assert ps.opt.lr == opt.lr


def test_two_shares_average_like_one() -> None:
    a = ParamServer(state_of(*fresh()), shard_layout(C, IPC, 1)[0], **SETTINGS)
    b = ParamServer(state_of(*fresh()), shard_layout(C, IPC, 1)[0], **SETTINGS)
    g1, g2 = grad(1, 2), grad(2, 2)
    whole = {**g1, "images": g1["images"] + g2["images"], "raw_lrs": g1["raw_lrs"] + g2["raw_lrs"], "nets": 4,
             "loss": 8.0}
    a.apply([g1, g2])
    b.apply([whole])
    torch.testing.assert_close(a.syn.images, b.syn.images, rtol=0, atol=1e-7)


def test_sharded_servers_update_exactly_like_one() -> None:
    layout = shard_layout(C, IPC, 3)
    one = ParamServer(state_of(*fresh()), shard_layout(C, IPC, 1)[0], **SETTINGS)
    full = state_of(*fresh())
    shards = [ParamServer(slice_state(full, s), s, **SETTINGS) for s in layout]
    for step in range(3):
        g = grad(step, nets=4)
        one.apply([g])
        for ps, s in zip(shards, layout):
            ps.apply([piece(g, s)])
    merged = merge_states([ps.state() for ps in shards])
    torch.testing.assert_close(merged["images"], one.syn.images, rtol=0, atol=0)
    torch.testing.assert_close(merged["raw_lrs"], one.syn.raw_lrs, rtol=0, atol=0)
    ref = one.state()["optimizer"]["opt"]["state"]
    for pid in (0, 1):
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(merged["optimizer"]["opt"]["state"][pid][k], ref[pid][k])


def test_slice_merge_round_trip_including_fresh_state() -> None:
    syn, opt = fresh()
    for st in (state_of(syn, opt), None):
        if st is None:  # after an update the optimizer has moments
            opt.apply(torch.ones_like(syn.images), torch.ones_like(syn.raw_lrs))
            st = state_of(syn, opt, step=1)
        parts = [slice_state(st, s) for s in shard_layout(C, IPC, 2)]
        back = merge_states(parts)
        assert torch.equal(back["images"], st["images"]) and back["step"] == st["step"]
        restored = ParamServer(back, shard_layout(C, IPC, 1)[0], **SETTINGS)
        assert torch.equal(restored.syn.raw_lrs, st["raw_lrs"])


def test_async_push_drops_stale_and_applies_after_k_nets() -> None:
    ps = ParamServer(state_of(*fresh()), shard_layout(C, IPC, 1)[0], **{**SETTINGS, "iterations": 2},
                     max_staleness=1)
    assert ps.push(grad(0, 2, version=0)) is False and ps.step == 0  # 2 of K = 4 nets pending
    assert ps.push(grad(1, 2, version=0)) is False and ps.step == 1  # K reached: update 1
    assert ps.push(grad(2, 2, version=5)) is False and ps.dropped == 1  # from the future (after a rollback)
    ps.push(grad(3, 2, version=0))  # staleness 1: accepted
    ps.push(grad(4, 2, version=1))
    assert ps.done and ps.step == 2
    stats = ps.drain()
    assert [s["step"] for s in stats] == [1.0, 2.0]
    assert stats[1]["staleness_max"] == 1.0 and stats[1]["staleness_mean"] == 0.5 and stats[1]["dropped"] == 1.0
    assert ps.push(grad(5, 2, version=2)) is True and ps.step == 2  # complete: ignored
    assert ps.drain() == []


def test_async_max_staleness_zero_accepts_only_current_version() -> None:
    ps = ParamServer(state_of(*fresh()), shard_layout(C, IPC, 1)[0], **SETTINGS, max_staleness=0)
    ps.push(grad(0, 4, version=0))
    ps.push(grad(1, 4, version=0))  # one version old → dropped
    assert ps.step == 1 and ps.dropped == 1


def test_apply_beyond_iterations_is_refused() -> None:
    ps = ParamServer(state_of(*fresh(), step=10), shard_layout(C, IPC, 1)[0], **SETTINGS)
    with pytest.raises(RuntimeError, match="already has its 10 meta-steps"):
        ps.apply([grad(0, 4)])
