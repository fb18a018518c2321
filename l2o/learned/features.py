"""Per-coordinate feature helpers shared by the learned-optimizer architectures.

Everything here is a pure tensor function, safe under ``torch.func.vmap`` (a population of
tasks) and autograd (meta-gradients): no in-place ops on inputs, no ``.item()``, and every
square root has its epsilon inside so exactly-zero gradients give finite values *and* finite
derivatives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from l2o.optim.base import Step

#: Timescales of the training-step embedding (Metz et al. 2022, ``tanh_embedding``).
STEP_TIMESCALES: tuple[float, ...] = (1, 3, 10, 30, 100, 300, 1e3, 3e3, 1e4, 3e4, 1e5)


def ema(average: Tensor, value: Tensor, decay: Tensor) -> Tensor:
    """Exponential moving average ``decay * average + (1 - decay) * value`` (out of place).

    ``decay`` broadcasts against the trailing "decay" axis of ``average``, so one call updates
    the accumulators of several decays at once.
    """
    return torch.lerp(value, average, decay)


def second_moment_normalize(x: Tensor, dim: int | Sequence[int] = 0, eps: float = 1e-5) -> Tensor:
    """``x / sqrt(mean(x², dim) + eps)``: rescale each feature to unit second moment.

    Applied per tensor, this makes the learned optimizer's inputs invariant to the scale of
    gradients and parameters of each layer (the epsilon keeps an all-zero feature at zero).
    """
    return x * torch.rsqrt(torch.mean(x * x, dim=dim, keepdim=True) + eps)


def tanh_step_embedding(
    step: Step, timescales: Sequence[float], *, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``tanh(step / τ - 1)`` for each timescale τ, a vector of ``len(timescales)``.

    Each entry moves from -0.76 (step 0) towards +1 around step ≈ 2τ, so the vector tells the
    learned optimizer how far into training it is on log-spaced scales. ``step`` may be an int
    or a (vmapped) 0-dim tensor.
    """
    step_f = step.to(dtype) if isinstance(step, Tensor) else torch.tensor(float(step), dtype=dtype)
    step_f = step_f.to(device)
    # One division per timescale by a Python number, not by a tensor of the timescales: a
    # tensor built here would be a constant of a compiled graph, which Inductor does not pass
    # into the body of a compiled scan (l2o.meta.unroll, torch 2.13).
    return torch.tanh(torch.stack([step_f / tau for tau in timescales], dim=-1) - 1.0)


def logit(p: float) -> float:
    """Inverse of the sigmoid, for initialising decay logits."""
    return math.log(p / (1.0 - p))


def decays_from_logits(logits: Tensor) -> Tensor:
    """Decays in (0, 1) from unconstrained meta-parameters (``sigmoid``)."""
    return torch.sigmoid(logits)


def factored_dims(shape: Sequence[int]) -> tuple[int, int] | None:
    """The two dims Adafactor factors over: the two largest (ties: the later ones), ascending.

    ``None`` for tensors with fewer than two dims of size > 1, whose second moment is kept whole.
    For a ``(out, in, kh, kw)`` convolution this picks ``(out, in)``, not the kernel dims.
    """
    if len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda d: (shape[d], d))
    row, col = sorted(order[-2:])
    if shape[row] < 2 or shape[col] < 2:
        return None
    return row, col


def factored_second_moment(row: Tensor, col: Tensor, dims: tuple[int, int], eps: float) -> Tensor:
    """Adafactor's rank-1 estimate of the per-coordinate second moment.

    ``row`` is E[g²] averaged over the column dim (the column dim removed), ``col`` the same over
    the row dim, both with a trailing decay axis. The estimate is
    ``row ⊗ col / mean(row)`` (Shazeer & Stern 2018), with the full shape plus the decay axis.
    """
    row_dim, col_dim = dims
    row_mean = torch.mean(row, dim=row_dim, keepdim=True)
    return (row / (row_mean + eps)).unsqueeze(col_dim) * col.unsqueeze(row_dim)


def log_sign_preprocess(g: Tensor, p: float = 10.0) -> Tensor:
    """Andrychowicz et al. (2016) gradient preprocessing, two features per coordinate.

    ``(log|g| / p, sign g)`` if ``|g| >= e^-p`` else ``(-1, e^p g)``. The logarithm sees
    ``|g|`` clamped to ``e^-p`` so the branch that ``torch.where`` discards never produces
    ``log 0`` (whose derivative would turn meta-gradients into NaN).
    """
    threshold = math.exp(-p)
    magnitude = g.abs()
    large = magnitude >= threshold
    log_part = torch.where(large, torch.log(magnitude.clamp_min(threshold)) / p, -1.0)
    sign_part = torch.where(large, torch.sign(g), math.exp(p) * g)
    return torch.stack([log_part, sign_part], dim=-1)
