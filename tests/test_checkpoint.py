"""Checkpoints on local paths (unchanged API) and on pyarrow filesystem URIs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ddray.store.checkpoint as ck


def state(v: float) -> dict:
    return {"images": torch.full((2, 3), v), "raw_lrs": torch.zeros(4), "config": {"x": v}}


@pytest.mark.parametrize("kind", ["path", "file-uri"])
def test_round_trip_keeps_three_and_falls_back_on_corruption(tmp_path: Path, kind: str) -> None:
    where = str(tmp_path / "ck") if kind == "path" else f"file://{tmp_path}/ck"
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(where, step, state(float(step)))
    files = ck.list_checkpoints(where)
    assert [str(f).rsplit("-", 1)[1] for f in files] == ["00000002.pt", "00000003.pt", "00000004.pt"]
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".tmp-")]  # renamed, none left
    assert ck.load_latest(where)["step"] == 4
    newest = tmp_path / "ck" / "step-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # torn write
    with pytest.warns(UserWarning, match="corrupt.*falling back"):
        saved = ck.load_latest(where)
    assert saved["step"] == 3 and saved["images"][0, 0] == 3.0


def test_local_path_api_returns_paths(tmp_path: Path) -> None:
    out = ck.save_checkpoint(tmp_path, 7, state(1.0))
    assert isinstance(out, Path) and out.name == "step-00000007.pt"
    assert ck.list_checkpoints(tmp_path / "missing") == []
    assert ck.load_latest(tmp_path / "missing") is None


def test_object_store_writes_final_names_without_rename(monkeypatch: pytest.MonkeyPatch) -> None:
    """On object stores (no atomic rename) each object is one upload under its final name."""
    fsspec = pytest.importorskip("fsspec")
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    moves: list = []

    class NoRename(FSSpecHandler):
        def move(self, src: str, dest: str) -> None:
            moves.append((src, dest))

    mem = fsspec.filesystem("memory")
    fs = PyFileSystem(NoRename(mem))
    monkeypatch.setattr(ck, "_filesystem", lambda uri: (fs, "/" + uri.split("://", 1)[1].rstrip("/")))
    for step in (1, 2, 3, 4, 5):
        assert ck.save_checkpoint("s3://bucket/run", step, state(float(step))).endswith(f"step-{step:08d}.pt")
    assert moves == []
    assert ck.load_latest("s3://bucket/run")["step"] == 5
    assert sorted(p.rsplit("/", 1)[1] for p in mem.ls("/bucket/run", detail=False)) == [
        f"step-{s:08d}.pt{x}" for s in (3, 4, 5) for x in ("", ".sha256")]
    mem.pipe_file("/bucket/run/step-00000005.pt.sha256", b"0" * 64)  # tampered digest
    with pytest.warns(UserWarning, match="corrupt"):
        assert ck.load_latest("s3://bucket/run")["step"] == 4


def test_bad_uri_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="--storage nosuchscheme://x: not a usable filesystem URI"):
        ck.list_checkpoints("nosuchscheme://x")
