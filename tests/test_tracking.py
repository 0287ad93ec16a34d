"""MLflow tracking: every command logs to a temporary SQLite store (or a real server) and reads back.

Nothing here touches ./mlflow.db: the module points $MLFLOW_TRACKING_URI at a store in
a temporary directory (with its artifact location there too) and runs from that directory.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

import ddray
from ddray.cli import main
from ddray.config import load_config
from ddray.tracking.tracker import (MlflowTracker, NullTracker, TrackingUnavailable, artifact_location, make_tracker,
                                    resolve_tracking_uri, tracked)

TINY = ["--steps", "2", "--epochs", "1", "--ipc", "1", "--nets", "1", "--batch-size", "64", "--eval-nets", "2",
        "--no-scores"]


@dataclass
class Store:
    uri: str
    root: Path
    client: Any

    def runs(self, command: str) -> list[Any]:
        exp = self.client.get_experiment_by_name("ddray")
        return self.client.search_runs([exp.experiment_id], f"tags.`ddray.command` = '{command}'")

    def artifacts(self, run_id: str, path: str | None = None) -> set[str]:
        found: set[str] = set()
        for f in self.client.list_artifacts(run_id, path):
            found |= self.artifacts(run_id, f.path) if f.is_dir else {f.path}
        return found


def _store(root: Path) -> Store:
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("ddray", artifact_location=str(root / "artifacts"))
    return Store(uri, root, client)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.chdir(root)
        yield _store(root)


@pytest.fixture(scope="module")
def distill_run(store: Store) -> Any:
    out = store.root / "run"
    argv = ["distill", "--local", "--no-progress", *TINY, "--iterations", "4", "--eval-every", "2",
            "--checkpoint-every", "2", "--out", str(out)]
    assert main(argv) == 0
    [run] = store.runs("distill")
    return run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _history(client: Any, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_distill_run_logs_config_tags_metric_histories_and_artifacts(distill_run: Any, store: Store) -> None:
    run = distill_run
    assert run.info.status == "FINISHED"
    cfg = load_config(store.root / "run" / "config.yaml")
    assert run.data.params == {k: str(v) for k, v in cfg.flat().items()}  # the whole config, flattened keys
    assert run.data.params["distill.steps"] == "2" and run.data.params["run.eval_every"] == "2"
    tags = run.data.tags
    assert tags["ddray.version"] == ddray.__version__ and tags["ddray.command"] == "distill"
    assert (tags["ddray.dataset"], tags["ddray.model"], tags["ddray.mode"]) == ("mnist5k", "lenet", "sync")
    assert "ddray.ray_address" in tags
    c = store.client
    for key in ("outer_loss", "lr_min", "lr_mean", "lr_max", "nets_per_s"):
        assert _history(c, run.info.run_id, key) == [1, 2, 3, 4], key
    assert _history(c, run.info.run_id, "eval_acc_mean") == [2, 4]  # every eval_every, and the final eval
    assert _history(c, run.info.run_id, "eval_acc_std") == [2, 4]
    arts = store.artifacts(run.info.run_id)
    assert {"distilled/data.parquet", "distilled/meta.json", "grid.png", "lrs.png", "eval.json", "config.yaml",
            "grids/step-00000002.png", "checkpoint/step-00000004.pt", "checkpoint/step-00000004.pt.sha256"} <= arts
    local = c.download_artifacts(run.info.run_id, "distilled/data.parquet", str(store.root))
    table = pq.read_table(local)
    assert table.num_rows == 2 * 10 and set(table.column_names) == {"image", "label", "step"}
    report = json.loads(Path(c.download_artifacts(run.info.run_id, "eval.json", str(store.root))).read_text())
    assert report["test"]["n"] == 2


def test_load_runs_uri_from_cli_and_python(distill_run: Any, store: Store,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"runs:/{distill_run.info.run_id}"
    assert main(["load", uri, "--nets", "2", "--json", "--no-scores"]) == 0
    r = json.loads(capsys.readouterr().out)
    d = ddray.load_distilled(uri)
    from ddray.evaluation.held_out import evaluate_distilled, problem_for

    again = evaluate_distilled(problem_for(d), d, 2)  # the same two networks, trained from the downloaded set
    assert (r["n"], r["mean"], r["std"]) == (2, again.mean, again.std)
    assert tuple(d.images.shape) == (2, 10, 1, 28, 28) and len(d.lrs) == 2
    [load_run] = store.runs("load")
    assert load_run.info.status == "FINISHED" and load_run.data.tags["ddray.source"] == uri
    assert {"eval_acc_mean", "eval_acc_std", "eval_shuffled_acc_mean"} <= set(load_run.data.metrics)
    assert {"eval.json", "grid.png"} <= store.artifacts(load_run.info.run_id)


def test_bad_runs_uri_is_a_one_line_error(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "runs:/0123456789abcdef", "--no-tracking"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "runs:/0123456789abcdef" in err and "no such MLflow run" in err
    empty = MlflowTracker(store.uri, "ddray", run_name="no-data")  # a run without distilled/ artifacts
    empty.finish()
    assert main(["load", f"runs:/{empty.run_id}", "--no-tracking"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds no distilled data" in err
    with pytest.raises(ValueError, match="holds no distilled data"):
        ddray.load_distilled(f"runs:/{empty.run_id}")


def test_baseline_and_pretrain_are_logged(store: Store) -> None:
    out = store.root / "bl"
    assert main(["baseline", "--method", "average", *TINY, "--out", str(out)]) == 0
    [run] = store.runs("baseline")
    assert run.info.status == "FINISHED" and run.data.params["baseline.method"] == "average"
    assert run.data.params["distill.ipc"] == "1" and "eval_acc_mean" in run.data.metrics
    assert {"distilled/data.parquet", "distilled/meta.json", "grid.png"} <= store.artifacts(run.info.run_id)
    assert ddray.load_distilled(f"runs:/{run.info.run_id}").meta["method"] == "baseline-average"

    pool = store.root / "pool"
    assert main(["pretrain", "--dataset", "digits", "--model", "convnet", "--nets", "2", "--epochs", "1",
                 "--out", str(pool), "--no-progress"]) == 0
    [run] = store.runs("pretrain")
    assert run.info.status == "FINISHED" and run.data.params["pretrain.nets"] == "2"
    assert _history(store.client, run.info.run_id, "test_acc") == [0, 1]
    assert {"pool/pool.json", "pool/net-000.safetensors", "pool/net-001.safetensors"} <= \
        store.artifacts(run.info.run_id)


def test_unreachable_server_fails_fast_or_continues_with_a_warning(distill_run: Any, store: Store,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    argv = ["evaluate", str(store.root / "run"), "--nets", "2", "--tracking-uri", uri]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert time.monotonic() - t0 < 20 and err.count("\n") == 0 and uri in err and "unreachable" in err
    with pytest.warns(UserWarning, match="unreachable"):
        assert main([*argv, "--tracking-optional"]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_no_tracking_writes_no_store(distill_run: Any, store: Store, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(store.root / "run"), "--nets", "2", "--json", "--no-tracking"]) == 0
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert isinstance(make_tracker(load_config(None, tracking=False), "distill"), NullTracker)


def test_tracker_interface_against_sqlite(tmp_path: Path) -> None:
    s = _store(tmp_path)
    t = MlflowTracker(s.uri, "ddray", run_name="unit", tags={"a": "1"})
    t.log_params({f"p{i}": i for i in range(150)} | {"nested": {"x": 1, "y": None}})  # > one batch of 100
    t.log_metrics({"loss": 1.5, "bad": float("nan"), "n": 3}, step=1)
    t.log_metrics({"loss": 1.0}, step=2)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.txt").write_text("x")
    t.log_artifact(tmp_path / "d", "dir")
    t2 = pickle.loads(pickle.dumps(t))  # travels to Ray actors; the client is rebuilt there
    t2.set_tags({"b": "2"})
    t2.finish("FINISHED")
    t2.finish("FAILED")  # once ended, stays ended
    run = s.client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "unit"
    assert len(run.data.params) == 152 and run.data.params["nested.x"] == "1"
    assert run.data.params["nested.y"] == "None"
    assert _history(s.client, t.run_id, "loss") == [1, 2] and "bad" not in run.data.metrics
    assert run.data.tags["a"] == "1" and run.data.tags["b"] == "2"
    assert s.artifacts(t.run_id) == {"dir/f.txt"}
    child = MlflowTracker(s.uri, "ddray", parent_run_id=t.run_id)
    assert s.client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == t.run_id


def test_metrics_are_written_in_batches_off_the_step(tmp_path: Path) -> None:
    """log_metrics only queues; a flush writes all queued steps in one log_batch; finish writes the rest."""
    s = _store(tmp_path)
    t = MlflowTracker(s.uri, "ddray", run_name="batched", flush_s=3600)
    batches: list[int] = []
    real = t.client.log_batch

    def counting(*args: Any, **kwargs: Any) -> Any:
        batches.append(len(kwargs.get("metrics") or []))
        return real(*args, **kwargs)

    t.client.log_batch = counting
    for step in range(1, 51):
        t.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step=step)
    assert _history(s.client, t.run_id, "loss") == [] and batches == []  # nothing written inside the steps
    t.flush()
    assert _history(s.client, t.run_id, "loss") == list(range(1, 51)) and batches == [100]
    t.log_metrics({"loss": 0.0}, step=51)
    t.finish("FINISHED")
    run = s.client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and _history(s.client, t.run_id, "loss") == list(range(1, 52))
    assert run.data.metrics["loss"] == 0.0


@pytest.mark.parametrize("ending", ["return", "crash"])
def test_queued_metrics_survive_a_process_that_never_finishes_its_run(tmp_path: Path, ending: str) -> None:
    """A process that exits (or dies of an exception) without finish() still writes every queued step."""
    s = _store(tmp_path)
    code = (f"from ddray.tracking.tracker import MlflowTracker\n"
            f"t = MlflowTracker({s.uri!r}, 'ddray', run_name='no-finish', flush_s=3600)\n"
            f"for step in range(1, 31):\n"
            f"    t.log_metrics({{'loss': float(step)}}, step=step)\n"
            f"print(t.run_id, flush=True)\n"
            + ("raise RuntimeError('crash')\n" if ending == "crash" else ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (r.returncode != 0) == (ending == "crash"), r.stderr
    run_id = r.stdout.split()[0]
    assert _history(s.client, run_id, "loss") == list(range(1, 31))


def test_tracked_ends_runs_failed_or_killed(tmp_path: Path) -> None:
    s = _store(tmp_path)
    cfg = load_config(None, tracking_uri=s.uri)
    for exc, status in ((RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")):
        with pytest.raises(type(exc)):
            with tracked(cfg, "distill", run_name=status) as t:
                raise exc
        assert s.client.get_run(t.run_id).info.status == status  # type: ignore[attr-defined]


def test_tracking_uri_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"  # MLflow's default
    assert resolve_tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path.resolve()}/sub/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert resolve_tracking_uri(None) == "http://example.invalid:5000"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"  # the flag wins
    with pytest.raises(TrackingUnavailable, match="does not exist"):
        MlflowTracker(f"sqlite:///{tmp_path}/missing/m.db")


def test_a_new_experiments_artifacts_live_beside_its_sqlite_store(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Not in ./mlruns of the directory the first run happened to start in (MLflow's default)."""
    elsewhere, db_dir = tmp_path / "cwd", tmp_path / "store"
    elsewhere.mkdir()
    db_dir.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{db_dir}/mlflow.db"
    (tmp_path / "f.txt").write_text("x")
    t = MlflowTracker(uri, "my team/dd")
    t.log_artifact(tmp_path / "f.txt")
    t.finish("FINISHED")
    assert (db_dir / "mlruns" / "my_team_dd" / t.run_id / "artifacts" / "f.txt").read_text() == "x"
    assert list(elsewhere.iterdir()) == []
    assert artifact_location("http://127.0.0.1:5000", "dd") is None  # a server keeps its own artifact root
    assert artifact_location("sqlite:///:memory:", "dd") is None


@pytest.mark.slow
def test_distill_over_http_to_a_real_mlflow_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "served-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "mlflow server did not start in 90 s"
                time.sleep(0.5)
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        out = tmp_path / "run"
        assert main(["distill", "--local", "--no-progress", *TINY, "--iterations", "2", "--out", str(out),
                     "--tracking-uri", uri]) == 0
        client = MlflowClient(tracking_uri=uri)
        [run] = client.search_runs([client.get_experiment_by_name("ddray").experiment_id])
        assert run.info.status == "FINISHED" and run.data.params["distill.iterations"] == "2"
        assert _history(client, run.info.run_id, "outer_loss") == [1, 2]
        names = {f.path for f in client.list_artifacts(run.info.run_id, "distilled")}
        assert {"distilled/data.parquet", "distilled/meta.json"} <= names
        d = ddray.load_distilled(f"runs:/{run.info.run_id}")
        assert tuple(d.images.shape) == (2, 10, 1, 28, 28)
        assert not (tmp_path / "mlflow.db").exists()  # everything went over HTTP
    finally:
        os.kill(server.pid, signal.SIGTERM)  # the server stops its uvicorn worker on SIGTERM
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)  # its own session: the group id is its pid
            server.wait(timeout=10)
        log.close()
