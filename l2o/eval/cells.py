"""Finished cells of an evaluation run, kept so that an interrupted run resumes without
recomputing them.

A *cell* is one unit of work: a learning-rate grid search of one optimizer on one task, or one
evaluation run. Its key is a digest of everything that decides its result (the kind of cell, the
task's config, horizon, seeds, the optimizer's spec and learning rate, the device type, the cell
format); a cell is stored in ``<run_dir>/cells/<key>.safetensors`` (tensors plus a JSON
``cell`` entry in the metadata) with a durable write, so a kill leaves the old file or the new
one. A file that cannot be read, or whose recorded key differs from its name, is recomputed
(with a warning), never trusted.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from l2o import durable

__all__ = ["CELL_FORMAT", "CellStore", "cell_key"]

#: Bumped whenever what a cell holds or how it is computed changes.
CELL_FORMAT = 1


def cell_key(identity: Mapping[str, Any]) -> str:
    """Hex digest naming the cell described by ``identity`` (JSON-serialisable)."""
    text = json.dumps({"format": CELL_FORMAT, **identity}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


class CellStore:
    """Cells of one run directory (``<run_dir>/cells``)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.reused = 0
        self.computed = 0

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def load(
        self, key: str, shapes: Mapping[str, tuple[int, ...]] | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """``(tensors, info)`` of a finished cell, or None if there is none (or it is unusable:
        unreadable, another key, a tensor of ``shapes`` missing or of another shape, or no
        finite ``wall_s``)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                info = json.loads((f.metadata() or {}).get("cell", "null"))
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
            if not isinstance(info, dict) or info.get("key") != key:
                raise ValueError("its recorded key does not match its name")
            wall = info.get("wall_s")
            if isinstance(wall, bool) or not isinstance(wall, (int, float)) or not wall >= 0:
                raise ValueError(f"its wall time is {wall!r}")
            for name, shape in (shapes or {}).items():
                if name not in tensors or tuple(tensors[name].shape) != tuple(shape):
                    got = tuple(tensors[name].shape) if name in tensors else "missing"
                    raise ValueError(f"tensor {name!r} is {got}, expected {tuple(shape)}")
        except (OSError, ValueError, RuntimeError, safetensors.SafetensorError) as err:
            warnings.warn(f"{path}: unusable cell ({err}); computing it again", stacklevel=2)
            return None
        self.reused += 1
        return tensors, info

    def save(self, key: str, tensors: Mapping[str, Tensor], info: Mapping[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        metadata = {"cell": json.dumps({**info, "key": key})}
        data = safetensors.torch.save(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata
        )
        durable.write_bytes(self.path(key), data)
        self.computed += 1

    def clear(self) -> int:
        """Remove every cell file (``overwrite=true``); returns how many."""
        removed = 0
        if self.folder.is_dir():
            for path in self.folder.glob("*.safetensors"):
                path.unlink()
                removed += 1
        return removed


def tensor_or_empty(value: Tensor | None) -> Tensor:
    return value if value is not None else torch.empty(0)
