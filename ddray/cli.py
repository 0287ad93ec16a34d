"""``ddray distill | evaluate | load | compare | baseline | pretrain | experts | show | tune`` — the command line.

Every subcommand that runs the method takes ``--config FILE.yaml`` plus flag
overrides; an invalid value is a one-line error (exit code 2), never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ddray.config import (FIELD_DEFAULTS, FIELD_SECTION, INIT_MODES, INIT_SCHEMES, MEMORY_MODES, MODELS,
                          PLACEMENTS, SYN_INITS, SYNC_MODES, ClusterConfig, Config, RunConfig, load_config)
from ddray.distributed.placement import CapacityError
from ddray.methods import DC_LOOPS, METHOD_NAMES, METHODS, Method

def _method_defaults(value: Callable[[Method], Any]) -> str:
    """``dd 0.01, dc 0.1, …``: a per-method default, read from :data:`ddray.methods.METHODS`."""
    return ", ".join(f"{m.name} {value(m):g}" if isinstance(value(m), float) else f"{m.name} {value(m)}"
                     for m in METHODS.values())


def _dc_loops(which: int) -> str:
    """DC's outer (0) or inner (1) loop count by --ipc, read from :data:`ddray.methods.DC_LOOPS`."""
    return ", ".join(f"{ipc}→{loops[which]}" for ipc, loops in DC_LOOPS.items() if ipc in (1, 10, 50))


