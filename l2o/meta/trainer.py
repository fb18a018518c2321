"""The meta-trainer: the outer loop that meta-trains a learned optimizer.

Each outer step ``t``:

    estimate  = estimator.estimate(meta_params, est_state, generator)   # one truncation
    g         = mean over ranks of estimate.grads                        # l2o.meta.distributed
    if not finite(‖g‖):  skip (counted in ``skipped_nonfinite``, never applied)
    g         = g · min(1, c / ‖g‖)                                      # global-norm clipping
    updates, outer_state = outer_rule.update(g, outer_state, meta_params, step=n)
    meta_params += updates                                                # n = updates applied

The outer optimizer is an ordinary l2o update rule (Adam by default) applied functionally to the
meta-parameters. Everything the loop depends on — meta-parameters, outer-optimizer state,
estimator state (inner parameters and states of the population), the generator, counters and
metric history — goes into a resume file (one per rank), written atomically, so a run killed at
any moment and resumed reaches exactly the meta-parameters of an uninterrupted run.

Run directory layout::

    <run_dir>/resume.pt                       exact-resume state (torch.load(weights_only=True))
    <run_dir>/resume.rank<r>.pt               the same for rank r > 0 of a distributed run
    <run_dir>/checkpoints/step_000100.{safetensors,json}   learned optimizer + card
    <run_dir>/checkpoints/last.{safetensors,json}          the newest of them (a copy)
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from l2o.learned.base import LOpt
from l2o.learned.checkpoint import CheckpointError, default_provenance, save_checkpoint
from l2o.meta.base import EstimatorState, GradientEstimator
from l2o.meta.distributed import World, all_reduce_mean, barrier, broadcast, mean_metrics
from l2o.meta.losses import get_meta_loss
from l2o.meta.unroll import init_carry, unroll
from l2o.optim.base import (
    Params,
    State,
    UpdateRule,
    apply_updates,
    global_norm,
    lr_at,
    map_tensors,
)
from l2o.tasks.base import Task, TaskFamily

RESUME_FILE = "resume.pt"
CHECKPOINT_DIR = "checkpoints"
#: Ranks > 0 of a distributed run draw from generators seeded ``seed + stride * rank``.
_RANK_SEED_STRIDE = 1_000_003
#: Bumped when the resume file's layout changes; older files are refused with a clear message.
RESUME_FORMAT = 1
_RESUME_KEYS = (
    "format",
    "step",
    "applied_updates",
    "skipped_nonfinite",
    "meta_params",
    "outer_state",
    "estimator_state",
    "generator_state",
    "history",
    "wall_time",
)


class ResumeError(CheckpointError):
    """A resume file that is missing, corrupted, or does not belong to this run."""


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cuda"`` without CUDA is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but CUDA is not available; use device=auto or device=cpu")
    return device


def clip_by_global_norm(grads: Params, max_norm: float | None) -> tuple[Params, float]:
    """``grads · min(1, max_norm / ‖grads‖)`` and the norm before clipping.

    ``max_norm`` of ``None`` or ``0`` disables clipping (the norm is still returned).
    """
    norm = float(global_norm(grads))
    if max_norm and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / norm
        grads = {k: g * scale for k, g in grads.items()}
    return grads, norm


@dataclass
class MetaTrainResult:
    meta_params: Params
    #: One dict of scalar metrics per outer step, in order (``step`` included).
    history: list[dict[str, float]] = field(default_factory=list)
    skipped_nonfinite: int = 0
    run_dir: Path | None = None


class MetaTrainer:
    """Runs the outer loop of meta-training.

    Args:
        lopt: the learned optimizer; ``lopt.init_meta`` gives the initial meta-parameters.
        estimator: gradient estimator (built for this rank's share when distributed).
        outer_rule: l2o update rule applied to the meta-parameters (e.g. ``l2o.optim.get("adam",
            lr=1e-3)``).
        outer_steps: total outer steps of the run (resuming continues up to this number).
        seed: seeds the single generator that draws the initial meta-parameters and everything
            random in the estimator (tasks, perturbations, truncation lengths).
        meta_grad_clip: global-norm clipping of the meta-gradient; ``None``/``0`` disables it.
        checkpoint_every: save a learned-optimizer checkpoint and the resume file every this many
            outer steps (and always after the last); ``0`` saves only at the end.
        run_dir: where checkpoints go; ``None`` saves nothing.
        tracker: an :class:`l2o.tracking.Tracker` (rank 0 logs); ``None`` logs nothing.
        config: the run's resolved config, written into checkpoint cards and the resume file.
        device: where meta-parameters live (``auto``/``cpu``/``cuda``).
        progress: show a progress bar (rank 0).
        world: this process's place in a ``torch.distributed`` group (default: single process).
        initial_meta_params: start from these meta-parameters (a warm start, e.g. a checkpoint's)
            instead of ``lopt.init_meta``; they must have its names and shapes.
        init_from: where ``initial_meta_params`` came from (a checkpoint id), for the cards.
    """

    def __init__(
        self,
        lopt: LOpt,
        estimator: GradientEstimator,
        outer_rule: UpdateRule,
        *,
        outer_steps: int,
        seed: int = 0,
        meta_grad_clip: float | None = None,
        checkpoint_every: int = 0,
        run_dir: str | os.PathLike | None = None,
        tracker=None,
        config: Mapping[str, Any] | None = None,
        device: str | torch.device = "cpu",
        progress: bool = False,
        world: World | None = None,
        initial_meta_params: Params | None = None,
        init_from: str | None = None,
    ) -> None:
        if outer_steps < 0:
            raise ValueError(f"outer_steps must be >= 0, got {outer_steps}")
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
        if meta_grad_clip is not None and not meta_grad_clip >= 0:
            raise ValueError(f"meta_grad_clip must be >= 0 (0 disables), got {meta_grad_clip}")
        self.lopt = lopt
        self.estimator = estimator
        self.outer_rule = outer_rule
        self.outer_steps = int(outer_steps)
        self.seed = int(seed)
        self.meta_grad_clip = meta_grad_clip
        self.checkpoint_every = int(checkpoint_every)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.tracker = tracker
        self.config = dict(config or {})
        self.device = resolve_device(device)
        self.progress = progress
        self.world = world or World()
        self.init_from = init_from
        _git_commit()  # the code version is the one at the start of the run

        # One generator for everything random, so that its state alone makes resume exact.
        self.generator = torch.Generator().manual_seed(self.seed)
        # Drawn even for a warm start, so that the generator (tasks, perturbations) is the same.
        meta_params = lopt.init_meta(self.generator)
        if initial_meta_params is not None:
            _check_same_structure(meta_params, initial_meta_params, "initial_meta_params")
            meta_params = initial_meta_params
        self.meta_params = {k: v.detach().to(self.device) for k, v in meta_params.items()}
        broadcast(self.meta_params, self.world)  # identical already; cheap insurance
        if self.world.rank > 0:  # other tasks and perturbations than rank 0's, from here on
            self.generator.manual_seed(self.seed + _RANK_SEED_STRIDE * self.world.rank)
        self.outer_state: State = outer_rule.init(self.meta_params)
        self.estimator_state: EstimatorState = estimator.init(self.meta_params, self.generator)
        self.step = 0
        self.applied_updates = 0
        self.skipped_nonfinite = 0
        self.history: list[dict[str, float]] = []
        self.wall_time = 0.0

    # --- the outer step -------------------------------------------------------------------

    def outer_step(self) -> dict[str, float]:
        """One meta-gradient estimate and (if finite) one outer update; returns its metrics."""
        start = time.perf_counter()
        estimate = self.estimator.estimate(self.meta_params, self.estimator_state, self.generator)
        grads = all_reduce_mean(estimate.grads, self.world)
        grads, norm = clip_by_global_norm(grads, self.meta_grad_clip)
        if math.isfinite(norm):
            with torch.no_grad():
                grads = {k: g.detach() for k, g in grads.items()}
                updates, self.outer_state = self.outer_rule.update(
                    grads, self.outer_state, self.meta_params, step=self.applied_updates
                )
                self.meta_params = {
                    k: v.detach() for k, v in apply_updates(self.meta_params, updates).items()
                }
            self.applied_updates += 1
        else:
            # A non-finite estimate (a diverged inner run, an overflow) would poison the outer
            # optimizer's moments for good: skip it and count it instead.
            self.skipped_nonfinite += 1
        self.estimator_state = estimate.state
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start

        metrics = {k: float(v) for k, v in estimate.metrics.items()}
        task_steps = metrics.get("inner_steps")  # P x K of this rank (l2o.meta.estimators)
        if task_steps is None:
            task_steps = _task_steps(self.estimator)
        metrics = mean_metrics(metrics, self.world, self.device)
        metrics.update(
            meta_grad_norm=norm,
            outer_step_time=elapsed,
            task_steps_per_sec=task_steps * self.world.size / elapsed if elapsed > 0 else 0.0,
            skipped_nonfinite=float(self.skipped_nonfinite),
        )
        lr = getattr(self.outer_rule, "lr", None)
        if lr is not None:
            metrics["outer_lr"] = float(lr_at(lr, self.applied_updates))
        self.step += 1
        self.wall_time += elapsed
        metrics["step"] = float(self.step)
        self.history.append(metrics)
        return metrics

    def train(self) -> MetaTrainResult:
        """Run outer steps until ``outer_steps``, logging and checkpointing along the way."""
        bar = None
        if self.progress and self.world.is_main and self.step < self.outer_steps:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.outer_steps,
                initial=self.step,
                desc="meta-train",
                unit="step",
                mininterval=1.0,
            )
        try:
            while self.step < self.outer_steps:
                metrics = self.outer_step()
                if self.world.is_main:
                    if self.tracker is not None:
                        self.tracker.log(metrics, step=self.step)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(
                            meta_loss=f"{metrics.get('meta_loss', float('nan')):.4g}",
                            skipped=self.skipped_nonfinite,
                        )
                last = self.step == self.outer_steps
                if last or (self.checkpoint_every and self.step % self.checkpoint_every == 0):
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        if self.world.is_main and self.tracker is not None:
            final = {f"final_{k}": v for k, v in (self.history[-1] if self.history else {}).items()}
            self.tracker.summary({**final, "skipped_nonfinite": self.skipped_nonfinite})
        return MetaTrainResult(
            meta_params=self.meta_params,
            history=list(self.history),
            skipped_nonfinite=self.skipped_nonfinite,
            run_dir=self.run_dir,
        )

    # --- checkpoints and exact resume ------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything the outer loop depends on; loadable with ``torch.load(weights_only=True)``."""
        return {
            "format": RESUME_FORMAT,
            "step": self.step,
            "applied_updates": self.applied_updates,
            "skipped_nonfinite": self.skipped_nonfinite,
            "meta_params": self.meta_params,
            "outer_state": self.outer_state,
            "estimator_state": self.estimator_state,
            "generator_state": self.generator.get_state(),
            "history": self.history,
            "wall_time": self.wall_time,
            "seed": self.seed,
            "world_size": self.world.size,
            "config": self.config,
        }

    def load_state_dict(self, state: Mapping[str, Any], source: str = "resume state") -> None:
        """Restore :meth:`state_dict`'s output (checked against this trainer's lopt)."""
        missing = [k for k in _RESUME_KEYS if k not in state]
        if missing:
            raise ResumeError(f"{source} is not an l2o resume file: missing {missing}")
        if state["format"] != RESUME_FORMAT:
            raise ResumeError(
                f"{source} has resume format {state['format']!r}; this l2o reads "
                f"{RESUME_FORMAT}. Start a new run (resume=false, another run_dir)."
            )
        _check_same_structure(self.meta_params, state["meta_params"], source)
        world_size = state.get("world_size", 1)
        if world_size != self.world.size:
            raise ResumeError(
                f"{source} was written by a run on {world_size} process(es); resume it with the "
                f"same number (this run has {self.world.size})"
            )
        self.meta_params = {k: v.to(self.device) for k, v in state["meta_params"].items()}
        self.outer_state = map_tensors(lambda t: t.to(self.device), state["outer_state"])
        self.estimator_state = state["estimator_state"]
        self.generator.set_state(state["generator_state"])
        self.step = int(state["step"])
        self.applied_updates = int(state["applied_updates"])
        self.skipped_nonfinite = int(state["skipped_nonfinite"])
        self.history = list(state["history"])
        self.wall_time = float(state["wall_time"])

    def resume(self, path: str | os.PathLike | None = None) -> None:
        """Load the resume file at ``path``: a run directory or its ``resume.pt`` (default:
        this trainer's ``run_dir``). In a distributed run every rank loads its own file."""
        if path is None:
            if self.run_dir is None:
                raise ResumeError("resume needs a run_dir (or the path of a resume file)")
            path = self.run_dir
        path = Path(path)
        path = path / resume_file_name(self.world.rank) if path.is_dir() else path
        if self.world.rank > 0 and path.name == RESUME_FILE:
            path = path.with_name(resume_file_name(self.world.rank))
        self.load_state_dict(load_resume_file(path, self.device), source=str(path))
        if self.world.distributed:
            steps = torch.tensor([self.step, -self.step], device=self.device)
            torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MAX)
            if int(steps[0]) != -int(steps[1]):
                raise ResumeError(
                    f"the ranks' resume files in {path.parent} are at different outer steps "
                    f"({-int(steps[1])} to {int(steps[0])}): the run was killed while saving; "
                    "restore the files of one step from a backup or start over"
                )

    def save(self) -> None:
        """Write the resume file (each rank its own) and, on rank 0, a learned-optimizer
        checkpoint of the current meta-parameters."""
        if self.run_dir is None:
            return
        if self.world.is_main:
            self.save_lopt_checkpoint(self.run_dir / CHECKPOINT_DIR / f"step_{self.step:06d}")
            self.save_lopt_checkpoint(self.run_dir / CHECKPOINT_DIR / "last")
        save_resume_file(self.state_dict(), self.run_dir / resume_file_name(self.world.rank))
        barrier(self.world)

    def save_lopt_checkpoint(self, path: str | os.PathLike) -> None:
        """The learned optimizer at the current meta-parameters, with a provenance card."""
        card = {
            "config": self.config,
            "provenance": provenance(self.device)
            | {
                "outer_step": self.step,
                "skipped_nonfinite": self.skipped_nonfinite,
                "wall_time_s": round(self.wall_time, 3),
                "seed": self.seed,
            }
            | ({"init_from": self.init_from} if self.init_from else {}),
        }
        if self.history:
            card["final_metrics"] = dict(self.history[-1])
        save_checkpoint(path, self.lopt, self.meta_params, extra_card=card)


def evaluate(
    lopt: LOpt,
    meta_params: Params,
    task: Task | TaskFamily,
    *,
    seeds: Sequence[int],
    horizon: int,
    meta_loss: str = "train_mean",
    device: str | torch.device = "cpu",
) -> float:
    """Held-out meta-loss: the mean over ``seeds`` of the meta-loss of one whole episode.

    Each seed trains one instance for ``horizon`` inner steps under ``lopt.rule(meta_params)``
    from its initial parameters (for a family, on the task ``family.sample(seed)``), and scores
    the episode with ``meta_loss`` (:mod:`l2o.meta.losses`). Seeds disjoint from the ones the
    estimator draws make it a held-out number; the same seeds make two ``meta_params``
    comparable (common random numbers).
    """
    if not seeds:
        raise ValueError("evaluate needs at least one seed")
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    device = resolve_device(device)
    loss_fn = get_meta_loss(meta_loss)
    with torch.no_grad():
        rule = lopt.rule({k: v.detach().to(device) for k, v in meta_params.items()})
        if isinstance(task, TaskFamily):  # one task structure per seed: unroll them one by one
            groups = [(task.sample(int(s)).to(device), [int(s)]) for s in seeds]
        else:  # one structure: the whole population at once
            groups = [(task.to(device), [int(s) for s in seeds])]
        total = 0.0
        for member_task, member_seeds in groups:
            carry = init_carry(
                rule, member_task, torch.tensor(member_seeds, dtype=torch.int64), device=device
            )
            result = unroll(rule, member_task, carry, horizon, eval_mode=loss_fn.eval_mode)
            total += float(loss_fn(result.terms).sum())
    return total / len(seeds)


def resume_file_name(rank: int = 0) -> str:
    """``resume.pt`` for rank 0 (and single-process runs), ``resume.rank<r>.pt`` for the others:
    every rank carries its own share of the population's inner state."""
    return RESUME_FILE if rank == 0 else f"resume.rank{rank}.pt"


def save_resume_file(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace``: a kill at any
    moment leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_resume_file(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict:
    """Read a resume file with ``weights_only=True``; any damage raises :class:`ResumeError`.

    Tensors saved on a GPU come back on ``device`` (CPU tensors stay on the CPU), so a run
    resumes on another GPU or on the CPU.
    """
    path = Path(path)
    if not path.is_file():
        raise ResumeError(
            f"no resume file at {path}; start without resume, or point resume= at one"
        )
    device = torch.device(device)

    def place(storage, location: str):
        return storage if location == "cpu" else storage.to(device)

    try:
        state = torch.load(path, map_location=place, weights_only=True)
    except Exception as err:  # truncated zip, wrong magic, forbidden pickle global, ...
        raise ResumeError(
            f"resume file {path} is corrupted or not an l2o resume file "
            f"({type(err).__name__}: {err}); delete it to start over, or resume from a copy"
        ) from err
    if not isinstance(state, dict):
        raise ResumeError(f"resume file {path} holds a {type(state).__name__}, not a dict")
    return state


def provenance(device: torch.device) -> dict[str, Any]:
    """What a checkpoint was made with: versions and time (from the checkpoint format), plus
    the git commit when l2o runs from a checkout and the device meta-training ran on."""
    out = default_provenance()
    out["device"] = str(device)
    out["device_name"] = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    )
    commit = _git_commit()
    if commit:
        out["git_commit"] = commit
    return out


@functools.cache
def _git_commit() -> str | None:
    """HEAD of the checkout l2o runs from (``"<sha>-dirty"`` with uncommitted changes to tracked
    files), cached: asked once per process, so a commit made while a long run goes on is not
    mistaken for the code that run is executing."""

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(
                ["git", *args],
                cwd=Path(__file__).resolve().parent,
                capture_output=True,
                text=True,
                timeout=5,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    return commit + "-dirty" if git("status", "--porcelain", "--untracked-files=no") else commit


def _cpu_name() -> str:
    import platform

    return platform.processor() or platform.machine() or "cpu"


def _task_steps(estimator: GradientEstimator) -> float:
    """Inner task-steps of one estimate when the estimator does not report ``inner_steps``."""
    population = getattr(estimator, "population", 1)
    truncation = getattr(estimator, "truncation", 1)
    return float(population * truncation) if isinstance(truncation, (int, float)) else 0.0


def _check_same_structure(expected: Params, got: Any, source: str) -> None:
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
