"""Training curves of any update rule on a task, LR tuning of baselines, and steps-to-target.

Curves come from the same vmapped unroll that meta-training uses (:func:`l2o.meta.unroll.unroll`),
run under ``torch.no_grad``: one curve per instance seed, all seeds side by side.

The figures the model cards report are defined here:

- the *training loss* at step t is the minibatch loss of the step-t batch, averaged over seeds
  and then over a trailing window of ``window`` steps (minibatch losses are noisy);
- a baseline's *final training loss* is that average at the last step of the horizon;
- *steps to reach* a target is the first step at which the windowed average is at or below it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from l2o.meta.unroll import init_carry, unroll
from l2o.optim import registry
from l2o.optim.base import UpdateRule
from l2o.tasks.base import Task


@torch.no_grad()
def training_curves(
    rule: UpdateRule, task: Task, seeds: Sequence[int], steps: int, *, chunk: int = 200
) -> Tensor:
    """``[steps, len(seeds)]`` minibatch training losses at the parameters of each step."""
    carry = init_carry(rule, task, torch.tensor(list(seeds), dtype=torch.int64))
    pieces = []
    done = 0
    while done < steps:
        k = min(chunk, steps - done)
        result = unroll(rule, task, carry, k)
        carry = result.carry
        pieces.append(result.losses)
        done += k
    return torch.cat(pieces)


def windowed_mean(curves: Tensor, window: int = 10) -> Tensor:
    """Mean over seeds, then a trailing moving average over ``window`` steps (``[steps]``)."""
    mean = curves.float().mean(dim=1)
    cumulative = torch.cat([mean.new_zeros(1), mean.cumsum(0)])
    idx = torch.arange(1, len(mean) + 1)
    start = (idx - window).clamp(min=0)
    return (cumulative[idx] - cumulative[start]) / (idx - start)


def steps_to_reach(smoothed: Tensor, target: float) -> int | None:
    """First step (1-based count of steps taken) whose smoothed loss is <= ``target``."""
    hits = torch.nonzero(torch.isfinite(smoothed) & (smoothed <= target)).flatten()
    return int(hits[0]) + 1 if len(hits) else None


@dataclass
class TunedBaseline:
    name: str
    lr: float
    final_loss: float
    #: final smoothed training loss for every learning rate tried
    grid: dict[float, float]
    curve: Tensor


def tune_lr(
    name: str,
    task: Task,
    seeds: Sequence[int],
    steps: int,
    grid: Sequence[float],
    *,
    window: int = 10,
    **hparams: float,
) -> TunedBaseline:
    """Grid-search the learning rate of the registered optimizer ``name`` for the lowest final
    smoothed training loss (non-finite runs lose)."""
    results = {}
    curves = {}
    for lr in grid:
        curve = windowed_mean(
            training_curves(registry.get(name, lr=lr, **hparams), task, seeds, steps), window
        )
        final = float(curve[-1])
        results[float(lr)] = final if math.isfinite(final) else math.inf
        curves[float(lr)] = curve
    best = min(results, key=results.get)
    return TunedBaseline(name, best, results[best], results, curves[best])


#: Half-decade learning-rate grid used to tune baselines.
DEFAULT_LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


@dataclass
class Comparison:
    """A rule against a tuned baseline on one task (see the module docstring for definitions)."""

    baseline: TunedBaseline
    final_loss: float
    #: steps the rule needs to reach the baseline's final training loss (None: never)
    steps_to_baseline_final: int | None
    steps: int
    curve: Tensor

    @property
    def step_ratio(self) -> float:
        """``steps_to_baseline_final / steps`` (inf when never reached)."""
        if self.steps_to_baseline_final is None:
            return math.inf
        return self.steps_to_baseline_final / self.steps


def compare_with_tuned(
    rule: UpdateRule,
    task: Task,
    seeds: Sequence[int],
    steps: int,
    *,
    baseline: str = "adam",
    grid: Sequence[float] = DEFAULT_LR_GRID,
    window: int = 10,
) -> Comparison:
    """Train with ``rule`` and with ``baseline`` at its best grid learning rate (tuned on the
    same seeds, which favours the baseline); report how many steps ``rule`` needs to reach the
    baseline's final training loss."""
    tuned = tune_lr(baseline, task, seeds, steps, grid, window=window)
    curve = windowed_mean(training_curves(rule, task, seeds, steps), window)
    return Comparison(
        baseline=tuned,
        final_loss=float(curve[-1]),
        steps_to_baseline_final=steps_to_reach(curve, tuned.final_loss),
        steps=steps,
        curve=curve,
    )
