"""Run checkpoints: atomic writes, corruption detection, newest-valid-first reads.

A checkpoint is one ``torch.save`` file ``step-<n>.pt`` in a checkpoint location
holding the synthetic set, raw step sizes, outer-optimizer state, the step counter,
the whole config and ddray's version, followed by a SHA-256 of those bytes in a
sidecar ``.sha256`` file. A reader never trusts a file whose digest does not match:
it is skipped with a warning and the previous one is used. (There is no RNG state
that must be saved: every random draw is derived from (seed, purpose, step, net),
see core/inits.py; checkpoints record the seed and that rule under ``rng``.)

The location is a local directory or any URI pyarrow's filesystem layer
understands (``file://``, ``s3://``, ``gs://``, ``hdfs://``, ``abfs://``, …):

* local paths (and ``file://``/``hdfs://`` URIs): write to a temporary name, then
  rename, so a reader never sees half a file (local paths are also fsync'ed);
* object stores (S3, GCS, Azure): the object is written under its final name in a
  single upload, which the store makes visible atomically — there is no rename.

How a URI becomes a filesystem (S3 endpoint, path-style addressing, credentials from
the environment) and how its errors read: :mod:`ddray.store.storage`. A storage that cannot
be used (wrong credentials, endpoint down, no bucket) is a one-line ``ValueError``
naming the URI and the endpoint.
"""

from __future__ import annotations

import hashlib
import io
import re
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

from ddray._version import __version__
from ddray.store.storage import filesystem, is_uri, storage_error, write_atomic

PATTERN = re.compile(r"^step-(\d+)\.pt$")
KEEP = 3
RENAMING_FILESYSTEMS = ("local", "hdfs", "mock")  # pyarrow type_names with an atomic move


def _filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow FileSystem, path inside it) for a URI; ValueError naming the URI otherwise."""
    return filesystem(uri, "--storage")


def _encode(step: int, state: dict[str, Any]) -> tuple[bytes, bytes]:
    buf = io.BytesIO()
    torch.save({**state, "step": step, "ddray_version": __version__}, buf)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest().encode()


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any]) -> Path | str:
    """Atomically write ``state`` (plus step and version) as ``step-<step>.pt``; keep the newest 3.

    Returns the written file (a Path for local directories, a URI string otherwise).
    """
    data, digest = _encode(step, state)
    name = f"step-{step:08d}.pt"
    if is_uri(directory):
        return _save_uri(str(directory), name, data, digest)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    target = d / name
    for suffix, payload in ((".sha256", digest), ("", data)):
        write_atomic(str(target) + suffix, payload)
    for old in list_checkpoints(d)[:-KEEP]:
        assert isinstance(old, Path)
        old.unlink(missing_ok=True)
        Path(str(old) + ".sha256").unlink(missing_ok=True)
    return target


def _save_uri(uri: str, name: str, data: bytes, digest: bytes) -> str:
    fs, base = _filesystem(uri)
    try:
        _write_uri(fs, base, name, data, digest)
    except OSError as e:
        raise storage_error(uri, e, f"writing {name}") from None
    for old in list_checkpoints(uri)[:-KEEP]:
        for suffix in ("", ".sha256"):
            try:
                fs.delete_file(f"{base}/{str(old).rsplit('/', 1)[1]}{suffix}")
            except OSError:  # already gone (FileNotFoundError is an OSError)
                pass
    return f"{uri.rstrip('/')}/{name}"


def _write_uri(fs: Any, base: str, name: str, data: bytes, digest: bytes) -> None:
    if fs.type_name in RENAMING_FILESYSTEMS:  # object stores have no directories to create
        fs.create_dir(base, recursive=True)
    for suffix, payload in ((".sha256", digest), ("", data)):
        final = f"{base}/{name}{suffix}"
        if fs.type_name in RENAMING_FILESYSTEMS:
            tmp = f"{base}/.tmp-{uuid.uuid4().hex}"
            with fs.open_output_stream(tmp) as f:
                f.write(payload)
            fs.move(tmp, final)
        else:  # object store: one upload under the final name is atomic
            with fs.open_output_stream(final) as f:
                f.write(payload)


def list_checkpoints(directory: str | Path) -> list[Path | str]:
    """Checkpoint files in ``directory`` (paths, or URIs for a URI location), oldest first."""
    if is_uri(directory):
        import pyarrow.fs as pafs

        uri = str(directory).rstrip("/")
        fs, base = _filesystem(uri)
        try:
            infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        except OSError as e:
            raise storage_error(uri, e, "listing checkpoints") from None
        found_uri = [(int(m.group(1)), f"{uri}/{i.base_name}") for i in infos
                     if i.type == pafs.FileType.File and (m := PATTERN.match(i.base_name))]
        return [u for _, u in sorted(found_uri)]  # URIs
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def _read_bytes(path: str | Path) -> bytes:
    if is_uri(path):
        fs, p = _filesystem(str(path))
        with fs.open_input_stream(p) as f:
            return bytes(f.read())
    return Path(path).read_bytes()


def _read_verified(path: str | Path) -> dict[str, Any]:
    data = _read_bytes(path)
    try:
        digest = _read_bytes(f"{path}.sha256").decode().strip()
    except (FileNotFoundError, OSError):
        digest = ""
    if digest != hashlib.sha256(data).hexdigest():
        raise ValueError("digest mismatch")
    state: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    return state


def load_latest(directory: str | Path) -> dict[str, Any] | None:
    """The newest checkpoint that verifies, or None if there is none; warns for each bad one."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return _read_verified(path)
        except Exception as e:  # torn, truncated or tampered file
            warnings.warn(f"checkpoint {path} is corrupt ({e}); falling back to the previous one",
                          stacklevel=2)
    return None
