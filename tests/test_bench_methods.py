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
