"""Gradient-free baselines for small black-box problems: random search and an evolution strategy.

Both use only loss values (``loss_fn(params)``; the ``torch.optim`` classes' closure, whose
backward pass they do not need) and ignore the gradient they are given. Their noise comes from
torch's global generator (``torch.manual_seed``; ``vmap`` with ``randomness="different"``).
They are written without Python branches on values, so they run under ``vmap``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from l2o.optim import registry
from l2o.optim.adapter import RuleOptimizer
from l2o.optim.base import (
    LossFn,
    Params,
    State,
    Step,
    UpdateRule,
    check_hyperparameter,
    loss_at_call,
    required_loss_fn,
)
from l2o.optim.rules import Adam
from l2o.optim.wrappers import _Wrapper, _WrapperOptimizer
from l2o.validation import boolean, positive_int

__all__ = ["EvolutionStrategy", "RandomSearch"]

FITNESS_SHAPINGS = ("centered_ranks", "none")
# Rechenberg's one-fifth rule: σ grows by SUCCESS_FACTOR on a success and shrinks by
# SUCCESS_FACTOR^(-1/4) on a failure, so it is stationary at a success rate of 1/5.
SUCCESS_FACTOR = math.exp(1.0 / 3.0)


def _needs(name: str, loss_fn: Any) -> LossFn:
    return required_loss_fn(
        name,
        loss_fn,
        needs="the loss at sampled points",
        closure=" with a closure that returns the loss",
    )


def _perturbed(params: Params, noise: Params, scale: float | Tensor) -> Params:
    return {k: p + scale * noise[k] for k, p in params.items()}


@dataclasses.dataclass(frozen=True)
class RandomSearch(UpdateRule):
    """Elitist random search, the (1+λ) evolution strategy with the one-fifth success rule.

    Each update draws ``samples`` candidates ``θ + σ N(0, I)`` and moves to the best of them
    if its loss is below the current one (so the loss never goes up). With ``adapt_sigma``,
    ``σ`` grows by ``e^(1/3)`` after a success and shrinks by ``e^(-1/12)`` after a failure
    (Rechenberg 1973; Kern et al., "Learning probability distributions in continuous
    evolutionary algorithms", Natural Computing 2004). ``sigma`` is the initial ``σ``; the
    current one is in the state.
    """

    sigma: float = 0.1
    samples: int = 1
    adapt_sigma: bool = True

    needs_loss_fn: ClassVar[bool] = True
    PARAMETER_SLOTS: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        check_hyperparameter("sigma", self.sigma, low=0.0, low_inclusive=False)
        positive_int("samples", self.samples)
        boolean("adapt_sigma", self.adapt_sigma)

    def init(self, params: Params) -> State:
        reference = next(iter(params.values()))
        like = dict(dtype=reference.dtype, device=reference.device)
        return {
            "sigma": torch.tensor(float(self.sigma), **like),
            "successes": torch.zeros((), dtype=torch.int64, device=reference.device),
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
        loss_fn = _needs("RandomSearch", loss_fn)
        sigma = state["sigma"]
        best_loss = loss_at_call(loss_fn, params)
        best = {k: torch.zeros_like(p) for k, p in params.items()}
        success = torch.zeros((), dtype=torch.bool, device=sigma.device)
        for _ in range(self.samples):
            move = {k: sigma * torch.randn_like(p) for k, p in params.items()}
            value = loss_fn(_perturbed(params, move, 1.0))
            better = torch.isfinite(value) & (value < best_loss)
            best = {k: torch.where(better, move[k], b) for k, b in best.items()}
            best_loss = torch.where(better, value, best_loss)
            success = success | better
        if self.adapt_sigma:
            factor = torch.where(success, SUCCESS_FACTOR, SUCCESS_FACTOR**-0.25)
            sigma = sigma * factor.to(sigma.dtype)
        new_state = {"sigma": sigma, "successes": state["successes"] + success.long()}
        return best, new_state


@dataclasses.dataclass(frozen=True)
class EvolutionStrategy(_Wrapper):
    """An evolution strategy's gradient estimate, followed by ``base`` (Adam by default)::

        ĝ = 1/(2nσ) Σ_i (F(θ + σε_i) - F(θ - σε_i)) ε_i,     ε_i ~ N(0, I),  i = 1..n

    with antithetic pairs (``samples = n``) and, by default, fitness shaping: ``F`` is the
    centred rank of each of the ``2n`` losses in ``[-0.5, 0.5]`` instead of the loss itself,
    which makes the estimate invariant to monotone transformations of the loss (Salimans, Ho,
    Chen, Sidor & Sutskever, "Evolution strategies as a scalable alternative to reinforcement
    learning", 2017; Wierstra et al., "Natural evolution strategies", JMLR 2014). With
    ``fitness_shaping="none"`` the estimate is unbiased for the gradient of the Gaussian
    smoothing of the loss (exactly the gradient for a quadratic).
    """

    base: UpdateRule = dataclasses.field(default_factory=lambda: Adam(lr=1e-2))
    samples: int = 8
    sigma: float = 0.01
    fitness_shaping: str = "centered_ranks"

    needs_loss_fn: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("samples", self.samples)
        check_hyperparameter("sigma", self.sigma, low=0.0, low_inclusive=False)
        if self.fitness_shaping not in FITNESS_SHAPINGS:
            raise ValueError(
                f"fitness_shaping must be one of {FITNESS_SHAPINGS}, got {self.fitness_shaping!r}"
            )

    def gradient_estimate(self, params: Params, loss_fn: LossFn) -> Params:
        """``ĝ`` at ``params`` (see the class docstring)."""
        noises = [{k: torch.randn_like(p) for k, p in params.items()} for _ in range(self.samples)]
        plus = torch.stack([loss_fn(_perturbed(params, e, self.sigma)) for e in noises])
        minus = torch.stack([loss_fn(_perturbed(params, e, -self.sigma)) for e in noises])
        if self.fitness_shaping == "centered_ranks":
            ranks = torch.cat([plus, minus]).argsort().argsort().to(plus.dtype)
            centred = ranks / (2 * self.samples - 1) - 0.5
            plus, minus = centred[: self.samples], centred[self.samples :]
        weights = (plus - minus) / (2 * self.samples * self.sigma)
        return {k: sum(w * e[k] for w, e in zip(weights, noises)) for k in params}

    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        loss_fn = _needs("EvolutionStrategy", loss_fn)
        estimate = self.gradient_estimate(params, loss_fn)
        updates, base_state = self._base_update(estimate, state, params, step)
        return updates, {"base": base_state}


class RandomSearchOptimizer(RuleOptimizer):
    """:class:`RandomSearch` as a ``torch.optim`` optimizer; ``step(closure)``."""

    def __init__(
        self, params: Any, sigma: float = 0.1, samples: int = 1, adapt_sigma: bool = True
    ) -> None:
        super().__init__(params, RandomSearch(sigma, samples, adapt_sigma))


class EvolutionStrategyOptimizer(_WrapperOptimizer):
    """:class:`EvolutionStrategy` as a ``torch.optim`` optimizer; ``step(closure)``."""

    rule_cls = EvolutionStrategy


registry.register("random_search", RandomSearch, RandomSearchOptimizer)
registry.register("evolution_strategy", EvolutionStrategy, EvolutionStrategyOptimizer)
