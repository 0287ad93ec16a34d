"""GPU readiness in one command: CUDA tests, the core on the GPU, a shared-GPU Ray run, DC/DM/MTT on CUDA.

    make gpu-check            # or: bench/gpu_check.sh [--out DIR] [--quick] [--budget-s S] [--steps A,B]

Steps (each is run, timed and recorded even if an earlier one failed):

1. ``cuda-tests`` — the tests marked ``cuda`` (``pytest -m cuda``);
2. ``core`` — one DD meta-step (default MNIST-5k config) on the GPU at K = 1, 8, 32: eager,
   ``--compile`` and replayed from a CUDA graph (``--cuda-graphs``, :mod:`ddray.core.capture`):
   median seconds of 5 meta-steps after 2 warm-up ones (CUDA-synchronised), each against eager,
   and how K = 32 compares with K = 1 for each; one more meta-step of each under ``torch.profiler``
   gives its kernels and their busy ms (far below the meta-step's time: launch-bound);
3. ``methods-vs-plain`` — a DM and an MTT iteration at CIFAR-10's shapes (ConvNet-128, 10 images per
   class) through ddray's objectives, beside plain eager PyTorch loops of the same iterations
   (``bench/bench_methods.py``): ms per iteration and the ratio, and each row's kernels and busy ms;
4. ``shared-gpu`` — ``ddray distill --workers 2 --gpus-per-worker 0.5 --nets 8`` (two workers on one GPU)
   for one meta-step, ``one-gpu`` — the same seed on one worker, and ``shared-vs-one`` — the two sets
   agree (:func:`compare` says how far, and why after one meta-step); each worker's log line must name
   a CUDA device;
5. ``cli-vs-core`` — ``ddray distill --nets 8`` on one GPU worker for 20 meta-steps: its own seconds
   per meta-step (the first one's warm-up and capture included) against the ``core`` step's K = 8
   (captured, or eager where capture was refused): the issue's "through the CLI with Ray, ≤ 1.3× the
   core";
6. ``dc``, ``dm``, ``mtt`` — short runs of each method on the GPU workers (ConvNet width 32;
   MTT on tiny experts made first);
7. ``cifar10-dm`` — a short DM run on CIFAR-10 from the archive ``../shared/gpu/pack.sh --cifar``
   carries (``.device/cifar10-jpeg.tar.gz``; ``--cifar PATH`` for another); without it, on MNIST-5k,
   and the step's name says so (``mnist5k-dm``).

Writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` (default ``runs/gpu-check``), both
naming the card, the driver and torch's CUDA version, after every step (a run cut off by its
machine's time limit leaves the steps it finished); exits 1 if a step failed or did not run.
``--budget-s`` (default 480, the issue's 8 minutes) bounds the whole run: each step's timeout is
at most what is left of it, and steps that would start after it are recorded as not run. Without a
CUDA GPU it refuses at once with a one-line message (exit 2). ``--steps core,mtt`` runs only those
steps (and the steps they read from: ``shared-vs-one`` the two runs, ``mtt`` its experts), to finish a
run that the budget cut short. ``--cpu-smoke`` (for the tests) runs every step on the CPU at toy sizes,
workers without GPUs, the core without compiling.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIGURES = "FIGURES "  # a step's line of figures (JSON) for the results file
CLI = "CLI K=8"  # seconds per meta-step of `ddray distill` on one GPU worker, beside the core's K = 8


@dataclass
class Step:
    """One check: the command, whether it passed, how long it took, what it printed last."""

    name: str
    command: list[str]
    ok: bool | None = None
    seconds: float = 0.0
    tail: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    expect: tuple[str, ...] = ()  # patterns the output must contain (e.g. the workers' devices)
    reads: dict[str, str] = field(default_factory=dict)  # figure → pattern whose group is its value

    @property
    def result(self) -> str:
        return "pass" if self.ok else ("not run" if self.ok is None else "FAIL")


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check (None if it has a CUDA GPU torch can use)."""
    import torch

    if not torch.cuda.is_available():
        why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        return (f"gpu-check: {why} (torch {torch.__version__}, torch.cuda.is_available() is False); "
                "run it on a machine with an NVIDIA GPU")
    return None


