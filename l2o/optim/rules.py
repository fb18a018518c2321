"""Hand-designed first-order update rules: SGD, Adagrad, Adadelta, RMSprop and the Adam family.

Each rule does the arithmetic of its ``torch.optim`` namesake (the single-tensor path, without
``maximize``) as a pure function of dicts of tensors, so it runs inside ``torch.func.vmap`` and
autograd differentiates through it. Field names are ``torch.optim``'s hyper-parameter names,
so a param group's keys map one-to-one onto a rule's fields, and state slots carry
``torch.optim``'s state names (``exp_avg``, ``momentum_buffer``, ...).

In the formulas ``g`` is the gradient, ``θ`` the parameters, ``t = step + 1`` the 1-based update
count, ``η`` the learning rate at ``step`` and ``λ`` the weight decay; every operation is
elementwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from l2o.optim.base import (
    LearningRate,
    LossFn,
    Params,
    State,
    Step,
    UpdateRule,
    check_hyperparameter,
    lr_at,
    zeros_like_params,
)
from l2o.validation import boolean

__all__ = [
    "SGD",
    "AMSGrad",
    "Adadelta",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "NAdam",
    "RMSprop",
]


# --- pieces shared by the rules ---------------------------------------------------------------


def _is_zero(value: Any) -> bool:
    # A tensor hyper-parameter (a meta-parameter, a vmapped population of values) counts as
    # non-zero: the branch it would skip must stay in the graph.
    return not isinstance(value, Tensor) and value == 0


def _float_step(step: Step) -> Step:
    # Powers of a tensor step are taken in float64 (float32 on MPS, which has none) so bias
    # corrections keep their precision; a 0-dim result does not promote float32 parameters.
    if not isinstance(step, Tensor) or step.is_floating_point():
        return step
    return step.to(torch.float32 if step.device.type == "mps" else torch.float64)


def _where(condition: bool | Tensor, a: Tensor, b: Tensor) -> Tensor:
    # A Python condition picks directly; a tensor one (from a tensor step: a vmapped population
    # of tasks at different steps) selects elementwise with torch.where.
    if isinstance(condition, Tensor):
        return torch.where(condition, a, b)
    return a if condition else b


def _select_first_update(step: Step, first: Tensor, later: Tensor) -> Tensor:
    # ``first`` where step == 0, else ``later``.
    return _where(step == 0, first, later)


def _bias_correction(beta: float | Tensor, count: Step) -> float | Tensor:
    return 1 - beta**count


def _ema(average: Tensor, value: Tensor, decay: float | Tensor) -> Tensor:
    # decay·average + (1 - decay)·value, written as torch.optim writes it (lerp).
    return torch.lerp(average, value, 1 - decay)


def _with_l2_weight_decay(grads: Params, params: Params, weight_decay: float | Tensor) -> Params:
    # g + λθ: weight decay as an L2 penalty folded into the gradient.
    if _is_zero(weight_decay):
        return grads
    return {k: g + weight_decay * params[k] for k, g in grads.items()}


def _with_decoupled_weight_decay(
    updates: Params, params: Params, lr: float | Tensor, weight_decay: float | Tensor
) -> Params:
    # u - ηλθ: weight decay applied to the parameters, outside the adaptive scaling
    # (Loshchilov & Hutter, 2019).
    if _is_zero(weight_decay):
        return updates
    return {k: u - (lr * weight_decay) * params[k] for k, u in updates.items()}


def _checked_betas(betas: Any) -> tuple[Any, Any]:
    betas = tuple(betas)
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        check_hyperparameter(f"betas[{i}]", beta, low=0.0, high=1.0, high_inclusive=False)
    return betas


class _Rule(UpdateRule):
    """Shared validation: ``lr``, ``eps`` and ``weight_decay`` when present, ``betas`` as a
    checked tuple (so a Hydra ``ListConfig`` or a list works)."""

    def __post_init__(self) -> None:
        for name in ("lr", "eps", "weight_decay"):
            if hasattr(self, name):
                check_hyperparameter(name, getattr(self, name))
        if hasattr(self, "betas"):
            object.__setattr__(self, "betas", _checked_betas(self.betas))


# --- SGD ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SGD(_Rule):
    """Stochastic gradient descent with optional heavy-ball or Nesterov momentum.

    With ``d = g + λθ``::

        b_t = d                              at the first update (t = 1)
        b_t = μ·b_{t-1} + (1 - dampening)·d  afterwards
        u   = -η·(d + μ·b_t)   if nesterov   else   -η·b_t        (u = -η·d when μ = 0)

    Robbins & Monro, "A stochastic approximation method", 1951; momentum: Polyak, "Some methods
    of speeding up the convergence of iteration methods", 1964; Nesterov momentum in this form:
    Sutskever et al., "On the importance of initialization and momentum in deep learning",
    ICML 2013.
    """

    PARAMETER_SLOTS: ClassVar[frozenset[str]] = frozenset({"momentum_buffer"})

    lr: LearningRate = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_hyperparameter("momentum", self.momentum)
        check_hyperparameter("dampening", self.dampening, high=1.0)
        boolean("nesterov", self.nesterov)
        if self.nesterov and (_is_zero(self.momentum) or not _is_zero(self.dampening)):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")

    def init(self, params: Params) -> State:
        if _is_zero(self.momentum):
            return {}
        return {"momentum_buffer": zeros_like_params(params)}

    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        lr = lr_at(self.lr, step)
        grads = _with_l2_weight_decay(grads, params, self.weight_decay)
        if _is_zero(self.momentum):
            return {k: -lr * g for k, g in grads.items()}, state
        mu = self.momentum
        if "momentum_buffer" in state:
            previous = state["momentum_buffer"]
            buffer = {
                k: _select_first_update(step, g, mu * previous[k] + (1 - self.dampening) * g)
                for k, g in grads.items()
            }
        else:  # momentum switched on after init (a scheduler): the buffer starts like torch's
            buffer = dict(grads)
        direction = {k: g + mu * buffer[k] for k, g in grads.items()} if self.nesterov else buffer
        return {k: -lr * d for k, d in direction.items()}, {**state, "momentum_buffer": buffer}


# --- Adagrad, Adadelta, RMSprop ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Adagrad(_Rule):
    """Adagrad: per-coordinate steps scaled by the root of the summed squared gradients.

    With ``d = g + λθ``::

        s_t = s_{t-1} + d²          (s_0 = initial_accumulator_value)
        u   = -η / (1 + (t - 1)·lr_decay) · d / (√s_t + ε)

    Duchi, Hazan & Singer, "Adaptive subgradient methods for online learning and stochastic
    optimization", JMLR 2011.
    """

    PARAMETER_SLOTS: ClassVar[frozenset[str]] = frozenset({"sum"})

    lr: LearningRate = 1e-2
    lr_decay: float = 0.0
    weight_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10

    def __post_init__(self) -> None:
        super().__post_init__()
        check_hyperparameter("lr_decay", self.lr_decay)
        check_hyperparameter("initial_accumulator_value", self.initial_accumulator_value)

    def init(self, params: Params) -> State:
        return {
            "sum": {
                k: torch.full_like(p, self.initial_accumulator_value) for k, p in params.items()
            }
        }

    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        decayed_lr = lr_at(self.lr, step) / (1 + _float_step(step) * self.lr_decay)
        grads = _with_l2_weight_decay(grads, params, self.weight_decay)
        sums = tree_map(lambda s, g: s + g * g, state["sum"], grads)
        updates = {k: -decayed_lr * g / (torch.sqrt(sums[k]) + self.eps) for k, g in grads.items()}
        return updates, {"sum": sums}


@dataclasses.dataclass(frozen=True)
class Adadelta(_Rule):
    """Adadelta: Adagrad's scaling with decaying averages and a unit-correcting numerator.

    With ``d = g + λθ``::

        v_t = ρ·v_{t-1} + (1 - ρ)·d²
        δ   = √(a_{t-1} + ε) / √(v_t + ε) · d
        a_t = ρ·a_{t-1} + (1 - ρ)·δ²
        u   = -η·δ

    Zeiler, "ADADELTA: an adaptive learning rate method", arXiv:1212.5701, 2012.
    """

    PARAMETER_SLOTS: ClassVar[frozenset[str]] = frozenset({"square_avg", "acc_delta"})

    lr: LearningRate = 1.0
    rho: float = 0.9
    eps: float = 1e-6
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_hyperparameter("rho", self.rho, high=1.0)

    def init(self, params: Params) -> State:
        return {"square_avg": zeros_like_params(params), "acc_delta": zeros_like_params(params)}

    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        lr = lr_at(self.lr, step)
        grads = _with_l2_weight_decay(grads, params, self.weight_decay)
        square_avg = tree_map(lambda v, g: _ema(v, g * g, self.rho), state["square_avg"], grads)
        delta = {
            k: torch.sqrt(state["acc_delta"][k] + self.eps)
            / torch.sqrt(square_avg[k] + self.eps)
            * g
            for k, g in grads.items()
        }
        acc_delta = tree_map(lambda a, d: _ema(a, d * d, self.rho), state["acc_delta"], delta)
        updates = {k: -lr * d for k, d in delta.items()}
        return updates, {"square_avg": square_avg, "acc_delta": acc_delta}


@dataclasses.dataclass(frozen=True)
class RMSprop(_Rule):
    """RMSprop, optionally centered and with momentum.

    With ``d = g + λθ``::

        v_t = α·v_{t-1} + (1 - α)·d²
        c_t = α·c_{t-1} + (1 - α)·d                  (centered only)
        r   = √(v_t - c_t²) + ε   if centered   else   √v_t + ε
        b_t = μ·b_{t-1} + d / r,   u = -η·b_t        (u = -η·d / r when μ = 0)

    Tieleman & Hinton, "Lecture 6.5 — RMSprop", COURSERA: Neural Networks for Machine Learning,
    2012; centered variant: Graves, "Generating sequences with recurrent neural networks",
    arXiv:1308.0850, 2013.
    """

    PARAMETER_SLOTS: ClassVar[frozenset[str]] = frozenset(
        {"square_avg", "momentum_buffer", "grad_avg"}
    )

    lr: LearningRate = 1e-2
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_hyperparameter("alpha", self.alpha, high=1.0)
        check_hyperparameter("momentum", self.momentum)
        boolean("centered", self.centered)

    def init(self, params: Params) -> State:
        state = {"square_avg": zeros_like_params(params)}
        if not _is_zero(self.momentum):
            state["momentum_buffer"] = zeros_like_params(params)
        if self.centered:
            state["grad_avg"] = zeros_like_params(params)
        return state

    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        lr = lr_at(self.lr, step)
        grads = _with_l2_weight_decay(grads, params, self.weight_decay)
        square_avg = tree_map(lambda v, g: _ema(v, g * g, self.alpha), state["square_avg"], grads)
        new_state = {"square_avg": square_avg}
        if self.centered:
            grad_avg = tree_map(lambda c, g: _ema(c, g, self.alpha), state["grad_avg"], grads)
            new_state["grad_avg"] = grad_avg
            rms = {k: torch.sqrt(v - grad_avg[k] ** 2) + self.eps for k, v in square_avg.items()}
        else:
            rms = {k: torch.sqrt(v) + self.eps for k, v in square_avg.items()}
        scaled = {k: g / rms[k] for k, g in grads.items()}
        if _is_zero(self.momentum):
            return {k: -lr * s for k, s in scaled.items()}, new_state
        previous = state.get("momentum_buffer") or zeros_like_params(grads)
        buffer = {k: self.momentum * previous[k] + s for k, s in scaled.items()}
        new_state["momentum_buffer"] = buffer
        return {k: -lr * b for k, b in buffer.items()}, new_state


# --- the Adam family ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Adam(_Rule):
    """Adam, with optional AMSGrad, decoupled weight decay and a differentiable-safe ``eps_root``.

    With ``d = g + λθ`` (``d = g`` when ``decoupled_weight_decay``)::

        m_t = β₁·m_{t-1} + (1 - β₁)·d
        v_t = β₂·v_{t-1} + (1 - β₂)·d²
        v̂   = max(v̂_{t-1}, v_t)  if amsgrad  else  v_t
        u   = -η / (1 - β₁ᵗ) · m_t / (√(v̂ / (1 - β₂ᵗ) + ε_root) + ε)   [ - ηλθ if decoupled ]

    ``eps_root`` (optax's name) sits inside the square root. It is 0 in torch.optim's Adam; set
    it > 0 (e.g. 1e-8) when differentiating through the update (meta-gradients in an unroll):
    the derivative of √v at v = 0, hit by any coordinate whose gradient is zero, is infinite,
    and ∞·0 makes the meta-gradient NaN.

    Kingma & Ba, "Adam: a method for stochastic optimization", ICLR 2015; AMSGrad: Reddi, Kale
    & Kumar, "On the convergence of Adam and beyond", ICLR 2018; decoupled weight decay:
    Loshchilov & Hutter, "Decoupled weight decay regularization", ICLR 2019.
    """

    PARAMETER_SLOTS: ClassVar[frozenset[str]] = frozenset(
        {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    )

    lr: LearningRate = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    decoupled_weight_decay: bool = False
    eps_root: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        boolean("amsgrad", self.amsgrad)
        boolean("decoupled_weight_decay", self.decoupled_weight_decay)
        check_hyperparameter("eps_root", self.eps_root)

    def init(self, params: Params) -> State:
        state = {"exp_avg": zeros_like_params(params), "exp_avg_sq": zeros_like_params(params)}
        if self.amsgrad:
            state["max_exp_avg_sq"] = zeros_like_params(params)
        return state

    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        lr = lr_at(self.lr, step)
        beta1, beta2 = self.betas
        count = _float_step(step) + 1
        if not self.decoupled_weight_decay:
            grads = _with_l2_weight_decay(grads, params, self.weight_decay)
        exp_avg = tree_map(lambda m, g: _ema(m, g, beta1), state["exp_avg"], grads)
        exp_avg_sq = tree_map(lambda v, g: _ema(v, g * g, beta2), state["exp_avg_sq"], grads)
        new_state = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        second_moment = exp_avg_sq
        if self.amsgrad:
            second_moment = tree_map(torch.maximum, state["max_exp_avg_sq"], exp_avg_sq)
            new_state["max_exp_avg_sq"] = second_moment
        step_size = lr / _bias_correction(beta1, count)
        correction2 = _bias_correction(beta2, count)
        updates = {}
        for k, m in exp_avg.items():
            v_hat = second_moment[k] / correction2
            if not _is_zero(self.eps_root):
                v_hat = v_hat + self.eps_root
            updates[k] = -step_size * m / (torch.sqrt(v_hat) + self.eps)
        if self.decoupled_weight_decay:
            updates = _with_decoupled_weight_decay(updates, params, lr, self.weight_decay)
        return updates, new_state


@dataclasses.dataclass(frozen=True)
class AdamW(Adam):
    """Adam with decoupled weight decay (torch.optim.AdamW's defaults): see :class:`Adam`.

    Loshchilov & Hutter, "Decoupled weight decay regularization", ICLR 2019.
    """

    weight_decay: float = 1e-2
    decoupled_weight_decay: bool = True


@dataclasses.dataclass(frozen=True)
class AMSGrad(Adam):
    """Adam normalised by the running maximum of the second moment: see :class:`Adam`.

    Reddi, Kale & Kumar, "On the convergence of Adam and beyond", ICLR 2018.
    """

    amsgrad: bool = True


@dataclasses.dataclass(frozen=True)
class Adamax(_Rule):
    """AdaMax: Adam with the infinity norm in place of the second moment.

    With ``d = g + λθ``::

        m_t = β₁·m_{t-1} + (1 - β₁)·d
        n_t = max(β₂·n_{t-1}, |d| + ε)
        u   = -η / (1 - β₁ᵗ) · m_t / n_t

    Kingma & Ba, "Adam: a method for stochastic optimization", ICLR 2015, section 7.1.
    """

    PARAMETER_SLOTS: ClassVar[frozenset[str]] = frozenset({"exp_avg", "exp_inf"})

    lr: LearningRate = 2e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def init(self, params: Params) -> State:
        return {"exp_avg": zeros_like_params(params), "exp_inf": zeros_like_params(params)}

    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        lr = lr_at(self.lr, step)
        beta1, beta2 = self.betas
        grads = _with_l2_weight_decay(grads, params, self.weight_decay)
        exp_avg = tree_map(lambda m, g: _ema(m, g, beta1), state["exp_avg"], grads)
        exp_inf = tree_map(
            lambda n, g: torch.maximum(beta2 * n, torch.abs(g) + self.eps), state["exp_inf"], grads
        )
        step_size = lr / _bias_correction(beta1, _float_step(step) + 1)
        updates = {k: -step_size * m / exp_inf[k] for k, m in exp_avg.items()}
        return updates, {"exp_avg": exp_avg, "exp_inf": exp_inf}


@dataclasses.dataclass(frozen=True)
class NAdam(_Rule):
    """NAdam: Adam with Nesterov momentum and a warming momentum schedule.

    With ``d = g + λθ`` (``d = g`` when ``decoupled_weight_decay``) and the momentum schedule
    ``μ_t = β₁·(1 - ½·0.96^(t·momentum_decay))``::

        P_t = P_{t-1}·μ_t                (the running product, state ``mu_product``, P_0 = 1)
        m_t = β₁·m_{t-1} + (1 - β₁)·d
        v_t = β₂·v_{t-1} + (1 - β₂)·d²
        r   = √(v_t / (1 - β₂ᵗ)) + ε
        u   = -η·(1 - μ_t)/(1 - P_t) · d / r  -  η·μ_{t+1}/(1 - P_t·μ_{t+1}) · m_t / r
              [ - ηλθ if decoupled ]

    ``mu_product`` is kept as state rather than recomputed from the step because β₁ may change
    between steps (``OneCycleLR`` cycles it); it is one 0-dim tensor for all parameters.

    Dozat, "Incorporating Nesterov momentum into Adam", ICLR 2016 workshop.
    """

    PARAMETER_SLOTS: ClassVar[frozenset[str]] = frozenset({"exp_avg", "exp_avg_sq"})

    lr: LearningRate = 2e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum_decay: float = 4e-3
    decoupled_weight_decay: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_hyperparameter("momentum_decay", self.momentum_decay)
        boolean("decoupled_weight_decay", self.decoupled_weight_decay)

    def init(self, params: Params) -> State:
        reference = next(iter(params.values()), None)
        like = {} if reference is None else {"dtype": reference.dtype, "device": reference.device}
        return {
            "exp_avg": zeros_like_params(params),
            "exp_avg_sq": zeros_like_params(params),
            "mu_product": torch.ones((), **like),
        }

    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        lr = lr_at(self.lr, step)
        beta1, beta2 = self.betas
        count = _float_step(step) + 1
        if not self.decoupled_weight_decay:
            grads = _with_l2_weight_decay(grads, params, self.weight_decay)
        mu = beta1 * (1.0 - 0.5 * 0.96 ** (count * self.momentum_decay))
        mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((count + 1) * self.momentum_decay))
        mu_product = (state["mu_product"] * mu).to(state["mu_product"].dtype)
        exp_avg = tree_map(lambda m, g: _ema(m, g, beta1), state["exp_avg"], grads)
        exp_avg_sq = tree_map(lambda v, g: _ema(v, g * g, beta2), state["exp_avg_sq"], grads)
        correction2 = _bias_correction(beta2, count)
        grad_coefficient = -lr * (1.0 - mu) / (1.0 - mu_product)
        momentum_coefficient = -lr * mu_next / (1.0 - mu_product * mu_next)
        updates = {}
        for k, g in grads.items():
            rms = torch.sqrt(exp_avg_sq[k] / correction2) + self.eps
            updates[k] = (grad_coefficient * g + momentum_coefficient * exp_avg[k]) / rms
        if self.decoupled_weight_decay:
            updates = _with_decoupled_weight_decay(updates, params, lr, self.weight_decay)
        return updates, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "mu_product": mu_product}
