"""Damped Newton methods: Newton-CG (Hessian-free), dense Newton, Levenberg–Marquardt.

Each ``update`` is one iteration. From ``θ`` with gradient ``g`` and damping ``λ``, solve

    (B + λ D) d = -g

for the step ``d``, try ``θ + d``, and measure how well the quadratic model predicted the change
of the loss, ``ρ = (f(θ + d) - f(θ)) / (g·d + ½ dᵀB d)``. The step is taken only if the loss
went down; ``λ`` is raised (×``damping_increase``) when ``ρ < 1/4`` and lowered
(×``damping_decrease``) when ``ρ > 3/4``, the trust-region-style rule of Martens (2010, §4.1;
Nocedal & Wright, *Numerical Optimization*, 2nd ed., Alg. 4.1).

- :class:`Newton` with ``solver="cg"``, **Newton-CG / Hessian-free**: ``B = ∇²f``, ``D = I``,
  solved by conjugate gradients on Hessian-vector products, truncated at the relative residual
  ``min(0.5, √‖g‖)`` (N&W Alg. 7.1's forcing sequence, superlinear near a minimiser) or at
  negative curvature. Hessian-vector products come from
  :func:`l2o.optim.base.hessian_vector_product` (``jvp`` of ``grad`` for a functional loss; for
  a ``torch.optim`` closure, exact when it calls ``backward(create_graph=True)``, else central
  differences of gradients). Martens, "Deep learning via Hessian-free optimization", ICML 2010.
- :class:`Newton` with ``solver="dense"``, **damped Newton** for small problems: the Hessian
  built whole (``n`` Hessian-vector products, or one ``torch.func.hessian``), factorised by
  Cholesky; ``λ`` grows until ``∇²f + λI`` is positive definite.
- :class:`LevenbergMarquardt`, for least squares ``f = ½‖r(θ)‖²`` given the residuals
  (:class:`ResidualLoss`): ``B = JᵀJ`` (Gauss–Newton), ``D = diag(JᵀJ)`` (Marquardt's scaling)
  or ``I`` (Levenberg's). With ``damping=0`` and ``adapt_damping=False`` it is Gauss–Newton
  (registered as ``gauss_newton``; a failed step is then halved until the loss goes down).
  Levenberg, 1944; Marquardt, 1963; N&W §10.3.

All of them branch on loss values, so none is vmappable.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from l2o.optim import registry
from l2o.optim.adapter import ClosureLoss
from l2o.optim.base import (
    DifferentiableLoss,
    FunctionalLoss,
    LearningRate,
    LossFn,
    Params,
    State,
    Step,
    UpdateRule,
    check_hyperparameter,
    hessian_vector_product,
    lr_at,
    required_loss_fn,
)
from l2o.optim.line_search import OneGroupOptimizer, flatten, initial_loss, unflatten
from l2o.validation import boolean, positive_int

__all__ = [
    "LevenbergMarquardt",
    "LevenbergMarquardtOptimizer",
    "Newton",
    "NewtonOptimizer",
    "ResidualLoss",
    "adapt_damping",
]

SOLVERS = ("cg", "dense")
SCALINGS = ("marquardt", "identity")
# ρ below this raises the damping, above RAISE_BELOW..LOWER_ABOVE keeps it, above lowers it.
RAISE_BELOW, LOWER_ABOVE = 0.25, 0.75
# Step halvings tried when the damping does not adapt (Gauss–Newton's backtracking).
MAX_HALVINGS = 30


def adapt_damping(
    damping: float, rho: float, increase: float, decrease: float, floor: float
) -> float:
    """The damping after an iteration whose model predicted the loss change with ratio ``rho``
    (``rho = actual / predicted``; ``-inf`` for a step that failed)."""
    if rho < RAISE_BELOW:
        return max(damping * increase, floor)
    if rho > LOWER_ABOVE:
        return max(damping * decrease, floor)
    return damping


@dataclasses.dataclass(frozen=True)
class _DampedRule(UpdateRule):
    """What the damped Newton methods share: the damping schedule and one trial per update."""

    lr: LearningRate = 1.0
    damping: float = 1.0
    adapt_damping: bool = True
    damping_increase: float = 1.5
    damping_decrease: float = 2.0 / 3.0
    min_damping: float = 1e-8
    max_size: int = 10_000

    needs_loss_fn: ClassVar[bool] = True
    vmappable: ClassVar[bool] = False
    PARAMETER_SLOTS: ClassVar[frozenset[str]] = frozenset()
    METHOD: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_hyperparameter("lr", self.lr)
        check_hyperparameter("damping", self.damping)
        check_hyperparameter("damping_increase", self.damping_increase, low=1.0)
        check_hyperparameter("damping_decrease", self.damping_decrease, high=1.0)
        check_hyperparameter("min_damping", self.min_damping)
        positive_int("max_size", self.max_size)
        boolean("adapt_damping", self.adapt_damping)

    def init(self, params: Params) -> State:
        flat = flatten(params, "params", self.METHOD)
        return {
            "damping": torch.tensor(float(self.damping), dtype=torch.float64, device=flat.device),
            "n_iter": torch.zeros((), dtype=torch.int64, device=flat.device),
            "rejected": torch.zeros((), dtype=torch.int64, device=flat.device),
        }

    def _checked(
        self, grads: Params, params: Params, loss_fn: Any
    ) -> tuple[Tensor, Tensor, LossFn]:
        """The flat parameters and gradient, and the loss function (required)."""
        loss_fn = required_loss_fn(self.METHOD, loss_fn)
        x = flatten(params, "params", self.METHOD)
        g = flatten(grads, "grads", self.METHOD, like=params)
        if not torch.isfinite(g).all():
            raise ValueError(f"{self.METHOD} got a non-finite gradient at the current parameters")
        return x, g, loss_fn

    def _finish(
        self,
        state: State,
        params: Params,
        loss: float,
        g: Tensor,
        d: Tensor,
        curvature_d: Tensor,
        damping: float,
        loss_fn: LossFn,
    ) -> tuple[Params, State]:
        """Try ``θ + d``; keep it if the loss went down; adapt the damping. ``curvature_d`` is
        ``B d`` (undamped), so the model's predicted change is ``g·d + ½ d·Bd``.

        Without adaptive damping (Gauss–Newton, a fixed ``λ``) nothing else would shorten a
        failed step, so it is halved until the loss goes down (at most ``MAX_HALVINGS`` times):
        a backtracking line search on simple decrease."""
        trials = 1 if self.adapt_damping else MAX_HALVINGS + 1
        for _ in range(trials):
            trial = {k: p + s for (k, p), s in zip(params.items(), unflatten(d, params).values())}
            with torch.no_grad():
                new_loss = float(loss_fn(trial))
            improved = math.isfinite(new_loss) and new_loss < loss
            if improved:
                break
            d, curvature_d = 0.5 * d, 0.5 * curvature_d
        predicted = float(g.dot(d) + 0.5 * d.dot(curvature_d))
        rho = (new_loss - loss) / predicted if improved and predicted < 0 else -math.inf
        if self.adapt_damping:
            damping = adapt_damping(
                damping, rho, self.damping_increase, self.damping_decrease, self.min_damping
            )
        updates = unflatten(d if improved else torch.zeros_like(d), params)
        new_state = {
            "damping": torch.tensor(damping, dtype=torch.float64, device=d.device),
            "n_iter": state["n_iter"] + 1,
            "rejected": state["rejected"] + (0 if improved else 1),
        }
        return updates, new_state

    def _check_size(self, n: int) -> None:
        if n > self.max_size:
            raise ValueError(
                f"{self.METHOD} builds a dense {n} x {n} matrix; this problem has {n} "
                f"parameters, more than max_size={self.max_size}: use Newton(solver='cg'), or "
                "raise max_size"
            )


# ---------------------------------------------------------------------- Newton


@dataclasses.dataclass(frozen=True)
class Newton(_DampedRule):
    """Damped Newton: Newton-CG (``solver="cg"``, Hessian-free) or dense (module docstring).

    Args:
        lr: scale of the solved step (1: the Newton step).
        damping: the initial ``λ``; ``adapt_damping``: update it by the reduction ratio
            (factors ``damping_increase`` / ``damping_decrease``, floor ``min_damping``).
        solver: "cg" (Hessian-vector products only) or "dense" (the whole Hessian).
        cg_max_iter: CG iterations per update (``None``: ``min(n, 250)``, Martens' cap).
        cg_tolerance: CG's relative residual (``None``: ``min(0.5, √‖g‖)``).
        max_size: the largest problem ``solver="dense"`` accepts.
    """

    solver: str = "cg"
    cg_max_iter: int | None = None
    cg_tolerance: float | None = None

    METHOD: ClassVar[str] = "Newton"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.cg_max_iter is not None:
            positive_int("cg_max_iter", self.cg_max_iter)
        if self.cg_tolerance is not None:
            check_hyperparameter("cg_tolerance", self.cg_tolerance, low=0.0, low_inclusive=False)

    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        x, g, loss_fn = self._checked(grads, params, loss_fn)
        loss = initial_loss(loss_fn, params)
        damping = float(state["damping"])
        if self.solver == "dense":
            self._check_size(x.numel())
            hessian = dense_hessian(loss_fn, params)
            d, damping = _damped_solve(hessian, g, damping, self.min_damping)
            curvature_d = hessian @ d
        else:

            def hvp(v: Tensor) -> Tensor:
                product = hessian_vector_product(loss_fn, params, unflatten(v, params))
                return flatten(product, "Hessian-vector product", self.METHOD, like=params)

            g_norm = float(g.norm())
            tolerance = self.cg_tolerance or min(0.5, math.sqrt(g_norm))
            max_iter = self.cg_max_iter or min(x.numel(), 250)
            d, damped_d = conjugate_gradient(
                lambda v: hvp(v) + damping * v, -g, max_iter, tolerance * g_norm
            )
            curvature_d = damped_d - damping * d
        lr = float(lr_at(self.lr, step))
        return self._finish(state, params, loss, g, lr * d, lr * curvature_d, damping, loss_fn)


def conjugate_gradient(
    apply: Callable[[Tensor], Tensor], b: Tensor, max_iter: int, tolerance: float
) -> tuple[Tensor, Tensor]:
    """Approximately solve ``A x = b`` for a symmetric ``A`` given as ``apply(v) = A v``.

    Stops after ``max_iter`` iterations, at ``‖A x - b‖ <= tolerance``, or where a search
    direction has non-positive curvature (N&W Alg. 7.1: then the iterate so far, or the
    direction ``b`` itself at the first iteration). Returns ``(x, A x)``.
    """
    x, ax = torch.zeros_like(b), torch.zeros_like(b)
    r = b.clone()  # b - A x
    p = r
    rr = r.dot(r)
    for i in range(max_iter):
        if float(rr.sqrt()) <= tolerance:
            break
        ap = apply(p)
        curvature = p.dot(ap)
        if curvature <= 0:
            if i == 0:
                return p, ap
            break
        alpha = rr / curvature
        x, ax, r = x + alpha * p, ax + alpha * ap, r - alpha * ap
        rr_new = r.dot(r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, ax


def dense_hessian(loss_fn: LossFn, params: Params) -> Tensor:
    """The Hessian of ``loss_fn`` at ``params`` as an ``n x n`` matrix (flat key order): one
    ``torch.func.hessian`` for a :class:`~l2o.optim.base.FunctionalLoss`, else ``n``
    Hessian-vector products."""
    x = flatten(params, "params", "Newton")
    if isinstance(loss_fn, FunctionalLoss):
        return torch.func.hessian(lambda flat: loss_fn.fn(unflatten(flat, params)))(x)
    columns = []
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e[i] = 1.0
        product = hessian_vector_product(loss_fn, params, unflatten(e, params))
        columns.append(flatten(product, "Hessian-vector product", "Newton", like=params))
    hessian = torch.stack(columns, dim=1)
    return 0.5 * (hessian + hessian.T)  # finite differences are not exactly symmetric


def _damped_solve(
    matrix: Tensor, g: Tensor, damping: float, floor: float, scale: Tensor | None = None
) -> tuple[Tensor, float]:
    """``d = -(M + λ S)⁻¹ g`` by Cholesky (``S = diag(scale)``, default ``I``), raising ``λ``
    (×10 from at least ``floor``, then 1e-3 of the largest diagonal) until ``M + λS`` is
    positive definite. Returns ``d`` and the ``λ`` used."""
    diagonal = torch.ones_like(g) if scale is None else scale
    for _ in range(60):
        factor, info = torch.linalg.cholesky_ex(matrix + damping * torch.diag(diagonal))
        if int(info) == 0:
            return -torch.cholesky_solve(g.unsqueeze(1), factor).squeeze(1), damping
        largest = float(matrix.diagonal().abs().max())
        damping = max(10 * damping, floor, 1e-3 * largest, 1e-12)
    raise ValueError("the damped curvature matrix stays indefinite: the loss has non-finite values")


# ---------------------------------------------------------------------- least squares


@dataclasses.dataclass(frozen=True)
class ResidualLoss(DifferentiableLoss):
    """A least-squares loss ``½‖r(θ)‖²`` from ``residual_fn(params) -> r`` (any shape): a
    :class:`~l2o.optim.base.LossFn` that also gives the residuals and their Jacobian, what
    :class:`LevenbergMarquardt` needs. ``torch.func`` differentiates it, so it is pure."""

    residual_fn: Callable[[Params], Tensor]
    known_loss: Tensor | None = None

    def __call__(self, params: Params) -> Tensor:
        r = self.residual_fn(params).reshape(-1)
        return 0.5 * r.dot(r)

    def residuals_and_jacobian(self, params: Params) -> tuple[Tensor, Tensor]:
        """``r`` flattened to ``[m]`` and ``J = ∂r/∂θ`` as ``[m, n]`` (flat key order)."""
        x = flatten(params, "params", "LevenbergMarquardt")

        def residuals(flat: Tensor) -> Tensor:
            return self.residual_fn(unflatten(flat, params)).reshape(-1)

        return residuals(x), torch.func.jacrev(residuals)(x)


@dataclasses.dataclass(frozen=True)
class LevenbergMarquardt(_DampedRule):
    """Levenberg–Marquardt (module docstring); ``loss_fn`` must give residuals
    (:class:`ResidualLoss`; the ``torch.optim`` class's closure returns them).

    Args:
        damping: the initial ``λ`` (0 with ``adapt_damping=False``: Gauss–Newton).
        scaling: "marquardt" (``D = diag(JᵀJ)``, invariant to rescaling the parameters) or
            "identity" (Levenberg's ``D = I``).
        damping_increase, damping_decrease, min_damping, max_size, lr: as :class:`Newton`.
    """

    damping: float = 1e-3
    damping_increase: float = 2.0
    damping_decrease: float = 1.0 / 3.0
    min_damping: float = 1e-12
    scaling: str = "marquardt"

    METHOD: ClassVar[str] = "LevenbergMarquardt"

    def loss_fn_requirements(self) -> frozenset[str]:
        return frozenset({"residuals_and_jacobian"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {self.scaling!r}")

    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        x, _, loss_fn = self._checked(grads, params, loss_fn)
        if not hasattr(loss_fn, "residuals_and_jacobian"):
            raise TypeError(
                "LevenbergMarquardt needs the residuals, not only the loss: pass "
                "loss_fn=ResidualLoss(residual_fn) (for the torch.optim class, a closure that "
                "returns the residual vector)"
            )
        self._check_size(x.numel())
        r, jacobian = loss_fn.residuals_and_jacobian(params)
        if not (torch.isfinite(r).all() and torch.isfinite(jacobian).all()):
            raise ValueError("LevenbergMarquardt got non-finite residuals or Jacobian")
        gauss_newton = jacobian.T @ jacobian
        g = jacobian.T @ r  # the gradient of ½‖r‖²
        loss = 0.5 * float(r.dot(r))
        scale = None
        if self.scaling == "marquardt":
            scale = gauss_newton.diagonal().clamp(min=torch.finfo(g.dtype).tiny)
        damping = float(state["damping"])
        d, damping = _damped_solve(gauss_newton, g, damping, self.min_damping, scale)
        lr = float(lr_at(self.lr, step))
        return self._finish(
            state, params, loss, g, lr * d, lr * (gauss_newton @ d), damping, loss_fn
        )


# ---------------------------------------------------------------------- torch.optim classes


class NewtonOptimizer(OneGroupOptimizer):
    """:class:`Newton` as a ``torch.optim`` optimizer. ``step(closure)``: the closure zeroes the
    gradients, computes the loss, calls ``backward`` and returns the loss; with
    ``loss.backward(create_graph=True)`` the Hessian-vector products are exact (one closure
    call each), with a plain ``backward()`` they are central differences (two calls each)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: LearningRate = 1.0,
        damping: float = 1.0,
        adapt_damping: bool = True,
        damping_increase: float = 1.5,
        damping_decrease: float = 2.0 / 3.0,
        min_damping: float = 1e-8,
        max_size: int = 10_000,
        solver: str = "cg",
        cg_max_iter: int | None = None,
        cg_tolerance: float | None = None,
    ) -> None:
        rule = Newton(
            lr,
            damping,
            adapt_damping,
            damping_increase,
            damping_decrease,
            min_damping,
            max_size,
            solver,
            cg_max_iter,
            cg_tolerance,
        )
        super().__init__(params, rule)


class LevenbergMarquardtOptimizer(OneGroupOptimizer):
    """:class:`LevenbergMarquardt` as a ``torch.optim`` optimizer.

    ``step(closure)`` takes a closure that returns the **residual vector** ``r(θ)`` (a tensor
    computed from the parameters, with its graph; it need not call ``backward``): the optimizer
    minimises ``½‖r‖²``, builds the Jacobian from it, and returns that loss.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: LearningRate = 1.0,
        damping: float = 1e-3,
        adapt_damping: bool = True,
        damping_increase: float = 2.0,
        damping_decrease: float = 1.0 / 3.0,
        min_damping: float = 1e-12,
        max_size: int = 10_000,
        scaling: str = "marquardt",
    ) -> None:
        rule = LevenbergMarquardt(
            lr,
            damping,
            adapt_damping,
            damping_increase,
            damping_decrease,
            min_damping,
            max_size,
            scaling,
        )
        super().__init__(params, rule)
        self._residual_closure: Callable[[], Tensor] | None = None

    def step(self, closure: Callable[[], Tensor] | None = None) -> Any:
        if closure is None:
            return super().step(None)  # the clear "needs a closure" error
        self._residual_closure = closure
        try:
            return super().step(lambda: _half_squared_norm(closure, self))
        finally:
            self._residual_closure = None

    def _loss_fn(
        self, closure: Callable[[], Any], live: Params, known_loss: Tensor | None
    ) -> _ClosureResiduals:
        return _ClosureResiduals(self._residual_closure, live, known_loss, closure)


def _half_squared_norm(closure: Callable[[], Tensor], optimizer: torch.optim.Optimizer) -> Tensor:
    optimizer.zero_grad()
    r = _residual_vector(closure())
    loss = 0.5 * r.dot(r)
    loss.backward()
    return loss


def _residual_vector(r: Any) -> Tensor:
    if not isinstance(r, Tensor) or not r.is_floating_point():
        raise TypeError(
            "the LevenbergMarquardt closure must return the residuals as a floating-point "
            f"tensor (r(θ), computed from the parameters), got {r!r}"
        )
    return r.reshape(-1)


class _ClosureResiduals(ClosureLoss):
    """The loss a :class:`LevenbergMarquardtOptimizer` hands its rule: ``½‖r‖²`` through the
    scalar closure, and residuals with their Jacobian through the user's residual closure."""

    def __init__(
        self,
        residual_closure: Callable[[], Tensor],
        params: Mapping[str, Tensor],
        known_loss: Tensor | None,
        scalar_closure: Callable[[], Any],
    ) -> None:
        super().__init__(scalar_closure, dict(params), loss=known_loss)
        self.residual_closure = residual_closure

    def residuals_and_jacobian(self, values: Params) -> tuple[Tensor, Tensor]:
        self.load(values)
        params = list(self.params.values())
        with torch.enable_grad():
            r = _residual_vector(self.residual_closure())
            eye = torch.eye(r.numel(), dtype=r.dtype, device=r.device)
            rows = torch.autograd.grad(
                r, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True
            )
        jacobian = torch.cat(
            [
                torch.zeros(r.numel(), p.numel(), dtype=r.dtype, device=r.device)
                if row is None
                else row.reshape(r.numel(), -1)
                for p, row in zip(params, rows)
            ],
            dim=1,
        )
        return r.detach(), jacobian


registry.register("newton_cg", Newton, NewtonOptimizer)
registry.register("newton", Newton, NewtonOptimizer, solver="dense")
registry.register("levenberg_marquardt", LevenbergMarquardt, LevenbergMarquardtOptimizer)
registry.register(
    "gauss_newton",
    LevenbergMarquardt,
    LevenbergMarquardtOptimizer,
    damping=0.0,
    adapt_damping=False,
)
