"""A newcomer's first screen: `ddray distill` on its own local Ray says once, in ddray's words, that the private
cluster keeps Ray's token authentication, instead of Ray's warning about it; an explicit RAY_AUTH_MODE is left to
Ray, which then says nothing either."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ARGS = ["distill", "--dataset", "digits", "--model", "convnet", "--width", "4", "--steps", "1", "--epochs", "1",
        "--iterations", "1", "--nets", "1", "--eval-nets", "1", "--workers", "1", "--cpus-per-worker", "1",
        "--no-scores", "--no-tracking", "--no-progress"]
RAYS = "Token authentication is enabled for this Ray cluster"
OURS = "ddray: starting a private local Ray for this run (token authentication on"


def distill(tmp_path: Path, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    base.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", **env)
    proc = subprocess.run([sys.executable, "-m", "ddray.cli", *ARGS, "--out", str(tmp_path / "run")], env=base,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


@pytest.mark.slow  # two local Rays, ~40 s
def test_a_local_run_says_it_once_in_ddrays_words(tmp_path: Path) -> None:
    err = distill(tmp_path)
    assert err.count(OURS) == 1 and RAYS not in err
    (tmp_path / "x").mkdir()
    explicit = distill(tmp_path / "x", RAY_AUTH_MODE="disabled")
    assert OURS not in explicit and RAYS not in explicit
