"""`ddray distill` (Ray path) on bad input: a one-line error naming the problem, nothing overwritten,
and no Ray started."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from dist_support import tiny

from ddray.cli import main
from ddray.run.loop import distill

FAST = ["--dataset", "mnist5k", "--steps", "2", "--epochs", "1", "--batch-size", "64", "--nets", "2",
        "--eval-nets", "2", "--no-tracking", "--no-progress", "--no-scores"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = main(["distill", *argv])
    err = capsys.readouterr().err.strip()
    return rc, err


def snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*")}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step run (single process: same checkpoint format) to resume from."""
    out = tmp_path_factory.mktemp("done") / "run"
    distill(tiny(out, iterations=2, checkpoint_every=1), progress=False)
    return out


@pytest.fixture(autouse=True)
def no_ray_started() -> object:
    yield None
    import ray

    assert not ray.is_initialized()


@pytest.mark.parametrize("flags, message", [
    (["--workers", "0"], "--workers: invalid value 0; expected a positive integer"),
    (["--workers", "3:1"], "--workers: invalid value '3:1'; expected a positive integer N, or MIN:MAX with "
                           "1 <= MIN <= MAX"),
    (["--workers", "a:b"], "--workers: invalid value 'a:b'; expected a positive integer N, or MIN:MAX"),
    (["--gpus-per-worker", "-1"], "--gpus-per-worker: invalid value -1.0; expected a number >= 0"),
    (["--gpus-per-worker", "1.5"], "--gpus-per-worker: invalid value 1.5; expected a number >= 0: a fraction up "
                                   "to 1 (workers share a GPU) or a whole number"),
    (["--cpus-per-worker", "0"], "--cpus-per-worker: invalid value 0.0; expected a positive number"),
    (["--placement-timeout", "-5"], "--placement-timeout: invalid value -5.0; expected a positive number"),
    (["--max-staleness", "-1"], "--max-staleness: invalid value -1; expected an integer >= 0"),
    (["--placement", "ring"], "--placement: invalid value 'ring'; choose one of spread, strict-spread, pack"),
    (["--shards", "11"], "--shards: invalid value 11; at most one shard per class (10 classes)"),
])
def test_invalid_cluster_options(capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: list[str],
                                 message: str) -> None:
    rc, err = run(capsys, *FAST, "--out", str(tmp_path / "o"), *flags)
    assert rc == 2 and err.count("\n") == 0 and message in err
    assert not (tmp_path / "o").exists()


def test_unreachable_address_fails_fast_with_the_address(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    addr = f"127.0.0.1:{closed_port()}"
    t0 = time.monotonic()
    rc, err = run(capsys, *FAST, "--out", str(tmp_path / "o"), "--address", addr)
    assert rc == 2 and err.count("\n") == 0 and f"--address {addr}: no Ray cluster reachable" in err
    assert time.monotonic() - t0 < 30 and not (tmp_path / "o").exists()


def test_resume_without_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rc, err = run(capsys, "--resume", str(run_dir), "--no-tracking")
    assert rc == 2 and "is not a ddray run directory (no config.yaml)" in err
    tiny(run_dir).dump(run_dir / "config.yaml")
    before = snapshot(run_dir)
    rc, err = run(capsys, "--resume", str(run_dir), "--no-tracking", "--no-progress")
    assert rc == 2 and err.count("\n") == 0 and "--resume: no valid checkpoint in" in err
    assert snapshot(run_dir) == before


def test_resume_incompatible_config_overwrites_nothing(capsys: pytest.CaptureFixture[str], finished_run: Path) -> None:
    before = snapshot(finished_run)
    rc, err = run(capsys, "--resume", str(finished_run), "--steps", "3", "--no-tracking", "--no-progress")
    assert rc == 2 and err.count("\n") == 0
    assert "comes from an incompatible config (differs in distill.steps)" in err
    rc, err = run(capsys, "--resume", str(finished_run), "--iterations", "1", "--no-tracking", "--no-progress")
    assert rc == 2 and "--iterations: invalid value 1; the checkpoint" in err and "already has 2 meta-steps" in err
    assert snapshot(finished_run) == before


def test_fresh_run_refuses_a_storage_with_checkpoints(capsys: pytest.CaptureFixture[str], finished_run: Path,
                                                       tmp_path: Path) -> None:
    before = snapshot(finished_run)
    rc, err = run(capsys, *FAST, "--out", str(tmp_path / "new"), "--storage", str(finished_run / "checkpoints"))
    assert rc == 2 and "already holds checkpoints of a run; continue it with --resume" in err
    assert snapshot(finished_run) == before and not (tmp_path / "new").exists()


def test_resume_auto_on_a_different_config_names_the_first_differing_key(
        capsys: pytest.CaptureFixture[str], finished_run: Path) -> None:
    before = snapshot(finished_run)
    rc, err = run(capsys, *FAST, "--iterations", "2", "--checkpoint-every", "1", "--seed", "0", "--ipc", "1",
                  "--steps", "3", "--out", str(finished_run), "--resume", "auto")
    assert rc == 2 and err.count("\n") == 0
    assert "--resume auto:" in err and "holds a run of a different config (first difference: distill.steps = 2 " \
        "there, 3 now)" in err
    assert snapshot(finished_run) == before


def test_resume_auto_needs_an_out_directory(capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = run(capsys, *FAST, "--resume", "auto")
    assert rc == 2 and err == "ddray distill: error: --resume auto: needs --out DIR, a path that stays the same " \
        "when the run is retried"
