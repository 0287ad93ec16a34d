"""DD's meta-step captured whole as CUDA graphs (ddray/core/capture.py).

Here (CPU): the function a graph captures equals the eager meta-gradient and, on the ``meta``
device, reads nothing back to the host; a CPU objective never
captures; and the bookkeeping around capture — static buffers refilled on every call, outputs
handed out as copies, one graph per shape, the least recently used dropped, a graph that
disagrees with eager refused, a failed capture falling back with one warning. For that
bookkeeping ``record`` (the one CUDA-only function: side-stream warm-up, ``torch.cuda.graph``,
replay) is replaced by a CPU stand-in with a graph's semantics: a replay reads the static inputs
and writes the same output tensors. That stand-in exists because a CUDA graph cannot run on this
machine; the tests marked ``cuda`` run the real one (``make gpu-check``).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch.overrides import TorchFunctionMode

import ddray.core.capture as capture
from ddray.core.capture import MAX_GRAPHS, MetaStepGraphs, shape_key, static_meta_gradient
from ddray.core.dd_objective import DDObjective
from ddray.core.inits import RandomInit
from ddray.core.models import LeNet
from ddray.core.unroll import meta_gradient

from test_unroll import Tiny, _problem


class HostData(TorchFunctionMode):
    """Records the calls that make a tensor from host data (``torch.tensor([...], device=...)`` and
    kin): on a GPU each is a host-to-device copy, which a CUDA graph cannot capture. The ``meta``
    device lets them through, so the capture tests run under this too."""

    MAKERS = {"tensor", "as_tensor", "new_tensor", "from_numpy", "asarray"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if getattr(func, "__name__", "") in self.MAKERS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_host_data_sees_a_tensor_made_from_a_list() -> None:
    with HostData() as seen:  # the control for every test that asserts it saw nothing
        torch.tensor([1.0, 2.0], device="meta")
        torch.zeros(2, device="meta").new_tensor([3.0])
    assert seen.calls == ["tensor", "new_tensor"]


def _learned(labels: torch.Tensor, classes: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randn(len(labels), classes, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("memory", ["full", "recompute"])
@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_the_captured_function_equals_the_eager_meta_gradient(memory: str, learned: bool, k: int) -> None:
    model, params0, images, labels, raw, x_real, y_real = _problem(k)
    if learned:
        labels = _learned(labels)
    want = meta_gradient(model, params0, images, labels, raw, x_real, y_real, memory)
    g_img, g_raw, g_lab, loss = static_meta_gradient(model, params0, images, labels, raw, x_real, y_real, memory)
    assert isinstance(loss, torch.Tensor)  # nothing read back to the host inside a graph
    torch.testing.assert_close(g_img, want.images, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_raw, want.raw_lrs, rtol=1e-12, atol=1e-14)
    assert float(loss) == pytest.approx(want.loss, rel=1e-12)
    if learned:
        torch.testing.assert_close(g_lab, want.labels, rtol=1e-12, atol=1e-14)
    else:
        assert g_lab is None and want.labels is None


@pytest.mark.parametrize("memory", ["full", "recompute"])
@pytest.mark.parametrize("learned", [False, True])
def test_the_captured_function_reads_nothing_back_to_the_host(memory: str, learned: bool) -> None:
    """On PyTorch's ``meta`` device tensors have shapes and no values, so any host read-back
    (``.item()``, ``float(t)``, a branch on a tensor, a data-dependent shape) raises: what runs there
    through to its outputs has nothing that breaks CUDA-graph capture; nor does it make a tensor from
    host data (:class:`HostData`). LeNet at the default shapes, K = 2, 10 images per step, 30 inner
    steps, a real batch of 256."""
    with pytest.raises(RuntimeError):  # the control: a read-back does fail there
        torch.zeros((), device="meta").item()
    meta = torch.device("meta")
    model = LeNet(1, 28, 10).to(meta)
    params0 = {n: torch.empty(2, *p.shape, device=meta) for n, p in model.named_parameters()}
    images = torch.empty(10, 10, 1, 28, 28, device=meta)
    labels = torch.empty(10, 10, device=meta) if learned else torch.arange(10, device=meta)
    raw, x_real, y_real = (torch.empty(30, device=meta), torch.empty(256, 1, 28, 28, device=meta),
                           torch.empty(256, dtype=torch.long, device=meta))
    with HostData() as seen:
        g_img, g_raw, g_lab, loss = static_meta_gradient(model, params0, images, labels, raw, x_real, y_real,
                                                         memory)
    assert not seen.calls
    assert g_img.shape == images.shape and g_raw.shape == raw.shape and loss.shape == ()
    assert (g_lab is not None and g_lab.shape == labels.shape) if learned else g_lab is None


def test_a_cpu_objective_never_captures() -> None:
    model = LeNet(1, 28, 10)
    sampler = RandomInit(model, "xavier", 0)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(10, (64,))
    objective = DDObjective(model, sampler, x, y, torch.arange(10), 32, 0).to(torch.device("cpu"))
    assert objective.cuda_graphs and objective.graphs is None


def test_on_cpu_the_graphs_refuse_and_say_why(caplog: pytest.LogCaptureFixture) -> None:
    model, params0, images, labels, raw, x_real, y_real = _problem(2)
    graphs = MetaStepGraphs(model)
    with caplog.at_level(logging.INFO, logger="ddray.core.capture"):
        assert graphs(params0, images, labels, raw, x_real, y_real) is None
    assert "need a CUDA device, not cpu" in caplog.text
    assert list(graphs.refused.values()) == ["CUDA graphs need a CUDA device, not cpu"]


def test_the_shape_key_follows_k_the_chunk_and_the_dtype() -> None:
    model, params0, images, labels, raw, x_real, y_real = _problem(3)
    inputs = {"params0": params0, "images": images, "labels": labels, "raw_lrs": raw, "x_real": x_real,
              "y_real": y_real}
    same = dict(inputs, images=images.clone() + 1)
    fewer = dict(inputs, params0={n: v[:2] for n, v in params0.items()})
    single = dict(inputs, images=images.float())
    assert shape_key(same, "full") == shape_key(inputs, "full")
    assert len({shape_key(i, "full") for i in (inputs, fewer, single)} | {shape_key(inputs, "recompute")}) == 4


class StandIn:
    """A CUDA graph's semantics on CPU: ``replay`` runs the recorded function on the static inputs it
    closed over and writes the results into the very output tensors the capture returned."""

    captures = 0
    pools: list = []  # the pool each capture was given

    def __init__(self, run, outputs: tuple) -> None:
        self.run, self.outputs = run, outputs

    def pool(self) -> tuple:
        return ("pool of", id(self))

    def replay(self) -> None:
        for out, new in zip(self.outputs, self.run()):
            if out is not None:
                out.copy_(new)


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> type[StandIn]:
    def record(run, pool=None):
        StandIn.captures += 1
        StandIn.pools.append(pool)
        expected = tuple(None if t is None else t.clone() for t in run())
        outputs = run()
        return StandIn(run, outputs), outputs, expected

    StandIn.captures, StandIn.pools = 0, []
    monkeypatch.setattr(capture, "record", record)
    monkeypatch.setattr(capture, "capture_unavailable", lambda device: None)
    return StandIn


def test_every_call_reads_its_own_inputs_and_gets_its_own_outputs(stand_in: type[StandIn]) -> None:
    model, params0, images, labels, raw, x_real, y_real = _problem(2)
    graphs = MetaStepGraphs(model)
    first = graphs(params0, images, labels, raw, x_real, y_real)
    images2, raw2 = images * 0.5, raw + 0.1
    second = graphs(params0, images2, labels, raw2, x_real, y_real)
    assert stand_in.captures == 1  # the same shape: replayed, not captured again
    for got, args in ((first, (images, raw)), (second, (images2, raw2))):
        want = meta_gradient(model, params0, args[0], labels, args[1], x_real, y_real)
        torch.testing.assert_close(got.images, want.images, rtol=1e-12, atol=1e-14)  # first kept its values
        torch.testing.assert_close(got.raw_lrs, want.raw_lrs, rtol=1e-12, atol=1e-14)
        assert got.loss == pytest.approx(want.loss, rel=1e-12) and got.nets == 2


def test_a_new_k_is_captured_and_the_oldest_shape_dropped(stand_in: type[StandIn]) -> None:
    model, params0, images, labels, raw, x_real, y_real = _problem(MAX_GRAPHS + 1)
    graphs = MetaStepGraphs(model)
    for k in range(1, MAX_GRAPHS + 2):  # K = 1 … MAX+1: workers joining, smaller last chunks
        part = {n: v[:k] for n, v in params0.items()}
        got = graphs(part, images, labels, raw, x_real, y_real)
        assert got is not None and got.nets == k
    assert stand_in.captures == MAX_GRAPHS + 1 and len(graphs.graphs) == MAX_GRAPHS
    one = {n: v[:1] for n, v in params0.items()}
    graphs(one, images, labels, raw, x_real, y_real)  # K = 1 was dropped: captured again
    assert stand_in.captures == MAX_GRAPHS + 2
    # the first capture made a pool; every later one went into it, the first graph evicted or not
    assert stand_in.pools[0] is None and graphs.calls.pool is not None
    assert set(stand_in.pools[1:]) == {graphs.calls.pool}


def test_a_graph_that_disagrees_with_eager_is_never_used(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    def record(run, pool=None):
        expected = tuple(None if t is None else t.clone() for t in run())
        outputs = tuple(None if t is None else t + 1 for t in run())  # a broken capture
        return object(), outputs, expected

    monkeypatch.setattr(capture, "record", record)
    monkeypatch.setattr(capture, "capture_unavailable", lambda device: None)
    model, params0, images, labels, raw, x_real, y_real = _problem(2)
    graphs = MetaStepGraphs(model)
    with caplog.at_level(logging.INFO, logger="ddray.core.capture"):
        assert graphs(params0, images, labels, raw, x_real, y_real) is None
        assert graphs(params0, images, labels, raw, x_real, y_real) is None  # refused once, not retried
    assert caplog.text.count("a replay disagreed with the eager run") == 1 and not graphs.graphs


def test_a_failed_capture_falls_back_to_eager_in_the_objective(monkeypatch: pytest.MonkeyPatch) -> None:
    def record(run, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(capture, "record", record)
    monkeypatch.setattr(capture, "capture_unavailable", lambda device: None)
    model = Tiny().double()
    sampler = RandomInit(model, "xavier", 0)
    x, y = torch.randn(16, 1, 6, 6, dtype=torch.float64), torch.randint(3, (16,))
    labels = torch.arange(3).repeat(2)
    objective = DDObjective(model, sampler, x, y, labels, 8, 0)
    eager = DDObjective(model, sampler, x, y, labels, 8, 0, cuda_graphs=False)
    objective.graphs = MetaStepGraphs(model)  # what to(cuda) makes
    images, raw = torch.randn(2, 6, 1, 6, 6, dtype=torch.float64), torch.full((4,), -1.0, dtype=torch.float64)
    got, want = objective(images, raw, 0, [0, 1]), eager(images, raw, 0, [0, 1])
    assert torch.equal(got.images, want.images) and torch.equal(got.raw_lrs, want.raw_lrs)
    assert "capture failed: RuntimeError: operation not permitted when stream is capturing" in \
        next(iter(objective.graphs.refused.values()))


# ----------------------------------------------------------------------------- on a GPU


def _cuda(k: int, learned: bool = False, dtype: torch.dtype = torch.float32):
    model, params0, images, labels, raw, x_real, y_real = _problem(k, dtype=dtype)
    if learned:
        labels = _learned(labels).to(dtype)
    dev = torch.device("cuda")
    return (model.to(dev), {n: v.to(dev) for n, v in params0.items()}, images.to(dev), labels.to(dev), raw.to(dev),
            x_real.to(dev), y_real.to(dev))


@pytest.mark.cuda
@pytest.mark.parametrize("memory", ["full", "recompute"])
@pytest.mark.parametrize("learned", [False, True])
def test_cuda_replays_equal_eager(memory: str, learned: bool) -> None:
    model, params0, images, labels, raw, x_real, y_real = _cuda(3, learned, torch.float64)
    graphs = MetaStepGraphs(model, memory)
    for scale in (1.0, 0.5):  # the capture's own inputs, then new ones through the same graph
        got = graphs(params0, images * scale, labels, raw, x_real, y_real)
        want = meta_gradient(model, params0, images * scale, labels, raw, x_real, y_real, memory)
        assert got is not None, graphs.refused
        torch.testing.assert_close(got.images, want.images, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got.raw_lrs, want.raw_lrs, rtol=1e-9, atol=1e-12)
        if learned:
            torch.testing.assert_close(got.labels, want.labels, rtol=1e-9, atol=1e-12)
    assert len(graphs.graphs) == 1


@pytest.mark.cuda
def test_cuda_k_changes_capture_again_and_lenet_agrees_in_float32() -> None:
    dev = torch.device("cuda")
    model = LeNet(1, 28, 10).to(dev)
    sampler = RandomInit(LeNet(1, 28, 10), "xavier", 0)
    x = torch.randn(256, 1, 28, 28, device=dev)
    y = torch.randint(10, (256,), device=dev)
    images, raw = torch.randn(10, 10, 1, 28, 28, device=dev), torch.full((30,), -2.0, device=dev)
    labels = torch.arange(10, device=dev)
    graphs = MetaStepGraphs(model)
    for k in (4, 3, 4, 3):  # two graphs in one memory pool, replayed in turn
        params0 = {n: v.to(dev) for n, v in sampler.sample([(0, 0, i) for i in range(k)]).items()}
        got = graphs(params0, images, labels, raw, x, y)
        want = meta_gradient(model, params0, images, labels, raw, x, y)
        assert got is not None, graphs.refused
        torch.testing.assert_close(got.images, want.images, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(got.raw_lrs, want.raw_lrs, rtol=1e-3, atol=1e-5)
    assert len(graphs.graphs) == 2 and {g.graph.pool() for g in graphs.graphs.values()} == {graphs.calls.pool}


@pytest.mark.cuda
def test_cuda_objective_replays_and_equals_the_eager_objective() -> None:
    model = LeNet(1, 28, 10)
    sampler = RandomInit(model, "xavier", 0)
    x, y = torch.randn(512, 1, 28, 28), torch.randint(10, (512,))
    dev = torch.device("cuda")
    captured = DDObjective(model, sampler, x, y, torch.arange(10), 256, 0).to(dev)
    eager = DDObjective(LeNet(1, 28, 10), sampler, x, y, torch.arange(10), 256, 0, cuda_graphs=False).to(dev)
    images, raw = torch.randn(10, 10, 1, 28, 28, device=dev), torch.full((30,), -2.0, device=dev)
    for step in range(3):
        got, want = captured(images, raw, step, [0, 1]), eager(images, raw, step, [0, 1])
        torch.testing.assert_close(got.images, want.images, rtol=1e-3, atol=1e-5)
    assert captured.graphs is not None and len(captured.graphs.graphs) == 1 and not captured.graphs.refused

