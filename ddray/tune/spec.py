"""The search file of ``ddray tune`` (``tune_configs/*.yaml``) → a validated :class:`TuneSpec`.

A search file (every key but ``search`` is optional)::

    name: mnist5k_quick           # Tune directory and MLflow parent-run name (default: the file's stem)
    storage_path: runs/tune       # Tune results + trial checkpoints go to STORAGE_PATH/NAME (a path or a
                                  # URI such as s3://bucket/prefix, see ddray/store/storage.py)
    fixed:                        # the run config every trial starts from (a distill YAML's sections)
      distill: {iterations: 60}
      run: {eval_every: 20, eval_nets: 10}
    search:                       # config field (flat name, as on the command line) → one distribution
      steps:   {choice: [5, 10]}          # random pick
      epochs:  {grid: [1, 2]}             # every value, for each of num_samples
      lr:      {loguniform: [0.003, 0.1]}
      init_lr: {uniform: [0.01, 0.05]}
      nets:    {randint: [1, 5]}          # integers 1..4 (upper bound exclusive, as in Ray)
    reference: {steps: 10, epochs: 3}     # tried first, never stopped early; the best trial is compared with it
    metric: eval_acc_mean         # eval_acc_mean (default) | eval_acc_std | eval_shuffled_acc_mean | outer_loss | …
    mode: max                     # max (default) | min
    num_samples: 8
    scheduler: asha               # asha (default) | fifo | {type: asha, grace_period: 20, reduction_factor: 2}
    max_concurrent_trials: 2
    resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0, driver_cpus: 1, ps_cpus: 1}

The whole file is validated before Ray starts; a mistake is a one-line
``ValueError`` naming the key (``search.steps: …``). Ray is imported only to turn
a spec into Tune objects (:meth:`Distribution.to_tune`, :meth:`TuneSpec.placement`).
"""


from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from ddray.config import FIELD_SECTION, SECTIONS, Config
from ddray.store.storage import check_uri, is_uri, join
from ddray.tracking.tracker import resolve_tracking_uri
from ddray.validation import (each, error, is_int, is_number, nonneg_number, one_of, positive_int, positive_number,
                              read_yaml, reported_as, require)

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
METRICS = ("eval_acc_mean", "eval_acc_std", "eval_shuffled_acc_mean", "attack_rate_mean", "outer_loss")
EVAL_METRICS = tuple(m for m in METRICS if m != "outer_loss")
SCHEDULERS = ("asha", "fifo")
TOP_KEYS = ("name", "storage_path", "fixed", "search", "reference", "metric", "mode", "num_samples",
            "scheduler", "max_concurrent_trials", "resources")
# run bookkeeping a trial owns itself; searching it makes no sense
NOT_SEARCHABLE = ("out", "storage", "tracking", "tracking_uri", "tracking_optional", "experiment", "address",
                  "download")
PLACEMENT_STRATEGY = {"spread": "SPREAD", "strict-spread": "STRICT_SPREAD", "pack": "PACK"}
CONFIRM_ABOVE = 50  # `ddray tune` asks for --yes before starting more trials than this (TuneSpec.trial_count)


# ----------------------------------------------------------------------------- the search file


@dataclass(frozen=True)
class Distribution:
    """One search-space entry: ``kind`` in DISTRIBUTIONS and its values or bounds."""

    kind: str
    args: tuple[Any, ...]

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](
            *self.args)

    def __str__(self) -> str:
        return f"{self.kind}{list(self.args)}"


@dataclass(frozen=True)
class Resources:
    """What one trial reserves: bundle 0 the trial driver, then the parameter server(s), then the workers."""

    workers: int | None = None  # default: the fixed config's cluster.workers
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    driver_cpus: float = 1.0
    ps_cpus: float = 1.0

    def bundles(self, workers: int, shards: int = 1) -> list[dict[str, float]]:
        worker = {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.gpus_per_worker else {})}
        return [{"CPU": self.driver_cpus}] + [{"CPU": self.ps_cpus}] * shards + [dict(worker)] * workers


