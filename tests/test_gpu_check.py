"""bench/gpu_check.py without a GPU: it refuses in one line, plans the right commands, writes its results."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_refuses_at_once_without_a_gpu(tmp_path: Path) -> None:
    for cmd in ([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(tmp_path)],
                ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--out", str(tmp_path)]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={"PYTHON": sys.executable,
                                                                                 "PATH": "/usr/bin:/bin"})
        assert r.returncode == 2, r.stderr
        err = r.stderr.strip()
        assert err.count("\n") == 0 and err.startswith("gpu-check: ") and "torch.cuda.is_available() is False" in err
        assert not any(tmp_path.iterdir())  # nothing written, nothing run


def test_plan_covers_the_checks_in_order(tmp_path: Path) -> None:
    steps = gpu_check.plan(tmp_path, quick=False, cifar=None)
    assert [s.name for s in steps] == ["cuda-tests", "core", "methods-vs-plain", "shared-gpu", "one-gpu",
                                       "shared-vs-one", "cli-vs-core", "dc", "dm", "mtt-experts", "mtt",
                                       "mnist5k-dm"]
    cmd = {s.name: s.command for s in steps}
    methods = cmd["methods-vs-plain"]
    assert Path(methods[1]).name == "bench_methods.py" and methods[methods.index("--device") + 1] == "cuda"
    tests = cmd["cuda-tests"]
    assert tests[1:3] == ["-m", "pytest"] and tests[tests.index("cuda") - 1] == "-m"
    files = {str(Path(f).relative_to(ROOT)) for f in tests if f.endswith(".py")}
    assert {"tests/test_cuda.py", "tests/core/test_capture.py"} <= files and "tests/test_tracking.py" not in files
    assert json.loads(cmd["core"][-1]) == [1, 8, 32]
    assert json.loads(gpu_check.plan(tmp_path, True, None)[1].command[-1]) == [1, 8]
    shared = cmd["shared-gpu"]
    assert shared[shared.index("--workers") + 1] == "2" and shared[shared.index("--gpus-per-worker") + 1] == "0.5"
    for m in ("dc", "dm", "mtt"):
        assert cmd[m][cmd[m].index("--method") + 1] == m and "--no-tracking" in cmd[m]
    assert cmd["mtt"][cmd["mtt"].index("--experts") + 1] == cmd["mtt-experts"][cmd["mtt-experts"].index("--out") + 1]
    # every ddray command is one the CLI accepts (the flag the elastic fleet adds aside)
    from ddray.cli import build_parser

    for name in ("dc", "dm", "mtt", "mtt-experts", "shared-gpu", "one-gpu", "mnist5k-dm"):
        build_parser().parse_args(cmd[name][3:])
    # the shared-GPU run and the one-worker run differ only in their workers, and are compared
    def flags(command: list[str]) -> dict[str, str]:
        return {a: b for a, b in zip(command[3:], command[4:]) if a.startswith("--") and not b.startswith("--")}

    one, two = flags(cmd["one-gpu"]), flags(shared)
    assert {k: v for k, v in one.items() if two.get(k) != v} == {"--workers": "1", "--gpus-per-worker": "1",
                                                                 "--out": str(tmp_path / "one")}
    assert one["--seed"] == two["--seed"] == "0" and one.keys() == two.keys()
    assert cmd["shared-vs-one"][-2:] == [str(tmp_path / "shared"), str(tmp_path / "one")]
    assert one["--iterations"] == "1" and one["--nets"] == "8"  # compared after one meta-step (compare())
    by_name = {s.name: s for s in steps}
    assert [re.search(p, "ddray: worker 1 joined on node 133e6dc9 (pid 10122, cuda:0 (NVIDIA H100)); 2 alive")
            is not None for p in by_name["shared-gpu"].expect] == [False, True]  # each worker on a GPU
    cli = cmd["cli-vs-core"]
    assert cli[cli.index("--nets") + 1] == "8" and cli[cli.index("--iterations") + 1] == "20"
    assert by_name["cli-vs-core"].reads == {gpu_check.CLI: r"seconds per meta-step: ([0-9.]+)"}
    # with the CIFAR-10 archive pack.sh --cifar carries, the DM run reads it
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    archive.write_bytes(b"")
    dm = gpu_check.plan(tmp_path, quick=True, cifar=archive)[-1]
    assert dm.name == "cifar10-dm" and dm.command[dm.command.index("--data-root") + 1] == str(archive)


def test_shared_vs_one_compares_the_two_sets(tmp_path: Path) -> None:
    from ddray.store.artifact import Distilled, save_distilled

    images, lrs = torch.randn(2, 10, 1, 4, 4), torch.full((4,), 0.02)
    save_distilled(tmp_path / "a", Distilled(images, torch.arange(10), lrs))
    save_distilled(tmp_path / "b", Distilled(images + 1e-7, torch.arange(10), lrs))
    save_distilled(tmp_path / "c", Distilled(images + 0.1, torch.arange(10), lrs))
    figures = gpu_check.compare(tmp_path / "a", tmp_path / "b")
    assert 0 < figures["max |Δ image|"] < 1e-6 and figures["max |Δ step size|"] == 0
    with pytest.raises(AssertionError, match="100.00% of the pixels differ by more than 0.0001"):
        gpu_check.compare(tmp_path / "a", tmp_path / "c")
    # a few pixels whose gradient was at rounding level may take Adam's first step the other way; many may not
    few, many = images.clone(), images.clone()
    few.view(-1)[:1] += 0.02  # 1 of 320 pixels: over 0.1 %
    many.view(-1)[::2] += 0.02
    save_distilled(tmp_path / "few", Distilled(few, torch.arange(10), lrs))
    save_distilled(tmp_path / "many", Distilled(many, torch.arange(10), lrs))
    figures = gpu_check.compare(tmp_path / "a", tmp_path / "few", share=0.01)
    assert figures["max share of pixels off"] == pytest.approx(1 / 320)
    for other in ("few", "many"):
        with pytest.raises(AssertionError, match="of the pixels differ"):
            gpu_check.compare(tmp_path / "a", tmp_path / other)
    save_distilled(tmp_path / "d", Distilled(images, torch.arange(10), lrs * 1.01))
    with pytest.raises(AssertionError):  # the step sizes must agree to 0.1 %
        gpu_check.compare(tmp_path / "a", tmp_path / "d")


def test_a_step_records_pass_fail_time_and_figures() -> None:
    echo = [sys.executable, "-c", "print('FIGURES {\"K=1 eager\": 0.5}')"]
    ok = gpu_check.run_step(gpu_check.Step("echo", echo), 60)
    assert ok.ok and ok.figures == {"K=1 eager": 0.5} and ok.seconds > 0
    bad = gpu_check.run_step(gpu_check.Step("bad", [sys.executable, "-c", "import sys; sys.exit('boom')"]), 60)
    assert bad.ok is False and "boom" in bad.tail
    prints = [sys.executable, "-c", "print('seconds per meta-step: 0.25')"]
    seen = gpu_check.run_step(gpu_check.Step("reads", prints, expect=(r"per meta-step",),
                                             reads={"CLI K=8": r"meta-step: ([0-9.]+)"}), 60)
    assert seen.ok and seen.figures == {"CLI K=8": 0.25}
    unseen = gpu_check.run_step(gpu_check.Step("expects", [sys.executable, "-c", "print('worker 0 joined (cpu)')"],
                                               expect=(r"worker 0 joined .*cuda:",)), 60)
    assert unseen.ok is False and "gpu-check: not in the output: worker 0 joined .*cuda:" in unseen.tail
    slow = gpu_check.run_step(gpu_check.Step("slow", [sys.executable, "-c", "import sys, time; print('started', "
                                                       "flush=True); print('on stderr', file=sys.stderr, "
                                                       "flush=True); time.sleep(30)"]), 3)
    assert slow.ok is False and "timed out" in slow.tail
    assert "started" in slow.tail and "b'" not in slow.tail  # what it printed, as text


def test_results_files_name_the_card(tmp_path: Path) -> None:
    info = {"gpu": "NVIDIA H100 80GB HBM3", "gpus": 1, "memory_gib": 79.1, "capability": "9.0", "driver": "550.54",
            "cuda": "12.4", "torch": "2.14.1", "python": "3.11.7"}
    steps = [gpu_check.Step("cuda-tests", ["x"], True, 12.0),
             gpu_check.Step("core", ["y"], True, 30.0, figures={"K=1 eager": 0.012, "K=1 compiled/eager": 0.5}),
             gpu_check.Step("methods-vs-plain", ["m"], True, 20.0,
                            figures={"dm ddray ms": 1365.0, "dm ddray/plain": 0.44, "dm ddray kernels": 1204.0,
                                     "dm ddray busy ms": 4.25}),
             gpu_check.Step("cli-vs-core", ["c"], True, 9.0, figures={"CLI K=8": 0.030, "K=8 captured": 0.025}),
             gpu_check.Step("mtt", ["z"], False, 3.0, tail="RuntimeError: CUDA error")]
    js, md = gpu_check.write_results(tmp_path / "out", info, steps)
    text = md.read_text()
    assert text.startswith("# ddray gpu-check — NVIDIA H100 80GB HBM3") and "driver 550.54" in text
    assert "| core | pass | 30.0 |" in text and "| mtt | FAIL | 3.0 |" in text
    assert "| K=1 eager | 12.0 ms |" in text and "| K=1 compiled/eager | 0.50× |" in text
    assert "| CLI K=8/core K=8 | 1.20× |" in text  # the CLI beside the core's captured K = 8
    assert "| dm ddray ms | 1365.0 ms |" in text and "| dm ddray/plain | 0.44× |" in text  # bench_methods' own ms
    assert "| dm ddray kernels | 1204 |" in text and "| dm ddray busy ms | 4.2 ms |" in text
    assert "## mtt failed" in text and "RuntimeError: CUDA error" in text
    data = json.loads(js.read_text())
    assert data["card"]["gpu"] == "NVIDIA H100 80GB HBM3"
    assert [s["ok"] for s in data["steps"]] == [True, True, True, True, False]


def test_the_budget_bounds_the_run_and_each_step_leaves_its_results(tmp_path: Path) -> None:
    steps = [gpu_check.Step("quick", [sys.executable, "-c", "print('FIGURES {\"K=1 eager\": 0.5}')"]),
             gpu_check.Step("slow", [sys.executable, "-c", "import time; time.sleep(60)"]),
             gpu_check.Step("after", [sys.executable, "-c", "pass"])]
    js, md = gpu_check.run_all(steps, tmp_path, {"gpu": "test"}, timeout=600, budget_s=5)
    assert [s.result for s in steps] == ["pass", "FAIL", "not run"]
    assert "timed out" in steps[1].tail and steps[1].seconds < 30  # cut at the budget, not the step timeout
    text = md.read_text()
    assert "| quick | pass |" in text and "| slow | FAIL |" in text and "| after | not run |" in text
    assert [s["ok"] for s in json.loads(js.read_text())["steps"]] == [True, False, None]


def test_steps_picks_a_subset_with_what_it_needs(tmp_path: Path) -> None:
    steps = gpu_check.plan(tmp_path, quick=True, cifar=None)
    names = [s.name for s in gpu_check.select(steps, "mtt, shared-vs-one")]
    assert names == ["shared-gpu", "one-gpu", "shared-vs-one", "mtt-experts", "mtt"]
    assert gpu_check.select(steps, None) == steps
    for bad in ("core,nope", ","):
        with pytest.raises(ValueError, match="--steps: unknown step .*choose from cuda-tests, core"):
            gpu_check.select(steps, bad)
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--steps", "nope", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--steps: unknown step 'nope'; choose from cuda-tests" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_the_cuda_tests_collect_without_mlflow(tmp_path: Path) -> None:
    """The GPU machine has torch but no MLflow: the cuda-tests step must still collect (here: all skipped)."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['mlflow'] = None  # as if not installed\n")
    step = gpu_check.plan(tmp_path, quick=True, cifar=None)[0]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    r = subprocess.run(step.command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and " skipped" in r.stdout and "error" not in r.stdout.lower(), r.stdout[-2000:]


@pytest.mark.slow
def test_every_step_runs_on_the_cpu_without_mlflow(tmp_path: Path) -> None:
    """--cpu-smoke: the whole plan end to end (Ray runs, the comparison, experts then MTT, the figures), as on
    the GPU machine without MLflow; only the devices and sizes differ. About 2.5 minutes on 2 cores."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text("import sys\nsys.modules['mlflow'] = None\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-smoke", "--cifar",
                        str(tmp_path / "none"), "--out", str(out)], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((out / "gpu_check.json").read_text())
    assert all(s["ok"] for s in data["steps"]) and len(data["steps"]) == 12
    figures = {k: v for s in data["steps"] for k, v in s["figures"].items()}
    assert figures["max share of pixels off"] == 0 and figures["CLI K=8"] > 0 and figures["K=8 eager"] > 0
    assert figures["dm ddray ms"] > 0 and figures["mtt ddray/plain"] > 0
    assert figures["K=8 eager calls"] > 0 and figures["mtt ddray calls"] > 0  # the launches (CPU: no kernels)
    assert not any(name.endswith(" kernels") for name in figures)
