"""MTT's student unroll: peak memory and time of one meta-step against ``--syn-steps``, full vs recompute.

    .venv/bin/python bench/bench_mtt_memory.py [--steps 30 300] [--threads 2]

ConvNet-3 (instance norm, width 32) on 28×28 images, 1 image per class (10 synthetic
images, the student trains on all of them every step), K = 1 student from random
stand-in expert trajectories (the unroll's cost does not depend on what the experts
learned). Each row runs in a fresh subprocess; "meta-step memory" is the growth of the
peak RSS over what the process held before the first meta-step.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch


class StandIn:
    """An expert trajectory of random parameters (the shape is what matters here)."""

    def __init__(self, params: dict[str, torch.Tensor], epochs: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.params = {k: torch.stack([v + 0.01 * e * torch.randn(v.shape, generator=g) for e in range(epochs + 1)])
                       for k, v in params.items()}

    @property
    def epochs(self) -> int:
        return next(iter(self.params.values())).shape[0] - 1

    def at(self, epoch: int) -> dict[str, torch.Tensor]:
        return {k: v[epoch] for k, v in self.params.items()}


def one_row(memory: str, syn_steps: int, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    from ddray.core.inits import RandomInit
    from ddray.core.models import build_model
    from ddray.core.trajectory import TrajectoryMatching

    model = build_model("convnet", (1, 28, 28), 10, width=32)
    p0 = {k: v[0] for k, v in RandomInit(model, "default", 0).sample([(0, 0, 0)]).items()}
    obj = TrajectoryMatching(model, [StandIn(p0, 4)], torch.arange(10), syn_steps, 2, 2, 0, None, memory)
    images = torch.randn(1, 10, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    raw = torch.tensor([-4.6])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    obj(images, raw, 0, [0])
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "step_mib": peak - rss_before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, nargs="+", default=[30, 300])
    ap.add_argument("--row", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:
        memory, steps = json.loads(args.row)
        print(json.dumps(one_row(memory, steps, args.threads)))
        return
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads={args.threads}")
    print("\n| memory mode | syn_steps | s / meta-step | meta-step memory (MiB) | vs first syn_steps |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for memory in ("full", "recompute"):
        first = None
        for steps in args.steps:
            cmd = [sys.executable, __file__, "--threads", str(args.threads), "--row", json.dumps([memory, steps])]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            first = first or r["step_mib"]
            print(f"| {memory} | {steps} | {r['seconds']:.2f} | {r['step_mib']:.0f} | "
                  f"{r['step_mib'] / first:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
