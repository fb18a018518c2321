"""Experiment tracking with Weights & Biases: the only module in l2o that imports ``wandb``.

    with Tracker(config, project="l2o", mode="offline", dir=run_dir) as tracker:
        tracker.log({"meta_loss": 0.3}, step=0)
        tracker.summary({"final_meta_loss": 0.1})

``mode="offline"`` (the default) needs no account and no network: the run is written under
``<dir>/wandb/offline-run-*`` and can be uploaded later with ``wandb sync``. ``mode="disabled"``
writes nothing and never imports ``wandb``, so tests and library users pay nothing for it.
:func:`read_offline_run` reads an offline run back (history rows, summary, config).
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MODES = ("offline", "online", "disabled")


class Tracker:
    """A W&B run, or nothing when ``mode="disabled"``.

    ``config`` is a plain dict (use ``OmegaConf.to_container(cfg, resolve=True)``); values of
    :meth:`log` are numbers (tensors with one element are converted). ``run_id`` continues the
    W&B run of that id (a resumed meta-training run) instead of starting a new one.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        *,
        project: str = "l2o",
        mode: str = "offline",
        dir: str | os.PathLike | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        run_id: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"wandb.mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.run = None
        if mode == "disabled":
            return
        # wandb prints a banner and starts a console capture by default; both are noise in a
        # training log, and the console capture breaks tqdm's progress bar.
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        run_dir = Path(dir) if dir is not None else Path.cwd()
        run_dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(silent=True, console="off")
        self.run = wandb.init(
            project=project,
            mode=mode,
            dir=str(run_dir),
            config=dict(config or {}),
            name=name,
            group=group,
            tags=tags,
            settings=settings,
            # A resumed meta-training run continues its W&B run instead of opening another.
            id=run_id,
            resume="allow" if run_id else None,
        )

    @property
    def run_id(self) -> str | None:
        """The W&B run's id (pass it as ``run_id`` to continue the run), if a run is open."""
        return self.run.id if self.run is not None else None

    @property
    def enabled(self) -> bool:
        return self.run is not None

    @property
    def run_dir(self) -> Path | None:
        """The W&B run's own directory (``.../wandb/offline-run-*``), if a run is open."""
        return Path(self.run.dir).parent if self.run is not None else None

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log({k: _scalar(v) for k, v in metrics.items()}, step=step)

    def log_tables(self, tables: Mapping[str, tuple[list[str], list[list[Any]]]]) -> None:
        """Log ``{name: (columns, rows)}`` as W&B tables."""
        if self.run is not None:
            import wandb

            self.run.log(
                {
                    name: wandb.Table(columns=columns, data=[[_cell(v) for v in r] for r in rows])
                    for name, (columns, rows) in tables.items()
                }
            )

    def log_images(self, images: Mapping[str, str | os.PathLike]) -> None:
        """Log ``{name: path of a PNG}`` as W&B images."""
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Image(str(path)) for name, path in images.items()})

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = _scalar(v)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if exc_type is not None else 0)
            self.run = None


def _cell(value: Any) -> Any:
    """A table cell W&B accepts: numbers and strings; None stays None."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _scalar(value: Any) -> Any:
    item = getattr(value, "item", None)
    return item() if callable(item) else value


# --- reading an offline run back ------------------------------------------------------------
#
# An offline run is a LevelDB-style log ("<run>/run-<id>.wandb"): a 7-byte file header, then
# 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type) and a piece of a
# serialised ``wandb_internal_pb2.Record``. wandb no longer ships a Python reader for it.

_BLOCK = 32 * 1024
_CHUNK_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(data: bytes):
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (bad header)")
    pos, pending = 7, b""
    while pos + _CHUNK_HEADER.size <= len(data):
        if _BLOCK - pos % _BLOCK < _CHUNK_HEADER.size:  # a block's tail too short for a header
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        pos += _CHUNK_HEADER.size
        chunk = data[pos : pos + length]
        pos += length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:  # zero padding at the end of a block
            pos += -pos % _BLOCK


def read_offline_run(run_dir: str | os.PathLike, wait_s: float = 30.0) -> dict[str, Any]:
    """History rows, summary and config of an offline run directory (``offline-run-*``).

    Returns ``{"history": [row, ...], "summary": {...}, "config": {...}}``; values are decoded
    from JSON, nested summary keys are joined with ``/``. A run whose file has no exit record
    yet is read again for up to ``wait_s`` seconds (wandb writes the file asynchronously).
    """
    from wandb.proto import wandb_internal_pb2

    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    # wandb's service process writes the file on its own schedule, and ``run.finish()`` can
    # return before the last records are on disk: a finished run's file ends with an exit
    # record, so wait (a little) for it before reading.
    deadline = time.monotonic() + wait_s
    while True:
        records = []
        for raw in _records(files[0].read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            records.append(record)
        finished = any(r.WhichOneof("record_type") == "exit" for r in records)
        if finished or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    out: dict[str, Any] = {"history": [], "summary": {}, "config": {}}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out["summary"].update(
                {_key(i): json.loads(i.value_json) for i in record.summary.update}
            )
        elif kind in ("run", "config"):
            items = record.run.config.update if kind == "run" else record.config.update
            out["config"].update({_key(i): json.loads(i.value_json) for i in items})
    out["config"].pop("_wandb", None)
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)