def card() -> dict[str, Any]:
    """The GPU and software this check ran on."""
    import torch

    props = torch.cuda.get_device_properties(0)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True) if _has("nvidia-smi") else None
    return {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2 ** 30, 1), "capability": f"{props.major}.{props.minor}",
            "driver": smi.stdout.strip().splitlines()[0] if smi and smi.returncode == 0 and smi.stdout.strip()
            else "unknown", "cuda": torch.version.cuda, "torch": torch.__version__,
            "python": platform.python_version(), "host_cpus": os.cpu_count()}


def _has(exe: str) -> bool:
    from shutil import which

    return which(exe) is not None


def ddray(*args: str) -> list[str]:
    return [sys.executable, "-c", "from ddray.cli import main; raise SystemExit(main())", *args]


CIFAR = ROOT / ".device" / "cifar10-jpeg.tar.gz"


def cuda_test_files(tests: Path = ROOT / "tests") -> list[Path]:
    """The test modules with tests marked ``cuda``: only they are collected, since the GPU machine lacks
    packages (MLflow) that other modules import."""
    return sorted(p for p in tests.rglob("test_*.py") if "mark.cuda" in p.read_text(encoding="utf-8"))


SMOKE_METHODS = ["--reps", "1", "--ipc", "1", "--width", "8", "--real-per-class", "4", "--syn-steps", "2"]


def plan(work: Path, quick: bool, cifar: Path | None = CIFAR, smoke: bool = False) -> list[Step]:
    """The steps, in order (``quick``: fewer meta-steps and K up to 8; ``cifar``: the CIFAR-10 archive, if any;
    ``smoke``: the same steps on the CPU at toy sizes, workers without GPUs: ``--cpu-smoke``, for the tests)."""
    quick = quick or smoke
    iters = "2" if smoke else "4" if quick else "20"
    run = ["--no-tracking", "--no-progress", "--eval-nets", "2", "--no-scores"]
    method_iters = "1" if smoke else "2" if quick else "5"
    convnet = ["--model", "convnet", "--width", "8" if smoke else "32"]
    method_eval = ["--eval-epochs", "1" if smoke else "2"]  # the final evaluation is not what is checked
    experts = work / "experts"
    once = ["--nets", "8", "--iterations", "1", "--seed", "0", *run]  # compared after one meta-step: see compare()
    data = (["--dataset", "imagefolder", "--data-root", str(cifar), "--cache-dir", str(work / "cache")]
            if cifar is not None and cifar.exists() else [])
    here = str(Path(__file__).resolve())

    def gpus(share: str) -> list[str]:
        return ["--gpus-per-worker", "0", "--cpus-per-worker", "1"] if smoke else ["--gpus-per-worker", share]

    def on(*workers: int) -> tuple[str, ...]:  # each worker's "joined" log line names its device
        device = "cpu" if smoke else "cuda:"
        return tuple(rf"worker {w} joined on node \S+ \(pid \d+, {device}" for w in workers)

    steps = [
        Step("cuda-tests", [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                            *map(str, cuda_test_files())]),
        Step("core", [sys.executable, here, "--core", json.dumps([1, 8] if quick else [1, 8, 32]),
                      *(["--cpu-smoke"] if smoke else [])]),
        Step("methods-vs-plain", [sys.executable, str(Path(here).parent / "bench_methods.py"),
                                  *(["--device", "cpu", *SMOKE_METHODS] if smoke else
                                    ["--device", "cuda", "--reps", "3" if quick else "5"])]),
        Step("shared-gpu", ddray("distill", "--workers", "2", *gpus("0.5"), *once, "--out", str(work / "shared")),
             expect=on(0, 1)),
        Step("one-gpu", ddray("distill", "--workers", "1", *gpus("1"), *once, "--out", str(work / "one")),
             expect=on(0)),
        Step("shared-vs-one", [sys.executable, here, "--compare", str(work / "shared"), str(work / "one")]),
        Step("cli-vs-core", ddray("distill", "--workers", "1", *gpus("1"), "--nets", "8", "--iterations", iters,
                                  *run, "--out", str(work / "cli")),
             expect=on(0), reads={CLI: r"seconds per meta-step: ([0-9.]+)"}),
        Step("dc", ddray("distill", "--method", "dc", *convnet, "--iterations", method_iters,
                         "--out", str(work / "dc"), *run, *method_eval)),
        Step("dm", ddray("distill", "--method", "dm", *convnet, "--iterations", method_iters,
                         "--out", str(work / "dm"), *run, *method_eval)),
        Step("mtt-experts", ddray("experts", *convnet, "--num-experts", "1", "--train-epochs", "3",
                                  "--out", str(experts), "--no-tracking", "--no-progress")),
        Step("mtt", ddray("distill", "--method", "mtt", *convnet, "--experts", str(experts), "--max-start-epoch",
                          "2", "--iterations", method_iters, "--out", str(work / "mtt"), *run, *method_eval)),
        Step("cifar10-dm" if data else "mnist5k-dm",
             ddray("distill", "--method", "dm", *convnet, *data, "--ipc", "10", "--iterations", method_iters,
                   "--out", str(work / "cifar"), *run, *method_eval)),
    ]
    return steps


