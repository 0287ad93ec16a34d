"""The parameter server without Ray: sync sums of chunks, sharding, async staleness, state round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddray.config import Config
from ddray.core.synthetic import OuterOptimizer, SyntheticSet, class_labels
from ddray.distributed.messages import GradShare, ShardState, merge_states, slice_state
from ddray.distributed.param_server import ParamServer
from ddray.distributed.shards import Shard, shard_layout
from ddray.run.state import RunState

S, C, IPC, E = 2, 4, 2, 2  # steps, classes, images per class, epochs → x̃ (2, 8, 1, 5, 5), ρ (4,)
CONFIG = Config.from_dict({"steps": S, "epochs": E, "ipc": IPC, "nets": 4, "iterations": 10, "lr": 0.01,
                           "lr_decay": 0.5, "lr_decay_every": 2})
ONE = shard_layout(C, IPC, 1)[0]


def fresh() -> tuple[SyntheticSet, OuterOptimizer]:
    g = torch.Generator().manual_seed(0)
    syn = SyntheticSet(torch.randn(S, C * IPC, 1, 5, 5, generator=g), class_labels(C, IPC),
                       torch.full((S * E,), -3.9), E)
    return syn, OuterOptimizer(syn, 0.01, 0.5, 2)


def run_state(syn: SyntheticSet, opt: OuterOptimizer, step: int = 0, config: Config = CONFIG) -> RunState:
    return RunState(step, syn.images.clone(), syn.raw_lrs.clone(), opt.state_dict(), config)


def server(step: int = 0, config: Config = CONFIG, shard: Shard = ONE) -> ParamServer:
    return ParamServer(slice_state(run_state(*fresh(), step=step, config=config), shard), shard, config)


def grad(seed: int, nets: int, step: int = 0, chunk: int = 0) -> GradShare:
    rng = np.random.default_rng(seed)
    return GradShare(step, chunk, rng.standard_normal((S, C * IPC, 1, 5, 5)).astype(np.float32),
                     rng.standard_normal(S * E).astype(np.float32), 2.0 * nets, nets)


def piece(g: GradShare, shard: Shard) -> GradShare:
    return GradShare(g.step, g.chunk, np.ascontiguousarray(g.images[:, shard.lo:shard.hi]),
                     g.raw_lrs if shard.owns_lrs else None, g.loss, g.nets)


def test_shard_layout_blocks_of_classes() -> None:
    lay = shard_layout(num_classes=10, ipc=2, shards=3)
    assert [(s.lo, s.hi) for s in lay] == [(0, 8), (8, 14), (14, 20)]
    assert [s.owns_lrs for s in lay] == [True, False, False]
    with pytest.raises(ValueError, match="--shards: invalid value 11"):
        shard_layout(10, 1, 11)


def test_sync_apply_matches_outer_optimizer_bitwise() -> None:
    """One chunk: the server's update is the single-process update, bit for bit."""
    syn, opt = fresh()
    ps = server()
    for step in range(4):
        g = grad(step, nets=4, step=step)
        opt.apply(torch.from_numpy(g.images) / 4, torch.from_numpy(g.raw_lrs) / 4)
        stats = ps.apply([g])
        assert stats.step == step + 1 and stats.outer_loss == 2.0 and stats.nets == 4
        assert stats.metrics()["outer_loss"] == 2.0 and "ps_ms" not in stats.metrics()  # no receive time here
    assert torch.equal(ps.syn.images, syn.images) and torch.equal(ps.syn.raw_lrs, syn.raw_lrs)
    assert ps.opt.lr == opt.lr


def test_chunks_are_summed_in_chunk_order_whatever_order_they_arrive_in() -> None:
    """The sum is (g0 + g1) + g2 as ddray.core.net_chunks.step_gradient adds them, bitwise, in any arrival order."""
    gs = [grad(10 + c, nets=1, chunk=c) for c in range(3)]
    syn, opt = fresh()
    total = (torch.from_numpy(gs[0].images) + torch.from_numpy(gs[1].images)) + torch.from_numpy(gs[2].images)
    raw = (torch.from_numpy(gs[0].raw_lrs) + torch.from_numpy(gs[1].raw_lrs)) + torch.from_numpy(gs[2].raw_lrs)
    opt.apply(total / 3, raw / 3)
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        ps = server()
        ps.apply([gs[i] for i in order])
        assert torch.equal(ps.syn.images, syn.images) and torch.equal(ps.syn.raw_lrs, syn.raw_lrs)


