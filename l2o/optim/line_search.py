"""What the line-search methods share: L-BFGS, BFGS and nonlinear conjugate gradients.

Each of them repeats, from the current point ``x`` with loss ``f`` and gradient ``g``:

1. a search direction ``d`` (:class:`Directions`: ``-H g`` for a quasi-Newton inverse-Hessian
   approximation ``H``, ``-g + β d_prev`` for conjugate gradients), built from the previous
   step ``s = t d_prev`` and gradient change ``y = g - g_prev``;
2. a step length ``t``: fixed (``lr``), or the point :func:`strong_wolfe` returns, which
   satisfies the strong Wolfe conditions

       f(x + t d) <= f(x) + c1 t g·d,        |∇f(x + t d)·d| <= c2 |g·d|

   (Nocedal & Wright, *Numerical Optimization*, 2nd ed., Alg. 3.5 and 3.6: bracketing, then a
   zoom by cubic interpolation of the two bracketing points' values and slopes, eq. 3.59, with
   the safeguards of Schmidt's minFunc that ``torch.optim.LBFGS`` also uses);
3. the termination tests and evaluation budget of ``torch.optim.LBFGS`` (so that L-BFGS agrees
   with it iteration by iteration).

:func:`iterate` is that loop, run for up to ``max_iter`` iterations per ``update`` call, as
one ``torch.optim.LBFGS.step(closure)``. The parameters are one flat vector in key order
(complex tensors as their real and imaginary parts), as ``torch.optim.LBFGS`` flattens its
parameter list. The loop branches on loss values, so none of these rules is vmappable.
"""

from __future__ import annotations

import dataclasses
import math
from abc import abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector

from l2o.optim.adapter import RuleOptimizer
from l2o.optim.base import (
    LearningRate,
    LossFn,
    Params,
    State,
    Step,
    UpdateRule,
    check_hyperparameter,
    loss_at_call,
    lr_at,
    required_loss_fn,
)
from l2o.validation import positive_int

# A curvature pair is stored only if s·y exceeds this, which keeps H positive definite.
CURVATURE_EPS = 1e-10

__all__ = ["Directions", "LineSearchRule", "Progress", "iterate", "strong_wolfe"]

# Sufficient-decrease and curvature constants of the strong Wolfe conditions (N&W §3.1).
WOLFE_C1 = 1e-4
WOLFE_C2 = 0.9
LINE_SEARCHES = (None, "strong_wolfe")


def check_line_search(line_search_fn: str | None) -> None:
    if line_search_fn not in LINE_SEARCHES:
        raise ValueError(f"line_search_fn must be None or 'strong_wolfe', got {line_search_fn!r}")


# ---------------------------------------------------------------------- the iteration


class Directions(Protocol):
    """A method's search directions; it keeps its own memory (curvature pairs, ``H``)."""

    def first(self, g: Tensor) -> Tensor:
        """The direction at the method's first iteration ever."""

    def next(self, g: Tensor, prev_g: Tensor, s: Tensor, prev_d: Tensor) -> Tensor:
        """The direction at ``g`` after the step ``s`` from the point whose gradient was
        ``prev_g`` along ``prev_d``."""

    def first_step(self, n_iter: int, g: Tensor, gtd: float, progress: Progress) -> float:
        """The first trial step length along the new direction (before the search)."""

    def to_state(self, like: Tensor) -> State:
        """The memory as state entries (tensors on ``like``'s device)."""


