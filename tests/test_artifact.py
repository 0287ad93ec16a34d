"""The open artifact format: round trip, and training on it without ddray gives ddray's result."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from ddray.core.models import build_model, init_params
from ddray.store.artifact import Distilled, read_distilled, save_distilled


def _distilled() -> Distilled:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 4, 1, 28, 28, generator=g)
    model = build_model("lenet", (1, 28, 28), 2)
    return Distilled(images, torch.tensor([0, 0, 1, 1]), torch.tensor([0.1, 0.2, 0.3, 0.05, 0.01, 0.02]),
                     {"dataset": "mnist5k", "model": "lenet", "classes": 2, "mean": [0.1307], "std": [0.3081]},
                     init_params(model, "xavier", g))


def test_roundtrip(tmp_path: Path) -> None:
    d = _distilled()
    save_distilled(tmp_path, d)
    back = read_distilled(tmp_path)
    assert torch.equal(back.images, d.images)
    assert torch.equal(back.labels, d.labels)
    torch.testing.assert_close(back.lrs, d.lrs)
    assert back.steps == 3 and back.epochs == 2
    assert back.init_params is not None and all(torch.equal(back.init_params[k], d.init_params[k])
                                                for k in d.init_params)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["shape"] == [1, 28, 28] and meta["steps"] == 3 and meta["epochs"] == 2
    assert len(meta["lrs"]) == 6 and "ddray_version" in meta


def test_columns_and_training_without_ddray(tmp_path: Path) -> None:
    """Follow the documented recipe with pyarrow + plain torch.nn and compare with ddray's unroll."""
    d = _distilled()
    save_distilled(tmp_path, d)
    table = pq.read_table(tmp_path / "data.parquet")
    assert table.schema.names == ["image", "label", "step"]
    import pyarrow as pa

    image_type = table.schema.field("image").type
    assert pa.types.is_list(image_type) and image_type.value_type == pa.float32()
    assert str(table.schema.field("label").type) == "int64" and str(table.schema.field("step").type) == "int32"
    meta = json.loads((tmp_path / "meta.json").read_text())
    from safetensors.torch import load_file

    net = build_model("lenet", (1, 28, 28), 2)
    net.load_state_dict(load_file(str(tmp_path / "init_params.safetensors")))
    rows = table.to_pylist()
    for t, lr in enumerate(meta["lrs"]):
        batch = [r for r in rows if r["step"] == t % meta["steps"]]
        x = torch.tensor([r["image"] for r in batch]).view(-1, *meta["shape"])
        y = torch.tensor([r["label"] for r in batch])
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= lr * p.grad

    from ddray.core.unroll import unroll

    model = build_model("lenet", (1, 28, 28), 2)
    ours = unroll(model, {k: v.unsqueeze(0) for k, v in d.init_params.items()}, d.images, d.labels, d.lrs)
    for name, p in net.named_parameters():
        torch.testing.assert_close(ours[name][0], p.detach(), rtol=1e-4, atol=1e-5)


def test_runs_uris_are_resolved_where_they_enter_not_here(tmp_path: Path) -> None:
    """artifact.py reads directories only; ``ddray.load_distilled`` (and the CLI) download runs:/ URIs first."""
    with pytest.raises(ValueError, match=r"^runs:/abc: an MLflow URI, not a directory; read it with "
                                         r"ddray.load_distilled"):
        read_distilled("runs:/abc")
    d = Distilled(torch.zeros(1, 2, 1, 2, 2), torch.tensor([0, 1]), torch.tensor([0.1]), {"dataset": "digits"})
    save_distilled(tmp_path / "set", d)
    import ddray

    assert torch.equal(ddray.load_distilled(tmp_path / "set").images, d.images)  # a directory passes through
