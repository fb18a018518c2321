"""Resume files: the exact state of a meta-training run, one file per rank, verified on load.

Layout in a run directory (rank 0 and single-process runs use the names without ``rank``)::

    resume.pt            resume.rank<r>.pt          the newest save of each rank
    resume.prev.pt       resume.rank<r>.prev.pt     the save before it

A file is ``torch.save({"format", "sha256", "payload"})`` where ``payload`` is the serialised
state (bytes of a ``torch.save``) and ``sha256`` its digest, so one flipped bit is caught before
anything is restored; both levels load with ``weights_only=True``, so nothing is unpickled.

Saving a rank rotates its newest file to ``prev`` and durably writes the new one; the trainer
then waits for every rank (a barrier) before its next save. So whenever a rank dies, the newest
step that *every* rank holds is complete, and :func:`complete_step` finds it: a run killed while
rank 0 was saving resumes from the previous step instead of being lost.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from l2o import durable
from l2o.learned.checkpoint import CheckpointError

RESUME_FILE = "resume.pt"
#: Bumped when the resume file's layout changes; older files are refused with a clear message.
RESUME_FORMAT = 2


class ResumeError(CheckpointError):
    """A resume file that is missing, corrupted, or does not belong to this run."""


def resume_file_name(rank: int = 0, previous: bool = False) -> str:
    """``resume.pt`` for rank 0 (and single-process runs), ``resume.rank<r>.pt`` for the others;
    ``previous`` gives the name of the save before it (``resume.prev.pt``)."""
    stem = "resume" if rank == 0 else f"resume.rank{rank}"
    return f"{stem}.prev.pt" if previous else f"{stem}.pt"


def rank_files(run_dir: str | os.PathLike, rank: int = 0) -> tuple[Path, Path]:
    """``(newest, previous)`` resume files of ``rank`` in ``run_dir``."""
    run_dir = Path(run_dir)
    return run_dir / resume_file_name(rank), run_dir / resume_file_name(rank, previous=True)


def save_resume_file(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Serialise ``state``, hash it and write it durably to ``path`` (the old file, if any, is
    replaced only once the new one is complete on disk)."""
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    payload = buffer.getvalue()
    wrapped = {
        "format": RESUME_FORMAT,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
    }
    return durable.write_with(path, lambda f: torch.save(wrapped, f))


def rotate_and_save(state: Mapping[str, Any], run_dir: str | os.PathLike, rank: int = 0) -> Path:
    """Keep this rank's newest file as its previous one, then save ``state`` as the newest.

    The newest name never disappears: ``prev`` becomes a second link to it (a copy where links
    are not supported) before the new file replaces it atomically.
    """
    newest, previous = rank_files(run_dir, rank)
    if newest.is_file():
        link = previous.with_name(f".{previous.name}.link.tmp")
        link.unlink(missing_ok=True)
        try:
            os.link(newest, link)
        except OSError:
            shutil.copy2(newest, link)
        os.replace(link, previous)
        durable.fsync_dir(newest.parent)
    return save_resume_file(state, newest)


def _torch_load(source, device: torch.device, what: str) -> Any:
    def place(storage, location: str):
        return storage if location == "cpu" else storage.to(device)

    try:
        return torch.load(source, map_location=place, weights_only=True)
    except Exception as err:  # truncated zip, wrong magic, forbidden pickle global, ...
        raise ResumeError(
            f"{what} is corrupted or not an l2o resume file ({type(err).__name__}: {err}); "
            "resume from its .prev copy or start over"
        ) from err


def load_resume_file(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict:
    """The state in a resume file, after checking its format and digest; any damage raises
    :class:`ResumeError`. Tensors saved on a GPU come back on ``device`` (CPU tensors stay on
    the CPU), so a run resumes on another GPU or on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise ResumeError(
            f"no resume file at {path}; start without resume, or point resume= at one"
        )
    device = torch.device(device)
    wrapped = _torch_load(path, device, f"resume file {path}")
    if not isinstance(wrapped, dict) or wrapped.get("format") != RESUME_FORMAT:
        found = wrapped.get("format") if isinstance(wrapped, dict) else type(wrapped).__name__
        raise ResumeError(
            f"resume file {path} has format {found!r}; this l2o reads format {RESUME_FORMAT}. "
            "It was written by another l2o version or is not a resume file: start a new run "
            "(another run_dir)"
        )
    payload = wrapped.get("payload")
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8:
        raise ResumeError(f"resume file {path} has no payload: it is not an l2o resume file")
    data = payload.cpu().numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != wrapped.get("sha256"):
        raise ResumeError(
            f"resume file {path} fails its integrity check (sha256 mismatch: a flipped bit, a "
            "partial copy); resume from its .prev copy or start over"
        )
    state = _torch_load(io.BytesIO(data), device, f"the state in {path}")
    if not isinstance(state, dict):
        raise ResumeError(f"resume file {path} holds a {type(state).__name__}, not a dict")
    return state


def readable_steps(run_dir: str | os.PathLike, rank: int = 0) -> dict[int, Path]:
    """``{outer step: file}`` for this rank's resume files that load and verify."""
    found: dict[int, Path] = {}
    for path in rank_files(run_dir, rank):
        if not path.is_file():
            continue
        try:
            step = load_resume_file(path).get("step")
        except ResumeError:
            continue
        if isinstance(step, int) and not isinstance(step, bool):
            found.setdefault(step, path)
    return found


def complete_step(steps_by_rank: Sequence[Iterable[int]]) -> int | None:
    """The newest outer step every rank holds a readable file for, or None."""
    common = set.intersection(*(set(s) for s in steps_by_rank)) if steps_by_rank else set()
    return max(common) if common else None
