"""bench/bench_methods.py's plain DM and MTT loops compute the same iteration as ddray's objectives (float64),
so the benchmark compares two ways of doing the same work."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("bench_methods",
                                               Path(__file__).resolve().parents[1] / "bench" / "bench_methods.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # its dataclass looks its module up
_spec.loader.exec_module(bench)  # type: ignore[union-attr]

SMALL = bench.Sizes(ipc=2, width=8, real_per_class=5, syn_steps=3)


@pytest.mark.parametrize("method", ["dm", "mtt"])
def test_the_plain_loop_gives_ddrays_gradient(method: str) -> None:
    rows = bench.METHODS[method](SMALL, torch.device("cpu"), torch.float64)
    for step in (0, 1):  # other networks, real images, augmentations and expert segments
        (img, lr), (img_plain, lr_plain) = rows["ddray"](step), rows["plain"](step)
        assert img.abs().max() > 0
        torch.testing.assert_close(img, img_plain, rtol=1e-10, atol=1e-13)
        if method == "mtt":
            torch.testing.assert_close(lr, lr_plain, rtol=1e-10, atol=1e-13)
        else:
            assert lr is None and lr_plain is None


def test_the_timing_and_the_table() -> None:
    rows = {"ddray": lambda step: None, "plain": lambda step: None}
    figures = {"dm": bench.time_rows(rows, torch.device("cpu"), reps=2)}
    assert set(figures["dm"]) == {"ddray", "plain"} and all(v >= 0 for v in figures["dm"].values())
    figures = {"dm": {"ddray": 30.0, "plain": 60.0}, "mtt": {"ddray": 90.0, "plain": 45.0}}
    assert bench.table(figures).splitlines()[2:] == ["| dm | 30.0 | 60.0 | 0.50× |", "| mtt | 90.0 | 45.0 | 2.00× |"]
    figures["dm"]["ddray, no graphs"] = 45.0  # on a GPU, DM's iteration without CUDA graphs beside the replayed one
    assert bench.table(figures).splitlines()[2:4] == ["| dm | 30.0 | 60.0 | 0.50× |",
                                                      "| dm (ddray, no graphs) | 45.0 | 60.0 | 0.75× |"]


def test_launches_counts_what_the_host_dispatched() -> None:
    """One iteration under the profiler: on the CPU the top-level operator calls (no GPU figures); a row that
    dispatches more operators counts more."""
    x = torch.randn(8, 8)

    def few(step: int) -> None:
        torch.mm(x, x)

    def more(step: int) -> None:
        for _ in range(5):
            torch.mm(x, x).relu()

    a, b = bench.launches(few, 0, torch.device("cpu")), bench.launches(more, 0, torch.device("cpu"))
    assert set(a) == {"calls"} and 1 <= a["calls"] < b["calls"] and b["calls"] >= 10
    rows = bench.METHODS["dm"](SMALL, torch.device("cpu"))
    plain, ddray = (bench.launches(rows[r], 0, torch.device("cpu"))["calls"] for r in ("plain", "ddray"))
    # 50 real images make one chunk: DM's loop runs two forwards per class, ddray one over all classes (at
    # CIFAR-10's 2,560 real images ddray cuts them into cache-sized chunks on the CPU, and dispatches more)
    assert plain > ddray > 0


def test_the_table_of_launches() -> None:
    figures = {"dm": {"ddray": 30.0, "plain": 60.0}}
    counts = {"dm": {"ddray": {"calls": 840.0, "kernels": 1200.0, "busy ms": 4.25}, "plain": {"calls": 1250.0}}}
    assert bench.table(figures, counts).splitlines()[-2:] == ["| dm, ddray | 30.0 | 840 | 1200 | 4.2 |",
                                                              "| dm, plain | 60.0 | 1250 | – | – |"]
