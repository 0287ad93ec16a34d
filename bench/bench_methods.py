"""DM and MTT iterations at CIFAR-10's shapes: ddray's objectives beside plain eager loops of the same iterations.

Issue 16, item 3: "DM and MTT iterations on CIFAR-10 (ConvNet-128, 10 images per class): ms per
iteration beside a plain eager PyTorch loop of the same iteration, run in the same call". Shapes:
3×32×32 images, 10 classes, 10 images per class (N = 100), ConvNet-128 (three 3×3 conv layers,
instance norm, average pooling), the papers' DSA strategy; random pixels stand in for CIFAR-10
(an iteration's cost does not depend on them).

* **DM** (one fresh network, ``--real-per-class`` real images of each class). ddray:
  :class:`ddray.core.matching.DistributionMatching` (every class's real images embedded together,
  the synthetic ones in one forward; on a GPU replayed from a CUDA graph, with the same iteration
  without graphs beside it as ``ddray, no graphs``). Plain: DM's own loop — the network as a
  module, class by class an embedding of the real images without a graph and one of the synthetic
  ones, Σ‖mean difference‖², one backward.
* **MTT** (one student, ``--syn-steps`` steps on all N images from an expert segment). ddray:
  :class:`ddray.core.trajectory.TrajectoryMatching` (the unroll's VJP with the first-order distance
  gradient; on a GPU replayed from a CUDA graph, ``ddray, no graphs`` beside it). Plain: MTT's own
  loop — a list of student parameters, ``autograd.grad(create_graph=True)`` per step, the normalised
  parameter distance, one backward through everything.

Both rows of a method get the same θ₀ (or expert segment), real images and augmentation draws,
so they compute the same gradient (tests/test_bench_methods.py checks it in float64); only the
way they compute it differs. Each figure is the median of ``--reps`` iterations after two
warm-up ones, on ``--device`` (synchronised on a GPU). One more iteration of each row runs under
``torch.profiler`` (:func:`launches`): the operators the host dispatched and, on a GPU, the kernels
launched and their busy time — whether an iteration is launch-bound, which decides whether capturing
it as a CUDA graph pays (issue 16, item 2).

Usage: python bench/bench_methods.py [--device cuda] [--reps 5] [--methods dm mtt] [--syn-steps 30]
       [--real-per-class 256] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

SHAPE, CLASSES, STRATEGY = (3, 32, 32), 10, "color_crop_cutout_flip_scale_rotate"
Grad = Callable[[int], tuple[torch.Tensor, torch.Tensor | None]]  # iteration → (∂/∂x̃, ∂/∂ρ or None)


@dataclass
class Sizes:
    ipc: int = 10
    width: int = 128
    real_per_class: int = 256
    syn_steps: int = 30
    expert_epochs: int = 2


class RandomExpert:
    """An expert trajectory of random walks from one θ₀: (epochs + 1) snapshots, in memory."""

    def __init__(self, theta0: dict[str, torch.Tensor], epochs: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.snapshots = [theta0]
        for _ in range(epochs):
            self.snapshots.append({n: v + 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype)
                                   for n, v in self.snapshots[-1].items()})

    @property
    def epochs(self) -> int:
        return len(self.snapshots) - 1

    def at(self, epoch: int) -> dict[str, torch.Tensor]:
        return self.snapshots[epoch]


def _inputs(sizes: Sizes, dtype: torch.dtype, seed: int) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(model, real images, their labels, synthetic images (1, N, C, H, W)) on the CPU."""
    from ddray.core.models import build_model

    g = torch.Generator().manual_seed(seed)
    model = build_model("convnet", SHAPE, CLASSES, sizes.width).to(dtype)
    per_class = sizes.real_per_class + 3  # a pool a little larger than a draw
    x_real = torch.randn(CLASSES * per_class, *SHAPE, generator=g, dtype=dtype)
    y_real = torch.arange(CLASSES).repeat_interleave(per_class)
    images = torch.randn(1, CLASSES * sizes.ipc, *SHAPE, generator=g, dtype=dtype)
    return model, x_real, y_real, images


class _Cast:
    """A θ₀ sampler in ``dtype`` (ddray's samplers draw float32)."""

    def __init__(self, inner: Any, dtype: torch.dtype) -> None:
        self.inner, self.dtype = inner, dtype

    def sample(self, keys: list[tuple[int, ...]]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.dtype) for k, v in self.inner.sample(keys).items()}