NEEDS = {"shared-vs-one": ("shared-gpu", "one-gpu"), "mtt": ("mtt-experts",)}  # steps that read another's output


def select(steps: list[Step], names: str | None) -> list[Step]:
    """The steps named in ``names`` (comma-separated; None: all) and those they need, in plan order."""
    if names is None:
        return steps
    known = [s.name for s in steps]
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    bad = next((n for n in wanted if n not in known), None) if wanted else names
    if bad is not None:
        raise ValueError(f"--steps: unknown step {bad!r}; choose from {', '.join(known)} (comma-separated)")
    keep = set(wanted) | {need for n in wanted for need in NEEDS.get(n, ())}
    return [s for s in steps if s.name in keep]


def compare(a: Path, b: Path, atol: float = 1e-4, share: float = 1e-3) -> dict[str, Any]:
    """Two sets distilled for one meta-step from the same seed agree: at most ``share`` of the pixels differ
    by more than ``atol`` (1 % of DD's outer learning rate), and the step sizes to 0.1 %.

    One meta-step, because the runs split the meta-step's networks into other chunks (chunks follow
    ``--workers``) and a GPU adds its own rounding, and DD amplifies rounding: on the CPU a meta-gradient
    that differs by 1e-10 gives pixels 3.5e-6 apart after the first Adam step and 0.019 apart after
    the second (a max-pool that picks another input flips gradients). Adam's first step moves a pixel by
    η·g/(|g| + ε), so rounding moves only the pixels whose gradient is near ε (0.09 % of them have
    |g| < 1e-8 there); a meta-gradient assembled from the wrong networks or without a chunk moves most
    pixels by up to 2η. (A gradient scaled by a constant moves none: Adam does not see it; the Ray-vs-local
    tests on the CPU do.)"""
    import torch

    from ddray.store.artifact import read_distilled

    x, y = read_distilled(a), read_distilled(b)
    diff = (x.images - y.images).abs()
    off = float((diff > atol).float().mean())
    torch.testing.assert_close(x.lrs, y.lrs, rtol=1e-3, atol=1e-6)
    if off > share:
        raise AssertionError(f"{off:.2%} of the pixels differ by more than {atol:g} (allowed: {share:.1%}); "
                             f"largest difference {float(diff.max()):.3g}")
    return {"max |Δ image|": float(diff.max()), "max share of pixels off": off,
            "max |Δ step size|": float((x.lrs - y.lrs).abs().max())}


