"""The fleet hands every worker actor and parameter server the thread settings of ddray/threads.py
through its runtime_env, before the process imports torch."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch

from ddray.config import Config
from ddray.core.synthetic import OuterOptimizer, SyntheticSet, class_labels
from ddray.distributed.fleet import Fleet
from ddray.distributed.placement import WorkerResources
from ddray.distributed.shards import Shard
from ddray.run.state import RunState
from ddray.threads import worker_env


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def _check(pid: int, want: dict[str, str], who: str) -> None:
    env = _environ(pid)  # the actor runs on this machine: read its environment from /proc
    assert {k: env.get(k) for k in want} == want, f"{who} (pid {pid})"
    # Ray would start it 15 nice levels below this driver; by default it runs at the driver's priority
    nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + int(want["RAY_worker_niceness"]))
    assert os.getpriority(os.PRIO_PROCESS, pid) == nice, who


def test_worker_actors_and_servers_start_with_the_thread_environment(ray_local: Any) -> None:
    cfg = Config.from_dict({"steps": 1, "epochs": 1, "nets": 2, "workers": 2, "placement": "pack"})
    syn = SyntheticSet(torch.zeros(1, 10, 1, 28, 28), class_labels(10, 1), torch.zeros(1), 1)
    state = RunState(0, syn.images, syn.raw_lrs, OuterOptimizer(syn, 0.01, 0.5, 100).state_dict(), cfg)
    resources = WorkerResources(1.0)
    with tempfile.TemporaryDirectory() as storage:
        fleet = Fleet(cfg, [Shard(0, 1, 0, 10)], state, storage, resources, kind="simulated")
        try:
            pids = [m.pid for m in fleet.pool.members]
            assert len(pids) == 2 and None not in pids
            for i, pid in enumerate(pids):
                _check(pid, worker_env(resources.threads), f"worker {i}")
            (server_pid,) = fleet.servers.pids
            _check(server_pid, worker_env(1), "parameter server")
            assert ray.get(fleet.single_server("test").info.remote()).pid == server_pid
        finally:
            fleet.shutdown()
