"""The fleet hands every worker actor the thread settings of ddray/threads.py through its runtime_env."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ddray.config import Config
from ddray.core.synthetic import OuterOptimizer, SyntheticSet, class_labels
from ddray.distributed.fleet import Fleet
from ddray.distributed.placement import alive_nodes, plan_resources
from ddray.distributed.shards import Shard
from ddray.threads import worker_env


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def test_worker_actors_start_with_the_thread_environment(ray_local: Any) -> None:
    cfg = Config.from_dict({"steps": 1, "epochs": 1, "nets": 2, "workers": 2})
    syn = SyntheticSet(torch.zeros(1, 10, 1, 28, 28), class_labels(10, 1), torch.zeros(1), 1)
    state = {"images": syn.images, "raw_lrs": syn.raw_lrs,
             "optimizer": OuterOptimizer(syn, 0.01, 0.5, 100).state_dict(), "step": 0}
    plan = plan_resources(alive_nodes(), 2, 1, "pack")
    with tempfile.TemporaryDirectory() as storage:
        fleet = Fleet(cfg.to_dict(), [Shard(0, 1, 0, 10)], state, storage, plan, kind="simulated", worker_args=(0,))
        try:
            for i, pid in enumerate(fleet.worker_pids):
                env = _environ(pid)  # the actor runs on this machine: read its environment from /proc
                want = worker_env(plan.threads(i))
                assert {k: env.get(k) for k in want} == want, f"worker {i} (pid {pid})"
                # Ray would start it 15 nice levels below this driver; by default it runs at the driver's priority
                nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + int(want["RAY_worker_niceness"]))
                assert os.getpriority(os.PRIO_PROCESS, pid) == nice, f"worker {i}"
        finally:
            fleet.shutdown()
