"""Data parallelism over the population with ``torch.distributed`` (launched by ``torchrun``).

Each rank unrolls its own share of the population (its tasks, or its perturbations for ES/PES)
and the ranks average their meta-gradients before the outer update, so every rank applies the
same update and the meta-parameters stay identical. For a meta-loss that is a mean over the
population, the mean of equal shares' gradients *is* the full population's gradient.

Every rank builds its estimator with ``population / world size`` members and, after drawing the
same initial meta-parameters, draws its own tasks and perturbations (the trainer reseeds ranks
> 0), so W ranks together train a population W times a rank's share, like data-parallel
training sees W different minibatches. Each rank saves its own resume file (its share of the
inner state); rank 0 logs and writes learned-optimizer checkpoints.

Nothing here starts a process group unless ``WORLD_SIZE`` > 1 is in the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils._pytree import tree_flatten, tree_unflatten

from l2o.optim.base import Params


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among ``size`` ranks (``World()`` = one process)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_from_env(device: torch.device | str = "cpu", backend: str | None = None) -> World:
    """Join the process group described by torchrun's environment, if ``WORLD_SIZE`` > 1.

    The backend is ``nccl`` for CUDA and ``gloo`` otherwise unless given. A group that is already
    initialised (e.g. by a test harness) is reused.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return World(rank=dist.get_rank(), size=dist.get_world_size())


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cuda"`` without CUDA is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but CUDA is not available; use device=auto or device=cpu")
    return device


def local_device(device: torch.device, world: World) -> torch.device:
    """One GPU per rank (``LOCAL_RANK``) for CUDA; the device itself otherwise."""
    if device.type == "cuda" and world.distributed and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard_size(population: int, world: World) -> int:
    """Members per rank; the population must split evenly so that every rank's share counts
    the same in the mean."""
    if population % world.size:
        raise ValueError(
            f"estimator.population={population} does not split evenly over {world.size} ranks; "
            "use a multiple of the world size"
        )
    return population // world.size


def all_reduce_mean(tree: Params, world: World) -> Params:
    """Mean over ranks of a dict of tensors (one flat all-reduce); identity on one process."""
    if not world.distributed:
        return tree
    leaves, spec = tree_flatten(tree)
    flat = parameters_to_vector([t.detach() for t in leaves])  # one collective, not one a tensor
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world.size
    out = [torch.empty_like(t) for t in leaves]
    vector_to_parameters(flat, out)
    return tree_unflatten(out, spec)


def mean_metrics(
    metrics: Mapping[str, float], world: World, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Mean over ranks of scalar metrics (the same keys on every rank), for logging on rank 0.

    ``device`` is where the reduction runs (a CUDA device for the nccl backend).
    """
    if not world.distributed or not metrics:
        return dict(metrics)
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return {k: v / world.size for k, v in zip(keys, values.tolist())}


def broadcast(tree: Params, world: World, src: int = 0) -> Params:
    """Rank ``src``'s tensors on every rank (in place on the others' copies, returned)."""
    if world.distributed:
        for k in sorted(tree):
            dist.broadcast(tree[k], src=src)
    return tree
