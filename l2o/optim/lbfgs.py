"""L-BFGS with an optional strong-Wolfe line search, as an update rule.

One :meth:`LBFGS.update` does what one ``torch.optim.LBFGS.step(closure)`` does: up to
``max_iter`` quasi-Newton iterations from the current parameters, each along the direction
``d = -H g`` given by the two-loop recursion over the last ``history_size`` curvature pairs
``(s, y)`` (Nocedal & Wright, *Numerical Optimization*, 2nd ed., Alg. 7.4), with
``H_0 = (s·y / y·y) I`` from the newest pair (eq. 7.20). The step length is ``lr`` (the first
iteration ever uses ``min(1, 1/|g|_1) * lr``), or, with ``line_search_fn="strong_wolfe"``,
the point a bracketing-and-zoom search returns that satisfies the strong Wolfe conditions

    f(x + t d) <= f(x) + c1 t g·d,        |∇f(x + t d)·d| <= c2 |g·d|,

(N&W Alg. 3.5 and 3.6, with c1 = 1e-4, c2 = 0.9, trial steps from cubic interpolation of the
two bracketing points' values and slopes, eq. 3.59, and the safeguards of Schmidt's minFunc
that ``torch.optim.LBFGS`` also uses). Termination tests, evaluation budget and the curvature
threshold ``s·y > 1e-10`` follow ``torch.optim.LBFGS`` so the two agree iteration by iteration.

The parameter dict is one flat vector in key order (complex tensors as their real and imaginary
parts), as ``torch.optim.LBFGS`` flattens its parameter list. The state is tensors only:
fixed-size ``(history_size, n)`` buffers with a count, so it checkpoints with ``weights_only``
loading and moves between devices. The search branches on loss values, so this rule is not
vmappable; it is still out of place on its inputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector

from l2o.optim import registry
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
from l2o.validation import positive_int

__all__ = ["LBFGS", "LBFGSOptimizer", "strong_wolfe"]

# Sufficient-decrease and curvature constants of the strong Wolfe conditions (N&W §3.1).
WOLFE_C1 = 1e-4
WOLFE_C2 = 0.9
# A curvature pair is stored only if s·y exceeds this, which keeps H positive definite.
CURVATURE_EPS = 1e-10

LINE_SEARCHES = (None, "strong_wolfe")


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
        if self.line_search_fn not in LINE_SEARCHES:
            raise ValueError(
                f"line_search_fn must be None or 'strong_wolfe', got {self.line_search_fn!r}"
            )

    @property
    def eval_budget(self) -> int:
        """Loss-and-gradient evaluations allowed per ``update`` (``max_eval`` resolved)."""
        return self.max_iter * 5 // 4 if self.max_eval is None else self.max_eval

    # ------------------------------------------------------------------ state

    def init(self, params: Params) -> State:
        flat = _flatten(params, "params")
        n, m = flat.numel(), self.history_size
        # Scalars in the parameters' (real) dtype: torch.optim's load_state_dict casts every
        # floating state tensor to it, so a checkpoint then restores them bit for bit.
        scalar = dict(dtype=flat.dtype, device=flat.device)
        count = dict(dtype=torch.int64, device=flat.device)
        return {
            "old_dirs": flat.new_zeros(m, n),  # y_i = g_{i+1} - g_i, oldest first
            "old_stps": flat.new_zeros(m, n),  # s_i = t_i d_i
            "ro": flat.new_zeros(m),  # 1 / (y_i · s_i)
            "history_len": torch.zeros((), **count),
            "d": flat.new_zeros(n),
            "t": torch.zeros((), **scalar),
            "H_diag": torch.ones((), **scalar),
            "prev_flat_grad": flat.new_zeros(n),
            "prev_loss": torch.zeros((), **scalar),
            "n_iter": torch.zeros((), **count),
            "func_evals": torch.zeros((), **count),
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
        if loss_fn is None:
            raise ValueError(
                "LBFGS needs the loss: pass loss_fn=... to update() "
                "(for the torch.optim class, call step(closure))"
            )
        lr = float(lr_at(self.lr, step))
        x0 = _flatten(params, "params")
        g = _flatten(grads, "grads", like=params)
        if g.shape != x0.shape:
            raise ValueError(f"grads have {g.numel()} elements but params have {x0.numel()}")
        if state["d"].shape != x0.shape:
            raise ValueError(
                f"the L-BFGS state was made for {state['d'].numel()} parameter elements but "
                f"params have {x0.numel()}: L-BFGS needs the same parameters (all with "
                "gradients) at every update; start a new state with init() if they changed"
            )
        loss_fn = as_loss_fn(loss_fn)
        loss = _initial_loss(loss_fn, params)
        if not (math.isfinite(loss) and torch.isfinite(g).all()):
            raise ValueError(
                f"L-BFGS got a non-finite loss ({loss}) or gradient at the current parameters; "
                "check the model and data (a lower lr or line_search_fn='strong_wolfe' helps "
                "if an earlier step diverged)"
            )

        def evaluate(x: Params) -> tuple[float, Tensor]:
            value, grad = loss_fn.value_and_grad(x)
            return float(value), _flatten(grad, "loss_fn gradients", like=params)

        h = _History.from_state(state)
        d, t = state["d"], float(state["t"])
        H_diag = state["H_diag"]
        prev_g, prev_loss = state["prev_flat_grad"], float(state["prev_loss"])
        n_iter = int(state["n_iter"])
        func_evals = int(state["func_evals"]) + 1
        evals = 1  # the evaluation that produced `grads`

        x = params
        if g.abs().max() > self.tolerance_grad:
            for inner in range(1, self.max_iter + 1):
                n_iter += 1
                if n_iter == 1:
                    d, H_diag = -g, torch.ones_like(H_diag)
                else:
                    y, s = g - prev_g, d * t
                    ys = y.dot(s)
                    if ys > CURVATURE_EPS:
                        h.push(y, s, 1.0 / ys)
                        H_diag = (ys / y.dot(y)).to(H_diag.dtype)
                    d = h.two_loop(-g, H_diag)
                prev_g, prev_loss = g, loss

                t = (min(1.0, 1.0 / g.abs().sum().item()) if n_iter == 1 else 1.0) * lr
                gtd = g.dot(d).item()
                if gtd > -self.tolerance_change:
                    break  # not a descent direction (to tolerance)

                if self.line_search_fn == "strong_wolfe":
                    loss, g, t, used = strong_wolfe(
                        _along(evaluate, x, d),
                        t,
                        d,
                        loss,
                        g,
                        gtd,
                        tolerance_change=self.tolerance_change,
                        max_evals=self.eval_budget - evals,
                    )
                    x = _moved(x, d, t)
                elif inner < self.max_iter:
                    x = _moved(x, d, t)
                    loss, g = evaluate(x)
                    used = 1
                    if not math.isfinite(loss):
                        raise ValueError(
                            f"L-BFGS with a fixed step (lr={lr}) reached a non-finite loss "
                            f"({loss}); lower lr or use line_search_fn='strong_wolfe'"
                        )
                else:
                    # Last iteration without a search: no evaluation, as torch (the next
                    # update's gradient comes fresh from the caller anyway).
                    x = _moved(x, d, t)
                    used = 0
                evals += used
                func_evals += used

                if inner == self.max_iter or evals >= self.eval_budget:
                    break
                if g.abs().max() <= self.tolerance_grad:
                    break  # first-order optimal
                if (d * t).abs().max() <= self.tolerance_change:
                    break  # parameters stopped moving
                if abs(loss - prev_loss) < self.tolerance_change:
                    break  # loss stopped moving

        scalar = dict(dtype=x0.dtype, device=x0.device)
        count = dict(dtype=torch.int64, device=x0.device)
        new_state = {
            **h.to_state(state),
            "d": d,
            "t": torch.tensor(float(t), **scalar),
            "H_diag": H_diag.to(**scalar),
            "prev_flat_grad": prev_g,
            "prev_loss": torch.tensor(prev_loss, **scalar),
            "n_iter": torch.tensor(n_iter, **count),
            "func_evals": torch.tensor(func_evals, **count),
        }
        # The caller's params + updates can miss x by an ulp where x has a finer ulp than x0
        # (no additive update reaches it); torch.optim.LBFGS, adding in place, lands on x. This
        # final rounding is the only arithmetic in which the two differ.
        return {k: x[k] - params[k] for k in params}, new_state


# ---------------------------------------------------------------------- strong-Wolfe search


@dataclasses.dataclass
class _Trial:
    """A point on the search line: step ``t``, loss ``f``, gradient ``g``, slope ``gtd = g·d``."""

    t: float
    f: float
    g: Tensor
    gtd: float


def strong_wolfe(
    evaluate: Callable[[float], tuple[float, Tensor]],
    t: float,
    d: Tensor,
    f0: float,
    g0: Tensor,
    gtd0: float,
    *,
    c1: float = WOLFE_C1,
    c2: float = WOLFE_C2,
    tolerance_change: float = 1e-9,
    max_evals: int = 25,
) -> tuple[float, Tensor, float, int]:
    """Search ``x + t d`` for a step satisfying the strong Wolfe conditions.

    ``evaluate(t) -> (loss, flat_grad)`` at ``x + t d``; ``f0, g0, gtd0`` are the loss,
    gradient and slope at ``t = 0`` (``gtd0 < 0``); ``t`` is the first trial step. Returns
    ``(loss, flat_grad, t, evaluations)`` at the accepted step, or at the lowest point found
    when ``max_evals`` runs out or the bracket shrinks below ``tolerance_change`` (measured
    in parameter space, ``|Δt| max|d|``).

    Phase 1 (N&W Alg. 3.5) grows the step by cubic extrapolation until it brackets an
    acceptable point; phase 2 (Alg. 3.6, *zoom*) shrinks the bracket by cubic interpolation,
    moving a trial that lands within 10% of an end back to 10% inside when the previous trial
    also did (or it fell outside), so that the bracket keeps shrinking.
    """
    d_scale = d.abs().max().item()
    start = _Trial(0.0, f0, g0, gtd0)

    def trial(step_len: float) -> _Trial:
        f, g = evaluate(step_len)
        return _Trial(step_len, f, g, g.dot(d).item())

    def sufficient_decrease(p: _Trial) -> bool:
        return p.f <= f0 + c1 * p.t * gtd0

    def curvature_ok(p: _Trial) -> bool:
        return abs(p.gtd) <= -c2 * gtd0

    # Phase 1: bracket. prev and cur are the last two trials, prev.t < cur.t.
    prev, cur = start, trial(t)
    evals = 1
    bracket: list[_Trial] | None = None
    while evals - 1 < max_evals:
        if not sufficient_decrease(cur) or (evals > 2 and cur.f >= prev.f):
            bracket = [prev, cur]
            break
        if curvature_ok(cur):
            return cur.f, cur.g, cur.t, evals
        if cur.gtd >= 0:  # slope turned: a minimiser lies between prev and cur
            bracket = [prev, cur]
            break
        # Still descending: extrapolate, at least 1% past cur and at most 10x cur.
        low, high = cur.t + 0.01 * (cur.t - prev.t), cur.t * 10.0
        nxt = _cubic_minimizer(prev, cur, low, high)
        prev, cur = cur, trial(nxt)
        evals += 1
    if bracket is None:
        # Out of evaluations while still descending: return the better of start and last.
        best = cur if cur.f < f0 else start
        return best.f, best.g, best.t, evals

    # Phase 2: zoom. `lo` has the lowest loss of the two ends, `hi` the other.
    lo, hi = _order(bracket)
    near_end_last_time = False
    while evals - 1 < max_evals:
        a, b = bracket
        if abs(b.t - a.t) * d_scale < tolerance_change:
            break
        left, right = min(a.t, b.t), max(a.t, b.t)
        t_new = _cubic_minimizer(a, b, left, right)
        margin = 0.1 * (right - left)
        if min(right - t_new, t_new - left) < margin:
            if near_end_last_time or t_new >= right or t_new <= left:
                t_new = right - margin if abs(t_new - right) < abs(t_new - left) else left + margin
                near_end_last_time = False
            else:
                near_end_last_time = True
        else:
            near_end_last_time = False

        new = trial(t_new)
        evals += 1
        if not sufficient_decrease(new) or new.f >= bracket[lo].f:
            bracket[hi] = new
            lo, hi = _order(bracket)
            continue
        if curvature_ok(new):
            bracket[lo] = new
            break
        if new.gtd * (bracket[hi].t - bracket[lo].t) >= 0:
            bracket[hi] = bracket[lo]
        bracket[lo] = new

    best = bracket[lo]
    return best.f, best.g, best.t, evals


def _order(bracket: list[_Trial]) -> tuple[int, int]:
    """Indices (lower, higher) of the bracket's ends by loss; a NaN loss counts as highest."""
    a, b = bracket
    return (0, 1) if a.f <= b.f or math.isnan(b.f) else (1, 0)


