"""Thread settings of compute processes: the variables handed to Ray actors, and what they do in a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ddray.threads import PASSIVE_WAIT, RAY_NICENESS, apply_threads, worker_env


def test_worker_env_sizes_the_pools_and_makes_idle_threads_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [*PASSIVE_WAIT, RAY_NICENESS]:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the driver's own setting must not leak into a worker's size
    env = worker_env(2)
    assert env == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE",
                   "KMP_BLOCKTIME": "0", "RAY_worker_niceness": "0"}


def test_a_wait_policy_the_user_exported_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setenv("KMP_BLOCKTIME", "200")
    env = worker_env(1)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE" and env["KMP_BLOCKTIME"] == "200" and env["OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match=r"worker_env: threads must be a positive integer, got"):
        worker_env(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"apply_threads: threads must be a positive integer"):
        apply_threads(bad)  # type: ignore[arg-type]


def test_a_process_started_with_the_env_and_applying_it_runs_as_told() -> None:
    """torch in a fresh process sees the pool sizes and the wait policy, and apply_threads sets both pools."""
    code = ("import json, os, torch\n"
            "from ddray.threads import apply_threads\n"
            "before = torch.get_num_threads()\n"
            "apply_threads(1)\n"
            "info = torch.__config__.parallel_info()\n"
            "print(json.dumps({'before': before, 'intra': torch.get_num_threads(),\n"
            "                  'inter': torch.get_num_interop_threads(), 'policy': os.environ['OMP_WAIT_POLICY'],\n"
            "                  'omp_env': 'OMP_NUM_THREADS : 2' in info}))\n")
    env = {**os.environ, **worker_env(2)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.splitlines()[-1])
    assert got == {"before": 2, "intra": 1, "inter": 1, "policy": env["OMP_WAIT_POLICY"], "omp_env": True}


@pytest.mark.parametrize("user", [None, "ACTIVE"])
def test_importing_ddray_before_torch_sets_the_passive_policy_unless_the_user_chose(user: str | None) -> None:
    code = ("import os, ddray, torch\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('KMP_BLOCKTIME'))\n")
    env = {k: v for k, v in os.environ.items() if k not in PASSIVE_WAIT}
    if user:
        env["OMP_WAIT_POLICY"] = user
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [user or "PASSIVE", "0"]
