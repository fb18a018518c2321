"""Rules that wrap any other rule: Lookahead, SAM, Entropy-SGD, LPF-SGD / SmoothOut, and
weight averaging (SWA, an EMA of the iterates).

Each wrapper holds a ``base`` rule and calls its ``update``; the base's state lives under
``"base"`` in the wrapper's. ``lr`` is the base's learning rate, exposed as the wrapper's own
hyper-parameter so that param groups, LR schedulers and ``l2o-eval``'s lr tuning reach it
(``lr=None`` keeps the base's; a number replaces it). The base must be a first-order rule (it
gets a gradient, not a loss function).

Wrappers that draw noise (Entropy-SGD's Langevin steps, LPF-SGD's perturbations) take it from
torch's global generator: seed it with ``torch.manual_seed`` for reproducible runs, and pass
``randomness="different"`` to ``torch.func.vmap`` to give each member its own noise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor

from l2o.optim import registry
from l2o.optim.adapter import RuleOptimizer
from l2o.optim.base import (
    LearningRate,
    LossFn,
    Params,
    State,
    Step,
    UpdateRule,
    check_hyperparameter,
    global_norm,
    required_loss_fn,
)
from l2o.optim.rules import SGD, Adam, _where
from l2o.validation import boolean, positive_int

__all__ = [
    "SAM",
    "EntropySGD",
    "Lookahead",
    "PerturbedGradient",
    "WeightAveraging",
    "WeightAveragingOptimizer",
]


def _momentum_sgd() -> UpdateRule:
    return SGD(lr=1e-2, momentum=0.9)


def _needs(name: str, loss_fn: Any) -> LossFn:
    return required_loss_fn(
        name,
        loss_fn,
        needs="gradients at other points",
        closure=(
            " with a closure that zeroes the gradients, computes the loss, calls backward() "
            "and returns the loss"
        ),
    )


@dataclasses.dataclass(frozen=True)
class _Wrapper(UpdateRule):
    """A rule around ``base``: its state under ``"base"``, its ``lr`` as this rule's."""

    base: UpdateRule = dataclasses.field(default_factory=_momentum_sgd)
    lr: LearningRate | None = None

    #: Per-parameter slots of the wrapper itself (the base's are added under "base/").
    OWN_SLOTS: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        if not isinstance(self.base, UpdateRule):
            raise TypeError(f"base must be an l2o UpdateRule, got {self.base!r}")
        if self.base.needs_loss_fn:
            raise TypeError(
                f"{type(self).__name__}'s base must be a first-order rule (it gets gradients), "
                f"got {type(self.base).__name__}, which needs the loss"
            )
        if "lr" not in self.base.hyperparameter_names():
            raise TypeError(f"base {type(self.base).__name__} has no lr")
        if self.lr is None:
            object.__setattr__(self, "lr", self.base.lr)
        else:  # (no comparison first: a tensor lr, a vmapped population of them, cannot branch)
            object.__setattr__(self, "base", self.base.replace(lr=self.lr))

    @classmethod
    def hyperparameter_names(cls) -> tuple[str, ...]:
        # ``base`` is structure, fixed for the optimizer's lifetime (its state is inside).
        return tuple(n for n in super().hyperparameter_names() if n != "base")

    def parameter_slots(self) -> frozenset[str] | None:
        inner = self.base.parameter_slots()
        if inner is None:
            return None
        return frozenset({*self.OWN_SLOTS, *(f"base/{path}" for path in inner)})

    def init(self, params: Params) -> State:
        return {"base": self.base.init(params), **self._init_own(params)}

    def _init_own(self, params: Params) -> State:
        return {}

    def _base_update(
        self, grads: Params, state: State, params: Params, step: Step
    ) -> tuple[Params, State]:
        return self.base.update(grads, state["base"], params, step=step)


# ---------------------------------------------------------------------- Lookahead


