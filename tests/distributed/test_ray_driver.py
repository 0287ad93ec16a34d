"""The Ray driver end to end on one local Ray (2 CPUs): sync = single process bitwise, faults lose
nothing, resume is bitwise, async and sharded modes complete. Tiny configs: a run takes ~10–20 s here.
(Several nodes, nodes joining and leaving, the CLI as users run it: test_elastic.py.)"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_support import named_actor, tiny

from ddray.distributed.driver import distill_ray
from ddray.run.lifecycle import DistillResult
from ddray.run.loop import distill
from ddray.store.artifact import read_distilled
from ddray.store.checkpoint import list_checkpoints


@pytest.fixture(scope="module")
def straight(ray_local: Any, tmp_path_factory: pytest.TempPathFactory) -> DistillResult:
    """The reference: W = 2 (1 CPU each), 6 meta-steps, checkpoints at 3 and 6, no faults."""
    return distill_ray(tiny(tmp_path_factory.mktemp("straight")), progress=False)


def same(a: DistillResult, b: DistillResult) -> bool:
    return torch.equal(a.distilled.images, b.distilled.images) and torch.equal(a.distilled.lrs, b.distilled.lrs)


def test_sync_matches_single_process_bitwise(straight: DistillResult, tmp_path: Path,
                                             one_worker_threads: None) -> None:
    """Same chunks (a function of the config), same threads: the Ray run is the --local run, bit for bit."""
    w1 = distill_ray(tiny(tmp_path / "w1", workers=1, cpus_per_worker=None), progress=False)
    local = distill(tiny(tmp_path / "local", workers=1, cpus_per_worker=None), progress=False)
    assert same(w1, local)  # one chunk of K = the single-process meta-gradient, same optimiser
    torch.set_num_threads(1)
    assert same(straight, distill(tiny(tmp_path / "local2"), progress=False))  # two chunks, 1 thread each
    torch.testing.assert_close(straight.distilled.images, w1.distilled.images, rtol=1e-4, atol=1e-5)
    meta = json.loads((straight.out / "meta.json").read_text())
    assert meta["iterations"] == 6 and (straight.out / "eval.json").is_file()
    assert [str(p).rsplit("-", 1)[1] for p in list_checkpoints(straight.out / "checkpoints")] == [
        "00000003.pt", "00000006.pt"]
    assert straight.result == distill(tiny(tmp_path / "local3"), progress=False).result  # evaluated on workers


def test_the_scores_are_made_on_the_workers_and_equal_local_ones(tmp_path: Path, one_worker_threads: None) -> None:
    """The random subset and the full split train on the workers (each cache fills on its own) and score as
    --local does."""
    quick = dict(scores=True, eval_epochs=2, full_epochs=1, iterations=2)
    ray_run = distill_ray(tiny(tmp_path / "ray", cache_dir=str(tmp_path / "c1"), **quick), progress=False)
    torch.set_num_threads(1)
    local = distill(tiny(tmp_path / "local", cache_dir=str(tmp_path / "c2"), **quick), progress=False)
    assert ray_run.scores is not None and ray_run.scores == local.scores
    assert [len(list((tmp_path / c / "full-data").glob("*.json"))) for c in ("c1", "c2")] == [1, 1]
    report = json.loads((ray_run.out / "eval.json").read_text())
    assert report["scores"]["mean"] == ray_run.scores.mean


def test_driver_death_then_resume_is_bitwise(straight: DistillResult, tmp_path: Path) -> None:
    out = tmp_path / "run"

    def die(step: int, metrics: dict) -> None:
        if step == 4:  # after the checkpoint of step 3: steps 4.. are redone after the resume
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill_ray(tiny(out), progress=False, on_step=die)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000003.pt"]
    assert not (out / "meta.json").exists()
    resumed = distill_ray(tiny(out), progress=False, resume=out)
    assert same(resumed, straight)
    assert json.loads((out / "meta.json").read_text())["iterations"] == 6


def test_lost_workers_and_server_lose_nothing(straight: DistillResult, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """ray.kill of a worker (for good: its slot gets a new actor), SIGKILL of another's process (Ray
    restarts it), and a parameter-server crash (restored from the checkpoint)."""
    seen: dict[int, dict] = {}

    def faults(step: int, metrics: dict) -> None:
        seen[step] = metrics
        if step == 1:
            ray_kill_worker()
        elif step == 2:
            actor, _ = named_actor("worker-0")
            os.kill(__import__("ray").get(actor.ping.remote()).pid, signal.SIGKILL)
        elif step == 4:  # the server restarts from the checkpoint of step 3; steps 4.. are redone
            actor, _ = named_actor("ps-0")
            __import__("ray").kill(actor, no_restart=False)

    def ray_kill_worker() -> None:
        actor, _ = named_actor("worker-1")
        __import__("ray").kill(actor)  # no restart: the fleet must replace it

    with caplog.at_level(logging.INFO, logger="ddray"):
        r = distill_ray(tiny(tmp_path / "faults"), progress=False, on_step=faults)
    assert same(r, straight)
    assert sorted(seen) == [1, 2, 3, 4, 5, 6] and seen[6]["restarts"] == 3
    log = caplog.text
    assert re.search(r"worker 0 joined on node \w+ \(pid \d+, cpu\); \d alive", log)  # where it computes
    assert "worker 1 lost" in log and "worker 1 is back" in log
    assert "worker 0 lost" in log and "worker 0 is back" in log
    assert "parameter-server shard 0 died" in log and "rolled back to the checkpoint of meta-step 3" in log
    assert json.loads((r.out / "meta.json").read_text())["iterations"] == 6


def test_async_mode_completes_and_reports_staleness(ray_local: Any, tmp_path: Path) -> None:
    seen: dict[int, dict] = {}
    r = distill_ray(tiny(tmp_path / "async", mode="async", max_staleness=1), progress=False,
                    on_step=lambda s, m: seen.setdefault(s, m))
    assert sorted(seen) == [1, 2, 3, 4, 5, 6]
    assert {"staleness_mean", "staleness_max", "dropped", "outer_loss", "nets_per_s"} <= set(seen[6])
    assert all(m["staleness_max"] <= 1 for m in seen.values())
    assert json.loads((r.out / "meta.json").read_text())["iterations"] == 6
    assert list_checkpoints(r.out / "checkpoints")[-1].name == "step-00000006.pt"


@pytest.mark.slow
def test_sharded_servers_match_one_server(straight: DistillResult, tmp_path: Path) -> None:
    """Three servers own blocks of classes (the step sizes on shard 0); each applies the same Adam
    element-wise, so the set is the one server's, bit for bit (as test_param_server.py shows without Ray)."""
    r = distill_ray(tiny(tmp_path / "sharded", shards=3), progress=False)
    assert same(r, straight)


