"""Real data benchmarks (issue 15): load times, memory per worker and per node, --data-cache-mb, CIFAR-10 speed.

    .venv/bin/python bench/bench_data.py --archive PATH/cifar10-jpeg.tar.gz [--only load rss bounded speed]
        [--write bench/RESULTS.md]

* ``load``: the first load of an image-folder archive (decoding every JPEG into the uint8
  cache) and a cached load, each in a fresh process;
* ``rss``: ``ddray distill`` through Ray with 1 and with 4 workers on the set; every process of
  the run (driver, Ray's servers, workers) is sampled once a second from /proc: RSS, PSS
  (shared pages split between the processes that map them, so PSS adds up to the node's
  memory) and the object-store pages a worker maps. Reported: the peaks;
* ``bounded``: ``ddray distill --local`` with the whole set in memory against
  ``--data-cache-mb 64`` (peak RSS of the process, seconds per meta-step), DD and DM;
* ``speed``: seconds per meta-step of DD (AlexCifarNet) and DM (ConvNet) through the path users run
  (``ddray distill``, Ray, MLflow to a local SQLite store) and ``--local``.

Every run is a subprocess of the CLI; figures go to stdout as markdown (``--write`` replaces
the section between ``<!-- bench-data -->`` markers in the results file).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DDRAY = [sys.executable, "-m", "ddray.cli"]
MARK = ("<!-- bench-data -->", "<!-- /bench-data -->")
MB = 2 ** 20


# -------------------------------------------------------------------------------- /proc sampling

def _children(pid: int) -> set[int]:
    """``pid`` and all its descendants (from /proc/*/stat parent ids)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in out]
        out.update(kids)
        frontier.extend(kids)
    return out


def _memory(pid: int) -> dict[str, Any] | None:
    """RSS, PSS and shared-memory (object store) pages of one process, bytes; its command line."""
    try:
        rollup = (Path("/proc") / str(pid) / "smaps_rollup").read_text()
        cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    kb = {m.group(1): int(m.group(2)) * 1024 for m in re.finditer(r"^(\w+):\s+(\d+) kB", rollup, re.M)}
    return {"rss": kb.get("Rss", 0), "pss": kb.get("Pss", 0), "shmem": kb.get("Pss_Shmem", 0), "cmd": cmd}


class Sampler:
    """Peaks of every process under a root pid, sampled until the root exits."""

    def __init__(self) -> None:
        self.node_pss = 0
        self.node_rss = 0
        self.rss_series: list[int] = []
        self.workers: dict[int, dict[str, int]] = {}

    @property
    def steady_rss(self) -> float:
        """The median RSS sum of the run's second half (after start-up: loading, writing copies, warm-up)."""
        tail = sorted(self.rss_series[len(self.rss_series) // 2:])
        return float(tail[len(tail) // 2]) if tail else 0.0

    def sample(self, root: int) -> None:
        mems = {p: m for p in _children(root) if (m := _memory(p)) is not None}
        self.node_pss = max(self.node_pss, sum(m["pss"] for m in mems.values()))
        self.node_rss = max(self.node_rss, sum(m["rss"] for m in mems.values()))
        self.rss_series.append(sum(m["rss"] for m in mems.values()))
        for p, m in mems.items():
            if "WorkerActor" in m["cmd"]:
                w = self.workers.setdefault(p, {"rss": 0, "pss": 0, "shmem": 0})
                for k in w:
                    w[k] = max(w[k], m[k])


def run_sampled(argv: list[str], env: dict[str, str]) -> tuple[Sampler, str, float]:
    """Run a CLI command, sampling its process tree once a second; (peaks, stdout+stderr, seconds)."""
    s = Sampler()
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while proc.poll() is None:
            s.sample(proc.pid)
            time.sleep(1.0)
        log.seek(0)
        text = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{text[-3000:]}")
    return s, text, time.perf_counter() - t0


def _env(threads: int = 1, **extra: str) -> dict[str, str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", OMP_NUM_THREADS=str(threads))
    env.update(extra)
    return env


def _per_step(text: str) -> float:
    m = re.findall(r"seconds per meta-step: ([\d.]+)", text)
    if not m:
        raise RuntimeError(f"no 's per meta-step' line in the output:\n{text[-2000:]}")
    return float(m[-1])


# -------------------------------------------------------------------------------- the measurements

def bench_load(archive: str, cache: Path) -> dict[str, float]:
    """Seconds of ``load_dataset`` (imports excluded): decoding into the cache, then from it (fresh processes)."""
    code = ("import time,sys; from ddray.data import load_dataset; t=time.perf_counter(); "
            f"d=load_dataset('imagefolder', {archive!r}, cache_dir={str(cache)!r}); "
            "print(time.perf_counter()-t, len(d.x_train), len(d.x_test))")
    out = {}
    for name in ("first", "cached"):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
        out[name] = float(r.stdout.split()[0])
    return out


def _distill_argv(archive: str, cache: Path, out: Path, method: str, iterations: int, *extra: str,
                  nets: int = 1) -> list[str]:
    base = [*DDRAY, "distill", "--dataset", "imagefolder", "--data-root", archive, "--cache-dir", str(cache),
            "--out", str(out), "--iterations", str(iterations), "--no-progress", "--eval-nets", "1",
            "--checkpoint-every", str(iterations), "--no-scores"]  # the scores' full-data training is not data loading
    if method == "dd":
        return [*base, "--model", "alexcifarnet", "--init", "fixed", "--nets", str(nets), *extra]
    return [*base, "--method", "dm", "--model", "convnet", "--width", "32", "--real-per-class", "64",
            "--nets", str(nets), "--eval-epochs", "1", *extra]


def bench_rss(archive: str, cache: Path, tmp: Path) -> dict[str, Any]:
    rows = {}
    for workers in (1, 4):
        argv = _distill_argv(archive, cache, tmp / f"rss{workers}", "dm", 12, "--workers", str(workers),
                             "--cpus-per-worker", "0.5", "--no-tracking", nets=4)
        s, text, secs = run_sampled(argv, _env())
        rows[workers] = {"node_pss_mb": s.node_pss / MB, "node_rss_mb": s.node_rss / MB, "seconds": secs,
                         "workers": [{k: v / MB for k, v in w.items()} for w in s.workers.values()]}
    return rows


def bench_bounded(archive: str, cache: Path, tmp: Path) -> dict[str, Any]:
    rows: dict[str, Any] = {"data": bench_data_memory(archive, cache)}
    for method, iters in (("dd", 6), ("dm", 40)):
        for mb in (None, 64):
            extra = ["--local", "--no-tracking"] + ([] if mb is None else ["--data-cache-mb", str(mb)])
            s, text, secs = run_sampled(_distill_argv(archive, cache, tmp / f"b{method}{mb}", method, iters, *extra),
                                        _env(threads=2))
            rows[f"{method} {mb or 'all'}"] = {"peak_rss_mb": s.node_rss / MB, "steady_rss_mb": s.steady_rss / MB,
                                               "s_per_step": _per_step(text)}
    return rows


_DATA_RSS = """
import json, sys, torch
from pathlib import Path
def rss():
    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) * 1024
from ddray.core.matching import ClassBatches
from ddray.data import load_dataset
from ddray.data.rows import bounded
archive, cache, mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
before = rss()
ds = load_dataset('imagefolder', archive, cache_dir=cache)
loaded = rss()
if mb:
    ds = bounded(ds, mb, Path(cache))
batches = ClassBatches(ds.x_train, ds.y_train, ds.num_classes, 64, 0)
for step in range(100):  # DM/DC: 64 images of every class per meta-step
    batches.draw(step)
per_class = rss()
for step in range(30):  # DD: a random batch of 1024
    ds.x_train[torch.randperm(len(ds.x_train), generator=torch.Generator().manual_seed(step))[:1024]]
print(json.dumps({"loaded": loaded - before, "per_class": per_class - before, "random": rss() - before}))
"""


def bench_data_memory(archive: str, cache: Path) -> dict[str, Any]:
    """What holding the data costs one process (RSS over the interpreter with torch imported): the set loaded,
    then 100 per-class draws (DC/DM), then 30 random batches (DD) — whole set against ``--data-cache-mb 64``."""
    out = {}
    for mb in (0, 64):
        r = subprocess.run([sys.executable, "-c", _DATA_RSS, archive, str(cache), str(mb)], capture_output=True,
                           text=True, env=_env(), check=True, cwd=ROOT)
        out["all" if mb == 0 else str(mb)] = {k: v / MB for k, v in json.loads(r.stdout.splitlines()[-1]).items()}
    return out


def bench_speed(archive: str, cache: Path, tmp: Path) -> dict[str, Any]:
    rows = {}
    store = tmp / "mlflow.db"
    for method, iters in (("dd", 8), ("dm", 15)):
        for path, extra in (("cli (Ray, MLflow)", ["--tracking-uri", f"sqlite:///{store}"]),
                            ("--local", ["--local", "--no-tracking"])):
            s, text, secs = run_sampled(_distill_argv(archive, cache, tmp / f"s{method}{len(rows)}", method, iters,
                                                      *extra), _env(threads=2))
            rows[f"{method} {path}"] = {"s_per_step": _per_step(text), "seconds": secs}
    return rows


def markdown(results: dict[str, Any], stamp: str) -> str:
    lines = [MARK[0], f"## Real data: CIFAR-10 from an image-folder archive (issue 15)", "",
             f"`bench/bench_data.py`, {stamp}. CIFAR-10 as 60,000 JPEGs in a .tar.gz (19.6 MB).", ""]
    if "load" in results:
        r = results["load"]
        lines += ["| load | seconds |", "| --- | ---: |", f"| first (decode every JPEG into the uint8 cache) | "
                  f"{r['first']:.1f} |", f"| cached (a fresh process) | {r['cached']:.2f} |", ""]
    if "rss" in results:
        lines += ["| workers | node PSS peak (MB) | node RSS sum peak (MB) | per worker: RSS / PSS / object-store pages "
                  "(MB, peak) |", "| ---: | ---: | ---: | --- |"]
        for w, r in results["rss"].items():
            per = "; ".join(f"{x['rss']:.0f} / {x['pss']:.0f} / {x['shmem']:.0f}" for x in r["workers"])
            lines.append(f"| {w} | {r['node_pss_mb']:.0f} | {r['node_rss_mb']:.0f} | {per} |")
        lines.append("")
    if "bounded" in results:
        lines += ["| run (--local) | peak RSS (MB) | RSS, second half (MB, median) | s / meta-step |",
                  "| --- | ---: | ---: | ---: |"]
        for k, r in results["bounded"].items():
            if k == "data":
                continue
            method, mb = k.split()
            what = "whole set in memory" if mb == "all" else f"--data-cache-mb {mb}"
            lines.append(f"| {method.upper()}, {what} | {r['peak_rss_mb']:.0f} | {r.get('steady_rss_mb', 0):.0f} | "
                         f"{r['s_per_step']:.2f} |")
        lines.append("")
        if "data" in results["bounded"]:
            lines += ["| what the data costs one process (RSS growth, MB) | loaded | + 100 per-class draws | "
                      "+ 30 random batches of 1024 |", "| --- | ---: | ---: | ---: |"]
            for k, r in results["bounded"]["data"].items():
                what = "whole set in memory" if k == "all" else f"--data-cache-mb {k}"
                lines.append(f"| {what} | {r['loaded']:.0f} | {r['per_class']:.0f} | {r['random']:.0f} |")
            lines.append("")
    if "speed" in results:
        lines += ["| method, path | s / meta-step |", "| --- | ---: |"]
        for k, r in results["speed"].items():
            lines.append(f"| {k} | {r['s_per_step']:.2f} |")
        lines.append("")
    lines.append(MARK[1])
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archive", required=True, help="an image-folder archive, e.g. cifar10-jpeg.tar.gz")
    ap.add_argument("--only", nargs="+", default=["load", "rss", "bounded", "speed"],
                    choices=["load", "rss", "bounded", "speed"])
    ap.add_argument("--write", help="results file whose bench-data section to replace")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ddray-bench-data-"))
    cache = tmp / "cache"
    results: dict[str, Any] = {}
    steps = {"load": lambda: bench_load(args.archive, cache), "rss": lambda: bench_rss(args.archive, cache, tmp),
             "bounded": lambda: bench_bounded(args.archive, cache, tmp),
             "speed": lambda: bench_speed(args.archive, cache, tmp)}
    if "load" not in args.only:  # the others want the decode cache warm
        bench_load(args.archive, cache)
    for name in args.only:
        results[name] = steps[name]()
        print(json.dumps({name: results[name]}, indent=1), flush=True)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()) + f", load {os.getloadavg()[0]:.1f}"
    text = markdown(results, stamp)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.write:
        p = Path(args.write)
        old = p.read_text()
        if MARK[0] in old:
            old = old[:old.index(MARK[0])] + text + old[old.index(MARK[1]) + len(MARK[1]):]
        else:
            old = old.rstrip() + "\n\n" + text + "\n"
        p.write_text(old)


if __name__ == "__main__":
    main()