def run_step(step: Step, timeout: float) -> Step:
    """Run ``step`` from the repository root; record pass/fail, wall time and the output's last lines."""
    if timeout <= 0:
        step.tail = "not run: --budget-s spent"
        return step
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": f"{ROOT}{os.pathsep}"
           f"{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    try:
        r = subprocess.run(step.command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        step.ok, out = r.returncode == 0, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        step.ok, out = False, f"timed out after {timeout:.0f} s\n{_text(e.stdout)}{_text(e.stderr)}"
    step.seconds = time.perf_counter() - t0
    missing = [p for p in step.expect if not re.search(p, out)]
    if step.ok and missing:
        step.ok, out = False, out + "\n" + "\n".join(f"gpu-check: not in the output: {p}" for p in missing)
    step.tail = "\n".join(str(out).strip().splitlines()[-15:])
    for line in str(out).splitlines():
        if line.startswith(FIGURES):
            step.figures = json.loads(line[len(FIGURES):])
    for name, pattern in step.reads.items():
        found = re.search(pattern, out)
        if found:
            step.figures[name] = float(found.group(1))
    return step


def _text(output: str | bytes | None) -> str:
    """A timed-out child's output: bytes whatever ``text`` asked for (subprocess.TimeoutExpired)."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


KINDS = {"eager": {"compile": False, "cuda_graphs": False}, "compiled": {"compile": True, "cuda_graphs": False},
         "captured": {"compile": False, "cuda_graphs": True}}


def core_figures(nets: list[int], reps: int = 5, device: str = "cuda") -> dict[str, Any]:
    """Seconds per DD meta-step on ``device`` per K, eager, compiled and captured (run inside the ``core`` step;
    on the CPU, ``--cpu-smoke``, eager and captured only: captured is eager there, and compiling takes minutes),
    and each one's launches in one more meta-step (``bench_methods.launches``: on a GPU the kernels and their
    busy ms, which against the meta-step's time says how launch-bound it is)."""
    import torch
    from bench_methods import launches

    from ddray.config import Config
    from ddray.inputs.problem import build_problem

    out: dict[str, Any] = {}
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    kinds = {kind: flags for kind, flags in KINDS.items() if dev.type == "cuda" or not flags["compile"]}
    for k in nets:
        for kind, flags in kinds.items():
            problem = build_problem(Config().override(nets=k, tracking=False, **flags))
            objective = problem.objective().to(dev)
            syn = problem.initial_synthetic()
            images, raw = syn.images.to(dev), syn.raw_lrs.to(dev)
            times = []
            for step in range(reps + 2):
                sync()
                t0 = time.perf_counter()
                objective(images, raw, step, list(range(k)))
                sync()
                if step >= 2:
                    times.append(time.perf_counter() - t0)
            out[f"K={k} {kind}"] = statistics.median(times)
            graphs = getattr(objective, "graphs", None)  # DD's objective has them (None where not captured)
            if kind == "captured" and graphs is not None and graphs.refused:
                out[f"K={k} captured"] = float("nan")  # not captured: the figure would be eager's
                continue
            # one more meta-step under the profiler: kernels launched and their busy time (launch-bound?)
            counts = launches(lambda step: objective(images, raw, step, list(range(k))), reps + 2, dev)
            out.update({f"K={k} {kind} {name}": v for name, v in counts.items()})
        for kind in kinds.keys() - {"eager"}:
            out[f"K={k} {kind}/eager"] = out[f"K={k} {kind}"] / out[f"K={k} eager"]
    if len(nets) > 1:
        for kind in kinds:
            out[f"K={max(nets)}/K={min(nets)} {kind}"] = out[f"K={max(nets)} {kind}"] / out[f"K={min(nets)} {kind}"]
    return out


def write_results(out: Path, info: dict[str, Any], steps: list[Step]) -> tuple[Path, Path]:
    """``gpu_check.json`` (everything) and ``gpu_check.md`` (a table naming the card) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    js = out / "gpu_check.json"
    js.write_text(json.dumps({"when": stamp, "card": info, "steps": [asdict(s) for s in steps]}, indent=1))
    lines = [f"# ddray gpu-check — {info.get('gpu', 'unknown GPU')}", "",
             f"{stamp}; {info.get('gpus', '?')} × {info.get('gpu', '?')} ({info.get('memory_gib', '?')} GiB, "
             f"compute capability {info.get('capability', '?')}), driver {info.get('driver', '?')}, CUDA "
             f"{info.get('cuda', '?')}, torch {info.get('torch', '?')}, Python {info.get('python', '?')}.", "",
             "| step | result | seconds |", "| --- | --- | ---: |"]
    for s in steps:
        lines.append(f"| {s.name} | {s.result} | {s.seconds:.1f} |")
    figs = {k: v for s in steps for k, v in s.figures.items()}
    core = figs.get("K=8 captured")
    core = figs.get("K=8 eager") if core is None or math.isnan(core) else core  # NaN: not captured, eager ran
    if figs.get(CLI) and core:
        figs[f"{CLI}/core K=8"] = figs[CLI] / core
    if figs:
        lines += ["", "| figure | value |", "| --- | ---: |"]
        lines += [f"| {k.replace('|', chr(92) + '|')} | {_value(k, v)} |" for k, v in figs.items()]
    failed = [s for s in steps if s.ok is False]
    for s in failed:
        lines += ["", f"## {s.name} failed", "", "```", s.tail, "```"]
    md = out / "gpu_check.md"
    md.write_text("\n".join(lines) + "\n")
    return js, md


def run_all(steps: list[Step], out: Path, info: dict[str, Any], timeout: float,
            budget_s: float) -> tuple[Path, Path]:
    """Run the steps in order within ``budget_s`` seconds in all, writing the results files after each."""
    deadline = time.monotonic() + budget_s
    js, md = write_results(out, info, steps)
    for step in steps:
        run_step(step, min(timeout, deadline - time.monotonic()))
        print(f"  {step.name:16s} {step.result:7s}  {step.seconds:6.1f} s", flush=True)
        js, md = write_results(out, info, steps)
    return js, md


def _value(name: str, v: float) -> str:
    """A figure as the results table shows it: ratios (a "/" in the name) as ×, maxima as they are, counts
    ("… calls", "… kernels") as whole numbers, figures named "… ms" in ms, the rest (seconds) in ms."""
    if "/" in name:
        return f"{v:.2f}×"
    if name.startswith("max"):
        return f"{v:.2e}"
    if name.endswith((" calls", " kernels")):
        return f"{v:.0f}"
    return f"{v if name.endswith(' ms') else 1000 * v:.1f} ms"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check", help="where the results files go")
    ap.add_argument("--quick", action="store_true", help="fewer meta-steps, K up to 8")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per step")
    ap.add_argument("--budget-s", type=float, default=480, help="seconds for the whole run (steps past it do not run)")
    ap.add_argument("--steps", help="run only these steps (comma-separated names, as the results file lists them; "
                                    "a step's prerequisites come with it): to finish a run that --budget-s cut short")
    ap.add_argument("--cifar", type=Path, default=CIFAR, help="the CIFAR-10 archive (default: pack.sh --cifar's)")
    ap.add_argument("--core", help=argparse.SUPPRESS)  # inside the core step: JSON list of K
    ap.add_argument("--compare", nargs=2, type=Path, help=argparse.SUPPRESS)  # inside shared-vs-one
    ap.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)  # the steps on the CPU, toy sizes
    args = ap.parse_args(argv)
    if args.steps is not None:  # a bad name fails here, before any step runs
        try:
            select(plan(args.out, args.quick, args.cifar, args.cpu_smoke), args.steps)
        except ValueError as e:
            ap.error(str(e))
    if args.compare:
        print(FIGURES + json.dumps(compare(*args.compare)), flush=True)
        return 0
    reason = None if args.cpu_smoke else no_gpu_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    if args.core:
        figures = (core_figures(json.loads(args.core), reps=1, device="cpu") if args.cpu_smoke else
                   core_figures(json.loads(args.core)))
        print(FIGURES + json.dumps(figures), flush=True)
        return 0
    info = {"gpu": "none (--cpu-smoke)"} if args.cpu_smoke else card()
    print(f"gpu-check on {info.get('gpus', 0)} × {info['gpu']} (driver {info.get('driver')}, CUDA {info.get('cuda')})",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="ddray-gpu-check-") as tmp:
        steps = select(plan(Path(tmp), args.quick, args.cifar, args.cpu_smoke), args.steps)
        js, md = run_all(steps, args.out, info, args.timeout, args.budget_s)
    print(f"results: {md} and {js}")
    return 0 if all(s.ok for s in steps) else 1


if __name__ == "__main__":
    raise SystemExit(main())