@dataclasses.dataclass(frozen=True)
class Lookahead(_Wrapper):
    """Lookahead: ``k`` fast steps of ``base``, then the slow weights move towards them::

        θ_fast ← θ + base update                               (every step)
        every k-th step:  φ ← φ + α (θ_fast - φ),   θ ← φ        (φ_0 = θ_0)

    Zhang, Lucas, Hinton & Ba, "Lookahead optimizer: k steps forward, 1 step back",
    NeurIPS 2019. The base's state (momentum) is kept across the synchronisation (the paper's
    default; ``pytorch-optimizer``'s ``pullback_momentum="none"``).
    """

    base: UpdateRule = dataclasses.field(default_factory=Adam)
    k: int = 5
    alpha: float = 0.5

    OWN_SLOTS: ClassVar[frozenset[str]] = frozenset({"slow"})

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("k", self.k)
        check_hyperparameter("alpha", self.alpha, high=1.0)

    def _init_own(self, params: Params) -> State:
        return {"slow": {k: p.clone() for k, p in params.items()}}

    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        updates, base_state = self._base_update(grads, state, params, step)
        sync = (step + 1) % self.k == 0
        new_updates, slow = {}, {}
        for key, p in params.items():
            fast = p + updates[key]
            pulled = torch.lerp(state["slow"][key], fast, self.alpha)
            slow[key] = _where(sync, pulled, state["slow"][key])
            new_updates[key] = _where(sync, pulled, fast) - p
        return new_updates, {"base": base_state, "slow": slow}


# ---------------------------------------------------------------------- SAM


@dataclasses.dataclass(frozen=True)
class SAM(_Wrapper):
    """Sharpness-aware minimisation: ``base`` steps with the gradient at the worst point of
    the ``rho``-ball (to first order)::

        ε = ρ · T² g / (‖T g‖ + eps),   T = |θ| if adaptive else 1      (ASAM when adaptive)
        θ ← θ + base update with the gradient ∇f(θ + ε)

    One extra gradient evaluation per step (``loss_fn``; a closure for the ``torch.optim``
    class). Foret, Kleiner, Mobahi & Neyshabur, "Sharpness-aware minimization for efficiently
    improving generalization", ICLR 2021; adaptive: Kwon et al., "ASAM", ICML 2021.
    """

    rho: float = 0.05
    adaptive: bool = False
    eps: float = 1e-12

    needs_loss_fn: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_hyperparameter("rho", self.rho)
        check_hyperparameter("eps", self.eps)
        boolean("adaptive", self.adaptive)

    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        loss_fn = _needs("SAM", loss_fn)
        if self.adaptive:
            norm = global_norm({k: params[k].abs() * g for k, g in grads.items()})
            scale = {k: params[k] * params[k] for k in grads}
        else:
            norm, scale = global_norm(grads), {k: 1.0 for k in grads}
        factor = self.rho / (norm + self.eps)
        ascent = {k: p + factor * scale[k] * grads[k] for k, p in params.items()}
        _, sharp_grads = loss_fn.value_and_grad(ascent)
        updates, base_state = self._base_update(sharp_grads, state, params, step)
        return updates, {"base": base_state}


# ---------------------------------------------------------------------- Entropy-SGD


@dataclasses.dataclass(frozen=True)
class EntropySGD(_Wrapper):
    """Entropy-SGD: ``base`` follows the gradient of the local entropy, estimated by
    ``inner_steps`` steps of Langevin dynamics around ``θ``::

        θ' ← θ,  μ ← θ;   L times:
            θ' ← θ' - η' (∇f(θ') - γ (θ - θ')) + √η' · noise · N(0, I)
            μ  ← (1 - α) μ + α θ'
        θ ← θ + base update with the gradient γ (θ - μ)

    ``γ`` (``gamma``, the scope) grows as ``γ (1 + scoping)^t``. Chaudhari et al.,
    "Entropy-SGD: biasing gradient descent into wide valleys", ICLR 2017, Alg. 1. Costs
    ``inner_steps`` gradient evaluations per step (the given gradient is not used).
    """

    inner_steps: int = 5
    inner_lr: float = 0.1
    gamma: float = 0.03
    scoping: float = 1e-3
    noise: float = 1e-4
    alpha: float = 0.75

    needs_loss_fn: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("inner_steps", self.inner_steps)
        for name in ("inner_lr", "gamma", "scoping", "noise"):
            check_hyperparameter(name, getattr(self, name))
        check_hyperparameter("alpha", self.alpha, high=1.0)

    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        loss_fn = _needs("EntropySGD", loss_fn)
        gamma = self.gamma * (1 + self.scoping) ** step
        walker, mean = dict(params), dict(params)
        temperature = math.sqrt(self.inner_lr) * self.noise
        for _ in range(self.inner_steps):
            _, g = loss_fn.value_and_grad(walker)
            walker = {
                k: w
                - self.inner_lr * (g[k] - gamma * (params[k] - w))
                + temperature * torch.randn_like(w)
                for k, w in walker.items()
            }
            mean = {k: torch.lerp(m, walker[k], self.alpha) for k, m in mean.items()}
        entropy_grads = {k: gamma * (p - mean[k]) for k, p in params.items()}
        updates, base_state = self._base_update(entropy_grads, state, params, step)
        return updates, {"base": base_state}


