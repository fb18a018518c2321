"""Muon: momentum orthogonalised by a Newton–Schulz iteration (Jordan et al. 2024).

For a matrix-shaped parameter ``W`` (``[out, in]``; a conv weight ``[out, in, k...]`` is viewed
as ``[out, in·k...]``) with gradient ``G``::

    B_t = μ·B_{t-1} + (1 - μ)·G_t                 (an EMA, as torch.optim.Muon)
    M   = (1 - μ)·G_t + μ·B_t  if nesterov else B_t
    O   = NS_k(M)                                 ≈ U Vᵀ for M = U S Vᵀ (the polar factor)
    W  ← W·(1 - η·λ) - η·r(shape)·O               r: "original" √max(1, A/B) or
                                                     "match_rms_adamw" 0.2·√max(A, B)

``NS_k`` is :func:`newton_schulz`: ``X ← X / ‖X‖_F``, then ``k`` quintic steps
``X ← a·X + (b·A + c·A²)·X`` with ``A = X Xᵀ`` and ``(a, b, c) = (3.4445, -4.7750, 2.0315)``,
which push every singular value towards [0.7, 1.2] in five steps (it does not converge to
exactly 1: that is by design). It runs on the short side of the matrix (transposing tall ones)
and in ``ns_dtype`` (bfloat16 by default, as the reference implementation).

Every other parameter (biases, gains: 0-D and 1-D tensors) is updated by ``other``, an
Adam-family rule (AdamW by default). Embeddings and output layers are 2-D but often better
served by ``other`` as well; put them in a param group of their own with a plain AdamW, or use
``matrix_keys`` in the functional rule.

K. Jordan, Y. Jin, V. Boza, J. You, F. Cesista, L. Newhouse, J. Bernstein, "Muon: an optimizer
for hidden layers in neural networks", 2024; J. Liu et al. (Moonshot AI), "Muon is scalable for
LLM training", 2025 (the ``match_rms_adamw`` scaling).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from l2o.optim.base import (
    LearningRate,
    LossFn,
    Params,
    State,
    Step,
    UpdateRule,
    check_hyperparameter,
    lr_at,
)
from l2o.optim.rules import AdamW
from l2o.validation import positive_int

#: Jordan et al.'s quintic coefficients (maximal slope at zero).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR_FNS = ("original", "match_rms_adamw", "none")

__all__ = ["Muon", "newton_schulz"]


def newton_schulz(
    matrix: Tensor,
    coefficients: Sequence[float] = NS_COEFFICIENTS,
    steps: int = 5,
    eps: float = 1e-7,
    dtype: torch.dtype | None = torch.bfloat16,
) -> Tensor:
    """An approximate orthogonalisation (``U Vᵀ`` of ``matrix = U S Vᵀ``) of a 2-D tensor by
    ``steps`` quintic Newton–Schulz iterations (see the module docstring), in ``dtype``
    (``None``: the matrix's own). Pure and differentiable; under ``torch.func.vmap`` it maps
    over stacked matrices. Returned in the computation dtype."""
    if matrix.ndim != 2:
        raise ValueError(f"newton_schulz needs a 2-D matrix, got shape {list(matrix.shape)}")
    a, b, c = coefficients
    x = matrix if dtype is None else matrix.to(dtype)
    tall = matrix.shape[0] > matrix.shape[1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _lr_ratio(rows: int, cols: int, adjust_lr_fn: str) -> float:
    if adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


@dataclasses.dataclass(frozen=True)
class Muon(UpdateRule):
    """Muon for matrix-shaped parameters, ``other`` for the rest (see the module docstring).

    Args:
        lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps: as
            ``torch.optim.Muon``.
        adjust_lr_fn: "original" (Jordan et al.; torch's ``None``), "match_rms_adamw" or "none".
        ns_dtype: "bfloat16" (default, the reference implementation's), "float32" or "float64"
            (e.g. when differentiating through the update).
        other: the rule for parameters that are not matrices (default AdamW, lr 3e-4).
        matrix_keys: names of the parameters Muon updates (default: every tensor with 2 or more
            dims); the others go to ``other``.
    """

    lr: LearningRate = 1e-3
    weight_decay: float = 0.1
    momentum: float = 0.95
    nesterov: bool = True
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS
    eps: float = 1e-7
    ns_steps: int = 5
    adjust_lr_fn: str = "original"
    ns_dtype: str = "bfloat16"
    other: UpdateRule = dataclasses.field(default_factory=lambda: AdamW(lr=3e-4))
    matrix_keys: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_hyperparameter("lr", self.lr)
        check_hyperparameter("weight_decay", self.weight_decay)
        check_hyperparameter("momentum", self.momentum, high=1.0, high_inclusive=False)
        check_hyperparameter("eps", self.eps, low=0.0, low_inclusive=False)
        positive_int("ns_steps", self.ns_steps)
        if len(tuple(self.ns_coefficients)) != 3:
            raise ValueError(f"ns_coefficients must be 3 numbers, got {self.ns_coefficients!r}")
        object.__setattr__(self, "ns_coefficients", tuple(float(c) for c in self.ns_coefficients))
        if self.adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(
                f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {self.adjust_lr_fn!r}"
            )
        if self.ns_dtype not in ("bfloat16", "float32", "float64"):
            raise ValueError(
                f"ns_dtype must be bfloat16, float32 or float64, got {self.ns_dtype!r}"
            )
        if not isinstance(self.other, UpdateRule) or self.other.needs_loss_fn:
            raise TypeError(f"other must be a first-order UpdateRule, got {self.other!r}")
        if self.matrix_keys is not None:
            object.__setattr__(self, "matrix_keys", tuple(str(k) for k in self.matrix_keys))

    @classmethod
    def hyperparameter_names(cls) -> tuple[str, ...]:
        # ``other`` and ``matrix_keys`` are structure, not what param groups or schedulers set.
        return tuple(n for n in super().hyperparameter_names() if n not in ("other", "matrix_keys"))

    def parameter_slots(self) -> frozenset[str] | None:
        inner = self.other.parameter_slots()
        if inner is None:
            return None
        return frozenset({"momentum_buffer", *(f"other/{path}" for path in inner)})

    def _is_matrix(self, name: str, p: Tensor) -> bool:
        if self.matrix_keys is not None:
            return name in self.matrix_keys
        return p.ndim >= 2

    def _split(self, tree: Params, params: Params) -> tuple[Params, Params]:
        matrices = {k: v for k, v in tree.items() if self._is_matrix(k, params[k])}
        return matrices, {k: v for k, v in tree.items() if k not in matrices}

    def init(self, params: Params) -> State:
        matrices, rest = self._split(params, params)
        return {
            "momentum_buffer": {k: torch.zeros_like(p) for k, p in matrices.items()},
            "other": self.other.init(rest) if rest else {},
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
        dtype = getattr(torch, self.ns_dtype)
        matrix_grads, rest_grads = self._split(grads, params)
        updates: Params = {}
        buffers: Params = {}
        for k, g in matrix_grads.items():
            p = params[k]
            buffers[k] = torch.lerp(state["momentum_buffer"][k], g, 1 - self.momentum)
            direction = torch.lerp(g, buffers[k], self.momentum) if self.nesterov else buffers[k]
            matrix = direction.reshape(direction.shape[0], -1)
            ortho = newton_schulz(matrix, self.ns_coefficients, self.ns_steps, self.eps, dtype)
            ratio = _lr_ratio(*matrix.shape, self.adjust_lr_fn)
            # Decoupled weight decay, then the orthogonalised step (torch.optim.Muon's order).
            updates[k] = -(lr * self.weight_decay) * p - lr * ratio * ortho.reshape(p.shape).to(
                p.dtype
            )
        new_state: State = {"momentum_buffer": buffers, "other": {}}
        if rest_grads:
            rest_params = {k: params[k] for k in rest_grads}
            other_updates, new_state["other"] = self.other.update(
                rest_grads, state["other"], rest_params, step=step
            )
            updates.update(other_updates)
        return {k: updates[k] for k in grads}, new_state