def _cubic_minimizer(a: _Trial, b: _Trial, low: float, high: float) -> float:
    """Minimiser of the cubic through two points' values and slopes, clipped to [low, high].

    N&W eq. 3.59, written from the right-hand point; the midpoint of ``[low, high]`` when the
    cubic has no local minimiser.
    """
    if a.t > b.t:
        a, b = b, a
    d1 = a.gtd + b.gtd - 3.0 * (a.f - b.f) / (a.t - b.t)
    disc = d1 * d1 - a.gtd * b.gtd
    if disc < 0 or math.isnan(disc):
        return (low + high) / 2.0
    d2 = math.sqrt(disc)
    t = b.t - (b.t - a.t) * ((b.gtd + d2 - d1) / (b.gtd - a.gtd + 2.0 * d2))
    return min(max(t, low), high)


# ---------------------------------------------------------------------- history


class _History:
    """The curvature pairs as Python lists for one update; fixed-size buffers in the state."""

    def __init__(self, ys: list[Tensor], ss: list[Tensor], rhos: list[Tensor], size: int):
        self.ys, self.ss, self.rhos, self.size = ys, ss, rhos, size

    @classmethod
    def from_state(cls, state: State) -> _History:
        k = int(state["history_len"])
        dirs, stps, ro = state["old_dirs"], state["old_stps"], state["ro"]
        return cls(list(dirs[:k]), list(stps[:k]), list(ro[:k]), dirs.shape[0])

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

    def to_state(self, state: State) -> State:
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
        }