# ---------------------------------------------------------------------- LPF-SGD, SmoothOut

NOISES = ("gaussian", "uniform")
NOISE_SCALES = ("filter_norm", "absolute")


@dataclasses.dataclass(frozen=True)
class PerturbedGradient(_Wrapper):
    """``base`` steps with the gradient averaged over ``samples`` noise-perturbed weights::

        g = (1/M) Σ_i ∇f(θ + ε_i)

    - ``noise="gaussian"``, ``scale="filter_norm"`` — LPF-SGD (Bisla, Wang & Choromanska,
      "Low-pass filtering SGD for recovering flat optima in the deep learning optimization
      landscape", AISTATS 2022): ``ε ~ N(0, σ² ‖θ_f‖²)`` per filter ``f`` (the rows of a
      weight along its first dimension; the whole tensor for a vector), registered as
      ``lpf_sgd``;
    - ``noise="uniform"``, ``scale="absolute"`` — SmoothOut (Wen et al., "SmoothOut: smoothing
      out sharp minima to improve generalization in deep learning", 2018): ``ε ~ U(-σ, σ)``,
      registered as ``smoothout``.

    Costs ``samples`` gradient evaluations per step (the given gradient is not used).
    """

    samples: int = 4
    sigma: float = 1e-3
    noise: str = "gaussian"
    scale: str = "filter_norm"

    needs_loss_fn: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("samples", self.samples)
        check_hyperparameter("sigma", self.sigma)
        if self.noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {self.noise!r}")
        if self.scale not in NOISE_SCALES:
            raise ValueError(f"scale must be one of {NOISE_SCALES}, got {self.scale!r}")

    def _perturbation(self, p: Tensor) -> Tensor:
        uniform = self.noise == "uniform"
        draw = 2 * torch.rand_like(p) - 1 if uniform else torch.randn_like(p)
        if self.scale == "absolute" or p.ndim == 0:
            return self.sigma * draw
        rows = p.reshape(p.shape[0] if p.ndim > 1 else 1, -1)  # one row per filter
        scale = (self.sigma * rows.norm(dim=1, keepdim=True)).expand_as(rows)
        return scale.reshape(p.shape) * draw

    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        loss_fn = _needs(type(self).__name__, loss_fn)
        total = {k: torch.zeros_like(p) for k, p in params.items()}
        for _ in range(self.samples):
            noisy = {k: p + self._perturbation(p) for k, p in params.items()}
            _, g = loss_fn.value_and_grad(noisy)
            total = {k: t + g[k] for k, t in total.items()}
        smoothed = {k: t / self.samples for k, t in total.items()}
        updates, base_state = self._base_update(smoothed, state, params, step)
        return updates, {"base": base_state}


# ---------------------------------------------------------------------- weight averaging

AVERAGES = ("swa", "ema")