def dm(sizes: Sizes, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, Grad]:
    """ddray's and the plain DM iteration: ``row(step) → (∂L/∂x̃, None)``."""
    import copy

    from ddray.core.augment import apply_aug, sample_aug
    from ddray.core.inits import AUGMENT, DISTILL, RandomInit, generator
    from ddray.core.matching import ClassBatches, DistributionMatching

    model, x_real, y_real, images = _inputs(sizes, dtype, seed)
    sampler = _Cast(RandomInit(model, "default", seed), dtype)
    real = ClassBatches(x_real, y_real, CLASSES, sizes.real_per_class, seed)
    objective, kernel_by_kernel = (DistributionMatching(model, sampler, real, sizes.ipc, seed, STRATEGY,
                                                        cuda_graphs=graphs).to(device) for graphs in (True, False))
    images, raw = images.to(device), torch.zeros(1, dtype=dtype, device=device)
    net = copy.deepcopy(model).to(device)

    def ddray_row(step: int) -> tuple[torch.Tensor, None]:
        return objective(images, raw, step, [0]).images, None

    def eager_row(step: int) -> tuple[torch.Tensor, None]:
        return kernel_by_kernel(images, raw, step, [0]).images, None

    def plain_row(step: int) -> tuple[torch.Tensor, None]:
        net.load_state_dict({n: v[0] for n, v in sampler.sample([(DISTILL, step, 0)]).items()})
        for p in net.parameters():
            p.requires_grad_(False)
        x_syn = images[0].detach().clone().requires_grad_()
        loss = torch.zeros((), dtype=dtype, device=device)
        for c, x_c in enumerate(objective.real.draw(step)):
            omega = sample_aug(STRATEGY, 1, generator(seed, AUGMENT, step, 0, c))
            with torch.no_grad():
                out_real = net(apply_aug(x_c, omega), embed=True)
            out_syn = net(apply_aug(x_syn[c * sizes.ipc:(c + 1) * sizes.ipc], omega), embed=True)
            loss = loss + ((out_real.mean(0) - out_syn.mean(0)) ** 2).sum()
        loss.backward()
        assert x_syn.grad is not None
        return x_syn.grad.unsqueeze(0), None

    rows: dict[str, Grad] = {"ddray": ddray_row, "plain": plain_row}
    if objective.graphs is not None:  # on a GPU "ddray" replays CUDA graphs: the same without them beside it
        rows["ddray, no graphs"] = eager_row
    return rows