@dataclasses.dataclass
class Progress:
    """What the loop carries from one iteration (and one ``update`` call) to the next."""

    d: Tensor  # the last direction
    t: float  # the last step length
    prev_g: Tensor  # the gradient where the last direction was taken
    prev_loss: float
    gtd: float  # the last direction's slope g·d, for step-length guesses
    n_iter: int  # iterations ever
    func_evals: int  # loss evaluations ever

    @classmethod
    def from_state(cls, state: State) -> Progress:
        return cls(
            d=state["d"],
            t=float(state["t"]),
            prev_g=state["prev_flat_grad"],
            prev_loss=float(state["prev_loss"]),
            gtd=float(state["gtd"]) if "gtd" in state else 0.0,
            n_iter=int(state["n_iter"]),
            func_evals=int(state["func_evals"]),
        )

    @staticmethod
    def initial_state(flat: Tensor) -> State:
        n = flat.numel()
        scalar = dict(dtype=flat.dtype, device=flat.device)
        count = dict(dtype=torch.int64, device=flat.device)
        return {
            "d": flat.new_zeros(n),
            "t": torch.zeros((), **scalar),
            "prev_flat_grad": flat.new_zeros(n),
            "prev_loss": torch.zeros((), **scalar),
            "gtd": torch.zeros((), **scalar),
            "n_iter": torch.zeros((), **count),
            "func_evals": torch.zeros((), **count),
        }

    def to_state(self, like: Tensor) -> State:
        # Scalars in the parameters' (real) dtype: torch.optim's load_state_dict casts every
        # floating state tensor to it, so a checkpoint then restores them bit for bit.
        scalar = dict(dtype=like.dtype, device=like.device)
        count = dict(dtype=torch.int64, device=like.device)
        return {
            "d": self.d,
            "t": torch.tensor(float(self.t), **scalar),
            "prev_flat_grad": self.prev_g,
            "prev_loss": torch.tensor(self.prev_loss, **scalar),
            "gtd": torch.tensor(self.gtd, **scalar),
            "n_iter": torch.tensor(self.n_iter, **count),
            "func_evals": torch.tensor(self.func_evals, **count),
        }


@dataclasses.dataclass(frozen=True)
class Budget:
    """The loop's limits (``torch.optim.LBFGS``'s names and meanings)."""

    max_iter: int
    max_eval: int
    tolerance_grad: float
    tolerance_change: float
    line_search_fn: str | None
    c2: float = WOLFE_C2


def start(
    method: str, grads: Params, params: Params, state: State, loss_fn: LossFn | None
) -> tuple[Tensor, Tensor, float, Callable[[Params], tuple[float, Tensor]]]:
    """Check the inputs of a line-search method's ``update`` and return the flat parameters,
    flat gradient, loss at ``params`` and an evaluator ``x -> (loss, flat gradient)``."""
    loss_fn = required_loss_fn(method, loss_fn)
    x0 = flatten(params, "params", method)
    g = flatten(grads, "grads", method, like=params)
    if g.shape != x0.shape:
        raise ValueError(f"grads have {g.numel()} elements but params have {x0.numel()}")
    if state["d"].shape != x0.shape:
        raise ValueError(
            f"the {method} state was made for {state['d'].numel()} parameter elements but "
            f"params have {x0.numel()}: {method} needs the same parameters (all with "
            "gradients) at every update; start a new state with init() if they changed"
        )
    loss = initial_loss(loss_fn, params)
    if not (math.isfinite(loss) and torch.isfinite(g).all()):
        raise ValueError(
            f"{method} got a non-finite loss ({loss}) or gradient at the current parameters; "
            "check the model and data (a lower lr or line_search_fn='strong_wolfe' helps "
            "if an earlier step diverged)"
        )

    def evaluate(x: Params) -> tuple[float, Tensor]:
        value, grad = loss_fn.value_and_grad(x)
        return float(value), flatten(grad, "loss_fn gradients", method, like=params)

    return x0, g, loss, evaluate


