"""OpenMP's wait policy against the DD meta-step on CPU: quiet, and beside another busy process.

A meta-step at K = 1 is thousands of small ops (LeNet on 10 images, 30 inner steps), each a
short OpenMP parallel region. Between two regions an idle thread either spins (fast to wake,
but it takes a core) or sleeps (free, but each region then pays a futex wake-up). Which wins
depends on whether the process's threads have the cores to themselves: quiet, spinning wins;
beside another busy process, a long spin takes the core the other thread of the region needs.

Policies (each row a fresh subprocess; the environment is set before torch loads OpenMP):
* ``passive`` — ``OMP_WAIT_POLICY=PASSIVE``, ``KMP_BLOCKTIME=0``: sleep at once;
* ``default`` — nothing set: libgomp spins up to its default spin count, then sleeps;
* ``spin N`` — ``GOMP_SPINCOUNT=N`` (and ``KMP_BLOCKTIME=1``): a bounded spin, then sleep;
* ``active`` — ``OMP_WAIT_POLICY=ACTIVE``: spin without bound;
* ``ddray`` — whatever ``import ddray`` chooses (:mod:`ddray.threads`).

Workloads: the naive unroll (``bench/bench_core.py``'s) and ddray's core meta-gradient, both
K = 1 on the default MNIST-5k shapes, with ``--threads`` torch threads (default: the cores).
"loaded" runs the same beside ``--load-procs`` competing processes, each keeping ``--threads``
threads busy with small matrix products (other jobs on the same machine, with OpenMP's default
policy).

Usage: python bench/bench_wait_policy.py [--reps 7] [--threads N] [--spins 1000 10000 100000] [--load-procs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WAIT_VARS = ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")


def policies(spins: list[int]) -> dict[str, dict[str, str] | None]:
    """name → the wait variables of the row (None: leave them to ``import ddray``)."""
    rows: dict[str, dict[str, str] | None] = {"passive": {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"},
                                              "default": {}}
    rows.update({f"spin {n}": {"GOMP_SPINCOUNT": str(n), "KMP_BLOCKTIME": "1"} for n in spins})
    rows["active"] = {"OMP_WAIT_POLICY": "ACTIVE"}
    rows["ddray"] = None
    return rows


def measure(kind: str, threads: int, reps: int) -> float:
    """Inside a row's subprocess: median ms of ``reps`` meta-steps after two warm-up ones."""
    import torch

    sys.path.insert(0, str(HERE))
    from bench_core import ReluPoolLeNet, naive_meta_step

    from ddray.core.inits import RandomInit
    from ddray.core.models import build_model, unstack_params
    from ddray.core.unroll import meta_gradient

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    model = build_model("lenet", (1, 28, 28), 10)
    images, labels = torch.randn(10, 10, 1, 28, 28, generator=g), torch.arange(10)
    raw = torch.full((30,), -3.9)
    x, y = torch.randn(1024, 1, 28, 28, generator=g), torch.randint(10, (1024,), generator=g)
    sampler = RandomInit(model, "xavier", 0)
    naive = ReluPoolLeNet()
    times = []
    for r in range(reps + 2):
        params0 = sampler.sample([(0, r, 0)])
        t0 = time.perf_counter()
        if kind == "naive":
            naive_meta_step(naive, unstack_params(params0), images, labels, raw, x, y)
        else:
            meta_gradient(model, params0, images, labels, raw, x, y)
        if r >= 2:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def burn(threads: int) -> None:
    """The competing process: ``threads`` threads of small matrix products, until killed."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(256, 256)
    while True:
        a = torch.tanh(a @ a)


def env_for(policy: dict[str, str] | None) -> dict[str, str]:
    """The environment of a row: this one without wait variables, plus the row's (none for ``ddray``)."""
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARS}
    return {**env, **(policy or {})}


def row(kind: str, policy: dict[str, str] | None, threads: int, reps: int) -> float:
    code = ("import ddray; " if policy is None else "import torch; ") + \
        f"import importlib.util as u; s = u.spec_from_file_location('b', {str(Path(__file__))!r}); " \
        "m = u.module_from_spec(s); s.loader.exec_module(m); " \
        f"print(m.measure({kind!r}, {threads}, {reps}))"
    out = subprocess.run([sys.executable, "-c", code], env=env_for(policy), capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--spins", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--load-procs", type=int, default=1, help="competing processes in the loaded rows")
    ap.add_argument("--only", nargs="+", help="only these policies (names as in the table)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    rows = {k: v for k, v in policies(args.spins).items() if not args.only or k in args.only}
    results: dict[str, dict[str, float]] = {}
    print(f"# {os.cpu_count()} CPUs, {args.threads} torch threads, median of {args.reps} meta-steps (ms), "
          f"loaded: {args.load_procs} competing process(es), load before: {os.getloadavg()[0]:.2f}")
    print("\n| policy | naive, quiet | ddray core, quiet | naive, loaded | ddray core, loaded |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, policy in rows.items():
        figs = {f"{kind}, quiet": row(kind, policy, args.threads, args.reps) for kind in ("naive", "core")}
        loads = [subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); "
                                   f"import bench_wait_policy as b; b.burn({args.threads})"], env=env_for({}))
                 for _ in range(args.load_procs)]
        try:
            time.sleep(1.0)
            figs.update({f"{kind}, loaded": row(kind, policy, args.threads, args.reps) for kind in ("naive", "core")})
        finally:
            for load in loads:
                load.kill()
                load.wait()
        results[name] = figs
        print(f"| {name} | {figs['naive, quiet']:.0f} | {figs['core, quiet']:.0f} | {figs['naive, loaded']:.0f} | "
              f"{figs['core, loaded']:.0f} |", flush=True)
    print(f"\nload after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