def mtt(sizes: Sizes, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, Grad]:
    """ddray's and the plain MTT iteration: ``row(step) → (∂L/∂x̃, ∂L/∂ρ)``."""
    from ddray.core.augment import apply_aug, sample_aug
    from ddray.core.inits import AUGMENT, RandomInit, generator
    from ddray.core.trajectory import TrajectoryMatching

    model, _, _, images = _inputs(sizes, dtype, seed)
    theta0 = {n: v[0] for n, v in _Cast(RandomInit(model, "default", seed), dtype).sample([(0, 0, 0)]).items()}
    expert = RandomExpert(theta0, sizes.expert_epochs + 1, seed)
    labels = torch.arange(CLASSES).repeat_interleave(sizes.ipc)
    objective, kernel_by_kernel = (TrajectoryMatching(model, [expert], labels, sizes.syn_steps, sizes.expert_epochs,
                                                      2, seed, STRATEGY, cuda_graphs=graphs).to(device)
                                   for graphs in (True, False))
    images, raw = images.to(device), torch.full((1,), -4.6, dtype=dtype, device=device)  # step size ≈ 0.01
    model, y = model.to(device), labels.to(device)

    def ddray_row(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = objective(images, raw, step, [0])
        return g.images, g.raw_lrs

    def eager_row(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = kernel_by_kernel(images, raw, step, [0])
        return g.images, g.raw_lrs

    def plain_row(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, target = (({n: v.to(device) for n, v in p.items()}) for p in objective.segment(step, 0))
        x_syn = images[0].detach().clone().requires_grad_()
        rho = raw.detach().clone().requires_grad_()
        lr = F.softplus(rho)[0]
        params = [{n: v.clone().requires_grad_() for n, v in start.items()}]
        for n in range(sizes.syn_steps):
            x = apply_aug(x_syn, sample_aug(STRATEGY, len(x_syn), generator(seed, AUGMENT, step, n)))
            ce = F.cross_entropy(functional_call(model, params[-1], (x,)), y)
            grads = torch.autograd.grad(ce, list(params[-1].values()), create_graph=True)
            params.append({k: v - lr * g for (k, v), g in zip(params[-1].items(), grads)})
        distance = torch.stack([((params[-1][k] - target[k]) ** 2).sum() for k in start]).sum()
        scale = torch.stack([((start[k] - target[k]) ** 2).sum() for k in start]).sum()
        (distance / scale).backward()
        assert x_syn.grad is not None and rho.grad is not None
        return x_syn.grad.unsqueeze(0), rho.grad

    rows: dict[str, Grad] = {"ddray": ddray_row, "plain": plain_row}
    if objective.graphs is not None:  # on a GPU "ddray" replays CUDA graphs: the same without them beside it
        rows["ddray, no graphs"] = eager_row
    return rows


METHODS = {"dm": dm, "mtt": mtt}


def time_rows(rows: dict[str, Grad], device: torch.device, reps: int) -> dict[str, float]:
    """Median ms per iteration of each row, the rows interleaved iteration by iteration (the same minutes)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in rows}
    for step in range(reps + 2):
        for name, row in rows.items():
            sync()
            t0 = time.perf_counter()
            row(step)
            sync()
            if step >= 2:  # two warm-up iterations (cuDNN's choices, the allocator)
                times[name].append(1000 * (time.perf_counter() - t0))
    return {name: statistics.median(t) for name, t in times.items()}


def launches(row: Grad, step: int, device: torch.device) -> dict[str, float]:
    """One more iteration of ``row`` under ``torch.profiler``: ``calls``, the operators the host dispatched
    (top-level events: from Python or the autograd engine, each at least one kernel launch on a GPU); on a
    GPU also ``kernels``, the kernels and copies it launched, and ``busy ms``, their summed time. Busy ms
    far below the iteration's ms means the iteration is launch-bound: what capturing it as a CUDA graph
    (issue 16, item 2) would remove. Empty if the profiler fails (the timings stand without it)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    try:
        with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
            row(step)
            if cuda:
                torch.cuda.synchronize(device)
        events = prof.events()
    except Exception as e:  # noqa: BLE001  (a profiler that cannot run on this machine)
        print(f"# profiling failed ({type(e).__name__}: {e}); no launch counts")
        return {}
    out = {"calls": float(sum(1 for e in events if e.device_type == DeviceType.CPU and e.cpu_parent is None))}
    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        out |= {"kernels": float(len(kernels)), "busy ms": sum(e.time_range.elapsed_us() for e in kernels) / 1000}
    return out


def table(figures: dict[str, dict[str, float]], counts: dict[str, dict[str, dict[str, float]]] | None = None) -> str:
    """The timings; with ``counts`` (:func:`launches` per method and row) a second table of launches."""
    lines = ["| method | ddray (ms / iteration) | plain eager loop (ms / iteration) | ddray / plain |",
             "| --- | ---: | ---: | ---: |"]
    for method, f in figures.items():
        for row in (r for r in f if r != "plain"):  # "ddray", and on a GPU "ddray, no graphs" too
            name = method if row == "ddray" else f"{method} ({row})"
            lines.append(f"| {name} | {f[row]:.1f} | {f['plain']:.1f} | {f[row] / f['plain']:.2f}× |")
    if counts:
        lines += ["", "| method, row | ms / iteration | host operator calls | GPU kernels | GPU busy ms |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for method, rows in counts.items():
            for row, c in rows.items():
                cells = [f"{c[k]:.0f}" if k in c else "–" for k in ("calls", "kernels")]
                busy = f"{c['busy ms']:.1f}" if "busy ms" in c else "–"
                lines.append(f"| {method}, {row} | {figures[method][row]:.1f} | {' | '.join(cells)} | {busy} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["dm", "mtt"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ipc", type=int, default=Sizes.ipc)
    ap.add_argument("--width", type=int, default=Sizes.width)
    ap.add_argument("--real-per-class", type=int, default=Sizes.real_per_class)
    ap.add_argument("--syn-steps", type=int, default=Sizes.syn_steps)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    import ddray  # noqa: F401  (its thread settings, as users get them)

    device = torch.device(args.device)
    sizes = Sizes(args.ipc, args.width, args.real_per_class, args.syn_steps)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPUs"
    print(f"# {where}, torch {torch.__version__}, {sizes}, median of {args.reps}")
    figures, counts, peaks = {}, {}, {}
    for m in args.methods:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        rows = METHODS[m](sizes, device)
        figures[m] = time_rows(rows, device, args.reps)
        counts[m] = {name: launches(row, args.reps + 2, device) for name, row in rows.items()}
        if device.type == "cuda":  # every row's, the captured ones' graphs (their memory pool) included
            peaks[f"{m} peak GiB reserved"] = torch.cuda.max_memory_reserved(device) / 2 ** 30
        del rows
    print(table(figures, counts))
    for name, gib in peaks.items():
        print(f"# {name}: {gib:.2f}")
    flat = {f"{m} {row} ms": ms for m, rows in figures.items() for row, ms in rows.items()}
    flat.update(peaks)
    flat.update({f"{m} ddray/plain": rows["ddray"] / rows["plain"] for m, rows in figures.items()})
    flat.update({f"{m} {row} {k}": v for m, rows in counts.items() for row, c in rows.items() for k, v in c.items()})
    print("FIGURES " + json.dumps(flat))  # for bench/gpu_check.py's results file
    if args.json:
        Path(args.json).write_text(json.dumps({"device": where, "sizes": vars(sizes), "ms": figures,
                                               "launches": counts}, indent=1) + "\n")


if __name__ == "__main__":
    main()