# ---------------------------------------------------------------------- flat vectors


def _flatten(tree: Params, what: str, like: Params | None = None) -> Tensor:
    """Concatenate a dict of tensors in key order (``like``'s order, zeros for missing)."""
    keys = list(like if like is not None else tree)
    if not keys:
        raise ValueError(f"{what} is empty: L-BFGS needs at least one parameter")
    pieces = []
    for k in keys:
        v = tree.get(k)
        if v is None:
            v = torch.zeros_like(like[k])
        if v.is_sparse:
            raise ValueError(f"L-BFGS does not support sparse tensors ({what}[{k!r}])")
        if v.is_complex():
            v = torch.view_as_real(v)
        pieces.append(v)
    dtypes = {p.dtype for p in pieces}
    if len(dtypes) > 1:
        raise ValueError(f"L-BFGS needs one dtype for all parameters; {what} has {dtypes}")
    return parameters_to_vector(pieces)


def _moved(x: Params, d: Tensor, t: float) -> Params:
    """``x + t d`` with ``d`` flat, tensor by tensor (complex ones through their real view).

    Per tensor, like ``torch.optim.LBFGS``, so the fused multiply-adds round identically.
    """
    out, offset = {}, 0
    for k, p in x.items():
        real = torch.view_as_real(p) if p.is_complex() else p
        n = real.numel()
        moved = torch.add(real, d[offset : offset + n].reshape(real.shape), alpha=t)
        out[k] = torch.view_as_complex(moved) if p.is_complex() else moved
        offset += n
    return out


def _along(
    evaluate: Callable[[Params], tuple[float, Tensor]], x: Params, d: Tensor
) -> Callable[[float], tuple[float, Tensor]]:
    return lambda step_len: evaluate(_moved(x, d, step_len))


def _initial_loss(loss_fn: LossFn, params: Params) -> float:
    if loss_fn.known_loss is not None:
        return float(loss_fn.known_loss)
    with torch.no_grad():
        return float(loss_fn(params))


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
