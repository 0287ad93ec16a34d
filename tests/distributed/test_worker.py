"""Workers without Ray: chunks of a meta-step, summed in order, equal the single-process step bitwise;
a chunk is the same on any worker; the async loop runs to completion; evaluation chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddray.core.net_chunks import assign, net_chunks, step_gradient
from ddray.distributed.messages import Version, slice_state
from ddray.distributed.param_server import ParamServer
from ddray.distributed.shards import shard_layout
from ddray.distributed.worker import MetaGradWorker, SimulatedWorker, async_loop, describe_device
from ddray.evaluation.held_out import eval_job, evaluate_distilled
from ddray.inputs.problem import build_problem
from ddray.run.state import RunState

from dist_support import tiny


@pytest.fixture(scope="module")
def setup() -> tuple:
    torch.set_num_threads(1)
    cfg = tiny(None, nets=4, workers="1:3")
    problem = build_problem(cfg)
    layout = shard_layout(problem.data.num_classes, cfg.distill.ipc, 2)
    state = RunState.initial(problem)
    worker = MetaGradWorker(cfg, index=0, threads=1, layout=layout)
    versions = [Version(0, slice_state(state, s).images.numpy(), state.raw_lrs.numpy() if s.owns_lrs else None)
                for s in layout]
    return cfg, problem, layout, state, worker, versions


def test_chunks_depend_on_the_config_only() -> None:
    assert net_chunks(5, 2) == [[0, 1, 2], [3, 4]]
    assert net_chunks(4, 3) == [[0, 1], [2], [3]]
    assert net_chunks(2, 3) == [[0], [1]]  # never an empty chunk
    assert net_chunks(4, 1) == [[0, 1, 2, 3]]  # one worker: one batched call, as before
    assert assign(3, [0, 2, 5]) == {0: [0], 2: [1], 5: [2]}
    assert assign(3, [4]) == {4: [0, 1, 2]}
    assert assign(2, [0, 1, 2]) == {0: [0], 1: [1]}  # more workers than chunks: one idles


def test_any_split_of_the_chunks_sums_bitwise_to_the_single_process_step(setup: tuple) -> None:
    """However the chunks are spread over workers, the chunk-ordered sum is the --local step's gradient."""
    cfg, problem, layout, state, worker, versions = setup
    chunks = net_chunks(cfg.distill.nets, cfg.cluster.max_workers)
    whole = step_gradient(problem.objective(), state.images, state.raw_lrs, 3, chunks, cfg.run.seed)
    versions3 = [Version(3, v.images, v.raw_lrs) for v in versions]
    for alive in ([0], [0, 1], [0, 1, 2]):
        shares = [g for w, cs in assign(len(chunks), alive).items()
                  for g in zip(*worker.compute(3, [(c, chunks[c]) for c in cs], versions3))]
        ordered = sorted(shares, key=lambda pair: pair[0].chunk)
        img = np.concatenate([sum_in_order([p[j].images for p in ordered]) for j in range(len(layout))], axis=1)
        raw = sum_in_order([p[0].raw_lrs for p in ordered])
        assert np.array_equal(img, whole.images.numpy()) and np.array_equal(raw, whole.raw_lrs.numpy())
        assert sum(p[0].nets for p in ordered) == 4 and ordered[0][1].raw_lrs is None


def sum_in_order(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.array(arrays[0], copy=True)
    for a in arrays[1:]:
        np.add(out, a, out=out)
    return out


def test_a_chunk_is_the_same_on_any_worker(setup: tuple) -> None:
    """Randomness is keyed by (seed, step, net, chunk), not by worker: a recomputed chunk equals the lost one."""
    cfg, _, layout, _, worker, versions = setup
    other = MetaGradWorker(cfg, index=1, threads=1, layout=layout)
    versions2 = [Version(2, v.images, v.raw_lrs) for v in versions]
    a, b = worker.compute(2, [(1, [2])], versions2), other.compute(2, [(1, [2])], versions2)
    assert all(np.array_equal(x[0].images, y[0].images) for x, y in zip(a, b))
    with pytest.raises(RuntimeError, match="meta-step 5 was given versions"):
        worker.compute(5, [(0, [0])], versions2)


def test_evaluation_chunks_on_a_worker_equal_the_local_evaluation(setup: tuple) -> None:
    cfg, problem, layout, state, worker, versions = setup
    from ddray.inputs.problem import to_distilled
    from ddray.run.lifecycle import synthetic

    d = to_distilled(problem, synthetic(problem, state), 0)
    local = evaluate_distilled(problem, d, 5)
    remote = evaluate_distilled(problem, d, 5, predictor=lambda job, chunks: [
        torch.from_numpy(worker.predict(job, ids, versions)) for ids in reversed(chunks)][::-1])
    assert local == remote and local.n == 5
    assert eval_job(problem, 5, shuffled=True).shuffled


def test_simulated_worker_shapes_follow_the_versions() -> None:
    w = SimulatedWorker()
    versions = [Version(4, np.zeros((3, 5, 1, 28, 28), np.float32), np.zeros(9, np.float32)),
                Version(4, np.zeros((3, 5, 1, 28, 28), np.float32), None)]
    grads = w.compute(4, [(0, [0, 1, 2])], versions)
    assert grads[0][0].nets == 3 and grads[0][0].images.shape == (3, 5, 1, 28, 28)
    assert grads[0][0].raw_lrs.shape == (9,) and grads[1][0].raw_lrs is None and grads[1][0].step == 4
    assert w.compute(4, [(0, [0])], versions)[0][0].images is grads[0][0].images  # precomputed once


def test_async_loop_runs_the_servers_to_completion(setup: tuple) -> None:
    """Two interleaved workers against in-process servers: exactly `iterations` updates."""
    cfg, _, layout, state, worker, _ = setup
    c = cfg.override(nets=2, iterations=3, max_staleness=1)
    servers = [ParamServer(slice_state(state, s), s, c) for s in layout]

    def pull() -> list | None:
        if all(p.done for p in servers):
            return None
        return [Version(v.step, v.images.copy(), None if v.raw_lrs is None else v.raw_lrs.copy())
                for v in (p.version() for p in servers)]

    def push(grads: list) -> bool:
        return all([p.push(g[0]) for p, g in zip(servers, grads)])

    pushes = async_loop(worker, index=0, slots=2, nets=2, pull=pull, push=push)
    assert pushes == 6 and all(p.step == 3 for p in servers)  # a share is 1 of K = 2 nets: 2 pushes/update
    assert pull() is None


def test_a_worker_on_the_cpu_says_so() -> None:
    assert describe_device(None) == describe_device("cpu") == describe_device(torch.device("cpu")) == "cpu"
