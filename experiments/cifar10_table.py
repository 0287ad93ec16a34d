"""The CIFAR-10 table: DD, DC, DSA, DM (and MTT) on real CIFAR-10 read from an image archive, on one CPU thread.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/cifar10_table.py --data-root cifar10-jpeg.tar.gz \\
        [--out runs/cifar10] [--rows random-1 dc-1 …] [--json experiments/results/cifar10.json] [--doc README.md]

The data are the user's images (``--dataset imagefolder``): a ``.tar.gz`` of
``train/<class>/*`` and ``test/<class>/*`` (CIFAR-10 as JPEGs, quality ~75, decoded once
into the uint8 cache ``OUT/cache``). Each row is one ``distill(cfg)`` in this process
(the single-process path; the Ray workers compute the same meta-gradients) with the
CPU budget in :data:`ROWS`, and is set beside its paper's figure and random real images
of the same budget:

* DD (Wang et al.): AlexCifarNet, S = 10 steps × E = 3 epochs × 1 image per class,
  evaluated with protocol ``dd`` (the set's own step sizes; fixed init: its one θ₀,
  random init: fresh θ₀s); its random real images are ``ddray baseline --method random``
  (a step size tuned on training images, then the same evaluation).
* DC, DSA, DM (and MTT): ConvNet at :data:`WIDTH`, all evaluated — with random real
  images drawn as ``--syn-init real`` does — by the *same* protocol ``dc``: ConvNet trained
  from scratch, SGD 0.01, momentum 0.9, weight decay 5e-4, lr ×0.1 at half, batch 256, DSA,
  :data:`EVAL_EPOCHS` epochs, :data:`EVAL_NETS` fresh networks.

Rows run in the order given (default :data:`ORDER`: the most informative first).
OUT/results.json is written after every row (with the commit it ran on, so a partial
table survives and a rerun skips finished rows); the markdown table is printed at the
end and, with ``--doc``, replaces the text between ``<!-- cifar10-table -->`` and
``<!-- /cifar10-table -->``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddray.config import Config
from ddray.core.augment import DEFAULT_STRATEGY, augment
from ddray.core.inits import SYN_INIT, generator
from ddray.core.models import build_model
from ddray.core.protocol_dc import ProtocolDC, evaluate_protocol_dc
from ddray.core.synthetic import SyntheticSet
from ddray.evaluation.held_out import run_baselines
from ddray.inputs.experts import ExpertSettings, train_experts
from ddray.inputs.sources import load_data
from ddray.run.loop import distill

WIDTH = 32  # ConvNet channels on this CPU (the papers: 128)
EVAL_EPOCHS, EVAL_NETS = 300, 5  # protocol dc (the papers: 1000 epochs, 20 networks)
DD_EVAL_NETS = 3  # protocol dd, random init: fresh θ₀s (fixed init has one θ₀, so one network)
EXPERTS: dict[str, Any] = dict(count=2, epochs=4, lr=0.01, batch_size=256)  # MTT's expert trajectories (the paper: 100 × 50)
MARK = ("<!-- cifar10-table -->", "<!-- /cifar10-table -->")


@dataclass(frozen=True)
class Row:
    """One line of the table: a method's run at a budget, and its paper's figure."""

    key: str
    label: str
    ipc: int
    published: str  # the paper's test accuracy, %
    paper_budget: str  # the paper's meta-steps (to say where this CPU budget falls short)
    config: dict[str, Any] = field(default_factory=dict)  # flat Config fields of the run (None: random real)

    @property
    def method(self) -> str:
        return str(self.config.get("method", "random"))


CONVNET: dict[str, Any] = dict(model="convnet", width=WIDTH, init_scheme="default", nets=1,
                               eval_protocol="dc", eval_nets=EVAL_NETS, eval_epochs=EVAL_EPOCHS)
DD: dict[str, Any] = dict(method="dd", model="alexcifarnet", init_scheme="xavier", steps=10, epochs=3, ipc=1,
                          nets=1, batch_size=1024, eval_protocol="dd")
ROWS: dict[str, Row] = {r.key: r for r in [
    Row("random-1", "random real images", 1, "14.4", "—"),
    Row("random-10", "random real images", 10, "26.0", "—"),
    Row("dd-fixed", "DD, fixed init (AlexCifarNet)", 1, "54.0", "cifar10_paper.yaml: 8,000",
        dict(DD, init="fixed", iterations=60, eval_nets=1)),
    Row("dd-random", "DD, random init (AlexCifarNet)", 1, "36.8 ± 1.2", "cifar10_paper.yaml: 8,000",
        dict(DD, init="random", iterations=30, eval_nets=DD_EVAL_NETS)),
    Row("dc-1", "DC", 1, "28.3", "1,000", dict(CONVNET, method="dc", ipc=1, iterations=300, real_per_class=64)),
    Row("dc-10", "DC", 10, "44.9", "10,000 = 1,000 × 10 outer",
        dict(CONVNET, method="dc", ipc=10, iterations=50, real_per_class=64)),
    Row("dsa-1", "DSA", 1, "28.8", "1,000", dict(CONVNET, method="dsa", ipc=1, iterations=300, real_per_class=64)),
    Row("dsa-10", "DSA", 10, "52.1", "10,000 = 1,000 × 10 outer",
        dict(CONVNET, method="dsa", ipc=10, iterations=50, real_per_class=64)),
    Row("dm-1", "DM", 1, "26.0", "20,000", dict(CONVNET, method="dm", ipc=1, iterations=500, real_per_class=64)),
    Row("dm-10", "DM", 10, "48.9", "20,000", dict(CONVNET, method="dm", ipc=10, iterations=500, real_per_class=64)),
    Row("mtt-1", "MTT", 1, "46.3", "5,000, 100 experts × 50 epochs",
        dict(CONVNET, method="mtt", ipc=1, iterations=200, syn_steps=10, expert_epochs=1, max_start_epoch=2)),
]}
ORDER = ("random-1", "random-10", "dm-1", "dc-1", "dd-fixed", "dsa-1", "dm-10", "dc-10", "dsa-10", "dd-random",
         "mtt-1")  # the order the rows run in: the most informative first
TABLE = ("dd-fixed", "dd-random", "dc-1", "dsa-1", "dm-1", "mtt-1", "dc-10", "dsa-10", "dm-10")  # as printed


def commit() -> str:
    """HEAD of the checkout this runs from, ``+dirty`` when ddray/ has changes not committed."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "ddray") else "")


