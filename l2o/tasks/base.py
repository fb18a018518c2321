"""The task contract: a training problem that an optimizer (or a learned optimizer) trains.

A task is a *structure* (architecture, dataset, loss) plus an *instance seed* that fixes
everything random about one instance of it: the initial parameters and the data order (and, for
synthetic problems such as random quadratics, the problem itself). Same seed, same run.

All methods are functional so a population of same-structure instances runs under
``torch.func.vmap``:

    params = task.init(generator)                    # dict of tensors
    batch  = task.batch(seed, step, split="train")   # deterministic from (seed, step)
    loss   = task.loss(params, batch)                # pure, differentiable, vmappable

``population_init`` / ``population_batch`` stack instances along a new leading dim for vmap.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from l2o.optim.base import Params
from l2o.validation import positive_int

Batch = tuple[Tensor, ...]


class Task(ABC):
    """Base class of all tasks. Subclasses set ``name`` and implement the abstract methods."""

    name: str = "task"
    #: Device on which parameters and batches are created.
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @abstractmethod
    def init(self, generator: torch.Generator) -> Params:
        """Initial parameters of one instance, drawn from ``generator`` (on CPU, then moved)."""

    @abstractmethod
    def loss(self, params: Params, batch: Batch) -> Tensor:
        """Scalar training loss of ``params`` on ``batch``; pure and vmappable."""

    @abstractmethod
    def batch(self, seed: int, step: int, split: str = "train") -> Batch:
        """The minibatch of instance ``seed`` at inner step ``step`` (split "train" or "eval")."""

    def eval_loss(self, params: Params, seed: int, step: int = 0) -> Tensor:
        """Loss on the held-out evaluation split."""
        return self.loss(params, self.batch(seed, step, split="eval"))

    def init_from_seed(self, seed: int) -> Params:
        generator = torch.Generator().manual_seed(int(seed))
        return self.init(generator)

    def population_init(self, seeds: Sequence[int]) -> Params:
        """Parameters of several instances stacked along dim 0."""
        inits = [self.init_from_seed(s) for s in seeds]
        return {k: torch.stack([p[k] for p in inits]) for k in inits[0]}

    def population_batch(self, seeds: Sequence[int], step: int, split: str = "train") -> Batch:
        """Batches of several instances stacked along dim 0 (override for a faster path)."""
        batches = [self.batch(s, step, split) for s in seeds]
        return tuple(torch.stack(parts) for parts in zip(*batches))

    def population_batches(
        self, seeds: Sequence[int], first_steps: Sequence[int], num_steps: int, split: str = "train"
    ) -> Batch:
        """A truncation's batches: member ``i``'s at steps ``first_steps[i] + k`` for
        ``k < num_steps``, stacked ``[num_steps, P, ...]`` (override for a faster path)."""
        # At least one step: the result has no empty form.
        steps = [[s + k for s in first_steps] for k in range(positive_int("num_steps", num_steps))]
        per_step = [members_batch(self, seeds, at, split) for at in steps]
        return tuple(torch.stack(parts) for parts in zip(*per_step))

    def to(self, device: torch.device | str) -> Task:
        """Move the task's data to ``device`` (in place) and return it."""
        self.device = torch.device(device)
        return self

    def config(self) -> dict:
        """JSON-serialisable description (name and constructor arguments) for provenance."""
        return {"name": self.name}


class TaskFamily(ABC):
    """A distribution over tasks: a seed picks one task structure (width, depth, dataset, ...)."""

    name: str = "family"

    @abstractmethod
    def sample(self, seed: int) -> Task:
        """The task drawn by ``seed`` (deterministic)."""

    def config(self) -> dict:
        return {"name": self.name}


def members_batch(task: Task, seeds: Sequence[int], steps: Sequence[int], split: str) -> Batch:
    """Member ``i``'s batch at step ``steps[i]``, stacked along dim 0: one ``population_batch``
    call when the steps agree."""
    if len(set(steps)) == 1:
        return task.population_batch(list(seeds), steps[0], split)
    batches = [task.batch(seed, step, split) for seed, step in zip(seeds, steps)]
    return tuple(torch.stack(parts) for parts in zip(*batches))
