"""Commands whose jobs run on Ray workers (`--workers N`): evaluation, experts, pretraining, baselines.
Each gives exactly what the same command gives in one process, and stays resumable. While a command runs
on the workers, every network's forward raises in this process: the jobs cannot have run here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dist_support import no_forward_here, tiny

from ddray.cli import main
from ddray.run.loop import distill

COMMON = ["--no-tracking", "--no-progress"]
POOL = ["--workers", "2", "--cpus-per-worker", "1"]


@pytest.fixture(scope="module")
def distilled(ray_local: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("set") / "run"
    distill(tiny(out, iterations=2), progress=False)
    return out


def test_evaluate_on_workers_equals_evaluate_here(distilled: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Two chunks of 3 networks on two workers = the same two chunks trained here, with one thread each."""
    from ddray.evaluation.held_out import evaluate_distilled, problem_for
    from ddray.store.artifact import read_distilled

    d = read_distilled(distilled)
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as a 1-CPU worker
    try:
        here = evaluate_distilled(problem_for(d), d, 6, workers=2)
    finally:
        torch.set_num_threads(n)
    no_forward_here(monkeypatch)
    assert main(["evaluate", str(distilled), "--nets", "6", *POOL, "--json", "--no-tracking"]) == 0
    remote = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (remote["mean"], remote["std"], remote["n"]) == (here.mean, here.std, 6)


def test_experts_in_parallel_equal_the_sequential_ones_and_resume(ray_local: Any, tmp_path: Path, one_thread: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The experts trained here with one torch thread, as on a 1-CPU worker."""
    flags = ["--model", "convnet", "--width", "8", "--num-experts", "3", "--train-epochs", "1", "--no-dsa",
             "--dataset", "digits", *COMMON]
    assert main(["experts", *flags, "--out", str(tmp_path / "here")]) == 0
    no_forward_here(monkeypatch)
    assert main(["experts", *flags, "--num-experts", "2", "--out", str(tmp_path / "ray"), *POOL]) == 0
    first = (tmp_path / "ray" / "expert-00000.safetensors").stat().st_mtime_ns
    assert main(["experts", *flags, "--out", str(tmp_path / "ray"), *POOL]) == 0  # resumes: trains expert 2 only
    assert (tmp_path / "ray" / "expert-00000.safetensors").stat().st_mtime_ns == first
    for i in range(3):
        a = load_file(str(tmp_path / "here" / f"expert-{i:05d}.safetensors"))
        b = load_file(str(tmp_path / "ray" / f"expert-{i:05d}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "ray" / "experts.json").read_text())
    assert len(meta["files"]) == 3 and meta["test_acc"] == json.loads((tmp_path / "here" / "experts.json")
                                                                      .read_text())["test_acc"]


def test_pretrain_in_parallel_equals_the_sequential_pool(ray_local: Any, tmp_path: Path, one_thread: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool trained here with one torch thread, as on a 1-CPU worker."""
    flags = ["--dataset", "digits", "--image-size", "28", "--nets", "3", "--epochs", "1", *COMMON]
    assert main(["pretrain", *flags, "--out", str(tmp_path / "here")]) == 0
    no_forward_here(monkeypatch, inference=True)  # the networks train on the workers; their test accuracy is here
    assert main(["pretrain", *flags, "--out", str(tmp_path / "ray"), *POOL]) == 0
    for i in range(3):
        a = load_file(str(tmp_path / "here" / f"net-{i:03d}.safetensors"))
        b = load_file(str(tmp_path / "ray" / f"net-{i:03d}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_baseline_on_a_worker_equals_the_one_made_here(distilled: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    flags = ["--dataset", "mnist5k", "--steps", "2", "--epochs", "1", "--eval-nets", "2", "--method", "average",
             "--no-tracking"]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["baseline", *flags, "--out", str(tmp_path / "here")]) == 0
    finally:
        torch.set_num_threads(n)
    here = capsys.readouterr().out.splitlines()[0]
    no_forward_here(monkeypatch)
    assert main(["baseline", *flags, "--out", str(tmp_path / "ray"), *POOL]) == 0
    assert capsys.readouterr().out.splitlines()[0] == here and here.startswith("baseline average:")
