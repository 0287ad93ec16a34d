"""bench/gpu_cifar10.py without a GPU: it refuses in one line; its CPU smoke run goes through the same logic —
each row stops at the first checkpoint past its share of the budget, is evaluated there and says how far it got."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import gpu_cifar10  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_refuses_at_once_without_a_gpu(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_cifar10.py"), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("gpu_cifar10: ") and not (tmp_path / "out").exists()


def test_the_rows_are_the_papers_settings() -> None:
    from ddray.config import load_config

    dm = gpu_cifar10.config_for(gpu_cifar10.ROWS[1], "/data", Path("/o"), {})
    assert (dm.distill.method, dm.distill.ipc, dm.distill.iterations, dm.model.width) == ("dm", 10, 20000, 128)
    assert dm.data.dataset == "imagefolder" and dm.run.eval_epochs == 1000 and dm.run.eval_nets == 20
    dd = gpu_cifar10.config_for(gpu_cifar10.ROWS[3], "/data", Path("/o"), {})
    assert (dd.distill.init, dd.model.model, dd.distill.iterations, dd.protocol) == ("fixed", "alexcifarnet", 8000, "dc")
    assert load_config(gpu_cifar10.PAPER / "dc_ipc1.yaml").distill.iterations == 1000
    assert sum(r.share for r in gpu_cifar10.ROWS) == pytest.approx(1.0)


@pytest.mark.slow  # four tiny runs, ~40 s
def test_the_cpu_smoke_run_stops_at_the_budget_and_evaluates(tmp_path: Path) -> None:
    g = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 2)):
        for c in range(10):
            (tmp_path / "tree" / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(g.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                    tmp_path / "tree" / split / f"c{c}" / f"{i}.png")
    out = tmp_path / "out"
    rc = gpu_cifar10.main(["--cpu-smoke", "--data-root", str(tmp_path / "tree"), "--out", str(out), "--budget-s",
                           "4", "--rows", "dm-10", "dd-fixed"])
    assert rc == 0
    rows = json.loads((out / "gpu_cifar10.json").read_text())["rows"]
    assert set(rows) == {"dm-10", "dd-fixed"}
    for res in rows.values():
        assert 0 < res["iterations"] < res["paper_iterations"] and not res["reached_paper"]
        assert res["iterations"] % 2 == 0  # a checkpoint (every 2 in the smoke run) it was evaluated at
        assert res["n"] == 1
    md = (out / "gpu_cifar10.md").read_text()
    assert md.startswith("# CIFAR-10 at the papers' budgets") and "| dm-10 |" in md and "(20,000)" in md
