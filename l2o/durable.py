"""Durable file writes: every checkpoint, card and resume file in l2o goes through here.

A write is *durable* when a crash or a kill at any instant leaves either the old file or the
complete new one, never a torn mix, and the new one survives a power loss once the call
returns. The recipe (as in SQLite's and git's object writes)::

    tmp = mkstemp(dir=path.parent)        # same folder: rename stays on one filesystem
    write(tmp); fsync(tmp)                # the bytes are on disk
    rename(tmp, path)                     # atomic replacement of the name
    fsync(path.parent)                    # the rename itself is on disk

Temporary files are named ``.<name>.<random>.tmp``; a writer that is killed between ``mkstemp``
and ``rename`` leaves one behind, so every write first removes the orphans of its own target.
One process writes a given path at a time (ranks write files of their own).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["fsync_dir", "orphan_temporaries", "write_bytes", "write_with"]


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


def orphan_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files an interrupted write of ``path`` left behind."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f"{_tmp_prefix(path)}*.tmp"))


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (new names, renames) to disk; a no-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[tuple[BinaryIO, str]]:
    for orphan in orphan_temporaries(path):
        orphan.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_with(path: str | os.PathLike, writer: Callable[[BinaryIO], object]) -> Path:
    """Durably write whatever ``writer(file)`` writes (e.g. ``lambda f: torch.save(obj, f)``)
    to ``path``, creating its folder; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_beside(path) as (f, _):
        writer(f)
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Durably write ``data`` to ``path`` (see the module docstring); returns ``path``."""
    return write_with(path, lambda f: f.write(data))
