"""Regenerate the README results table: MNIST-5k, LeNet, S=10, E=3, M=1 (100 images).

For each init mode (fixed, random) it distils in-process (the single-process
reference path), evaluates on 20 held-out networks (fixed init: its own θ₀), and
evaluates the four real-image baselines at the same budget with the same code, in
the same run. Prints a Markdown table with wall times; writes JSON next to it.

Usage: python experiments/mnist5k_table.py [--iterations 1000] [--random-nets 4] [--out runs/table]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from ddray.config import load_config
from ddray.evaluation.held_out import run_baselines
from ddray.run.loop import distill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--fixed-nets", type=int, default=1)
    ap.add_argument("--random-nets", type=int, default=4)
    ap.add_argument("--modes", nargs="+", default=["fixed", "random"],
                    help="init modes; 'attack' is random init with --attack 0:1")
    ap.add_argument("--pretrained", help="pool directory for the pretrained modes (ddray pretrain)")
    ap.add_argument("--out", default="runs/table")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows, record = [], {}
    for mode in args.modes:
        nets = args.fixed_nets if mode == "fixed" else args.random_nets
        init = "random" if mode == "attack" else mode
        cfg = load_config(None, init=init, nets=nets, iterations=args.iterations, out=str(out / mode),
                          tracking=False, attack="0:1" if mode == "attack" else None,
                          pretrained=args.pretrained if "pretrained" in mode else None)
        t0 = time.perf_counter()
        r = distill(cfg, progress=False)
        wall = time.perf_counter() - t0
        t1 = time.perf_counter()
        base = run_baselines(cfg, out / mode)
        base_wall = time.perf_counter() - t1
        assert r.result is not None and r.shuffled is not None
        rows.append((mode, nets, r.result, r.shuffled, base, wall, r.seconds_per_step, base_wall))
        record[mode] = {"nets": nets, "iterations": args.iterations, "ddray": r.result.to_dict(),
                        "shuffled": r.shuffled.to_dict(), "baselines": {m: b.to_dict() for m, b in base},
                        "wall_s": wall, "s_per_step": r.seconds_per_step, "baselines_wall_s": base_wall}
        print(json.dumps(record[mode]), flush=True)

    def pct(res: object) -> str:
        s = f"{100 * res.mean:.1f} ± {100 * res.std:.1f}"  # type: ignore[attr-defined]
        rate = getattr(res, "attack_rate_mean", None)
        return s if rate is None else f"{s} (0→1: {100 * rate:.0f} %)"

    print(f"\nMNIST-5k, LeNet, 10 steps × 3 epochs × 1 image/class, {args.iterations} meta-steps; "
          f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}\n")
    print("| init | K | ddray | shuffled order | random real | optimized real | k-means | average | "
          "distil wall (s/step) | baselines wall |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, nets, res, shuf, base, wall, sps, bw in rows:
        b = dict(base)
        print(f"| {mode} | {nets} | **{pct(res)}** | {pct(shuf)} | {pct(b['random'])} | {pct(b['optimized'])} | "
              f"{pct(b['kmeans'])} | {pct(b['average'])} | {wall:.0f} s ({sps:.3f}) | {bw:.0f} s |")
    (out / "table.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
