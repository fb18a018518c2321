"""AdaFisher: momentum preconditioned by a diagonal block-Kronecker approximation of the Fisher.

For a linear or convolutional layer with inputs ``h`` (with a 1 appended for the bias; patches
for a convolution) and gradients ``s`` of the loss with respect to its outputs, K-FAC
approximates the layer's Fisher block by ``H ⊗ S`` with ``H = E[h hᵀ]`` and ``S = E[s sᵀ]``.
AdaFisher keeps only the factors' diagonals, which it finds to dominate them, normalises each
to [0, 1] (min–max) and smooths them (``γ = (γ₀, γ₁)``, every ``update_period`` updates)::

    H̄ ← (1 - γ₀) H̄ + γ₁ minmax(diag E[h hᵀ]),    S̄ ← (1 - γ₀) S̄ + γ₁ minmax(diag E[s sᵀ])
    F̃ = S̄ H̄ᵀ + λ                                 (the diagonal of S̄ ⊗ H̄, one entry per weight)
    m_t = β m_{t-1} + (1 - β) (g + λ_wd θ)
    θ  ← θ - η / (1 - βᵗ) · m_t / F̃               (AdaFisherW: decoupled weight decay)

(``H̄`` and ``S̄`` start at ones.) Parameters outside linear and 2-D convolutional layers get
``F̃ = 1``: momentum with a bias correction, as in the reference implementation.

The factors come from the layers' activations, so the rule needs them from its loss function:
``loss_fn.kronecker_factors(params) -> {weight_key: (diag_H, diag_S)}``. :class:`ModuleLoss`
computes them for a loss written with ``torch.func.functional_call`` on a module; the
``torch.optim`` class :class:`AdaFisherOptimizer` takes the model and reads them from hooks
during the ordinary ``loss.backward()`` (no closure needed). The rule is not vmappable (the
statistics come from module hooks), and it is not an ``l2o-eval`` baseline: ``l2o-eval``'s
optimizers see parameters, not the modules around them.

Gomes, Zhang, Belilovsky, Wolf & Hosseini, "AdaFisher: adaptive second order optimization
via Fisher information", ICLR 2025 (and the authors' code for the normalisation, the factor
smoothing and the defaults).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from l2o.optim import registry
from l2o.optim.base import (
    DifferentiableLoss,
    LearningRate,
    LossFn,
    Params,
    State,
    Step,
    check_hyperparameter,
    lr_at,
    zeros_like_params,
)
from l2o.optim.line_search import OneGroupOptimizer
from l2o.optim.rules import _bias_correction, _ema, _float_step, _is_zero, _Rule
from l2o.validation import positive_int

__all__ = ["AdaFisher", "AdaFisherOptimizer", "ModuleLoss", "layers_of"]

#: Layers whose Fisher block AdaFisher approximates.
SUPPORTED = (nn.Linear, nn.Conv2d)
Layer = tuple[str, str | None]  # (weight key, bias key or None)
MINMAX_EPS = 1e-12


def _supported_layers(module: nn.Module) -> dict[str, nn.Module]:
    """``module``'s linear and 2-D conv layers by name (``""`` for the module itself)."""
    return {name: sub for name, sub in module.named_modules() if isinstance(sub, SUPPORTED)}


def _parameter_name(layer: str, what: str) -> str:
    return f"{layer}.{what}" if layer else what


def layers_of(module: nn.Module) -> tuple[Layer, ...]:
    """The ``(weight, bias)`` parameter names of ``module``'s linear and 2-D conv layers."""
    return tuple(
        (
            _parameter_name(name, "weight"),
            _parameter_name(name, "bias") if sub.bias is not None else None,
        )
        for name, sub in _supported_layers(module).items()
    )


def _minmax(t: Tensor) -> Tensor:
    return (t - t.min()) / (t.max() - t.min() + MINMAX_EPS)


