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
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from l2o import durable
from l2o.learned.checkpoint import CheckpointError
from l2o.meta.distributed import World
from l2o.optim.base import Params

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


def rotate_and_save(
    state: Mapping[str, Any],
    run_dir: str | os.PathLike,
    rank: int = 0,
    current: Path | None = None,
) -> Path:
    """Keep the save this run continues from as this rank's previous file, then save ``state``
    as the newest.

    ``current`` is the file the run's state came from when that is not the newest one (a
    resume that fell back to ``prev`` because the newest was damaged or ahead of another rank's;
    an explicit resume file): it, not the newest, becomes ``prev``, so the one good save is never
    replaced before the new one is complete. The newest name never disappears: ``prev`` becomes
    a second link to the kept file (a copy where links are not supported, or from elsewhere)
    before the new file replaces the newest atomically.
    """
    newest, previous = rank_files(run_dir, rank)
    keep = newest if current is None else Path(current)
    if keep.is_file() and keep.resolve() != previous.resolve():
        link = previous.with_name(f".{previous.name}.link.tmp")
        link.unlink(missing_ok=True)
        try:
            os.link(keep, link)
        except OSError:
            shutil.copy2(keep, link)
        os.replace(link, previous)
        durable.fsync_dir(newest.parent)
    return save_resume_file(state, newest)


def _load_weights_only(source, device: torch.device, what: str) -> Any:
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
    wrapped = _load_weights_only(path, device, f"resume file {path}")
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
    state = _load_weights_only(io.BytesIO(data), device, f"the state in {path}")
    if not isinstance(state, dict):
        raise ResumeError(f"resume file {path} holds a {type(state).__name__}, not a dict")
    return state


class ResumeWarning(UserWarning):
    """A run resumes from an older save than its newest file (damaged, or not on every rank)."""


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


def no_readable_save(run_dir: str | os.PathLike, rank: int = 0) -> ResumeError:
    """What is wrong when this rank has no resume file to continue from: the newest is missing,
    or the reason it does not load."""
    newest = rank_files(run_dir, rank)[0]
    if not newest.is_file():
        return ResumeError(
            f"no resume file at {newest}; start without resume, or point resume= at one"
        )
    try:
        load_resume_file(newest)
    except ResumeError as err:
        return err
    return ResumeError(f"{newest} holds no outer step to resume from")


def complete_step(steps_by_rank: Sequence[Iterable[int]]) -> int | None:
    """The newest outer step every rank holds a readable file for, or None."""
    common = set.intersection(*(set(s) for s in steps_by_rank)) if steps_by_rank else set()
    return max(common) if common else None


def newest_complete_save(run_dir: Path, world: World) -> Path:
    """This rank's file of the newest step that every rank saved completely (a collective in a
    distributed run: every rank calls it); warns when that is not the newest file."""
    steps = readable_steps(run_dir, world.rank)
    if world.distributed:
        gathered: list[Any] = [None] * world.size
        torch.distributed.all_gather_object(gathered, sorted(steps))
    else:
        gathered = [sorted(steps)]
    step = complete_step(gathered)
    newest = rank_files(run_dir, world.rank)[0]
    if step is None:
        if steps and newest.is_file():  # readable here, but not at a step every rank holds
            raise ResumeError(
                f"the ranks' resume files in {run_dir} share no complete outer step "
                f"(this rank: {sorted(steps)}); start over"
            )
        raise no_readable_save(run_dir, world.rank)
    chosen = steps[step]
    if chosen != newest and world.is_main:
        warnings.warn(
            f"resuming from {chosen.name} (outer step {step}): the newest save {newest.name} "
            "is damaged or incomplete on some rank (a kill while saving)",
            ResumeWarning,
            stacklevel=3,
        )
    return chosen


# --- checks of a loaded state -------------------------------------------------------------------


def check_fields(state: Mapping[str, Any], source: str) -> None:
    """The scalar fields of a resume state have the types the trainer writes."""
    for key in ("step", "applied_updates", "skipped_nonfinite"):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ResumeError(f"{source}: {key} must be an integer >= 0, got {value!r}")
    if state["applied_updates"] + state["skipped_nonfinite"] != state["step"]:
        raise ResumeError(
            f"{source}: applied and skipped updates do not add up to the outer steps; the file "
            "was tampered with"
        )
    if not isinstance(state["wall_time"], (int, float)) or isinstance(state["wall_time"], bool):
        raise ResumeError(f"{source}: wall_time must be a number")
    history = state["history"]
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise ResumeError(f"{source}: history must be a list of metric dicts")
    if len(history) != state["step"]:
        raise ResumeError(
            f"{source}: history has {len(history)} rows for {state['step']} outer steps"
        )


def check_same_tree(expected: Any, got: Any, source: str, depth: int | None = None) -> None:
    """``got`` has ``expected``'s nested keys, and tensors of its shapes (to ``depth`` levels of
    nesting; deeper, only keys: an estimator's inner state may change shape per episode)."""
    if isinstance(expected, Mapping):
        if not isinstance(got, Mapping) or set(got) != set(expected):
            have = sorted(got) if isinstance(got, Mapping) else type(got).__name__
            raise ResumeError(
                f"{source} holds {have}, expected {sorted(expected)}: the file was written by "
                "another configuration or tampered with"
            )
        if depth is not None and depth <= 0:
            return
        for k in expected:
            check_same_tree(
                expected[k], got[k], f"{source}.{k}", None if depth is None else depth - 1
            )
    elif isinstance(expected, torch.Tensor) and (
        not isinstance(got, torch.Tensor)
        or got.shape != expected.shape
        or got.dtype != expected.dtype
    ):
        what = (
            f"{got.dtype}{list(got.shape)}" if isinstance(got, torch.Tensor) else type(got).__name__
        )
        raise ResumeError(f"{source} is {what}, expected {expected.dtype}{list(expected.shape)}")


def check_same_structure(expected: Params, got: Any, source: str) -> None:
    if not isinstance(got, Mapping) or set(got) != set(expected):
        have = sorted(got) if isinstance(got, Mapping) else type(got).__name__
        raise ResumeError(
            f"{source} holds meta-parameters {have}, but this learned optimizer has "
            f"{sorted(expected)}; was it written by a run with another lopt config?"
        )
    for k, v in expected.items():
        if not isinstance(got[k], torch.Tensor) or got[k].shape != v.shape:
            shape = tuple(got[k].shape) if isinstance(got[k], torch.Tensor) else type(got[k])
            raise ResumeError(
                f"{source}: meta-parameter {k!r} has shape {shape}, expected {tuple(v.shape)}; "
                "was it written by a run with another lopt config?"
            )
