"""Suites x optimizers x seeds: what ``l2o-eval`` computes, as one JSON-serialisable dict.

For every entry (task) of every suite:

1. *Tuning.* Each optimizer with a learning rate — the reference (tuned Adam), the baselines,
   the guards' fallbacks — runs every point of the grid on the tuning seeds
   (:func:`l2o.tasks.suites.tuning_seeds`, disjoint from every evaluation seed); the point with
   the lowest final smoothed training loss (mean over tuning seeds) wins.
2. *Evaluation.* Every optimizer runs on the entry's evaluation seeds at its chosen rate.
3. *Scores.* :func:`l2o.eval.metrics.seed_scores` against the reference's runs on the same seeds.

Then per suite, and over all out-of-distribution suites pooled (every suite but
``in_distribution``), the aggregates: IQM of speed-ups and of normalised final losses with
stratified-bootstrap intervals, win rate against the reference, divergences.

Each grid search and each run is a cell (:mod:`l2o.eval.cells`): finished cells are reused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from l2o.eval.cells import CellStore, cell_key, tensor_or_empty
from l2o.eval.contenders import (
    Contender,
    GuardedContender,
    LearnedContender,
    RuleContender,
    TorchContender,
)
from l2o.eval.metrics import iqm, iqm_interval, seed_scores, smooth
from l2o.eval.runs import Run, run_rule, run_rule_grid, run_torch
from l2o.tasks.suites import Suite, SuiteEntry, tuning_seeds

__all__ = ["IN_DISTRIBUTION", "Settings", "aggregate", "count_cells", "evaluate_suites"]

IN_DISTRIBUTION = "in_distribution"
#: Half-decade learning-rate grid used to tune baselines.
DEFAULT_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
#: Points of the per-seed smoothed curves kept in the results for plots (log-spaced steps).
CURVE_POINTS = 300


@dataclass(frozen=True)
class Settings:
    """How ``l2o-eval`` tunes, scores and aggregates."""

    grid: tuple[float, ...] = DEFAULT_GRID
    tuning_seeds: int = 2
    window: int = 10
    divergence_factor: float = 2.0
    confidence: float = 0.95
    resamples: int = 2000
    bootstrap_seed: int = 0
    device: str = "cpu"

    def config(self) -> dict[str, Any]:
        return {
            "grid": list(self.grid),
            "tuning_seeds": self.tuning_seeds,
            "window": self.window,
            "divergence_factor": self.divergence_factor,
            "confidence": self.confidence,
            "resamples": self.resamples,
            "bootstrap_seed": self.bootstrap_seed,
        }


@dataclass
class _Entry:
    """Work on one suite entry: the tuned rates, the runs."""

    entry: SuiteEntry
    lrs: dict[str, float | None] = field(default_factory=dict)
    tuning: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, Run] = field(default_factory=dict)


def _tunables(contenders: Sequence[Contender], reference: RuleContender) -> list[Contender]:
    """Optimizers whose rate is tuned, each once (a guard's fallback is tuned as a baseline)."""
    found: dict[str, Contender] = {}
    for c in [reference, *contenders]:
        side = c.fallback if isinstance(c, GuardedContender) else c
        if side.tunes_lr:
            found.setdefault(_spec_key(side), side)
    return list(found.values())


def _spec_key(c: Contender) -> str:
    return cell_key(c.spec())


def _lineup(contenders: Sequence[Contender], reference: RuleContender) -> list[Contender]:
    """The reference first, then the others, each spec once."""
    seen, out = set(), []
    for c in [reference, *contenders]:
        if _spec_key(c) not in seen:
            seen.add(_spec_key(c))
            out.append(c)
    return out


def count_cells(
    suites: Sequence[Suite], contenders: Sequence[Contender], reference: RuleContender
) -> int:
    """How many cells :func:`evaluate_suites` goes through (for the progress bar)."""
    per_entry = len(_tunables(contenders, reference)) + len(_lineup(contenders, reference))
    return per_entry * sum(len(s) for s in suites)


def _task_identity(entry: SuiteEntry, settings: Settings) -> dict[str, Any]:
    return {
        "task": entry.task.config(),
        "horizon": entry.horizon,
        "device": torch.device(settings.device).type,
    }


def _tune(c: Contender, entry: SuiteEntry, settings: Settings, store: CellStore) -> dict[str, Any]:
    """Grid search of ``c``'s learning rate on ``entry``'s task, over the tuning seeds."""
    seeds = tuning_seeds(settings.tuning_seeds)
    identity = {
        "cell": "tune",
        **_task_identity(entry, settings),
        "seeds": list(seeds),
        "optimizer": c.spec(),
        "grid": list(settings.grid),
    }
    key = cell_key(identity)
    cached = store.load(key, {"finals": (len(settings.grid),)})
    if cached is not None:
        tensors, info = cached
        finals = tensors["finals"]
        wall = info["wall_s"]
    else:
        start = time.perf_counter()
        if isinstance(c, RuleContender):
            curves = run_rule_grid(
                lambda meta: c.build(meta["lr"], entry.horizon),
                settings.grid,
                entry.task,
                seeds,
                entry.horizon,
                device=settings.device,
            )
        else:
            runs = [
                run_torch(c, lr, entry.task, seeds, entry.horizon, device=settings.device)
                for lr in settings.grid
            ]
            curves = torch.stack([r.curves for r in runs], dim=1)
        finals = torch.stack(
            [smooth(curves[:, g], settings.window).mean(1)[-1] for g in range(len(settings.grid))]
        )
        wall = time.perf_counter() - start
        store.save(key, {"finals": finals}, {"wall_s": wall, "identity": identity})
    scores = [float(v) if math.isfinite(float(v)) else math.inf for v in finals]
    best = min(range(len(scores)), key=scores.__getitem__)
    return {
        "lr": float(settings.grid[best]),
        "grid": {f"{lr:g}": s for lr, s in zip(settings.grid, scores)},
        "seeds": list(seeds),
        "at_edge": len(scores) > 1 and best in (0, len(scores) - 1),
        "wall_s": wall,
    }


def _run(
    c: Contender, lr: float | None, entry: SuiteEntry, settings: Settings, store: CellStore
) -> Run:
    """One evaluation run of ``c`` on ``entry``'s evaluation seeds (a cell)."""
    identity = {
        "cell": "run",
        **_task_identity(entry, settings),
        "seeds": list(entry.seeds),
        "optimizer": c.spec(),
        "lr": lr,
    }
    key = cell_key(identity)
    shapes = {"curves": (entry.horizon, len(entry.seeds)), "eval_losses": (len(entry.seeds),)}
    cached = store.load(key, shapes)
    if cached is not None:
        tensors, info = cached
        acceptance = tensors.get("acceptance")
        return Run(
            curves=tensors["curves"],
            eval_losses=tensors["eval_losses"],
            wall_s=info["wall_s"],
            acceptance=acceptance if acceptance is not None and acceptance.numel() else None,
        )
    device, seeds, horizon = settings.device, list(entry.seeds), entry.horizon
    if isinstance(c, TorchContender):
        run = run_torch(c, lr, entry.task, seeds, horizon, device=device)
    elif isinstance(c, GuardedContender):
        run = run_rule(c.build(lr, device, horizon), entry.task, seeds, horizon, device=device)
    elif isinstance(c, LearnedContender):
        run = run_rule(c.build(device, horizon), entry.task, seeds, horizon, device=device)
    else:
        run = run_rule(c.build(lr, horizon), entry.task, seeds, horizon, device=device)
    tensors = {
        "curves": run.curves,
        "eval_losses": run.eval_losses,
        "acceptance": tensor_or_empty(run.acceptance),
    }
    store.save(key, tensors, {"wall_s": run.wall_s, "identity": identity})
    return run


def _lr_of(c: Contender, lrs: dict[str, float | None]) -> float | None:
    side = c.fallback if isinstance(c, GuardedContender) else c
    return lrs.get(_spec_key(side))


def _curve_summary(curves: torch.Tensor, window: int) -> dict[str, list]:
    """Median, min and max over seeds of the smoothed curves at up to CURVE_POINTS steps."""
    smoothed = smooth(curves, window)
    horizon = len(smoothed)
    steps = sorted({int(s) for s in torch.logspace(0, math.log10(horizon), CURVE_POINTS)})
    rows = smoothed[[s - 1 for s in steps]]

    def values(t: torch.Tensor) -> list:
        return [float(v) if math.isfinite(float(v)) else None for v in t]

    return {
        "steps": steps,
        "median": values(rows.median(dim=1).values),
        "low": values(rows.min(dim=1).values),
        "high": values(rows.max(dim=1).values),
    }


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def _task_results(work: _Entry, lineup: Sequence[Contender], settings: Settings) -> dict:
    entry = work.entry
    reference = lineup[0]
    ref_curves = work.runs[reference.name].curves
    optimizers = {}
    for c in lineup:
        run = work.runs[c.name]
        scores = seed_scores(
            run.curves,
            ref_curves,
            window=settings.window,
            divergence_factor=settings.divergence_factor,
        )
        side = c.fallback if isinstance(c, GuardedContender) else c
        reached = [s.steps_to_reference for s in scores if s.steps_to_reference is not None]
        optimizers[c.name] = {
            "kind": c.spec()["kind"],
            "spec": c.spec(),
            "lr": _lr_of(c, work.lrs),
            "tuning": work.tuning.get(_spec_key(side)),
            "seeds": [s.as_dict() for s in scores],
            "final_loss": _mean([s.final_loss for s in scores]),
            "best_loss": _mean([s.best_loss for s in scores]),
            "eval_loss": _mean([float(v) for v in run.eval_losses]),
            "speedup": _mean([s.speedup for s in scores]),
            "normalized_loss": _mean([s.normalized_loss for s in scores]),
            "steps_to_reference": min(reached) if len(reached) == len(scores) else None,
            "diverged": sum(s.diverged for s in scores),
            "ms_per_step": 1e3 * run.wall_s / (entry.horizon * len(entry.seeds)),
            "acceptance": run.acceptance.tolist() if run.acceptance is not None else None,
            "curve": _curve_summary(run.curves, settings.window),
        }
    return {
        "task": entry.task.config(),
        "horizon": entry.horizon,
        "seeds": list(entry.seeds),
        "optimizers": optimizers,
    }


def aggregate(tasks: Sequence[dict], names: Sequence[str], settings: Settings) -> dict:
    """Per optimizer, over ``tasks`` (results of :func:`_task_results`): IQM speed-up and
    normalised final loss with stratified-bootstrap intervals, win rate, divergences."""
    out = {}
    for name in names:
        rows = [t["optimizers"][name] for t in tasks if name in t["optimizers"]]
        reference_finals = [_reference_row(t)["final_loss"] for t in tasks]
        figures: dict[str, Any] = {"tasks": len(rows)}
        for metric in ("speedup", "normalized_loss"):
            per_task = [[s[metric] for s in r["seeds"]] for r in rows]
            pooled = [v for task in per_task for v in task]
            figures[f"iqm_{metric}"] = iqm(pooled)
            figures[f"{metric}_ci"] = list(
                iqm_interval(
                    per_task,
                    confidence=settings.confidence,
                    n_resamples=settings.resamples,
                    seed=settings.bootstrap_seed,
                )
            )
        # A task counts where the reference's final loss is finite; a diverged run (NaN final
        # loss) loses.
        comparable = [
            (r["final_loss"], ref) for r, ref in zip(rows, reference_finals) if math.isfinite(ref)
        ]
        wins = sum(final < ref for final, ref in comparable)
        figures["win_rate"] = wins / len(comparable) if comparable else math.nan
        figures["diverged_seeds"] = sum(r["diverged"] for r in rows)
        figures["seeds"] = sum(len(r["seeds"]) for r in rows)
        figures["diverged_tasks"] = sum(r["diverged"] > 0 for r in rows)
        out[name] = figures
    return out


def _reference_row(task: dict) -> dict:
    return next(iter(task["optimizers"].values()))  # the reference comes first


def evaluate_suites(
    suites: Sequence[Suite],
    contenders: Sequence[Contender],
    reference: RuleContender,
    settings: Settings,
    store: CellStore,
    *,
    suite_settings: Mapping[str, Settings] | None = None,
    on_cell: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Tune, run and score every optimizer on every entry of ``suites``; see the module
    docstring. ``suite_settings``: settings of particular suites (a smaller grid for the
    expensive ones); ``on_cell(label)`` is called after each cell (progress)."""
    lineup = _lineup(contenders, reference)
    tunables = _tunables(contenders, reference)
    names = [c.name for c in lineup]
    if len(set(names)) != len(names):
        raise ValueError(f"two optimizers share a name: {names}")
    done = on_cell or (lambda label: None)
    results: dict[str, Any] = {"reference": reference.name, "optimizers": names, "suites": {}}
    for suite in suites:
        own = (suite_settings or {}).get(suite.name, settings)
        tasks = {}
        for entry in suite:
            work = _Entry(entry)
            for c in tunables:
                tuned = _tune(c, entry, own, store)
                work.lrs[_spec_key(c)] = tuned["lr"]
                work.tuning[_spec_key(c)] = tuned
                done(f"{suite.name}/{entry.name}: tune {c.name}")
            for c in lineup:
                work.runs[c.name] = _run(c, _lr_of(c, work.lrs), entry, own, store)
                done(f"{suite.name}/{entry.name}: {c.name}")
            tasks[entry.name] = _task_results(work, lineup, own)
        results["suites"][suite.name] = {
            "tasks": tasks,
            "aggregate": aggregate(list(tasks.values()), names, own),
            "settings": own.config(),
        }
    ood = [name for name in results["suites"] if name != IN_DISTRIBUTION]
    if ood:
        pooled = [t for name in ood for t in results["suites"][name]["tasks"].values()]
        results["ood"] = {"suites": ood, "aggregate": aggregate(pooled, names, settings)}
    return results
