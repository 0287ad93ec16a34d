"""Thread settings of compute processes: the variables handed to Ray actors, and what they do in a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import ddray.threads as threads
from ddray.threads import (BOUNDED_SPIN, CHOSEN, PASSIVE_WAIT, POLICIES, RAY_NICENESS, WAIT_VARS, apply_threads,
                           machine_load, set_wait_policy, wait_policy, worker_env)


def _without_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [*WAIT_VARS, CHOSEN, RAY_NICENESS]:
        monkeypatch.delenv(k, raising=False)


def test_worker_env_sizes_the_pools_and_leaves_the_wait_to_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_wait(monkeypatch)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the driver's own setting must not leak into a worker's size
    monkeypatch.setenv("GOMP_SPINCOUNT", "30000")
    monkeypatch.setenv(CHOSEN, "spin")  # ddray's choice for the driver's machine, not the worker's
    assert worker_env(2) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "RAY_worker_niceness": "0"}


def test_a_wait_policy_the_user_exported_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_wait(monkeypatch)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setenv("KMP_BLOCKTIME", "200")
    env = worker_env(1)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE" and env["KMP_BLOCKTIME"] == "200" and env["OMP_NUM_THREADS"] == "1"
    assert set_wait_policy() == "user" and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.parametrize(("load", "cpus", "policy"), [(0.0, 2, "spin"), (2.0, 2, "spin"), (3.9, 2, "spin"),
                                                     (4.0, 2, "passive"), (9.0, 4, "passive"), (3.0, 16, "spin")])
def test_the_policy_spins_unless_other_work_fills_twice_the_cores(load: float, cpus: int,
                                                                                     policy: str) -> None:
    assert wait_policy(load, cpus) == policy


@pytest.mark.parametrize(("loadavg", "want"), [("3.50 2.0 1.0 2/300 99", 1.0),  # was busy, 1 other task now
                                                ("0.20 0.1 0.1 5/300 99", 0.2),  # busy now, not before
                                                ("2.50 2.0 2.0 4/300 99", 2.5)])
def test_the_machine_load_counts_only_work_that_was_and_still_is_there(monkeypatch: pytest.MonkeyPatch, loadavg: str,
                                                                      want: float) -> None:
    real = threads.Path
    monkeypatch.setattr(threads, "Path", lambda p: type("F", (), {"read_text": lambda self: loadavg})()
                        if p == "/proc/loadavg" else real(p))
    assert machine_load() == want


def test_without_proc_loadavg_the_load_average_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "Path", lambda p: type("F", (), {"read_text": lambda self: "garbled"})())
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (4.25, 0.0, 0.0))
    assert machine_load() == 4.25 and wait_policy(cpus=2) == "passive"


def test_the_two_policies_set_what_libgomp_and_libomp_read() -> None:
    assert BOUNDED_SPIN == {"GOMP_SPINCOUNT": "30000", "KMP_BLOCKTIME": "1"}
    assert PASSIVE_WAIT == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


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
            "                  'inter': torch.get_num_interop_threads(),\n"
            "                  'omp_env': 'OMP_NUM_THREADS : 2' in info}))\n")
    env = {**os.environ, **worker_env(2)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.splitlines()[-1])
    assert got == {"before": 2, "intra": 1, "inter": 1, "omp_env": True}


@pytest.mark.parametrize("inherited", [{}, {"OMP_WAIT_POLICY": "ACTIVE", CHOSEN: "spin"}])
def test_importing_ddray_before_torch_chooses_the_policy_by_the_load(inherited: dict[str, str]) -> None:
    """A process with no wait variables, or with ones a parent ddray chose (CHOSEN set), chooses again."""
    code = ("import json, os, ddray, torch\n"
            "print(json.dumps({k: os.environ.get(k) for k in ddray.threads.WAIT_VARS + (ddray.threads.CHOSEN,)}))\n")
    env = {k: v for k, v in os.environ.items() if k not in (*WAIT_VARS, CHOSEN)}
    out = subprocess.run([sys.executable, "-c", code], env={**env, **inherited}, capture_output=True, text=True,
                         check=True)
    got = json.loads(out.stdout.splitlines()[-1])
    name = got.pop(CHOSEN)
    assert name in POLICIES and got == {k: POLICIES[name].get(k) for k in WAIT_VARS}


def test_importing_ddray_keeps_the_wait_variables_the_user_exported() -> None:
    code = "import os, ddray, torch\nprint(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('DDRAY_WAIT_POLICY'))\n"
    env = {k: v for k, v in os.environ.items() if k not in (*WAIT_VARS, CHOSEN)}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["ACTIVE", "None"]
