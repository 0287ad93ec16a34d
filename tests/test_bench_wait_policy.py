"""bench/bench_wait_policy.py's own logic: the rows it compares and the environment each row starts with."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ddray.threads import BOUNDED_SPIN

_spec = importlib.util.spec_from_file_location("bench_wait_policy",
                                               Path(__file__).resolve().parents[1] / "bench" / "bench_wait_policy.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # type: ignore[union-attr]


def test_the_rows_cover_sleeping_spinning_and_ddrays_own_choice() -> None:
    rows = bench.policies([30000])
    assert rows["passive"] == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
    assert rows["spin 30000"] == BOUNDED_SPIN  # the row that measures what ddray chooses on a spare machine
    assert rows["default"] == {} and rows["active"] == {"OMP_WAIT_POLICY": "ACTIVE"} and rows["ddray"] is None


def test_a_row_starts_without_the_wait_variables_of_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    env = bench.env_for({"GOMP_SPINCOUNT": "30000"})
    assert env["GOMP_SPINCOUNT"] == "30000" and "OMP_WAIT_POLICY" not in env
    assert not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"} & set(bench.env_for(None))
