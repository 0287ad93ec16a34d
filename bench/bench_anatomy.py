"""Where a K = 1 DD meta-step's time goes on CPU: ddray's three parts and the naive unroll, in ms and GFLOP.

Default MNIST-5k shapes (LeNet, S = 10, E = 3 → T = 30 inner steps on 10 images, a real batch of
1,024), one process, after ``import ddray`` (so its OpenMP wait policy, :mod:`ddray.threads`).

ddray's meta-step (:func:`ddray.core.unroll.meta_gradient`, memory ``full``) in its three parts:

* ``unroll``: the 30 inner steps, forward with each step's gradient kept differentiable;
* ``real batch``: the first-order ∂ℓ/∂θ_T on the real batch (in cache-sized chunks);
* ``VJP``: the second-order backward of the unroll with that gradient (``unroll + VJP`` minus
  ``unroll``).

The naive unroll (``bench/bench_core.py``'s) does the same arithmetic in two parts: its unroll, then
the real batch's forward and one backward through everything. FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products; the element-wise
rest is small); "GFLOP/s" is that count over the median time. For scale, the same process times a
2048² matrix product and the real batch's second convolution.

Usage: python bench/bench_anatomy.py [--reps 7] [--threads N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent


def median_ms(fn: Callable[[], Any], reps: int, warmup: int = 2) -> float:
    times = []
    for r in range(reps + warmup):
        t0 = time.perf_counter()
        fn()
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def gflop(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 1e9


def parts(reps: int) -> dict[str, dict[str, float]]:
    """name → {"ms", "gflop"} of each part (see the module docstring) and of both whole meta-steps."""
    import torch
    import torch.nn.functional as F

    import ddray  # noqa: F401  (the wait policy, as users get it)
    from ddray.core.inits import RandomInit
    from ddray.core.kernels import eager_real_grad
    from ddray.core.models import build_model, unstack_params
    from ddray.core.unroll import meta_gradient, unroll

    sys.path.insert(0, str(HERE))
    from bench_core import ReluPoolLeNet, naive_meta_step

    g = torch.Generator().manual_seed(0)
    model = build_model("lenet", (1, 28, 28), 10)
    images, labels = torch.randn(10, 10, 1, 28, 28, generator=g), torch.arange(10)
    raw = torch.full((30,), -3.9)
    x, y = torch.randn(1024, 1, 28, 28, generator=g), torch.randint(10, (1024,), generator=g)
    params0 = RandomInit(model, "xavier", 0).sample([(0, 0, 0)])
    theta_t = {k: v.detach() for k, v in unroll(model, params0, images, labels, F.softplus(raw)).items()}
    real_grad = eager_real_grad(model)
    naive = ReluPoolLeNet()

    def forward() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        im, r = images.clone().requires_grad_(), raw.clone().requires_grad_()
        with torch.enable_grad():
            return unroll(model, params0, im, labels, F.softplus(r)), im, r

    def forward_vjp() -> None:
        p, im, r = forward()
        torch.autograd.grad(list(p.values()), [im, r], grad_outputs=[torch.ones_like(v) for v in p.values()])

    def naive_forward() -> None:
        ims, r = images.detach().requires_grad_(), raw.detach().requires_grad_()
        p = {k: v[0].clone().requires_grad_() for k, v in params0.items()}
        lrs = F.softplus(r)
        for t in range(30):
            loss = F.cross_entropy(torch.func.functional_call(naive, p, (ims[t % 10],)), labels)
            grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
            p = {k: v - lrs[t] * gi for (k, v), gi in zip(p.items(), grads)}

    runs: dict[str, Callable[[], Any]] = {
        "ddray: unroll": forward,
        "ddray: real batch": lambda: real_grad(theta_t, x, y),
        "ddray: unroll + VJP": forward_vjp,
        "ddray: whole meta-step": lambda: meta_gradient(model, params0, images, labels, raw, x, y),
        "naive: unroll": naive_forward,
        "naive: whole meta-step": lambda: naive_meta_step(naive, unstack_params(params0), images, labels, raw, x,
                                                          y),
    }
    out = {name: {"ms": median_ms(fn, reps), "gflop": gflop(fn)} for name, fn in runs.items()}
    vjp = {key: out["ddray: unroll + VJP"][key] - out["ddray: unroll"][key] for key in ("ms", "gflop")}
    out = {name: v for name, v in out.items() if name != "ddray: unroll + VJP"}
    out["ddray: VJP"] = vjp
    naive_rest = {key: out["naive: whole meta-step"][key] - out["naive: unroll"][key] for key in ("ms", "gflop")}
    out["naive: real batch + one backward through all"] = naive_rest
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    out["reference: 2048² matrix product"] = {"ms": median_ms(lambda: a @ b, reps), "gflop": 2 * 2048 ** 3 / 1e9}
    xc, w = torch.randn(256, 6, 14, 14), torch.randn(16, 6, 5, 5)
    out["reference: conv2 on 256 real images"] = {"ms": median_ms(lambda: F.conv2d(xc, w), reps),
                                                  "gflop": gflop(lambda: F.conv2d(xc, w))}
    return out


ORDER = ["ddray: unroll", "ddray: real batch", "ddray: VJP", "ddray: whole meta-step", "naive: unroll",
         "naive: real batch + one backward through all", "naive: whole meta-step",
         "reference: 2048² matrix product", "reference: conv2 on 256 real images"]


def table(figures: dict[str, dict[str, float]]) -> str:
    rows = ["| part | ms | GFLOP | GFLOP/s |", "| --- | ---: | ---: | ---: |"]
    for name in ORDER:
        f = figures[name]
        rows.append(f"| {name} | {f['ms']:.1f} | {f['gflop']:.3f} | {f['gflop'] / f['ms'] * 1000:.0f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"# {os.cpu_count()} CPUs, {args.threads} torch threads, torch {torch.__version__}, median of "
          f"{args.reps}, load before: {os.getloadavg()[0]:.2f}")
    figures = parts(args.reps)
    print(table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
