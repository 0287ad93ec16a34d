"""CPU threads of compute processes: as many as their CPUs, and none spinning while they wait.

A Ray worker shares its node with the driver, the parameter server, raylet and GCS.
Ray starts it 15 nice levels down, so any busy process at normal priority (the
driver, another user's job) takes its cores first.
OpenMP's default (``OMP_WAIT_POLICY`` unset) lets an idle thread of a parallel region
busy-wait for the next one; on a 2-core machine that spinning takes the core another
process needs, and what the kernel does to arbitrate shows up as system time (the
``sy`` column of ``top``). The passive policy puts idle threads to sleep at once.

Two halves, because OpenMP reads its environment once, when the runtime starts
(that is, when torch is imported):

* :func:`passive_wait` — the passive policy for this process, called by ``import ddray``
  before torch is loaded (a user's own ``OMP_WAIT_POLICY`` wins);
* :func:`worker_env` — the environment variables to hand an actor through its Ray
  ``runtime_env`` (``{"env_vars": worker_env(threads)}``), so they hold before it
  imports torch;
* :func:`apply_threads` — what the process itself sets at start: torch's intra-op
  threads, and one inter-op thread (nothing here runs independent ops concurrently).
"""

from __future__ import annotations

import os

#: Variables that make OpenMP's idle threads (GNU libgomp, Intel/LLVM libomp; MKL runs on them) sleep
#: instead of spin.
PASSIVE_WAIT: dict[str, str] = {
    "OMP_WAIT_POLICY": "PASSIVE",  # libgomp and libomp: idle threads sleep at once
    "KMP_BLOCKTIME": "0",  # Intel/LLVM libomp: milliseconds to spin before sleeping
}


def passive_wait() -> None:
    """Set :data:`PASSIVE_WAIT` in this process's environment where the user has not set it.

    Takes effect for OpenMP only if torch is not imported yet (``ddray/__init__.py`` calls it
    first thing), and for every process started from here (Ray workers, subprocesses).
    """
    for k, v in PASSIVE_WAIT.items():
        os.environ.setdefault(k, v)


#: Ray starts worker processes 15 nice levels below the driver, which starves the one process that
#: does the math whenever anything else on the node is busy; "0" runs it at the driver's priority.
RAY_NICENESS = "RAY_worker_niceness"


def worker_env(threads: int) -> dict[str, str]:
    """Environment variables for a compute process with ``threads`` CPU threads.

    ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` size the pools from the start (Ray would
    otherwise set ⌊the actor's CPU share⌋), :data:`PASSIVE_WAIT` stops idle threads
    from spinning, and :data:`RAY_NICENESS` keeps the worker at the driver's CPU priority.
    A wait or niceness setting the user exported in the driver's environment wins
    (e.g. ``OMP_WAIT_POLICY=ACTIVE`` on a machine with cores to spare).

    Raises:
        ValueError: ``threads`` is not a positive integer.
    """
    _check(threads, "worker_env")
    wait = {k: os.environ.get(k, v) for k, v in PASSIVE_WAIT.items()}
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **wait,
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
