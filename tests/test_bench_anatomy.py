"""bench/bench_anatomy.py's own logic: its parts account for the whole meta-step, and both meta-steps do the
same arithmetic (the claim bench/RESULTS.md rests on)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_anatomy",
                                               Path(__file__).resolve().parents[1] / "bench" / "bench_anatomy.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def figures() -> dict[str, dict[str, float]]:
    return bench.parts(reps=1)


def test_ddrays_three_parts_add_up_to_its_meta_step(figures: dict[str, dict[str, float]]) -> None:
    parts = sum(figures[f"ddray: {p}"]["gflop"] for p in ("unroll", "real batch", "VJP"))
    assert parts == pytest.approx(figures["ddray: whole meta-step"]["gflop"], rel=1e-3)
    assert all(figures[f"ddray: {p}"]["gflop"] > 0 for p in ("unroll", "real batch", "VJP"))


def test_ddray_and_the_naive_unroll_do_the_same_arithmetic(figures: dict[str, dict[str, float]]) -> None:
    assert figures["ddray: whole meta-step"]["gflop"] == pytest.approx(figures["naive: whole meta-step"]["gflop"],
                                                                      rel=1e-3)
    assert figures["ddray: unroll"]["gflop"] == pytest.approx(figures["naive: unroll"]["gflop"], rel=1e-3)


def test_the_table_has_a_row_per_part_with_its_rate(figures: dict[str, dict[str, float]]) -> None:
    rows = bench.table(figures).splitlines()[2:]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == bench.ORDER
    whole = figures["ddray: whole meta-step"]
    assert rows[3].endswith(f"| {whole['gflop'] / whole['ms'] * 1000:.0f} |")