@dataclass(frozen=True)
class Scheduler:
    """ASHA (early stopping at rungs of ``grace_period`` × ``reduction_factor``ⁿ meta-steps) or FIFO."""

    type: str = "asha"
    grace_period: int | None = None  # default: the fixed config's eval_every
    reduction_factor: float = 2.0


@dataclass(frozen=True)
class TuneSpec:
    """A validated search file."""

    name: str
    storage_path: Path | str  # a local directory, or a URI (s3://…) kept as given
    fixed: Config
    search: dict[str, Distribution]
    reference: dict[str, Any] | None = None
    metric: str = "eval_acc_mean"
    mode: str = "max"
    num_samples: int = 1
    scheduler: Scheduler = field(default_factory=Scheduler)
    max_concurrent_trials: int | None = None
    resources: Resources = field(default_factory=Resources)
    source: str = "<tune spec>"

    @property
    def experiment_dir(self) -> Path | str:
        return join(self.storage_path, self.name)

    @property
    def max_iterations(self) -> int:
        d = self.search.get("iterations")
        if d is None:
            return self.fixed.distill.iterations
        values = [int(v) for v in d.args] if d.kind in ("choice", "grid") else [int(d.args[1]) - 1]
        return max(values + [int((self.reference or {}).get("iterations", 0))])

    def trial_count(self) -> int:
        """How many trials the search runs: ``num_samples`` × the grid's size, the way Ray counts them.

        The reference point replaces one sample and spans only the grid axes it does not set.
        """
        def grid(skip: Mapping[str, Any]) -> int:
            return math.prod(len(d.args) for k, d in self.search.items() if d.kind == "grid" and k not in skip)

        if not self.reference:
            return self.num_samples * grid({})
        return grid(self.reference) + (self.num_samples - 1) * grid({})

    def trial_config(self, params: Mapping[str, Any], out: str | Path | None = None) -> Config:
        """The fixed config with a trial's sampled ``params`` applied (and its own output directory)."""
        d = self.fixed.to_dict()
        d["run"]["out"], d["run"]["storage"] = (str(out) if out else None), None
        if self.resources.workers is not None:
            d["cluster"]["workers"] = self.resources.workers
        return Config.from_dict(d).override(**{k: v for k, v in params.items() if k in FIELD_SECTION})

    def placement(self, params: Mapping[str, Any]) -> Any:
        """The trial's PlacementGroupFactory (its worker count may be a searched value)."""
        from ray import tune

        cfg = self.trial_config(params)
        return tune.PlacementGroupFactory(self.resources.bundles(cfg.cluster.max_workers, cfg.cluster.shards),
                                          strategy=PLACEMENT_STRATEGY[cfg.cluster.placement])

    def param_space(self) -> dict[str, Any]:
        """Tune's param_space: the distributions, plus fixed values of keys only the reference sets."""
        space = {k: d.to_tune() for k, d in self.search.items()}
        flat = {k.split(".", 1)[1]: v for k, v in self.fixed.flat().items()}
        space.update({k: flat[k] for k in (self.reference or {}) if k not in space})
        return space

    def params(self) -> dict[str, Any]:
        """The search's own settings, as MLflow params of the parent run."""
        p: dict[str, Any] = {f"search.{k}": str(v) for k, v in self.search.items()}
        p.update({"tune.metric": self.metric, "tune.mode": self.mode, "tune.num_samples": self.num_samples,
                  "tune.scheduler": self.scheduler.type, "tune.max_concurrent_trials": self.max_concurrent_trials,
                  "tune.source": self.source})
        p.update({f"tune.resources.{f.name}": getattr(self.resources, f.name) for f in fields(Resources)})
        if self.reference:
            p.update({f"reference.{k}": v for k, v in self.reference.items()})
        return p


def _field_type(name: str) -> str:
    [f] = [f for f in fields(SECTIONS[FIELD_SECTION[name]]) if f.name == name]
    return str(f.type)