def test_a_missing_duplicate_or_stale_chunk_is_refused() -> None:
    ps = server()
    with pytest.raises(RuntimeError, match="each chunk once, at this step"):
        ps.apply([grad(0, 2, chunk=0), grad(1, 2, chunk=2)])
    with pytest.raises(RuntimeError, match="each chunk once"):
        ps.apply([grad(0, 2, chunk=0), grad(1, 2, chunk=0)])
    with pytest.raises(RuntimeError, match="meta-step 0 got chunks"):
        ps.apply([grad(0, 4, step=1)])
    assert ps.step == 0


def test_sharded_servers_update_exactly_like_one() -> None:
    layout = shard_layout(C, IPC, 3)
    one = server()
    full = run_state(*fresh())
    shards = [ParamServer(slice_state(full, s), s, CONFIG) for s in layout]
    for step in range(3):
        g = grad(step, nets=4, step=step)
        one.apply([g])
        for ps, s in zip(shards, layout):
            ps.apply([piece(g, s)])
    merged = merge_states([ps.state() for ps in shards], CONFIG)
    assert torch.equal(merged.images, one.syn.images) and torch.equal(merged.raw_lrs, one.syn.raw_lrs)
    ref = one.state().optimizer["opt"]["state"]
    for pid in (0, 1):
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(merged.optimizer["opt"]["state"][pid][k], ref[pid][k])


def test_slice_merge_round_trip_including_fresh_state() -> None:
    syn, opt = fresh()
    for st in (run_state(syn, opt), None):
        if st is None:  # after an update the optimizer has moments
            opt.apply(torch.ones_like(syn.images), torch.ones_like(syn.raw_lrs))
            st = run_state(syn, opt, step=1)
        parts = [slice_state(st, s) for s in shard_layout(C, IPC, 2)]
        assert parts[1].raw_lrs is None and parts[0].images.shape[1] + parts[1].images.shape[1] == C * IPC
        back = merge_states(parts, CONFIG)
        assert torch.equal(back.images, st.images) and back.step == st.step
        restored = ParamServer(slice_state(back, ONE), ONE, CONFIG)
        assert torch.equal(restored.syn.raw_lrs, st.raw_lrs)
    with pytest.raises(RuntimeError, match="different meta-steps"):
        merge_states([ShardState(7, p.images, p.raw_lrs, p.optimizer) for p in parts[:1]] + parts[1:], CONFIG)


def test_async_push_drops_stale_and_applies_after_k_nets() -> None:
    cfg = CONFIG.override(iterations=2, max_staleness=1)
    ps = server(config=cfg)
    assert ps.push(grad(0, 2, step=0)) is False and ps.step == 0  # 2 of K = 4 nets pending
    assert ps.push(grad(1, 2, step=0)) is False and ps.step == 1  # K reached: update 1
    assert ps.push(grad(2, 2, step=5)) is False and ps.dropped == 1  # from the future (after a rollback)
    ps.push(grad(3, 2, step=0))  # staleness 1: accepted
    ps.push(grad(4, 2, step=1))
    assert ps.done and ps.step == 2
    stats = ps.drain()
    assert [s.step for s in stats] == [1, 2]
    assert (stats[1].staleness_max, stats[1].staleness_mean, stats[1].dropped) == (1.0, 0.5, 1.0)
    assert {"staleness_max", "staleness_mean", "dropped", "lr_mean"} <= set(stats[1].metrics())
    assert ps.push(grad(5, 2, step=2)) is True and ps.step == 2  # complete: ignored
    assert ps.drain() == []


def test_async_max_staleness_zero_accepts_only_current_version() -> None:
    ps = server(config=CONFIG.override(max_staleness=0))
    ps.push(grad(0, 4, step=0))
    ps.push(grad(1, 4, step=0))  # one version old → dropped
    assert ps.step == 1 and ps.dropped == 1


def test_apply_beyond_iterations_is_refused() -> None:
    ps = server(step=10)
    with pytest.raises(RuntimeError, match="already has its 10 meta-steps"):
        ps.apply([grad(0, 4, step=10)])