@pytest.mark.slow
def test_resume_a_single_process_run_on_ray(straight: DistillResult, tmp_path: Path, one_thread: None) -> None:
    """Same checkpoint format: a run made with --local continues on Ray, bit for bit."""
    out = tmp_path / "mixed"
    distill(tiny(out, iterations=3), progress=False)
    r = distill_ray(tiny(out), progress=False, resume=out)
    assert same(r, straight)
    assert json.loads((out / "meta.json").read_text())["iterations"] == 6


@pytest.mark.slow
def test_cli_driver_sigkilled_then_resumed_is_bitwise(ray_local: Any, tmp_path: Path) -> None:
    """A real `ddray distill` process attached to this Ray is SIGKILLed after its first checkpoint;
    `ddray distill --resume` finishes the run with the same bits as an uninterrupted one."""
    import subprocess
    import sys
    import time

    from ddray.cli import main
    from ddray.store.artifact import read_distilled

    steps = 40
    reference = distill_ray(tiny(tmp_path / "ref", iterations=steps), progress=False)
    out = tmp_path / "killed"
    flags = ["--dataset", "mnist5k", "--steps", "2", "--epochs", "1", "--ipc", "1", "--batch-size", "64",
             "--nets", "2", "--workers", "2", "--cpus-per-worker", "1", "--eval-nets", "2", "--seed", "0", "--checkpoint-every", "3",
             "--iterations", str(steps), "--no-tracking", "--no-progress", "--no-scores"]
    addr = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # stay on loopback
    proc = subprocess.Popen([sys.executable, "-m", "ddray.cli", "distill", *flags, "--address", addr,
                             "--out", str(out)], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoints" / "step-00000003.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the driver never checkpointed"
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no cleanup in the driver
        proc.wait()
    assert not (out / "meta.json").exists()
    done = int(list_checkpoints(out / "checkpoints")[-1].name[5:13])
    assert 3 <= done < steps
    assert main(["distill", "--resume", str(out), "--no-tracking", "--no-progress"]) == 0
    d = read_distilled(out)
    assert torch.equal(d.images, reference.distilled.images) and torch.equal(d.lrs, reference.distilled.lrs)
    assert d.meta["iterations"] == steps


def test_compiled_graph_transport_same_bits_through_faults(straight: DistillResult, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """DDRAY_TRANSPORT=compiled: a worker SIGKILLed and the server crashed mid-run; same result."""
    import ray

    monkeypatch.setenv("DDRAY_TRANSPORT", "compiled")

    def faults(step: int, metrics: dict) -> None:
        if step == 2:
            actor, _ = named_actor("worker-1")
            os.kill(ray.get(actor.ping.remote()).pid, signal.SIGKILL)
        elif step == 4:
            actor, _ = named_actor("ps-0")
            ray.kill(actor, no_restart=False)

    with caplog.at_level(logging.INFO, logger="ddray"):
        r = distill_ray(tiny(tmp_path / "compiled"), progress=False, on_step=faults)
    assert same(r, straight)
    assert "worker 1 lost" in caplog.text and "parameter-server shard 0 died" in caplog.text
    with pytest.raises(ValueError, match="DDRAY_TRANSPORT: invalid value 'compiled'"):
        distill_ray(tiny(tmp_path / "x", shards=2), progress=False)


@pytest.mark.slow
def test_inside_a_tune_like_trial_group(straight: DistillResult, tmp_path: Path) -> None:
    """Run from a task in a group laid out [driver, PS, worker, worker] (as a Ray Tune trial reserves it):
    the fleet places itself in those bundles instead of asking for a group of its own."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    before = set(placement_group_table())
    group = placement_group([{"CPU": 0.05}, {"CPU": 0.05}, {"CPU": 0.9}, {"CPU": 0.9}])
    ray.get(group.ready(), timeout=60)

    @ray.remote(num_cpus=0.05)
    def trial(cfg: Any) -> tuple[Any, Any]:  # refers only to importable modules (it runs in a worker)
        from ddray.distributed.driver import distill_ray

        r = distill_ray(cfg, progress=False)
        return r.distilled.images, r.distilled.lrs

    try:
        where = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0,
                                                 placement_group_capture_child_tasks=True)
        images, lrs = ray.get(trial.options(scheduling_strategy=where).remote(tiny(tmp_path / "trial")))
    finally:
        remove_placement_group(group)
    assert set(placement_group_table()) - before == {group.id.hex()}  # no group of its own
    assert torch.equal(images, straight.distilled.images) and torch.equal(lrs, straight.distilled.lrs)


def test_learned_labels_through_ray_equal_local_and_resume_bitwise(ray_local: Any, tmp_path: Path,
                                                                   one_thread: None) -> None:
    """--labels learned: shard 0 owns the label logits beside ρ; sharded Ray, --local and a --local run
    continued on Ray give the same images, step sizes and labels, bit for bit."""
    learned = dict(labels="learned", lr_labels=0.05)
    ray_run = distill_ray(tiny(tmp_path / "ray", shards=2, **learned), progress=False)
    local = distill(tiny(tmp_path / "local", **learned), progress=False)
    distill(tiny(tmp_path / "cut", iterations=3, **learned), progress=False)
    resumed = distill_ray(tiny(tmp_path / "cut", **learned), progress=False, resume=tmp_path / "cut")
    z = ray_run.distilled.label_logits
    assert z is not None and z.shape == (10, 10)
    for other in (local, resumed):
        assert same(ray_run, other) and torch.equal(z, other.distilled.label_logits)
    from ddray.core.synthetic import label_logits

    assert not torch.equal(z, label_logits(torch.arange(10), 10))  # they were learned
    saved = read_distilled(ray_run.out)
    assert saved.label_kind == "learned" and torch.equal(saved.label_logits, z)
