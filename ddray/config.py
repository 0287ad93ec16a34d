"""Run configuration: one frozen dataclass per concern, validated at construction.

A YAML config file is a mapping with optional sections ``data``, ``model``,
``distill``, ``cluster`` and ``run``, each holding the fields of the dataclass of
the same name::

    data:    {dataset: mnist5k}
    model:   {model: lenet, init_scheme: xavier}
    distill: {init: random, steps: 10, epochs: 3, ipc: 1, iterations: 500, nets: 4}
    run:     {seed: 0, out: runs/mnist}

Field names are unique across sections, so a flat ``{"ipc": 2}`` (a CLI flag, a
Tune search-space key, an MLflow param) names exactly one field; see
:meth:`Config.override`. Every invalid value raises ``ValueError`` naming the
option, the value given and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import yaml

from ddray.validation import (boolean, each, is_int, is_number, nonneg_int, one_of, parse_lrs, positive_int,
                              positive_number, read_yaml, require)

if TYPE_CHECKING:
    from ddray.methods import Method

INIT_MODES = ("fixed", "random", "fixed-pretrained", "random-pretrained")
INIT_SCHEMES = ("xavier", "kaiming", "normal", "orthogonal", "default")
MODELS = ("lenet", "alexcifarnet", "convnet")
SYN_INITS = ("noise", "real")
MEMORY_MODES = ("full", "recompute")
LABEL_MODES = ("hard", "learned")
LABEL_LOSSES = ("ce", "kl")
SYNC_MODES = ("sync", "async")
PLACEMENTS = ("spread", "strict-spread", "pack")
PROTOCOLS = ("dd", "dc")  # evaluation: DD's (the set's own schedule) or the DC line's (ConvNet, SGD, epochs)


def parse_attack(spec: str | None) -> tuple[int, int] | None:
    """``"a:b"`` → (a, b): distil data that makes nets predict class a as b."""
    if spec is None:
        return None
    parts = str(spec).split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--attack: invalid value {spec!r}; expected SOURCE:TARGET class indices, e.g. 0:1")
    a, b = int(parts[0]), int(parts[1])
    if a == b:
        raise ValueError(f"--attack: invalid value {spec!r}; source and target class must differ")
    return a, b


@dataclass(frozen=True)
class DataConfig:
    """Which real data set to distil, where its files are, and how they are held.

    ``imagefolder`` and ``parquet`` read the user's files from ``data_root`` (a path, an
    archive, or ``s3://bucket/prefix`` for Parquet), decoded once into ``cache_dir``; a set
    without a test split holds out ``test_fraction`` of each class. ``zca`` whitens the
    images (regularised by ``zca_eps``) with a transform fitted on the training split.
    ``data_cache_mb`` bounds the decoded images a process keeps; the rest are read from a
    class-partitioned Parquet copy (the same bits as holding the whole set).
    """

    dataset: str = "mnist5k"
    data_root: str | None = None
    download: bool = False
    image_size: int | None = None
    test_fraction: float = 0.2
    cache_dir: str | None = None
    zca: bool = False
    zca_eps: float = 0.1
    data_cache_mb: int | None = None

    def __post_init__(self) -> None:
        from ddray.data import dataset_names

        one_of("--dataset", self.dataset, dataset_names())
        if self.image_size is not None:
            each(positive_int, self, "image_size")
        require(is_number(self.test_fraction) and 0 < self.test_fraction < 1, "--test-fraction",
                self.test_fraction, "expected a number between 0 and 1 (exclusive)")
        each(boolean, self, "zca")
        each(positive_number, self, "zca_eps")
        if self.data_cache_mb is not None:
            each(positive_int, self, "data_cache_mb")


@dataclass(frozen=True)
class ModelConfig:
    """The network trained in the inner loop and how its θ₀ is drawn."""

    model: str = "lenet"
    init_scheme: str = "xavier"
    width: int = 128  # ConvNet's channels per layer (the papers: 128)

    def __post_init__(self) -> None:
        one_of("--model", self.model, MODELS)
        one_of("--init-scheme", self.init_scheme, INIT_SCHEMES)
        each(positive_int, self, "width")
        if self.model != "convnet" and self.width != 128:
            raise ValueError(f"--width {self.width}: not available with --model {self.model} "
                             "(the channels of --model convnet)")


@dataclass(frozen=True)
class DistillConfig:
    """The method: synthetic-set size, unroll, outer optimisation, init mode.

    ``method`` picks the algorithm (:mod:`ddray.methods`: dd, dc, dsa, dm, mtt); options
    some methods do not use must keep their defaults under the others.

    DD: S = ``steps`` distinct batches of ``ipc`` images per class; T = S × ``epochs``
    learned step sizes (softplus-positive, initialised at ``init_lr``); ``nets``
    θ₀ draws per meta-step; Adam(``lr``, betas (0.5, 0.999)) on the images and raw
    step sizes, multiplied by ``lr_decay`` every ``lr_decay_every`` meta-steps.

    DC/DSA/DM/MTT learn one set of ``ipc`` images per class with SGD (momentum 0.5);
    ``None`` for ``lr``, ``syn_init`` and ``dsa`` means the method's paper default.
    DC/DSA: ``real_per_class`` real images per class, ``outer_loop``/``inner_loop``
    (default by ipc as the paper), the network trained with ``net_lr`` in between.
    DM: ``real_per_class`` real images per class. MTT: expert trajectories in
    ``experts``; the student starts at a random expert epoch below
    ``max_start_epoch``, takes ``syn_steps`` steps (learned size, initialised at
    ``net_lr``, outer lr ``lr_lr``) and is matched to the expert ``expert_epochs`` later;
    ``batch_syn``: images per student step (None: all), as MTT's ``--batch_syn``.
    ``labels``: ``hard`` class labels, or ``learned`` soft labels (DD and MTT) with their own
    learning rate ``lr_labels`` (None: the method's, :attr:`labels_lr`).
    """

    init: str = "random"
    steps: int = 10
    epochs: int = 3
    ipc: int = 1
    iterations: int = 500
    nets: int = 4
    batch_size: int = 1024
    lr: float | None = None
    lr_decay: float = 0.5
    lr_decay_every: int = 400
    init_lr: float = 0.02
    syn_init: str | None = None
    attack: str | None = None
    memory: str = "full"
    pretrained: str | None = None
    method: str = "dd"
    dsa: bool | None = None
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    real_per_class: int = 256
    outer_loop: int | None = None
    inner_loop: int | None = None
    net_lr: float = 0.01
    experts: str | None = None
    syn_steps: int = 20
    expert_epochs: int = 2
    max_start_epoch: int = 20
    lr_lr: float = 1e-5
    batch_syn: int | None = None
    labels: str = "hard"
    lr_labels: float | None = None

    def __post_init__(self) -> None:
        from ddray.core.augment import parse_strategy
        from ddray.methods import METHOD_NAMES, check_method_options

        one_of("--method", self.method, METHOD_NAMES)
        one_of("--init", self.init, INIT_MODES)
        each(positive_int, self, "steps", "epochs", "ipc", "iterations", "nets", "batch_size", "lr_decay_every",
             "real_per_class", "syn_steps", "expert_epochs", "max_start_epoch")
        optional = ("outer_loop", "inner_loop", "batch_syn")
        each(positive_int, self, *(n for n in optional if getattr(self, n) is not None))
        each(positive_number, self, "lr_decay", "init_lr", "net_lr", "lr_lr")
        if self.lr is not None:
            each(positive_number, self, "lr")
        if self.syn_init is not None:
            one_of("--syn-init", self.syn_init, SYN_INITS)
        if self.dsa is not None:
            each(boolean, self, "dsa")
        parse_strategy(self.dsa_strategy)
        one_of("--memory", self.memory, MEMORY_MODES)
        one_of("--labels", self.labels, LABEL_MODES)
        if self.lr_labels is not None:
            each(positive_number, self, "lr_labels")
        parse_attack(self.attack)
        if self.init.endswith("pretrained") and not self.pretrained:
            raise ValueError(f"--init {self.init} needs --pretrained DIR (made by `ddray pretrain`)")
        check_method_options(self)

    @property
    def spec(self) -> "Method":
        """The method's paper defaults."""
        from ddray.methods import METHODS

        return METHODS[self.method]

    @property
    def outer_lr(self) -> float:
        """``lr``, or the method's default."""
        return self.lr if self.lr is not None else self.spec.lr

    @property
    def labels_lr(self) -> float | None:
        """The learning rate of learned labels: ``lr_labels``, else the method's; None with hard labels."""
        if self.labels != "learned":
            return None
        return self.lr_labels if self.lr_labels is not None else self.spec.lr_labels

    @property
    def init_images(self) -> str:
        """``syn_init``, or the method's default (DD: noise, the others: real images)."""
        return self.syn_init or self.spec.syn_init

    @property
    def augment(self) -> str | None:
        """The DSA strategy when augmentation is on (``dsa``, or the method's default), else None."""
        on = self.dsa if self.dsa is not None else self.spec.dsa
        return self.dsa_strategy if on else None

    @property
    def loops(self) -> tuple[int, int]:
        """DC's (outer_loop, inner_loop): as set, or the paper's for ``ipc``."""
        from ddray.methods import dc_loops

        outer, inner = dc_loops(self.ipc)
        return self.outer_loop or outer, self.inner_loop or inner

    @property
    def layout(self) -> tuple[int, int]:
        """(S, E) of the learned set: DD's steps and epochs; one batch, one step size otherwise."""
        return (self.steps, self.epochs) if self.spec.steps_and_epochs else (1, 1)

    @property
    def initial_lr(self) -> float:
        """η₀, where the learned step size(s) start: DD's ``init_lr``, the other methods' ``net_lr``."""
        return float(getattr(self, self.spec.step_size_option))

    @property
    def total_steps(self) -> int:
        """T = S × E step sizes of the learned set (DD: steps × epochs inner SGD steps)."""
        s, e = self.layout
        return s * e


def parse_workers(value: Any) -> tuple[int, int]:
    """``--workers``: ``N`` (exactly N) or ``"MIN:MAX"`` (elastic) → (MIN, MAX); ValueError otherwise."""
    allowed = "expected a positive integer N, or MIN:MAX with 1 <= MIN <= MAX (quote it in YAML: '1:4')"
    if is_int(value):
        lo = hi = value
    elif isinstance(value, str) and value.strip().isdigit():
        lo = hi = int(value)
    elif isinstance(value, str) and value.count(":") == 1 and all(p.strip().isdigit() for p in value.split(":")):
        lo, hi = (int(p) for p in value.split(":"))
    else:
        raise ValueError(f"--workers: invalid value {value!r}; {allowed}")
    if not 1 <= lo <= hi:
        raise ValueError(f"--workers: invalid value {value!r}; {allowed}")
    return lo, hi


@dataclass(frozen=True)
class ClusterConfig:
    """How the meta-gradient work is spread over Ray actors.

    ``workers``: ``N``, or ``"MIN:MAX"`` for an elastic fleet that starts once MIN workers
    are placed and grows to MAX as capacity appears (and shrinks to MIN as nodes leave).
    ``cpus_per_worker`` / ``gpus_per_worker``: each worker's resources (a fraction of a GPU
    lets workers share a card); ``None``: derived from the cluster when the run starts.
    ``placement_timeout``: seconds to wait for the MIN workers (and, mid-run, for capacity
    to come back) before giving up.
    """

    workers: int | str = 1
    mode: str = "sync"
    max_staleness: int = 2
    shards: int = 1
    placement: str = "spread"
    address: str | None = None
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    placement_timeout: float = 600.0

    def __post_init__(self) -> None:
        lo, hi = parse_workers(self.workers)
        if lo == hi:  # "4" (a CLI string) and 4 are the same request
            object.__setattr__(self, "workers", lo)
        each(positive_int, self, "shards")
        each(nonneg_int, self, "max_staleness")
        one_of("--mode", self.mode, SYNC_MODES)
        one_of("--placement", self.placement, PLACEMENTS)
        if self.cpus_per_worker is not None:
            each(positive_number, self, "cpus_per_worker")
        g = self.gpus_per_worker
        if g is not None:
            require(is_number(g) and g >= 0 and (g <= 1 or float(g).is_integer()), "--gpus-per-worker", g,
                    "expected a number >= 0: a fraction up to 1 (workers share a GPU) or a whole number")
        each(positive_number, self, "placement_timeout")

    @property
    def min_workers(self) -> int:
        return parse_workers(self.workers)[0]

    @property
    def max_workers(self) -> int:
        return parse_workers(self.workers)[1]


@dataclass(frozen=True)
class RunConfig:
    """Seed, outputs, checkpoints, evaluation and tracking of one run.

    Evaluation trains ``eval_nets`` fresh networks on the learned set: protocol ``dd``
    with the set's own steps and step sizes, ``dc`` as the DC/DSA/DM/MTT papers
    (SGD for ``eval_epochs`` epochs, :mod:`ddray.core.protocol_dc`). ``None``: ``dd``
    for ``--method dd``, ``dc`` for the others. ``compile``: ``torch.compile`` the inner
    step and the real-batch gradient of the DD and MTT unrolls (:mod:`ddray.core.kernels`;
    same gradients up to float rounding; eager with a warning where unavailable). ``cuda_graphs``:
    on a CUDA device, DD's meta-step (unroll, its vector-Jacobian product, the real-batch gradient)
    is captured whole as one CUDA graph per shape and replayed, and so are MTT's meta-step and
    each network's matching in DC and DM (:mod:`ddray.core.capture`; the same gradients to float tolerance, each graph
    checked against eager once; eager with a log line where capture fails); the graph holds the
    eager kernels, so with it ``compile`` applies only to shapes that could not be captured. No
    effect on CPU.
    ``label_loss``: how evaluation trains on soft labels: ``ce`` (soft cross-entropy) or ``kl``
    (KL divergence; the same gradients at temperature 1, :func:`ddray.core.protocol_dc.soft_label_loss`).
    ``scores``: DD-Ranking's HLR, IOR, LRS and ARS beside the accuracy at the end (:mod:`ddray.evaluation.scores`),
    with the learning rate chosen from ``score_lrs`` and the full training split trained for
    ``full_epochs`` epochs.
    """

    seed: int = 0
    out: str | None = None
    checkpoint_every: int = 100
    storage: str | None = None
    eval_every: int = 0
    eval_nets: int = 20
    eval_protocol: str | None = None
    eval_epochs: int = 300
    label_loss: str = "ce"
    scores: bool = True
    score_lrs: str = "0.01"
    full_epochs: int = 20
    tracking: bool = True
    tracking_uri: str | None = None
    tracking_optional: bool = False
    experiment: str = "ddray"
    compile: bool = False
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        each(boolean, self, "compile", "cuda_graphs", "scores")
        each(nonneg_int, self, "seed", "eval_every")
        one_of("--label-loss", self.label_loss, LABEL_LOSSES)
        each(positive_int, self, "checkpoint_every", "eval_nets", "eval_epochs", "full_epochs")
        parse_lrs(self.score_lrs)
        if self.eval_protocol is not None:
            one_of("--eval-protocol", self.eval_protocol, PROTOCOLS)


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "distill": DistillConfig,
                             "cluster": ClusterConfig, "run": RunConfig}
