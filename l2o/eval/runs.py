"""Training runs of one optimizer on one task: the loss curve of every instance seed.

Update rules (learned, guarded, hand-designed) run in the vmapped unroll meta-training uses
(:func:`l2o.meta.unroll.unroll`, under ``torch.no_grad``), all seeds side by side; a learning-rate
grid runs as one population of ``len(grid) x len(seeds)`` members whose rules differ only in
``lr``. External ``torch.optim`` classes run in a plain PyTorch loop, seed after seed, as a user
would run them: ``optimizer.step(closure)``.

Either way, ``curves[t, j]`` is seed ``j``'s minibatch training loss at the parameters the
``t``-th update's gradient was taken at (row 0: the initial parameters), and the held-out loss
is the task's eval-split loss at the final parameters.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from l2o.eval.contenders import TorchContender
from l2o.guard import GuardRule
from l2o.meta.unroll import held_out_losses, init_carry, unroll
from l2o.optim.base import FunctionalLoss, UpdateRule, apply_updates
from l2o.tasks.base import Task, members_batch

__all__ = ["Run", "run_rule", "run_rule_grid", "run_torch"]

#: How many points of guard acceptance a run records (at most).
ACCEPTANCE_POINTS = 50


@dataclass
class Run:
    """What one run of an optimizer on one task gives."""

    curves: Tensor  # [T, S] raw training losses (float32, CPU)
    eval_losses: Tensor  # [S] held-out losses at the final parameters
    wall_s: float
    #: [K, 2] rows (last step of a window, fraction of the window's steps that took the learned
    #: update), mean over seeds; guarded rules only
    acceptance: Tensor | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, work: Callable[[], Run]) -> Run:
    """``work()`` with its wall time (device work included) in ``run.wall_s``."""
    _sync(device)
    start = time.perf_counter()
    run = work()
    _sync(device)
    run.wall_s = time.perf_counter() - start
    return run


def _chunks(horizon: int, every: int) -> list[int]:
    sizes = [every] * (horizon // every)
    if horizon % every:
        sizes.append(horizon % every)
    return sizes


@torch.no_grad()
def run_rule(
    rule: UpdateRule,
    task: Task,
    seeds: Sequence[int],
    horizon: int,
    *,
    device: torch.device | str = "cpu",
) -> Run:
    """Train instances ``seeds`` of ``task`` for ``horizon`` steps with ``rule``, vmapped."""
    device = torch.device(device)
    task.to(device)
    return _timed(device, lambda: _unroll_rule(rule, task, list(seeds), horizon, device))


def _unroll_in_chunks(
    rule, task: Task, carry, horizon: int, every: int, on_chunk=None, **unroll_kwargs
) -> tuple[Tensor, dict]:
    """``horizon`` steps of ``unroll`` in chunks of ``every``: the ``[horizon, P]`` training
    losses (float32, on the CPU) and the final carry. Once every member has diverged the rest
    is not run and its losses are NaN. ``on_chunk(before, after, size, done)`` sees the carry
    around each chunk."""
    pieces, done = [], 0
    for size in _chunks(horizon, every):
        result = unroll(rule, task, carry, size, **unroll_kwargs)
        before, carry = carry, result.carry
        pieces.append(result.losses.float().cpu())
        done += size
        if on_chunk is not None:
            on_chunk(before, carry, size, done)
        if not torch.isfinite(result.losses[-1]).any():  # every member diverged: stop paying
            pieces.append(torch.full((horizon - done, result.losses.shape[1]), math.nan))
            break
    return torch.cat(pieces)[:horizon], carry


def _unroll_rule(
    rule: UpdateRule, task: Task, seeds: list[int], horizon: int, device: torch.device
) -> Run:
    carry = init_carry(rule, task, torch.tensor(seeds, dtype=torch.int64), device=device)
    guarded = isinstance(rule, GuardRule)
    every = max(1, math.ceil(horizon / ACCEPTANCE_POINTS)) if guarded else min(horizon, 200)
    acceptance = []

    def record_acceptance(before, after, size: int, done: int) -> None:
        taken = after["opt_state"]["learned_steps"] - before["opt_state"]["learned_steps"]
        acceptance.append((done, float((taken.double() / size).mean())))

    curves, carry = _unroll_in_chunks(
        rule, task, carry, horizon, every, on_chunk=record_acceptance if guarded else None
    )
    params = carry["params"]
    if guarded and rule.deferred:
        params = _settled(rule, task, carry, seeds, horizon)
    finals = held_out_losses(task, params, seeds, [horizon] * len(seeds))
    return Run(
        curves=curves,
        eval_losses=finals.float().cpu(),
        wall_s=0.0,
        acceptance=torch.tensor(acceptance, dtype=torch.float64) if guarded else None,
    )


def _settled(rule: GuardRule, task: Task, carry: dict, seeds: list[int], step: int) -> dict:
    """A deferred guard's members after their last comparison, decided on each member's batch
    of ``step`` (the one after the run), as ``GuardedLearnedOptimizer.settle(closure)`` does
    before a model is evaluated: the held-out loss is then the winner's."""
    batch = members_batch(task, seeds, [step] * len(seeds), "train")

    def settle(state, params, batch):
        updates, _ = rule.settle(state, params, FunctionalLoss(lambda p: task.loss(p, batch)))
        return apply_updates(params, updates)

    return torch.func.vmap(settle)(carry["opt_state"], carry["params"], batch)