def iterate(
    method: str,
    directions: Directions,
    evaluate: Callable[[Params], tuple[float, Tensor]],
    x: Params,
    loss: float,
    g: Tensor,
    progress: Progress,
    budget: Budget,
    lr: float,
) -> tuple[Params, Progress]:
    """Up to ``budget.max_iter`` iterations from ``x`` (loss ``loss``, flat gradient ``g``).

    Returns the new point and the progress to store; ``evaluate`` is called at trial points.
    """
    p = progress
    p.func_evals += 1
    evals = 1  # the evaluation that produced `g`
    if g.abs().max() <= budget.tolerance_grad:
        return x, p
    for inner in range(1, budget.max_iter + 1):
        p.n_iter += 1
        first = p.n_iter == 1
        d = directions.first(g) if first else directions.next(g, p.prev_g, p.d * p.t, p.d)
        p.prev_g, p.prev_loss = g, loss
        gtd = g.dot(d).item()
        t = directions.first_step(p.n_iter, g, gtd, p)
        p.d, p.t, p.gtd = d, t, gtd
        if gtd > -budget.tolerance_change:
            break  # not a descent direction (to tolerance)

        if budget.line_search_fn == "strong_wolfe":
            loss, g, t, used = strong_wolfe(
                _along(evaluate, x, d),
                t,
                d,
                loss,
                g,
                gtd,
                c2=budget.c2,
                tolerance_change=budget.tolerance_change,
                max_evals=budget.max_eval - evals,
            )
            x = moved(x, d, t)
            p.t = t
        elif inner < budget.max_iter:
            x = moved(x, d, t)
            loss, g = evaluate(x)
            used = 1
            if not math.isfinite(loss):
                raise ValueError(
                    f"{method} with a fixed step (lr={lr}) reached a non-finite loss "
                    f"({loss}); lower lr or use line_search_fn='strong_wolfe'"
                )
        else:
            # Last iteration without a search: no evaluation, as torch (the next update's
            # gradient comes fresh from the caller anyway).
            x = moved(x, d, t)
            used = 0
        evals += used
        p.func_evals += used

        if inner == budget.max_iter or evals >= budget.max_eval:
            break
        if g.abs().max() <= budget.tolerance_grad:
            break  # first-order optimal
        if (d * t).abs().max() <= budget.tolerance_change:
            break  # parameters stopped moving
        if abs(loss - p.prev_loss) < budget.tolerance_change:
            break  # loss stopped moving
    return x, p


def quasi_newton_first_step(n_iter: int, g: Tensor, lr: float) -> float:
    """``torch.optim.LBFGS``'s first trial step: at most ``1/|g|_1`` at the first iteration ever
    (the direction ``-g`` is not yet scaled by any curvature), then the unit step; times ``lr``."""
    return (min(1.0, 1.0 / g.abs().sum().item()) if n_iter == 1 else 1.0) * lr


class OneGroupOptimizer(RuleOptimizer):
    """A :class:`~l2o.optim.adapter.RuleOptimizer` for rules whose state couples all the
    parameters (one flat vector of curvature information, AdaFisher's map of layers): one param
    group only."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.param_groups:
            name = type(self).__name__
            raise ValueError(
                f"{name} supports a single parameter group (as torch.optim.LBFGS): pass all "
                f"parameters in one group, or use one {name} optimizer per group"
            )
        super().add_param_group(param_group)


@dataclasses.dataclass(frozen=True)
class LineSearchRule(UpdateRule):
    """A rule on :func:`iterate` (L-BFGS, BFGS, nonlinear CG): ``torch.optim.LBFGS``'s
    hyper-parameters and an ``update`` that runs the loop; subclasses give their ``METHOD``
    name, their memory's initial state and their :class:`Directions` (which write the memory
    back with ``to_state(like)``)."""

    lr: LearningRate = 1.0
    max_iter: int = 20
    max_eval: int | None = None
    tolerance_grad: float = 1e-7
    tolerance_change: float = 1e-9
    line_search_fn: str | None = "strong_wolfe"

    needs_loss_fn: ClassVar[bool] = True
    vmappable: ClassVar[bool] = False
    PARAMETER_SLOTS: ClassVar[frozenset[str]] = frozenset()
    METHOD: ClassVar[str] = ""
    #: The strong-Wolfe curvature constant c2.
    WOLFE_C2: ClassVar[float] = WOLFE_C2

    def __post_init__(self) -> None:
        check_hyperparameter("lr", self.lr)
        positive_int("max_iter", self.max_iter)
        if self.max_eval is not None:
            positive_int("max_eval", self.max_eval)
        check_hyperparameter("tolerance_grad", self.tolerance_grad)
        check_hyperparameter("tolerance_change", self.tolerance_change)
        check_line_search(self.line_search_fn)

    @property
    def eval_budget(self) -> int:
        """Loss-and-gradient evaluations allowed per ``update`` (``max_eval`` resolved)."""
        return self.max_iter * 5 // 4 if self.max_eval is None else self.max_eval

    def init(self, params: Params) -> State:
        flat = flatten(params, "params", self.METHOD)
        return {**self._init_memory(flat), **Progress.initial_state(flat)}

    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        """Up to ``max_iter`` iterations from ``params`` (``grads`` are at ``params``)."""
        lr = float(lr_at(self.lr, step))
        x0, g, loss, evaluate = start(self.METHOD, grads, params, state, loss_fn)
        directions = self._directions(state, x0, lr)
        budget = Budget(
            self.max_iter,
            self.eval_budget,
            self.tolerance_grad,
            self.tolerance_change,
            self.line_search_fn,
            c2=self.WOLFE_C2,
        )
        x, progress = iterate(
            self.METHOD,
            directions,
            evaluate,
            params,
            loss,
            g,
            Progress.from_state(state),
            budget,
            lr,
        )
        new_state = {**directions.to_state(x0), **progress.to_state(x0)}
        return {k: x[k] - params[k] for k in params}, new_state

    @abstractmethod
    def _init_memory(self, flat: Tensor) -> State:
        """The method's memory in a fresh state (``H``, curvature-pair buffers, counters)."""

    @abstractmethod
    def _directions(self, state: State, flat: Tensor, lr: float) -> Directions:
        """The method's :class:`Directions`, holding its memory from ``state``."""