@dataclasses.dataclass(frozen=True)
class WeightAveraging(_Wrapper):
    """``base``'s steps, and an average of the iterates kept beside them (state ``average``).

    From update ``start`` on, every ``every``-th new iterate ``θ`` joins the average::

        swa:  θ̄ ← θ̄ + (θ - θ̄) / (n + 1)         (the running mean; Izmailov et al., "Averaging
                                                   weights leads to wider optima and better
                                                   generalization", UAI 2018)
        ema:  θ̄ ← decay · θ̄ + (1 - decay) · θ     (Polyak & Juditsky 1992, exponential form)

    the first one copied (as ``torch.optim.swa_utils.AveragedModel``). The training iterates
    are untouched; read the average with :meth:`averaged` or swap it into the model with
    :meth:`WeightAveragingOptimizer.swap_parameters`. (Batch-norm statistics are not weights:
    recompute them with ``torch.optim.swa_utils.update_bn`` after swapping.)
    """

    mode: str = "swa"
    start: int = 0
    every: int = 1
    decay: float = 0.999

    OWN_SLOTS: ClassVar[frozenset[str]] = frozenset({"average"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in AVERAGES:
            raise ValueError(f"mode must be one of {AVERAGES}, got {self.mode!r}")
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise ValueError(f"start must be an integer >= 0, got {self.start!r}")
        positive_int("every", self.every)
        check_hyperparameter("decay", self.decay, high=1.0)

    def _init_own(self, params: Params) -> State:
        device = next(iter(params.values())).device
        return {
            "average": {k: p.clone() for k, p in params.items()},
            "n_averaged": torch.zeros((), dtype=torch.int64, device=device),
        }

    @staticmethod
    def averaged(state: State) -> Params:
        """The averaged weights in a state of this rule (the iterate itself until one joined)."""
        return state["average"]

    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        updates, base_state = self._base_update(grads, state, params, step)
        count, average = state["n_averaged"], state["average"]
        joins = (step >= self.start) & ((step - self.start) % self.every == 0)
        if isinstance(joins, Tensor) or joins:
            joined = {}
            for k, p in params.items():
                new = p + updates[k]
                n = count.to(new.dtype)  # weights in the parameters' precision
                if self.mode == "swa":
                    weight = 1.0 / (n + 1)
                else:  # the first iterate to join is copied
                    weight = torch.where(n == 0, 1.0, (1.0 - self.decay) * torch.ones_like(n))
                mixed = torch.lerp(average[k], new, weight)
                joined[k] = _where(joins, mixed, average[k])
            average = joined
            count = count + (joins.to(count.dtype) if isinstance(joins, Tensor) else 1)
        return updates, {"base": base_state, "average": average, "n_averaged": count}


# ---------------------------------------------------------------------- torch.optim classes


class _WrapperOptimizer(RuleOptimizer):
    """A wrapper rule as a ``torch.optim`` optimizer: ``cls(params, base=rule, lr=..., ...)``
    (``base=None``: the wrapper's default base)."""

    rule_cls: ClassVar[type[_Wrapper]]

    def __init__(
        self, params: Iterable[Any], base: UpdateRule | None = None, **hparams: Any
    ) -> None:
        structure = {} if base is None else {"base": base}
        super().__init__(params, self.rule_cls(**structure, **hparams))


class LookaheadOptimizer(_WrapperOptimizer):
    """:class:`Lookahead` as a ``torch.optim`` optimizer."""

    rule_cls = Lookahead


class SAMOptimizer(_WrapperOptimizer):
    """:class:`SAM` as a ``torch.optim`` optimizer; ``step(closure)``."""

    rule_cls = SAM


class EntropySGDOptimizer(_WrapperOptimizer):
    """:class:`EntropySGD` as a ``torch.optim`` optimizer; ``step(closure)``."""

    rule_cls = EntropySGD


class PerturbedGradientOptimizer(_WrapperOptimizer):
    """:class:`PerturbedGradient` (LPF-SGD, SmoothOut) as a ``torch.optim`` optimizer;
    ``step(closure)``."""

    rule_cls = PerturbedGradient


class WeightAveragingOptimizer(_WrapperOptimizer):
    """:class:`WeightAveraging` as a ``torch.optim`` optimizer, with the average at hand:
    :meth:`averaged_parameters`, :meth:`swap_parameters` and the :meth:`averaged_weights`
    context manager (evaluate the averaged model, then carry on training)."""

    rule_cls = WeightAveraging

    def averaged_parameters(self) -> list[Tensor]:
        """The average of each parameter, in param-group order (the parameter itself where no
        step was taken yet)."""
        return [
            self.state[p]["average"] if "average" in self.state.get(p, {}) else p.detach()
            for group in self.param_groups
            for p in group["params"]
        ]

    @torch.no_grad()
    def swap_parameters(self) -> None:
        """Exchange every parameter's values with its average (call again to swap back)."""
        for group in self.param_groups:
            for p in group["params"]:
                slots = self.state.get(p, {})
                if "average" in slots:
                    held = p.detach().clone()
                    p.copy_(slots["average"])
                    slots["average"] = held

    @contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """``with optimizer.averaged_weights(): evaluate(model)``: the model holds the averaged
        weights inside the block, its training weights again after it."""
        self.swap_parameters()
        try:
            yield
        finally:
            self.swap_parameters()


registry.register("lookahead", Lookahead, LookaheadOptimizer)
registry.register("sam", SAM, SAMOptimizer)
registry.register("asam", SAM, SAMOptimizer, adaptive=True, rho=0.5)
registry.register("entropy_sgd", EntropySGD, EntropySGDOptimizer)
registry.register("lpf_sgd", PerturbedGradient, PerturbedGradientOptimizer)
registry.register(
    "smoothout",
    PerturbedGradient,
    PerturbedGradientOptimizer,
    noise="uniform",
    scale="absolute",
    sigma=1e-2,
)
registry.register("swa", WeightAveraging, WeightAveragingOptimizer)
registry.register("ema", WeightAveraging, WeightAveragingOptimizer, mode="ema")
