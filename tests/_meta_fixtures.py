"""Tiny tasks and learned optimizers for the meta-training tests (independent of l2o.tasks and
l2o.learned, so the unroll and estimators are tested on problems whose math is known)."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from l2o.learned.base import LOpt
from l2o.optim.base import UpdateRule
from l2o.tasks.base import Task, TaskFamily


class Quadratic(Task):
    """0.5 sum_j h_j (w_j - c_j)^2 + 0.5 (b - 1)^2 with per-instance h, c and noisy targets.

    ``fixed=True``: every instance is the same problem, from the same initial point, with
    noise-free batches, so a population's members are identical and estimates are exact.
    """

    name = "quadratic_fixture"

    def __init__(
        self,
        dim: int = 2,
        noise: float = 0.1,
        fixed: bool = False,
        curvatures: tuple[float, ...] | None = None,
        dtype: torch.dtype = torch.float64,
    ):
        self.dim, self.noise, self.fixed, self.dtype = dim, noise, fixed, dtype
        self.curvatures = curvatures

    def _problem(self, seed: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(0 if self.fixed else int(seed))
        if self.curvatures is not None:
            h = torch.tensor(self.curvatures, dtype=self.dtype)
        else:
            h = 0.5 + 2.0 * torch.rand(self.dim, generator=g, dtype=self.dtype)
        return h, torch.randn(self.dim, generator=g, dtype=self.dtype)

    def init(self, generator: torch.Generator) -> dict[str, Tensor]:
        if self.fixed:
            generator = torch.Generator().manual_seed(1)
        w = torch.randn(self.dim, generator=generator, dtype=self.dtype)
        b = torch.randn((), generator=generator, dtype=self.dtype)
        return {"w": w.to(self.device), "b": b.to(self.device)}

    def batch(self, seed: int, step: int, split: str = "train"):
        h, c = self._problem(seed)
        if self.noise and not self.fixed:
            offset = 0 if split == "train" else 10**6
            g = torch.Generator().manual_seed(int(seed) * 7919 + int(step) + offset)
            c = c + self.noise * torch.randn(self.dim, generator=g, dtype=self.dtype)
        return h.to(self.device), c.to(self.device)

    # Fixed problems are the same for every instance: skip the per-instance Python loops.
    def population_init(self, seeds):
        if not self.fixed:
            return super().population_init(seeds)
        return {k: v.expand(len(seeds), *v.shape) for k, v in self.init_from_seed(0).items()}

    def population_batch(self, seeds, step, split="train"):
        if not self.fixed:
            return super().population_batch(seeds, step, split)
        return tuple(t.expand(len(seeds), *t.shape) for t in self.batch(0, step, split))

    def loss(self, params, batch) -> Tensor:
        h, c = batch
        return 0.5 * (h * (params["w"] - c) ** 2).sum() + 0.5 * (params["b"] - 1.0) ** 2


class QuadraticFamily(TaskFamily):
    """Quadratics whose dimension depends on the sample seed."""

    name = "quadratic_family_fixture"

    def __init__(self):
        self.built = 0

    def sample(self, seed: int) -> Task:
        self.built += 1
        return Quadratic(dim=2 + int(seed) % 3)


@dataclasses.dataclass(frozen=True)
class MomentumRule(UpdateRule):
    """Heavy-ball momentum with a learned (log) learning rate and (logit) momentum; the step
    size decays as ``lr / (1 + decay * step)`` so that the rule depends on ``step``."""

    log_lr: Tensor
    logit_beta: Tensor
    decay: float = 0.0

    def init(self, params):
        return {"m": {k: torch.zeros_like(v) for k, v in params.items()}}

    def update(self, grads, state, params, *, step, loss_fn=None):
        lr = torch.exp(self.log_lr) / (1.0 + self.decay * step)
        beta = torch.sigmoid(self.logit_beta)
        m = {k: beta * state["m"][k] + grads[k] for k in grads}
        return {k: -lr * m[k] for k in m}, {"m": m}


class MomentumLOpt(LOpt):
    """Two meta-parameters: log learning rate and logit momentum."""

    name = "momentum_fixture"

    def __init__(self, lr: float = 0.1, beta: float = 0.5, decay: float = 0.0, dtype=torch.float64):
        self.lr, self.beta, self.decay, self.dtype = lr, beta, decay, dtype

    def init_meta(self, generator: torch.Generator):
        return {
            "log_lr": torch.tensor(math.log(self.lr), dtype=self.dtype),
            "logit_beta": torch.tensor(math.log(self.beta / (1 - self.beta)), dtype=self.dtype),
        }

    def rule(self, meta_params) -> UpdateRule:
        return MomentumRule(meta_params["log_lr"], meta_params["logit_beta"], self.decay)

    def config(self) -> dict:
        return {"lr": self.lr, "beta": self.beta, "decay": self.decay}
