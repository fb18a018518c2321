"""BFGS and nonlinear conjugate gradients, on the line-search loop they share with L-BFGS.

Both are rules over one flat vector of all parameters (see :mod:`l2o.optim.line_search`): one
``update`` runs up to ``max_iter`` iterations, as one ``torch.optim.LBFGS.step(closure)``, and
needs the loss (``loss_fn`` for the rule, ``step(closure)`` for the ``torch.optim`` class).

**BFGS** keeps a dense inverse-Hessian approximation ``H`` (``n x n``: for small problems) and
moves along ``d = -H g``. After a step ``s`` with gradient change ``y`` and ``s·y > 0``::

    H ← (I - ρ s yᵀ) H (I - ρ y sᵀ) + ρ s sᵀ,        ρ = 1 / (y·s)

(Nocedal & Wright, *Numerical Optimization*, 2nd ed., eq. 6.17), from ``H_0 = I`` (as
``scipy.optimize``; N&W's rescaling ``H_0 = (y·s / y·y) I``, eq. 6.20, took 100 iterations
instead of 21 on a 20-dimensional quadratic of condition 1e4: fitted to the stiffest direction,
it shrinks the others). A direction that is not a descent direction (``H`` lost definiteness to
rounding) resets ``H`` to a scaled identity.

**Nonlinear CG** moves along ``d = -g + β d_prev`` with Fletcher–Reeves or Polak–Ribière+::

    β_FR = g·g / g_prev·g_prev,        β_PR+ = max(0, g·(g - g_prev) / g_prev·g_prev)

(N&W eqs. 5.41a and 5.45), restarting (``β = 0``) every ``restart_every`` iterations (default
``n``) and when consecutive gradients are far from orthogonal, ``|g·g_prev| >= 0.1 g·g``
(Powell's restart, N&W eq. 5.52). The strong-Wolfe search uses ``c2 = 0.1`` by default (N&W
§5.2; Fletcher–Reeves needs ``c2 < 1/2`` for descent), and the first trial step of an
iteration is ``t_prev (g_prev·d_prev) / (g·d)`` (N&W eq. 3.60).

Fletcher & Reeves, "Function minimization by conjugate gradients", 1964; Polak & Ribière,
1969; Broyden, Fletcher, Goldfarb, Shanno, 1970.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from l2o.optim import line_search, registry
from l2o.optim.base import LearningRate, State
from l2o.optim.line_search import CURVATURE_EPS, LineSearchRule, OneGroupOptimizer, Progress
from l2o.validation import positive_int

__all__ = ["BFGS", "BFGSOptimizer", "ConjugateGradient", "ConjugateGradientOptimizer"]

CG_BETAS = ("polak_ribiere", "fletcher_reeves")
# Powell's restart test (N&W eq. 5.52): restart when |g·g_prev| >= POWELL_NU g·g.
POWELL_NU = 0.1


# ---------------------------------------------------------------------- BFGS


@dataclasses.dataclass(frozen=True)
class BFGS(LineSearchRule):
    """BFGS with a dense inverse Hessian (see the module docstring).

    Hyper-parameters as :class:`~l2o.optim.lbfgs.LBFGS` (``torch.optim.LBFGS``'s), but the
    strong-Wolfe search is the default: BFGS's convergence theory assumes it. ``max_size``
    refuses problems whose ``n x n`` matrix would not be small (use L-BFGS there).
    """

    max_size: int = 10_000
    METHOD: ClassVar[str] = "BFGS"

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("max_size", self.max_size)

    def _init_memory(self, flat: Tensor) -> State:
        n = flat.numel()
        if n > self.max_size:
            raise ValueError(
                f"BFGS keeps a dense {n} x {n} inverse Hessian; this problem has {n} parameters, "
                f"more than max_size={self.max_size}: use LBFGS, or raise max_size"
            )
        return {"H": torch.eye(n, dtype=flat.dtype, device=flat.device)}

    def _directions(self, state: State, flat: Tensor, lr: float) -> _InverseHessian:
        return _InverseHessian(state["H"], lr)


class _InverseHessian:
    """BFGS's directions: ``-H g`` with the dense ``H`` updated after every step."""

    def __init__(self, H: Tensor, lr: float) -> None:
        self.H, self.lr = H, lr

    def first(self, g: Tensor) -> Tensor:
        self.H = torch.eye(g.numel(), dtype=g.dtype, device=g.device)
        return -g

    def next(self, g: Tensor, prev_g: Tensor, s: Tensor, prev_d: Tensor) -> Tensor:
        y = g - prev_g
        ys = y.dot(s)
        if ys > CURVATURE_EPS:
            rho = 1.0 / ys
            Hy = self.H @ y
            self.H = (
                self.H
                - rho * (torch.outer(s, Hy) + torch.outer(Hy, s))
                + (rho * rho * y.dot(Hy) + rho) * torch.outer(s, s)
            )
        d = -(self.H @ g)
        if g.dot(d) >= 0:  # H lost definiteness to rounding: start again from a scaled I
            scale = self.H.diagonal().mean().clamp(min=CURVATURE_EPS)
            self.H = scale * torch.eye(g.numel(), dtype=g.dtype, device=g.device)
            d = -scale * g
        return d

    def first_step(self, n_iter: int, g: Tensor, gtd: float, progress: Progress) -> float:
        return line_search.quasi_newton_first_step(n_iter, g, self.lr)

    def to_state(self, like: Tensor) -> State:
        return {"H": self.H}


# ---------------------------------------------------------------------- nonlinear CG


@dataclasses.dataclass(frozen=True)
class ConjugateGradient(LineSearchRule):
    """Nonlinear conjugate gradients, Polak–Ribière+ or Fletcher–Reeves (module docstring).

    ``beta``: "polak_ribiere" (default) or "fletcher_reeves"; ``restart_every``: iterations
    between restarts (``None``: the number of parameters). Other hyper-parameters as
    :class:`BFGS`; with ``line_search_fn=None`` every step is ``lr`` along ``d``.
    """

    beta: str = "polak_ribiere"
    restart_every: int | None = None
    METHOD: ClassVar[str] = "nonlinear CG"
    WOLFE_C2: ClassVar[float] = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta not in CG_BETAS:
            raise ValueError(f"beta must be one of {CG_BETAS}, got {self.beta!r}")
        if self.restart_every is not None:
            positive_int("restart_every", self.restart_every)

    def _init_memory(self, flat: Tensor) -> State:
        return {"since_restart": torch.zeros((), dtype=torch.int64, device=flat.device)}

    def _directions(self, state: State, flat: Tensor, lr: float) -> _Conjugate:
        every = self.restart_every or flat.numel()
        searching = self.line_search_fn is not None
        return _Conjugate(self.beta, every, int(state["since_restart"]), lr, searching)


class _Conjugate:
    """Nonlinear CG's directions: ``-g + β d_prev`` with restarts."""

    def __init__(
        self, beta: str, restart_every: int, since_restart: int, lr: float, searching: bool
    ) -> None:
        self.beta, self.restart_every = beta, restart_every
        self.since_restart, self.lr, self.searching = since_restart, lr, searching

    def first(self, g: Tensor) -> Tensor:
        self.since_restart = 0
        return -g

    def next(self, g: Tensor, prev_g: Tensor, s: Tensor, prev_d: Tensor) -> Tensor:
        gg, prev_gg = g.dot(g), prev_g.dot(prev_g)
        self.since_restart += 1
        if self.since_restart >= self.restart_every or g.dot(prev_g).abs() >= POWELL_NU * gg:
            return self.first(g)
        if self.beta == "fletcher_reeves":
            beta = gg / prev_gg
        else:
            beta = (g.dot(g - prev_g) / prev_gg).clamp(min=0.0)
        d = -g + beta * prev_d
        return d if g.dot(d) < 0 else self.first(g)

    def first_step(self, n_iter: int, g: Tensor, gtd: float, progress: Progress) -> float:
        if not self.searching:
            return self.lr
        # N&W eq. 3.60: the same first-order change in f as the previous iteration's step; a
        # restart's first step when there is none (the first iteration, a failed search).
        guess = progress.t * progress.gtd / gtd if n_iter > 1 and gtd != 0 else 0.0
        if not (math.isfinite(guess) and guess > 0):
            return line_search.quasi_newton_first_step(1, g, self.lr)
        return guess

    def to_state(self, like: Tensor) -> State:
        return {
            "since_restart": torch.tensor(self.since_restart, dtype=torch.int64, device=like.device)
        }


# ---------------------------------------------------------------------- torch.optim classes


class BFGSOptimizer(OneGroupOptimizer):
    """:class:`BFGS` as a ``torch.optim`` optimizer; ``step(closure)`` as ``torch.optim.LBFGS``
    (a closure that zeroes the gradients, computes the loss, calls ``backward`` and returns
    it). One param group."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: LearningRate = 1.0,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        line_search_fn: str | None = "strong_wolfe",
        max_size: int = 10_000,
    ) -> None:
        rule = BFGS(
            lr, max_iter, max_eval, tolerance_grad, tolerance_change, line_search_fn, max_size
        )
        super().__init__(params, rule)


class ConjugateGradientOptimizer(OneGroupOptimizer):
    """:class:`ConjugateGradient` as a ``torch.optim`` optimizer (``step(closure)``, one param
    group)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: LearningRate = 1.0,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        line_search_fn: str | None = "strong_wolfe",
        beta: str = "polak_ribiere",
        restart_every: int | None = None,
    ) -> None:
        rule = ConjugateGradient(
            lr,
            max_iter,
            max_eval,
            tolerance_grad,
            tolerance_change,
            line_search_fn,
            beta,
            restart_every,
        )
        super().__init__(params, rule)


registry.register("bfgs", BFGS, BFGSOptimizer)
registry.register("cg", ConjugateGradient, ConjugateGradientOptimizer)
registry.register(
    "cg_fletcher_reeves", ConjugateGradient, ConjugateGradientOptimizer, beta="fletcher_reeves"
)
