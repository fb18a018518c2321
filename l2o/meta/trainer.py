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
metric history — goes into a resume file (one per rank, :mod:`l2o.meta.resume`), written
durably with the previous one kept, so a run killed at any moment and resumed reaches exactly the
meta-parameters of an uninterrupted run. The first resume file is written before the first outer
step, and SIGINT/SIGTERM finish the current outer step, save and raise
:class:`MetaTrainingInterrupted`.

Run directory layout::

    <run_dir>/resume.pt, resume.prev.pt       exact-resume state: the newest save and the one before
    <run_dir>/resume.rank<r>[.prev].pt        the same for rank r > 0 of a distributed run
    <run_dir>/checkpoints/step_000100.{safetensors,json}   learned optimizer + card
    <run_dir>/checkpoints/last.{safetensors,json}          the newest of them (a copy)
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map_only

from l2o.learned.base import LOpt
from l2o.learned.checkpoint import CheckpointError, save_checkpoint
from l2o.meta.base import EstimatorState, GradientEstimator
from l2o.meta.distributed import (
    World,
    all_reduce_mean,
    broadcast,
    mean_metrics,
    resolve_device,
)
from l2o.meta.reporting import OuterLoopReporter
from l2o.meta.resume import (
    RESUME_FILE,
    RESUME_FORMAT,
    ResumeError,
    check_fields,
    check_same_structure,
    check_same_tree,
    load_resume_file,
    newest_complete_save,
    resume_file_name,
    rotate_and_save,
    save_resume_file,
)
from l2o.optim.base import (
    Params,
    State,
    UpdateRule,
    apply_updates,
    global_norm,
    lr_at,
)
from l2o.provenance import git_commit, provenance

__all__ = [
    "RESUME_FILE",
    "RESUME_FORMAT",
    "MetaTrainResult",
    "MetaTrainer",
    "MetaTrainingInterrupted",
    "ResumeError",
    "load_resume_file",
    "resume_file_name",
    "save_resume_file",
]

CHECKPOINT_DIR = "checkpoints"
#: Ranks > 0 of a distributed run draw from generators seeded ``seed + stride * rank``.
_RANK_SEED_STRIDE = 1_000_003
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


class MetaTrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped meta-training after an outer step that was then saved."""

    def __init__(self, signum: int, step: int, run_dir: Path | None) -> None:
        self.signum, self.step, self.run_dir = signum, step, run_dir
        name = signal.Signals(signum).name
        saved = f"saved in {run_dir}" if run_dir is not None else "nothing saved (no run_dir)"
        super().__init__(f"interrupted by {name} after outer step {step}; {saved}")


class _StopOnSignal:
    """SIGINT/SIGTERM set a flag instead of killing the loop, so that the current outer step
    finishes and is saved; a second SIGINT stops at once (every write is durable, so even that
    loses nothing but the step in progress). Only the main thread can install handlers."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            print(
                f"\n{signal.Signals(signum).name}: finishing this outer step and saving "
                "(Ctrl-C again stops at once)",
                file=sys.stderr,
                flush=True,
            )

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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
        git_commit()  # the code version is the one at the start of the run

        # One generator for everything random, so that its state alone makes resume exact.
        self.generator = torch.Generator().manual_seed(self.seed)
        # Drawn even for a warm start, so that the generator (tasks, perturbations) is the same.
        meta_params = lopt.init_meta(self.generator)
        if initial_meta_params is not None:
            check_same_structure(meta_params, initial_meta_params, "initial_meta_params")
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
        #: The resume file this run's state came from, until its first own save.
        self._resumed_from: Path | None = None

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
        """Run outer steps until ``outer_steps``, logging and checkpointing along the way.

        A fresh run saves its resume file before the first step (so it can be resumed however
        early it is killed). SIGINT/SIGTERM finish the current step, save, and raise
        :class:`MetaTrainingInterrupted`.
        """
        if self.step == 0 and self.run_dir is not None:
            self.save(checkpoint=False)
        reporter = OuterLoopReporter(
            self.tracker, progress=self.progress, world=self.world, total=self.outer_steps
        )
        try:
            with _StopOnSignal(announce=self.world.is_main) as stop:
                while self.step < self.outer_steps:
                    metrics = self.outer_step()
                    reporter.step(metrics, self.step, self.skipped_nonfinite)
                    stopping = self._any_rank(stop.signum is not None)
                    last = self.step == self.outer_steps
                    due = self.checkpoint_every and self.step % self.checkpoint_every == 0
                    if last or due or stopping:
                        self.save()
                    if stopping and not last:  # the run is complete: finish normally
                        raise MetaTrainingInterrupted(
                            stop.signum or signal.SIGTERM, self.step, self.run_dir
                        )
        finally:
            reporter.close()
        reporter.finish(self.history, self.skipped_nonfinite)
        return MetaTrainResult(
            meta_params=self.meta_params,
            history=list(self.history),
            skipped_nonfinite=self.skipped_nonfinite,
            run_dir=self.run_dir,
        )

    def _all_ranks(self, flag: bool) -> bool:
        """Whether ``flag`` is set on every rank (a barrier in a distributed run)."""
        return not self._any_rank(not flag)

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (every rank must stop at the same step)."""
        if not self.world.distributed:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

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
            "tracker_run_id": getattr(self.tracker, "run_id", None),
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
        check_same_structure(self.meta_params, state["meta_params"], source)
        world_size = state.get("world_size", 1)
        if world_size != self.world.size:
            raise ResumeError(
                f"{source} was written by a run on {world_size} process(es); resume it with the "
                f"same number (this run has {self.world.size})"
            )
        check_fields(state, source)
        check_same_tree(self.outer_state, state["outer_state"], f"{source}: outer_state")
        check_same_tree(
            self.estimator_state, state["estimator_state"], f"{source}: estimator_state", depth=1
        )
        generator = torch.Generator()
        try:
            generator.set_state(state["generator_state"])
        except (RuntimeError, TypeError) as err:
            raise ResumeError(
                f"{source}: generator_state is not a generator state ({err})"
            ) from err
        self.meta_params = {k: v.to(self.device) for k, v in state["meta_params"].items()}
        self.outer_state = tree_map_only(
            torch.Tensor, lambda t: t.to(self.device), state["outer_state"]
        )
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
        if path.is_dir():
            path = newest_complete_save(path, self.world)
        elif self.world.rank > 0 and path.name in (RESUME_FILE, resume_file_name(0, True)):
            path = path.with_name(resume_file_name(self.world.rank, path.name != RESUME_FILE))
        failure: ResumeError | None = None
        try:
            self.load_state_dict(load_resume_file(path, self.device), source=str(path))
        except ResumeError as err:
            failure = err
        # Every rank raises together: one rank failing alone would leave the others waiting
        # in the collectives below forever.
        if not self._all_ranks(failure is None):
            raise failure or ResumeError(f"another rank could not resume ({path.parent})")
        self._resumed_from = path
        if self.world.distributed:
            steps = torch.tensor([self.step, -self.step], device=self.device)
            torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MAX)
            if int(steps[0]) != -int(steps[1]):
                raise ResumeError(
                    f"the ranks' resume files in {path.parent} are at different outer steps "
                    f"({-int(steps[1])} to {int(steps[0])}): the run was killed while saving; "
                    "restore the files of one step from a backup or start over"
                )

    def save(self, checkpoint: bool = True) -> None:
        """Write the resume file (each rank its own, the previous one kept) and, on rank 0 with
        ``checkpoint``, a learned-optimizer checkpoint of the current meta-parameters."""
        if self.run_dir is None:
            return
        failure: CheckpointError | None = None
        try:
            if checkpoint and self.world.is_main:
                self.save_lopt_checkpoint(self.run_dir / CHECKPOINT_DIR / f"step_{self.step:06d}")
                self.save_lopt_checkpoint(self.run_dir / CHECKPOINT_DIR / "last")
            rotate_and_save(self.state_dict(), self.run_dir, self.world.rank, self._resumed_from)
        except CheckpointError as err:
            failure = err
        # No rank rotates again before every rank has this save complete on disk; and a rank
        # that failed to save stops every rank (instead of leaving them waiting).
        if not self._all_ranks(failure is None):
            raise failure or CheckpointError("another rank failed to save; see its error")
        self._resumed_from = None  # the newest file is now this run's own

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


def _task_steps(estimator: GradientEstimator) -> float:
    """Inner task-steps of one estimate when the estimator does not report ``inner_steps``."""
    population = getattr(estimator, "population", 1)
    truncation = getattr(estimator, "truncation", 1)
    return float(population * truncation) if isinstance(truncation, (int, float)) else 0.0
