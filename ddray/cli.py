"""``ddray distill | evaluate | load | baseline | pretrain | experts | show | tune`` — the command line.

Every subcommand that runs the method takes ``--config FILE.yaml`` plus flag
overrides; an invalid value is a one-line error (exit code 2), never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from ddray.config import (FIELD_SECTION, INIT_MODES, INIT_SCHEMES, MEMORY_MODES, MODELS, PLACEMENTS,
                          SYN_INITS, SYNC_MODES, Config, load_config)
from ddray.methods import METHOD_NAMES

# flag → (type, help); flag names are config field names with '_' → '-'.
OVERRIDES: dict[str, tuple[Any, str]] = {
    "dataset": (str, "data set: mnist5k (default, embedded), digits (embedded), mnist, fashion_mnist, "
                     "cifar10, svhn, usps (from --data-root)"),
    "data_root": (str, "directory of a torchvision data set's files"),
    "image_size": (int, "resize images to this square size (e.g. 28 to adapt USPS/digits to MNIST)"),
    "model": (str, f"network: {', '.join(MODELS)} (default lenet)"),
    "init_scheme": (str, f"θ₀ distribution: {', '.join(INIT_SCHEMES)} (default xavier)"),
    "init": (str, f"init mode: {', '.join(INIT_MODES)} (default random)"),
    "pretrained": (str, "pool directory made by `ddray pretrain` (pretrained init modes)"),
    "steps": (int, "S: distinct synthetic batches (default 10)"),
    "epochs": (int, "E: passes over the S batches; T = S×E learned step sizes (default 3)"),
    "ipc": (int, "M: images per class per step (default 1)"),
    "iterations": (int, "total meta-steps of the run (default 500)"),
    "nets": (int, "K: networks θ₀ per meta-step, gradients averaged (default 4)"),
    "batch_size": (int, "real images per meta-step (default 1024)"),
    "method": (str, f"distillation method: {', '.join(METHOD_NAMES)} (default dd; see the README's "
                    "'The rest of the family')"),
    "lr": (float, "outer learning rate on the images (default: the method's — dd 0.01 (Adam), dc/dsa 0.1, "
                  "dm 1, mtt 1000 (SGD, momentum 0.5))"),
    "lr_decay": (float, "outer lr factor per decay (default 0.5)"),
    "lr_decay_every": (int, "meta-steps between outer lr decays (default 400)"),
    "init_lr": (float, "initial learned step size (default 0.02)"),
    "syn_init": (str, f"synthetic image init: {', '.join(SYN_INITS)} (default: noise for dd, real otherwise)"),
    "attack": (str, "A:B — distil data that makes nets predict class A as B"),
    "memory": (str, f"unroll backward (dd, mtt): {', '.join(MEMORY_MODES)} (recompute: memory flat in T)"),
    "dsa_strategy": (str, "DSA augmentations, '_'-joined (default color_crop_cutout_flip_scale_rotate)"),
    "real_per_class": (int, "dc/dsa/dm: real images per class per meta-step (default 256)"),
    "outer_loop": (int, "dc/dsa: outer steps per fresh network (default by --ipc as the paper: 1→1, 10→10, 50→50)"),
    "inner_loop": (int, "dc/dsa: epochs on the synthetic set between outer steps (default 1→1, 10→50, 50→10)"),
    "net_lr": (float, "dc/dsa: lr of the network between outer steps; mtt: initial step size (default 0.01)"),
    "experts": (str, "mtt: expert-trajectory directory made by `ddray experts`"),
    "syn_steps": (int, "mtt: student steps on the synthetic set per meta-step (default 20)"),
    "expert_epochs": (int, "mtt: M, expert epochs the student should cover (default 2)"),
    "max_start_epoch": (int, "mtt: the student starts at a random expert epoch below this (default 20)"),
    "lr_lr": (float, "mtt: outer learning rate of the step size (default 1e-5)"),
    "width": (int, "convnet: channels per layer (default 128, the papers')"),
    "workers": (int, "Ray worker actors (default 1)"),
    "mode": (str, f"parameter-server mode: {', '.join(SYNC_MODES)}"),
    "max_staleness": (int, "async mode: drop gradients older than this many versions"),
    "shards": (int, "parameter-server shards (blocks of classes)"),
    "placement": (str, f"placement-group strategy: {', '.join(PLACEMENTS)}"),
    "address": (str, "Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"),
    "seed": (int, "run seed (default 0)"),
    "out": (str, "output directory (default runs/<timestamp>)"),
    "checkpoint_every": (int, "meta-steps between checkpoints (default 100)"),
    "storage": (str, "checkpoint location: a path or a pyarrow filesystem URI (default OUT/checkpoints)"),
    "eval_every": (int, "evaluate every N meta-steps (0: only at the end)"),
    "eval_nets": (int, "held-out networks per evaluation (default 20)"),
    "eval_protocol": (str, "evaluation: dd (the set's own schedule) or dc (ConvNet-style training, the DC line's; "
                           "default dd for --method dd, dc otherwise)"),
    "eval_epochs": (int, "protocol dc: training epochs per network (default 300; the papers: 1000)"),
    "tracking_uri": (str, "MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"),
    "experiment": (str, "MLflow experiment name (default ddray)"),
    "compile": (bool, "torch.compile the inner step and the real-batch gradient (dd, mtt; same gradients; "
                      "--no-compile: eager, the default)"),
}
assert set(OVERRIDES) <= set(FIELD_SECTION)


def _add_overrides(p: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config (sections data/model/distill/cluster/run)")
    g = p.add_argument_group("config overrides")
    for name in names or OVERRIDES:
        typ, help_ = OVERRIDES[name]
        if typ is bool:  # --NAME / --no-NAME
            g.add_argument("--" + name.replace("_", "-"), dest=name, action="store_const", const=True, default=None,
                           help=help_)
            g.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_const", const=False,
                           default=None, help=argparse.SUPPRESS)
            continue
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=help_)
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
    g.add_argument("--tracking-uri", dest="tracking_uri", help=OVERRIDES["tracking_uri"][1])
    g.add_argument("--experiment", dest="experiment", help=OVERRIDES["experiment"][1])
    g.add_argument("--no-tracking", dest="tracking", action="store_const", const=False, default=None,
                   help="do not record the run in MLflow")
    g.add_argument("--tracking-optional", dest="tracking_optional", action="store_const", const=True,
                   default=None, help="continue with a warning when the tracking server is unreachable")


def _with_tracking(cfg: Config, args: argparse.Namespace) -> Config:
    """``cfg`` with its tracking settings taken from this command line (defaults where not given)."""
    run = dataclasses.replace(cfg.run, tracking=args.tracking is not False, tracking_uri=args.tracking_uri,
                              tracking_optional=bool(args.tracking_optional),
                              experiment=args.experiment or "ddray")
    return dataclasses.replace(cfg, run=run)


def build_parser() -> argparse.ArgumentParser:
    """The ``ddray`` argument parser (also used to validate RayJob entrypoints)."""
    p = argparse.ArgumentParser(prog="ddray", description="Dataset distillation (Wang et al. 2018) on Ray.")
    from ddray import __version__

    p.add_argument("--version", action="version", version=f"ddray {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("distill", help="learn a distilled data set and its step sizes, then evaluate it")
    _add_overrides(d)
    d.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
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
        e.add_argument("--nets", type=int, default=None,
                       help="held-out networks (default 20; protocol dc: 5 — the papers use 20)")
        e.add_argument("--protocol", choices=("dd", "dc"), default=None,
                       help="dd: train with the set's own steps and step sizes; dc: as DC/DSA/DM/MTT — "
                            "the set's network from scratch, SGD 0.01 (MTT: its learned step size), momentum "
                            "0.9, weight decay 5e-4, lr ×0.1 at half, batch 256, DSA (default: the set's "
                            "method's: dd for dd, dc otherwise)")
        e.add_argument("--epochs", type=int, default=300,
                       help="protocol dc: training epochs per network (default 300 on CPU; the papers: 1000)")
        e.add_argument("--no-dsa", dest="dsa", action="store_false",
                       help="protocol dc: train without DSA augmentation")
        e.add_argument("--json", action="store_true", help='print {"mean":…, "std":…, "n":…} on stdout')
        e.add_argument("--data-root", help="data root, if the set came from a torchvision data set")
        e.add_argument("--no-progress", action="store_true")
        _add_tracking_flags(e)

    t = sub.add_parser("tune", help="Ray Tune search over distillation settings (tune_configs/*.yaml)")
    t.add_argument("spec", metavar="CONFIG.yaml", help="search file: fixed config, search space, metric, "
                                                        "scheduler, resources (see tune_configs/)")
    t.add_argument("--resume", action="store_true",
                   help="continue the interrupted search (unfinished trials resumed, errored ones restarted)")
    t.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    t.add_argument("--storage-path", dest="storage_path", help="override the file's storage_path")
    t.add_argument("--data-root", dest="data_root", help="override the file's data_root")
    _add_tracking_flags(t)

    b = sub.add_parser("baseline", help="real-image baselines at the same budget: random|optimized|kmeans|average")
    b.add_argument("--method", dest="baseline", required=True, help="random, optimized, kmeans or average")
    b.add_argument("--candidates", type=int, default=50, help="random sets drawn by 'optimized' (default 50)")
    _add_overrides(b, [n for n in OVERRIDES if n != "method"])

    pt = sub.add_parser("pretrain", help="train a pool of networks for the pretrained init modes")
    _add_overrides(pt, ["dataset", "data_root", "image_size", "model", "init_scheme", "seed", "out", "tracking_uri",
                        "experiment"])
    pt.add_argument("--nets", type=int, default=10, help="networks in the pool (default 10)")
    pt.add_argument("--epochs", type=int, default=5, help="training epochs per network (default 5)")
    pt.add_argument("--no-progress", action="store_true")

    x = sub.add_parser("experts", help="train expert networks on real data and store their parameter "
                                       "trajectories (for --method mtt)")
    _add_overrides(x, ["dataset", "data_root", "image_size", "model", "width", "dsa_strategy", "seed", "out",
                       "tracking_uri", "experiment"])
    x.add_argument("--num-experts", type=int, default=5, help="expert networks (default 5; MTT: 100)")
    x.add_argument("--train-epochs", type=int, default=20,
                   help="epochs per expert, one snapshot each (default 20; MTT: 50)")
    x.add_argument("--expert-lr", type=float, default=0.01, help="SGD learning rate of the experts (default 0.01)")
    x.add_argument("--expert-batch-size", type=int, default=256,
                   help="real images per step (default 256, as MTT on CIFAR; small data sets want more steps: 32)")
    x.add_argument("--no-dsa", dest="expert_dsa", action="store_false",
                   help="train the experts without DSA augmentation")
    x.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("show", help="write a PNG grid of a distilled set (rows = steps, columns = classes)")
    s.add_argument("path", metavar="DIR|runs:/ID")
    s.add_argument("--png", help="output file (default DIR/grid.png)")
    return p


def cmd_distill(args: argparse.Namespace) -> int:
    if args.local:
        import ddray.distill as single_process

        run = single_process.distill
    else:  # the Ray driver: connects to --address / $RAY_ADDRESS, else starts a local Ray
        import ddray.distributed.driver as ray_driver

        run = ray_driver.distill_ray

    cfg = _config_from(args)
    if args.resume:
        saved_cfg = Path(args.resume) / "config.yaml"
        if not saved_cfg.is_file():
            raise ValueError(f"--resume: {args.resume} is not a ddray run directory (no config.yaml)")
        flat = {k: getattr(args, k, None) for k in FIELD_SECTION}
        cfg = load_config(args.config or saved_cfg, **flat)
    from ddray.tracking import log_final_checkpoint, tracked

    with tracked(cfg, "distill", tags={"ddray.resumed_from": str(args.resume)} if args.resume else None) as tracker:
        r = run(cfg, tracker=tracker, progress=not args.no_progress, resume=args.resume)
        log_final_checkpoint(tracker, cfg, r.out)
        rows = [(f"distilled ({cfg.distill.method})", r.result)]
        if r.shuffled is not None:
            rows.append(("distilled, shuffled batch order", r.shuffled))
        if args.baselines:
            baselines = run_baselines(cfg, r.out)
            rows += [(f"baseline: {m}", res) for m, res in baselines]
            tracker.log_metrics({f"baseline_{m}_acc_mean": res.mean for m, res in baselines},
                                step=cfg.distill.iterations)
    print(f"\n{'set':34s} test accuracy (protocol {cfg.protocol}; mean ± std over held-out nets)")
    for name, res in rows:
        print(f"{name:34s} {res}")
    print(f"\nseconds per meta-step: {r.seconds_per_step:.3f}")
    print(f"distilled data: {r.out.resolve()}")
    print(f"image grid:     {(r.out / 'grid.png').resolve()}")
    return 0


def run_baselines(cfg: Config, out: Path, methods: Sequence[str] | None = None,
                  candidates: int = 50) -> list[tuple[str, Any]]:
    """Evaluate baselines with ``cfg``'s budget and evaluation protocol; each is written to
    ``out/baselines/<method>``. Under protocol dc (DC/DSA/DM/MTT) the default baselines are
    random and k-means real images (``optimized`` and ``average`` tune for DD's protocol)."""
    import torch

    from ddray.artifact import save_distilled
    from ddray.core.baselines import METHODS, make_baseline
    from ddray.core.synthetic import SyntheticSet, inverse_softplus
    from ddray.distill import evaluate_distilled, to_distilled
    from ddray.problem import build_problem

    problem = build_problem(cfg)
    c, data = cfg.distill, problem.data
    steps, epochs = c.layout
    dc = cfg.protocol == "dc"
    results = []
    for m in methods or (("random", "kmeans") if dc else METHODS):
        bl = make_baseline(m, problem.model, problem.sampler(), problem.sampler(for_eval=True), data.x_train,
                           data.y_train, data.x_test, data.y_test, steps, epochs, c.ipc, data.num_classes,
                           cfg.run.seed, cfg.run.eval_nets, candidates, problem.attack)
        raw = torch.full((steps * epochs,), inverse_softplus(bl.lr))
        d = to_distilled(problem, SyntheticSet(bl.images, bl.labels, raw, epochs), 0)
        d.meta["method"] = f"baseline-{m}"
        result = evaluate_distilled(problem, d, cfg.run.eval_nets) if dc else bl.result
        d.meta["eval"] = result.to_dict()
        save_distilled(out / "baselines" / m, d)
        results.append((m, result))
    return results


def cmd_baseline(args: argparse.Namespace) -> int:
    from ddray.core.baselines import METHODS

    if args.baseline not in METHODS:
        raise ValueError(f"--method: invalid value {args.baseline!r}; choose one of {', '.join(METHODS)}")
    from ddray.distill import default_out
    from ddray.tracking import tracked

    cfg = _config_from(args)
    out = Path(cfg.run.out or default_out())
    with tracked(cfg, "baseline", run_name=f"baseline-{args.baseline}") as tracker:
        tracker.log_params({"baseline.method": args.baseline, "baseline.candidates": args.candidates})
        [(m, res)] = run_baselines(cfg, out, [args.baseline], args.candidates)
        tracker.log_metrics({"eval_acc_mean": res.mean, "eval_acc_std": res.std}, step=0)
        _log_set(tracker, out / "baselines" / m)
    print(f"baseline {m}: {res}")
    print(f"written to: {(out / 'baselines' / m).resolve()}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ddray.artifact import load_distilled
    from ddray.core.protocol import ProtocolDC
    from ddray.distill import evaluate_distilled, problem_for
    from ddray.tracking import download_distilled, tracked

    src = args.path
    if str(src).startswith(("runs:/", "models:/")):
        src = download_distilled(str(src), args.tracking_uri)
        if not args.json:
            print(f"fetched {args.path} → {src}")
    d = load_distilled(src)
    problem = problem_for(d, args.data_root)
    name = args.protocol or problem.config.protocol
    nets = args.nets if args.nets is not None else (20 if name == "dd" else 5)
    if nets < 1:
        raise ValueError(f"--nets: invalid value {nets}; expected a positive integer")
    protocol: ProtocolDC | str = "dd"
    if name == "dc":
        protocol = ProtocolDC(epochs=args.epochs, nets=nets,
                              dsa_strategy=problem.config.distill.dsa_strategy if args.dsa else None)
    with tracked(_with_tracking(problem.config, args), args.command,
                 tags={"ddray.source": str(args.path)}) as tracker:
        tracker.log_params({"evaluate.source": str(args.path), "evaluate.nets": nets, "evaluate.protocol": name,
                            **({"evaluate.epochs": args.epochs, "evaluate.dsa": args.dsa} if name == "dc" else {})})
        r = evaluate_distilled(problem, d, nets, protocol=protocol)
        metrics = {"eval_acc_mean": r.mean, "eval_acc_std": r.std}
        report: dict[str, Any] = {"source": str(args.path), "protocol": name, "test": r.to_dict()}
        s = evaluate_distilled(problem, d, nets, shuffled=True, protocol="dd") if name == "dd" else None
        if s is not None:
            metrics.update(eval_shuffled_acc_mean=s.mean, eval_shuffled_acc_std=s.std)
            report["shuffled_order"] = s.to_dict()
        tracker.log_metrics(metrics, step=int(d.meta.get("iterations", 0)))
        _log_report(tracker, d, report)
    if args.json:
        print(json.dumps({"mean": r.mean, "std": r.std, "n": r.n, "protocol": name}))
        return 0
    print(f"test accuracy (protocol {name}):  {r}")
    if s is not None:
        print(f"test accuracy, shuffled order:  {s}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ddray.data import load_dataset
    from ddray.distill import default_out
    from ddray.pretrain import pretrain

    for name in ("nets", "epochs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: invalid value {getattr(args, name)}; expected a positive integer")
    from ddray.tracking import tracked

    cfg = _config_from(args)
    data = load_dataset(cfg.data.dataset, cfg.data.data_root, cfg.data.download, cfg.data.image_size)
    with tracked(cfg, "pretrain") as tracker:
        tracker.log_params({"pretrain.nets": args.nets, "pretrain.epochs": args.epochs})
        out = pretrain(data, cfg.model.model, cfg.model.init_scheme, args.nets, args.epochs,
                       cfg.run.out or default_out(), cfg.run.seed, progress=not args.no_progress)
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
    from ddray.data import load_dataset
    from ddray.distill import default_out
    from ddray.experts import EXPERTS_META, ExpertSettings, train_experts
    from ddray.tracking import tracked

    if args.num_experts < 1:
        raise ValueError(f"--num-experts: invalid value {args.num_experts}; expected a positive integer")
    cfg = _config_from(args)
    strategy = cfg.distill.dsa_strategy if args.expert_dsa else None
    settings = ExpertSettings(model=cfg.model.model, width=cfg.model.width, epochs=args.train_epochs,
                              lr=args.expert_lr, batch_size=args.expert_batch_size, dsa_strategy=strategy,
                              seed=cfg.run.seed)
    data = load_dataset(cfg.data.dataset, cfg.data.data_root, cfg.data.download, cfg.data.image_size)
    out = Path(cfg.run.out or default_out())
    with tracked(cfg, "experts") as tracker:
        tracker.log_params({f"experts.{k}": v for k, v in dataclasses.asdict(settings).items()}
                           | {"experts.count": args.num_experts})
        train_experts(data, settings, args.num_experts, out, progress=not args.no_progress,
                      augment=None if strategy is None else lambda x, g: augment(x, strategy, g))
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
    from ddray.artifact import load_distilled
    from ddray.viz import save_grid

    for name in ("data.parquet", "meta.json", "init_params.safetensors"):
        if (path / name).is_file():
            tracker.log_artifact(path / name, "distilled")
    tracker.log_artifact(save_grid(load_distilled(path), path / "grid.png"))


def _log_report(tracker: Any, d: Any, report: dict[str, Any]) -> None:
    """Log an evaluation report (eval.json) and the set's image grid."""
    import tempfile

    from ddray.viz import save_grid

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "eval.json").write_text(json.dumps(report, indent=2))
        tracker.log_artifact(Path(tmp) / "eval.json")
        tracker.log_artifact(save_grid(d, Path(tmp) / "grid.png"))


def cmd_tune(args: argparse.Namespace) -> int:
    from ddray.tune import load_tune_spec, run_search

    overrides = {k: getattr(args, k, None) for k in ("tracking_uri", "experiment", "tracking", "tracking_optional",
                                                       "address", "data_root")}
    spec = load_tune_spec(args.spec, **overrides)
    if args.storage_path:
        spec = dataclasses.replace(spec, storage_path=Path(args.storage_path).expanduser().resolve())
    s = run_search(spec, resume=args.resume)
    print(f"\n{s.table(spec.metric, list(spec.search))}\n")
    print(f"best trial:      {s.best.trial_id} ({spec.metric} {s.best.value:.4f} at step {s.best.value_step})")
    if s.comparison:
        print(f"vs reference:    {s.comparison}")
    print(f"best config:     {s.best_config_path}  (ddray distill --config {s.best_config_path})")
    print(f"distilled data:  {s.best.distilled_dir}")
    if s.best.run_id:
        print(f"in MLflow:       runs:/{s.best.run_id} (parent run {s.parent_run_id})")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from ddray.artifact import load_distilled
    from ddray.viz import save_grid

    d = load_distilled(args.path)
    png = Path(args.png) if args.png else (Path(args.path) / "grid.png" if Path(args.path).is_dir()
                                          else Path("grid.png"))
    print(save_grid(d, png).resolve())
    return 0


COMMANDS = {"distill": cmd_distill, "evaluate": cmd_evaluate, "load": cmd_evaluate, "baseline": cmd_baseline,
            "pretrain": cmd_pretrain, "experts": cmd_experts, "show": cmd_show, "tune": cmd_tune}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ValueError as e:
        print(f"ddray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ddray {args.command}: interrupted; resume with `ddray distill --resume DIR`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
