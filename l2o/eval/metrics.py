"""The figures ``l2o-eval`` reports, from training curves.

Every per-task figure is first computed *per instance seed*, pairing the optimizer's run on seed
``j`` with the reference's (tuned Adam's) run on the same seed ``j`` (common random numbers: the
same initial parameters and data order), and then averaged over seeds.

Curves are ``[T, S]`` minibatch training losses: row ``t`` is the loss at the parameters the
``t``-th update's gradient was taken at, so row 0 is the initial loss. They are smoothed per seed
by a trailing mean over ``window`` steps (:func:`smooth`); with ``o`` and ``r`` the smoothed
curves of the optimizer and of the reference on one seed and ``L_o = o[T-1]``, ``L_r = r[T-1]``
their final losses:

- ``steps(c, L)`` is the number of steps curve ``c`` takes to first reach ``L`` (``t + 1`` for
  the first ``c[t] <= L``), or none;
- *diverged*: a non-finite loss anywhere in the raw curve, or ``L_o > factor * initial loss``;
- *speed-up*: ``steps(r, L_r) / steps(o, L_r)`` when the optimizer reaches the reference's final
  loss (> 1: it gets there sooner); otherwise ``steps(r, L_o) / T``, the fraction of the run the
  reference needed for the loss the optimizer ended at (< 1). In both cases it is the ratio of
  the steps the reference and the optimizer need to reach the same loss. The reference against
  itself scores exactly 1; a diverged run scores 0.
- *normalised final loss*: ``L_o / L_r`` (< 1: lower than the reference), ``inf`` if diverged.

Aggregates over the tasks of a suite follow Agarwal et al. (2021, "Deep RL at the edge of the
statistical precipice"), as the learned-optimizer literature reports them (VeLO, Celo, μLO): the
interquartile mean (IQM, the mean of the middle 50%) of the per-seed scores of every task, with
a 95% *stratified* bootstrap confidence interval (seeds resampled within each task, tasks kept),
computed with :func:`scipy.stats.trim_mean` and :func:`scipy.stats.bootstrap`. Seeds whose
reference run diverged give no score (NaN) and are left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import scipy.stats
import torch
from torch import Tensor

__all__ = [
    "SeedScores",
    "iqm",
    "iqm_interval",
    "seed_scores",
    "smooth",
    "steps_to_reach",
]


def smooth(curves: Tensor, window: int = 10) -> Tensor:
    """Per-seed trailing mean over ``window`` steps: ``[T, S] -> [T, S]`` (float64).

    Entry ``t`` is the mean of rows ``max(0, t - window + 1) .. t``; a non-finite loss makes every
    later entry non-finite (a diverged run stays diverged).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    x = curves.to(torch.float64)
    if x.ndim == 1:
        x = x[:, None]
    cumulative = torch.cat([x.new_zeros(1, x.shape[1]), x.cumsum(0)])
    end = torch.arange(1, len(x) + 1)
    start = (end - window).clamp(min=0)
    return (cumulative[end] - cumulative[start]) / (end - start).to(x.dtype)[:, None]


def steps_to_reach(curve: Tensor, target: float) -> int | None:
    """Steps a smoothed 1-D ``curve`` takes to first reach ``target`` (``t + 1`` for the first
    ``curve[t] <= target``), or None if it never does."""
    hits = torch.nonzero(torch.isfinite(curve) & (curve <= target)).flatten()
    return int(hits[0]) + 1 if len(hits) else None


@dataclass(frozen=True)
class SeedScores:
    """The figures of one optimizer on one instance seed, paired with the reference's run on
    the same seed (see the module docstring)."""

    final_loss: float  # smoothed training loss at the last step
    best_loss: float  # lowest smoothed training loss
    initial_loss: float
    diverged: bool
    #: steps to reach the reference's final loss (None: never)
    steps_to_reference: int | None
    speedup: float
    normalized_loss: float

    def as_dict(self) -> dict:
        return asdict(self)