@torch.no_grad()
def run_rule_grid(
    factory,
    lrs: Sequence[float],
    task: Task,
    seeds: Sequence[int],
    horizon: int,
    *,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``[T, G, S]`` training losses of ``factory({"lr": lr})`` for every ``lr`` of the grid and
    every seed, in one vmapped population (member ``g * S + j``: grid point ``g``, seed ``j``)."""
    device = torch.device(device)
    task.to(device)
    members = torch.tensor([s for _ in lrs for s in seeds], dtype=torch.int64)
    meta = {"lr": torch.tensor([lr for lr in lrs for _ in seeds], dtype=task.dtype, device=device)}
    carry = init_carry(factory, task, members, population_meta_params=meta, device=device)
    losses, _ = _unroll_in_chunks(
        factory, task, carry, horizon, min(horizon, 200), population_meta_params=meta
    )
    return losses.reshape(horizon, len(lrs), len(seeds))


def _train_with_torch(
    contender: TorchContender,
    lr: float | None,
    task: Task,
    seed: int,
    horizon: int,
    device: torch.device,
) -> tuple[Tensor, float]:
    """One seed's ``[horizon]`` training losses and final held-out loss, in a plain loop."""
    losses = torch.full((horizon,), math.nan)
    initial = task.init_from_seed(seed)
    params = {k: v.detach().to(device).requires_grad_() for k, v in initial.items()}
    optimizer = contender.build(list(params.values()), lr)
    if callable(getattr(optimizer, "train", None)):  # schedule-free optimizers have modes
        optimizer.train()
    for t in range(horizon):
        batch = task.batch(seed, t, "train")
        first: list[Tensor] = []

        def closure(batch=batch, first=first) -> Tensor:
            optimizer.zero_grad()
            loss = task.loss(params, batch)
            loss.backward()
            if not first:  # the loss at the parameters the step starts from
                first.append(loss.detach())
            return loss

        optimizer.step(closure)
        losses[t] = float(first[0])
        if not math.isfinite(losses[t]):
            break  # diverged: the rest of the curve stays NaN
    if callable(getattr(optimizer, "eval", None)):
        optimizer.eval()  # schedule-free: evaluate at the averaged weights
    with torch.no_grad():
        final = float(task.eval_loss(params, seed, horizon))
    return losses, final


def run_torch(
    contender: TorchContender,
    lr: float | None,
    task: Task,
    seeds: Sequence[int],
    horizon: int,
    *,
    device: torch.device | str = "cpu",
) -> Run:
    """Train each seed with ``contender``'s ``torch.optim`` class in a plain training loop."""
    device = torch.device(device)
    task.to(device)

    def work() -> Run:
        runs = [_train_with_torch(contender, lr, task, seed, horizon, device) for seed in seeds]
        return Run(
            curves=torch.stack([losses for losses, _ in runs], dim=1),
            eval_losses=torch.tensor([final for _, final in runs]),
            wall_s=0.0,
        )

    return _timed(device, work)
