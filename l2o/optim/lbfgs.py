"""L-BFGS with an optional strong-Wolfe line search, as an update rule.

One :meth:`LBFGS.update` does what one ``torch.optim.LBFGS.step(closure)`` does: up to
``max_iter`` quasi-Newton iterations from the current parameters (the loop of
:mod:`l2o.optim.line_search`, shared with BFGS and nonlinear CG), each along the direction
``d = -H g`` given by the two-loop recursion over the last ``history_size`` curvature pairs
``(s, y)`` (Nocedal & Wright, *Numerical Optimization*, 2nd ed., Alg. 7.4), with
``H_0 = (s·y / y·y) I`` from the newest pair (eq. 7.20). The step length is ``lr`` (the first
iteration ever uses ``min(1, 1/|g|_1) * lr``), or, with ``line_search_fn="strong_wolfe"``,
the point :func:`~l2o.optim.line_search.strong_wolfe` returns (c1 = 1e-4, c2 = 0.9).
Termination tests, evaluation budget and the curvature threshold ``s·y > 1e-10`` follow
``torch.optim.LBFGS`` so the two agree iteration by iteration.

The state is tensors only: fixed-size ``(history_size, n)`` buffers with a count, so it
checkpoints with ``weights_only`` loading and moves between devices. The search branches on
loss values, so this rule is not vmappable; it is still out of place on its inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from l2o.optim import line_search, registry
from l2o.optim.adapter import RuleOptimizer
from l2o.optim.base import (
    LearningRate,
    LossFn,
    Params,
    State,
    Step,
    UpdateRule,
    as_loss_fn,
    check_hyperparameter,
    lr_at,
)
from l2o.optim.line_search import CURVATURE_EPS, Budget, Progress, strong_wolfe
from l2o.validation import positive_int

__all__ = ["LBFGS", "LBFGSOptimizer", "strong_wolfe"]


@dataclasses.dataclass(frozen=True)
class LBFGS(UpdateRule):
    """L-BFGS; hyper-parameters, defaults and semantics of ``torch.optim.LBFGS``.

    ``max_eval=None`` means ``max_iter * 5 // 4``. ``lr`` may be a schedule of the step (the
    index of the ``update`` call). Memory: ``2 * history_size * n`` elements of history.
    """

    lr: LearningRate = 1.0
    max_iter: int = 20
    max_eval: int | None = None
    tolerance_grad: float = 1e-7
    tolerance_change: float = 1e-9
    history_size: int = 100
    line_search_fn: str | None = None

    needs_loss_fn: ClassVar[bool] = True
    supports_complex: ClassVar[bool] = True
    vmappable: ClassVar[bool] = False
    #: The history is one flat vector over all parameters: nothing is per-parameter.
    PARAMETER_SLOTS: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        check_hyperparameter("lr", self.lr)
        positive_int("max_iter", self.max_iter)
        if self.max_eval is not None:
            positive_int("max_eval", self.max_eval)
        check_hyperparameter("tolerance_grad", self.tolerance_grad)
        check_hyperparameter("tolerance_change", self.tolerance_change)
        positive_int("history_size", self.history_size)
        line_search.check_line_search(self.line_search_fn)

    @property
    def eval_budget(self) -> int:
        """Loss-and-gradient evaluations allowed per ``update`` (``max_eval`` resolved)."""
        return self.max_iter * 5 // 4 if self.max_eval is None else self.max_eval

    # ------------------------------------------------------------------ state

    def init(self, params: Params) -> State:
        flat = line_search.flatten(params, "params", "L-BFGS")
        n, m = flat.numel(), self.history_size
        return {
            "old_dirs": flat.new_zeros(m, n),  # y_i = g_{i+1} - g_i, oldest first
            "old_stps": flat.new_zeros(m, n),  # s_i = t_i d_i
            "ro": flat.new_zeros(m),  # 1 / (y_i · s_i)
            "history_len": torch.zeros((), dtype=torch.int64, device=flat.device),
            "H_diag": torch.ones((), dtype=flat.dtype, device=flat.device),
            **Progress.initial_state(flat),
        }

    # ------------------------------------------------------------------ update

    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        """Run up to ``max_iter`` L-BFGS iterations from ``params``; ``grads`` are at ``params``.

        Evaluates ``loss_fn`` (a :class:`~l2o.optim.base.LossFn` or a plain function) once at
        ``params`` for the starting loss (unless it carries a
        ``loss`` attribute with that value) and through
        :func:`l2o.optim.base.value_and_grad` at every trial point.
        """
        lr = float(lr_at(self.lr, step))
        x0, g, loss, evaluate = line_search.start(
            "L-BFGS", grads, params, state, None if loss_fn is None else as_loss_fn(loss_fn)
        )
        history = _History.from_state(state, lr)
        budget = Budget(
            self.max_iter,
            self.eval_budget,
            self.tolerance_grad,
            self.tolerance_change,
            self.line_search_fn,
        )
        x, progress = line_search.iterate(
            "L-BFGS", history, evaluate, params, loss, g, Progress.from_state(state), budget, lr
        )
        new_state = {**history.to_state(state, x0), **progress.to_state(x0)}
        # The caller's params + updates can miss x by an ulp where x has a finer ulp than x0
        # (no additive update reaches it); torch.optim.LBFGS, adding in place, lands on x. This
        # final rounding is the only arithmetic in which the two differ.
        return {k: x[k] - params[k] for k in params}, new_state


# ---------------------------------------------------------------------- history


class _History:
    """L-BFGS's :class:`~l2o.optim.line_search.Directions`: the curvature pairs as Python lists
    for one update, fixed-size buffers in the state."""

    def __init__(
        self,
        ys: list[Tensor],
        ss: list[Tensor],
        rhos: list[Tensor],
        size: int,
        H_diag: Tensor,
        lr: float,
    ):
        self.ys, self.ss, self.rhos, self.size = ys, ss, rhos, size
        self.H_diag, self.lr = H_diag, lr

    @classmethod
    def from_state(cls, state: State, lr: float) -> _History:
        k = int(state["history_len"])
        dirs, stps, ro = state["old_dirs"], state["old_stps"], state["ro"]
        return cls(list(dirs[:k]), list(stps[:k]), list(ro[:k]), dirs.shape[0], state["H_diag"], lr)

    def first(self, g: Tensor) -> Tensor:
        self.H_diag = torch.ones_like(self.H_diag)
        return -g

    def next(self, g: Tensor, prev_g: Tensor, s: Tensor, prev_d: Tensor) -> Tensor:
        y = g - prev_g
        ys = y.dot(s)
        if ys > CURVATURE_EPS:
            self.push(y, s, 1.0 / ys)
            self.H_diag = (ys / y.dot(y)).to(self.H_diag.dtype)
        return self.two_loop(-g, self.H_diag)

    def first_step(self, n_iter: int, g: Tensor, gtd: float, progress: Progress) -> float:
        # torch.optim.LBFGS: a first step of at most 1/|g|_1, then the unit (lr) step.
        return (min(1.0, 1.0 / g.abs().sum().item()) if n_iter == 1 else 1.0) * self.lr

    def push(self, y: Tensor, s: Tensor, rho: Tensor) -> None:
        if len(self.ys) == self.size:
            del self.ys[0], self.ss[0], self.rhos[0]
        self.ys.append(y)
        self.ss.append(s)
        self.rhos.append(rho)

    def two_loop(self, q: Tensor, H_diag: Tensor) -> Tensor:
        """``H q`` for the L-BFGS inverse-Hessian approximation (N&W Alg. 7.4)."""
        alphas = []
        for y, s, rho in zip(reversed(self.ys), reversed(self.ss), reversed(self.rhos)):
            alpha = s.dot(q) * rho
            q = torch.add(q, y, alpha=-alpha.item())
            alphas.append(alpha)
        r = q * H_diag.to(q.dtype)
        for y, s, rho, alpha in zip(self.ys, self.ss, self.rhos, reversed(alphas)):
            beta = y.dot(r) * rho
            r = torch.add(r, s, alpha=(alpha - beta).item())
        return r

    def to_state(self, state: State, like: Tensor) -> State:
        def pack(rows: list[Tensor], buffer: Tensor) -> Tensor:
            if not rows:
                return torch.zeros_like(buffer)
            filled = torch.stack(rows)
            return torch.cat([filled, buffer.new_zeros(self.size - len(rows), *buffer.shape[1:])])

        return {
            "old_dirs": pack(self.ys, state["old_dirs"]),
            "old_stps": pack(self.ss, state["old_stps"]),
            "ro": pack(self.rhos, state["ro"]),
            "history_len": torch.tensor(
                len(self.ys), dtype=torch.int64, device=state["history_len"].device
            ),
            "H_diag": self.H_diag.to(dtype=like.dtype, device=like.device),
        }


# ---------------------------------------------------------------------- torch.optim class


class LBFGSOptimizer(RuleOptimizer):
    """``torch.optim.LBFGS`` on the :class:`LBFGS` rule: same signature, defaults and steps.

    ``step(closure)`` needs a closure that zeroes the gradients, computes the loss, calls
    ``loss.backward()`` and returns the loss; it is called once at the current parameters and
    once per trial point. As ``torch.optim.LBFGS``, one param group only (the curvature pairs
    are over all parameters at once), and every parameter should get a gradient at every step.
    ``max_eval=None`` stays ``None`` in the param group and means ``max_iter * 5 // 4``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: LearningRate = 1.0,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = None,
    ) -> None:
        rule = LBFGS(
            lr,
            max_iter,
            max_eval,
            tolerance_grad,
            tolerance_change,
            history_size,
            line_search_fn,
        )
        super().__init__(params, rule)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.param_groups:
            raise ValueError(
                "LBFGS supports a single parameter group (as torch.optim.LBFGS): pass all "
                "parameters in one group, or use one LBFGS optimizer per group"
            )
        super().add_param_group(param_group)


registry.register("lbfgs", LBFGS, LBFGSOptimizer)