def input_statistic(layer: nn.Module, h: Tensor) -> Tensor:
    """``diag E[h̄ h̄ᵀ]`` over the batch (and positions, for a convolution's patches), ``h̄`` the
    layer's input with a 1 appended when the layer has a bias."""
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError("AdaFisher supports Conv2d with explicit zero padding")
        patches = nn.functional.unfold(
            h, layer.kernel_size, layer.dilation, layer.padding, layer.stride
        )  # [B, C·kh·kw, positions]
        h = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    else:
        h = h.reshape(-1, h.shape[-1])
    if layer.bias is not None:
        h = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)
    return (h * h).mean(dim=0)


def output_statistic(layer: nn.Module, s: Tensor) -> Tensor:
    """``diag E[s sᵀ]`` of the gradients with respect to the layer's outputs."""
    if isinstance(layer, nn.Conv2d):
        s = s.transpose(1, -1)
    s = s.reshape(-1, s.shape[-1])
    return (s * s).mean(dim=0)


# ---------------------------------------------------------------------- the rule


@dataclasses.dataclass(frozen=True)
class AdaFisher(_Rule):
    """AdaFisher (module docstring). ``layers``: the ``(weight, bias)`` keys of the parameters
    that form linear / conv layers (:func:`layers_of`, or :meth:`for_module`); structure,
    fixed for the optimizer's lifetime."""

    lr: LearningRate = 1e-3
    beta: float = 0.9
    damping: float = 1e-3
    gammas: tuple[float, float] = (0.92, 0.008)
    update_period: int = 100
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    layers: tuple[Layer, ...] = ()

    needs_loss_fn: ClassVar[bool] = True
    vmappable: ClassVar[bool] = False
    PARAMETER_SLOTS: ClassVar[frozenset[str]] = frozenset(
        {"exp_avg", "input_factor", "output_factor"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # lr, weight_decay
        check_hyperparameter("damping", self.damping)
        check_hyperparameter("beta", self.beta, high=1.0, high_inclusive=False)
        gammas = tuple(self.gammas)
        if len(gammas) != 2:
            raise ValueError(f"gammas must be a pair (gamma0, gamma1), got {self.gammas!r}")
        for i, gamma in enumerate(gammas):
            check_hyperparameter(f"gammas[{i}]", gamma, high=1.0)
        object.__setattr__(self, "gammas", gammas)
        positive_int("update_period", self.update_period)
        layers = tuple((str(w), None if b is None else str(b)) for w, b in self.layers)
        object.__setattr__(self, "layers", layers)

    def loss_fn_requirements(self) -> frozenset[str]:
        return frozenset({"kronecker_factors"})

    @classmethod
    def for_module(cls, module: nn.Module, **hparams: Any) -> AdaFisher:
        """The rule for ``module``'s parameters, keyed by ``named_parameters`` names."""
        return cls(layers=layers_of(module), **hparams)

    @classmethod
    def hyperparameter_names(cls) -> tuple[str, ...]:
        return tuple(n for n in super().hyperparameter_names() if n != "layers")

    def init(self, params: Params) -> State:
        inputs, outputs = {}, {}
        for weight, bias in self._layers_in(params):
            w = params[weight]
            inputs[weight] = w.new_ones(w[0].numel() + (bias is not None))
            outputs[weight] = w.new_ones(w.shape[0])
        return {
            "exp_avg": zeros_like_params(params),
            "input_factor": inputs,
            "output_factor": outputs,
        }

    def _layers_in(self, params: Mapping[str, Tensor]) -> list[Layer]:
        missing = [w for w, _ in self.layers if w not in params]
        if missing:
            raise ValueError(f"AdaFisher's layers name parameters that are not given: {missing}")
        return list(self.layers)

    def preconditioner(self, state: State, params: Params) -> Params:
        """``F̃`` for every parameter (ones outside the layers)."""
        fisher = {k: torch.ones_like(p) for k, p in params.items()}
        for weight, bias in self._layers_in(params):
            h, s = state["input_factor"][weight], state["output_factor"][weight]
            w = params[weight]
            width = w[0].numel()
            fisher[weight] = (torch.outer(s, h[:width]) + self.damping).reshape(w.shape)
            if bias is not None and bias in params:
                fisher[bias] = s * h[width] + self.damping
        return fisher

    def _refreshed_factors(
        self, state: State, params: Params, loss_fn: Any
    ) -> tuple[Params, Params]:
        factors = getattr(loss_fn, "kronecker_factors", None)
        if factors is None:
            raise TypeError(
                "AdaFisher needs its layers' activation statistics: pass loss_fn=ModuleLoss(...) "
                "(for the torch.optim class, AdaFisherOptimizer(model, ...) collects them)"
            )
        g0, g1 = self.gammas
        inputs, outputs = dict(state["input_factor"]), dict(state["output_factor"])
        for weight, (h, s) in factors(params).items():
            inputs[weight] = (1 - g0) * inputs[weight] + g1 * _minmax(h)
            outputs[weight] = (1 - g0) * outputs[weight] + g1 * _minmax(s)
        return inputs, outputs

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
        inputs, outputs = state["input_factor"], state["output_factor"]
        if self.layers and int(step) % self.update_period == 0:
            inputs, outputs = self._refreshed_factors(state, params, loss_fn)
        new_state = {"input_factor": inputs, "output_factor": outputs}
        fisher = self.preconditioner(new_state, params)
        if not self.decoupled_weight_decay and not _is_zero(self.weight_decay):
            grads = {k: g + self.weight_decay * params[k] for k, g in grads.items()}
        exp_avg = {k: _ema(state["exp_avg"][k], g, self.beta) for k, g in grads.items()}
        step_size = lr / _bias_correction(self.beta, _float_step(step) + 1)
        updates = {k: -step_size * m / fisher[k] for k, m in exp_avg.items()}
        if self.decoupled_weight_decay and not _is_zero(self.weight_decay):
            updates = {k: u - lr * self.weight_decay * params[k] for k, u in updates.items()}
        return updates, {"exp_avg": exp_avg, **new_state}


# ---------------------------------------------------------------------- the statistics


class _Recorder:
    """Forward hooks on a module's supported layers: without ``probes``, record each layer's
    input and output shape; with them, add a probe to each output (so that the gradient with
    respect to the probe is the gradient with respect to the output)."""

    def __init__(self, module: nn.Module) -> None:
        self.layers = _supported_layers(module)
        self.inputs: dict[str, Tensor] = {}
        self.output_shapes: dict[str, torch.Size] = {}
        self.probes: Mapping[str, Tensor] | None = None

    @contextmanager
    def hooked(self) -> Iterator[None]:
        handles = [sub.register_forward_hook(self._hook(name)) for name, sub in self.layers.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str) -> Callable[..., Any]:
        def hook(layer: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            if self.probes is not None:
                return output + self.probes[name]
            self.inputs[name] = args[0]
            self.output_shapes[name] = output.shape
            return None

        return hook


@dataclasses.dataclass(frozen=True)
class ModuleLoss(DifferentiableLoss):
    """``fn(params)`` (a loss computed with ``torch.func.functional_call(module, params, ...)``)
    as a loss function that also gives AdaFisher's Kronecker-factor diagonals.

    :meth:`kronecker_factors` runs ``fn`` twice: once to record every supported layer's input
    and output shape, once with a zero probe added to each output, differentiated with respect
    to the probes (the gradients with respect to the outputs)."""

    module: nn.Module
    fn: Callable[[Params], Tensor]
    known_loss: Tensor | None = None

    def __call__(self, params: Params) -> Tensor:
        return self.fn(params)

    def kronecker_factors(self, params: Params) -> dict[str, tuple[Tensor, Tensor]]:
        recorder = _Recorder(self.module)
        with recorder.hooked(), torch.no_grad():
            self.fn({k: p.detach() for k, p in params.items()})
        shapes = dict(recorder.output_shapes)
        reference = next(iter(params.values()))
        zeros = {n: reference.new_zeros(shape) for n, shape in shapes.items()}

        def probed(probes: Mapping[str, Tensor]) -> Tensor:
            recorder.probes = probes
            return self.fn({k: p.detach() for k, p in params.items()})

        with recorder.hooked():
            output_grads = torch.func.grad(probed)(zeros)
        recorder.probes = None
        return {
            _parameter_name(name, "weight"): (
                input_statistic(layer, recorder.inputs[name].detach()),
                output_statistic(layer, output_grads[name]),
            )
            for name, layer in recorder.layers.items()
        }


# ---------------------------------------------------------------------- torch.optim class


class AdaFisherOptimizer(OneGroupOptimizer):
    """:class:`AdaFisher` for a model, as the authors' class: ``AdaFisherOptimizer(model,
    lr=...)``, then the ordinary loop (``loss.backward(); optimizer.step()``, no closure).

    Hooks on the model's linear and conv layers record their inputs and output gradients on the
    forward and backward passes that precede an update that refreshes the factors (every
    ``update_period`` updates). One param group.
    """

    #: Built from a model, not from parameters.
    takes_model: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        lr: LearningRate = 1e-3,
        beta: float = 0.9,
        damping: float = 1e-3,
        gammas: tuple[float, float] = (0.92, 0.008),
        update_period: int = 100,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                "AdaFisherOptimizer takes the model (its layers' activations are the "
                f"statistics), not parameters: got {type(model).__name__}"
            )
        names = {id(p): n for n, p in model.named_parameters()}
        params = [p for p in model.parameters() if p.requires_grad]
        index = {names[id(p)]: str(i) for i, p in enumerate(params)}
        layers = tuple(
            (index[w], None if b is None else index.get(b))
            for w, b in layers_of(model)
            if w in index
        )
        rule = AdaFisher(
            lr,
            beta,
            damping,
            tuple(gammas),
            update_period,
            weight_decay,
            decoupled_weight_decay,
            layers=layers,
        )
        super().__init__(params, rule)
        self._statistics: dict[str, tuple[Tensor, Tensor]] = {}
        self._hooks = []
        for name, layer in _supported_layers(model).items():
            weight = _parameter_name(name, "weight")
            if weight in index:
                self._hooks.append(layer.register_forward_hook(self._forward_hook(index[weight])))

    def _due(self) -> bool:
        anchor = self.state.get(self.param_groups[0]["params"][0], {})
        step = int(anchor.get("step", 0))
        return step % self._group_rule(self.param_groups[0]).update_period == 0

    def _forward_hook(self, key: str):
        # The output gradient is taken by a hook on the output tensor, not a module backward
        # hook (which warns, and misfires, when the layer's inputs need no gradient).
        def hook(layer, args, output):
            if not (torch.is_grad_enabled() and output.requires_grad and self._due()):
                return
            h = input_statistic(layer, args[0].detach())

            def record(grad: Tensor) -> None:
                self._statistics[key] = (h, output_statistic(layer, grad.detach()))

            output.register_hook(record)

        return hook

    def _closure_required(self) -> bool:
        return False

    def _loss_fn(self, closure, live, known_loss):
        statistics, self._statistics = self._statistics, {}
        return _HookedStatistics(statistics)

    def remove_hooks(self) -> None:
        """Detach the optimizer's hooks from the model (when done training with it)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


@dataclasses.dataclass
class _HookedStatistics:
    """The loss function an :class:`AdaFisherOptimizer` hands its rule: the statistics its
    hooks recorded on the last backward pass (the rule evaluates nothing else)."""

    statistics: dict[str, tuple[Tensor, Tensor]]
    known_loss: Tensor | None = None
    evaluations: int = 0

    def kronecker_factors(self, params: Params) -> dict[str, tuple[Tensor, Tensor]]:
        return self.statistics


registry.register("adafisher", AdaFisher, AdaFisherOptimizer)
registry.register("adafisher_w", AdaFisher, AdaFisherOptimizer, decoupled_weight_decay=True)
