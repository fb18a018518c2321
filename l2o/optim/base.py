"""The update-rule contract that every optimizer in l2o follows (see DESIGN.md).

A rule is a pair of pure functions over dicts of tensors, in the spirit of optax::

    state          = rule.init(params)
    updates, state = rule.update(grads, state, params, step=t, loss_fn=None)
    params         = apply_updates(params, updates)

Pure means no in-place mutation of inputs and no hidden globals, so that ``torch.func.vmap``
runs a rule over a population of tasks and autograd differentiates through it.

State is a dict whose values are tensors or nested dicts of the same kind (plain dicts, so that
vmap, autograd and ``torch.save(weights_only=True)`` handle them; ``TypedDict`` classes name their
keys). A *per-parameter slot* is a nested dict keyed exactly like ``params`` (e.g. Adam's
``{"exp_avg": {name: tensor}}``); anything else is global to the rule (e.g. L-BFGS's history).
A rule declares its per-parameter slots in :meth:`UpdateRule.parameter_slots` (paths such as
``"exp_avg"`` or ``"learned/m"``), and the ``torch.optim`` adapter stores them in
``optimizer.state[p]`` as ``torch.optim`` does; for a rule that declares none, the adapter
treats a dict keyed exactly like the params as a per-parameter slot.

``step`` is the 0-based index of the update being made (an ``int`` or a 0-dim tensor; inside a
vmapped unroll each task may be at a different step). Rules with bias corrections use
``step + 1``.

Hyper-parameters are dataclass fields. ``lr`` may be a float or a schedule (a pure function of
the step, see :mod:`l2o.optim.schedules`); the adapter replaces fields with the param group's
values every step so that ``torch.optim.lr_scheduler`` works.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

Params = dict[str, Tensor]
State = dict[str, Any]
Step = int | Tensor
Schedule = Callable[[Step], float | Tensor]
LearningRate = float | Schedule


@runtime_checkable
class LossFn(Protocol):
    """What a rule with ``needs_loss_fn`` receives as ``loss_fn``: the loss at other points.

    - ``loss_fn(params)``: the loss at ``params`` (a 0-dim tensor);
    - ``loss_fn.value_and_grad(params)``: the loss and its gradient w.r.t. ``params``;
    - ``loss_fn.known_loss``: the loss at the point the rule is called at when the caller
      already computed it (the ``torch.optim`` adapter's closure ran at the start of ``step``),
      else ``None``, so a rule need not evaluate it again.

    Two implementations: :class:`FunctionalLoss` (a pure function, differentiated with
    ``torch.func``, so it works inside vmap: what unrolls pass) and
    :class:`l2o.optim.adapter.ClosureLoss` (a ``torch.optim`` closure, reading ``p.grad``).
    Rules take either, or a plain callable through :func:`as_loss_fn`.
    """

    known_loss: Tensor | None

    def __call__(self, params: Params) -> Tensor: ...

    def value_and_grad(self, params: Params) -> tuple[Tensor, Params]: ...


class DifferentiableLoss:
    """A loss function that is a pure function of the parameters (``__call__``), so that
    ``torch.func`` gives its gradient: the ``value_and_grad`` of :class:`FunctionalLoss` and of
    the loss functions that also give more (residuals, layer statistics, resampled labels)."""

    def value_and_grad(self, params: Params) -> tuple[Tensor, Params]:
        grads, loss = torch.func.grad_and_value(self)(params)
        return loss, grads


@dataclasses.dataclass(frozen=True)
class FunctionalLoss(DifferentiableLoss):
    """A :class:`LossFn` from a pure function ``fn(params) -> loss``."""

    fn: Callable[[Params], Tensor]
    known_loss: Tensor | None = None

    def __call__(self, params: Params) -> Tensor:
        return self.fn(params)

    def hvp(self, params: Params, vector: Params) -> Params:
        """The Hessian-vector product ``∇²f(params) · vector``, exactly, as the vector-Jacobian
        product of the gradient (the Hessian is symmetric); it runs under ``vmap``. (Forward
        over reverse, ``jvp`` of ``grad``, is cheaper but fails in torch 2.13 on losses such as
        ``mse_loss``, whose backward makes immutable zero tangents.)"""
        _, vjp = torch.func.vjp(torch.func.grad(self.fn), params)
        return vjp(vector)[0]


def loss_at_call(loss_fn: LossFn, params: Params) -> Tensor:
    """The loss at ``params``, the point the rule is called at: the caller's
    ``loss_fn.known_loss`` when it has one, else evaluated."""
    known = loss_fn.known_loss
    return known if known is not None else loss_fn(params)


def required_loss_fn(
    rule: str,
    loss_fn: LossFn | Callable[[Params], Tensor] | None,
    *,
    needs: str = "the loss",
    closure: str = "",
) -> LossFn:
    """``as_loss_fn(loss_fn)`` for a rule that evaluates the loss elsewhere, or a ``ValueError``
    saying that ``rule`` needs ``needs`` and how to pass it (``closure``: what the
    ``torch.optim`` class's closure must do, appended to the message)."""
    if loss_fn is None:
        raise ValueError(
            f"{rule} needs {needs}: pass loss_fn=... to update() (for the torch.optim class, "
            f"call step(closure){closure})"
        )
    return as_loss_fn(loss_fn)


def as_loss_fn(loss_fn: LossFn | Callable[[Params], Tensor]) -> LossFn:
    """``loss_fn`` itself if it is a :class:`LossFn`, else a :class:`FunctionalLoss` of it."""
    if isinstance(loss_fn, LossFn):
        return loss_fn
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (params -> loss), got {loss_fn!r}")
    return FunctionalLoss(loss_fn)


@dataclasses.dataclass(frozen=True)
class UpdateRule(ABC):
    """Base class of every update rule (hand-designed, learned, guarded).

    Subclasses are frozen dataclasses whose fields are the hyper-parameters; they implement
    :meth:`init` and :meth:`update` and validate their fields in ``__post_init__``.
    """

    #: Rules that need ``loss_fn`` (line searches, Hessian-vector products, the guard) set this.
    needs_loss_fn: ClassVar[bool] = False
    #: Rules that handle complex tensors themselves (L-BFGS, through their real views) set this;
    #: the ``torch.optim`` adapter refuses complex parameters for the others.
    supports_complex: ClassVar[bool] = False
    #: Rules whose update branches on tensor values in Python (L-BFGS's line search) cannot run
    #: under ``torch.func.vmap``; they run through their ``torch.optim`` class instead.
    vmappable: ClassVar[bool] = True

    @abstractmethod
    def init(self, params: Params) -> State:
        """Return the initial state for ``params`` (a dict of tensors)."""

    @abstractmethod
    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        """Return ``(updates, new_state)``; the new parameters are ``params + updates``."""

    def replace(self, **changes: Any) -> UpdateRule:
        """A copy with some hyper-parameters changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def hyperparameter_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    #: Paths (``"a/b"`` for nested dicts) of the state entries that are per-parameter slots, a
    #: superset of what any configuration of the rule holds; ``None``: not declared.
    PARAMETER_SLOTS: ClassVar[frozenset[str] | None] = None

    def parameter_slots(self) -> frozenset[str] | None:
        """The paths of this rule's per-parameter slots (see the module docstring); composite
        rules (the guard) build theirs from their parts."""
        return self.PARAMETER_SLOTS

    #: Rules whose update of each tensor depends only on that tensor's gradient, state and
    #: parameter and on the step, and whose state is per-parameter slots only, set this.
    TENSORWISE: ClassVar[bool] = False

    def tensorwise(self) -> bool:
        """Whether the rule gives the same result applied to one tensor at a time. The
        ``torch.optim`` adapter then applies it so, and a step's transient memory is one
        tensor's new state instead of the whole model's (the rules are pure: an update returns
        a new state). Composite rules decide from their parts."""
        return self.TENSORWISE

    def loss_fn_requirements(self) -> frozenset[str]:
        """Methods the rule calls on ``loss_fn`` beyond the :class:`LossFn` protocol and
        ``hvp`` (Levenberg–Marquardt's ``residuals_and_jacobian``, AdaFisher's
        ``kronecker_factors``): a loss that is only a function of the parameters (what
        ``l2o-eval`` and meta-training unrolls give) cannot serve these rules."""
        return frozenset()


def apply_updates(params: Params, updates: Params) -> Params:
    """``{k: params[k] + updates[k]}``, out of place."""
    return {k: params[k] + updates[k] for k in params}


def lr_at(lr: LearningRate, step: Step) -> float | Tensor:
    """The learning rate at ``step``: ``lr`` itself, or ``lr(step)`` for a schedule."""
    return lr(step) if callable(lr) else lr


def check_hyperparameter(
    name: str,
    value: Any,
    *,
    low: float | None = 0.0,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite number in range.

    Schedules (callables) pass: they are checked where they are built. So do tensors.
    """
    if callable(value) or isinstance(value, Tensor):
        # Tensor hyper-parameters (meta-learned, or batched under vmap over a population) cannot
        # be read without a device sync or at all inside a transform; they are not range-checked.
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        bound = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {bound} {low}, got {value!r}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        bound = "<=" if high_inclusive else "<"
        raise ValueError(f"{name} must be {bound} {high}, got {value!r}")


def zeros_like_params(params: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in params.items()}


def global_norm(tree: Mapping[str, Tensor]) -> Tensor:
    """sqrt(sum of squares) over all tensors of a dict."""
    return torch.sqrt(sum(torch.sum(v * v) for v in tree.values()))


def value_and_grad(loss_fn: LossFn | Callable[[Params], Tensor], params: Params):
    """Loss and gradient of ``loss_fn`` at ``params`` (``as_loss_fn(loss_fn).value_and_grad``)."""
    return as_loss_fn(loss_fn).value_and_grad(params)


def hessian_vector_product(
    loss_fn: LossFn | Callable[[Params], Tensor], params: Params, vector: Params
) -> Params:
    """``∇²f(params) · vector``: ``loss_fn.hvp`` where the loss function has one (exact for a
    :class:`FunctionalLoss`; a ``torch.optim`` closure's, see
    :class:`l2o.optim.adapter.ClosureLoss`), else :func:`finite_difference_hvp`."""
    loss_fn = as_loss_fn(loss_fn)
    hvp = getattr(loss_fn, "hvp", None)
    if hvp is not None:
        return hvp(params, vector)
    return finite_difference_hvp(loss_fn, params, vector)


def finite_difference_hvp(loss_fn: LossFn, params: Params, vector: Params) -> Params:
    """``∇²f · v ≈ (∇f(θ + εv) - ∇f(θ - εv)) / 2ε``: two gradient evaluations.

    ``ε = u^(1/3) · max(1, ‖θ‖) / ‖v‖`` with ``u`` the dtype's unit roundoff, which balances the
    central difference's O(ε²) truncation error against its O(u/ε) rounding error (Nocedal &
    Wright, *Numerical Optimization*, 2nd ed., §8.1); relative accuracy about ``u^(2/3)``:
    1e-5 in float32, 1e-11 in float64.
    """
    reference = next(iter(params.values()))
    unit_roundoff = torch.finfo(reference.dtype).eps
    v_norm = float(global_norm(vector))
    if v_norm == 0:
        return zeros_like_params(params)
    eps = unit_roundoff ** (1 / 3) * max(1.0, float(global_norm(params))) / v_norm
    _, plus = loss_fn.value_and_grad({k: p + eps * vector[k] for k, p in params.items()})
    _, minus = loss_fn.value_and_grad({k: p - eps * vector[k] for k, p in params.items()})
    return {k: (plus[k] - minus[k]) / (2 * eps) for k in params}
