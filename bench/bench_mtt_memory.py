"""MTT's student unroll: peak memory and time of one meta-step against ``--syn-steps`` and ``--batch-syn``.

    .venv/bin/python bench/bench_mtt_memory.py [--steps 30 300] [--threads 2]
    .venv/bin/python bench/bench_mtt_memory.py --image 3 32 32 --ipc 10 --width 128 --steps 20 \
        --batch-syn all 10 50      # CIFAR-10-shaped, 100 synthetic images

ConvNet-3 (instance norm, ``--width``, default 32) on ``--image`` C H W images (default
1 28 28), ``--ipc`` images per class of 10 classes (default 1), K = 1 student from
random stand-in expert trajectories (the unroll's cost does not depend on what the
experts learned). Each student step trains on ``--batch-syn`` of the synthetic images
(``all``: every one, the default). Each row runs in a fresh subprocess; "meta-step
memory" is the growth of the peak RSS over what the process held before the first
meta-step. Both memory modes (``full``, ``recompute``) by default.
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


def one_row(memory: str, syn_steps: int, batch_syn: int | None, threads: int, image: tuple[int, int, int],
            ipc: int, width: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    from ddray.core.inits import RandomInit
    from ddray.core.models import build_model
    from ddray.core.trajectory import TrajectoryMatching

    model = build_model("convnet", image, 10, width=width)
    p0 = {k: v[0] for k, v in RandomInit(model, "default", 0).sample([(0, 0, 0)]).items()}
    labels = torch.arange(10).repeat_interleave(ipc)
    obj = TrajectoryMatching(model, [StandIn(p0, 4)], labels, syn_steps, 2, 2, 0, None, memory,
                             batch_syn=batch_syn)
    images = torch.randn(1, len(labels), *image, generator=torch.Generator().manual_seed(1))
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
    ap.add_argument("--batch-syn", nargs="+", default=["all"], metavar="N|all",
                    help="images per student step; all: every synthetic image (default)")
    ap.add_argument("--memory", nargs="+", default=["full", "recompute"], choices=["full", "recompute"])
    ap.add_argument("--image", type=int, nargs=3, default=[1, 28, 28], metavar=("C", "H", "W"))
    ap.add_argument("--ipc", type=int, default=1, help="synthetic images per class (10 classes)")
    ap.add_argument("--width", type=int, default=32, help="ConvNet-3's channels")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = (args.image[0], args.image[1], args.image[2])
    if args.row:
        memory, steps, batch_syn = json.loads(args.row)
        print(json.dumps(one_row(memory, steps, batch_syn, args.threads, shape, args.ipc, args.width)))
        return
    batch_syns = [None if b == "all" else int(b) for b in args.batch_syn]
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads={args.threads}, "
          f"ConvNet-3 width {args.width}, {10 * args.ipc} images of {'×'.join(map(str, shape))}")
    print("\n| memory mode | batch_syn | syn_steps | s / meta-step | meta-step memory (MiB) | vs first row |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for memory in args.memory:
        first = None
        for batch_syn in batch_syns:
            for steps in args.steps:
                cmd = [sys.executable, __file__, "--threads", str(args.threads), "--image", *map(str, shape),
                       "--ipc", str(args.ipc), "--width", str(args.width),
                       "--row", json.dumps([memory, steps, batch_syn])]
                r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                first = first or r["step_mib"]
                print(f"| {memory} | {batch_syn or 'all'} | {steps} | {r['seconds']:.2f} | {r['step_mib']:.0f} | "
                      f"{r['step_mib'] / first:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
