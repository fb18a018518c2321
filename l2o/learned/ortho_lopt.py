"""A small learned optimizer built to generalise: scale-free inputs, normalised and
orthogonalised updates (registry name ``"ortho_mlp"``).

Ideas from Celo2 (Moudgil et al., 2026: a tiny per-parameter MLP whose matrix updates are
orthogonalised by Newton–Schulz), μLO (Thérien et al., 2025: maximal-update scaling of a learned
optimizer's updates, for width generalisation) and Muon (Jordan et al., 2024); the code is ours.

**Inputs.** Per coordinate of a tensor with gradient ``g`` and parameter ``p``, with the
accumulators ``m_k = EMA_{β_k}(g)`` (``K`` momenta) and ``v = EMA_{β_v}(g²)``::

    m_k / s,  g / s                s = sqrt(v + δ·mean(v) + τ)
    m_1 / sqrt(v̂ + δ·mean(v) + τ)   v̂ = rowmean(v) ⊗ colmean(v) / mean(v) for matrices
                                   (Adafactor's rank-1 estimate, from v itself), v̂ = v else
    p / sqrt(mean(p²) + τ)         the parameter relative to its tensor's RMS
                                   (unless ``parameter_feature=False``)

plus, optionally, the step embedding ``tanh(t / T - 1)`` for ``step_timescales`` (none by
default: nothing ties the optimizer to a horizon). Replacing ``g`` by ``c·g`` (``c > 0``: a
loss multiplied by ``c``) multiplies ``m_k``, ``g`` and ``s`` by ``c`` and ``v``, ``v̂`` by
``c²``, so every input is unchanged: the relative ``δ = 1e-8`` takes the place of Adam's
absolute epsilon, which is what made the ``mlp`` optimizer's features fall below its
normaliser's epsilon and scale with the loss. ``τ = 1e-30`` only keeps 0/0 out of an all-zero
tensor.

**Output.** A small MLP (ReLU, ``2 × 8`` hidden units by default) maps the inputs to ``(d, a)``;
the per-coordinate direction is ``u = (base + d)·exp(λ a)``, where ``base`` is the input
``m_{base_momentum} / s`` (an Adam-like direction, so that at initialisation, with the small
output layer, the optimizer already behaves like a known one) and ``λ = exp_mult``.

- *Matrices* (every tensor of 2 or more dims; a conv weight viewed as ``[out, in·k...]``)::

      Δ = -lr · exp(log_lr_matrix) · r(A, B) · NS(u)

  ``NS`` is Muon's Newton–Schulz orthogonalisation (:func:`l2o.optim.muon.newton_schulz`, the
  same function, in ``ns_dtype``), which also removes ``u``'s scale. ``r`` sets the size of the
  step per layer: ``"spectral"`` (default) ``sqrt(max(1, A/B))``, a spectral norm of the update
  that follows the maximal-update parametrisation's ``sqrt(fan_out / fan_in)`` (Yang, Simon &
  Bernstein, 2023), so one learned step size serves every width; ``"match_rms_adamw"``
  ``0.2·sqrt(max(A, B))`` (update RMS ≈ 0.2, as AdamW's; Liu et al., 2025).
- *Vectors* (0-D and 1-D tensors, and the names in ``vector_keys``): either the learned
  direction normalised to unit RMS, ``Δ = -lr · exp(log_lr_vector) · u / rms(u)``
  (``vector_rule="learned"``), or a hand-designed rule from :mod:`l2o.optim` by name (e.g.
  ``"adamw"`` with ``vector_hparams``), scaled by ``lr``.

**Step size.** Both normalisations remove the direction's scale, so with
``step_scale="constant"`` every step has the learned size, however noisy the gradients: a
constant-size random walk once training reaches its noise floor, which no horizon-free rule
can anneal. ``step_scale="adam_rms"`` multiplies each tensor's step by ``min(1, rms(base))``,
the RMS of the Adam-like direction ``m_β / s`` bias-corrected as Adam's: about 1 while the
gradients agree from step to step and about ``sqrt((1 - β)/(1 + β))`` (0.23 for β = 0.9) when
they are noise, the shrinkage Adam applies coordinate-wise, measured per tensor and scale-free.

**Coordinates that never had a gradient** (``v == 0``: an input pixel that is 0 in every
image, an unused embedding row) see all-zero inputs, on which the MLP still outputs its
constant ``MLP(0)``: a drift no gradient asked for. ``mask_unseen=True`` zeroes ``u`` there,
as Adam leaves them; a zero row or column of a matrix stays zero through Newton–Schulz (each
of its terms is ``X`` times a polynomial of ``XᵀX``, or ``XXᵀ`` times ``X``).

With normalised steps and no decay, the weights' norms grow as a random walk once the
gradients are noise (and the logits with them): ``weight_decay`` ``λ`` adds the decoupled
``-step_size·λ·p`` (AdamW's and Muon's form, at each tensor's own step size), which bounds
them.

``lr`` (the rule's field, default 1) multiplies everything, so the ``torch.optim`` adapter and
LR schedulers scale it. Pure, vmappable and differentiable, like every rule.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from l2o.compiling import compile_quietly
from l2o.learned.base import LOpt, check_decays, check_timescales, init_mlp
from l2o.learned.features import ema, tanh_step_embedding
from l2o.learned.mlp_fused import row_blocks
from l2o.learned.rule import BlockedLearnedRule
from l2o.optim import registry as optim_registry
from l2o.optim.base import Params, State, Step, UpdateRule, check_hyperparameter, lr_at
from l2o.optim.muon import newton_schulz

#: Relative epsilon: ``s = sqrt(v + δ·mean(v) + τ)`` (scale-free, unlike an absolute one).
RELATIVE_EPS = 1e-8
#: Absolute floor inside every square root: only an all-zero tensor ever sees it.
TINY = 1e-30
MATRIX_SCALINGS = ("spectral", "match_rms_adamw")
STEP_SCALES = ("constant", "adam_rms")
NS_DTYPES = ("float32", "float64", "bfloat16")


class OrthoMLPLOpt(LOpt):
    """The ``ortho_mlp`` learned optimizer (see the module docstring).

    Args:
        hidden_sizes: widths of the ReLU hidden layers.
        momentum_decays: ``β_k`` of the momenta (``K`` of them).
        rms_decay: ``β_v`` of the second moment.
        base_momentum: index into ``momentum_decays`` of the momentum whose ``m / s`` is the
            base direction the MLP's output is added to.
        step_timescales: ``T`` of the optional step embedding (empty: none).
        exp_mult: ``λ``, the weight of the log-magnitude output.
        output_init_scale: multiplies the output layer's initial weights.
        lr_init: initial value of both learned step sizes (``exp(log_lr_*)``).
        matrix_scaling: ``"spectral"`` or ``"match_rms_adamw"`` (see the module docstring).
        ns_steps, ns_dtype: Newton–Schulz iterations and their dtype.
        vector_rule: ``"learned"`` or a registered hand-designed rule (:func:`l2o.optim.names`).
        vector_hparams: that rule's hyper-parameters.
        vector_keys: names of tensors of 2 or more dims to update as vectors (e.g. embeddings):
            a task's parameter names in meta-training; in the drop-in optimizer the names of
            ``model.named_parameters()``, when it is given those (plain parameters are keyed by
            position, ``"0"``, ``"1"``, ...).
        step_scale: ``"constant"`` (the normalised step's size is the learned step size) or
            ``"adam_rms"`` (times ``min(1, rms(base))`` per tensor, see the module docstring).
        step_scale_momentum: index into ``momentum_decays`` of the momentum ``adam_rms`` measures
            (default: ``base_momentum``); a slower one shrinks the steps more in noise
            (``sqrt((1 - β)/(1 + β))``: 0.07 for β = 0.99).
        weight_decay: ``λ`` of a decoupled weight decay ``-step_size·λ·p`` on the learned
            tensors (matrices and learned vectors), at each tensor's own step size.
        parameter_feature: whether ``p / rms(p)`` is an input. Without it the update does not
            depend on the parameter's value: an optimizer meta-trained on short episodes with
            it learned to grow the weights, which runs away over long runs (EVALUATION.md).
        mask_unseen: no learned update for coordinates whose ``v`` is 0 (never a gradient).
    """

    name = "ortho_mlp"

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (8, 8),
        momentum_decays: Sequence[float] = (0.5, 0.9, 0.99),
        rms_decay: float = 0.999,
        base_momentum: int = 1,
        step_timescales: Sequence[float] = (),
        exp_mult: float = 0.1,
        output_init_scale: float = 0.1,
        lr_init: float = 1e-2,
        matrix_scaling: str = "spectral",
        ns_steps: int = 5,
        ns_dtype: str = "float32",
        vector_rule: str = "learned",
        vector_hparams: Mapping[str, Any] | None = None,
        vector_keys: Sequence[str] = (),
        step_scale: str = "constant",
        weight_decay: float = 0.0,
        step_scale_momentum: int | None = None,
        parameter_feature: bool = True,
        mask_unseen: bool = False,
    ) -> None:
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        if any(h < 1 for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive, got {list(hidden_sizes)}")
        self.momentum_decays = check_decays("momentum_decays", momentum_decays)
        (self.rms_decay,) = check_decays("rms_decay", [rms_decay])
        if not (isinstance(base_momentum, int) and 0 <= base_momentum < len(momentum_decays)):
            raise ValueError(
                f"base_momentum must index momentum_decays (0..{len(momentum_decays) - 1}), "
                f"got {base_momentum!r}"
            )
        self.base_momentum = base_momentum
        self.step_timescales = check_timescales(step_timescales)
        for name, value in [
            ("exp_mult", exp_mult),
            ("output_init_scale", output_init_scale),
            ("lr_init", lr_init),
        ]:
            check_hyperparameter(name, value)
        check_hyperparameter("lr_init", lr_init, low=0.0, low_inclusive=False)
        self.exp_mult, self.output_init_scale = float(exp_mult), float(output_init_scale)
        self.lr_init = float(lr_init)
        if matrix_scaling not in MATRIX_SCALINGS:
            raise ValueError(
                f"matrix_scaling must be one of {MATRIX_SCALINGS}, got {matrix_scaling!r}"
            )
        self.matrix_scaling = matrix_scaling
        if not (isinstance(ns_steps, int) and ns_steps >= 1):
            raise ValueError(f"ns_steps must be a positive integer, got {ns_steps!r}")
        self.ns_steps = ns_steps
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype must be one of {NS_DTYPES}, got {ns_dtype!r}")
        self.ns_dtype = ns_dtype
        self.vector_rule = str(vector_rule)
        self.vector_hparams = dict(vector_hparams or {})
        self._hand_rule: UpdateRule | None = None
        if self.vector_rule != "learned":
            self._hand_rule = optim_registry.get(self.vector_rule, **self.vector_hparams)
            if self._hand_rule.needs_loss_fn or not self._hand_rule.vmappable:
                raise ValueError(f"vector_rule {self.vector_rule!r} must be a first-order rule")
        elif self.vector_hparams:
            raise ValueError("vector_hparams are for a hand-designed vector_rule, not 'learned'")
        self.vector_keys = tuple(str(k) for k in vector_keys)
        if step_scale not in STEP_SCALES:
            raise ValueError(f"step_scale must be one of {STEP_SCALES}, got {step_scale!r}")
        self.step_scale = step_scale
        check_hyperparameter("weight_decay", weight_decay)
        self.weight_decay = float(weight_decay)
        # Kept as given (None: the base momentum) so that config() can leave it out by default.
        self._step_scale_momentum = step_scale_momentum
        if step_scale_momentum is None:
            step_scale_momentum = base_momentum
        if not (
            isinstance(step_scale_momentum, int) and 0 <= step_scale_momentum < len(momentum_decays)
        ):
            raise ValueError(
                "step_scale_momentum must index momentum_decays "
                f"(0..{len(momentum_decays) - 1}), got {step_scale_momentum!r}"
            )
        self.step_scale_momentum = step_scale_momentum
        for name, flag in [("parameter_feature", parameter_feature), ("mask_unseen", mask_unseen)]:
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be true or false, got {flag!r}")
        self.parameter_feature, self.mask_unseen = parameter_feature, mask_unseen

    @property
    def num_features(self) -> int:
        """Per-coordinate inputs besides the step embedding: K momenta, g, v̂ and (unless
        ``parameter_feature=False``) p."""
        return len(self.momentum_decays) + 2 + int(self.parameter_feature)

    def hand_rule(self) -> UpdateRule | None:
        """The hand-designed rule of the vector tensors, or None (``vector_rule="learned"``)."""
        return self._hand_rule

    def config(self) -> dict:
        return {
            "hidden_sizes": list(self.hidden_sizes),
            "momentum_decays": list(self.momentum_decays),
            "rms_decay": self.rms_decay,
            "base_momentum": self.base_momentum,
            "step_timescales": list(self.step_timescales),
            "exp_mult": self.exp_mult,
            "output_init_scale": self.output_init_scale,
            "lr_init": self.lr_init,
            "matrix_scaling": self.matrix_scaling,
            "ns_steps": self.ns_steps,
            "ns_dtype": self.ns_dtype,
            "vector_rule": self.vector_rule,
            "vector_hparams": dict(self.vector_hparams),
            "vector_keys": list(self.vector_keys),
            "step_scale": self.step_scale,
            "weight_decay": self.weight_decay,
            # Only when set: a config without it keeps the identity it had before the option.
            **(
                {"step_scale_momentum": self._step_scale_momentum}
                if self._step_scale_momentum is not None
                else {}
            ),
            # Likewise only when not the default, for the same reason.
            **({} if self.parameter_feature else {"parameter_feature": False}),
            **({"mask_unseen": True} if self.mask_unseen else {}),
        }

    def init_meta(self, generator: torch.Generator) -> Params:
        """MLP weights ``w{i}`` (``[fan_in, fan_out]``, clipped normal, std ``1/sqrt(fan_in)``;
        the output layer's times ``output_init_scale``), zero biases ``b{i}``, and the two
        learned log step sizes ``log_lr_matrix``, ``log_lr_vector``."""
        device = generator.device
        sizes = [self.num_features + len(self.step_timescales), *self.hidden_sizes, 2]
        meta = init_mlp(sizes, generator, self.output_init_scale)
        for kind in ("matrix", "vector"):
            meta[f"log_lr_{kind}"] = torch.tensor(math.log(self.lr_init), device=device)
        return meta

    def rule(self, meta_params: Params, lr=1.0) -> OrthoMLPRule:
        return OrthoMLPRule(lopt=self, meta_params=meta_params, lr=lr)

    def __repr__(self) -> str:
        return f"OrthoMLPLOpt({self.config()})"


def _rms(x: Tensor) -> Tensor:
    return torch.sqrt(torch.mean(x * x) + TINY)


@dataclasses.dataclass(frozen=True)
class OrthoMLPRule(BlockedLearnedRule):
    """The update rule of :class:`OrthoMLPLOpt` at fixed ``meta_params``."""

    lopt: OrthoMLPLOpt = dataclasses.field(repr=False)
    #: Compute each learned tensor's accumulators and per-coordinate direction with
    #: :func:`compiled_coordinates` (one ``torch.compile``d pass) instead of the eager blocked
    #: path: an implementation setting for the drop-in optimizer (no vmap), like ``chunk_size``.
    compiled: bool = dataclasses.field(default=False, repr=False)

    def tensorwise(self) -> bool:
        # Every tensor's update is its own; a hand-designed vector rule must be so as well.
        hand = self.lopt.hand_rule()
        return hand is None or hand.tensorwise()

    def parameter_slots(self) -> frozenset[str] | None:
        hand = self.lopt.hand_rule()
        if hand is None:
            return frozenset({"m", "v"})
        inner = hand.parameter_slots()
        if inner is None:
            return None
        return frozenset({"m", "v", *(f"vector_rule/{path}" for path in inner)})

    def _is_matrix(self, name: str, p: Tensor) -> bool:
        return p.ndim >= 2 and name not in self.lopt.vector_keys

    def _hand_keys(self, params: Params) -> list[str]:
        if self.lopt.vector_rule == "learned":
            return []
        return [k for k, p in params.items() if not self._is_matrix(k, p)]

    def init(self, params: Params) -> State:
        k = len(self.lopt.momentum_decays)
        hand = self._hand_keys(params)
        learned = {name: p for name, p in params.items() if name not in hand}
        dtype = {n: torch.promote_types(p.dtype, torch.float32) for n, p in learned.items()}
        state: State = {
            "m": {
                n: torch.zeros(*p.shape, k, dtype=dtype[n], device=p.device)
                for n, p in learned.items()
            },
            "v": {
                n: torch.zeros(p.shape, dtype=dtype[n], device=p.device) for n, p in learned.items()
            },
        }
        if hand:
            state["vector_rule"] = self.lopt.hand_rule().init({n: params[n] for n in hand})
        return state

    def _inputs(self, g: Tensor, p: Tensor, m: Tensor, v: Tensor, matrix: bool) -> Tensor:
        """``[numel, num_features]``: the scale-free inputs of one tensor (module docstring)."""
        floor = RELATIVE_EPS * torch.mean(v) + TINY
        s = torch.sqrt(v + floor)
        if matrix:
            v2 = v.reshape(v.shape[0], -1)
            v_hat = torch.outer(v2.mean(1), v2.mean(0)) / (torch.mean(v2) + TINY)
            v_hat = v_hat.reshape(v.shape)
        else:
            v_hat = v
        columns = [
            m / s.unsqueeze(-1),
            (g / s).unsqueeze(-1),
            (m[..., :1] / torch.sqrt(v_hat + floor).unsqueeze(-1)),
        ]
        if self.lopt.parameter_feature:
            columns.append((p / _rms(p)).unsqueeze(-1))
        return torch.cat(columns, dim=-1).reshape(-1, self.lopt.num_features)

    def _constants(self, step: Step, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        """What every tensor of one dtype shares in an update: the decays, the step embedding
        (None without timescales), ``adam_rms``'s bias correction (None without it) and the
        meta-parameters in that dtype. Built once per dtype, not once per tensor (each build is
        a host-to-device copy on GPU)."""
        embedding = None
        if self.lopt.step_timescales:
            embedding = tanh_step_embedding(
                step, self.lopt.step_timescales, dtype=dtype, device=device
            )
        beta_m = torch.tensor(self.lopt.momentum_decays, dtype=dtype, device=device)
        beta_v = torch.tensor(self.lopt.rms_decay, dtype=dtype, device=device)
        correction = None
        if self.lopt.step_scale == "adam_rms":
            # sqrt(1 - β_v^t) / (1 - β^t) turns m / sqrt(v) into Adam's m̂ / sqrt(v̂).
            count = (step + 1) if not isinstance(step, Tensor) else (step + 1).to(dtype)
            beta = beta_m[self.lopt.step_scale_momentum]
            correction = torch.sqrt(1 - beta_v**count) / (1 - beta**count)
        return {
            "beta_m": beta_m,
            "beta_v": beta_v,
            "embedding": embedding,
            "rms_correction": correction,
            "meta": {k: v.to(device, dtype) for k, v in self.meta_params.items()},
        }

    def _feature_major_layers(
        self, meta: Params, embedding: Tensor | None
    ) -> list[tuple[Tensor, Tensor]]:
        """The MLP's layers as ``(Wᵀ, b[:, None])`` for feature-major inputs ``[features, n]``,
        with the step embedding (the same for every coordinate) folded into the first bias.
        ``Wᵀ`` is made contiguous: a transposed view makes these thin products 3x slower."""
        f, layers = self.lopt.num_features, len(self.lopt.hidden_sizes) + 1
        b0 = meta["b0"]
        if embedding is not None:
            b0 = b0 + embedding @ meta["w0"][f:]
        weights = [meta["w0"][:f]] + [meta[f"w{i}"] for i in range(1, layers)]
        biases = [b0] + [meta[f"b{i}"] for i in range(1, layers)]
        return [(w.T.contiguous(), b.unsqueeze(1)) for w, b in zip(weights, biases, strict=True)]

    def _cached_feature_major_layers(
        self, constants: dict[str, Any]
    ) -> list[tuple[Tensor, Tensor]]:
        """:meth:`_feature_major_layers` of ``constants``, built once per dtype and step, and
        only by the paths that use them (fused, compiled and traced)."""
        if "feature_major_layers" not in constants:
            layers = self._feature_major_layers(constants["meta"], constants["embedding"])
            constants["feature_major_layers"] = layers
        return constants["feature_major_layers"]

    def _direction(self, inputs: Tensor, constants: dict[str, Any]) -> Tensor:
        """``u = (base + d)·exp(λ a)`` per coordinate, ``[numel]``."""
        meta, embedding = constants["meta"], constants["embedding"]
        h = inputs
        if embedding is not None:
            h = torch.cat([h, embedding.expand(h.shape[0], -1)], dim=-1)
        layers = len(self.lopt.hidden_sizes) + 1
        for i in range(layers):
            h = torch.addmm(meta[f"b{i}"], h, meta[f"w{i}"])
            if i < layers - 1:
                h = torch.relu(h)
        direction, log_magnitude = h.unbind(-1)
        base = inputs[:, self.lopt.base_momentum]
        return (base + direction) * torch.exp(self.lopt.exp_mult * log_magnitude)

    def _direction_fused(
        self, g: Tensor, p: Tensor, m: Tensor, v: Tensor, matrix: bool, constants: dict[str, Any]
    ) -> tuple[Tensor, Tensor]:
        """What :meth:`_inputs` and :meth:`_direction` compute, in blocks of about
        ``chunk_size`` coordinates: ``u`` (``[numel]``) and the mean square of the
        ``step_scale_momentum`` input (for :meth:`_adam_rms`), without the ``[numel, 6]``
        input matrix or the ``[numel, 8]`` hidden activations of the whole tensor.

        Why: a per-coordinate MLP this narrow is memory-bound, and coordinate-major
        ``[numel, 8]`` products stream through main memory at a fraction of its bandwidth.
        Feature-major blocks (``[6, n]`` inputs, ``[8, n]`` activations, ``W^T x`` products)
        stay in cache. Pure (the in-place ReLU acts on fresh products), so it also runs under
        vmap and autograd."""
        lopt, layers = self.lopt, self._cached_feature_major_layers(constants)
        k = len(lopt.momentum_decays)
        floor = RELATIVE_EPS * torch.mean(v) + TINY
        p_scale = 1.0 / _rms(p) if lopt.parameter_feature else None
        rows = p.shape[0] if matrix else 1
        g2, p2, v2 = (x.reshape(rows, -1) for x in (g, p, v))
        m2 = m.reshape(rows, -1, k)
        if matrix:  # v̂ = rowmean(v) ⊗ colmean(v) / mean(v), as two factors
            row_mean, col_mean = v2.mean(1), v2.mean(0) / (torch.mean(v2) + TINY)
        directions, square_sum = [], torch.zeros((), dtype=g.dtype, device=g.device)
        for start, stop in row_blocks(rows, g2.shape[1], self.chunk_size):
            v_block = v2[start:stop].reshape(1, -1)
            m_block = m2[start:stop].reshape(-1, k).T  # [k, n]
            v_hat = torch.outer(row_mean[start:stop], col_mean).reshape(1, -1) if matrix else None
            inv_s = torch.rsqrt(v_block + floor)
            columns = [
                m_block * inv_s,
                g2[start:stop].reshape(1, -1) * inv_s,
                m_block[:1] * (inv_s if v_hat is None else torch.rsqrt(v_hat + floor)),
            ]
            if lopt.parameter_feature:
                columns.append(p2[start:stop].reshape(1, -1) * p_scale)
            x = torch.cat(columns)
            h = x
            for i, (w, b) in enumerate(layers):
                h = torch.addmm(b, w, h)
                if i < len(layers) - 1:
                    h = torch.relu_(h)
            base = x[lopt.base_momentum]
            directions.append((base + h[0]) * torch.exp(lopt.exp_mult * h[1]))
            measured = x[lopt.step_scale_momentum]
            square_sum = square_sum + torch.sum(measured * measured)
        return torch.cat(directions), square_sum / g.numel()

    def _direction_reference(
        self, g: Tensor, p: Tensor, m: Tensor, v: Tensor, matrix: bool, constants: dict[str, Any]
    ) -> tuple[Tensor, Tensor]:
        """``u`` and the ``step_scale_momentum`` input's mean square from the whole input
        matrix (the oracle of :meth:`_direction_fused`)."""
        inputs = self._inputs(g, p, m, v, matrix)
        measured = inputs[:, self.lopt.step_scale_momentum]
        return self._direction(inputs, constants), torch.mean(measured * measured)

    def _adam_rms(self, mean_square: Tensor, constants: dict[str, Any]) -> Tensor:
        """``min(1, rms(m̂ / sqrt(v̂)))`` of the ``step_scale_momentum`` momentum, bias-corrected
        as Adam's (so that it measures the gradients' agreement from the first step on), from
        the mean square of that input."""
        rms = torch.sqrt(mean_square + TINY)
        return (rms * constants["rms_correction"]).clamp(max=1.0)

    def _coordinates_eager(
        self,
        g: Tensor,
        p: Tensor,
        m_old: Tensor,
        v_old: Tensor,
        matrix: bool,
        constants: dict[str, Any],
        fused: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One tensor's new ``m``, ``v``, its direction ``u`` before orthogonalisation or
        normalisation, and the ``step_scale_momentum`` input's mean square."""
        m = ema(m_old, g.unsqueeze(-1), constants["beta_m"])
        v = ema(v_old, g * g, constants["beta_v"])
        direction_of = self._direction_fused if fused else self._direction_reference
        u, mean_square = direction_of(g, p, m, v, matrix, constants)
        u = u.reshape(p.shape)
        if self.lopt.mask_unseen:
            u = torch.where(v > 0, u, torch.zeros_like(u))
        return m, v, u, mean_square

    def _coordinates_function(self) -> Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]:
        """How each tensor's accumulators and direction are computed: inside a graph being
        compiled and differentiated with respect to the meta-parameters (TBPTT's compiled inner
        steps), :func:`coordinates` traced into that graph; with ``compiled`` (the drop-in's
        opt-in), :func:`compiled_coordinates`; otherwise the eager paths (blocked or reference,
        as ``fused`` says).

        Why the first: the scalar-weighted MLP of :func:`coordinates` makes every weight's
        meta-gradient a reduction Inductor fuses with the elementwise backward, where the
        feature-major products of the blocked path leave thin matrix products and single-
        threaded reductions over transposed masks. Measured on the AMD EPYC VM, the compiled
        TBPTT truncation of ``bench_meta_train.py`` with the default inside, both forms in one
        process: 1.15x faster at population 1, 1.48x at 8, 2.15x at 64 (BENCHMARKS.md). Not
        for the forward-only scan (ES/PES, each member with its own meta-parameters), where the
        same form is 0.63x the blocked one. Measured on the CPU only; on CUDA the same choice
        is made unmeasured."""
        if torch.compiler.is_compiling() and self._meta_gradient_recorded():
            return self._coordinates_traced
        if self.compiled and _compile_failure is None:
            return self._coordinates_compiled
        return self._coordinates_eager

    def _meta_gradient_recorded(self) -> bool:
        """Whether autograd records this update for a meta-gradient (TBPTT)."""
        return torch.is_grad_enabled() and any(v.requires_grad for v in self.meta_params.values())

    def _coordinates_inputs(
        self, g: Tensor, p: Tensor, m_old: Tensor, v_old: Tensor, matrix: bool, constants: dict
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments of :func:`coordinates` for one tensor, viewed as ``[rows, cols]`` (a
        matrix's first dim by the rest; a vector as one row)."""
        lopt, k = self.lopt, len(self.lopt.momentum_decays)
        layers = self._cached_feature_major_layers(constants)
        rows = p.shape[0] if matrix else 1
        args = (
            g.reshape(rows, -1),
            p.reshape(rows, -1) if lopt.parameter_feature else None,
            m_old.reshape(rows, -1, k),
            v_old.reshape(rows, -1),
            constants["beta_m"],
            constants["beta_v"],
            [w for layer in layers for w in layer],
        )
        options = {
            "matrix": matrix,
            "base_momentum": lopt.base_momentum,
            "measured_momentum": lopt.step_scale_momentum,
            "exp_mult": lopt.exp_mult,
            "mask_unseen": lopt.mask_unseen,
        }
        return args, options

    def _coordinates_traced(
        self,
        g: Tensor,
        p: Tensor,
        m_old: Tensor,
        v_old: Tensor,
        matrix: bool,
        constants: dict[str, Any],
        fused: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """What :meth:`_coordinates_eager` computes, by :func:`coordinates` itself (for a graph
        being compiled, which traces it; ``fused`` does not apply)."""
        args, options = self._coordinates_inputs(g, p, m_old, v_old, matrix, constants)
        m, v, u, mean_square = coordinates(*args, **options)
        return m.reshape(m_old.shape), v.reshape(v_old.shape), u.reshape(p.shape), mean_square

    def _coordinates_compiled(
        self,
        g: Tensor,
        p: Tensor,
        m_old: Tensor,
        v_old: Tensor,
        matrix: bool,
        constants: dict[str, Any],
        fused: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """What :meth:`_coordinates_eager` computes, through :func:`compiled_coordinates` on
        the tensor viewed as ``[rows, cols]`` (a matrix's first dim by the rest; a vector as one
        row). Falls back to the eager path (``fused`` or not) for good, with a warning, where
        compilation fails (e.g. no C++ compiler for inductor on CPU)."""
        global _compile_failure
        args, options = self._coordinates_inputs(g, p, m_old, v_old, matrix, constants)
        tensors = tuple(x if x is None else _plain(x) for x in args[:4])
        try:
            # Each tensor rank pattern, dtype and flag set is its own graph; dynamo's default of
            # 8 per function would silently run the rest through the (slow) uncompiled form.
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                m, v, u, mean_square = compiled_coordinates(*tensors, *args[4:], **options)
        except Exception as error:  # any compiler failure: run eagerly instead
            _compile_failure = f"{type(error).__name__}: {error}"
            warnings.warn(
                "ortho_mlp: the compiled step failed, so every step runs the eager one "
                f"(same results, slower): {_compile_failure[:500]}",
                stacklevel=4,
            )
            return self._coordinates_eager(g, p, m_old, v_old, matrix, constants, fused)
        return m.reshape(m_old.shape), v.reshape(v_old.shape), u.reshape(p.shape), mean_square

    def _matrix_direction(self, u: Tensor, shape: torch.Size) -> Tensor:
        rows, cols = shape[0], math.prod(shape[1:])
        ortho = newton_schulz(
            u.reshape(rows, cols),
            steps=self.lopt.ns_steps,
            dtype=getattr(torch, self.lopt.ns_dtype),
        ).to(u.dtype)
        if self.lopt.matrix_scaling == "spectral":
            ratio = math.sqrt(max(1.0, rows / cols))
        else:
            ratio = 0.2 * math.sqrt(max(rows, cols))
        return ratio * ortho.reshape(shape)

    def _update(
        self, grads: Params, state: State, params: Params, step: Step, fused_above: int | None
    ) -> tuple[Params, State]:
        lr = lr_at(self.lr, step)
        hand = self._hand_keys(params)
        updates: Params = {}
        new_state: State = {"m": {}, "v": {}}
        shared: dict[torch.dtype, dict[str, Any]] = {}
        for name, p in params.items():
            if name in hand:
                continue
            m_old, v_old = state["m"][name], state["v"][name]
            dtype = m_old.dtype
            if dtype not in shared:
                shared[dtype] = self._constants(step, dtype, p.device)
            constants = shared[dtype]
            g = grads[name].to(dtype)
            matrix = self._is_matrix(name, p)
            fused = fused_above is not None and p.numel() > fused_above
            coordinates_of = self._coordinates_function()
            m, v, u, mean_square = coordinates_of(
                g, p.to(dtype), m_old, v_old, matrix, constants, fused
            )
            kind = "matrix" if matrix else "vector"
            step_size = torch.exp(self.meta_params[f"log_lr_{kind}"]).to(u)
            if self.lopt.step_scale == "adam_rms":
                step_size = step_size * self._adam_rms(mean_square, constants)
            direction = self._matrix_direction(u, p.shape) if matrix else u / _rms(u)
            # Decoupled weight decay at the step's own size (as Muon and AdamW scale it by lr).
            delta = step_size * (direction + self.lopt.weight_decay * p.to(dtype))
            updates[name] = (-lr * delta).to(p.dtype)
            new_state["m"][name], new_state["v"][name] = m, v
        if hand:
            sub = {n: params[n] for n in hand}
            hand_updates, new_state["vector_rule"] = self.lopt.hand_rule().update(
                {n: grads[n] for n in hand}, state["vector_rule"], sub, step=step
            )
            updates.update({n: lr * u for n, u in hand_updates.items()})
        return {k: updates[k] for k in params}, new_state


#: Graphs of :func:`coordinates` kept per process: one per dtype, flag set (matrix or vector,
#: with or without the parameter input and the mask) and pattern of size-1 dims.
RECOMPILE_LIMIT = 64


def _plain(view: Tensor) -> Tensor:
    """``view`` as a contiguous tensor that is not a view (a copy only where it is not
    contiguous), so that tensors of any rank and layout share a graph of :func:`coordinates`:
    Dynamo guards an input on its strides, and a view input on its base's sizes and strides
    too. The view relation is kept where a gradient flows through it (``detach`` would cut it)."""
    view = view.contiguous()
    return view if view.requires_grad else view.detach()


#: Why compilation failed in this process (None: it has not), after which every compiled rule
#: runs the eager path: one failure (a missing compiler) would fail every later step alike.
_compile_failure: str | None = None


def coordinates(
    g: Tensor,
    p: Tensor | None,
    m_old: Tensor,
    v_old: Tensor,
    beta_m: Tensor,
    beta_v: Tensor,
    layers: list[Tensor],
    *,
    matrix: bool,
    base_momentum: int,
    measured_momentum: int,
    exp_mult: float,
    mask_unseen: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``ortho_mlp``'s per-coordinate work on one tensor, ``[R, C]`` (``m_old``: ``[R, C, K]``),
    written for :func:`torch.compile`: new ``m`` and ``v``, the direction ``u`` and the mean
    square of the ``measured_momentum`` input, as :meth:`OrthoMLPRule._coordinates_eager`.

    The MLP is spelled out as scalar-weighted sums of ``[R, C]`` tensors (``layers``: the
    feature-major ``Wᵀ``, ``b[:, None]`` pairs, flattened), not as matrix products: inductor
    then fuses inputs, every layer and the output into one loop over the coordinates, with no
    ``[numel, features]`` or ``[numel, hidden]`` buffer, which the narrow products of the eager
    path cannot avoid (BENCHMARKS.md). Eagerly this form is slow (one op per weight). Besides
    the drop-in's :func:`compiled_coordinates`, TBPTT's compiled inner steps trace it into
    their graphs, where its backward is what makes them fast
    (:meth:`OrthoMLPRule._coordinates_function`)."""
    m = torch.lerp(g.unsqueeze(-1), m_old, beta_m)
    v = torch.lerp(g * g, v_old, beta_v)
    mean_v = torch.mean(v)
    floor = RELATIVE_EPS * mean_v + TINY
    inv_s = torch.rsqrt(v + floor)
    inputs = [m[..., j] * inv_s for j in range(m.shape[-1])] + [g * inv_s]
    if matrix:  # v̂ = rowmean(v) ⊗ colmean(v) / mean(v)
        col_mean = torch.mean(v, 0, keepdim=True) / (mean_v + TINY)
        inputs.append(m[..., 0] * torch.rsqrt(torch.mean(v, 1, keepdim=True) * col_mean + floor))
    else:
        inputs.append(m[..., 0] * inv_s)
    if p is not None:
        # p / rms(p), not p·rsqrt(...): rsqrt's gradient, -rsqrt(x)³/2, overflows float32 where a
        # whole tensor is 0, and 0·inf would put NaN in a meta-gradient (TBPTT traces this form).
        inputs.append(p / _rms(p))
    hidden = inputs
    for i in range(0, len(layers), 2):
        weight, bias = layers[i], layers[i + 1]  # [out, in], [out, 1]
        hidden = [
            sum((hidden[c] * weight[r, c] for c in range(weight.shape[1])), bias[r, 0])
            for r in range(weight.shape[0])
        ]
        if i + 2 < len(layers):
            hidden = [torch.relu(h) for h in hidden]
    direction, log_magnitude = hidden
    u = (inputs[base_momentum] + direction) * torch.exp(exp_mult * log_magnitude)
    if mask_unseen:
        u = torch.where(v > 0, u, torch.zeros_like(u))
    measured = inputs[measured_momentum]
    return m, v, u, torch.mean(measured * measured)


def compiled_coordinates(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`coordinates` through :func:`torch.compile`, compiled once per process (shapes
    symbolic, so a new tensor size does not recompile; each dtype, layout of the flags and
    layer count does)."""
    return _compiled_coordinates()(*args, **kwargs)


@functools.cache
def _compiled_coordinates() -> Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]:
    return compile_quietly(coordinates, dynamic=True)
