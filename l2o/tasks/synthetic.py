"""Synthetic tasks: random ill-conditioned quadratics and the n-D Rosenbrock function.

Both have a single parameter ``{"x": (dim,)}``. The quadratic's problem (eigenbasis and
minimiser) is part of the instance: it is drawn from the instance seed and delivered in the batch,
so one ``vmap`` runs a population of *different* quadratics.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from l2o.optim.base import Params
from l2o.tasks.base import Batch, Task
from l2o.tasks.data import check_split, seeded_generator
from l2o.validation import positive_int

# Salts keep the streams drawn from one instance seed unrelated to each other.
_PROBLEM_SALT = 0x51AD
_NOISE_SALT = 0x401CE
_MAX_CACHED_PROBLEMS = 1024


class QuadraticTask(Task):
    """f(x) = 0.5 (x - x*)ᵀ A (x - x*) + ξᵀ(x - x*), with A = Q diag(λ) Qᵀ.

    λ are log-spaced in [1/cond, 1] (so L = 1 and the condition number is ``cond``), Q is a
    Haar-random orthogonal matrix and x* ~ N(0, I), both drawn from the instance seed. ξ ~
    N(0, noise_std² I) is fresh each training step, making ∇f = A(x - x*) + ξ an unbiased noisy
    gradient; the "eval" split is noise-free. x₀ ~ N(0, init_scale² I).

    Batch: ``(A, x_star, noise)`` with shapes ``(dim, dim), (dim,), (dim,)``.
    """

    name = "quadratic"

    def __init__(
        self, dim: int = 10, cond: float = 100.0, noise_std: float = 0.0, init_scale: float = 1.0
    ):
        positive_int("dim", dim)
        if not cond >= 1.0 or not math.isfinite(cond):
            raise ValueError(f"cond must be a finite number >= 1, got {cond!r}")
        if not noise_std >= 0.0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
        if not init_scale > 0.0:
            raise ValueError(f"init_scale must be > 0, got {init_scale!r}")
        self.dim = int(dim)
        self.cond = float(cond)
        self.noise_std = float(noise_std)
        self.init_scale = float(init_scale)
        self._problems: dict[int, tuple[Tensor, Tensor]] = {}

    def config(self) -> dict:
        return {
            "name": self.name,
            "dim": self.dim,
            "cond": self.cond,
            "noise_std": self.noise_std,
            "init_scale": self.init_scale,
        }

    def eigenvalues(self) -> Tensor:
        """The spectrum of A (same for every instance), ascending."""
        return torch.logspace(-math.log10(self.cond), 0.0, self.dim, dtype=torch.float64)

    def problem(self, seed: int) -> tuple[Tensor, Tensor]:
        """``(A, x_star)`` of instance ``seed`` on the task's device (cached)."""
        seed = int(seed)
        if seed not in self._problems:
            if len(self._problems) >= _MAX_CACHED_PROBLEMS:  # meta-training sees endless seeds
                self._problems.clear()
            g = seeded_generator(_PROBLEM_SALT, seed)
            gauss = torch.randn(self.dim, self.dim, generator=g, dtype=torch.float64)
            q, r = torch.linalg.qr(gauss)
            q = q * torch.sign(torch.diagonal(r))  # sign fix makes Q Haar-distributed
            a = (q * self.eigenvalues()) @ q.T
            a = 0.5 * (a + a.T)
            x_star = torch.randn(self.dim, generator=g, dtype=torch.float64)
            self._problems[seed] = (
                a.to(self.device, self.dtype),
                x_star.to(self.device, self.dtype),
            )
        return self._problems[seed]

    def init(self, generator: torch.Generator) -> Params:
        x = self.init_scale * torch.randn(self.dim, generator=generator)
        return {"x": x.to(self.device, self.dtype)}

    def loss(self, params: Params, batch: Batch) -> Tensor:
        a, x_star, noise = batch
        d = params["x"] - x_star
        return 0.5 * (d @ (a @ d)) + noise @ d

    def batch(self, seed: int, step: int, split: str = "train") -> Batch:
        check_split(split)
        a, x_star = self.problem(seed)
        if split == "eval" or self.noise_std == 0.0:
            noise = torch.zeros(self.dim, device=self.device, dtype=self.dtype)
        else:
            g = seeded_generator(_NOISE_SALT, seed, step)
            noise = self.noise_std * torch.randn(self.dim, generator=g)
            noise = noise.to(self.device, self.dtype)
        return a, x_star, noise

    def to(self, device: torch.device | str) -> QuadraticTask:
        self.device = torch.device(device)
        self._problems = {}
        return self


class RosenbrockTask(Task):
    """f(x) = Σᵢ b (x_{i+1} - xᵢ²)² + (a - xᵢ)², i = 1..dim-1 (minimum 0 at x = (a, a², ...)).

    x₀ is the classic start (-1.2, 1, -1.2, 1, ...) plus N(0, init_jitter²) noise from the
    instance generator. The function is deterministic, so the batch is empty (``()``) for both
    splits.
    """

    name = "rosenbrock"

    def __init__(self, dim: int = 2, a: float = 1.0, b: float = 100.0, init_jitter: float = 0.1):
        if int(dim) != dim or dim < 2:
            raise ValueError(f"dim must be an integer >= 2, got {dim!r}")
        if not b > 0.0:
            raise ValueError(f"b must be > 0, got {b!r}")
        if not init_jitter >= 0.0:
            raise ValueError(f"init_jitter must be >= 0, got {init_jitter!r}")
        self.dim = int(dim)
        self.a = float(a)
        self.b = float(b)
        self.init_jitter = float(init_jitter)

    def config(self) -> dict:
        return {
            "name": self.name,
            "dim": self.dim,
            "a": self.a,
            "b": self.b,
            "init_jitter": self.init_jitter,
        }

    def init(self, generator: torch.Generator) -> Params:
        start = torch.tensor([-1.2, 1.0]).repeat((self.dim + 1) // 2)[: self.dim]
        x = start + self.init_jitter * torch.randn(self.dim, generator=generator)
        return {"x": x.to(self.device, self.dtype)}

    def loss(self, params: Params, batch: Batch) -> Tensor:
        x = params["x"]
        head, tail = x[:-1], x[1:]
        return (self.b * (tail - head**2) ** 2 + (self.a - head) ** 2).sum()

    def batch(self, seed: int, step: int, split: str = "train") -> Batch:
        check_split(split)
        return ()
