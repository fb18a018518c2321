"""Curvature-aware first-order rules: AdaHessian, Sophia and INNA.

AdaHessian and Sophia precondition by an estimate of the Hessian's diagonal. Hutchinson's
estimator gives it from Hessian-vector products with Rademacher probes ``z`` (entries ±1)::

    diag(H) ≈ z ⊙ (H z),      E[z ⊙ H z] = diag(H)

(Hutchinson 1989; Bekas, Kokiopoulou & Saad 2007), so they need the loss (``loss_fn``; a
closure for the ``torch.optim`` classes; exact with ``loss.backward(create_graph=True)`` in the
closure, central differences of gradients otherwise, see
:func:`l2o.optim.base.hessian_vector_product`). The probes come from torch's global generator
(seed it with ``torch.manual_seed``; ``vmap`` with ``randomness="different"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from l2o.optim import registry
from l2o.optim.adapter import ClosureLoss, RuleOptimizer
from l2o.optim.base import (
    DifferentiableLoss,
    LearningRate,
    LossFn,
    Params,
    State,
    Step,
    check_hyperparameter,
    hessian_vector_product,
    lr_at,
    required_loss_fn,
    zeros_like_params,
)
from l2o.optim.rules import (
    _bias_correction,
    _ema,
    _float_step,
    _is_zero,
    _Rule,
    _select_first_update,
    _where,
)
from l2o.validation import positive_int

__all__ = [
    "INNA",
    "AdaHessian",
    "AdaHessianOptimizer",
    "GNBLoss",
    "INNAOptimizer",
    "Sophia",
    "SophiaOptimizer",
    "hutchinson_diagonal",
]


def rademacher_like(p: Tensor) -> Tensor:
    """Entries ±1 with probability ½ each, drawn as ``pytorch-optimizer`` draws them."""
    return torch.randint_like(p, 0, 2) * 2.0 - 1.0


def hutchinson_diagonal(loss_fn: LossFn, params: Params, samples: int = 1) -> Params:
    """The mean of ``z ⊙ (∇²f z)`` over ``samples`` Rademacher probes ``z``."""
    total = zeros_like_params(params)
    for _ in range(samples):
        probe = {k: rademacher_like(p) for k, p in params.items()}
        product = hessian_vector_product(loss_fn, params, probe)
        total = {k: t + probe[k] * product[k] for k, t in total.items()}
    return {k: t / samples for k, t in total.items()}


def _select(condition: bool | Tensor, a: Params, b: Params) -> Params:
    # Which of two trees, for a Python condition or (under vmap) a tensor one.
    return {k: _where(condition, a[k], b[k]) for k in a}


def _estimate_due(step: Step, period: int) -> bool | Tensor:
    return step % period == 0


def _needs_loss(name: str, loss_fn: Any) -> LossFn:
    return required_loss_fn(
        name,
        loss_fn,
        needs="Hessian-vector products of the loss for its diagonal-Hessian estimate",
        closure=", with loss.backward(create_graph=True) in the closure for exact products",
    )


# ---------------------------------------------------------------------- AdaHessian


@dataclasses.dataclass(frozen=True)
class AdaHessian(_Rule):
    """AdaHessian: Adam with the squared gradient replaced by the squared Hutchinson estimate
    ``D = z ⊙ H z`` of the Hessian's diagonal, and a Hessian power ``k``::

        m_t = β₁ m_{t-1} + (1 - β₁) g
        v_t = β₂ v_{t-1} + (1 - β₂) D²          (when D is re-estimated, every update_period)
        θ  ← θ (1 - η λ) - η / (1 - β₁ᵗ) · m_t / ((v_t / (1 - β₂ᵗ))^(k/2) + ε)

    ``spatial_averaging``: for conv kernels (4-D ``[out, in, h, w]``) ``|D|`` is averaged over
    each kernel's ``h × w`` positions, which smooths the noisy estimate (Yao et al., §3.2).
    Decoupled weight decay ``λ`` as ``pytorch-optimizer``'s default (``weight_decouple``), whose
    arithmetic this follows for tensors of up to 3 dimensions.

    Yao, Gholami, Shen, Mustafa, Keutzer & Mahoney, "ADAHESSIAN: an adaptive second order
    optimizer for machine learning", AAAI 2021.
    """

    lr: LearningRate = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-16
    weight_decay: float = 0.0
    hessian_power: float = 1.0
    update_period: int = 1
    hessian_samples: int = 1
    spatial_averaging: bool = True

    needs_loss_fn: ClassVar[bool] = True
    PARAMETER_SLOTS: ClassVar[frozenset[str]] = frozenset({"exp_avg", "exp_hessian_diag_sq"})

    def __post_init__(self) -> None:
        super().__post_init__()  # lr, eps, weight_decay, betas
        check_hyperparameter("hessian_power", self.hessian_power, low=0.0, high=1.0)
        positive_int("update_period", self.update_period)
        positive_int("hessian_samples", self.hessian_samples)

    def init(self, params: Params) -> State:
        return {
            "exp_avg": zeros_like_params(params),
            "exp_hessian_diag_sq": zeros_like_params(params),
        }

    def _diagonal(self, loss_fn: LossFn, params: Params) -> Params:
        diagonal = hutchinson_diagonal(loss_fn, params, self.hessian_samples)
        if not self.spatial_averaging:
            return diagonal
        return {
            k: d.abs().mean(dim=(2, 3), keepdim=True).expand_as(d) if d.ndim == 4 else d
            for k, d in diagonal.items()
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
        loss_fn = _needs_loss("AdaHessian", loss_fn)
        lr = lr_at(self.lr, step)
        beta1, beta2 = self.betas
        count = _float_step(step) + 1
        exp_avg = tree_map(lambda m, g: _ema(m, g, beta1), state["exp_avg"], grads)
        previous = state["exp_hessian_diag_sq"]
        due = _estimate_due(step, self.update_period)
        if isinstance(due, Tensor) or due:
            diagonal = self._diagonal(loss_fn, params)
            fresh = {k: _ema(v, diagonal[k] * diagonal[k], beta2) for k, v in previous.items()}
            exp_hessian = _select(due, fresh, previous)
        else:
            exp_hessian = previous
        step_size = lr / _bias_correction(beta1, count)
        correction2 = _bias_correction(beta2, count)
        updates = {}
        for k, m in exp_avg.items():
            denominator = (exp_hessian[k] / correction2) ** (self.hessian_power / 2) + self.eps
            updates[k] = -step_size * m / denominator
            if not _is_zero(self.weight_decay):
                updates[k] = updates[k] - (lr * self.weight_decay) * params[k]
        return updates, {"exp_avg": exp_avg, "exp_hessian_diag_sq": exp_hessian}


# ---------------------------------------------------------------------- Sophia

ESTIMATORS = ("hutchinson", "gnb")


@dataclasses.dataclass(frozen=True)
class GNBLoss(DifferentiableLoss):
    """A classification loss that also gives Sophia's Gauss–Newton–Bartlett estimate.

    ``logits_fn(params) -> [B, C]`` logits and integer ``targets`` ``[B]``; the loss is the mean
    cross-entropy. :meth:`gnb_diagonal` resamples the labels from the model's own softmax,
    ``ŷ ~ softmax(logits)``, and returns ``B · ĝ ⊙ ĝ`` with ``ĝ`` the gradient of the mean
    cross-entropy against ``ŷ`` (Liu et al. 2023, Alg. 2): an estimate of the diagonal of the
    Gauss–Newton matrix, which is positive.
    """

    logits_fn: Callable[[Params], Tensor]
    targets: Tensor
    known_loss: Tensor | None = None

    def __call__(self, params: Params) -> Tensor:
        return torch.nn.functional.cross_entropy(self.logits_fn(params), self.targets)

    def gnb_diagonal(self, params: Params) -> Params:
        with torch.no_grad():
            logits = self.logits_fn(params)
            sampled = torch.distributions.Categorical(logits=logits).sample()

        def sampled_loss(p: Params) -> Tensor:
            return torch.nn.functional.cross_entropy(self.logits_fn(p), sampled)

        grads = torch.func.grad(sampled_loss)(params)
        batch = logits.shape[0]
        return {k: batch * g * g for k, g in grads.items()}


@dataclasses.dataclass(frozen=True)
class Sophia(_Rule):
    """Sophia: momentum preconditioned by a diagonal-Hessian EMA re-estimated every ``k``
    updates, and clipped coordinate-wise::

        m_t = β₁ m_{t-1} + (1 - β₁) g
        h_t = β₂ h_{t-k} + (1 - β₂) ĥ            (every update_period k; else h_t = h_{t-1})
        θ  ← θ (1 - η λ) - η · clip(m_t / max(ρ h_t, ε), 1)

    ``clip(x, 1)`` bounds every coordinate to ``[-1, 1]``, so a step moves each weight by at
    most ``η``; ``ρ h ≤ 0`` (a negative curvature estimate) leaves ``sign(m)``. ``ĥ``:
    ``estimator="hutchinson"`` (Sophia-H: ``z ⊙ H z``) or ``"gnb"`` (Sophia-G, Gauss–Newton–
    Bartlett: needs a :class:`GNBLoss`, or any loss function with a ``gnb_diagonal(params)``
    method).

    Liu, Li, Hall, Liang & Ma, "Sophia: a scalable stochastic second-order optimizer for
    language model pre-training", ICLR 2024 (Alg. 3; the official code's defaults).
    """

    lr: LearningRate = 1e-4
    betas: tuple[float, float] = (0.965, 0.99)
    rho: float = 0.04
    weight_decay: float = 1e-1
    eps: float = 1e-15
    update_period: int = 10
    estimator: str = "hutchinson"

    needs_loss_fn: ClassVar[bool] = True
    PARAMETER_SLOTS: ClassVar[frozenset[str]] = frozenset({"exp_avg", "hessian"})

    def __post_init__(self) -> None:
        super().__post_init__()  # lr, eps, weight_decay, betas
        check_hyperparameter("rho", self.rho)
        check_hyperparameter("eps", self.eps, low=0.0, low_inclusive=False)
        positive_int("update_period", self.update_period)
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")

    def loss_fn_requirements(self) -> frozenset[str]:
        return frozenset({"gnb_diagonal"}) if self.estimator == "gnb" else frozenset()

    def init(self, params: Params) -> State:
        return {"exp_avg": zeros_like_params(params), "hessian": zeros_like_params(params)}

    def _estimate(self, loss_fn: LossFn, params: Params) -> Params:
        if self.estimator == "hutchinson":
            return hutchinson_diagonal(loss_fn, params)
        gnb = getattr(loss_fn, "gnb_diagonal", None)
        if gnb is None:
            raise TypeError(
                "Sophia(estimator='gnb') resamples labels from the model: pass "
                "loss_fn=GNBLoss(logits_fn, targets) (for the torch.optim class, "
                "step(closure, logits_closure=...))"
            )
        return gnb(params)

    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        loss_fn = _needs_loss("Sophia", loss_fn)
        lr = lr_at(self.lr, step)
        beta1, beta2 = self.betas
        exp_avg = tree_map(lambda m, g: _ema(m, g, beta1), state["exp_avg"], grads)
        hessian = state["hessian"]
        due = _estimate_due(step, self.update_period)
        if isinstance(due, Tensor) or due:
            estimate = self._estimate(loss_fn, params)
            fresh = {k: _ema(h, estimate[k], beta2) for k, h in hessian.items()}
            hessian = _select(due, fresh, hessian)
        updates = {}
        for k, m in exp_avg.items():
            ratio = (m.abs() / (self.rho * hessian[k]).clamp(min=self.eps)).clamp(max=1.0)
            updates[k] = -(lr * self.weight_decay) * params[k] - lr * m.sign() * ratio
        return updates, {"exp_avg": exp_avg, "hessian": hessian}


# ---------------------------------------------------------------------- INNA


@dataclasses.dataclass(frozen=True)
class INNA(_Rule):
    """INNA (INDIAN), the inertial Newton algorithm: a forward-Euler discretisation of the
    Hessian-damped dynamics ``θ'' + α θ' + β ∇²f θ' + ∇f = 0`` that needs only gradients,
    through an auxiliary variable ``ψ``::

        θ_{k+1} = θ_k + γ_k ((1/β - α) θ_k - ψ_k / β - β g_k)
        ψ_{k+1} = ψ_k + γ_k ((1/β - α) θ_k - ψ_k / β)

    with ``ψ_0 = (1 - αβ) θ_0 - (β² - β v₀) g_0``, which starts the motion with velocity
    ``-v₀ g_0`` (``initial_speed`` ``v₀``). ``γ_k`` is ``lr`` (a schedule of the step; the
    authors decay it as ``lr / √(k + 1)``: ``l2o.optim.schedules``). ``α`` is the viscous
    damping, ``β`` the Newtonian (Hessian-driven) damping.

    Castera, Bolte, Févotte & Pauwels, "An inertial Newton algorithm for deep learning",
    JMLR 2021 (arXiv:1905.12278), Alg. 1; the authors' Keras code for ``ψ_0``.
    """

    lr: LearningRate = 1e-2
    alpha: float = 0.5
    beta: float = 0.1
    initial_speed: float = 1.0
    weight_decay: float = 0.0

    PARAMETER_SLOTS: ClassVar[frozenset[str]] = frozenset({"psi"})

    def __post_init__(self) -> None:
        super().__post_init__()  # lr, weight_decay
        for name in ("alpha", "initial_speed"):
            check_hyperparameter(name, getattr(self, name))
        check_hyperparameter("beta", self.beta, low=0.0, low_inclusive=False)

    def init(self, params: Params) -> State:
        return {"psi": {k: (1 - self.alpha * self.beta) * p for k, p in params.items()}}

    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        gamma = lr_at(self.lr, step)
        a, b = self.alpha, self.beta
        updates, psi = {}, {}
        for k, g in grads.items():
            p = params[k]
            if not _is_zero(self.weight_decay):
                g = g + self.weight_decay * p
            # The first update sets the initial velocity (ψ_0 needs g_0, unknown at init).
            shifted = state["psi"][k] - (b * b - b * self.initial_speed) * g
            previous = _select_first_update(step, shifted, state["psi"][k])
            drift = (1 / b - a) * p - previous / b
            updates[k] = gamma * (drift - b * g)
            psi[k] = previous + gamma * drift
        return updates, {"psi": psi}


# ---------------------------------------------------------------------- torch.optim classes


class AdaHessianOptimizer(RuleOptimizer):
    """:class:`AdaHessian` as a ``torch.optim`` optimizer; ``step(closure)``, with
    ``loss.backward(create_graph=True)`` in the closure for exact Hessian-vector products."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: LearningRate = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        update_period: int = 1,
        hessian_samples: int = 1,
        spatial_averaging: bool = True,
    ) -> None:
        rule = AdaHessian(
            lr,
            betas,
            eps,
            weight_decay,
            hessian_power,
            update_period,
            hessian_samples,
            spatial_averaging,
        )
        super().__init__(params, rule)