# flag → (type, help); flag names are config field names with '_' → '-'. The defaults are not written here:
# _help appends the config dataclass's default (or puts it where the text says {default}).
OVERRIDES: dict[str, tuple[Any, str]] = {
    "dataset": (str, "data set: mnist5k, digits (embedded), mnist, fashion_mnist, cifar10, svhn, usps "
                     "(torchvision files under --data-root), imagefolder, parquet (your own files at --data-root)"),
    "data_root": (str, "a torchvision data set's directory; imagefolder: a folder of train/<class>/*, "
                       "test/<class>/* (or of class folders), or a .tar/.tar.gz/.zip of one; parquet: a file or a "
                       "directory of them, local or s3://bucket/prefix"),
    "image_size": (int, "resize images to this square size (e.g. 28 to adapt USPS/digits to MNIST; "
                        "imagefolder/parquet: also admits mixed sizes)"),
    "test_fraction": (float, "imagefolder/parquet without a test split: share of each class held out (seeded)"),
    "cache_dir": (str, "where imagefolder/parquet files are decoded to once (default $DDRAY_CACHE_DIR, else "
                       "~/.cache/ddray)"),
    "zca": (bool, "ZCA-whiten the images with a transform fitted on the training split (MTT/DATM on CIFAR); "
                  "--no-zca: off, the default"),
    "zca_eps": (float, "ZCA regularisation"),
    "data_cache_mb": (int, "keep at most this many MB of decoded images per process and read the rest from a "
                           "class-partitioned Parquet copy (default: the whole set in memory)"),
    "model": (str, f"network: {', '.join(MODELS)}"),
    "init_scheme": (str, f"θ₀ distribution: {', '.join(INIT_SCHEMES)}"),
    "init": (str, f"init mode: {', '.join(INIT_MODES)}"),
    "pretrained": (str, "pool directory made by `ddray pretrain` (pretrained init modes)"),
    "steps": (int, "S: distinct synthetic batches"),
    "epochs": (int, "E: passes over the S batches; T = S×E learned step sizes"),
    "ipc": (int, "M: images per class per step"),
    "iterations": (int, "total meta-steps of the run"),
    "nets": (int, "K: networks θ₀ per meta-step, gradients averaged"),
    "batch_size": (int, "real images per meta-step"),
    "method": (str, f"distillation method: {', '.join(METHOD_NAMES)} (default {{default}}; see the README's "
                    "'The rest of the family')"),
    "lr": (float, "outer learning rate on the images (default: the method's — "
                  f"{_method_defaults(lambda m: f'{m.lr:g} ({m.optimizer})')})"),
    "lr_decay": (float, "outer lr factor per decay"),
    "lr_decay_every": (int, "meta-steps between outer lr decays"),
    "init_lr": (float, "initial learned step size"),
    "syn_init": (str, f"synthetic image init: {', '.join(SYN_INITS)} (default: the method's — "
                      f"{_method_defaults(lambda m: m.syn_init)})"),
    "attack": (str, "A:B — distil data that makes nets predict class A as B"),
    "memory": (str, f"unroll backward (dd, mtt): {', '.join(MEMORY_MODES)} (recompute: memory flat in T)"),
    "dsa_strategy": (str, "DSA augmentations, '_'-joined"),
    "real_per_class": (int, "dc/dsa/dm: real images per class per meta-step"),
    "outer_loop": (int, f"dc/dsa: outer steps per fresh network (default by --ipc as the paper: {_dc_loops(0)})"),
    "inner_loop": (int, f"dc/dsa: epochs on the synthetic set between outer steps (default {_dc_loops(1)})"),
    "net_lr": (float, "dc/dsa: lr of the network between outer steps; mtt: initial step size"),
    "experts": (str, "mtt: expert-trajectory directory made by `ddray experts`"),
    "syn_steps": (int, "mtt: student steps on the synthetic set per meta-step"),
    "expert_epochs": (int, "mtt: M, expert epochs the student should cover"),
    "max_start_epoch": (int, "mtt: the student starts at a random expert epoch below this"),
    "lr_lr": (float, "mtt: outer learning rate of the step size"),
    "labels": (str, "hard class labels, or learned soft labels (dd, mtt): label logits learned with the images "
                    "(mtt: started from an expert's predictions, as DATM)"),
    "lr_labels": (float, "learning rate of learned labels (default: the method's — dd 0.01 with Adam, mtt 2.0 with "
                         "SGD)"),
    "label_loss": (str, "evaluation on learned labels: ce (soft cross-entropy) or kl (KL divergence)"),
    "batch_syn": (int, "mtt: synthetic images per student step, batches of a seeded permutation as MTT's "
                       "(default: all; less memory for large sets)"),
    "width": (int, "convnet: channels per layer (default {default}, the papers')"),
    "workers": (lambda v: int(v) if v.strip().lstrip("-").isdigit() else v, "Ray worker actors: N, or MIN:MAX to "
                "start once MIN are placed and grow to MAX as nodes join"),
    "cpus_per_worker": (float, "CPUs each worker reserves and uses as torch threads (default: derived from the "
                               "cluster when the run starts)"),
    "gpus_per_worker": (float, "GPUs each worker reserves; a fraction shares a card, e.g. 0.25 (default: 1 where "
                               "the cluster has GPUs, else 0)"),
    "placement_timeout": (float, "seconds to wait for the workers to be placed, e.g. by an autoscaler"),
    "mode": (str, f"parameter-server mode: {', '.join(SYNC_MODES)}"),
    "max_staleness": (int, "async mode: drop gradients older than this many versions"),
    "shards": (int, "parameter-server shards (blocks of classes)"),
    "placement": (str, f"placement-group strategy: {', '.join(PLACEMENTS)}"),
    "address": (str, "Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"),
    "seed": (int, "run seed"),
    "out": (str, "output directory (default runs/<timestamp>)"),
    "checkpoint_every": (int, "meta-steps between checkpoints"),
    "storage": (str, "checkpoint location: a path or a pyarrow filesystem URI (default OUT/checkpoints)"),
    "eval_every": (int, "evaluate every N meta-steps (0: only at the end)"),
    "eval_nets": (int, "held-out networks per evaluation"),
    "eval_protocol": (str, "evaluation: dd (the set's own schedule) or dc (ConvNet-style training, the DC line's; "
                           f"default: the method's — {_method_defaults(lambda m: m.eval_protocol)})"),
    "eval_epochs": (int, "protocol dc: training epochs per network (default {default}; the papers: 1000)"),
    "scores": (bool, "DD-Ranking's HLR, IOR, LRS and ARS beside the accuracy: the set against a random real "
                     "subset of its size and the full training split, by protocol dc (--no-scores: accuracy only)"),
    "score_lrs": (str, "scores: learning rates tried for each evaluation, the best kept (comma-separated; "
                       "DD-Ranking searches 0.001,0.005,0.01,0.05,0.1)"),
    "full_epochs": (int, "scores: epochs of the networks trained on the full training split (cached)"),
    "tracking_uri": (str, "MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"),
    "experiment": (str, "MLflow experiment name"),
    "compile": (bool, "torch.compile the inner step and the real-batch gradient (dd, mtt; same gradients; "
                      "--no-compile: eager, the default)"),
    "cuda_graphs": (bool, "on a GPU, replay each meta-step (DD, MTT; DC's and DM's matching) from CUDA graphs "
                          "captured once per shape (the default; --no-cuda-graphs: launch kernel by kernel; no "
                          "effect on CPU)"),
}
assert set(OVERRIDES) <= set(FIELD_SECTION)
#: the data flags every command that reads real data takes
DATA_FLAGS = ("dataset", "data_root", "image_size", "test_fraction", "cache_dir", "zca", "zca_eps")


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _help(name: str) -> str:
    """The help of config flag ``name``: its text and the default of its config field (read from ddray/config.py,
    never restated): where the text says ``{default}``, else appended; None (the text says what it means) and
    switches get none."""
    text, default = OVERRIDES[name][1], FIELD_DEFAULTS[name]
    if "{default}" in text:
        return text.format(default=_fmt(default))
    if default is None or isinstance(default, bool):
        return text
    return f"{text} (default {_fmt(default)})"


