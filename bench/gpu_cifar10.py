"""CIFAR-10 at the papers' budgets on one GPU, as far as they fit: one command, one results file.

    source .device/env.sh && python3 bench/gpu_cifar10.py [--data-root .device/cifar10-jpeg.tar.gz] \
        [--budget-s 420]

Rows (the CIFAR-10 table of experiments/cifar10_table.py, now at the papers' settings):

* ``dm-1``, ``dm-10`` — DM (experiments/cifar10/dm_ipc{1,10}.yaml: ConvNet-128, 256 real images per class,
  one network per iteration, lr 1.0; paper 20,000 iterations);
* ``dc-1`` — DC (experiments/cifar10/dc_ipc1.yaml; paper 1,000 iterations);
* ``dd-fixed`` — DD with fixed init (AlexCifarNet, 10 steps × 3 epochs, 1 image per class per step;
  tune_configs/cifar10_paper.yaml's settings; paper 8,000 meta-steps).

Each row runs ``ddray distill`` through Ray — one worker holding the GPU — from the archive's images (no
tracking, no scores). A row gets its share of ``--budget-s`` for meta-steps: it stops at the first checkpoint past its deadline
(or at the paper's budget) and is then evaluated by the DC line's protocol — ConvNet (AlexCifarNet for DD)
trained from scratch, 1000 epochs, 20 networks (``--eval-epochs``, ``--eval-nets``) — so a row that did not
reach the paper's budget says how far it got. Writes OUT/gpu_cifar10.json and OUT/gpu_cifar10.md, naming
the card. ``--cpu-smoke`` runs the same logic on the CPU with toy budgets (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check import card, no_gpu_reason  # noqa: E402

PAPER = ROOT / "experiments" / "cifar10"


@dataclass(frozen=True)
class Row:
    """One row: its config (a paper YAML and/or flat overrides), its share of the budget, its paper's figure."""

    key: str
    published: str
    share: float  # fraction of --budget-s for its meta-steps
    config: str | None = None  # experiments/cifar10/*.yaml
    fields: dict[str, Any] = field(default_factory=dict)


ROWS = (
    Row("dm-1", "26.0 ± 0.8", 0.2, "dm_ipc1.yaml"),
    Row("dm-10", "48.9 ± 0.6", 0.3, "dm_ipc10.yaml"),
    Row("dc-1", "28.3 ± 0.5", 0.2, "dc_ipc1.yaml"),
    Row("dd-fixed", "54.0", 0.3, None, dict(method="dd", model="alexcifarnet", init_scheme="xavier", init="fixed",
                                           steps=10, epochs=3, ipc=1, batch_size=1024, iterations=8000,
                                           lr_decay=0.5, lr_decay_every=2000, eval_protocol="dc")),
)


