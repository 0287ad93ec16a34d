"""``ddray compare``: several distilled sets scored by one evaluation protocol, side by side.

Every set (a distilled set, its baselines, another run's set) is evaluated — and scored as
DD-Ranking does (:mod:`ddray.evaluation.scores`) — with the functions ``ddray evaluate`` uses,
:func:`ddray.evaluation.held_out.evaluate_distilled` on :func:`ddray.evaluation.held_out.problem_for` the set, under
one protocol, with one number of held-out networks and one seed, so that every set meets the same
held-out θ₀ draws. Sets of
different data sets (or image shapes) cannot be compared: that is a one-line error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ddray.config import Config
from ddray.core.protocol_dc import ProtocolDC
from ddray.core.protocol_dd import EvalResult
from ddray.evaluation.scores import SCORE_NAMES, Scores
from ddray.inputs.problem import Problem
from ddray.store.artifact import Distilled

PROTOCOLS = ("dd", "dc")


@dataclass(frozen=True)
class Scored:
    """One line of the comparison.

    Attributes:
        source: the directory or ``runs:/`` URI as given.
        label: a short name for the chart (the method, plus the source where methods repeat).
        method: the set's ``method`` (``dd``, ``dc``, …, ``baseline-random``, …).
        images: how many synthetic images the set holds (S × M × C).
        result: its test accuracy over the held-out networks.
        scores: DD-Ranking's scores (:mod:`ddray.evaluation.scores`), unless ``--no-scores``.
    """

    source: str
    label: str
    method: str
    images: int
    result: EvalResult
    scores: Scores | None = None


def own_protocol(d: Distilled) -> str:
    """The protocol a set is evaluated with by default (its run config's: dd for DD, dc otherwise)."""
    return Config.from_dict(d.meta.get("config", {})).protocol


def check_one_dataset(sources: Sequence[str], sets: Sequence[Distilled]) -> str:
    """The data set all ``sets`` come from; a one-line ValueError naming two that differ."""
    def ident(d: Distilled) -> str:
        c, h, w = d.images.shape[2:]
        return f"{d.meta.get('dataset', '?')} {c}×{h}×{w}"

    first = ident(sets[0])
    for src, d in zip(sources[1:], sets[1:]):
        if ident(d) != first:
            raise ValueError(f"compare: the sets come from different data sets: {sources[0]} is {first}, "
                             f"{src} is {ident(d)}; compare sets of one data set")
    return str(sets[0].meta.get("dataset", "?"))


def check_labels(sources: Sequence[str], sets: Sequence[Distilled], allow_mixed: bool) -> None:
    """A one-line ValueError when learned-label sets meet hard-label ones, unless ``allow_mixed``."""
    kinds = {d.label_kind for d in sets}
    if len(kinds) > 1 and not allow_mixed:
        soft = next(s for s, d in zip(sources, sets) if d.label_kind == "learned")
        hard = next(s for s, d in zip(sources, sets) if d.label_kind == "hard")
        raise ValueError(f"compare: {soft} has learned (soft) labels and {hard} hard ones; a soft label carries "
                         "a whole distribution per image, so the comparison is unfair — compare sets with the "
                         "same labels, or pass --allow-mixed-labels")


def choose_protocol(sources: Sequence[str], sets: Sequence[Distilled], given: str | None) -> str:
    """``given``, else the sets' common own protocol; a ValueError when theirs differ and none is given."""
    if given is not None:
        if given not in PROTOCOLS:
            raise ValueError(f"--protocol: invalid value {given!r}; choose one of {', '.join(PROTOCOLS)}")
        return given
    own = [own_protocol(d) for d in sets]
    if len(set(own)) > 1:
        which = "; ".join(f"{p}: {', '.join(s for s, q in zip(sources, own) if q == p)}" for p in PROTOCOLS
                          if p in own)
        raise ValueError(f"--protocol: the sets are evaluated differently by default ({which}); pass "
                         "--protocol dd or --protocol dc to score them all the same way")
    return own[0]


def eval_protocol(problem: Problem, name: str, nets: int, epochs: int, dsa: bool) -> ProtocolDC | str:
    """What :func:`ddray.evaluation.held_out.evaluate_distilled` takes for protocol ``name``
    (``ddray evaluate``'s flags; soft labels are trained on with the set's ``--label-loss``)."""
    if name == "dd":
        return "dd"
    strategy = problem.config.distill.dsa_strategy if dsa else None
    return ProtocolDC(epochs=epochs, nets=nets, dsa_strategy=strategy, label_loss=problem.config.run.label_loss)


def scoring(problem: Problem, nets: int, args: Any) -> Problem:
    """``problem`` with the scores' settings of an ``evaluate``/``compare`` command line: ``nets`` held-out
    networks, ``--epochs``, ``--score-lrs``, ``--full-epochs``."""
    config = problem.config.override(eval_nets=nets, eval_epochs=args.epochs, score_lrs=args.score_lrs,
                                     full_epochs=args.full_epochs)
    return dataclasses.replace(problem, config=config)


def _distinct(sources: Sequence[str], width: int = 24) -> list[str]:
    """The part of each source that tells it from the others (common leading and trailing parts dropped)."""
    parts = [s[len("runs:/"):].split("/") if s.startswith("runs:/") else list(Path(s).parts) for s in sources]
    lead = 0
    while all(len(p) > lead + 1 for p in parts) and len({p[lead] for p in parts}) == 1:
        lead += 1
    trail = 0
    while all(len(p) > lead + trail + 1 for p in parts) and len({p[-1 - trail] for p in parts}) == 1:
        trail += 1
    out = []
    for p in parts:
        text = "/".join(p[lead:len(p) - trail]) or p[-1]
        out.append(text if len(text) <= width else "…" + text[1 - width:])
    return out


def labels(sources: Sequence[str], sets: Sequence[Distilled]) -> list[str]:
    """Short chart labels: the method, with what tells the sources apart where two sets share a method."""
    methods = [str(d.meta.get("method", "?")) for d in sets]
    tails = _distinct(sources)
    return [m if methods.count(m) == 1 else f"{m}\n{t}" for m, t in zip(methods, tails)]


def compare_sets(sources: Sequence[str], sets: Sequence[Distilled], protocol: str, nets: int, seed: int,
                 epochs: int = 300, dsa: bool = True, data_root: str | None = None,
                 mapper: Callable[..., list[Any]] | None = None, workers: int = 1,
                 scores: tuple[str, int] | None = None, label_loss: str | None = None) -> list[Scored]:
    """Score every set with ``protocol`` over ``nets`` held-out networks drawn with ``seed``.

    Args:
        sources: what each set was loaded from (for the table).
        sets: the sets, all of one data set (:func:`check_one_dataset`).
        protocol: ``dd`` (the set's own steps and step sizes) or ``dc`` (the DC line's training).
        nets: held-out networks per set.
        seed: the evaluation seed, the same for all sets (so they meet the same θ₀ draws).
        epochs, dsa: protocol ``dc``: training epochs per network, DSA augmentation.
        data_root: where a torchvision data set's files are.
        mapper: trains the chunks of held-out networks on Ray workers
            (:func:`ddray.distributed.pool.call_mapper`), ``workers`` chunks per set; default here.
        scores: (``--score-lrs``, ``--full-epochs``) to score every set as well
            (:func:`ddray.evaluation.held_out.score_distilled`, over the same ``nets`` networks, ``epochs``
            and ``seed``).
        label_loss: the loss on learned labels (``--label-loss``; default each set's own).
    """
    import torch

    from ddray.evaluation.held_out import evaluate_distilled, predict_job, problem_for, score_distilled

    out = []
    for src, label, d in zip(sources, labels(sources, sets), sets):
        problem = problem_for(d, data_root)
        problem = dataclasses.replace(problem, config=problem.config.override(seed=seed, label_loss=label_loss))

        def predictor(job: Any, chunks: list[list[int]], d: Distilled = d) -> list[torch.Tensor]:
            assert mapper is not None
            return mapper(predict_job, [(d, data_root, job, ids, seed) for ids in chunks])

        r = evaluate_distilled(problem, d, nets, protocol=eval_protocol(problem, protocol, nets, epochs, dsa),
                               predictor=predictor if mapper else None, workers=workers)
        sc = None
        if scores is not None:
            config = problem.config.override(eval_nets=nets, eval_epochs=epochs, score_lrs=scores[0],
                                             full_epochs=scores[1])
            sc = score_distilled(dataclasses.replace(problem, config=config), d, predictor if mapper else None,
                                 workers)
        out.append(Scored(src, label, str(d.meta.get("method", "?")), int(d.images.shape[0] * d.images.shape[1]),
                          r, sc))
    return out


def table(rows: Sequence[Scored], protocol: str) -> str:
    """One line per set: source, method, images, test accuracy mean ± std (%), n, protocol; with scores,
    HLR, IOR, LRS and ARS (points) and the set's bytes."""
    scored = all(r.scores is not None for r in rows)
    head = ["set", "method", "images", "test accuracy %", "n", "protocol"]
    if scored:
        head += [k.upper() for k in SCORE_NAMES] + ["bytes"]
    lines = [head]
    for r in rows:
        line = [r.source, r.method, str(r.images), f"{100 * r.result.mean:.1f} ± {100 * r.result.std:.1f}",
                str(r.result.n), protocol]
        if scored and r.scores is not None:
            line += [f"{100 * r.scores.mean[k]:.1f}" for k in SCORE_NAMES] + [f"{r.scores.set_bytes:,}"]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
