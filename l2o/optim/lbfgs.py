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
from l2o.optim.base import LearningRate, State
from l2o.optim.line_search import (
    CURVATURE_EPS,
    LineSearchRule,
    OneGroupOptimizer,
    Progress,
    strong_wolfe,
)
from l2o.validation import positive_int

__all__ = ["LBFGS", "LBFGSOptimizer", "strong_wolfe"]


@dataclasses.dataclass(frozen=True)
class LBFGS(LineSearchRule):
    """L-BFGS; hyper-parameters, defaults and semantics of ``torch.optim.LBFGS``.

    ``max_eval=None`` means ``max_iter * 5 // 4``. ``lr`` may be a schedule of the step (the
    index of the ``update`` call). Memory: ``2 * history_size * n`` elements of history.
    """

    line_search_fn: str | None = None
    history_size: int = 100

    supports_complex: ClassVar[bool] = True
    METHOD: ClassVar[str] = "L-BFGS"

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("history_size", self.history_size)

    def _init_memory(self, flat: Tensor) -> State:
        n, m = flat.numel(), self.history_size
        return {
            "old_dirs": flat.new_zeros(m, n),  # y_i = g_{i+1} - g_i, oldest first
            "old_stps": flat.new_zeros(m, n),  # s_i = t_i d_i
            "ro": flat.new_zeros(m),  # 1 / (y_i · s_i)
            "history_len": torch.zeros((), dtype=torch.int64, device=flat.device),
            "H_diag": torch.ones((), dtype=flat.dtype, device=flat.device),
        }

    def _directions(self, state: State, flat: Tensor, lr: float) -> _History:
        return _History.from_state(state, lr)


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
        return line_search.quasi_newton_first_step(n_iter, g, self.lr)

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

    def to_state(self, like: Tensor) -> State:
        def pack(rows: list[Tensor], width: int | None) -> Tensor:
            shape = (self.size,) if width is None else (self.size, width)
            buffer = like.new_zeros(shape)
            if rows:
                buffer[: len(rows)] = torch.stack(rows)
            return buffer

        n = like.numel()
        return {
            "old_dirs": pack(self.ys, n),
            "old_stps": pack(self.ss, n),
            "ro": pack(self.rhos, None),
            "history_len": torch.tensor(len(self.ys), dtype=torch.int64, device=like.device),
            "H_diag": self.H_diag.to(dtype=like.dtype, device=like.device),
        }


# ---------------------------------------------------------------------- torch.optim class


class LBFGSOptimizer(OneGroupOptimizer):
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
            line_search_fn=line_search_fn,
            history_size=history_size,
        )
        super().__init__(params, rule)


registry.register("lbfgs", LBFGS, LBFGSOptimizer)
