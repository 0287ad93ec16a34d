"""Tracking behind an interface: the math never calls a tracker directly.

:class:`Tracker` is what the drivers call; :class:`NullTracker` does nothing
(``--no-tracking``); :class:`MlflowTracker` records a run in MLflow through an
explicit ``MlflowClient`` (no global "active run", so it works the same in the
CLI process, in a Ray Tune trial actor and after a restart). :func:`make_tracker`
builds the right one from a :class:`~ddray.config.RunConfig`, and :func:`tracked`
wraps a command so its run ends FINISHED, FAILED or KILLED.

Metrics are written in batches off the caller's critical path (:mod:`ddray.tracking.batch_writer`):
:meth:`MlflowTracker.log_metrics` queues them and a background thread writes what has
gathered every ``flush_s`` seconds; :meth:`MlflowTracker.finish`, pickling the tracker
and the interpreter's exit write whatever is still queued.

Where runs go: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else MLflow's
default, an SQLite store ``mlflow.db`` in the working directory. Relative SQLite
paths are made absolute, so Ray actors (which run in other directories) write to
the same store. Only this module imports ``mlflow``, and only when tracking is on.

A server with authentication (``mlflow server --app-name basic-auth``) takes the
login from ``$MLFLOW_TRACKING_USERNAME`` / ``$MLFLOW_TRACKING_PASSWORD``, which the
MLflow client reads itself. They never travel in a URI, a Ray runtime_env or a
param: every process that logs (the driver, Ray workers, Tune trials) must have
them in its environment — on Kubernetes from the Secret that ``$DDRAY_MLFLOW_LOGIN_FROM``
names, so that errors can say which Secret to check.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol

from ddray.tracking.batch_writer import BatchWriter

if TYPE_CHECKING:
    from ddray.config import Config

TRACKING_ENV = "MLFLOW_TRACKING_URI"
LOGIN_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
SECRET_ENV = "DDRAY_MLFLOW_LOGIN_FROM"  # the Kubernetes Secret the login comes from (named in messages)
DISTILLED_ARTIFACT = "distilled"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
PARAM_BATCH = 100  # MLflow's limit on params per log_batch call
METRIC_BATCH = 1000  # MLflow's limit on metrics per log_batch call
FLUSH_S = 2.0  # seconds between background metric writes


class Tracker(Protocol):
    """What a run reports: params once, metrics per step, files as artifacts."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """A tracker that records nothing (``--no-tracking``)."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class TrackingUnavailable(ValueError):
    """The tracking store cannot be reached (the message names the URI)."""


# ----------------------------------------------------------------------------- URIs


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment of a local SQLite store keeps its artifacts: ``mlruns/<experiment>`` beside the
    database file, not MLflow's default ``./mlruns`` of whatever directory the first run started in. None
    (MLflow's choice: the server's artifact root) for every other store."""
    db = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    if not db or db == ":memory:":
        return None
    return (Path(db).resolve().parent / "mlruns" / re.sub(r"[^\w.-]", "_", experiment)).as_uri()


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``; local paths made absolute."""
    uri = uri or os.environ.get(TRACKING_ENV) or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        if db and db != ":memory:" and not db.startswith("/"):
            return "sqlite:///" + str(Path(db).resolve())
        return uri
    if uri.startswith("file:") or "://" not in uri and not uri.startswith("databricks"):
        path = uri[len("file:"):] if uri.startswith("file:") else uri
        if not path.startswith("//"):
            return Path(path).resolve().as_uri()
    return uri


def _login_hint() -> str:
    keys = " and ".join(LOGIN_ENV)
    secret = os.environ.get(SECRET_ENV)
    if secret:
        return f"{keys} come from the Secret {secret!r}: check that it exists and holds both keys"
    return f"set {keys}"