def seed_scores(
    curve: Tensor,
    reference: Tensor,
    *,
    window: int = 10,
    divergence_factor: float = 2.0,
) -> list[SeedScores]:
    """Scores of every seed of ``curve`` (``[T, S]`` raw losses) against ``reference`` (``[T, S]``
    raw losses of the reference optimizer on the same seeds)."""
    if curve.shape != reference.shape:
        raise ValueError(
            f"curve {tuple(curve.shape)} and reference {tuple(reference.shape)} differ"
        )
    horizon = curve.shape[0]
    own, ref = smooth(curve, window), smooth(reference, window)
    scores = []
    for j in range(curve.shape[1]):
        o, r = own[:, j], ref[:, j]
        initial = float(curve[0, j])
        final, ref_final = float(o[-1]), float(r[-1])
        finite = bool(torch.isfinite(curve[:, j]).all())
        diverged = not finite or not final <= divergence_factor * initial
        best = float(o.min()) if finite else math.nan
        reached = None if diverged else steps_to_reach(o, ref_final)
        if not math.isfinite(ref_final):  # the reference diverged: nothing to compare with
            speedup = normalized = math.nan
        elif diverged:
            speedup, normalized = 0.0, math.inf
        else:
            ref_steps = steps_to_reach(r, ref_final)
            if reached is not None:
                speedup = ref_steps / reached
            else:
                speedup = steps_to_reach(r, final) / horizon
            normalized = final / ref_final if ref_final != 0 else math.nan
        scores.append(
            SeedScores(
                final_loss=final,
                best_loss=best,
                initial_loss=initial,
                diverged=diverged,
                steps_to_reference=reached,
                speedup=speedup,
                normalized_loss=normalized,
            )
        )
    return scores


# --- aggregates ---------------------------------------------------------------------------------


def _finite_or_inf(values: Sequence[float]) -> np.ndarray:
    """The scores that count: NaN (no reference to compare with) left out."""
    array = np.asarray(values, dtype=np.float64)
    return array[~np.isnan(array)]


def iqm(values: Sequence[float]) -> float:
    """Interquartile mean: the mean of the middle 50% (``scipy.stats.trim_mean(x, 0.25)``)."""
    array = _finite_or_inf(values)
    if not len(array):
        return math.nan
    return float(scipy.stats.trim_mean(array, 0.25))


def iqm_interval(
    scores_per_task: Sequence[Sequence[float]],
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Stratified-bootstrap percentile interval of the IQM of all tasks' seed scores.

    Each task's seeds are resampled with replacement independently (``scipy.stats.bootstrap``
    with one sample per task, ``paired=False``); the statistic is the IQM of the pooled
    resample. ``(nan, nan)`` when no task has two scores (nothing to resample).
    """
    samples = [_finite_or_inf(task) for task in scores_per_task]
    resampled = [s for s in samples if len(s) >= 2]
    # A task with a single score has nothing to resample (scipy needs two per sample): it
    # enters every resample unchanged.
    fixed = np.concatenate([s for s in samples if len(s) == 1] or [np.empty(0)])
    if not resampled:
        return math.nan, math.nan

    def pooled_iqm(*parts: np.ndarray, axis: int = -1) -> np.ndarray:
        constant = np.broadcast_to(fixed, (*parts[0].shape[:-1], len(fixed)))
        return scipy.stats.trim_mean(np.concatenate([*parts, constant], axis=-1), 0.25, axis=-1)

    with np.errstate(invalid="ignore"):
        result = scipy.stats.bootstrap(
            tuple(resampled),
            pooled_iqm,
            n_resamples=n_resamples,
            confidence_level=confidence,
            method="percentile",
            vectorized=True,
            paired=False,
            rng=np.random.default_rng(seed),
        )
    low, high = result.confidence_interval
    return float(low), float(high)
