"""Speed as users see it: ``ddray distill`` through the CLI against ``--local``, the core and a naive unroll.

Every figure is seconds per meta-step on the default MNIST-5k config (LeNet, S = 10,
E = 3, 1 image per class, real batch 1024), unless the row says otherwise.

* **CLI rows** run the installed ``ddray distill`` as a user would (a fresh process tree:
  Ray, the parameter server, MLflow on an SQLite file in a temporary directory, the
  progress bar off only because nobody watches it). A row's figure is the difference of
  the wall times of a long and a short run divided by the difference of their lengths,
  so start-up, the final evaluation and the artifact writes cancel.
  Variants: ``ray`` (the default path, tracking on), ``local`` (``--local``, tracking on),
  ``ray-notrack`` (``--no-tracking``), and the same with ``--compile`` where asked.
* **In-process rows** time the meta-gradient call alone, median of ``--reps`` meta-steps
  after two warm-up ones, in a fresh subprocess with 2 torch threads: ``core`` is the DD
  objective a worker calls (θ₀ draws, real batch, ``meta_gradient``) on the real data,
  ``naive`` a straightforward one-net-at-a-time autograd unroll of the same meta-step
  (``bench_core.naive_meta_step``).
* **Method rows** are CLI rows (Ray, tracking on) of ``--method dc|dsa|dm|mtt`` at their
  defaults with ConvNet width 32 (the README's methods table; LeNet for ``dd``), the final
  evaluation cut to one network and one epoch (it cancels anyway). MTT gets tiny experts
  (``ddray experts``, made once per invocation) and ``--max-start-epoch 2``, which changes
  which expert epochs are matched, not the cost of a meta-step.

Each measurement is taken ``--reps`` times, the variants interleaved, and the load
average (``os.getloadavg``, as ``uptime`` prints it) is recorded beside each. With
``--write`` the results replace the section between ``<!-- e2e -->`` and
``<!-- /e2e -->`` of bench/RESULTS.md; ``--json`` keeps the raw figures.

Usage: python bench/bench_e2e.py [--nets 1 4] [--lengths 10 40] [--reps 2] [--write bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VARIANTS = {"ray": [], "local": ["--local"], "ray-notrack": ["--no-tracking"],
            "ray-compile": ["--compile"], "local-compile": ["--local", "--compile"]}
METHOD_ARGS = {"dc": ["--method", "dc"], "dsa": ["--method", "dsa"], "dm": ["--method", "dm"],
               "mtt": ["--method", "mtt", "--max-start-epoch", "2"]}
CONVNET = ["--model", "convnet", "--width", "32"]
CHEAP_EVAL = ["--eval-nets", "1", "--eval-epochs", "1"]
BEGIN, END = "<!-- e2e -->", "<!-- /e2e -->"


def load() -> float:
    """The 1-minute load average (what ``uptime`` prints first)."""
    return os.getloadavg()[0]


@dataclass
class Figure:
    """One measured figure: per-repetition values (seconds per meta-step) and the load beside each."""

    name: str
    values: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    printed: list[float] = field(default_factory=list)  # CLI rows: "seconds per meta-step" of the long run

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def spread(self) -> str:
        return " / ".join(f"{1000 * v:.0f}" for v in self.values)

    def printed_median(self) -> str:
        ok = [p for p in self.printed if p == p]
        return f"{1000 * statistics.median(ok):.0f}" if ok else "—"

    def load_range(self) -> str:
        return f"{min(self.loads):.1f}–{max(self.loads):.1f}" if self.loads else "—"


# ----------------------------------------------------------------------------- CLI rows


def ddray_exe() -> list[str]:
    exe = Path(sys.executable).parent / "ddray"
    return [str(exe)] if exe.is_file() else [sys.executable, "-c", "from ddray.cli import main; main()"]


def run_cli(args: list[str], iterations: int, workdir: Path, timeout: float) -> tuple[float, float]:
    """(wall seconds, the "seconds per meta-step" ddray prints) of one ``ddray distill`` run of
    ``iterations`` meta-steps (fresh output directory)."""
    out = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    # --no-scores: the scores' full-data training is cached after the first run, so it would not cancel
    cmd = [*ddray_exe(), "distill", *args, "--iterations", str(iterations), "--out", str(out), "--no-progress",
           "--no-scores", "--tracking-uri", f"sqlite:///{workdir}/mlflow.db"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    printed = re.search(r"seconds per meta-step: ([0-9.]+)", r.stdout)
    return seconds, float(printed.group(1)) if printed else float("nan")


def per_step(args: list[str], lengths: tuple[int, int], workdir: Path,
             timeout: float) -> tuple[float, float, float]:
    """(seconds per meta-step from the difference of two run lengths, the figure ddray printed for
    the long run — its loop alone, first steps included —, load average at the end)."""
    short, long = lengths
    t_short, _ = run_cli(args, short, workdir, timeout)
    t_long, printed = run_cli(args, long, workdir, timeout)
    return (t_long - t_short) / (long - short), printed, load()


def make_experts(workdir: Path) -> Path:
    """Tiny MTT experts (1 expert, 3 epochs of ConvNet width 32) for ``--max-start-epoch 2``."""
    out = workdir / "experts"
    cmd = [*ddray_exe(), "experts", *CONVNET, "--num-experts", "1", "--train-epochs", "3", "--out", str(out),
           "--no-progress", "--tracking-uri", f"sqlite:///{workdir}/mlflow.db"]
    subprocess.run(cmd, cwd=workdir, check=True, capture_output=True, text=True,
                   env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    return out


# ----------------------------------------------------------------------------- in-process rows


def one_inprocess(kind: str, nets: int, reps: int, threads: int, compile_: bool) -> dict[str, Any]:
    """Run in a subprocess: median seconds of ``reps`` meta-steps of ``kind`` (core | naive).

    ``ddray`` is imported before torch, as in every ddray process (it sets the OpenMP wait policy).
    """
    import ddray  # noqa: F401  (first: see the docstring)
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(HERE))
    from bench_core import ReluPoolLeNet, naive_meta_step  # type: ignore[import-not-found]

    from ddray.config import Config
    from ddray.core.inits import DISTILL
    from ddray.core.models import unstack_params
    from ddray.inputs.problem import build_problem

    overrides: dict[str, Any] = {"nets": nets, "tracking": False}
    if compile_:
        overrides["compile"] = True
    problem = build_problem(Config().override(**overrides))
    objective = problem.objective()
    syn = problem.initial_synthetic()
    times = []
    for step in range(reps + 2):
        t0 = time.perf_counter()
        if kind == "core":
            objective(syn.images, syn.raw_lrs, step, list(range(nets)))
        else:
            params0 = problem.sampler().sample([(DISTILL, step, k) for k in range(nets)])
            x, y = objective.real_batch(step)  # type: ignore[attr-defined]
            naive_meta_step(ReluPoolLeNet(), unstack_params(params0), syn.images, syn.labels, syn.raw_lrs, x, y)
        if step >= 2:
            times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times)}


def inprocess(kind: str, nets: int, reps: int, compile_: bool = False) -> tuple[float, float]:
    cmd = [sys.executable, __file__, "--row", json.dumps([kind, nets, reps, compile_])]
    r = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(r.stdout.splitlines()[-1])["seconds"], load()


# ----------------------------------------------------------------------------- report


def ratio(a: Figure, b: Figure) -> str:
    return f"{a.median / b.median:.2f}×" if a.values and b.values else "—"


def render(figs: dict[str, Figure], nets: list[int], methods: list[str], lengths: tuple[int, int],
           method_lengths: tuple[int, int], reps: int, stamp: str) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [f"`python bench/bench_e2e.py` — {stamp}, {os.cpu_count()} CPUs ({cpu}), Python "
             f"{platform.python_version()}, torch {_torch_version()}. CLI rows: runs of {lengths[0]} and "
             f"{lengths[1]} meta-steps (methods: {method_lengths[0]} and {method_lengths[1]}), the difference "
             f"per meta-step; in-process rows: median of {reps} meta-steps after 2 warm-up ones. Each figure is "
             "the median over repetitions; all repetitions and the 1-minute load average at each (`uptime`) are "
             "listed; \"ddray's own figure\" is the seconds per meta-step the CLI prints for the long run (its loop "
             "only, warm-up steps included). Load above 1.5 on these 2 CPUs means other jobs shared the machine.", "",
             "| row | K | ms / meta-step (median) | repetitions (ms) | ddray's own figure (ms) | load |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, f in figs.items():
        if not f.values:
            continue
        row, k = name.rsplit("@", 1) if "@" in name else (name, "")
        lines.append(f"| {row} | {k} | {1000 * f.median:.0f} | {f.spread()} | {f.printed_median()} | "
                     f"{f.load_range()} |")
    lines += ["", "| ratio (same run) | " + " | ".join(f"K = {k}" for k in nets) + " |",
              "| --- | " + " | ".join("---:" for _ in nets) + " |"]
    pairs = [("CLI (Ray, tracking) / `--local`", "ray", "local"),
             ("CLI (Ray, tracking) / `--no-tracking`", "ray", "ray-notrack"),
             ("`--local` / core alone", "local", "core"),
             ("core / naive unroll", "core", "naive"),
             ("CLI (Ray, tracking) / naive unroll", "ray", "naive"),
             ("core `--compile` / core", "core-compile", "core"),
             ("CLI `--compile` / CLI", "ray-compile", "ray")]
    for label, a, b in pairs:
        cells = [ratio(figs.get(f"{a}@{k}", Figure(a)), figs.get(f"{b}@{k}", Figure(b))) for k in nets]
        if any(c != "—" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def write_section(path: Path, text: str) -> None:
    """Replace the text between the e2e markers of ``path`` (append a section if they are missing)."""
    doc = path.read_text() if path.is_file() else ""
    block = f"{BEGIN}\n{text}{END}"
    if BEGIN in doc and END in doc:
        doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S)
    else:
        doc = doc.rstrip("\n") + "\n\n## Speed as users see it (issue 11)\n\n" + block + "\n"
    path.write_text(doc)


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", type=int, nargs="+", default=[1, 4], help="K values of the DD rows")
    ap.add_argument("--lengths", type=int, nargs=2, default=[10, 40], help="short and long run (meta-steps)")
    ap.add_argument("--method-lengths", type=int, nargs=2, default=[3, 8])
    ap.add_argument("--reps", type=int, default=2, help="repetitions of every figure (≥ 2 on a shared machine)")
    ap.add_argument("--core-reps", type=int, default=5, help="meta-steps timed per in-process figure")
    ap.add_argument("--variants", nargs="*", default=["ray", "local", "ray-notrack"], choices=sorted(VARIANTS))
    ap.add_argument("--inprocess", nargs="*", default=["core", "naive"],
                    choices=["core", "naive", "core-compile"])
    ap.add_argument("--methods", nargs="*", default=["dc", "dsa", "dm", "mtt"], choices=sorted(METHOD_ARGS))
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per CLI run")
    ap.add_argument("--write", type=Path, help="rewrite the e2e section of this RESULTS.md")
    ap.add_argument("--json", type=Path, help="also dump the raw figures here")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:
        kind, nets, reps, compile_ = json.loads(args.row)
        print(json.dumps(one_inprocess(kind.split("-")[0], nets, reps, 2, compile_)))
        return

    figs: dict[str, Figure] = {}
    lengths, mlengths = tuple(args.lengths), tuple(args.method_lengths)
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    with tempfile.TemporaryDirectory(prefix="ddray-bench-e2e-") as tmp:
        work = Path(tmp)
        experts = make_experts(work) if "mtt" in args.methods else None
        for rep in range(args.reps):
            for k in args.nets:
                for v in args.variants:
                    sec, printed, ld = per_step(["--nets", str(k), *VARIANTS[v]], lengths, work, args.timeout)
                    _add(figs, f"{v}@{k}", sec, ld, printed)
                for kind in args.inprocess:
                    sec, ld = inprocess(kind, k, args.core_reps, kind.endswith("compile"))
                    _add(figs, f"{kind}@{k}", sec, ld)
            for m in args.methods:
                extra = [*METHOD_ARGS[m], *CONVNET, *CHEAP_EVAL]
                if m == "mtt":
                    extra += ["--experts", str(experts)]
                sec, printed, ld = per_step(extra, mlengths, work, args.timeout)
                _add(figs, f"method {m} (ConvNet-32, defaults)@4", sec, ld, printed)
    text = render(figs, args.nets, args.methods, lengths, mlengths, args.core_reps, stamp)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"stamp": stamp, "figures": [asdict(f) for f in figs.values()]}, indent=1))
    if args.write:
        write_section(args.write, text)


def _add(figs: dict[str, Figure], name: str, seconds: float, ld: float, printed: float = float("nan")) -> None:
    f = figs.setdefault(name, Figure(name))
    f.values.append(seconds)
    f.loads.append(ld)
    f.printed.append(printed)
    print(f"  {name}: {1000 * seconds:.0f} ms/meta-step (load {ld:.2f})", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
