"""Drop-in ``torch.optim`` classes: each one is :class:`RuleOptimizer` with one rule.

Signatures and defaults are ``torch.optim``'s (without ``maximize``, ``foreach``, ``fused``,
``capturable`` and ``differentiable``); the arithmetic lives in :mod:`l2o.optim.rules`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from l2o.optim import muon, rules
from l2o.optim.adapter import RuleOptimizer
from l2o.optim.base import LearningRate, UpdateRule

__all__ = ["SGD", "AMSGrad", "Adadelta", "Adagrad", "Adam", "AdamW", "Adamax", "NAdam", "RMSprop"]

Betas = tuple[float, float]


class SGD(RuleOptimizer):
    """``torch.optim.SGD`` on :class:`l2o.optim.rules.SGD`."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: LearningRate = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        rule = rules.SGD(lr, momentum, dampening, weight_decay, nesterov)
        super().__init__(params, rule)


class Adagrad(RuleOptimizer):
    """``torch.optim.Adagrad`` on :class:`l2o.optim.rules.Adagrad`."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: LearningRate = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
    ) -> None:
        rule = rules.Adagrad(lr, lr_decay, weight_decay, initial_accumulator_value, eps)
        super().__init__(params, rule)


class Adadelta(RuleOptimizer):
    """``torch.optim.Adadelta`` on :class:`l2o.optim.rules.Adadelta`."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: LearningRate = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, rules.Adadelta(lr, rho, eps, weight_decay))


class RMSprop(RuleOptimizer):
    """``torch.optim.RMSprop`` on :class:`l2o.optim.rules.RMSprop`."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: LearningRate = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
    ) -> None:
        rule = rules.RMSprop(lr, alpha, eps, weight_decay, momentum, centered)
        super().__init__(params, rule)


class Adam(RuleOptimizer):
    """``torch.optim.Adam`` on :class:`l2o.optim.rules.Adam` (plus its ``eps_root``)."""

    rule_cls: type[rules.Adam] = rules.Adam

    def __init__(
        self,
        params: Iterable[Any],
        lr: LearningRate = 1e-3,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        decoupled_weight_decay: bool = False,
        eps_root: float = 0.0,
    ) -> None:
        rule = self.rule_cls(
            lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay, eps_root
        )
        super().__init__(params, rule)


class AdamW(Adam):
    """``torch.optim.AdamW`` on :class:`l2o.optim.rules.AdamW`."""

    rule_cls = rules.AdamW

    def __init__(
        self,
        params: Iterable[Any],
        lr: LearningRate = 1e-3,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        decoupled_weight_decay: bool = True,
        eps_root: float = 0.0,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            decoupled_weight_decay=decoupled_weight_decay,
            eps_root=eps_root,
        )


class AMSGrad(Adam):
    """``torch.optim.Adam(amsgrad=True)`` on :class:`l2o.optim.rules.AMSGrad`."""

    rule_cls = rules.AMSGrad

    def __init__(
        self,
        params: Iterable[Any],
        lr: LearningRate = 1e-3,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = True,
        *,
        decoupled_weight_decay: bool = False,
        eps_root: float = 0.0,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            decoupled_weight_decay=decoupled_weight_decay,
            eps_root=eps_root,
        )


class Adamax(RuleOptimizer):
    """``torch.optim.Adamax`` on :class:`l2o.optim.rules.Adamax`."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: LearningRate = 2e-3,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, rules.Adamax(lr, betas, eps, weight_decay))


class NAdam(RuleOptimizer):
    """``torch.optim.NAdam`` on :class:`l2o.optim.rules.NAdam`."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: LearningRate = 2e-3,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
    ) -> None:
        rule = rules.NAdam(lr, betas, eps, weight_decay, momentum_decay, decoupled_weight_decay)
        super().__init__(params, rule)


class Muon(RuleOptimizer):
    """``torch.optim.Muon`` on :class:`l2o.optim.muon.Muon`, for every parameter: matrices
    (and conv weights, reshaped) get Muon, the other tensors ``other`` (default AdamW, lr 3e-4)
    instead of an error. ``adjust_lr_fn=None`` is torch's "original" scaling."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: LearningRate = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = muon.NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        ns_dtype: str = "bfloat16",
        other: UpdateRule | None = None,
    ) -> None:
        rule = muon.Muon(
            lr,
            weight_decay,
            momentum,
            nesterov,
            tuple(ns_coefficients),
            eps,
            ns_steps,
            adjust_lr_fn or "original",
            ns_dtype,
            **({"other": other} if other is not None else {}),
        )
        super().__init__(params, rule)
