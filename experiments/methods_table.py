"""The methods table: DC, DSA, DM and MTT on MNIST-5k against random real images, one evaluation for all.

    .venv/bin/python experiments/methods_table.py [--out runs/methods] [--ipc 1 10] [--methods dc dsa dm mtt]

For each images-per-class budget it evaluates random real images (the baseline) and
every method's distilled set under the *same* protocol — ``ddray evaluate --protocol dc``:
ConvNet-3 (instance norm, the CPU width below) trained from scratch, SGD 0.01, momentum
0.9, weight decay 5e-4, lr ×0.1 at half, batch 256, DSA, ``EVAL_EPOCHS`` epochs,
``EVAL_NETS`` fresh networks (MTT trains with its learned step size, as in its paper).
Each run is one ``ddray distill --local`` (the single-process path; the Ray workers
compute the same meta-gradients) with the CPU budget in ``BUDGETS``; MTT's experts are
trained first (``ddray experts``, resumable) and their time is reported separately.

Writes OUT/results.json (after every run, so a partial table survives) and prints the
markdown table that README.md shows; ``--readme`` replaces it between the markers
``<!-- methods-table -->`` … ``<!-- /methods-table -->``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from ddray.config import Config
from ddray.core.augment import DEFAULT_STRATEGY, augment
from ddray.core.inits import SYN_INIT, generator
from ddray.core.models import build_model
from ddray.core.protocol_dc import ProtocolDC, evaluate_protocol_dc
from ddray.core.synthetic import SyntheticSet
from ddray.data import load_dataset
from ddray.inputs.experts import ExpertSettings, train_experts
from ddray.run.loop import distill

WIDTH = 32  # ConvNet channels on this CPU (the papers: 128)
EVAL_EPOCHS, EVAL_NETS = 300, 5
EXPERTS = dict(count=5, epochs=15, lr=0.01, batch_size=32)  # 125 SGD steps per epoch on 4,000 images
COMMON: dict[str, Any] = dict(dataset="mnist5k", model="convnet", width=WIDTH, nets=1, eval_nets=EVAL_NETS,
                              eval_epochs=EVAL_EPOCHS, checkpoint_every=50, seed=0, tracking=False)
# method → ipc → config (the CPU budget: meta-steps and real images per class)
BUDGETS: dict[str, dict[int, dict[str, Any]]] = {
    "dc": {1: dict(iterations=1000, real_per_class=64), 10: dict(iterations=500, real_per_class=64)},
    "dsa": {1: dict(iterations=1000, real_per_class=64), 10: dict(iterations=500, real_per_class=64)},
    "dm": {1: dict(iterations=3000, real_per_class=64), 10: dict(iterations=2000, real_per_class=64)},
    "mtt": {1: dict(iterations=2000, syn_steps=20, expert_epochs=2, max_start_epoch=10),
            10: dict(iterations=300, syn_steps=20, expert_epochs=2, max_start_epoch=10)},
}
MARK = ("<!-- methods-table -->", "<!-- /methods-table -->")


def random_real(ipc: int, protocol: ProtocolDC) -> dict[str, Any]:
    """Random real images of the budget (drawn as --syn-init real does) under the protocol."""
    data = load_dataset("mnist5k")
    syn = SyntheticSet.initial(1, 1, ipc, data.num_classes, data.shape, 0.01, generator(0, SYN_INIT),
                               (data.x_train, data.y_train))
    t0 = time.perf_counter()
    r = evaluate_protocol_dc(build_model("convnet", data.shape, data.num_classes, WIDTH), syn.images,
                             syn.labels, data.x_test, data.y_test, protocol, seed=0)
    return {"mean": r.mean, "std": r.std, "n": r.n, "seconds": time.perf_counter() - t0}


def run_method(method: str, ipc: int, out: Path, experts: Path | None) -> dict[str, Any]:
    cfg = Config().override(**COMMON, **BUDGETS[method][ipc], method=method, ipc=ipc, out=str(out),
                            experts=str(experts) if method == "mtt" else None)
    t0 = time.perf_counter()
    r = distill(cfg, progress=False)
    seconds = time.perf_counter() - t0
    assert r.result is not None
    return {"mean": r.result.mean, "std": r.result.std, "n": r.result.n, "seconds": seconds,
            "seconds_per_step": r.seconds_per_step, "budget": BUDGETS[method][ipc], "out": str(out)}


def table(results: dict[str, Any]) -> str:
    ipcs = sorted({int(k) for k in results.get("random", {})})
    head = "| set | " + " | ".join(f"{i} img/class" for i in ipcs) + " | wall time per run | budget (meta-steps) |"
    lines = [head, "|---|" + "---|" * len(ipcs) + "---|---|"]
    for name in ("random", "dc", "dsa", "dm", "mtt"):
        row = results.get(name)
        if not row:
            continue
        cells = [f"{100 * row[str(i)]['mean']:.1f} ± {100 * row[str(i)]['std']:.1f}" if str(i) in row else "—"
                 for i in ipcs]
        times = " / ".join(f"{row[str(i)]['seconds'] / 60:.1f} min" for i in ipcs if str(i) in row)
        budget = " / ".join(str(row[str(i)].get("budget", {}).get("iterations", "—")) for i in ipcs if str(i) in row)
        label = "random real images" if name == "random" else name.upper()
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {times} | {budget} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/methods")
    p.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    p.add_argument("--methods", nargs="+", default=["dc", "dsa", "dm", "mtt"])
    p.add_argument("--readme", help="README to update between the methods-table markers")
    a = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.set_num_threads(os.cpu_count() or 1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def save(name: str, ipc: int, row: dict[str, Any]) -> None:
        results.setdefault(name, {})[str(ipc)] = row
        path.write_text(json.dumps(results, indent=2))
        print(f"{name} ipc {ipc}: {100 * row['mean']:.1f} ± {100 * row['std']:.1f} % in {row['seconds']:.0f} s",
              flush=True)

    protocol = ProtocolDC(epochs=EVAL_EPOCHS, nets=EVAL_NETS, dsa_strategy=DEFAULT_STRATEGY)
    for ipc in a.ipc:
        if str(ipc) not in results.get("random", {}):
            save("random", ipc, random_real(ipc, protocol))
    experts = out / "experts"
    if "mtt" in a.methods and "experts" not in results:
        t0 = time.perf_counter()
        settings = ExpertSettings(model="convnet", width=WIDTH, epochs=EXPERTS["epochs"], lr=EXPERTS["lr"],
                                  batch_size=EXPERTS["batch_size"], dsa_strategy=DEFAULT_STRATEGY)
        train_experts(load_dataset("mnist5k"), settings, EXPERTS["count"], experts, progress=False,
                      augment=lambda x, g: augment(x, DEFAULT_STRATEGY, g))
        results["experts"] = {**EXPERTS, "seconds": time.perf_counter() - t0}
        path.write_text(json.dumps(results, indent=2))
    for method in a.methods:
        for ipc in a.ipc:
            if str(ipc) not in results.get(method, {}):
                save(method, ipc, run_method(method, ipc, out / f"{method}-ipc{ipc}", experts))
    md = table(results)
    print(md)
    if a.readme:
        readme = Path(a.readme)
        text = readme.read_text()
        start, end = text.index(MARK[0]) + len(MARK[0]), text.index(MARK[1])
        readme.write_text(text[:start] + "\n" + md + "\n" + text[end:])


if __name__ == "__main__":
    main()
