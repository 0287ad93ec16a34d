"""Meta-step speed and peak memory of the DD core, against a straightforward autograd unroll.

Default MNIST-5k config: LeNet, S = 10 steps, E = 3 epochs (T = 30), 1 image per class
per step, real batch 1024. Each row runs in a fresh subprocess (so peak RSS is its own)
with ``torch.set_num_threads(--threads)``; the time is the median of ``--reps`` meta-steps
after one warm-up step; "meta-step memory" is the growth of peak RSS over what the process
held after loading data and model (the meta-steps' own tensors and graphs).

Rows:
* ``naive``: one network at a time, ``nn.Module`` LeNet as written (ReLU → pool) through
  ``functional_call``, ``torch.autograd.grad(create_graph=True)`` per inner step, one
  backward through the whole unroll and the real batch — the original code's approach.
* ``ddray full``: ``ddray.core.unroll.meta_gradient`` (K networks vmapped through the unroll,
  first-order real-batch gradient per network, then one vector-Jacobian product).
* ``ddray recompute``: the same with per-step recomputation (memory flat in T).

Usage: python bench/bench_core.py [--threads 2] [--reps 5] [--nets 1 8] [--unrolls 30 300]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch


def naive_meta_step(model: torch.nn.Module, params0: list[dict[str, torch.Tensor]], images: torch.Tensor,
                    labels: torch.Tensor, raw: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    import torch.nn.functional as F
    from torch.func import functional_call

    images = images.detach().requires_grad_()
    raw = raw.detach().requires_grad_()
    for p0 in params0:  # one network at a time
        p = {k: v.clone().requires_grad_() for k, v in p0.items()}
        lrs = F.softplus(raw)
        for t in range(len(raw)):
            loss = F.cross_entropy(functional_call(model, p, (images[t % images.shape[0]],)), labels)
            g = torch.autograd.grad(loss, list(p.values()), create_graph=True)
            p = {k: v - lrs[t] * gi for (k, v), gi in zip(p.items(), g)}
        outer = F.cross_entropy(functional_call(model, p, (x,)), y)
        torch.autograd.grad(outer, [images, raw])


class ReluPoolLeNet(torch.nn.Module):
    """LeNet written exactly as the original (ReLU before pool) for the naive row."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        F = torch.nn.functional
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def one_row(kind: str, nets: int, epochs: int, reps: int, threads: int) -> dict[str, float]:
    """Run in a subprocess: time ``reps`` meta-steps of ``kind`` and report ms/step and peak RSS."""
    torch.set_num_threads(threads)
    from ddray.core.inits import RandomInit
    from ddray.core.models import build_model, unstack_params
    from ddray.core.unroll import meta_gradient

    # Random stand-ins for MNIST-5k (same shapes, same cost) keep data loading out of the memory figure.
    g = torch.Generator().manual_seed(0)
    x_train, y_train = torch.randn(4000, 1, 28, 28, generator=g), torch.randint(10, (4000,), generator=g)
    model = build_model("lenet", (1, 28, 28), 10)
    images = torch.randn(10, 10, 1, 28, 28, generator=g)
    labels = torch.arange(10)
    raw = torch.full((10 * epochs,), -3.9)
    sampler = RandomInit(model, "xavier", 0)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for r in range(reps + 1):
        idx = torch.randperm(len(x_train), generator=g)[:1024]
        x, y = x_train[idx], y_train[idx]
        params0 = sampler.sample([(0, r, k) for k in range(nets)])
        t0 = time.perf_counter()
        if kind == "naive":
            naive_meta_step(ReluPoolLeNet(), unstack_params(params0), images, labels, raw, x, y)
        else:
            meta_gradient(model, params0, images, labels, raw, x, y, memory=kind.split()[1])
        if r:  # the first step is a warm-up
            times.append(time.perf_counter() - t0)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ms = 1000 * statistics.median(times)
    return {"ms_per_step": ms, "nets_per_s": nets / (ms / 1000), "peak_rss_mib": peak_mib,
            "step_mib": peak_mib - rss_before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--nets", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--unrolls", type=int, nargs="+", default=[30, 300], help="T values for the memory table")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:
        kind, nets, epochs = json.loads(args.row)
        print(json.dumps(one_row(kind, nets, epochs, args.reps, args.threads)))
        return

    def row(kind: str, nets: int, epochs: int = 3, reps: int | None = None) -> dict[str, float]:
        cmd = [sys.executable, __file__, "--threads", str(args.threads), "--reps", str(reps or args.reps),
               "--row", json.dumps([kind, nets, epochs])]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])

    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} cores visible, "
          f"torch {torch.__version__}, threads={args.threads}")
    print("\n| implementation | K nets | ms / meta-step | nets / s | meta-step memory (MiB) | speed-up vs naive |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for k in args.nets:
        base = row("naive", k)
        for kind in ("naive", "ddray full", "ddray recompute"):
            r = base if kind == "naive" else row(kind, k)
            print(f"| {kind} | {k} | {r['ms_per_step']:.0f} | {r['nets_per_s']:.2f} | {r['step_mib']:.0f} | "
                  f"{r['nets_per_s'] / base['nets_per_s']:.2f}× |", flush=True)
    print("\n| memory mode | T = S×E | ms / meta-step (K=1) | meta-step memory (MiB) |")
    print("| --- | ---: | ---: | ---: |")
    for kind in ("ddray full", "ddray recompute"):
        for t in args.unrolls:
            r = row(kind, 1, epochs=t // 10, reps=2)
            print(f"| {kind.split()[1]} | {t} | {r['ms_per_step']:.0f} | {r['step_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