def _add_overrides(p: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config (sections data/model/distill/cluster/run)")
    g = p.add_argument_group("config overrides")
    for name in names or OVERRIDES:
        flag = "--" + name.replace("_", "-")
        if OVERRIDES[name][0] is bool:  # --NAME / --no-NAME
            g.add_argument(flag, dest=name, action="store_const", const=True, default=None, help=_help(name))
            g.add_argument("--no-" + flag[2:], dest=name, action="store_const", const=False, default=None,
                           help=argparse.SUPPRESS)
            continue
        g.add_argument(flag, dest=name, type=OVERRIDES[name][0], default=None, help=_help(name))
    if names is None:
        g.add_argument("--dsa", dest="dsa", action="store_const", const=True, default=None,
                       help="differentiable siamese augmentation on (default: on for dsa, dm, mtt)")
        g.add_argument("--no-dsa", dest="dsa", action="store_const", const=False, default=None,
                       help="DSA off (dc, dm, mtt)")
    g.add_argument("--download", dest="download", action="store_const", const=True, default=None,
                   help="let torchvision download a missing data set into --data-root")
    g.add_argument("--no-tracking", dest="tracking", action="store_const", const=False, default=None,
                   help="do not record the run in MLflow")
    g.add_argument("--tracking-optional", dest="tracking_optional", action="store_const", const=True,
                   default=None, help="continue with a warning when the tracking server is unreachable")


def _config_from(args: argparse.Namespace) -> Config:
    flat = {k: getattr(args, k, None) for k in FIELD_SECTION}
    return load_config(getattr(args, "config", None), **flat)


def _add_tracking_flags(p: argparse.ArgumentParser) -> None:
    """MLflow flags for commands without --config (evaluate, load, tune)."""
    g = p.add_argument_group("tracking")
    g.add_argument("--tracking-uri", dest="tracking_uri", help=_help("tracking_uri"))
    g.add_argument("--experiment", dest="experiment", help=_help("experiment"))
    g.add_argument("--no-tracking", dest="tracking", action="store_const", const=False, default=None,
                   help="do not record the run in MLflow")
    g.add_argument("--tracking-optional", dest="tracking_optional", action="store_const", const=True,
                   default=None, help="continue with a warning when the tracking server is unreachable")


def _add_eval_flags(p: argparse.ArgumentParser, default_protocol: str) -> None:
    """The evaluation protocol's flags (evaluate, load, compare)."""
    p.add_argument("--nets", type=int, default=None,
                   help=f"held-out networks (default {FIELD_DEFAULTS['eval_nets']}; protocol dc: 5 — the papers "
                        "use 20)")
    p.add_argument("--protocol", choices=("dd", "dc"), default=None,
                   help="dd: train with the set's own steps and step sizes; dc: as DC/DSA/DM/MTT — "
                        "the set's network from scratch, SGD 0.01 (MTT: its learned step size), momentum "
                        "0.9, weight decay 5e-4, lr ×0.1 at half, batch 256, DSA (default: "
                        f"{default_protocol})")
    p.add_argument("--epochs", type=int, default=FIELD_DEFAULTS["eval_epochs"],
                   help="protocol dc: training epochs per network (default %(default)s on CPU; the papers: 1000)")
    p.add_argument("--no-dsa", dest="dsa", action="store_false",
                   help="protocol dc: train without DSA augmentation")
    p.add_argument("--label-loss", choices=("ce", "kl"), default=None,
                   help="protocol dc: the loss on learned labels (default: the set's run's)")
    p.add_argument("--no-scores", dest="scores", action="store_false",
                   help="accuracy only, without DD-Ranking's HLR, IOR, LRS and ARS (by protocol dc, against a random "
                        "real subset of the set's size and the full training split)")
    p.add_argument("--score-lrs", default=FIELD_DEFAULTS["score_lrs"], help=_help("score_lrs"))
    p.add_argument("--full-epochs", type=int, default=FIELD_DEFAULTS["full_epochs"], help=_help("full_epochs"))
    p.add_argument("--data-root", help="data root, if the sets came from a torchvision data set")
    p.add_argument("--no-progress", action="store_true")


def _eval_nets(args: argparse.Namespace, protocol: str) -> int:
    from ddray.core.protocol_dc import ProtocolDC

    default = FIELD_DEFAULTS["eval_nets"] if protocol == "dd" else ProtocolDC.nets
    nets = args.nets if args.nets is not None else default
    if nets < 1:
        raise ValueError(f"--nets: invalid value {nets}; expected a positive integer")
    return nets


def _with_tracking(cfg: Config, args: argparse.Namespace) -> Config:
    """``cfg`` with its tracking settings taken from this command line (defaults where not given)."""
    run = dataclasses.replace(cfg.run, tracking=args.tracking is not False, tracking_uri=args.tracking_uri,
                              tracking_optional=bool(args.tracking_optional),
                              experiment=args.experiment or RunConfig.experiment)
    return dataclasses.replace(cfg, run=run)


def build_parser() -> argparse.ArgumentParser:
    """The ``ddray`` argument parser (also used to validate RayJob entrypoints)."""
    p = argparse.ArgumentParser(prog="ddray", description="Dataset distillation (Wang et al. 2018) on Ray.")
    from ddray._version import __version__

    p.add_argument("--version", action="version", version=f"ddray {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("distill", help="learn a distilled data set and its step sizes, then evaluate it")
    _add_overrides(d)
    d.add_argument("--resume", metavar="DIR|auto",
                   help="continue the run in DIR from its last checkpoint; auto: continue --out's run if it holds a "
                        "checkpoint of the same config, else start fresh (for jobs that are retried)")
    d.add_argument("--baselines", action="store_true",
                   help="also evaluate the four real-image baselines at the same budget and print a table")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.add_argument("--local", action="store_true",
                   help="run in this process without Ray (the single-process reference path)")

    for name, help_, metavar, path_help in (
            ("evaluate", "train fresh held-out networks on a distilled set; report test accuracy",
             "DIR|runs:/ID", "distilled-data directory or MLflow run URI"),
            ("load", "fetch a distilled set from MLflow (runs:/ID) and evaluate it",
             "runs:/ID|DIR", "MLflow run URI (or a distilled-data directory)")):
        e = sub.add_parser(name, help=help_)
        e.add_argument("path", metavar=metavar, help=path_help)
        _add_eval_flags(e, "the set's method's: dd for dd, dc otherwise")
        e.add_argument("--json", action="store_true",
                       help='print {"mean":…, "std":…, "n":…, "scores":…} on stdout')
        _add_pool_flags(e, "the held-out networks train")
        _add_tracking_flags(e)

    c = sub.add_parser("compare", help="score several distilled sets (or baselines) by one protocol: a table and "
                                       "a bar chart of test accuracy")
    c.add_argument("paths", nargs="+", metavar="DIR|runs:/ID", help="distilled-data directories or MLflow run URIs, "
                                                                    "all of one data set")
    _add_eval_flags(c, "the sets' own, when they agree")
    c.add_argument("--seed", type=int, default=None,
                   help="seed of the held-out networks, the same for every set (default: the first set's run seed)")
    c.add_argument("--allow-mixed-labels", action="store_true",
                   help="score sets with learned labels beside hard-label ones (unfair: a soft label carries a "
                        "distribution per image)")
    c.add_argument("--png", help="bar chart file (default compare.png)")
    c.add_argument("--json", action="store_true", help="print the table as JSON on stdout")
    _add_pool_flags(c, "the held-out networks train")
    _add_tracking_flags(c)

    t = sub.add_parser("tune", help="Ray Tune search over distillation settings (tune_configs/*.yaml)")
    t.add_argument("spec", metavar="CONFIG.yaml", help="search file: fixed config, search space, metric, "
                                                        "scheduler, resources (see tune_configs/)")
    t.add_argument("--resume", nargs="?", const=True, default=False, choices=(True, "auto"), metavar="auto",
                   help="continue the interrupted search (unfinished trials resumed, errored ones restarted); "
                        "--resume auto: continue it if there is one, else start it (a retried RayJob)")
    t.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    t.add_argument("--storage-path", dest="storage_path", help="override the file's storage_path")
    t.add_argument("--data-root", dest="data_root", help="override the file's data_root")
    from ddray.tune.spec import CONFIRM_ABOVE

    t.add_argument("--yes", action="store_true",
                   help=f"start the search even when it runs more than {CONFIRM_ABOVE} trials")
    _add_tracking_flags(t)

    b = sub.add_parser("baseline", help="real-image baselines at the same budget: random|optimized|kmeans|average")
    b.add_argument("--method", dest="baseline", required=True, help="random, optimized, kmeans or average")
    b.add_argument("--candidates", type=int, default=50, help="random sets drawn by 'optimized' (default %(default)s)")
    _add_overrides(b, [n for n in OVERRIDES if n != "method"])

    pt = sub.add_parser("pretrain", help="train a pool of networks for the pretrained init modes")
    _add_overrides(pt, [*DATA_FLAGS, "model", "init_scheme", "seed", "out", "tracking_uri", "experiment"])
    pt.add_argument("--nets", type=int, default=10, help="networks in the pool (default %(default)s)")
    pt.add_argument("--epochs", type=int, default=5, help="training epochs per network (default %(default)s)")
    pt.add_argument("--no-progress", action="store_true")
    _add_pool_flags(pt, "one network per job")

    x = sub.add_parser("experts", help="train expert networks on real data and store their parameter "
                                       "trajectories (for --method mtt)")
    _add_overrides(x, [*DATA_FLAGS, "model", "width", "dsa_strategy", "seed", "out", "tracking_uri", "experiment"])
    x.add_argument("--num-experts", type=int, default=5, help="expert networks (default %(default)s; MTT: 100)")
    x.add_argument("--train-epochs", type=int, default=20,
                   help="epochs per expert, one snapshot each (default %(default)s; MTT: 50)")
    x.add_argument("--expert-lr", type=float, default=0.01,
                   help="SGD learning rate of the experts (default %(default)s)")
    x.add_argument("--expert-batch-size", type=int, default=256,
                   help="real images per step (default %(default)s, as MTT on CIFAR; small data sets want more "
                        "steps: 32)")
    x.add_argument("--no-dsa", dest="expert_dsa", action="store_false",
                   help="train the experts without DSA augmentation")
    x.add_argument("--no-progress", action="store_true")
    _add_pool_flags(x, "one expert per job")

    s = sub.add_parser("show", help="write a PNG grid of a distilled set (rows = steps, columns = classes); with "
                                    "learned labels, list each image's top label and its probability")
    s.add_argument("path", metavar="DIR|runs:/ID")
    s.add_argument("--png", help="output file (default DIR/grid.png)")
    return p


def cmd_distill(args: argparse.Namespace) -> int:
    if args.local:
        import ddray.run.loop as single_process

        run = single_process.distill
    else:  # the Ray driver: connects to --address / $RAY_ADDRESS, else starts a local Ray
        import ddray.distributed.driver as ray_driver

        run = ray_driver.distill_ray

    cfg = _config_from(args)
    if args.resume and args.resume != "auto":
        saved_cfg = Path(args.resume) / "config.yaml"
        if not saved_cfg.is_file():
            raise ValueError(f"--resume: {args.resume} is not a ddray run directory (no config.yaml)")
        flat = {k: getattr(args, k, None) for k in FIELD_SECTION}
        cfg = load_config(args.config or saved_cfg, **flat)
    from ddray.tracking.tracker import log_final_checkpoint, tracked

    with tracked(cfg, "distill", tags={"ddray.resumed_from": str(args.resume)} if args.resume else None) as tracker:
        r = run(cfg, tracker=tracker, progress=not args.no_progress, resume=args.resume, baselines=args.baselines)
        log_final_checkpoint(tracker, cfg, r.out)
        rows = [(f"distilled ({cfg.distill.method})", r.result)]
        if r.shuffled is not None:
            rows.append(("distilled, shuffled batch order", r.shuffled))
        if r.baselines:
            rows += [(f"baseline: {m}", res) for m, res in r.baselines]
            tracker.log_metrics({f"baseline_{m}_acc_mean": res.mean for m, res in r.baselines},
                                step=cfg.distill.iterations)
    print(f"\n{'set':34s} test accuracy (protocol {cfg.protocol}; mean ± std over held-out nets)")
    for name, res in rows:
        print(f"{name:34s} {res}")
    if r.scores is not None:
        print(f"\nDD-Ranking scores (protocol dc, {r.scores.nets} held-out nets): {r.scores}")
    print(f"\nseconds per meta-step: {r.seconds_per_step:.3f}")
    print(f"distilled data: {r.out.resolve()}")
    print(f"image grid:     {(r.out / 'grid.png').resolve()}")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from ddray.core.baselines import METHODS

    if args.baseline not in METHODS:
        raise ValueError(f"--method: invalid value {args.baseline!r}; choose one of {', '.join(METHODS)}")
    from ddray.evaluation.held_out import run_baselines
    from ddray.run.lifecycle import default_out
    from ddray.tracking.tracker import tracked

    cfg = _config_from(args)
    out = Path(cfg.run.out or default_out())
    with tracked(cfg, "baseline", run_name=f"baseline-{args.baseline}") as tracker:
        tracker.log_params({"baseline.method": args.baseline, "baseline.candidates": args.candidates})
        with _jobs_on(args, cfg.cluster, "baseline worker") as mapper:
            [(m, res)] = run_baselines(cfg, out, [args.baseline], args.candidates, mapper=mapper)
        tracker.log_metrics({"eval_acc_mean": res.mean, "eval_acc_std": res.std}, step=0)
        _log_set(tracker, out / "baselines" / m)
    print(f"baseline {m}: {res}")
    print(f"written to: {(out / 'baselines' / m).resolve()}")
    return 0


@contextlib.contextmanager
def _jobs_on(args: argparse.Namespace, cluster: ClusterConfig, what: str) -> Iterator[Any]:
    """A mapper that runs a command's jobs on a pool of Ray workers — when ``--address``, $RAY_ADDRESS
    (a Ray job) or ``--workers`` says so — else None (the jobs run in this process)."""
    import os

    if not (getattr(args, "address", None) or os.environ.get("RAY_ADDRESS") or getattr(args, "workers", None)):
        yield None
        return
    from ddray.distributed.pool import call_mapper, standalone_pool

    with standalone_pool(cluster, what) as pool:
        yield call_mapper(pool)


def _cluster_from(args: argparse.Namespace) -> ClusterConfig:
    """The pool flags of a command that is not a distillation (evaluate, pretrain, experts)."""
    keys = ("address", "workers", "cpus_per_worker", "gpus_per_worker", "placement_timeout")
    return ClusterConfig(**{k: getattr(args, k) for k in keys if getattr(args, k, None) is not None})


def _add_pool_flags(p: argparse.ArgumentParser, does: str) -> None:
    """--address and the worker flags of a command whose jobs can run on Ray workers."""
    g = p.add_argument_group(f"on Ray workers ({does}; with --address, $RAY_ADDRESS or --workers; else in this "
                                f"process)")
    for name in ("address", "workers", "cpus_per_worker", "gpus_per_worker", "placement_timeout"):
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=OVERRIDES[name][0], default=None,
                       help=_help(name))


def _fetch(src: str, args: argparse.Namespace, quiet: bool) -> str:
    """A local directory for ``src``: runs:/ URIs are downloaded from the tracking store."""
    from ddray.tracking.tracker import download_distilled

    if not src.startswith(("runs:/", "models:/")):
        return src
    local = str(download_distilled(src, getattr(args, "tracking_uri", None)))  # `show` has no --tracking-uri
    if not quiet:
        print(f"fetched {src} → {local}")
    return local


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ddray.evaluation.compare import eval_protocol, scoring
    from ddray.evaluation.held_out import evaluate_distilled, predict_job, problem_for, score_distilled
    from ddray.store.artifact import read_distilled
    from ddray.tracking.tracker import tracked

    d = read_distilled(_fetch(str(args.path), args, args.json))
    problem = problem_for(d, args.data_root)
    problem = dataclasses.replace(problem, config=problem.config.override(label_loss=args.label_loss))
    name = args.protocol or problem.config.protocol
    nets = _eval_nets(args, name)
    protocol = eval_protocol(problem, name, nets, args.epochs, args.dsa)
    cluster = _cluster_from(args)
    with tracked(_with_tracking(problem.config, args), args.command,
                 tags={"ddray.source": str(args.path)}) as tracker, _jobs_on(args, cluster, "evaluation worker") as mapper:
        tracker.log_params({"evaluate.source": str(args.path), "evaluate.nets": nets, "evaluate.protocol": name,
                            **({"evaluate.epochs": args.epochs, "evaluate.dsa": args.dsa} if name == "dc" else {})})

        def predictor(job: Any, chunks: list[list[int]]) -> list[Any]:  # chunks of networks on the workers
            return mapper(predict_job, [(d, args.data_root, job, ids) for ids in chunks])

        def evaluate(**kw: Any) -> Any:
            return evaluate_distilled(problem, d, nets, predictor=predictor if mapper else None,
                                      workers=cluster.max_workers, **kw)

        r = evaluate(protocol=protocol)
        metrics = {"eval_acc_mean": r.mean, "eval_acc_std": r.std}
        report: dict[str, Any] = {"source": str(args.path), "protocol": name, "test": r.to_dict()}
        s = evaluate(shuffled=True, protocol="dd") if name == "dd" else None
        if s is not None:
            metrics.update(eval_shuffled_acc_mean=s.mean, eval_shuffled_acc_std=s.std)
            report["shuffled_order"] = s.to_dict()
        scores = (score_distilled(scoring(problem, nets, args), d, predictor if mapper else None, cluster.max_workers)
                  if args.scores else None)
        if scores is not None:
            metrics.update(scores.metrics())
            report["scores"] = scores.to_dict()
        tracker.log_metrics(metrics, step=int(d.meta.get("iterations", 0)))
        _log_report(tracker, d, report)
    if args.json:
        print(json.dumps({"mean": r.mean, "std": r.std, "n": r.n, "protocol": name,
                          "scores": scores and scores.to_dict()}))
        return 0
    print(f"test accuracy (protocol {name}):  {r}")
    if s is not None:
        print(f"test accuracy, shuffled order:  {s}")
    if scores is not None:
        print(f"DD-Ranking scores (protocol dc, {scores.nets} held-out nets):  {scores}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import tempfile

    from ddray.evaluation.compare import check_labels, check_one_dataset, choose_protocol, compare_sets, table
    from ddray.evaluation.viz import save_comparison_chart
    from ddray.store.artifact import read_distilled
    from ddray.tracking.tracker import tracked

    sources = [str(p) for p in args.paths]
    sets = [read_distilled(_fetch(src, args, args.json)) for src in sources]
    dataset = check_one_dataset(sources, sets)
    check_labels(sources, sets, args.allow_mixed_labels)
    protocol = choose_protocol(sources, sets, args.protocol)
    nets = _eval_nets(args, protocol)
    first = Config.from_dict(sets[0].meta.get("config", {})).override(data_root=args.data_root)
    seed = first.run.seed if args.seed is None else args.seed
    png = Path(args.png or "compare.png")
    cluster = _cluster_from(args)
    with tracked(_with_tracking(first, args), "compare", tags={"ddray.source": " ".join(sources)}) as tracker, \
            _jobs_on(args, cluster, "evaluation worker") as mapper:
        tracker.log_params({"compare.sources": " ".join(sources), "compare.protocol": protocol,
                            "compare.nets": nets, "compare.seed": seed,
                            **({"compare.epochs": args.epochs, "compare.dsa": args.dsa} if protocol == "dc" else {})})
        rows = compare_sets(sources, sets, protocol, nets, seed, args.epochs, args.dsa, args.data_root, mapper,
                            cluster.max_workers, (args.score_lrs, args.full_epochs) if args.scores else None,
                            args.label_loss)
        for i, r in enumerate(rows):
            tracker.log_metrics({f"set{i}_acc_mean": r.result.mean, f"set{i}_acc_std": r.result.std}, step=0)
            if r.scores is not None:
                tracker.log_metrics({f"set{i}_{k}": v for k, v in r.scores.metrics().items()}, step=0)
        title = (f"{dataset}: test accuracy, protocol {protocol}\n"
                 f"mean ± std over {nets} held-out networks (seed {seed})")
        save_comparison_chart([r.label for r in rows], [r.result.mean for r in rows], [r.result.std for r in rows],
                              png, title, [r.scores for r in rows] if args.scores else None)
        report = [{"source": r.source, "method": r.method, "images": r.images, "protocol": protocol,
                   "seed": seed, "test": r.result.to_dict(), "scores": r.scores and r.scores.to_dict()}
                  for r in rows]
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "compare.json").write_text(json.dumps(report, indent=2))
            tracker.log_artifact(Path(tmp) / "compare.json")
        tracker.log_artifact(png)
    if args.json:
        print(json.dumps([{"source": r.source, "method": r.method, "images": r.images, "mean": r.result.mean,
                           "std": r.result.std, "n": r.result.n, "protocol": protocol, "seed": seed,
                           "scores": r.scores and r.scores.to_dict()} for r in rows]))
        return 0
    print(f"{len(rows)} sets of {dataset}, protocol {protocol}, {nets} held-out networks each (seed {seed})\n")
    print(table(rows, protocol))
    print(f"\nbar chart: {png.resolve()}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ddray.inputs.pretrain import pretrain
    from ddray.inputs.sources import load_data
    from ddray.run.lifecycle import default_out

    for name in ("nets", "epochs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: invalid value {getattr(args, name)}; expected a positive integer")
    from ddray.tracking.tracker import tracked

    cfg = _config_from(args)
    data = load_data(cfg.data)
    with tracked(cfg, "pretrain") as tracker, _jobs_on(args, _cluster_from(args), "pretrain worker") as mapper:
        tracker.log_params({"pretrain.nets": args.nets, "pretrain.epochs": args.epochs})
        out = pretrain(data, cfg.model.model, cfg.model.init_scheme, args.nets, args.epochs,
                       cfg.run.out or default_out(), cfg.run.seed, progress=not args.no_progress, mapper=mapper,
                       source=cfg.data)
        meta = json.loads((out / "pool.json").read_text())
        accs = meta["test_acc"]
        for i, acc in enumerate(accs):
            tracker.log_metrics({"test_acc": acc}, step=i)
        tracker.log_metrics({"test_acc_mean": sum(accs) / len(accs), "test_acc_min": min(accs),
                             "test_acc_max": max(accs)}, step=len(accs))
        tracker.log_artifact(out, "pool")
    print(f"pool of {len(accs)} {cfg.model.model} nets on {data.name}: test accuracy "
          f"{100 * sum(accs) / len(accs):.1f} % (mean)")
    print(f"written to: {out.resolve()}")
    return 0


def cmd_experts(args: argparse.Namespace) -> int:
    from ddray.core.augment import augment
    from ddray.inputs.experts import EXPERTS_META, ExpertSettings, train_experts
    from ddray.inputs.sources import load_data
    from ddray.run.lifecycle import default_out
    from ddray.tracking.tracker import tracked

    if args.num_experts < 1:
        raise ValueError(f"--num-experts: invalid value {args.num_experts}; expected a positive integer")
    cfg = _config_from(args)
    strategy = cfg.distill.dsa_strategy if args.expert_dsa else None
    settings = ExpertSettings(model=cfg.model.model, width=cfg.model.width, epochs=args.train_epochs,
                              lr=args.expert_lr, batch_size=args.expert_batch_size, dsa_strategy=strategy,
                              seed=cfg.run.seed)
    data = load_data(cfg.data)
    out = Path(cfg.run.out or default_out())
    with tracked(cfg, "experts") as tracker, _jobs_on(args, _cluster_from(args), "expert worker") as mapper:
        tracker.log_params({f"experts.{k}": v for k, v in dataclasses.asdict(settings).items()}
                           | {"experts.count": args.num_experts})
        train_experts(data, settings, args.num_experts, out, progress=not args.no_progress,
                      augment=None if strategy is None else lambda x, g: augment(x, strategy, g), mapper=mapper,
                      source=cfg.data)
        meta = json.loads((out / EXPERTS_META).read_text())
        accs = meta["test_acc"]
        for i, acc in enumerate(accs):
            tracker.log_metrics({"test_acc": acc}, step=i)
        tracker.log_artifact(out / EXPERTS_META)
    print(f"{len(accs)} {cfg.model.model} experts on {data.name}, {args.train_epochs} epochs each: test accuracy "
          f"{100 * sum(accs) / len(accs):.1f} % (mean)")
    print(f"written to: {out.resolve()}  (ddray distill --method mtt --experts {out})")
    return 0


def _log_set(tracker: Any, path: Path) -> None:
    """Log a distilled-data directory (as ``distilled/``, so ``ddray load runs:/ID`` finds it) and its grid."""
    from ddray.evaluation.viz import save_grid
    from ddray.store.artifact import read_distilled

    for name in ("data.parquet", "meta.json", "init_params.safetensors"):
        if (path / name).is_file():
            tracker.log_artifact(path / name, "distilled")
    tracker.log_artifact(save_grid(read_distilled(path), path / "grid.png"))


def _log_report(tracker: Any, d: Any, report: dict[str, Any]) -> None:
    """Log an evaluation report (eval.json) and the set's image grid."""
    import tempfile

    from ddray.evaluation.viz import save_grid

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "eval.json").write_text(json.dumps(report, indent=2))
        tracker.log_artifact(Path(tmp) / "eval.json")
        tracker.log_artifact(save_grid(d, Path(tmp) / "grid.png"))


def cmd_tune(args: argparse.Namespace) -> int:
    from ddray.tune.search import run_search
    from ddray.tune.spec import CONFIRM_ABOVE, load_tune_spec, tune_storage_path

    overrides = {k: getattr(args, k, None) for k in ("tracking_uri", "experiment", "tracking", "tracking_optional",
                                                       "address", "data_root")}
    spec = load_tune_spec(args.spec, **overrides)
    if args.storage_path:
        spec = dataclasses.replace(spec, storage_path=tune_storage_path(args.storage_path))
    n = spec.trial_count()
    if n > CONFIRM_ABOVE and not (args.yes or args.resume):
        raise ValueError(f"{spec.source}: this search would run {n} trials (more than {CONFIRM_ABOVE}); pass --yes "
                         "to start it anyway, or shrink the grid or num_samples")
    doing = {True: "continuing", "auto": "continuing (or starting)"}.get(args.resume, "starting")
    print(f"{spec.source}: {doing} a search of {n} trial{'s' * (n != 1)} "
          f"({'up to ' if 'iterations' in spec.search else ''}{spec.max_iterations} meta-steps each, "
          f"{spec.scheduler.type} scheduler)", flush=True)
    s = run_search(spec, resume=args.resume)
    print(f"\n{s.table(spec.metric, list(spec.search))}\n")
    print(f"best trial:      {s.best.trial_id} ({spec.metric} {s.best.value:.4f} at step {s.best.value_step})")
    if s.comparison:
        print(f"vs reference:    {s.comparison}")
    where = s.best_config_location or s.best_config_path
    print(f"best config:     {where}" + (f"  (ddray distill --config {where})" if "://" not in str(where) else ""))
    print(f"distilled data:  {s.best.distilled_dir}")
    if s.best.run_id:
        print(f"in MLflow:       runs:/{s.best.run_id} (parent run {s.parent_run_id})")
    if s.report:
        from ddray.store.storage import join

        print(f"results:         {join(spec.experiment_dir, s.report[0].name)}  (plots in "
              f"{join(spec.experiment_dir, 'plots')})")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    import torch

    from ddray.evaluation.viz import save_grid
    from ddray.store.artifact import read_distilled

    d = read_distilled(_fetch(str(args.path), args, quiet=True))  # stdout: the PNG's path only
    png = Path(args.png) if args.png else (Path(args.path) / "grid.png" if Path(args.path).is_dir()
                                          else Path("grid.png"))
    print(save_grid(d, png).resolve())
    if d.label_logits is not None:  # learned labels: what each image teaches
        names = d.meta.get("class_names") or [str(c) for c in range(d.label_logits.shape[1])]
        p = torch.softmax(d.label_logits, dim=1)
        top, which = p.max(dim=1)
        print(f"{'image':>5}  {'class':12}  {'top label':12}  p")
        for i, (c, k, q) in enumerate(zip(d.labels.tolist(), which.tolist(), top.tolist())):
            print(f"{i:>5}  {names[c]:12}  {names[k]:12}  {q:.3f}")
    return 0


COMMANDS = {"distill": cmd_distill, "evaluate": cmd_evaluate, "load": cmd_evaluate, "compare": cmd_compare,
            "baseline": cmd_baseline,
            "pretrain": cmd_pretrain, "experts": cmd_experts, "show": cmd_show, "tune": cmd_tune}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_stderr()
    try:
        return COMMANDS[args.command](args)
    except ValueError as e:
        print(f"ddray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except CapacityError as e:  # the cluster did not provide the workers in time
        print(f"ddray {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ddray {args.command}: interrupted; continue with `ddray distill --resume DIR` (or --resume auto)",
              file=sys.stderr)
        return 130


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _log_to_stderr() -> None:
    """ddray's own log lines (workers joining and leaving, resumes, waits) as ``ddray: …`` on stderr."""
    log = logging.getLogger("ddray")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("ddray: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
