"""CPU threads of compute processes: as many as their CPUs, and idle ones spinning only briefly.

A Ray worker shares its node with the driver, the parameter server, raylet and GCS.
Ray starts it 15 nice levels down, so any busy process at normal priority (the
driver, another user's job) takes its cores first.

A meta-step at K = 1 is thousands of small ops, each a short OpenMP parallel region. Between
two regions an idle thread either spins (it wakes at once, but holds a core) or sleeps (the
core is free, but every region pays a wake-up). Measured here (``bench/bench_wait_policy.py``,
2 cores, K = 1): alone on the machine, sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) makes the
meta-step 2.3× slower than spinning (326 against 139 ms); beside another process busy on both
cores, OpenMP's default spin (libgomp: 300,000 spins) is the slow one (536 ms), and a bounded
spin of 30,000 the fastest (303 ms; passive 470). Only beside three such processes (four times
as many busy threads as cores) does sleeping at once win for ddray's meta-step (1.7 against
2.3 s). So ddray spins briefly unless other work already fills twice the process's CPUs — both
over the last minute (the load average) and at this instant (the tasks running now), so a
machine that was busy a moment ago does not count:

* :func:`wait_policy` — that choice, for a process starting now;
* :func:`set_wait_policy` — applies it to this process's environment; ``import ddray`` calls it
  before torch loads OpenMP (which reads its environment once, when it starts). Variables the
  user exported win, here and in every worker;
* :func:`worker_env` — the environment variables to hand an actor through its Ray
  ``runtime_env`` (``{"env_vars": worker_env(threads)}``): its thread counts, the user's wait
  variables (otherwise each worker's own ``import ddray`` chooses, by its own node's load) and
  the driver's priority;
* :func:`apply_threads` — what the process itself sets at start: torch's intra-op
  threads, and one inter-op thread (nothing here runs independent ops concurrently).
"""

from __future__ import annotations

import os
from pathlib import Path

#: OpenMP's wait variables: libgomp reads OMP_WAIT_POLICY and GOMP_SPINCOUNT, Intel/LLVM libomp
#: OMP_WAIT_POLICY and KMP_BLOCKTIME (MKL runs on whichever torch loaded).
WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
#: Cores to spare: an idle thread spins 30,000 times (tens of microseconds, the gap to the next op
#: of a meta-step; libomp: 1 ms), then sleeps.
BOUNDED_SPIN: dict[str, str] = {"GOMP_SPINCOUNT": "30000", "KMP_BLOCKTIME": "1"}
#: Cores taken: an idle thread sleeps at once.
PASSIVE_WAIT: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
POLICIES = {"spin": BOUNDED_SPIN, "passive": PASSIVE_WAIT}
#: Set beside the variables ddray chose (to the policy's name): a child process inherits them
#: but chooses again, and :func:`user_wait` tells them from the user's own.
CHOSEN = "DDRAY_WAIT_POLICY"


def machine_load() -> float:
    """CPUs' worth of other work on this machine: the smaller of the 1-minute load average (it has been
    busy) and the tasks running at this instant besides this process (it still is), from /proc/loadavg;
    the load average alone where that cannot be read (and 0 where neither can: not Linux nor Unix)."""
    try:
        fields = Path("/proc/loadavg").read_text().split()
        return min(float(fields[0]), int(fields[3].split("/")[0]) - 1)
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0


def wait_policy(load: float | None = None, cpus: int | None = None) -> str:
    """``"passive"`` where other work (``load``, default :func:`machine_load`) already fills twice the CPUs
    this process may use (``cpus``, default its affinity), else ``"spin"``."""
    load = machine_load() if load is None else load
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return "passive" if load >= 2 * cpus else "spin"


def user_wait() -> dict[str, str]:
    """The wait variables the user exported (none where ddray chose them)."""
    if os.environ.get(CHOSEN):
        return {}
    return {k: os.environ[k] for k in WAIT_VARS if k in os.environ}


def set_wait_policy() -> str:
    """Give this process :func:`wait_policy`'s variables, unless the user exported some: the policy's
    name, or ``"user"``.

    Takes effect for OpenMP only if torch is not imported yet (``ddray/__init__.py`` calls it first
    thing), and for every process started from here (Ray workers, subprocesses), which choose
    again when they import ddray.
    """
    if user_wait():
        return "user"
    name = wait_policy()
    for k in WAIT_VARS:
        os.environ.pop(k, None)
    os.environ.update(POLICIES[name])
    os.environ[CHOSEN] = name
    return name


#: Ray starts worker processes 15 nice levels below the driver, which starves the one process that
#: does the math whenever anything else on the node is busy; "0" runs it at the driver's priority.
RAY_NICENESS = "RAY_worker_niceness"


def worker_env(threads: int) -> dict[str, str]:
    """Environment variables for a compute process with ``threads`` CPU threads.

    ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` size the pools from the start (Ray would
    otherwise set ⌊the actor's CPU share⌋), and :data:`RAY_NICENESS` keeps the worker at the
    driver's CPU priority. The wait variables the user exported in the driver's environment
    travel too (e.g. ``OMP_WAIT_POLICY=ACTIVE`` on a machine with cores to spare); otherwise the
    worker's own ``import ddray`` chooses by its node's load (:func:`set_wait_policy`).

    Raises:
        ValueError: ``threads`` is not a positive integer.
    """
    _check(threads, "worker_env")
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **user_wait(),
            RAY_NICENESS: os.environ.get(RAY_NICENESS, "0")}


def apply_threads(threads: int) -> None:
    """Set this process's torch threads: ``threads`` intra-op, one inter-op.

    The inter-op pool can only be sized before its first use; later calls leave it as it is.
    """
    import torch

    _check(threads, "apply_threads")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already started (or already set) in this process
        pass


def _check(threads: object, where: str) -> None:
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"{where}: threads must be a positive integer, got {threads!r}")
