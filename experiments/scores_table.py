"""DD-Ranking's scores for DD and MTT with hard and learned labels, on MNIST-5k and CIFAR-10, on one CPU thread.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/scores_table.py --dataset mnist5k [--out runs/scores]
    OMP_NUM_THREADS=1 .venv/bin/python experiments/scores_table.py --dataset cifar10 \\
        --data-root cifar10-jpeg.tar.gz [--experts DIR] [--json experiments/results/scores_cifar10.json]

Each row is one ``distill(cfg)`` (the single-process path; the Ray workers compute the same
meta-gradients) at the CPU budget of :data:`BUDGETS`, then its evaluation and its scores
(:mod:`ddray.evaluation.scores`): the set against a random real subset of its size — with the set's own
labels, the same labels budget — and the full training split, all by protocol dc on the same
ConvNet (:data:`WIDTH` channels) from the same held-out θ₀s. Images per class count the whole set:
DD at 1 image per class learns S = 1 batch trained for E = 10 epochs, at 10 the original's S = 10
batches × E = 3 epochs. MTT's experts: ``--experts DIR`` (``ddray experts`` for this data set and
width), else :data:`EXPERTS` trained here. OUT/<dataset>.json is written after every row, so an
interrupted table resumes; the markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from ddray.config import Config
from ddray.core.augment import DEFAULT_STRATEGY, augment
from ddray.inputs.experts import ExpertSettings, train_experts
from ddray.inputs.sources import load_data
from ddray.run.loop import distill

WIDTH = 32  # ConvNet channels on this CPU (the papers: 128)
EXPERTS: dict[str, Any] = dict(count=2, epochs=4, lr=0.01, batch_size=256)  # (MTT: 100 experts × 50 epochs)
DATA: dict[str, dict[str, Any]] = {  # per data set: its config and the scores' evaluation budget
    "mnist5k": dict(dataset="mnist5k", eval_nets=5, eval_epochs=300, full_epochs=20),
    "cifar10": dict(dataset="imagefolder", eval_nets=3, eval_epochs=300, full_epochs=2),
}
BUDGETS: dict[str, dict[int, dict[str, Any]]] = {  # method → images per class → flat config fields
    "dd": {1: dict(steps=1, epochs=10, iterations=200), 10: dict(steps=10, epochs=3, iterations=150)},
    "mtt": {1: dict(ipc=1, iterations=200), 10: dict(ipc=10, iterations=100)},
}
COMMON: dict[str, Any] = dict(model="convnet", width=WIDTH, init_scheme="default", nets=1, seed=0, scores=True,
                              tracking=False)
METHOD: dict[str, dict[str, Any]] = {
    "dd": dict(method="dd", ipc=1, batch_size=1024),
    "mtt": dict(method="mtt", syn_steps=10, expert_epochs=1, max_start_epoch=2),
}
LABELS = ("hard", "learned")


def rows() -> list[tuple[str, int, str]]:
    return [(m, ipc, labels) for ipc in (1, 10) for m in ("dd", "mtt") for labels in LABELS]


def row_key(method: str, ipc: int, labels: str) -> str:
    return f"{method}-{ipc}-{labels}"


def run_row(base: Config, method: str, ipc: int, labels: str, out: Path, experts: Path) -> dict[str, Any]:
    cfg = base.override(**METHOD[method], **BUDGETS[method][ipc], labels=labels,
                        out=str(out / row_key(method, ipc, labels)),
                        experts=str(experts) if method == "mtt" else None)
    t0 = time.perf_counter()
    r = distill(cfg, progress=False)
    assert r.result is not None and r.scores is not None
    return {"accuracy": {"mean": r.result.mean, "std": r.result.std, "n": r.result.n,
                         "protocol": cfg.protocol},
            "scores": r.scores.to_dict(), "seconds": time.perf_counter() - t0,
            "seconds_per_step": r.seconds_per_step, "config": cfg.to_dict()}


def table(results: dict[str, Any]) -> str:
    """The markdown table of the finished rows (points)."""
    lines = ["| method | img/class | labels | accuracy (own protocol) | HLR | IOR | LRS | ARS | set bytes | "
             "full / syn / random (dc) | meta-steps | wall |", "|" + "---|" * 12]
    for method, ipc, labels in rows():
        res = results["rows"].get(row_key(method, ipc, labels))
        if res is None:
            continue
        a, s = res["accuracy"], res["scores"]
        sc = [f"{100 * s['mean'][k]:.1f} ± {100 * s['std'][k]:.1f}" for k in ("hlr", "ior", "lrs", "ars")]
        acc = s["accuracy"]
        lines.append(f"| {method.upper()} | {ipc} | {labels} | {100 * a['mean']:.1f} ± {100 * a['std']:.1f} "
                     f"({a['protocol']}) | {' | '.join(sc)} | {s['set_bytes']:,} | "
                     f"{100 * acc['full']:.1f} / {100 * acc['syn']:.1f} / {100 * acc['random']:.1f} | "
                     f"{res['config']['distill']['iterations']} | {res['seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=list(DATA), required=True)
    p.add_argument("--data-root", help="cifar10: train/<class>/*, test/<class>/* (or an archive of them)")
    p.add_argument("--cache-dir", help="where the images are decoded once (default OUT/cache)")
    p.add_argument("--experts", help="MTT's expert trajectories for this data set (default: trained into OUT)")
    p.add_argument("--out", default="runs/scores")
    p.add_argument("--rows", nargs="+", help="row keys, e.g. dd-1-hard mtt-10-learned (default all)")
    p.add_argument("--json", help="also copy the results here")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out) / args.dataset
    out.mkdir(parents=True, exist_ok=True)
    data = DATA[args.dataset]
    base = Config.from_dict({}).override(**COMMON, **data, data_root=args.data_root,
                                         cache_dir=args.cache_dir or str(out / "cache"))
    experts = Path(args.experts) if args.experts else out / "experts"
    if not (experts / "experts.json").is_file():
        settings = ExpertSettings(model="convnet", width=WIDTH, epochs=EXPERTS["epochs"], lr=EXPERTS["lr"],
                                  batch_size=EXPERTS["batch_size"], dsa_strategy=DEFAULT_STRATEGY)
        train_experts(load_data(base.data), settings, EXPERTS["count"], experts, progress=False,
                      augment=lambda x, g: augment(x, DEFAULT_STRATEGY, g))
    path = out / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    results.update(dataset=args.dataset, data_root=args.data_root, experts=str(experts), width=WIDTH,
                   eval={k: data[k] for k in ("eval_nets", "eval_epochs", "full_epochs")}, torch_threads=1)
    for method, ipc, labels in rows():
        key = row_key(method, ipc, labels)
        if key in results["rows"] or (args.rows and key not in args.rows):
            continue
        print(f"{key} …", flush=True)
        results["rows"][key] = run_row(base, method, ipc, labels, out, experts)
        path.write_text(json.dumps(results, indent=1))
        print(table(results), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