# ---------------------------------------------------------------------- the strong-Wolfe search


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
        if abs(b.t - a.t) * d_scale < tolerance_change or a.t == b.t:
            break  # the bracket has shrunk to nothing
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
    if a.t == b.t:  # one point: no cubic through it
        return (low + high) / 2.0
    d1 = a.gtd + b.gtd - 3.0 * (a.f - b.f) / (a.t - b.t)
    disc = d1 * d1 - a.gtd * b.gtd
    if disc < 0 or math.isnan(disc):
        return (low + high) / 2.0
    d2 = math.sqrt(disc)
    t = b.t - (b.t - a.t) * ((b.gtd + d2 - d1) / (b.gtd - a.gtd + 2.0 * d2))
    return min(max(t, low), high)


# ---------------------------------------------------------------------- flat vectors


def flatten(tree: Params, what: str, method: str, like: Params | None = None) -> Tensor:
    """Concatenate a dict of tensors in key order (``like``'s order, zeros for missing)."""
    keys = list(like if like is not None else tree)
    if not keys:
        raise ValueError(f"{what} is empty: {method} needs at least one parameter")
    pieces = []
    for k in keys:
        v = tree.get(k)
        if v is None:
            v = torch.zeros_like(like[k])
        if v.is_sparse:
            raise ValueError(f"{method} does not support sparse tensors ({what}[{k!r}])")
        if v.is_complex():
            v = torch.view_as_real(v)
        pieces.append(v)
    dtypes = {p.dtype for p in pieces}
    if len(dtypes) > 1:
        raise ValueError(f"{method} needs one dtype for all parameters; {what} has {dtypes}")
    return parameters_to_vector(pieces)


def moved(x: Params, d: Tensor, t: float) -> Params:
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


def unflatten(flat: Tensor, like: Params) -> Params:
    """The inverse of :func:`flatten` for real tensors: ``flat`` cut into ``like``'s shapes."""
    out, offset = {}, 0
    for k, p in like.items():
        out[k] = flat[offset : offset + p.numel()].reshape(p.shape)
        offset += p.numel()
    return out


def _along(
    evaluate: Callable[[Params], tuple[float, Tensor]], x: Params, d: Tensor
) -> Callable[[float], tuple[float, Tensor]]:
    return lambda step_len: evaluate(moved(x, d, step_len))


def initial_loss(loss_fn: LossFn, params: Params) -> float:
    with torch.no_grad():
        return float(loss_at_call(loss_fn, params))