class SophiaOptimizer(RuleOptimizer):
    """:class:`Sophia` as a ``torch.optim`` optimizer.

    ``step(closure)`` for Sophia-H (``loss.backward(create_graph=True)`` in the closure for
    exact products). Sophia-G (``estimator="gnb"``): ``step(closure, logits_closure=f)``, where
    ``f()`` returns the model's ``[B, C]`` logits on the batch (computed from the parameters):
    the labels are resampled from them. The estimate is computed only at the updates that
    re-estimate the curvature, but ``logits_closure`` is asked for at every step.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: LearningRate = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 1e-1,
        eps: float = 1e-15,
        update_period: int = 10,
        estimator: str = "hutchinson",
    ) -> None:
        rule = Sophia(lr, betas, rho, weight_decay, eps, update_period, estimator)
        super().__init__(params, rule)
        self._logits_closure: Callable[[], Tensor] | None = None

    def step(
        self,
        closure: Callable[[], Any] | None = None,
        logits_closure: Callable[[], Tensor] | None = None,
    ) -> Any:
        self._logits_closure = logits_closure
        try:
            return super().step(closure)
        finally:
            self._logits_closure = None

    def _loss_fn(self, closure: Callable[[], Any], live: Params, known_loss: Tensor | None):
        if self._logits_closure is None:
            return super()._loss_fn(closure, live, known_loss)
        return _ClosureGNB(closure, live, known_loss, self._logits_closure)


class _ClosureGNB(ClosureLoss):
    """A closure's loss with Sophia-G's estimate from a closure that returns logits."""

    def __init__(self, closure, params, known_loss, logits_closure) -> None:
        super().__init__(closure, params, loss=known_loss)
        self.logits_closure = logits_closure

    def gnb_diagonal(self, values: Params) -> Params:
        self.load(values)
        live = list(self.params.values())
        with torch.enable_grad():
            logits = self.logits_closure()
            if not isinstance(logits, Tensor) or logits.ndim != 2:
                raise TypeError("logits_closure must return the [batch, classes] logits")
            with torch.no_grad():
                sampled = torch.distributions.Categorical(logits=logits).sample()
            loss = torch.nn.functional.cross_entropy(logits, sampled)
            grads = torch.autograd.grad(loss, live, allow_unused=True)
        batch = logits.shape[0]
        return {
            k: torch.zeros_like(p) if g is None else batch * g * g
            for (k, p), g in zip(self.params.items(), grads)
        }


class INNAOptimizer(RuleOptimizer):
    """:class:`INNA` as a ``torch.optim`` optimizer."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: LearningRate = 1e-2,
        alpha: float = 0.5,
        beta: float = 0.1,
        initial_speed: float = 1.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, INNA(lr, alpha, beta, initial_speed, weight_decay))


registry.register("adahessian", AdaHessian, AdaHessianOptimizer)
registry.register("sophia", Sophia, SophiaOptimizer)
registry.register("sophia_g", Sophia, SophiaOptimizer, estimator="gnb")
registry.register("inna", INNA, INNAOptimizer)