def _check_value(fixed: Config, where: str, name: str, value: Any) -> None:
    """``value`` must be a valid setting of config field ``name`` (checked by the config itself)."""
    with reported_as(where):
        fixed.override(**{name: value})


def _distribution(fixed: Config, source: str, name: str, spec: Any) -> Distribution:
    where = f"{source}: search.{name}"
    if name not in FIELD_SECTION:
        raise error(where, f"unknown config field {name!r}; searchable: "
                           f"{', '.join(k for k in FIELD_SECTION if k not in NOT_SEARCHABLE)}")
    if name in NOT_SEARCHABLE:
        raise error(where, f"{name} is run bookkeeping and cannot be searched; set it under fixed:")
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise error(where, f"expected one distribution, e.g. {{choice: [5, 10]}}; "
                           f"one of {', '.join(DISTRIBUTIONS)}; got {spec!r}")
    [(kind, args)] = spec.items()
    if kind not in DISTRIBUTIONS:
        raise error(where, f"unknown distribution {kind!r}; use one of {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise error(where, f"{kind} needs a non-empty list, got {args!r}")
    typ = _field_type(name)
    if kind in ("choice", "grid"):
        for v in args:
            _check_value(fixed, where, name, v)
        return Distribution(kind, tuple(args))
    if len(args) != 2 or not all(is_number(v) for v in args) or not args[0] < args[1]:
        raise error(where, f"{kind} needs [low, high] with low < high, got {args!r}")
    lo, hi = args
    if kind == "randint":
        if not (is_int(lo) and is_int(hi)):
            raise error(where, f"randint needs integer bounds, got {args!r}")
        check = [lo, hi - 1]
    else:
        if typ.startswith("int"):
            raise error(where, f"{name} takes integers, {kind} draws floats; use randint, choice or grid")
        if kind == "loguniform" and lo <= 0:
            raise error(where, f"loguniform needs 0 < low, got {args!r}")
        check = [float(lo), float(hi)]
    if not (typ.startswith("int") or typ.startswith("float")):
        raise error(where, f"{name} is not numeric; use choice or grid")
    for v in check:
        _check_value(fixed, where, name, v)
    return Distribution(kind, (lo, hi))


def _dataclass_from(cls: type, source: str, key: str, value: Any) -> Any:
    if not isinstance(value, Mapping):
        raise error(f"{source}: {key}", f"expected a mapping, got {value!r}")
    allowed = [f.name for f in fields(cls)]
    for k in value:
        if k not in allowed:
            raise error(f"{source}: {key}.{k}", f"unknown key; allowed: {', '.join(allowed)}")
    return cls(**value)


def _resources(source: str, value: Any) -> Resources:
    r = _dataclass_from(Resources, source, "resources", value)

    def at(key: str) -> str:
        return f"{source}: resources.{key}"

    if r.workers is not None:
        positive_int(at("workers"), r.workers)
    each(positive_number, r, "cpus_per_worker", "driver_cpus", "ps_cpus", label=at)
    nonneg_number(at("gpus_per_worker"), r.gpus_per_worker)
    return r


def _scheduler(source: str, value: Any) -> Scheduler:
    if isinstance(value, str):
        value = {"type": value}
    s = _dataclass_from(Scheduler, source, "scheduler", value)

    def at(key: str) -> str:
        return f"{source}: scheduler.{key}"

    if s.type not in SCHEDULERS:
        raise error(at("type"), f"unknown scheduler {s.type!r}; use one of {', '.join(SCHEDULERS)}")
    if s.grace_period is not None:
        positive_int(at("grace_period"), s.grace_period)
    require(is_number(s.reduction_factor) and s.reduction_factor > 1, at("reduction_factor"), s.reduction_factor,
            "expected a number > 1")
    return s


def parse_tune_spec(raw: Any, source: str = "<tune spec>", **fixed_overrides: Any) -> TuneSpec:
    """Validate a parsed search file; ``fixed_overrides`` are flat config fields (CLI flags) for ``fixed``."""
    def at(key: str) -> str:  # errors name the file and the key
        return f"{source}: {key}"

    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: expected a mapping with keys {', '.join(TOP_KEYS)}")
    for k in raw:
        if k not in TOP_KEYS:
            raise error(at(str(k)), f"unknown key; allowed: {', '.join(TOP_KEYS)}")
    with reported_as(at("fixed")):
        fixed = Config.from_dict(raw.get("fixed") or {}).override(**fixed_overrides)
    # paths a trial (running in its own directory, maybe on another node) must find
    d = fixed.to_dict()
    for sec, name in (("data", "data_root"), ("distill", "pretrained")):
        if d[sec][name] and "://" not in str(d[sec][name]):
            d[sec][name] = str(Path(d[sec][name]).expanduser().resolve())
    if d["run"]["tracking"]:
        d["run"]["tracking_uri"] = resolve_tracking_uri(d["run"]["tracking_uri"])
    fixed = Config.from_dict(d)

    search_raw = raw.get("search")
    if not isinstance(search_raw, Mapping) or not search_raw:
        raise error(at("search"), "expected a mapping of config fields to distributions, "
                                  "e.g. {steps: {choice: [5, 10]}}")
    search = {str(k): _distribution(fixed, source, str(k), v) for k, v in search_raw.items()}

    reference = raw.get("reference")
    if reference is not None:
        if not isinstance(reference, Mapping):
            raise error(at("reference"), f"expected a mapping of config fields to values, got {reference!r}")
        for k, v in reference.items():
            if k not in FIELD_SECTION or k in NOT_SEARCHABLE:
                raise error(at(f"reference.{k}"), "unknown or unsearchable config field")
            _check_value(fixed, at(f"reference.{k}"), str(k), v)
        reference = dict(reference)

    metric = raw.get("metric", "eval_acc_mean")
    if metric not in METRICS:
        raise error(at("metric"), f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    mode = raw.get("mode", "max")
    one_of(at("mode"), mode, ("max", "min"))
    num_samples = raw.get("num_samples", 1)
    positive_int(at("num_samples"), num_samples)
    mct = raw.get("max_concurrent_trials")
    if mct is not None:
        positive_int(at("max_concurrent_trials"), mct)
    scheduler = _scheduler(source, raw.get("scheduler", "asha"))
    resources = _resources(source, raw.get("resources") or {})
    name = raw.get("name") or (Path(source).stem if source != "<tune spec>" else "ddray-tune")
    require(isinstance(name, str) and "/" not in name and not name.startswith("."), at("name"), name,
            "expected a plain directory name")
    storage = raw.get("storage_path", "runs/tune")
    require(isinstance(storage, str), at("storage_path"), storage, "expected a path or a URI")
    spec = TuneSpec(name, tune_storage_path(storage), fixed, search, reference, metric, mode,
                    num_samples, scheduler, mct, resources, source)

    if scheduler.type == "asha":
        if metric in EVAL_METRICS and not fixed.run.eval_every:
            raise error(at("fixed.run.eval_every"), f"ASHA compares trials on {metric}, which is measured "
                                                    "every eval_every meta-steps; set it > 0")
        grace = scheduler.grace_period or (fixed.run.eval_every or max(1, spec.max_iterations // 8))
        if grace > spec.max_iterations:
            raise error(at("scheduler.grace_period"), f"{grace} exceeds the trials' {spec.max_iterations} "
                                                      "iterations")
    if "workers" in spec.search and resources.workers is not None:  # the trial's bundles follow the search
        raise error(at("resources.workers"), "workers is searched; drop it from resources")
    return spec


def tune_storage_path(value: str) -> Path | str:
    """``storage_path`` as Tune gets it: a URI as given (credentials in it refused), a path made absolute."""
    if is_uri(value):
        check_uri(value, "--storage-path")
        return value.rstrip("/")
    return Path(value).expanduser().resolve()


def load_tune_spec(path: str | Path, **fixed_overrides: Any) -> TuneSpec:
    """Read and validate a ``tune_configs/*.yaml`` file."""
    return parse_tune_spec(read_yaml(path, "ddray tune"), str(path), **fixed_overrides)