def budget(cfg: Config) -> dict[str, Any]:
    """What the run spent: meta-steps, networks per meta-step, width, real images per class."""
    d = cfg.distill
    b: dict[str, Any] = {"iterations": d.iterations, "nets": d.nets, "model": cfg.model.model}
    if cfg.model.model == "convnet":
        b["width"] = cfg.model.width
    if d.method in ("dc", "dsa", "dm"):
        b["real_per_class"] = d.real_per_class
    if d.method == "dd":
        b.update(steps=d.steps, epochs=d.epochs, batch_size=d.batch_size)
    if d.method == "mtt":
        b.update(syn_steps=d.syn_steps, expert_epochs=d.expert_epochs, max_start_epoch=d.max_start_epoch)
    return b


def random_real(base: Config, ipc: int) -> dict[str, Any]:
    """Random real images of the budget (drawn as --syn-init real does) under protocol dc."""
    data = load_data(base.data)
    syn = SyntheticSet.initial(1, 1, ipc, data.num_classes, data.shape, 0.01, generator(0, SYN_INIT),
                               (data.x_train, data.y_train))
    protocol = ProtocolDC(epochs=EVAL_EPOCHS, nets=EVAL_NETS, dsa_strategy=DEFAULT_STRATEGY)
    t0 = time.perf_counter()
    r = evaluate_protocol_dc(build_model("convnet", data.shape, data.num_classes, WIDTH), syn.images,
                             syn.labels, data.x_test, data.y_test, protocol, seed=0)
    return {"mean": r.mean, "std": r.std, "n": r.n, "seconds": time.perf_counter() - t0,
            "budget": {"ipc": ipc, "width": WIDTH, "eval_epochs": EVAL_EPOCHS}}


def experts(base: Config, out: Path) -> dict[str, Any]:
    """MTT's expert trajectories (resumable) on the real training split."""
    t0 = time.perf_counter()
    settings = ExpertSettings(model="convnet", width=WIDTH, epochs=EXPERTS["epochs"], lr=EXPERTS["lr"],
                              batch_size=EXPERTS["batch_size"], dsa_strategy=DEFAULT_STRATEGY)
    train_experts(load_data(base.data), settings, EXPERTS["count"], out, progress=False,
                  augment=lambda x, g: augment(x, DEFAULT_STRATEGY, g))
    return {**EXPERTS, "seconds": time.perf_counter() - t0}