class Deadline(Exception):
    """A row's time for meta-steps is up (raised from ``on_step`` right after a checkpoint)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped after meta-step {step}")
        self.step = step


def config_for(row: Row, data_root: str, out: Path, device_overrides: dict[str, Any]) -> Any:
    from ddray.config import Config, load_config

    base = load_config(PAPER / row.config) if row.config else Config()
    return base.override(**{**row.fields, **device_overrides}, dataset="imagefolder", data_root=data_root,
                         download=False, out=str(out / row.key), tracking=False, scores=False)


def run_row(row: Row, cfg: Any, seconds: float, local: bool = False) -> dict[str, Any]:
    """Distil until the paper's budget or the first checkpoint past ``seconds``, then evaluate what is there
    (through Ray on the GPU worker; ``local``: in this process, for the CPU smoke run)."""
    if local:
        from ddray.run.loop import distill
    else:
        from ddray.distributed.driver import distill_ray as distill

    t0 = time.perf_counter()
    every = cfg.run.checkpoint_every

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if time.perf_counter() - t0 > seconds and step % every == 0 and step < cfg.distill.iterations:
            raise Deadline(step)

    try:
        r = distill(cfg, progress=False, on_step=on_step)
        done = cfg.distill.iterations
    except Deadline as stop:  # evaluate the checkpoint it stopped at: the run's total becomes that step
        distil_s = time.perf_counter() - t0
        done = stop.step
        r = distill(cfg.override(iterations=done), progress=False, resume=cfg.run.out)
    else:
        distil_s = time.perf_counter() - t0
    assert r.result is not None
    return {"iterations": done, "paper_iterations": cfg.distill.iterations,
            "reached_paper": done == cfg.distill.iterations,
            "seconds": time.perf_counter() - t0, "distill_seconds": distil_s,
            "seconds_per_step": distil_s / max(1, done), "mean": r.result.mean, "std": r.result.std,
            "n": r.result.n, "eval_epochs": cfg.run.eval_epochs, "model": cfg.model.model,
            "width": cfg.model.width if cfg.model.model == "convnet" else None}


def write_results(out: Path, info: dict[str, Any], rows: dict[str, dict[str, Any]]) -> tuple[Path, Path]:
    """``gpu_cifar10.json`` and ``gpu_cifar10.md`` (a table naming the card) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    js = out / "gpu_cifar10.json"
    js.write_text(json.dumps({"when": stamp, "card": info, "rows": rows}, indent=1))
    lines = [f"# CIFAR-10 at the papers' budgets — {info.get('gpu', '?')}", "",
             f"{stamp}; driver {info.get('driver', '?')}, CUDA {info.get('cuda', '?')}, "
             f"torch {info.get('torch', '?')}.",
             "", "| row | ddray (protocol dc) | published | meta-steps run (paper) | s / step | wall |",
             "| --- | --- | --- | --- | ---: | ---: |"]
    for row in ROWS:
        res = rows.get(row.key)
        if res is None:
            continue
        if "error" in res:
            lines.append(f"| {row.key} | FAILED: {res['error']} | {row.published} | — | — | — |")
            continue
        lines.append(f"| {row.key} | {100 * res['mean']:.1f} ± {100 * res['std']:.1f} (n = {res['n']}, "
                     f"{res['eval_epochs']} epochs) | {row.published} | {res['iterations']:,} "
                     f"({res['paper_iterations']:,}) | {res['seconds_per_step']:.3f} | "
                     f"{res['seconds'] / 60:.1f} min |")
    md = out / "gpu_cifar10.md"
    md.write_text("\n".join(lines) + "\n")
    return js, md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=str(ROOT / ".device" / "cifar10-jpeg.tar.gz"),
                    help="CIFAR-10 as train/<class>/*, test/<class>/* (or an archive; pack.sh --cifar carries one)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-cifar10")
    ap.add_argument("--budget-s", type=float, default=420.0, help="seconds of meta-steps for all rows together")
    ap.add_argument("--rows", nargs="+", choices=[r.key for r in ROWS], default=[r.key for r in ROWS])
    ap.add_argument("--eval-epochs", type=int, default=1000, help="protocol dc epochs (the papers: 1000)")
    ap.add_argument("--eval-nets", type=int, default=20, help="held-out networks (the papers: 20)")
    ap.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)  # the logic on the CPU, toy sizes
    args = ap.parse_args(argv)
    overrides: dict[str, Any] = dict(eval_epochs=args.eval_epochs, eval_nets=args.eval_nets, checkpoint_every=50,
                                     workers=1, cache_dir=str(args.out / "cache"))
    if args.cpu_smoke:
        info: dict[str, Any] = {"gpu": "none (--cpu-smoke)"}
        overrides.update(width=8, real_per_class=8, checkpoint_every=2, batch_size=64, image_size=32, eval_nets=1,
                         eval_epochs=1)
    else:
        reason = no_gpu_reason()
        if reason:
            print(reason.replace("gpu-check", "gpu_cifar10"), file=sys.stderr)
            return 2
        info = card()
        overrides.update(gpus_per_worker=1)
    rows: dict[str, dict[str, Any]] = {}
    for row in ROWS:
        if row.key not in args.rows:
            continue
        fields = dict(overrides)
        if row.fields.get("model") == "alexcifarnet":  # AlexCifarNet has no width; smoke: fewer real images
            fields.pop("width", None)
            fields.pop("real_per_class", None)
        if row.fields.get("method") == "dd":
            fields.pop("real_per_class", None)
        else:
            fields.pop("batch_size", None)
        try:
            cfg = config_for(row, args.data_root, args.out, fields)
            rows[row.key] = run_row(row, cfg, row.share * args.budget_s, local=args.cpu_smoke)
        except Exception as e:  # recorded; the other rows still run
            rows[row.key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        res = rows[row.key]
        print(f"  {row.key:9s} " + (res["error"] if "error" in res else
                                    f"{100 * res['mean']:.1f} % after {res['iterations']} meta-steps"), flush=True)
        write_results(args.out, info, rows)
    js, md = write_results(args.out, info, rows)
    print(f"results: {md} and {js}")
    return 0 if all("error" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