def check_login(uri: str, timeout: float = 5.0) -> None:
    """Fail fast when an HTTP(S) server at ``uri`` wants a login that ``$MLFLOW_TRACKING_USERNAME`` /
    ``$MLFLOW_TRACKING_PASSWORD`` do not give (MLflow's client would fail later, deep in a run)."""
    import base64
    import urllib.error
    import urllib.request

    have = [k for k in LOGIN_ENV if os.environ.get(k)]
    if os.environ.get(SECRET_ENV) and len(have) < len(LOGIN_ENV):
        missing = ", ".join(k for k in LOGIN_ENV if k not in have)
        raise TrackingUnavailable(f"MLflow tracking server {uri}: no login ({missing} not set); {_login_hint()}")
    req = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
    if len(have) == len(LOGIN_ENV):
        token = base64.b64encode(f"{os.environ[LOGIN_ENV[0]]}:{os.environ[LOGIN_ENV[1]]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        urllib.request.urlopen(req, timeout=timeout).close()
    except urllib.error.HTTPError as e:
        if e.code == 401:
            what = "rejected the login" if have else "requires a login"
            raise TrackingUnavailable(f"MLflow tracking server {uri} {what}; {_login_hint()}") from None
    except (urllib.error.URLError, OSError):
        pass  # reachability is check_tracking_reachable's job


def check_tracking_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (:class:`TrackingUnavailable`) when the store at ``uri`` cannot be reached or used.

    HTTP(S): any HTTP answer from ``/health`` counts as reachable, and then the login
    must be accepted (:func:`check_login`); SQLite: the database's directory must
    exist. MLflow's own client would retry for minutes.
    """
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.parse
        import urllib.request

        if urllib.parse.urlsplit(uri).password is not None:
            raise TrackingUnavailable(f"--tracking-uri: the URI holds a user:password part; remove it and set "
                                      f"{' / '.join(LOGIN_ENV)} instead (a Secret on Kubernetes)")
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # the server answered
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingUnavailable(f"MLflow tracking server {uri} is unreachable ({reason}); start it, fix "
                                      f"--tracking-uri / ${TRACKING_ENV}, or pass --tracking-optional or "
                                      "--no-tracking") from None
        check_login(uri, timeout)
    elif uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        if db != ":memory:" and not Path(db).parent.is_dir():
            raise TrackingUnavailable(f"MLflow tracking store {uri}: directory {Path(db).parent} does not exist")


def tracking_runtime_env(config: "Config") -> dict[str, Any]:
    """A Ray ``runtime_env`` that hands the tracking URI to actors and trial drivers on every node."""
    if not config.run.tracking:
        return {}
    return {"env_vars": {TRACKING_ENV: resolve_tracking_uri(config.run.tracking_uri)}}


# ----------------------------------------------------------------------------- tags


def git_commit() -> str | None:
    """The ddray source's git commit (``$DDRAY_GIT_COMMIT`` in images without .git), or None."""
    if os.environ.get("DDRAY_GIT_COMMIT"):
        return os.environ["DDRAY_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def ray_address(config: "Config") -> str:
    """The Ray cluster this process is connected to, else the configured one, else ``none``."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            try:
                return str(ray.get_runtime_context().gcs_address)
            except Exception:  # older/odd runtimes: fall through to the configured address
                pass
    return config.cluster.address or os.environ.get("RAY_ADDRESS") or "none"


def run_tags(config: "Config", command: str) -> dict[str, str]:
    """Tags every ddray run carries: version, git commit, Ray address, command, mode, data set, model."""
    from ddray._version import __version__

    tags = {"ddray.version": __version__, "ddray.command": command, "ddray.mode": config.cluster.mode,
            "ddray.init": config.distill.init, "ddray.dataset": config.data.dataset,
            "ddray.model": config.model.model, "ddray.ray_address": ray_address(config)}
    commit = git_commit()
    if commit:
        tags["ddray.git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    return tags


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for k, v in params.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = str(v)[:MAX_PARAM_LENGTH]
    return flat


# ----------------------------------------------------------------------------- MLflow


class MlflowTracker:
    """One MLflow run, written through ``MlflowClient(uri)``.

    Args:
        uri: tracking URI (see :func:`resolve_tracking_uri`).
        experiment: experiment name; created if missing.
        run_name: display name of a new run.
        tags: tags of a new run.
        parent_run_id: makes the new run a nested child of this run (Tune trials).
        run_id: reopen this existing run instead of creating one (resumed trials).
        optional: on a logging error, warn once and stop logging instead of raising.
        flush_s: seconds between background writes of the queued metrics.
    """

    def __init__(self, uri: str, experiment: str = "ddray", run_name: str | None = None,
                 tags: dict[str, str] | None = None, parent_run_id: str | None = None,
                 run_id: str | None = None, optional: bool = False, flush_s: float = FLUSH_S) -> None:
        check_tracking_reachable(uri)
        self.uri, self.optional, self.flush_s = uri, optional, flush_s
        self._disabled = self._finished = False
        client = self.client
        try:
            if run_id:
                client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                self.experiment_id = client.get_run(run_id).info.experiment_id
            else:
                self.experiment_id = self._experiment_id(experiment)
                all_tags = dict(tags or {})
                if parent_run_id:
                    all_tags["mlflow.parentRunId"] = parent_run_id
                run = client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
                self.run_id = run.info.run_id
        except TrackingUnavailable:
            raise
        except Exception as e:  # mlflow raises many types for a store it cannot use
            raise TrackingUnavailable(f"MLflow tracking store {uri}: cannot start a run "
                                      f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None

    @property
    def client(self) -> Any:
        if getattr(self, "_client", None) is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    @property
    def metrics(self) -> BatchWriter[Any]:
        """The queue of metrics not yet written (created on first use, also after unpickling)."""
        if getattr(self, "_metrics", None) is None:
            self._metrics: BatchWriter[Any] | None = BatchWriter(self._write_metrics, self.flush_s, METRIC_BATCH)
            self._lock = threading.Lock()  # one client call at a time: the writer thread and the caller's
        assert self._metrics is not None
        return self._metrics

    def __getstate__(self) -> dict[str, Any]:
        """Picklable for Ray: queued metrics are written first; client, queue and lock are rebuilt on arrival."""
        if getattr(self, "_metrics", None) is not None:
            self.flush()
        return {k: v for k, v in self.__dict__.items() if k not in ("_client", "_metrics", "_lock")}

    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise TrackingUnavailable(f"MLflow experiment {name!r} in {self.uri} is deleted; restore it "
                                          "(`mlflow experiments restore`) or pick another --experiment")
            return str(exp.experiment_id)
        try:
            return str(self.client.create_experiment(name, artifact_location=artifact_location(self.uri, name)))
        except Exception:  # created concurrently by another trial
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return str(exp.experiment_id)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self._disabled:
            return
        _ = self.metrics  # the lock exists
        try:
            with self._lock:
                fn(*args, **kwargs)
        except Exception as e:
            if not self.optional:
                raise
            self._disabled = True
            warnings.warn(f"MLflow {what} failed for run {self.run_id} at {self.uri} "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                          "continuing without tracking", stacklevel=3)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in _flatten(params).items()]
        for i in range(0, len(items), PARAM_BATCH):
            self._call("log_params", self.client.log_batch, self.run_id, params=items[i:i + PARAM_BATCH])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._call("set_tags", self.client.log_batch, self.run_id,
                   tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue the finite numbers of ``metrics`` at ``step`` (timestamped now); written in the background."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        if items and not self._disabled:
            self.metrics.add(items)

    def _write_metrics(self, items: list[Any]) -> None:
        self._call("log_metrics", self.client.log_batch, self.run_id, metrics=items)

    def flush(self) -> None:
        """Write the queued metrics now."""
        self.metrics.flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        fn = self.client.log_artifacts if p.is_dir() else self.client.log_artifact
        self._call("log_artifact", fn, self.run_id, str(p), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED); later calls do nothing."""
        if self._finished:
            return
        self._finished = True
        try:
            self.metrics.close()  # everything queued is written before the run ends
        finally:
            self._disabled = False  # the final status is worth one more try
            self._call("finish", self.client.set_terminated, self.run_id, status)


def make_tracker(config: "Config", kind: str, run_name: str | None = None, parent_run_id: str | None = None,
                 run_id: str | None = None, tags: dict[str, str] | None = None) -> Tracker:
    """The tracker for a ``kind`` run (distill, evaluate, baseline, pretrain, tune, trial) of ``config``.

    A NullTracker under ``--no-tracking``. Otherwise an MLflow run tagged with
    :func:`run_tags` (plus ``tags``), holding the full config as params. An
    unreachable store raises :class:`TrackingUnavailable` (a ValueError naming the
    URI), or under ``--tracking-optional`` warns and returns a NullTracker.
    """
    if not config.run.tracking:
        return NullTracker()
    uri = resolve_tracking_uri(config.run.tracking_uri)
    try:
        default_name = f"{kind}-{Path(config.run.out).name}" if config.run.out else kind
        tracker = MlflowTracker(uri, config.run.experiment, run_name=run_name or default_name,
                                tags={**run_tags(config, kind), **(tags or {})}, parent_run_id=parent_run_id,
                                run_id=run_id, optional=config.run.tracking_optional)
    except TrackingUnavailable as e:
        if not config.run.tracking_optional:
            raise
        warnings.warn(f"{e}; continuing without tracking (--tracking-optional)", stacklevel=2)
        return NullTracker()
    if run_id is None:
        tracker.log_params(config.flat())
    return tracker


def exit_status(error: BaseException | None) -> str:
    """The status a run ends with: FINISHED without an error or on a clean ``sys.exit`` (as when Ray Tune
    stops a trial early), KILLED on Ctrl-C, FAILED on any other exception."""
    if error is None or isinstance(error, SystemExit) and error.code in (0, None):
        return "FINISHED"
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


@contextmanager
def finishing(tracker: Tracker) -> Iterator[Tracker]:
    """``with finishing(tracker):`` — the run ends with the :func:`exit_status` of the block.

    The one place a run's final status is decided: :func:`tracked` commands, and the Tune
    search's parent run and trial runs (:mod:`ddray.tune`).
    """
    try:
        yield tracker
    except BaseException as e:
        tracker.finish(exit_status(e))
        raise
    tracker.finish(exit_status(None))


@contextmanager
def tracked(config: "Config", kind: str, **kwargs: Any) -> Iterator[Tracker]:
    """``with tracked(cfg, "distill") as t:`` — a :func:`make_tracker` run that ends as :func:`finishing` says."""
    with finishing(make_tracker(config, kind, **kwargs)) as tracker:
        yield tracker


def end_run(uri: str, run_id: str, status: str, tags: dict[str, str] | None = None) -> bool:
    """End run ``run_id`` in the store at ``uri`` with ``status`` (setting ``tags`` first) if it is still
    RUNNING: for a run whose own process could not end it (a Tune trial stopped or failed in its actor).
    Returns whether it ended the run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status)
    return True


# ----------------------------------------------------------------------------- artifacts


def log_final_checkpoint(tracker: Tracker, config: "Config", out: str | Path) -> Path | None:
    """Log the newest checkpoint (and its digest) of a run under ``checkpoint/``; returns it or None."""
    from ddray.store.checkpoint import list_checkpoints

    storage = config.run.storage
    if storage and "://" in storage and not storage.startswith("file://"):
        remote = list_checkpoints(storage)  # already durable: record where, upload nothing
        if remote:
            tracker.set_tags({"ddray.final_checkpoint": str(remote[-1])})
        return None
    where = Path(storage[len("file://"):] if storage and storage.startswith("file://") else storage) \
        if storage else Path(out) / "checkpoints"
    found = list_checkpoints(where)
    if not found:
        return None
    latest = Path(found[-1])
    tracker.log_artifact(latest, "checkpoint")
    digest = Path(str(latest) + ".sha256")
    if digest.is_file():
        tracker.log_artifact(digest, "checkpoint")
    return latest


def parse_run_uri(uri: str) -> tuple[str, str]:
    """``runs:/<run_id>[/<artifact path>]`` → (run_id, artifact path, default ``distilled``)."""
    if not uri.startswith("runs:/"):
        raise ValueError(f"{uri}: expected an MLflow run URI runs:/<run_id> (models:/ URIs are not supported)")
    parts = [p for p in uri[len("runs:/"):].split("/") if p]
    if not parts:
        raise ValueError(f"{uri}: expected runs:/<run_id>")
    return parts[0], "/".join(parts[1:]) or DISTILLED_ARTIFACT


def download_distilled(uri: str, tracking_uri: str | None = None) -> Path:
    """Fetch the distilled-data directory of an MLflow run (``runs:/<run_id>``) to a local path.

    Raises a one-line ValueError when the run does not exist or holds no distilled data.
    """
    run_id, artifact_path = parse_run_uri(uri)
    store = resolve_tracking_uri(tracking_uri)
    check_tracking_reachable(store)
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    try:
        client.get_run(run_id)
    except Exception:
        raise ValueError(f"{uri}: no such MLflow run in {store}") from None
    try:
        names = {Path(f.path).name for f in client.list_artifacts(run_id, artifact_path)}
    except Exception as e:
        raise ValueError(f"{uri}: cannot list the run's artifacts ({str(e).splitlines()[0]})") from None
    from ddray.store.artifact import DATA_FILE, META_FILE

    if not {DATA_FILE, META_FILE} <= names:
        raise ValueError(f"{uri}: the run holds no distilled data (no {artifact_path}/{DATA_FILE} and "
                         f"{artifact_path}/{META_FILE} artifacts)")
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                    tracking_uri=store)
    except Exception as e:  # mlflow raises several exception types for missing runs/artifacts
        raise ValueError(f"{uri}: could not download distilled data ({str(e).splitlines()[0]})") from None
    return Path(local)
