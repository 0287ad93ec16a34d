"""Workers without Ray: shares of a meta-step sum to the whole, the async loop runs to completion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddray.distributed.param_server import ParamServer, initial_state, slice_state
from ddray.distributed.shards import shard_layout
from ddray.distributed.worker import MetaGradWorker, SimulatedWorker, async_loop, split_nets
from ddray.problem import build_problem

from dist_support import tiny


@pytest.fixture(scope="module")
def setup() -> tuple:
    cfg = tiny(None, nets=4)
    problem = build_problem(cfg)
    layout = shard_layout(problem.data.num_classes, cfg.distill.ipc, 2)
    state = initial_state(problem)
    worker = MetaGradWorker(cfg.to_dict(), index=0, threads=1, layout=layout)
    versions = [{"step": 0, "images": slice_state(state, s)["images"].numpy(),
                 "raw_lrs": state["raw_lrs"].numpy() if s.owns_lrs else None} for s in layout]
    return cfg, problem, layout, state, worker, versions


def test_split_nets_contiguous_shares() -> None:
    assert split_nets(5, 2) == [[0, 1, 2], [3, 4]]
    assert split_nets(2, 3) == [[0], [1], []]


def test_shares_sum_to_the_whole_meta_step(setup: tuple) -> None:
    cfg, problem, layout, state, worker, versions = setup
    torch.set_num_threads(1)
    whole = problem.objective()(state["images"], state["raw_lrs"], 3, [0, 1, 2, 3])
    parts = [worker.compute(3, nets, versions)[1] for nets in split_nets(4, 2)]
    g_img = np.concatenate([sum(p[j]["images"] for p in parts) for j in range(len(layout))], axis=1)
    g_raw = sum(p[0]["raw_lrs"] for p in parts)
    torch.testing.assert_close(torch.from_numpy(g_img), whole.images, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(g_raw), whole.raw_lrs, rtol=1e-5, atol=1e-6)
    assert parts[1][1]["raw_lrs"] is None and parts[0][0]["nets"] == 2


def test_a_share_is_the_same_on_any_worker(setup: tuple) -> None:
    """Randomness is keyed by (seed, step, net), not by worker: a recomputed share equals the lost one."""
    cfg, _, layout, _, worker, versions = setup
    other = MetaGradWorker(cfg.to_dict(), index=1, threads=1, layout=layout)
    a, b = worker.compute(2, [1, 3], versions)[1], other.compute(2, [1, 3], versions)[1]
    assert all(np.array_equal(x["images"], y["images"]) for x, y in zip(a, b))


def test_simulated_worker_shapes_follow_the_versions() -> None:
    w = SimulatedWorker()
    versions = [{"step": 4, "images": np.zeros((3, 5, 1, 28, 28), np.float32), "raw_lrs": np.zeros(9, np.float32)},
                {"step": 4, "images": np.zeros((3, 5, 1, 28, 28), np.float32), "raw_lrs": None}]
    meta, grads = w.compute(0, [0, 1, 2], versions)
    assert meta["nets"] == 3 and grads[0]["images"].shape == (3, 5, 1, 28, 28)
    assert grads[0]["raw_lrs"].shape == (9,) and grads[1]["raw_lrs"] is None and grads[1]["version"] == 4
    assert w.compute(1, [0], versions)[1][0]["images"] is grads[0]["images"]  # precomputed once


def test_async_loop_runs_the_servers_to_completion(setup: tuple) -> None:
    """Two interleaved workers against in-process servers: exactly `iterations` updates."""
    cfg, _, layout, state, worker, _ = setup
    servers = [ParamServer(slice_state(state, s), s, lr=0.01, lr_decay=0.5, lr_decay_every=100, epochs=1,
                           nets=2, iterations=3, max_staleness=1) for s in layout]

    def pull() -> list | None:
        if all(p.done for p in servers):
            return None
        return [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in p.version().items()}
                for p in servers]

    def push(grads: list) -> bool:
        return all([p.push(g) for p, g in zip(servers, grads)])

    pushes = async_loop(worker, index=0, workers=2, nets=2, pull=pull, push=push)
    assert pushes == 6 and all(p.step == 3 for p in servers)  # a share is 1 of K = 2 nets: 2 pushes/update
    assert pull() is None
