"""``ddray pretrain``: a pool of networks trained on a (source) data set, stored as files.

The pool feeds the ``fixed-pretrained`` and ``random-pretrained`` init modes; with
a source data set different from the target this is the paper's adaptation
experiment (e.g. nets trained on ``digits`` resized to 28×28, adapted to MNIST-5k).

Layout: ``net-000.safetensors`` … (parameters keyed by the model's names) and
``pool.json`` {model, dataset, shape, classes, files, test_acc, epochs, seed}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm import tqdm

from ddray._version import __version__
from ddray.config import DataConfig
from ddray.core.inits import PRETRAIN, generator
from ddray.core.models import Params, build_model, init_params
from ddray.core.protocol_dd import predict
from ddray.data import Dataset
from ddray.inputs.problem import POOL_META
from ddray.store.artifact import write_json_atomic


def train_network(model: torch.nn.Module, params: Params, data: Dataset, epochs: int, lr: float,
                  batch_size: int, g: torch.Generator) -> Params:
    """Plain minibatch Adam training of one parameter set on ``data``'s train split."""
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = torch.optim.Adam(p.values(), lr=lr)
    n = len(data.x_train)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(functional_call(model, p, (data.x_train[idx],)), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach() for k, v in p.items()}


def pretrain(data: Dataset, model_name: str, scheme: str, nets: int, epochs: int, out: str | Path,
             seed: int = 0, lr: float = 1e-3, batch_size: int = 128, progress: bool = True,
             mapper: Callable[..., list[Any]] | None = None, source: DataConfig | None = None) -> Path:
    """Train ``nets`` networks from scheme-drawn θ₀ and write the pool to ``out``.

    Resumable: networks whose file already exists in ``out`` are kept, not retrained.
    ``mapper`` trains the missing ones elsewhere in parallel, one job per network
    (Ray workers, which load the data from ``source``); each file is written here as
    its network arrives.
    """
    from safetensors.torch import load_file, save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(model_name, data.shape, data.num_classes)
    files = [out / f"net-{i:03d}.safetensors" for i in range(nets)]
    todo = [i for i, f in enumerate(files) if not f.is_file()]
    bar = tqdm(total=nets, initial=nets - len(todo), desc="pretrain", unit="net", disable=not progress)

    def store(i: int, params: Params) -> None:
        save_file({k: v.contiguous() for k, v in params.items()}, str(files[i]))
        bar.update(1)

    jobs = [(source, model_name, scheme, seed, i, epochs, lr, batch_size) for i in todo]
    if mapper is not None:
        if source is None:
            raise ValueError("pretrain: mapper needs source, the data set the workers load")
        mapper(pretrain_job, jobs, on_result=lambda k, params: store(todo[k], params))
    for i in todo if mapper is None else []:
        store(i, pool_network(data, model_name, scheme, seed, i, epochs, lr, batch_size))
    bar.close()
    accs = []
    for f in files:
        pred = predict(model, {k: v.unsqueeze(0) for k, v in load_file(str(f)).items()}, data.x_test)
        accs.append(float((pred[0] == data.y_test).float().mean()))
    write_json_atomic(out / POOL_META, {
        "model": model_name, "dataset": data.name, "shape": list(data.shape), "classes": data.num_classes,
        "files": [f.name for f in files], "test_acc": accs, "epochs": epochs, "seed": seed, "scheme": scheme,
        "ddray_version": __version__})
    return out


def pretrain_job(source: DataConfig, model_name: str, scheme: str, seed: int, index: int, epochs: int, lr: float,
                 batch_size: int) -> Params:
    """Network ``index`` of a pool trained where this runs (a Ray worker, which loads the data set)."""
    from ddray.inputs.sources import load_data

    data = load_data(source)
    return pool_network(data, model_name, scheme, seed, index, epochs, lr, batch_size)


def pool_network(data: Dataset, model_name: str, scheme: str, seed: int, index: int, epochs: int, lr: float,
                 batch_size: int) -> Params:
    """Network ``index`` of a pool: θ₀ and the minibatch order from one generator (seed, PRETRAIN, index)."""
    model = build_model(model_name, data.shape, data.num_classes)
    g = generator(seed, PRETRAIN, index)
    return train_network(model, init_params(model, scheme, g), data, epochs, lr, batch_size, g)
