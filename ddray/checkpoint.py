"""Run checkpoints: atomic writes, corruption detection, newest-valid-first reads.

A checkpoint is one ``torch.save`` file ``step-<n>.pt`` in a checkpoint directory
holding the synthetic set, raw step sizes, outer-optimizer state, the step counter,
the whole config and ddray's version, followed by a SHA-256 of those bytes in a
sidecar ``.sha256`` file. It is written to a temporary name and renamed, so a
reader never sees half a file; a file whose digest does not match is skipped
with a warning and the previous one is used. (There is no RNG state to save:
every random draw is derived from (seed, purpose, step, net), see core/inits.py.)
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ddray import __version__

PATTERN = re.compile(r"^step-(\d+)\.pt$")
KEEP = 3


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (plus step and version) as ``step-<step>.pt``; keep the newest 3."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({**state, "step": step, "ddray_version": __version__}, buf)
    data = buf.getvalue()
    target = d / f"step-{step:08d}.pt"
    for suffix, payload in ((".sha256", hashlib.sha256(data).hexdigest().encode()), ("", data)):
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, str(target) + suffix)
    for old in list_checkpoints(d)[:-KEEP]:
        old.unlink(missing_ok=True)
        Path(str(old) + ".sha256").unlink(missing_ok=True)
    return target


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def _read_verified(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    digest = Path(str(path) + ".sha256")
    if not digest.is_file() or digest.read_text().strip() != hashlib.sha256(data).hexdigest():
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