FIELD_SECTION: dict[str, str] = {f.name: s for s, cls in SECTIONS.items() for f in fields(cls)}
FIELD_DEFAULTS: dict[str, Any] = {f.name: f.default for cls in SECTIONS.values() for f in fields(cls)}


@dataclass(frozen=True)
class Config:
    """The whole run configuration; written into every checkpoint and MLflow run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Config":
        """Build from nested sections and/or flat field names (flat keys win)."""
        d = dict(d or {})
        sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        def is_section(key: str, value: Any) -> bool:  # "model" is a section and a field
            return key in SECTIONS and not (key in FIELD_SECTION and isinstance(value, str))

        for key, value in d.items():
            if is_section(key, value):
                if value is None:
                    continue
                if not isinstance(value, Mapping):
                    raise ValueError(f"config section {key!r}: expected a mapping, got {value!r}")
                for k, v in value.items():
                    if k not in {f.name for f in fields(SECTIONS[key])}:
                        raise ValueError(f"config: unknown key {key}.{k}; allowed: "
                                         f"{', '.join(f.name for f in fields(SECTIONS[key]))}")
                    sections[key][k] = v
        for key, value in d.items():
            if is_section(key, value):
                continue
            if key not in FIELD_SECTION:
                raise ValueError(f"config: unknown key {key!r}; allowed sections: {', '.join(SECTIONS)}")
            sections[FIELD_SECTION[key]][key] = value
        return cls(**{s: SECTIONS[s](**kw) for s, kw in sections.items()})

    @property
    def protocol(self) -> str:
        """The evaluation protocol: ``eval_protocol``, else ``dd`` for DD and ``dc`` for the other methods."""
        return self.run.eval_protocol or self.distill.spec.eval_protocol

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict (YAML/JSON friendly)."""
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}

    def flat(self) -> dict[str, Any]:
        """``{"distill.steps": 10, ...}`` for MLflow params."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    def override(self, **values: Any) -> "Config":
        """A copy with flat fields replaced (``None`` values are ignored)."""
        merged = self.to_dict()
        for key, value in values.items():
            if value is None:
                continue
            if key not in FIELD_SECTION:
                raise ValueError(f"config: unknown option {key!r}")
            merged[FIELD_SECTION[key]][key] = value
        return Config.from_dict(merged)

    def dump(self, path: str | Path) -> None:
        """Write the whole config as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def load_config(path: str | Path | None, **overrides: Any) -> Config:
    """Load a YAML config (or defaults when ``path`` is None) and apply flat overrides."""
    base: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        loaded = read_yaml(p, "--config")
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ValueError(f"--config: {p} must hold a mapping of sections, got {type(loaded).__name__}")
        base = dict(loaded or {})
    try:
        cfg = Config.from_dict(base)
    except TypeError as e:  # wrong type of a section
        raise ValueError(f"--config: {e}") from None
    return cfg.override(**overrides)