def run_row(row: Row, base: Config, out: Path) -> dict[str, Any]:
    """Distil (and for DD, build its random real baseline); the row's figures."""
    cfg = base.override(**row.config, out=str(out / row.key),
                        experts=str(out / "experts") if row.method == "mtt" else None)
    t0 = time.perf_counter()
    r = distill(cfg, progress=False)
    seconds = time.perf_counter() - t0
    assert r.result is not None
    res: dict[str, Any] = {"mean": r.result.mean, "std": r.result.std, "n": r.result.n, "seconds": seconds,
                           "seconds_per_step": r.seconds_per_step, "budget": budget(cfg), "out": str(out / row.key)}
    if r.shuffled is not None:
        res["shuffled"] = {"mean": r.shuffled.mean, "std": r.shuffled.std}
    if row.method == "dd":  # DD's own real-image baseline: a tuned constant step size, the same evaluation
        t0 = time.perf_counter()
        [(_, b)] = run_baselines(cfg, out / row.key, ["random"])
        res["random_real"] = {"mean": b.mean, "std": b.std, "n": b.n, "seconds": time.perf_counter() - t0}
    return res


def pct(r: dict[str, Any]) -> str:
    return f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}"


def table(results: dict[str, Any]) -> str:
    """The markdown table of the finished rows."""
    lines = ["| method | img/class | ddray | published | random real (ddray / published) | meta-steps "
             "(paper) | K | width | real/class | wall |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key in TABLE:
        row, res = ROWS[key], results.get("rows", {}).get(key)
        if res is None:
            continue
        b = res["budget"]
        if row.method == "dd":
            rnd = f"{pct(res['random_real'])} / —"
            wall = res["seconds"] + res["random_real"]["seconds"]
        else:
            base = results["rows"].get(f"random-{row.ipc}")
            rnd = f"{pct(base) if base else '—'} / {ROWS[f'random-{row.ipc}'].published}"
            wall = res["seconds"] + (results.get("experts", {}).get("seconds", 0) if row.method == "mtt" else 0)
        lines.append(f"| {row.label} | {row.ipc} | {pct(res)} (n = {res['n']}) | {row.published} | {rnd} | "
                     f"{b['iterations']:,} ({row.paper_budget}) | {b['nets']} | {b.get('width', '—')} | "
                     f"{b.get('real_per_class', b.get('batch_size', '—'))} | {wall / 60:.1f} min |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, help="CIFAR-10 as train/<class>/*, test/<class>/* (or an archive)")
    p.add_argument("--out", default="runs/cifar10")
    p.add_argument("--rows", nargs="+", default=list(ORDER), choices=list(ROWS))
    p.add_argument("--json", help="also copy results.json here (e.g. experiments/results/cifar10.json)")
    p.add_argument("--doc", help="a Markdown file to update between the cifar10-table markers")
    a = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    results.update(data_root=a.data_root, torch_threads=torch.get_num_threads(),
                   eval={"dc": {"epochs": EVAL_EPOCHS, "nets": EVAL_NETS, "width": WIDTH},
                         "dd": {"nets_random_init": DD_EVAL_NETS, "nets_fixed_init": 1}})
    base = Config().override(dataset="imagefolder", data_root=a.data_root, cache_dir=str(out / "cache"),
                             seed=0, checkpoint_every=50, tracking=False)
    started = commit()  # the code this process imported
    results.setdefault("dirty_at_start", {})[started] = subprocess.run(
        ["git", "status", "--porcelain", "ddray"], capture_output=True, text=True, check=False).stdout.split("\n")[:-1]

    def save(key: str, res: dict[str, Any]) -> None:
        results.setdefault("rows", {})[key] = {**res, "commit": started, "finished": time.strftime("%H:%M:%S")}
        text = json.dumps(results, indent=2)
        path.write_text(text)
        if a.json:
            Path(a.json).write_text(text + "\n")
        print(f"{key}: {pct(res)} % in {res['seconds']:.0f} s", flush=True)

    for key in a.rows:
        if key in results.get("rows", {}):
            continue
        row = ROWS[key]
        if row.method == "random":
            save(key, random_real(base, row.ipc))
            continue
        if row.method == "mtt" and "experts" not in results:
            results["experts"] = experts(base, out / "experts")
        save(key, run_row(row, base, out))
    md = table(results)
    print(md)
    if a.doc:
        doc = Path(a.doc)
        text = doc.read_text()
        start, end = text.index(MARK[0]) + len(MARK[0]), text.index(MARK[1])
        doc.write_text(text[:start] + "\n" + md + "\n" + text[end:])


if __name__ == "__main__":
    main()
