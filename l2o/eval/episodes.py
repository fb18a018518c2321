"""Held-out evaluation of a learned optimizer: the meta-loss of whole episodes.

What ``l2o-meta-train`` reports before and after meta-training, on instance seeds the estimator
never draws (:func:`evaluate`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from l2o.learned.base import LOpt
from l2o.meta.distributed import resolve_device
from l2o.meta.losses import get_meta_loss
from l2o.meta.unroll import init_carry, unroll
from l2o.optim.base import Params
from l2o.optim.schedules import run_annealing
from l2o.tasks.base import Task, TaskFamily

__all__ = ["evaluate"]


def evaluate(
    lopt: LOpt,
    meta_params: Params,
    task: Task | TaskFamily,
    *,
    seeds: Sequence[int],
    horizon: int,
    meta_loss: str = "train_mean",
    device: str | torch.device = "cpu",
    progress: bool | str = False,
    update_schedule: str = "constant",
) -> float:
    """Held-out meta-loss: the mean over ``seeds`` of the meta-loss of one whole episode.

    Each seed trains one instance for ``horizon`` inner steps under ``lopt.rule(meta_params)``
    from its initial parameters (for a family, on the task ``family.sample(seed)``), and scores
    the episode with ``meta_loss`` (:mod:`l2o.meta.losses`). Seeds disjoint from the ones the
    estimator draws make it a held-out number; the same seeds make two ``meta_params``
    comparable (common random numbers). ``progress`` (True or a label) shows a bar over the
    seeds' episodes.
    """
    if not seeds:
        raise ValueError("evaluate needs at least one seed")
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    device = resolve_device(device)
    loss_fn = get_meta_loss(meta_loss)
    annealing = run_annealing(update_schedule, horizon)
    with torch.no_grad():
        rule = lopt.rule({k: v.detach().to(device) for k, v in meta_params.items()})
        if isinstance(task, TaskFamily):  # one task structure per seed: unroll them one by one
            groups = [(task.sample(int(s)).to(device), [int(s)]) for s in seeds]
        else:  # one structure: the whole population at once
            groups = [(task.to(device), [int(s) for s in seeds])]
        total = 0.0
        if progress:
            from tqdm.auto import tqdm

            label = progress if isinstance(progress, str) else "evaluate"
            groups = tqdm(groups, desc=label, unit="episode" if len(groups) > 1 else "population")
        for member_task, member_seeds in groups:
            carry = init_carry(
                rule, member_task, torch.tensor(member_seeds, dtype=torch.int64), device=device
            )
            result = unroll(
                rule,
                member_task,
                carry,
                horizon,
                eval_mode=loss_fn.eval_mode,
                update_schedule=annealing,
            )
            total += float(loss_fn(result.terms).sum())
    return total / len(seeds)
